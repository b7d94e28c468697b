"""The data pipeline exact on resume (issue 6 item 5), in process: random draws in worker
processes, look-ahead wrappers over workers, loaders and datasets with their own state_dict()."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from pyckpt import loader_state, loader_workers
from pyckpt.hooks import HookSet
from pyckpt.loader_state import LoaderTracker
from tracked_loop import LookAhead, resumes_exactly, run_tracked


class Augmenting(Dataset):
    """Each item draws from torch, random and NumPy, and names the worker seed it was loaded with."""

    def __init__(self, n: int = 23, draws: bool = True) -> None:
        self.n, self.draws = n, draws

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        info = get_worker_info()
        drawn = [torch.rand(()).item(), random.random(), float(np.random.rand())] if self.draws else []
        return torch.tensor([i, *drawn, float(info.seed % 1000) if info else -1.0], dtype=torch.float64)


def _resumes_exactly(make, stop, wrap=False):
    """Snapshot at `stop` = (epoch, batches handed); the resumed run trains on the same batches."""
    if wrap:
        return resumes_exactly(lambda: LookAhead(make()), stop, per_epoch=6, handed_by=LookAhead)[0]
    return resumes_exactly(make, stop, per_epoch=6)[0]


def test_random_draws_in_workers_come_out_the_same_after_skipping():
    make = lambda: DataLoader(Augmenting(), batch_size=4, shuffle=True, num_workers=2)  # noqa: E731
    pos = _resumes_exactly(make, stop=(1, 3))  # batch 3 of epoch 1 is worker 1's
    assert pos["workers"]["rng"][0] is not None and pos["workers"]["rng"][1] is not None


def test_persistent_workers_keep_their_first_epoch_seed():
    make = lambda: DataLoader(Augmenting(), batch_size=4, shuffle=True, num_workers=2,  # noqa: E731
                              persistent_workers=True)
    _resumes_exactly(make, stop=(2, 1))


def test_look_ahead_wrapper_over_workers_saves_the_states_of_the_batches_handed():
    # The wrapper has fetched batch 4 (worker 0's) when the loop has trained on 3 batches: the
    # saved state of worker 0 is the one before batch 4, not after it.
    make = lambda: DataLoader(Augmenting(), batch_size=4, shuffle=True, num_workers=2)  # noqa: E731
    pos = _resumes_exactly(make, stop=(1, 3), wrap=True)
    assert (pos["batch"], pos["fetched"]) == (3, 4)


def _own_keys(saved: dict) -> list[str]:
    """The keys of a worker's saved generators of the dataset's and collate_fn's copies (not this module's
    globals, which each worker holds too: ``_MODULE_RNG``)."""
    return [k for k, _, _ in saved["dataset"] if not k.startswith("module.")]


class OwnGenerators(Dataset):
    """Augments from generators of its own: made at its first ``__getitem__`` (``lazy``: in each worker that
    loads an item, never in the main process) or in ``__init__`` (copied into each worker)."""

    def __init__(self, kind: str = "random", lazy: bool = True, n: int = 23) -> None:
        self.n, self.kind = n, kind
        self.rng = None if lazy else self._made()

    def _made(self):
        if self.kind == "random":
            return random.Random(5)
        if self.kind == "numpy":
            return np.random.default_rng(3)
        return torch.Generator().manual_seed(7)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.rng is None:
            self.rng = self._made()
        if self.kind == "random":
            drawn = self.rng.random()
        elif self.kind == "numpy":
            drawn = float(self.rng.random())
        else:
            drawn = torch.rand((), generator=self.rng).item()
        return torch.tensor([i, drawn], dtype=torch.float64)


@pytest.mark.parametrize("kind,lazy,persistent,stop", [
    ("random", True, False, (1, 3)),
    ("numpy", False, False, (1, 3)),
    ("torch", True, True, (2, 1)),
    ("random", True, False, (1, 1)),  # worker 1 has handed no batch of the epoch yet
], ids=["lazy_random", "copied_numpy", "persistent_lazy_torch", "worker_without_a_batch"])
def test_a_datasets_own_generators_in_workers_resume_exactly(kind, lazy, persistent, stop, capfd):
    """Each worker process draws from its own copy of the dataset's generator (copied at the worker's
    start, or made there at its first ``__getitem__``). A resume skipped the epoch's first batches without
    loading them, so those copies drew from their start again: other augmentation, with a warning (and, for
    one made in the workers, before that, none). Each worker now sends its copies' states with its batches;
    a resumed worker gets them back before its first batch, made where it had made none yet."""
    make = lambda: DataLoader(OwnGenerators(kind, lazy), batch_size=4, shuffle=True,  # noqa: E731
                              num_workers=2, persistent_workers=persistent)
    pos = _resumes_exactly(make, stop=stop)
    held = [w for w in pos["workers"]["rng"] if w is not None]
    assert held and all(_own_keys(w) == ["dataset.rng"] for w in held), pos["workers"]
    assert "OwnGenerators" not in capfd.readouterr().err


class Jitter:
    """A dataset's transform drawing from a generator of its own (albumentations' ``Compose(seed=...)``)."""

    def __init__(self) -> None:
        self.rng = np.random.default_rng(9)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, torch.tensor([self.rng.random()], dtype=x.dtype)])


class Transformed(Dataset):
    def __init__(self) -> None:
        self.inner, self.transform = Augmenting(draws=False), Jitter()

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.inner[i])


def test_a_datasets_transforms_own_generator_in_workers_resumes_exactly(capfd):
    """A transform object the dataset holds draws from its own generator, copied into each worker: saved per
    worker (key ``dataset.transform.rng``) and put back."""
    make = lambda: DataLoader(Transformed(), batch_size=4, shuffle=True, num_workers=2)  # noqa: E731
    pos = _resumes_exactly(make, stop=(1, 3))
    assert all(_own_keys(w) == ["dataset.transform.rng"] for w in pos["workers"]["rng"])
    assert "warning" not in capfd.readouterr().err


class Source:
    """Holds a generator for the helper that holds it."""

    def __init__(self, lazy: bool) -> None:
        self.rng = None if lazy else np.random.default_rng(9)


class Noise:
    """A dataset's helper drawing through a method (not ``__call__``) from a generator one object further down,
    made at its first use (``lazy``: in each worker) or in ``__init__`` (copied into each worker)."""

    def __init__(self, lazy: bool) -> None:
        self.source = Source(lazy)

    def add(self, x: torch.Tensor) -> torch.Tensor:
        if self.source.rng is None:
            self.source.rng = np.random.default_rng(9)
        return torch.cat([x, torch.tensor([self.source.rng.random()], dtype=x.dtype)])


class Helped(Dataset):
    def __init__(self, lazy: bool) -> None:
        self.inner, self.noise = Augmenting(draws=False), Noise(lazy)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.noise.add(self.inner[i])


@pytest.mark.parametrize("lazy", [False, True])
def test_a_generator_a_datasets_helper_holds_further_down_in_workers_resumes_exactly(lazy, capfd):
    """``self.noise.source.rng``, drawn in each worker: before, not found (no named shape holds it) and the
    resumed epoch's workers drew from their start again, with no warning. Saved per worker (key
    ``dataset.noise.source.rng``) and put back, made where the resumed worker holds None."""
    make = lambda: DataLoader(Helped(lazy), batch_size=4, shuffle=True, num_workers=2)  # noqa: E731
    pos = _resumes_exactly(make, stop=(1, 3))
    assert all(_own_keys(w) == ["dataset.noise.source.rng"] for w in pos["workers"]["rng"])
    assert "warning" not in capfd.readouterr().err


class ClassRng(Dataset):
    """Draws from a generator its class body made (``ClassRng.rng``), not one of its instance's attributes."""

    rng = np.random.default_rng(21)

    def __len__(self) -> int:
        return 23

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([i, ClassRng.rng.random()], dtype=torch.float64)


