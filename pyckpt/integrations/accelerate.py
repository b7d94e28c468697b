"""accelerate: its prepared loaders fetch one batch ahead of the training loop.

``DataLoaderShard.__iter__`` takes batch k+1 from the real DataLoader before it hands batch k
to the loop (to know which batch is the last); ``DataLoaderDispatcher`` does the same on the
main process. Both are registered with the tracker as look-ahead wrappers so positions count
batches handed to the loop. ``DataLoaderDispatcher`` on several processes (``dispatch_batches``)
reads the DataLoader on process 0 only (one batch per process for each item) and broadcasts:
process 0 counts the DataLoader batches of the items handed, the other processes follow
(``LoaderTracker.follow_fetch``): each of their dispatcher fetches is a snapshot/restore point at
the same place as process 0's. Skipped epochs end the dispatcher's epoch without a collective
(it fails on an empty DataLoader). Never imports accelerate: called with the module the script
imported.

A script that resumes itself with ``Accelerator.load_state`` also positions its data itself
(its own epoch counter, ``skip_first_batches``). The two resumes compose: the checkpoint with
more optimizer steps wins (a tie goes to pyckpt's, which holds the loader and RNG state at the
exact point), one line says which.

* pyckpt's wins: the epoch the script resumes in is found from the loaded optimizer's steps and
  the step count at each epoch start kept in pyckpt's checkpoint; the script's
  ``skip_first_batches`` returns the loader as it is, and pyckpt skips the finished epochs and
  batches and restores its own state over what ``load_state`` loaded at its resume point.
* accelerate's wins: pyckpt's pending restore is dropped and its step count continues from the
  loaded optimizer's; the script's ``skip_first_batches`` is done at the sampler level of the same
  loader, so pyckpt keeps counting in the same loader's terms (a later resume from its checkpoints
  is exact).
"""
from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

from ..hooks import HookSet

MODULE = "accelerate.data_loader"
WRAPPERS = ("DataLoaderShard", "DataLoaderDispatcher")
ACCELERATOR = "accelerate.accelerator"


class _Compose:
    # After load_state: "pyckpt" (its restore is pending) or "accelerate" (its state was loaded):
    # how the script's next skip_first_batches() is done. None: not resumed by load_state.
    mode: str | None = None
    at_step = 0  # the session's step count then: a skip_first_batches() after a training step is the script's own


def install(module: ModuleType, tracker: Any, hooks: HookSet) -> None:
    """Register accelerate's look-ahead loader classes with ``tracker``."""
    for name in WRAPPERS:
        cls = getattr(module, name, None)
        if cls is not None and "__iter__" in vars(cls):
            tracker.count_handed_by(hooks, cls, finish_skipped,
                                    _dispatched_per_item if name == "DataLoaderDispatcher" else None)
    _follow_dispatch(getattr(module, "DataLoaderDispatcher", None), tracker, hooks)
    _install_load_state(module, tracker, hooks)


def _dispatched_per_item(loader: Any) -> int:
    """DataLoader batches in one item a ``DataLoaderDispatcher`` hands to this process's loop: process 0
    reads one per process (concatenated, then split) unless ``split_batches``; the others read none,
    and count the items they are sent."""
    state = getattr(loader, "state", None)
    processes = getattr(state, "num_processes", 1)
    if getattr(state, "process_index", 0) != 0 or getattr(loader, "split_batches", False):
        return 1
    return processes if isinstance(processes, int) and processes > 0 else 1


def _follow_dispatch(cls: Any, tracker: Any, hooks: HookSet) -> None:
    """``DataLoaderDispatcher._fetch_batches``: process 0 reads its DataLoader iterator there (its
    fetches are the usual points); on the other processes each call is a follower fetch, a point at
    the same place. An epoch skipped on resume ends at once on every process, with no broadcast."""
    from ..loader_state import SkippedEpoch

    if cls is None or not callable(vars(cls).get("_fetch_batches")):
        return
    orig = cls._fetch_batches

    def _fetch_batches(loader, iterator):
        st = getattr(iterator, "_pyckpt_stream", None)
        if st is None:
            return orig(loader, iterator)
        if st.skipping:
            raise SkippedEpoch  # every process's DataLoader iter() of this epoch was a skipped one
        if getattr(getattr(loader, "state", None), "process_index", 0) == 0:
            return orig(loader, iterator)
        return tracker.follow_fetch(st, lambda: orig(loader, iterator), _got_batch)

    hooks.patch(cls, "_fetch_batches", _fetch_batches)


