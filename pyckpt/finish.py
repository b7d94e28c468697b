"""The finished-run marker of transparent mode (``ROOT/FINISHED.json``, written by ``metrics.mark_finished``).

When a script under transparent mode ends normally, rank 0 marks its
checkpoint root finished at interpreter exit, after the last checkpoint has
committed (the commit thread is joined before exit handlers run). A relaunch
of the same command that would resume (``PYCKPT_RESUME=auto``) then stops at
its first DataLoader ``iter()`` with one ``pyckpt:`` line and exit status 0
instead of training the run's tail again (another script, named by the
marker's ``script``, is refused with exit status 2 instead: it has nothing to
resume there, and status 0 would skip it silently); ``PYCKPT_RESUME=never`` (train
from scratch) or ``PYCKPT_RESUME=<checkpoint>`` (continue from it) remove the
marker and go on.

With the memory tier (``PYCKPT_SHM_MB``) the marker's handler first has the
tier write a snapshot held only in ``/dev/shm`` to storage
(``shm_tier.keep_newest``), so the step it names is one storage holds.

"Normally" means: the script trained (at least one optimizer step), nothing
was left pending (a resume that never happened, a SIGTERM), no uncaught
exception, no ``sys.exit`` with a non-zero status, no SIGINT, and the process
that started it with ``multiprocessing`` (``torch.multiprocessing.spawn``) is
still there. The last two end a script normally where its code catches the
``KeyboardInterrupt`` (torch's spawn wrapper does, and its children get SIGINT
when their launcher dies: the run was marked finished, and its relaunch
trained nothing, exit status 0). A signal that kills the process never runs
exit handlers, so it leaves no marker. Python cannot
tell ``raise SystemExit(1)`` written out (not through ``sys.exit``) from a
normal end: such a script is marked finished too (docs/OPERATIONS.md).
"""
from __future__ import annotations

import atexit
import datetime
import os
import signal
import sys
import threading
from typing import Any

from . import catalog, knobs, layout, metrics

_failed: list[str] = []  # why this process is not ending normally
_installed = False
_script: str | None = None  # the script's file name, taken at the first iter()


def note_failure(why: str) -> None:
    """This process is ending in failure (a resume refused with exit status 2): no marker, no end-of-run line."""
    _failed.append(why)