def test_a_generator_of_the_datasets_class_in_workers_resumes_exactly(capfd):
    """Before, the workers did not keep it: the resumed epoch's workers drew from it as it was at the
    relaunch's start, silently. Key ``dataset.__class__.rng`` in each worker's state. (The main process's:
    ``test_loader_own_rng.py``, shape ``dataset_class``.)"""
    ClassRng.rng = np.random.default_rng(21)
    make = lambda: DataLoader(ClassRng(), batch_size=4, shuffle=True, num_workers=2)  # noqa: E731
    pos = _resumes_exactly(make, stop=(1, 3))
    assert all(_own_keys(w) == ["dataset.__class__.rng"] for w in pos["workers"]["rng"])
    assert "warning" not in capfd.readouterr().err


_GLOBAL_NOISE = Noise(lazy=False)  # a module global object the dataset draws through (copied into each worker)


class GlobalNoise(Dataset):
    def __len__(self) -> int:
        return 23

    def __getitem__(self, i: int) -> torch.Tensor:
        return _GLOBAL_NOISE.add(torch.tensor([float(i)], dtype=torch.float64))


def test_a_generator_a_module_global_object_holds_in_workers_resumes_exactly(capfd):
    """``_GLOBAL_NOISE = Noise(...)`` at a module's top, its ``source.rng`` drawn in ``__getitem__``: each worker
    draws from its own copy. Before, only generators held by module globals themselves were kept per worker;
    now also those a global object of the script's classes holds (key ``module.<module>._GLOBAL_NOISE.source.rng``).
    (In the main process the loop state keeps the script's global objects.)"""
    make = lambda: DataLoader(GlobalNoise(), batch_size=4, shuffle=True, num_workers=2)  # noqa: E731
    pos = _resumes_exactly(make, stop=(1, 3))
    key = f"module.{__name__}._GLOBAL_NOISE.source.rng"
    assert all(key in [k for k, _, _ in w["dataset"]] for w in pos["workers"]["rng"])
    assert "warning" not in capfd.readouterr().err