def _got_batch(result: Any) -> bool:
    """Whether ``_fetch_batches`` returned a batch: its ``batch_info`` holds the batch's structure."""
    info = result[1] if isinstance(result, tuple) and len(result) == 2 else None
    return isinstance(info, list) and bool(info) and info[0] is not None


def _install_load_state(module: ModuleType, tracker: Any, hooks: HookSet) -> None:
    """Wrap ``Accelerator.load_state`` and ``skip_first_batches`` now, or at the first
    ``prepare_data_loader`` call: this module is imported halfway through ``accelerate.accelerator``,
    before the class exists; that module binds ``prepare_data_loader`` from here after this runs, so
    it binds the wrapped one."""
    done: list[bool] = []

    def patch() -> None:
        acc = sys.modules.get(ACCELERATOR)
        cls = getattr(acc, "Accelerator", None)
        if done or cls is None or "load_state" not in vars(cls):
            return
        done.append(True)
        orig = cls.load_state

        def load_state(self, *args, **kwargs):
            result = orig(self, *args, **kwargs)
            _after_load_state(tracker, self, args[0] if args else kwargs.get("input_dir"))
            return result

        hooks.patch(cls, "load_state", load_state)
        if "skip_first_batches" not in vars(cls):
            return
        orig_skip = cls.skip_first_batches

        def skip_first_batches(self, dataloader, num_batches=0):
            return _skip_first_batches(tracker, dataloader, num_batches,
                                       lambda: orig_skip(self, dataloader, num_batches=num_batches))

        hooks.patch(cls, "skip_first_batches", skip_first_batches)

    patch()
    orig_prepare = getattr(module, "prepare_data_loader", None)
    if done or orig_prepare is None:
        return

    def prepare_data_loader(*args, **kwargs):
        patch()
        return orig_prepare(*args, **kwargs)

    hooks.patch(module, "prepare_data_loader", prepare_data_loader)


def _after_load_state(tracker: Any, accelerator: Any, input_dir: Any) -> None:
    """The script resumed itself: pyckpt's checkpoint or the loaded one wins, whichever is newer."""
    from ..own_resume import compose, optimizer_steps

    session = getattr(tracker, "session", None)
    if session is None:
        return
    session.own_resume_seen = True  # the optimizers' load_state_dict() inside was accelerate's
    where = f"accelerate's load_state({str(input_dir)!r})" if input_dir else "accelerate's load_state()"
    if compose(session, optimizer_steps(getattr(accelerator, "_optimizers", []) or []), where,
               " (the script's skip_first_batches returns the loader as it is)"):
        # pyckpt's skip_first_batches is left to pyckpt.
        _Compose.mode, _Compose.at_step = "pyckpt", session.step
        return
    _Compose.mode, _Compose.at_step = "accelerate", session.step


def _skip_first_batches(tracker: Any, dataloader: Any, num_batches: int, orig: Any) -> Any:
    """The script's ``skip_first_batches`` right after its ``load_state``: the same loader, positioned by
    pyckpt (its pending restore's fast-forward, or a position-only one for accelerate's state)."""
    from ..loader_state import FastForward, _epoch_rng, signature

    mode, _Compose.mode = _Compose.mode, None
    session = getattr(tracker, "session", None)
    if mode is None or session is None or session.step != _Compose.at_step:
        return orig()
    if mode == "pyckpt" and (session.source is None or tracker.plan is None):
        return orig()  # restored already
    try:
        sig = signature(dataloader)
    except Exception:  # not a DataLoader-like loader: accelerate's own skip
        return orig()
    if mode == "pyckpt" or num_batches <= 0:
        return dataloader
    st = tracker.stream_for(dataloader)
    tracker.plan = FastForward(sig, st.epochs + 1, int(num_batches), _epoch_rng(dataloader, host=False), False)
    tracker.plan_stream = None
    return dataloader


def finish_skipped(loader: Any) -> None:
    """End-of-epoch bookkeeping of a skipped epoch, for older versions (1.4) that hand the loop
    ``None`` when their DataLoader yields nothing and then fail."""
    if isinstance(getattr(loader, "iteration", None), int):
        loader.iteration += 1
    end = getattr(loader, "end", None)
    if callable(end):
        end()
