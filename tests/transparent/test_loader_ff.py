"""DataLoader fast-forward: a resumed loader yields exactly what an uninterrupted one would
from (epoch E, batch B) on, without loading the skipped samples."""
from __future__ import annotations

import random

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

from pyckpt import sampler_draws
from pyckpt.hooks import HookSet
from pyckpt.loader_state import FastForward, LoaderTracker


class Counting(Dataset):
    """Items are their own index; counts __getitem__ calls made in this process."""

    def __init__(self, n: int = 23) -> None:
        # (a list: a plain int attribute is a setting pyckpt puts back at the resumed epoch, pipeline_attrs.py)
        self.n, self.loaded = n, []

    @property
    def calls(self) -> int:
        return len(self.loaded)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        self.loaded.append(i)
        return torch.tensor(i)


def _loop(make, epochs, *, stop=None, plan=None, recreate=False, eval_loader=None, seed=0):
    """Run `epochs` epochs; returns (batches as (epoch, index, list), position and RNG at `stop`)."""
    hooks, got = HookSet(), {}
    tracker: LoaderTracker

    def on_point(st):
        if plan is not None and st is tracker.plan_stream:
            torch.set_rng_state(plan[1])  # what the session does at the snapshot point
            tracker.plan, tracker.armed = None, False
        if stop is not None and (st.epochs, st.batches) == stop and "pos" not in got:
            got["pos"], got["rng"] = st.position(), torch.get_rng_state()

    tracker = LoaderTracker(on_point, lambda: None, lambda: None)
    tracker.install(hooks)
    tracker.armed = stop is not None
    if plan is not None:
        tracker.plan = FastForward.from_position(plan[0])
    out, evals = [], []
    try:
        torch.manual_seed(seed)
        loader = make()
        for e in range(epochs):
            if recreate:
                loader = make()
            if isinstance(loader.sampler, DistributedSampler):
                loader.sampler.set_epoch(e)
            for i, b in enumerate(loader):
                out.append((e + 1, b.tolist()))
            if eval_loader is not None:
                evals.append([b.tolist() for b in eval_loader])
    finally:
        hooks.remove_all()
    return out, got, evals


def _check(make, epochs=3, stop=(2, 3), recreate=False, ds=None):
    ref, got, _ = _loop(make, epochs, stop=stop, recreate=recreate)
    assert "pos" in got, "the snapshot point was never reached"
    # Everything from the stop point on, in the uninterrupted run.
    n_before = sum(1 for e, _ in ref if e < stop[0]) + stop[1]
    expected = ref[n_before:]
    calls_before = ds.calls if ds is not None else 0
    resumed, _, _ = _loop(make, epochs, plan=(got["pos"], got["rng"]), recreate=recreate, seed=12345)
    assert resumed == expected
    return (ds.calls - calls_before) if ds is not None else None


def test_shuffled_single_process_skips_without_loading():
    ds = Counting()
    make = lambda: DataLoader(ds, batch_size=4, shuffle=True)  # noqa: E731
    loaded = _check(make, ds=ds)
    # Only the batches from (2, 3) on are loaded: 3 of 6 in epoch 2 (the last holds 3 items), all of epoch 3.
    assert loaded == (4 + 4 + 3) + 23


def test_worker_processes():
    make = lambda: DataLoader(Counting(), batch_size=4, shuffle=True, num_workers=2)  # noqa: E731
    _check(make)


def test_persistent_workers():
    make = lambda: DataLoader(Counting(), batch_size=4, shuffle=True, num_workers=2,  # noqa: E731
                              persistent_workers=True)
    _check(make, stop=(3, 2))


def test_distributed_sampler_with_set_epoch():
    ds = Counting()
    make = lambda: DataLoader(ds, batch_size=3, sampler=DistributedSampler(ds, num_replicas=2, rank=1))  # noqa: E731
    _check(make, stop=(2, 1))


def test_distributed_sampler_with_set_epoch_over_persistent_workers():
    """The epoch's settings kept for persistent workers reused are those of the iter() that started them (the
    workers hold copies of that dataset), but the sampler runs here at every epoch: its epoch taken from there
    (0) gave the resumed epoch 2 the order of epoch 1 (a silent wrong resume of DDP with persistent workers)."""
    ds = Counting()
    make = lambda: DataLoader(ds, batch_size=3, sampler=DistributedSampler(ds, num_replicas=2, rank=1),  # noqa: E731
                              num_workers=2, persistent_workers=True)
    _check(make, stop=(2, 1))
    _check(make, stop=(3, 2))