def at_first_iter(session: Any) -> None:
    """Before the session decides what to resume: stop a finished run's relaunch, or clear the marker."""
    from .activation import _is_rank0, _say

    global _script
    _script = main_script()  # now, while the script is __main__ (the marker at exit records it)
    marker = catalog.is_finished(session.directory)
    if marker is None:
        return
    setting = knobs.get("PYCKPT_RESUME")
    if setting == "auto":
        when = marker.get("time")
        stamp = (datetime.datetime.fromtimestamp(when, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
                 if isinstance(when, (int, float)) else "earlier")
        last = ("last checkpoint at step ?" if "step" not in marker else "no checkpoint" if marker["step"] is None
                else f"last checkpoint at step {marker['step']}")
        then, now = marker.get("script"), _script
        if then is not None and now is not None and then != now:
            # Another script on a finished run's directory (pre-training, then fine-tuning, one PYCKPT_DIR
            # exported): it has nothing to resume there, and stopping with status 0 would skip it silently.
            if _is_rank0():
                _say(f"cannot resume: the run in {session.directory} is {then}'s and finished "
                     f"({marker.get('steps') or '?'} steps, {last}, {stamp}); this is {now}: use another PYCKPT_DIR "
                     f"for {now}, or PYCKPT_RESUME=never to train it from scratch in this one (its retention "
                     f"then removes {then}'s checkpoints)", "warning")
            note_failure("another script's finished run")
            raise SystemExit(2)
        if _is_rank0():
            _say(f"the run in {session.directory} already finished ({marker.get('steps') or '?'} steps, {last}, "
                 f"{stamp}); not training it again. "
                 "PYCKPT_RESUME=never trains from scratch, PYCKPT_RESUME=<checkpoint dir> continues from one, "
                 "or use another PYCKPT_DIR", "warning")
        raise SystemExit(0)
    if _is_rank0():
        metrics.clear_finished(session.directory)  # a new run starts here


def main_script() -> str | None:
    """The file name of the running script (``train.py``), or None (``python -c``, an interactive session)."""
    name = os.path.basename(getattr(sys.modules.get("__main__"), "__file__", None) or "")
    return name if name.endswith(".py") else None


def install(session: Any) -> None:
    """Mark the root of the session active at exit finished, at a normal exit (rank 0). The exit
    handler and the hooks that see failures are installed once per process."""
    global _installed
    if _installed or session.coord is None or session.coord.rank != 0:
        return
    _installed = True
    previous_hook, previous_exit = sys.excepthook, sys.exit

    def excepthook(tp, value, tb):
        _failed.append(f"uncaught {tp.__name__}")
        previous_hook(tp, value, tb)

    def exit(status: Any = None) -> None:
        if status not in (None, 0):
            _failed.append(f"sys.exit({status!r})")
        previous_exit(status)

    sys.excepthook, sys.exit = excepthook, exit
    _note_sigint()
    atexit.register(_at_exit, os.getpid())


def _note_sigint() -> None:
    """Record a SIGINT before the handler in place handles it (Python's raises KeyboardInterrupt, which a script, or
    torch's spawn wrapper, may catch and then end normally). An ignored or default SIGINT is left as it is: the
    process then gets none, or dies of it without exit handlers. A handler the script sets later replaces this one."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):
        return

    def on_sigint(signum: int, frame: Any) -> Any:
        if "SIGINT" not in _failed:
            _failed.append("SIGINT")
        return previous(signum, frame)

    signal.signal(signal.SIGINT, on_sigint)


def _launcher_gone() -> bool:
    """Whether the process that started this one with multiprocessing (torch.multiprocessing.spawn's parent) has
    died: its children then end early (SIGINT sent by the kernel, or a lost rendezvous) through no fault of theirs."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    try:
        return parent is not None and not parent.is_alive()
    except (OSError, ValueError):  # (its sentinel closed: it is gone)
        return True


def newest_step(root: str) -> int | None:
    """The step of local root ``root``'s newest valid commit (what a relaunch resumes from); None when
    there is none, or for an object-storage root (not listed from an exit handler)."""
    from .checkpointer import iter_valid

    if metrics._is_url(root):
        return None
    try:
        newest = next(iter(iter_valid(root, warn=False)), None)
    except OSError:
        return None
    return None if newest is None else newest.step


def _committed(root: str, step: int) -> bool:
    """Whether local root ``root`` holds a commit of ``step`` (False for an object-storage root)."""
    return not metrics._is_url(root) and any(e.step == step for e in layout.committed(root))


def _at_exit(pid: int) -> None:
    from . import activation, shm_tier

    session = activation._SESSION
    if os.getpid() != pid or session is None or session.coord is None or session.coord.rank != 0:
        return  # a forked child, transparent mode off, or not rank 0
    if not _failed and _launcher_gone():
        _failed.append("launcher gone")
    if _failed and set(_failed) <= {"SIGINT", "launcher gone"} and session.step:
        # Interrupted, though the script ended without an error (it caught the KeyboardInterrupt): not finished.
        why = "it was interrupted (SIGINT)" if "SIGINT" in _failed else "the process that started it is gone"
        activation._say(f"warning: {session.directory} is not marked finished: {why} at step {session.step}; a relaunch "
                        "resumes from its newest checkpoint", "warning")
    if _failed:
        return  # a failing or interrupted script
    if session.source is not None and session.ckpt is not None:
        # The script never came to the checkpoint's position (its loops end sooner than the run that wrote
        # it): nothing was restored and the training after that point did not run. Exit status 0 alone
        # would read as a finished run.
        from .loader_state import loop_epoch  # (torch is imported by then: a session ran)

        pos = (session.source.rank_state or {}).get("loader") or {}
        where = f" (epoch {loop_epoch(pos)}, batch {pos.get('batch', '?')})" if pos else ""
        activation._say(f"warning: the script ended before reaching the point checkpoint {session.source.path} was "
                        f"taken at{where}: nothing was restored and this run did not resume it; "
                        f"{session.directory} is not marked finished", "warning")
        return
    if (session.ckpt is None or session.step == 0 or session.tracker.plan is not None
            or session.sigterm is not None):
        return
    session.flush()
    fut = session.future
    step, ok = (None, None) if fut is None else (session.last_snapshot_step, fut.wait(0))
    try:
        # With the memory tier the newest snapshot may be held only in /dev/shm, removed at this exit:
        # written to storage first, or the marker names storage's newest (never a step it lacks).
        kept = shm_tier.at_normal_end(session.ckpt)
        if kept is not None:
            step, ok = kept
        elif ok is False:  # the last snapshot failed (said in its own line): name what a relaunch would have
            step = newest_step(session.directory)
        elif fut is None and session.last_snapshot_step >= 0 and _committed(session.directory,
                                                                            session.last_snapshot_step):
            step, ok = session.last_snapshot_step, True  # resumed, no snapshot since: the one resumed from
        metrics.mark_finished(session.directory, step=step, steps=session.step, last_checkpoint_ok=ok,
                              **({"script": _script} if _script else {}))
    except Exception as e:  # the run's result stands; a relaunch will train the tail again
        activation._say(f"warning: could not mark {session.directory} finished: {type(e).__name__}: {e}",
                        "warning")
