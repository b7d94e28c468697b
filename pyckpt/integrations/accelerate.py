"""accelerate: its prepared loaders fetch one batch ahead of the training loop.

``DataLoaderShard.__iter__`` takes batch k+1 from the real DataLoader before it hands batch k
to the loop (to know which batch is the last); ``DataLoaderDispatcher`` does the same on the
main process. Both are registered with the tracker as look-ahead wrappers so positions count
batches handed to the loop. ``DataLoaderDispatcher`` on several processes (``dispatch_batches``)
leaves ranks other than 0 without a data position: checkpointing is turned off on every rank,
with one line. Never imports accelerate: called with the module the script imported.

A script that resumes itself with ``Accelerator.load_state`` also positions its data itself
(``skip_first_batches``, its own epoch counter), which pyckpt cannot follow: when it does while a
pyckpt restore is pending, pyckpt drops its restore (never both) and says so in one line, with
the optimizer steps of each checkpoint; pyckpt's step count continues from the loaded optimizer's.
"""
from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

from ..hooks import HookSet

MODULE = "accelerate.data_loader"
WRAPPERS = ("DataLoaderShard", "DataLoaderDispatcher")
ACCELERATOR = "accelerate.accelerator"


def install(module: ModuleType, tracker: Any, hooks: HookSet) -> None:
    """Register accelerate's look-ahead loader classes with ``tracker``."""
    for name in WRAPPERS:
        cls = getattr(module, name, None)
        if cls is not None and "__iter__" in vars(cls):
            tracker.count_handed_by(hooks, cls, finish_skipped)
    _refuse_multi_process_dispatch(getattr(module, "DataLoaderDispatcher", None), tracker, hooks)
    _install_load_state(module, tracker, hooks)


def _refuse_multi_process_dispatch(cls: Any, tracker: Any, hooks: HookSet) -> None:
    """``DataLoaderDispatcher`` on several processes (``dispatch_batches=True``): only process 0 reads
    the DataLoader (``num_processes`` batches per step) and broadcasts; the others have no loader
    position and no fetch to take a snapshot at, so ranks would not agree on snapshots (the job hung
    at the first one). Every rank turns checkpointing off at its first ``iter()``, with one line."""
    if cls is None or "__iter__" not in vars(cls):
        return
    orig = cls.__iter__

    def __iter__(loader):  # noqa: N807
        session = getattr(tracker, "session", None)
        processes = getattr(getattr(loader, "state", None), "num_processes", 1)
        if session is not None and isinstance(processes, int) and processes > 1:
            session._give_up("accelerate's DataLoaderDispatcher (dispatch_batches=True) reads the data on process 0 "
                             "only, so the other ranks have no data position to resume at; prepare the loader with "
                             "dispatch_batches=False to have checkpoints")
        return orig(loader)

    hooks.patch(cls, "__iter__", __iter__)


def _install_load_state(module: ModuleType, tracker: Any, hooks: HookSet) -> None:
    """Wrap ``Accelerator.load_state`` now, or at the first ``prepare_data_loader`` call: this module is
    imported halfway through ``accelerate.accelerator``, before the class exists; that module binds
    ``prepare_data_loader`` from here after this runs, so it binds the wrapped one."""
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

    patch()
    orig_prepare = getattr(module, "prepare_data_loader", None)
    if done or orig_prepare is None:
        return

    def prepare_data_loader(*args, **kwargs):
        patch()
        return orig_prepare(*args, **kwargs)

    hooks.patch(module, "prepare_data_loader", prepare_data_loader)


def _after_load_state(tracker: Any, accelerator: Any, input_dir: Any) -> None:
    """The script resumed itself: drop pyckpt's pending restore and count steps as the loaded optimizer."""
    from ..transparent import say

    session = getattr(tracker, "session", None)
    if session is None:
        return
    tracker.ensure_started()
    source = session.source
    theirs = _optimizer_steps(accelerator)
    if source is not None and getattr(session.coord, "rank", 0) == 0:
        where = f"accelerate's load_state({str(input_dir)!r})" if input_dir else "accelerate's load_state()"
        steps = f"optimizer step {theirs}" if theirs is not None else "optimizer step unknown"
        newer = theirs is None or source.step > theirs
        say(f"resume: the script resumes itself with {where} ({steps}); pyckpt's checkpoint {source.path} "
            f"(step {source.step}) is {'newer' if newer else 'not newer'} but is not used: the script positions its "
            "data itself, which pyckpt cannot follow (to resume from pyckpt's, leave load_state out)",
            "warning" if newer else "info")
    if source is not None or theirs is not None:
        session.cancel_pending_resume(theirs if theirs is not None else session.step)


def _optimizer_steps(accelerator: Any) -> int | None:
    """Optimizer steps of the loaded state (the ``step`` an Adam-like optimizer keeps per parameter)."""
    found = []
    for opt in getattr(accelerator, "_optimizers", []) or []:
        inner = getattr(opt, "optimizer", opt)
        for st in getattr(inner, "state", {}).values():
            step = st.get("step") if isinstance(st, dict) else None
            if step is not None:
                try:
                    found.append(int(step))
                except (TypeError, ValueError):
                    pass
    return max(found) if found else None


def finish_skipped(loader: Any) -> None:
    """End-of-epoch bookkeeping of a skipped epoch, for older versions (1.4) that hand the loop
    ``None`` when their DataLoader yields nothing and then fail."""
    if isinstance(getattr(loader, "iteration", None), int):
        loader.iteration += 1
    end = getattr(loader, "end", None)
    if callable(end):
        end()
