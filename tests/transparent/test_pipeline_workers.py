"""The data pipeline exact on resume (issue 6 item 5), in process: random draws in worker
processes, look-ahead wrappers over workers, loaders and datasets with their own state_dict()."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from pyckpt import loader_workers
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


class LazyAugmenting(Dataset):
    """Makes its own generator at its first ``__getitem__``: in each worker that loads an item, never in
    the main process."""

    def __init__(self, n: int = 23) -> None:
        self.n, self.rng = n, None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.rng is None:
            self.rng = random.Random(5)
        return torch.tensor([i, self.rng.random()], dtype=torch.float64)


def test_a_generator_a_dataset_makes_in_its_workers_is_said_not_saved(capfd):
    """A dataset making its augmentation generator at its first ``__getitem__`` makes it in the workers only:
    the main process's copy holds None, so the warning said for a dataset's own generator under workers
    (each worker draws from a copy that is not saved) was not said, and a resume drew other numbers in
    silence. The workers report the generators their copies hold; the warning names them."""
    make = lambda: DataLoader(LazyAugmenting(), batch_size=4, shuffle=True, num_workers=2)  # noqa: E731
    _, got, _ = run_tracked(make, stop=(1, 3))
    assert "pos" in got
    lines = [ln for ln in capfd.readouterr().err.splitlines() if "LazyAugmenting" in ln]
    assert len(lines) == 1 and "each worker process draws from its own copy" in lines[0], lines
    assert "dataset.rng" in lines[0] and "copies are not saved" in lines[0]


def test_malformed_worker_state_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="malformed worker RNG state"):
        loader_workers.from_saved({"torch": torch.zeros(3, dtype=torch.uint8), "python": [3, torch.zeros(5), None]})
    state = loader_workers.current_state()
    assert loader_workers.from_saved(loader_workers.to_saved(state)) == state


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
