"""Prefetching iterators that nobody registered (issue 11): Lightning-style fetchers, an iterator
class that wraps a DataLoader iterator and keeps one batch ahead, and apex/YOLOX-style prefetchers
(a plain ``next()`` method, the first batch fetched in ``__init__``) are found at their first fetch
and positioned in the loop's terms (batches handed to the loop)."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from tracked_loop import Items, resumes_exactly, tracking


class Prefetcher:
    """Lightning-style: ``iter()`` fetches the first batch; each ``next()`` hands the batch fetched
    before and fetches the following one."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __iter__(self) -> "Prefetcher":
        self.it, self.done = iter(self.loader), False
        self._fetch()
        return self

    def _fetch(self) -> None:
        try:
            self.ahead = next(self.it)
        except StopIteration:
            self.done = True

    def __next__(self):
        if self.done:
            raise StopIteration
        batch = self.ahead
        self._fetch()
        return batch


class Pairs:
    """Not a look-ahead: every item is two DataLoader batches stacked (2 fetches per item)."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __iter__(self) -> "Pairs":
        self.it = iter(self.loader)
        return self

    def __next__(self):
        return torch.cat([next(self.it), next(self.it)])


def _resumes_exactly(wrapper, stop, per_epoch):
    make = lambda: wrapper(DataLoader(Items(24), batch_size=4, shuffle=True))  # noqa: E731
    return resumes_exactly(make, stop, per_epoch=per_epoch, resume_seed=99)[0]


def test_unregistered_prefetching_iterator_is_positioned_in_the_loops_terms():
    pos = _resumes_exactly(Prefetcher, stop=(1, 3), per_epoch=6)
    assert (pos["epoch"], pos["batch"], pos["fetched"]) == (2, 3, 4)


def test_prefetching_iterator_at_the_epochs_last_batch():
    # The 6th batch is handed after the DataLoader raised StopIteration.
    pos = _resumes_exactly(Prefetcher, stop=(2, 5), per_epoch=6)
    assert (pos["epoch"], pos["batch"], pos["fetched"]) == (3, 5, 6)


def test_wrapper_that_fetches_two_batches_per_item_keeps_counting_loader_batches():
    # Counting its items would make a position in other units than the loader's batches.
    pos = _resumes_exactly(Pairs, stop=(1, 2), per_epoch=3)
    assert (pos["batch"], pos["fetched"]) == (4, 4)


class ApexPrefetcher:
    """NVIDIA apex's ImageNet ``data_prefetcher`` (YOLOX's ``DataPrefetcher`` too): no ``__next__`` but a
    plain ``next()``; the first batch is fetched in ``__init__``, one batch ahead of the loop, and
    ``next()`` calls the DataLoader's iterator again after its end (``None`` is the end of the epoch)."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = iter(loader)
        self.preload()

    def preload(self) -> None:
        try:
            self.next_input = next(self.loader)
        except StopIteration:
            self.next_input = None

    def next(self):
        batch = self.next_input
        self.preload()
        return batch


class ApexPairs(ApexPrefetcher):
    """Not a look-ahead: every item is two DataLoader batches stacked."""

    def preload(self) -> None:
        try:
            self.next_input = torch.cat([next(self.loader), next(self.loader)])
        except StopIteration:
            self.next_input = None


def _run_apex(cls, epochs=3, *, stop=None, plan=None, seed=0):
    """``tracked_loop.run_tracked`` for apex's loop: ``next()`` once before ``while batch is not None:``
    and once at the end of its body, a new prefetcher every epoch."""
    out = []
    with tracking(plan) as (tracker, got):
        torch.manual_seed(seed)
        loader = DataLoader(Items(24), batch_size=4, shuffle=True)
        for e in range(epochs):
            prefetcher = cls(loader)
            batch, i = prefetcher.next(), 0
            while batch is not None:
                out.append((e, batch.tolist()))
                i += 1
                if stop == (e, i):
                    got["want"], tracker.armed = True, True  # an optimizer step
                batch = prefetcher.next()
    return out, got


def _apex_resumes_exactly(cls, stop, per_epoch):
    ref, got = _run_apex(cls, stop=stop)
    assert "pos" in got, "the snapshot point was never reached"
    n_before = stop[0] * per_epoch + stop[1]
    resumed, _ = _run_apex(cls, plan=(got["pos"], got["rng"]), seed=99)
    assert resumed == ref[n_before:]
    return got["pos"]


def test_apex_prefetcher_is_positioned_in_the_loops_terms():
    # Found by its no-argument next(); every epoch's new prefetcher starts a counted epoch.
    for stop in ((0, 2), (1, 3), (2, 1)):
        pos = _apex_resumes_exactly(ApexPrefetcher, stop, per_epoch=6)
        assert (pos["epoch"], pos["batch"], pos["fetched"]) == (stop[0] + 1, stop[1], stop[1] + 1)


def test_apex_prefetcher_at_the_epochs_end():
    # After the 5th batch its next() hands the 6th and meets the end; after the 6th it asks the ended
    # iterator again: the relaunch's restore waits until its own iterator has ended too.
    pos = _apex_resumes_exactly(ApexPrefetcher, (1, 5), per_epoch=6)
    assert (pos["epoch"], pos["batch"], pos["fetched"], pos.get("ended")) == (2, 5, 6, None)
    pos = _apex_resumes_exactly(ApexPrefetcher, (1, 6), per_epoch=6)
    assert (pos["epoch"], pos["batch"], pos["fetched"], pos["ended"]) == (2, 6, 6, True)


def test_next_method_that_stacks_batches_keeps_counting_loader_batches():
    # Not counted in its items (that would be 1 handed, 4 fetched): positions stay in the DataLoader's
    # batches, as for a stacking __next__ (the look-ahead of such a class is not handled).
    _, got = _run_apex(ApexPairs, stop=(1, 1))
    assert (got["pos"]["epoch"], got["pos"]["batch"], got["pos"]["fetched"]) == (2, 4, 4)