_MODULE_RNG = np.random.default_rng(13)  # a module global the dataset draws from (copied into each worker)


class ModuleRng(Dataset):
    def __len__(self) -> int:
        return 23

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([i, _MODULE_RNG.random()], dtype=torch.float64)


def test_a_module_global_generator_the_dataset_draws_from_in_workers_resumes_exactly(capfd):
    """``RNG = np.random.default_rng(13)`` at a script module's top, drawn from in ``__getitem__``: each worker
    draws from its own copy, saved per worker (key ``module.<module>._MODULE_RNG``) and put back."""
    make = lambda: DataLoader(ModuleRng(), batch_size=4, shuffle=True, num_workers=2)  # noqa: E731
    pos = _resumes_exactly(make, stop=(1, 3))
    assert all(f"module.{__name__}._MODULE_RNG" in [k for k, _, _ in w["dataset"]] for w in pos["workers"]["rng"])
    assert "warning" not in capfd.readouterr().err


def test_a_module_global_generator_under_a_look_ahead_wrapper_resumes_exactly(capfd):
    """Loaded in the main process under a look-ahead wrapper (accelerate's): the batch fetched ahead of the
    snapshot point is loaded again before the restore point, which puts the script's globals back; the
    module-global generator's state before that fetch is kept too (in ``ahead_own``)."""
    make = lambda: DataLoader(ModuleRng(), batch_size=4, shuffle=True)  # noqa: E731
    pos = _resumes_exactly(make, stop=(1, 3), wrap=True)
    assert [f"module.{__name__}._MODULE_RNG" in [k for k, _, _ in a["rngs"]] for a in pos["ahead_own"]] == [True]
    assert "warning" not in capfd.readouterr().err


def _noise_collate(seed: int, lazy: bool = False):
    rng = None if lazy else np.random.default_rng(seed)

    def collate(items: list) -> torch.Tensor:
        nonlocal rng
        if rng is None:  # made at the first call, in each worker
            rng = np.random.default_rng(seed)
        return torch.cat([torch.stack(items), torch.tensor(rng.random((len(items), 1)))], 1)
    return collate


@pytest.mark.parametrize("lazy", [False, True])
def test_a_collate_functions_closure_generator_in_workers_resumes_exactly(lazy, capfd):
    """A collate_fn function drawing from a generator its maker's closure holds, or makes at its first call
    (``nonlocal``): each worker's copy saved (key ``collate.closure.rng``) and put back, into the cell where
    the resumed worker's holds None."""
    make = lambda: DataLoader(Augmenting(draws=False), batch_size=4, shuffle=True, num_workers=2,  # noqa: E731
                              collate_fn=_noise_collate(3, lazy))
    pos = _resumes_exactly(make, stop=(1, 3))
    assert all(_own_keys(w) == ["collate.closure.rng"] for w in pos["workers"]["rng"])
    assert "warning" not in capfd.readouterr().err


