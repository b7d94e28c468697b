"""A script that resumes itself while pyckpt has a checkpoint too: the two resumes compose.

A script's own resume loads its optimizer's state (``torch.load`` of its ``last.pt`` then
``optimizer.load_state_dict``, or accelerate's ``load_state``) and starts its loop where that state
was saved (``start_epoch = ck["epoch"] + 1``). pyckpt counts epochs from the relaunch's first
``iter()``, so without composing it would skip the script's remaining epochs as if they were the
finished ones (and the script's per-epoch ``torch.save`` there would overwrite its own checkpoint with
the state it just loaded). The checkpoint with more optimizer steps wins, a tie goes to pyckpt's
(it holds the loader and random state at the exact point), and one line says which:

* pyckpt's wins: the epoch the script resumes in is found from the loaded optimizer's steps and the
  step count at each epoch start kept in pyckpt's checkpoint (``epoch_of``); pyckpt counts the
  script's next ``iter()`` as that epoch, skips to its position and restores its own state over the
  loaded one at its resume point.
* the script's wins (or pyckpt's cannot be placed): pyckpt's pending restore is dropped and its step
  count continues from the loaded optimizer's.

The step count of a loaded state is the ``step`` an Adam-like optimizer keeps per parameter; an
optimizer keeping none (plain SGD) cannot be compared: pyckpt's checkpoint is then not used, in one
warning line.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import torch

from . import frames
from .hooks import HookSet


def epoch_of(first: int, epoch_steps: list[int], step: int) -> int | None:
    """The epoch number (1-based ``iter()`` count) a run resuming after optimizer step ``step`` starts
    in: the last epoch that began at or before that step (at an epoch's end: the next one).
    ``epoch_steps[i]``: the step count when epoch number ``first + i`` began (-1: not known).
    None when that is not known (an epoch of unknown start may be the one)."""
    found, unknown = None, False
    for i, s in enumerate(epoch_steps):
        if s < 0:
            unknown = True  # this epoch may have begun at or before `step`, after `found`'s
        elif s <= step:
            found, unknown = first + i, False
        else:
            break
    return None if unknown else found


def optimizer_steps(optimizers: Iterable[Any]) -> int | None:
    """Optimizer steps of a loaded state: the largest ``step`` an Adam-like optimizer keeps per
    parameter (wrappers with an ``optimizer`` attribute are looked through); None when none keeps one."""
    found = []
    for opt in optimizers:
        inner = getattr(opt, "optimizer", opt)
        for st in getattr(inner, "state", {}).values():
            step = st.get("step") if isinstance(st, dict) else None
            if step is not None:
                try:
                    found.append(int(step))
                except (TypeError, ValueError):
                    pass
    return max(found) if found else None


def compose(session: Any, theirs: int | None, where: str, pyckpt_note: str = "") -> bool:
    """The script loaded a state of its own (``where`` names how, ``theirs`` its optimizer steps):
    decide which resume wins, say it in one line (rank 0) and set pyckpt up for it. True when pyckpt's
    checkpoint wins (its restore stays pending; the script's next ``iter()`` of the training loader is
    counted as the epoch the loaded state resumes in)."""
    from .loader_state import Stream, epoch_steps_of
    from .transparent import say

    tracker = session.tracker
    tracker.ensure_started()  # pyckpt's choice of checkpoint, made now (every rank agrees)
    source, plan = session.source, tracker.plan
    rank0 = getattr(session.coord, "rank", 0) == 0
    steps = f"optimizer step {theirs}" if theirs is not None else "optimizer step unknown"
    if source is not None and plan is not None and tracker.plan_stream is None and theirs is not None \
            and source.step >= theirs:
        epoch = epoch_of(*epoch_steps_of((source.rank_state or {}).get("loader") or {}), theirs)
        if epoch is not None and epoch <= plan.epoch:
            key = tuple(plan.sig)
            st = tracker.streams.get(key)
            if st is None:
                st = tracker.streams[key] = Stream(list(plan.sig), tracker)
            st.epochs = epoch - 1
            if tracker.skip_note is not None:  # only the epochs between the loaded state's and pyckpt's are skipped
                tracker.set_skip_note(epoch - 1, plan.epoch - 1)
            if rank0:
                say(f"resume: pyckpt's checkpoint {source.path} (step {source.step}) is newer than or as new as "
                    f"{where} ({steps}); resuming from pyckpt's: it replaces the loaded state at its resume point "
                    f"and positions the data itself{pyckpt_note}")
            return True
        why = "pyckpt's checkpoint does not say which epoch that step was in"
    elif source is not None and theirs is None:
        why = "the loaded optimizer keeps no step count to compare"
    else:
        why = None
    if source is not None and rank0:
        if why is None:
            say(f"resume: {where} ({steps}) is newer than pyckpt's checkpoint {source.path} (step {source.step}); "
                "resuming from the script's, pyckpt counts on from its step")
        else:
            say(f"warning: resume: the script resumes itself with {where} ({steps}); pyckpt's checkpoint "
                f"{source.path} (step {source.step}) is not used: {why}", "warning")
    if source is not None or theirs is not None:
        session.cancel_pending_resume(theirs if theirs is not None else session.step)
    return False


def install(session: Any, hooks: HookSet) -> None:
    """Compose with the script's own ``optimizer.load_state_dict()``, once, when the script's code (not
    a library's, not pyckpt's restore) calls it before pyckpt's restore point."""
    original = torch.optim.Optimizer.load_state_dict

    def load_state_dict(opt, state_dict):
        out = original(opt, state_dict)
        caller = sys._getframe(1)
        tracker = session.tracker
        if (not session.own_resume_seen and frames.is_user_file(caller.f_code.co_filename)
                and tracker.plan_stream is None and session.step == 0):
            session.own_resume_seen = True
            compose(session, optimizer_steps([opt]), f"the script's own {type(opt).__name__}.load_state_dict()")
        return out

    hooks.patch(torch.optim.Optimizer, "load_state_dict", load_state_dict)