class Repeat:
    """timm's ``_RepeatSampler``: MultiEpochsDataLoader's batch sampler, passed over forever by one iterator."""

    def __init__(self, batch_sampler) -> None:
        self.sampler = batch_sampler

    def __iter__(self):
        while True:
            yield from iter(self.sampler)


TORCH_STEPS = (torch.manual_seed, lambda: torch.rand(3), torch.get_rng_state, torch.set_rng_state)
PYTHON_STEPS = (random.seed, random.random, random.getstate, random.setstate)


def _one_iterator(make, n, stop=None, plan=None, seed=0, steps=TORCH_STEPS):
    """``n`` batches from one iterator, drawing from torch's global generator after each (a training step's
    dropout; ``steps``: (seed, draw, get state, set state) of another generator); the position and random
    state at batch ``stop``."""
    hooks, got = HookSet(), {}
    seed_fn, step, get_rng, set_rng = steps

    def on_point(st):
        if tracker.plan is not None and st is tracker.plan_stream:
            set_rng(plan[1])  # the restore, once
            tracker.plan = None
        if stop is not None and st.batches == stop:
            got["pos"], got["rng"] = st.position(), get_rng()

    tracker = LoaderTracker(on_point, lambda: None, lambda: None)
    tracker.install(hooks)
    tracker.armed = True
    if plan is not None:
        tracker.plan = FastForward.from_position(plan[0])
    out = []
    try:
        seed_fn(seed)
        it = iter(make())
        for _ in range(n - (plan[0]["batch"] if plan else 0)):
            out.append(next(it).tolist())
            step()
        return out, got
    finally:
        hooks.remove_all()


def test_infinite_sampler_skips_inside_one_epoch():
    ds = Counting()
    make = lambda: DataLoader(ds, batch_size=4, sampler=RandomSampler(ds, replacement=True,  # noqa: E731
                                                                        num_samples=10**10))
    ref, got = _one_iterator(make, 12, stop=7)
    before = ds.calls
    resumed, _ = _one_iterator(make, 12, plan=(got["pos"], got["rng"]), seed=99)
    assert resumed == ref[7:]
    assert ds.calls - before == 5 * 4


def test_loaders_recreated_every_epoch():
    ds = Counting()
    _check(lambda: DataLoader(ds, batch_size=5, shuffle=True), recreate=True, stop=(3, 2))


def test_eval_loader_is_never_skipped():
    ds = Counting()
    val = DataLoader(Counting(7), batch_size=2)
    make = lambda: DataLoader(ds, batch_size=4, shuffle=True)  # noqa: E731
    _, got, ref_evals = _loop(make, 3, stop=(2, 3), eval_loader=val)
    _, _, evals = _loop(make, 3, plan=(got["pos"], got["rng"]), eval_loader=val, seed=5)
    assert evals == ref_evals and len(evals[0]) == 4


class Shard(Sampler):
    """A batch sampler wrapping a BatchSampler, as accelerate's BatchSamplerShard does under DDP."""

    def __init__(self, batch_sampler: BatchSampler) -> None:
        self.batch_sampler = batch_sampler

    def __iter__(self):
        return iter(self.batch_sampler)

    def __len__(self) -> int:
        return len(self.batch_sampler)


def test_generator_of_a_sampler_nested_in_a_wrapping_batch_sampler():
    # The shuffling sampler's own generator sits two levels below the loader; skipped epochs draw
    # no permutation from it, so its epoch-start state must be found and put back.
    ds = Counting()
    make = lambda: DataLoader(ds, batch_sampler=Shard(BatchSampler(  # noqa: E731
        RandomSampler(ds, generator=torch.Generator()), batch_size=4, drop_last=False)))
    _check(make, stop=(3, 2))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_sampler_drawing_from_the_global_generator_mid_epoch_draws_the_same_after_a_resume(workers):
    # Each pass of the RandomSampler draws its seed from torch's global generator when the previous pass ends,
    # in the middle of the one iterator, after steps drew from it too. The relaunch pulled the skipped index
    # batches back to back (the pass drew from another state): other batches after the resume, silently.
    ds = Counting()
    make = lambda: DataLoader(ds, batch_sampler=Repeat(BatchSampler(RandomSampler(ds), 4, False)),  # noqa: E731
                              num_workers=workers)
    ref, got = _one_iterator(make, 20, stop=9)  # 6 batches per pass: passes start at 6, 12 and 18
    resumed, _ = _one_iterator(make, 20, plan=(got["pos"], got["rng"]), seed=99)
    assert resumed == ref[9:]
    assert got["pos"]["sampler_draws"]["at"] == ([6] if workers == 0 else [6, 12])  # (workers pull 4 ahead)
    # An ordinary shuffled loader draws at its first pull only (covered by the epoch's start state): nothing kept.
    _, plain = _one_iterator(lambda: DataLoader(ds, batch_size=4, shuffle=True, num_workers=workers), 5, stop=3)
    assert "sampler_draws" not in plain["pos"]