class PerProcessMasking:
    """A collate_fn object masking from a generator it makes at its first call in each process, seeded by the
    worker id, and remakes where its process id is not the current one (transformers'
    ``DataCollatorForLanguageModeling(seed=...)``)."""

    def __init__(self, seed: int = 11) -> None:
        self.seed, self.generator, self._generator_pid = seed, None, None

    def __call__(self, items: list) -> torch.Tensor:
        if self.generator is None or self._generator_pid != os.getpid():
            info = get_worker_info()
            self.generator = torch.Generator().manual_seed(self.seed + (info.id if info else 0))
            self._generator_pid = os.getpid()
        batch = torch.stack(items)
        return torch.cat([batch, torch.rand(len(items), 1, generator=self.generator, dtype=torch.float64)], 1)


@pytest.mark.parametrize("persistent", [False, True])
def test_a_collators_own_generator_in_workers_resumes_exactly(persistent, capfd):
    """A collate_fn object's generator, made in each worker at its first batch: the workers' copies are saved
    with the worker's states, and a resumed worker gets its copy back with this worker's process id beside it
    (else the collator would make a new one, seeded anew)."""
    make = lambda: DataLoader(Augmenting(draws=False), batch_size=4, shuffle=True, num_workers=2,  # noqa: E731
                              collate_fn=PerProcessMasking(), persistent_workers=persistent)
    pos = _resumes_exactly(make, stop=(1, 3) if not persistent else (2, 1))
    held = [w for w in pos["workers"]["rng"] if w is not None]
    assert held and all(_own_keys(w) == ["collate.generator"] for w in held), pos["workers"]
    assert all(w["pids"] == ["collate._generator_pid"] for w in held)
    assert "warning" not in capfd.readouterr().err


def test_a_collators_own_generator_under_a_look_ahead_wrapper_resumes_exactly(capfd):
    """Loaded in the main process under a look-ahead wrapper: the batch fetched ahead of the snapshot point is
    collated again by the relaunch before the restore point, from the collator's generator as it was before
    that batch in the original (``ahead_own``), not as at the epoch's start."""
    make = lambda: DataLoader(Augmenting(draws=False), batch_size=4, shuffle=True,  # noqa: E731
                              collate_fn=PerProcessMasking())
    pos = _resumes_exactly(make, stop=(1, 3), wrap=True)
    assert [[k for k, _, _ in a["rngs"] if not k.startswith("module.")] for a in pos["ahead_own"]] == [
        ["collate.generator"]]
    assert pos["ahead_own"][0]["pids"] == ["collate._generator_pid"]
    assert "warning" not in capfd.readouterr().err


def test_a_saved_dataset_generator_that_does_not_fit_the_workers_copy_is_said(capfd):
    """A worker's saved dataset-generator state of another kind than the relaunch's dataset holds is not
    put back, and one line names it (the worker reports it with its first batch; the main process's own copy
    is said by its own line)."""
    make = lambda: DataLoader(OwnGenerators("random", lazy=False), batch_size=4, shuffle=True,  # noqa: E731
                              num_workers=2)
    _, got, _ = run_tracked(make, stop=(1, 3))
    capfd.readouterr()
    other = lambda: DataLoader(OwnGenerators("numpy", lazy=False), batch_size=4, shuffle=True,  # noqa: E731
                               num_workers=2)
    run_tracked(other, 3, plan=(got["pos"], got["rng"]))
    said = "DataLoader worker: random generators of its copies"
    lines = [ln for ln in capfd.readouterr().err.splitlines() if said in ln]
    assert len(lines) == 1 and "dataset.rng do not fit" in lines[0] and "not restored" in lines[0], lines


class OwnIterable(IterableDataset):
    """An iterable dataset drawing from a generator of its own."""

    def __init__(self) -> None:
        self.rng = random.Random(1)

    def __iter__(self):
        info = get_worker_info()
        for i in range(info.id if info else 0, 24, info.num_workers if info else 1):
            yield torch.tensor([i, self.rng.random()])


def test_an_iterable_datasets_own_generator_in_new_workers_resumes_exactly_by_replay(capfd):
    """An iterable dataset's position is reached by loading and dropping batches: workers started for the
    resumed epoch from the main process's copy (its generator as at the epoch's iter(), restored) draw the
    same numbers again. It was said not to be saved, of an exact resume."""
    make = lambda: DataLoader(OwnIterable(), batch_size=4, num_workers=2)  # noqa: E731
    _resumes_exactly(make, stop=(1, 3))
    assert "OwnIterable" not in capfd.readouterr().err


