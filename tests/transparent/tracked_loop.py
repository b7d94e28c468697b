"""In-process training loops over a DataLoader under a LoaderTracker, driven the way the session
drives it: one reference run that records the position at a snapshot point, one relaunch-like run
fast-forwarded to that position. Shared by the loader-position tests (look-ahead wrappers,
worker processes, prefetching iterators)."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from pyckpt.hooks import HookSet
from pyckpt.integrations.accelerate import finish_skipped
from pyckpt.loader_state import FastForward, LoaderTracker


class Items(Dataset):
    """Items are their own index."""

    def __init__(self, n: int = 23) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(i)


class LookAhead:
    """What accelerate's ``DataLoaderShard`` does: hands batch k to the loop only after fetching
    batch k+1 (to know which batch is the last), and (as accelerate 1.4 did) hands the loop ``None``
    when the DataLoader yields nothing."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader, self.iteration, self.ended = loader, 0, 0

    def __iter__(self):
        it = iter(self.loader)
        try:
            current = next(it)
        except StopIteration:
            yield  # accelerate 1.4: None for an empty loader, then UnboundLocalError below
        while True:
            try:
                following = next(it)
                yield current
                current = following
            except StopIteration:
                yield current
                break
        self.iteration += 1
        self.end()

    def end(self) -> None:
        self.ended += 1


@contextlib.contextmanager
def tracking(plan: tuple[dict, torch.Tensor] | None = None,
             handed_by: type | None = None) -> Iterator[tuple[LoaderTracker, dict]]:
    """A LoaderTracker installed as the session installs it, yielding ``(tracker, got)``: a loop sets
    ``got["want"], tracker.armed = True, True`` at its optimizer step, and the next snapshot point
    records the position and torch's RNG state in ``got["pos"]``, ``got["rng"]``. With ``plan=(position,
    rng)`` it fast-forwards to that position and restores the RNG state at the snapshot point, as a
    relaunch does; ``handed_by``: a wrapper class registered with ``count_handed_by``."""
    hooks, got = HookSet(), {}

    def on_point(st):
        if tracker.plan is not None and st is tracker.plan_stream:
            torch.set_rng_state(plan[1])  # what the session restores at the snapshot point
            tracker.plan = None
        if got.pop("want", False):
            got["pos"], got["rng"] = st.position(), torch.get_rng_state()
        tracker.armed = False

    tracker = LoaderTracker(on_point, lambda: None, lambda: None)
    tracker.install(hooks)
    try:
        if handed_by is not None:
            tracker.count_handed_by(hooks, handed_by, finish_skipped)
        if plan is not None:
            tracker.plan = FastForward.from_position(plan[0])
        yield tracker, got
    finally:
        hooks.remove_all()


def run_tracked(make: Callable[[], Any], epochs: int = 3, *, stop: tuple[int, int] | None = None,
                plan: tuple[dict, torch.Tensor] | None = None, seed: int = 0, handed_by: type | None = None,
                leave_epoch_0_after: int | None = None) -> tuple[list, dict, Any]:
    """Train `epochs` epochs on what ``make()`` builds (after ``torch.manual_seed(seed)``).

    ``stop=(epoch, n)``: after the loop got its n-th batch of ``epoch`` a step arms the tracker (as
    the session does after an optimizer step); the next snapshot point records the position and
    torch's RNG state in ``got["pos"]``, ``got["rng"]``. ``plan=(position, rng)``: fast-forward to
    that position and restore the RNG state at the snapshot point, as a relaunch does.
    ``handed_by``: a wrapper class registered with ``count_handed_by``. ``leave_epoch_0_after``: the
    loop breaks out of epoch 0 after that many batches. Returns ([(epoch, batch as list)], got,
    the object iterated)."""
    out = []
    with tracking(plan, handed_by) as (tracker, got):
        torch.manual_seed(seed)
        source = make()
        for e in range(epochs):
            for i, b in enumerate(source):
                out.append((e, b.tolist()))
                if stop == (e, i + 1):
                    got["want"], tracker.armed = True, True
                if e == 0 and i + 1 == leave_epoch_0_after:
                    break
    return out, got, source


def resumes_exactly(make: Callable[[], Any], stop: tuple[int, int], *, epochs: int = 3,
                    per_epoch: int | None = None, resume_seed: int = 4321,
                    **kw: Any) -> tuple[dict, Any, Any]:
    """A reference run snapshots at ``stop``; a run resumed from that position (with another seed,
    so only the restored RNG state can make it right) trains on exactly the reference's remaining
    batches. ``per_epoch``: the batches an epoch must have. ``kw`` go to both runs (``run_tracked``).
    Returns (the saved position, the reference's iterated object, the resumed one's)."""
    ref, got, ref_source = run_tracked(make, epochs, stop=stop, **kw)
    assert "pos" in got, "the snapshot point was never reached"
    n_before = sum(1 for e, _ in ref if e < stop[0]) + stop[1]
    if per_epoch is not None:
        assert n_before == stop[0] * per_epoch + stop[1], ref
    resumed, _, source = run_tracked(make, epochs, plan=(got["pos"], got["rng"]), seed=resume_seed, **kw)
    want = ref[n_before:]
    if resumed != want:  # (a plain assert prints nothing here: this helper's module is not rewritten by pytest)
        k = next((i for i, (a, b) in enumerate(zip(resumed, want)) if a != b), min(len(resumed), len(want)))
        raise AssertionError(f"the resumed run differs from the reference at its batch {k} of {len(want)}: "
                             f"{resumed[k:k + 2]} against {want[k:k + 2]}; position {got['pos']}")
    return got["pos"], ref_source, source