class PythonShuffled:
    """Batches of 4 over ``n`` indices forever, each pass shuffled with Python's global generator (a bucketing
    sampler's ``random.shuffle``)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        while True:
            order = list(range(self.n))
            random.shuffle(order)
            yield from (order[i:i + 4] for i in range(0, self.n, 4))


def test_a_sampler_drawing_from_pythons_generator_mid_epoch_draws_the_same_after_a_resume(capsys):
    # Each pass shuffles with Python's generator, which the steps draw from too. Its first draw in the middle
    # of the iterator (the second pass, at pull 6) was seen after the fact and not kept: other batches, said.
    ds = Counting()
    make = lambda: DataLoader(ds, batch_sampler=PythonShuffled(len(ds)))  # noqa: E731
    ref, got = _one_iterator(make, 20, stop=9, steps=PYTHON_STEPS)
    resumed, _ = _one_iterator(make, 20, plan=(got["pos"], got["rng"]), seed=99, steps=PYTHON_STEPS)
    assert resumed == ref[9:]
    assert got["pos"]["sampler_draws"]["at"] == [6] and got["pos"]["sampler_draws"]["lost"] == 0
    assert "pyckpt kept" not in capsys.readouterr().err


def test_a_sampler_draw_not_kept_is_said_at_the_resume(monkeypatch, capsys):
    monkeypatch.setattr(sampler_draws, "KEPT", 1)
    ds = Counting()
    make = lambda: DataLoader(ds, batch_sampler=Repeat(BatchSampler(RandomSampler(ds), 4, False)))  # noqa: E731
    _, got = _one_iterator(make, 15, stop=14)
    assert got["pos"]["sampler_draws"]["at"] == [12] and got["pos"]["sampler_draws"]["lost"] == 1
    _one_iterator(make, 15, plan=(got["pos"], got["rng"]))
    assert "drew from the global random generators at more places in its epoch than pyckpt kept" in \
        capsys.readouterr().err


class PerBatch(Sampler):
    """A batch sampler drawing each batch from torch's global generator as it is asked for it."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return 12

    def __iter__(self):
        for _ in range(12):
            yield torch.randint(self.n, (4,)).tolist()


def test_a_sampler_drawing_at_every_batch_is_seen_in_the_first_pulls_and_watched_from_then_on():
    # Inside its length, only the first pulls of an iterator are looked at (sampler_draws.PROBED); a draw
    # there marks the sampler as one that draws per batch, and every later pull is watched. (Worker processes
    # are fed 4 index batches ahead of the loop: pulled before the restore point, they drew from the
    # relaunch's state.)
    ds = Counting()
    make = lambda: DataLoader(ds, batch_sampler=PerBatch(len(ds)), num_workers=2)  # noqa: E731
    ref, got = _one_iterator(make, 12, stop=7)
    resumed, again = _one_iterator(make, 12, stop=9, plan=(got["pos"], got["rng"]), seed=99)
    assert resumed == ref[7:]
    assert got["pos"]["sampler_draws"]["at"] == list(range(1, 11))
    # The resumed iterator pulled its first ones from the checkpoint's states, without looking: what was
    # learnt of the sampler came with them, and its later pulls are watched for a second resume.
    twice, _ = _one_iterator(make, 12, plan=(again["pos"], again["rng"]), seed=7)
    assert twice == ref[9:]


def test_malformed_gap_or_sampler_states_in_a_checkpoint_are_said_and_not_used(capsys):
    ds = Counting()
    make = lambda: DataLoader(ds, batch_sampler=Repeat(BatchSampler(RandomSampler(ds), 4, False)))  # noqa: E731
    _, got = _one_iterator(make, 9, stop=8)
    pos = dict(got["pos"], sampler_draws={"at": "x"}, past_ends={"first": -1})
    plan = FastForward.from_position(pos)
    assert plan.draws.at == [] and plan.gaps.states == []
    err = capsys.readouterr().err
    assert "the random states the sampler drew from in the middle of its epoch are malformed" in err
    assert "the random states of the gaps between epochs in the checkpoint are malformed" in err
    assert FastForward.from_position(got["pos"]).draws.at == [6]  # the well-formed one is used