class GlobalDrawsIterable(IterableDataset):
    """An iterable dataset drawing from the worker's global torch, Python and NumPy generators (also once at
    each ``iter()`` and once after its last item, where nothing is handed out)."""

    def __iter__(self):
        info = get_worker_info()
        start = torch.randint(0, 3, ()).item()  # drawn at the first next(), with nothing yielded yet
        for i in range(info.id if info else 0, 24, info.num_workers if info else 1):
            yield torch.tensor([i, start, torch.rand(()).item(), random.random(), float(np.random.rand())])
        np.random.rand()  # after the last item: advances the worker's state for its next epoch


@pytest.mark.parametrize("stop", [(1, 3), (2, 1), (1, 6)])
def test_an_iterable_dataset_drawing_in_persistent_workers_resumes_exactly(stop, capfd):
    """Persistent workers keep their generators (global ones and the dataset copy's) from epoch to epoch; a
    resume replays the epoch from each worker's state at that epoch's start, sent with its first batch. (1, 6):
    at the epoch's end; (2, 1): before worker 1's first batch of the epoch reached the loop."""
    make = lambda: DataLoader(GlobalDrawsIterable(), batch_size=4, num_workers=2,  # noqa: E731
                              persistent_workers=True)
    pos = _resumes_exactly(make, stop=stop)
    assert pos["workers"]["at"] == "epoch_start" and len(pos["workers"]["rng"]) == 2
    assert "warning" not in capfd.readouterr().err


@pytest.mark.parametrize("stop", [(1, 3), (1, 6)])
def test_an_iterable_dataset_drawing_in_persistent_workers_under_a_look_ahead_wrapper_resumes_exactly(stop, capfd):
    make = lambda: DataLoader(GlobalDrawsIterable(), batch_size=4, num_workers=2,  # noqa: E731
                              persistent_workers=True)
    pos = _resumes_exactly(make, stop=stop, wrap=True)
    assert pos["workers"]["at"] == "epoch_start"
    assert "warning" not in capfd.readouterr().err


@pytest.mark.parametrize("stop", [(1, 3), (1, 1)])
def test_an_iterable_dataset_in_persistent_workers_after_an_epoch_left_early_resumes_exactly(stop, capfd):
    """Epoch 0 left after 2 batches: the workers' batches torch drops then advanced their generators; the next
    epoch starts from their states after those (worker 1's first batch of epoch 1 is not back at (1, 1))."""
    make = lambda: DataLoader(GlobalDrawsIterable(), batch_size=4, num_workers=2,  # noqa: E731
                              persistent_workers=True)
    ref, got, _ = run_tracked(make, stop=stop, leave_epoch_0_after=2)
    resumed, _, _ = run_tracked(make, plan=(got["pos"], got["rng"]), seed=4321, leave_epoch_0_after=2)
    assert resumed == ref[2 + stop[1]:]
    assert "warning" not in capfd.readouterr().err


def test_an_iterable_datasets_own_generator_in_persistent_workers_resumes_exactly(capfd):
    """The generator an iterable dataset holds, copied into each persistent worker, is put back as it was at the
    resumed epoch's start in that worker (it was said not to be saved)."""
    make = lambda: DataLoader(OwnIterable(), batch_size=4, num_workers=2, persistent_workers=True)  # noqa: E731
    pos = _resumes_exactly(make, stop=(1, 3))
    assert [k for k, _, _ in pos["workers"]["rng"][1]["dataset"] if not k.startswith("module.")] == ["dataset.rng"]
    assert "OwnIterable" not in capfd.readouterr().err


def test_malformed_worker_state_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="malformed worker RNG state"):
        loader_workers.from_saved({"torch": torch.zeros(3, dtype=torch.uint8), "python": [3, torch.zeros(5), None]})
    state = loader_workers.current_state()
    assert loader_workers.from_saved(loader_workers.to_saved(state)) == state
    ds = OwnGenerators("numpy", lazy=False)
    ds.rng.random(3)
    state = loader_workers.current_state(ds)
    saved = loader_workers.to_saved(state)
    assert _own_keys(saved) == ["dataset.rng"]
    back = loader_workers.from_saved(saved)
    assert back[:3] == state[:3] and back[3] == state[3]
    for bad in (["dataset.rng", "numpy.Generator"], ["dataset.rng", "nope", 1], [7, "random", [3, [], None]],
                ["dataset.rng", "random", "not a state"]):
        with pytest.raises(ValueError, match="malformed worker RNG state"):
            loader_workers.from_saved({**saved, "dataset": [bad]})


