"""Prefetching iterators that nobody registered (issue 11): Lightning-style fetchers, an iterator
class that wraps a DataLoader iterator and keeps one batch ahead, are found at their first fetch
and positioned in the loop's terms (batches handed to the loop)."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from tracked_loop import Items, resumes_exactly


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