class Stream(IterableDataset):
    """Yields 0..n-1, resumable through state_dict(); counts the items it produced."""

    def __init__(self, n: int = 22) -> None:
        self.n, self.pos, self.start, self.produced = n, 0, 0, 0

    def __iter__(self):
        first, self.start = self.start, 0
        for i in range(first, self.n):
            self.pos = i + 1
            self.produced += 1
            yield torch.tensor(i)

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.start = state["pos"]


def test_iterable_dataset_with_state_dict_is_positioned_without_reading_the_skipped_items():
    ds = Stream()
    make = lambda: DataLoader(ds, batch_size=4)  # noqa: E731
    pos = _resumes_exactly(make, stop=(1, 2))
    assert pos["dataset_state"] == {"pos": 8}
    before = ds.produced
    run_tracked(make, 3, plan=(pos, torch.get_rng_state()))
    assert ds.produced - before == (22 - 8) + 22  # the rest of epoch 1 and epoch 2, nothing replayed


def test_stateful_dataloader_is_saved_and_restored_through_its_own_state_dict():
    # torchdata's StatefulDataLoader replaces DataLoader.__iter__ and its iterators and keeps its
    # workers' states itself: pyckpt stores its state_dict() and positions it with load_state_dict().
    # torchdata 0.11 does not restore its workers' global generators: pyckpt adds them ("workers").
    sdl = pytest.importorskip("torchdata.stateful_dataloader")
    make = lambda: sdl.StatefulDataLoader(Augmenting(draws=False), batch_size=4, shuffle=True,  # noqa: E731
                                          num_workers=2)
    pos = _resumes_exactly(make, stop=(1, 3))
    assert "loader_state" in pos and "workers" in pos


def test_loader_class_made_after_install_is_routed_through_the_tracker():
    hooks = HookSet()
    tracker = LoaderTracker(lambda st: None, lambda: None, lambda: None)
    tracker.install(hooks)
    try:
        class Own(DataLoader):
            def __iter__(self):
                return self._get_iterator()

            def state_dict(self):
                return {}

            def load_state_dict(self, state):
                pass

        loader = Own(Augmenting(8), batch_size=4)
        assert [b.shape[0] for b in loader] == [4, 4]
        assert tracker.stream_for(loader).epochs == 1 and tracker.stream_for(loader).batches == 2
    finally:
        hooks.remove_all()
    assert "pyckpt" not in Own.__iter__.__qualname__ and "__iter__" in Own.__dict__


def test_persistent_workers_after_an_epoch_left_early_resume_from_what_they_loaded():
    # The loop leaves epoch 0 after 2 batches (zip with a shorter loader, or a break); the workers
    # had loaded 2 more (prefetched, then dropped when epoch 1 starts). The snapshot before batch 1 of
    # epoch 1 comes before worker 1 has handed anything in that epoch: its state must include the
    # batches it loaded and nobody used.
    make = lambda: DataLoader(Augmenting(), batch_size=4, shuffle=True, num_workers=2,  # noqa: E731
                              persistent_workers=True, prefetch_factor=1)
    # Epoch 0 has 2 batches here: the reference's batches after the snapshot are ref[3:].
    resumes_exactly(make, (1, 1), epochs=2, resume_seed=7, leave_epoch_0_after=2)


def test_a_loader_returning_batches_out_of_order_is_said_not_exact(capfd, monkeypatch):
    """``in_order=False`` hands batches as the workers finish them: a resume skipping the epoch's first B
    batches may skip others than the B trained on. Said in one warning line at the snapshot."""
    monkeypatch.setattr(loader_state, "_SAID", set())
    make = lambda: DataLoader(Augmenting(), batch_size=4, shuffle=True, num_workers=2,  # noqa: E731
                              in_order=False)
    _, got, _ = run_tracked(make, stop=(1, 3))
    assert "pos" in got
    lines = [ln for ln in capfd.readouterr().err.splitlines() if "in_order=False" in ln]
    assert len(lines) == 1 and "pass in_order=True" in lines[0], lines
    _, got, _ = run_tracked(lambda: DataLoader(Augmenting(), batch_size=4, num_workers=2), stop=(1, 3))
    assert "pos" in got and "in_order" not in capfd.readouterr().err
