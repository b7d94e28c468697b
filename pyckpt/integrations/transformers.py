"""Hugging Face ``Trainer``: its own counters and its epoch loop, for an exact transparent resume.

The Trainer keeps state pyckpt cannot see generically: ``TrainerState`` (global step, epoch,
log history, best metric, callbacks' state), ``TrainerControl`` and the running-loss
bookkeeping, and the local variables of ``_run_epoch`` (the batch index ``step``, which decides
the epoch's last, shorter accumulation window). So:

* the Trainer's state is saved with every snapshot (a registered object) and put back at the
  snapshot point, with its LR scheduler (made on accelerate's optimizer wrapper, which the
  generic discovery does not match to the optimizer);
* epochs that finished before the checkpoint are not run through ``_run_epoch`` at all (an
  empty epoch makes it stop training: "not a single sample in your epoch_iterator"); the
  epoch's DataLoader is only iterated, so the tracker counts the epoch;
* the epoch being resumed runs ``_run_epoch`` as the Trainer's own resume does (its batch index
  starts at the position), with the Trainer's batch skipping and RNG-file loading turned off for
  that call: pyckpt skips the batches at the sampler level and restores RNG itself;
* ``Trainer.train(resume_from_checkpoint=...)``, the Trainer's own resume, is composed with
  pyckpt's: the checkpoint with more optimizer steps wins (a tie goes to pyckpt's, which also
  holds the loader and RNG state at the exact point), one line says which. When the Trainer's
  wins, it loads its own state and pyckpt only keeps counting in the same terms (its step count,
  the epochs the Trainer does not run, the batches it skips, at the sampler level as above).

Never imports transformers: called with the module the script imported.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import weakref
from types import ModuleType
from typing import Any

from .. import frames, object_attrs
from ..hooks import HookSet
from . import object_state

TRAINER_STATE = "trainer_state.json"  # the Trainer's own checkpoints: written last, so it marks a complete one
MODULE = "transformers.trainer"
NAME = "transformers.Trainer"  # the registered object's name in checkpoints
_RESUMING = "<pyckpt transparent resume>"  # stands in for resume_from_checkpoint during the resumed epoch


class _Active:
    trainer: Any = None  # weakref to the Trainer whose train() runs
    framework_resume: str | None = None  # the Trainer's own checkpoint this train() resumes from


def install(module: ModuleType, tracker: Any, hooks: HookSet) -> None:
    """Wrap ``Trainer._run_epoch`` and register the Trainer's state."""
    from .. import transparent
    from ..loader_state import FastForward, _epoch_rng, signature

    trainer_cls = module.Trainer
    orig_run_epoch = trainer_cls._run_epoch
    params = inspect.signature(orig_run_epoch)
    for name in ("epoch", "train_dataloader", "resume_from_checkpoint", "epochs_trained",
                 "steps_trained_in_current_epoch"):
        if name not in params.parameters:
            raise TypeError(f"Trainer._run_epoch has no parameter {name!r}")

    def _run_epoch(self, *args, **kwargs):
        _Active.trainer = weakref.ref(self)
        bound = params.bind(self, *args, **kwargs)
        tracker.ensure_started()  # the resume plan is made now, not at this epoch's first fetch
        plan = tracker.plan
        loader = bound.arguments["train_dataloader"]
        if _Active.framework_resume is not None and bound.arguments["resume_from_checkpoint"] is not None:
            return _run_epoch_resumed_by_trainer(self, bound, loader)
        if plan is None or tracker.plan_stream is not None or _sig(signature, loader) != plan.sig:
            return orig_run_epoch(*bound.args, **bound.kwargs)
        number = tracker.stream_for(loader).epochs + 1  # the iter() this epoch will make, as the tracker counts
        if number < plan.epoch:
            # Finished before the checkpoint: only iterate, so the loader counts the epoch (it is
            # empty now); the state that the epoch's end produced comes back with the restore.
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(bound.arguments["epoch"])
            for _ in loader:
                pass
            return None
        if number == plan.epoch and plan.batch > 0:
            bound.arguments.update(resume_from_checkpoint=_RESUMING, epochs_trained=bound.arguments["epoch"],
                                   steps_trained_in_current_epoch=plan.batch)
            with _trainer_skips_nothing(module, self):
                return orig_run_epoch(*bound.args, **bound.kwargs)
        return orig_run_epoch(*bound.args, **bound.kwargs)

    def _run_epoch_resumed_by_trainer(self, bound, loader):
        # The Trainer's own resume won: its loop starts at epoch `epochs_trained` without iterating
        # the epochs before, and skips the first batches of that epoch. Keep pyckpt's counts in the
        # terms of a run that went through them (later snapshots, and a later resume from one,
        # depend on it): count the epochs not run, and skip the batches at the sampler level of the
        # same loader (the Trainer's skip_first_batches would make another loader).
        epoch, first = bound.arguments["epoch"], bound.arguments["epochs_trained"]
        skip = bound.arguments["steps_trained_in_current_epoch"]
        if epoch != first or _sig(signature, loader) is None:
            return orig_run_epoch(*bound.args, **bound.kwargs)
        _Active.framework_resume = None
        stream = tracker.stream_for(loader)
        stream.epochs = max(stream.epochs, epoch)
        if skip <= 0 or self.args.ignore_data_skip:
            return orig_run_epoch(*bound.args, **bound.kwargs)
        tracker.plan = FastForward(stream.sig, epoch + 1, skip, _epoch_rng(loader, host=False), False)
        orig_skip = module.skip_first_batches
        module.skip_first_batches = lambda dataloader, num_batches=0: dataloader
        try:
            return orig_run_epoch(*bound.args, **bound.kwargs)
        finally:
            module.skip_first_batches = orig_skip

    orig_train = trainer_cls.train
    train_params = inspect.signature(orig_train)
    if "resume_from_checkpoint" not in train_params.parameters:
        raise TypeError("Trainer.train has no parameter 'resume_from_checkpoint'")

    def train(self, *args, **kwargs):
        bound = train_params.bind(self, *args, **kwargs)
        requested = bound.arguments.get("resume_from_checkpoint")
        _Active.framework_resume = None
        if requested is not None and requested is not False:
            bound.arguments["resume_from_checkpoint"] = _compose(tracker, self, requested)
        return orig_train(*bound.args, **bound.kwargs)

    hooks.patch(trainer_cls, "_run_epoch", _run_epoch)
    hooks.patch(trainer_cls, "train", train)
    transparent.REGISTERED[NAME] = (_get_state, _set_state)
    hooks.add_handle(_Unregister(transparent.REGISTERED, NAME))


def _compose(tracker: Any, trainer: Any, requested: Any) -> Any:
    """What ``resume_from_checkpoint`` the Trainer gets: its own checkpoint if that is newer than
    pyckpt's (pyckpt's pending restore is then dropped), else None (pyckpt restores)."""
    from ..transparent import say

    session = getattr(tracker, "session", None)
    if session is None:
        return requested
    path, note = _trainer_checkpoint(trainer, requested)
    theirs = _global_step(path) if path is not None else None
    tracker.ensure_started()  # pyckpt's choice of checkpoint, made now
    source = session.source
    ours = _pyckpt_global_step(source) if source is not None else None
    rank0 = getattr(session.coord, "rank", 0) == 0
    if ours is not None and (theirs is None or ours >= theirs):
        if rank0:
            named = "newest checkpoint in its output_dir" if requested is True else str(requested)
            other = f"the Trainer's {path} (step {theirs})" if theirs is not None else \
                f"the Trainer's {named} ({note or 'no usable checkpoint'})"
            say(f"resume: pyckpt's checkpoint {source.path} (step {ours}) is newer than or as new as {other}; "
                "resuming from pyckpt's, the Trainer's own resume is skipped")
        return None
    if theirs is None:
        return requested  # nothing pyckpt can use either: the Trainer does what it does without pyckpt
    if rank0:
        older = f"pyckpt's checkpoint {source.path} (step {ours}) is older" if source is not None else \
            "pyckpt has no checkpoint to resume from"
        say(f"resume: the Trainer's checkpoint {path} (step {theirs}) is newer; {older}; resuming from the "
            "Trainer's, pyckpt counts on from its step")
    session.cancel_pending_resume(theirs)
    _Active.framework_resume = path
    return path


def _trainer_checkpoint(trainer: Any, requested: Any) -> tuple[str | None, str | None]:
    """The Trainer checkpoint ``requested`` names (True: the newest complete one in output_dir) and a
    note on why there is none usable."""
    import os
    import re

    if requested is not True:
        path = os.fspath(requested)
        if os.path.isfile(os.path.join(path, TRAINER_STATE)):
            return path, None
        return None, f"incomplete: no {TRAINER_STATE}"
    folder = trainer.args.output_dir
    try:
        names = os.listdir(folder)
    except OSError:
        return None, "no output_dir"
    numbered = sorted(((int(m.group(1)), n) for n in names if (m := re.fullmatch(r"checkpoint-(\d+)", n))),
                      reverse=True)
    for _, name in numbered:
        path = os.path.join(folder, name)
        if os.path.isfile(os.path.join(path, TRAINER_STATE)):
            return path, None
    return None, "none complete" if numbered else "none"


def _global_step(path: str) -> int | None:
    """``global_step`` from a Trainer checkpoint's trainer_state.json (None if unreadable)."""
    import os

    try:
        with open(os.path.join(path, TRAINER_STATE)) as f:
            return int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _pyckpt_global_step(source: Any) -> int:
    """The Trainer's global step saved in pyckpt's checkpoint (its own step count if absent)."""
    saved = ((source.rank_state or {}).get("registered") or {}).get(NAME)
    try:
        return int(json.loads(saved["state"])["global_step"])
    except (TypeError, KeyError, ValueError):
        return int(source.step)


def _sig(signature: Any, loader: Any) -> Any:
    try:
        return signature(loader)
    except Exception:  # not a DataLoader-like object: not the tracked stream
        return None


@contextlib.contextmanager
def _trainer_skips_nothing(module: ModuleType, trainer: Any):
    """During the resumed epoch: the Trainer's ``skip_first_batches`` returns the loader as it is and
    its RNG-file loading does nothing (pyckpt already skipped the batches and restores RNG)."""
    orig_skip = module.skip_first_batches
    module.skip_first_batches = lambda dataloader, num_batches=0: dataloader
    trainer._load_rng_state = lambda checkpoint: None
    try:
        yield
    finally:
        module.skip_first_batches = orig_skip
        trainer.__dict__.pop("_load_rng_state", None)


class _Unregister:
    def __init__(self, registry: dict, name: str) -> None:
        self.registry, self.name = registry, name

    def remove(self) -> None:
        self.registry.pop(self.name, None)


def _trainer() -> Any:
    ref = _Active.trainer
    return ref() if ref is not None else None


def _callbacks(trainer: Any) -> list:
    return list(trainer.callback_handler.callbacks) + [trainer.control]


def _script_objects(trainer: Any) -> list[tuple[str, Any, frozenset | None]]:
    """(label, object, attribute names or None for all) of what the Trainer holds of the script's classes:
    itself, where the script subclasses it (the names its own code uses: ``object_attrs._own_names``), and
    its callbacks without a ``state()`` of their own (all their attributes: a ``TrainerCallback`` has none),
    labelled ``callback.<class>.<n>`` (the n-th of that class)."""
    out: list[tuple[str, Any, frozenset | None]] = []
    if frames.is_script_class(type(trainer)):
        out.append(("trainer", trainer, object_attrs._own_names(type(trainer), frames.is_script_class)))
    seen: dict[str, int] = {}
    for cb in trainer.callback_handler.callbacks:
        if frames.is_script_class(type(cb)) and not callable(getattr(cb, "state", None)):
            n = seen[type(cb).__qualname__] = seen.get(type(cb).__qualname__, -1) + 1
            out.append((f"callback.{type(cb).__qualname__}.{n}", cb, None))
    return out


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        from ..transparent import say

        say(message, "warning")


def _get_state() -> Any:
    trainer = _trainer()
    if trainer is None or getattr(trainer, "state", None) is None:
        return None
    exportable = [cb for cb in _callbacks(trainer) if callable(getattr(cb, "state", None))]
    saved: dict[str, Any] = {
        "state": json.dumps(dataclasses.asdict(trainer.state), sort_keys=True),
        "callbacks": json.dumps([[type(cb).__name__, cb.state()] for cb in exportable]),
        "globalstep_last_logged": int(getattr(trainer, "_globalstep_last_logged", 0)),
        "total_loss_scalar": float(getattr(trainer, "_total_loss_scalar", 0.0)),
        "current_flos": float(getattr(trainer, "current_flos", 0.0)),
    }
    tr_loss = getattr(trainer, "_tr_loss", None)
    if tr_loss is not None:
        saved["tr_loss"] = tr_loss.detach().clone()
    objects = {}
    for label, obj, names in _script_objects(trainer):
        objects[label], left = object_state.capture(obj, names)
        if left:
            _warn_once(f"warning: a resume will not be exact: the Trainer's {label} ({type(obj).__qualname__}) keeps "
                       f"{', '.join(left[:8])} in a form pyckpt does not save with it (a set, a deque, a NumPy array, "
                       f"an object of the script's classes, or over {object_state.MAX_ITEMS} values); save it with "
                       "pyckpt.register(name, getter=..., setter=...)")
    if objects:
        saved["script_objects"] = objects
    sched = getattr(trainer, "lr_scheduler", None)
    if callable(getattr(sched, "state_dict", None)):
        # Made after accelerator.prepare(optimizer), on the AcceleratedOptimizer wrapper, which the
        # generic discovery does not match to the optimizer it tracks.
        saved["lr_scheduler"] = json.dumps(sched.state_dict())
    return saved


def _set_state(saved: Any) -> None:
    trainer = _trainer()
    if trainer is None or not saved:
        return
    objects = saved.get("script_objects") or {}
    live = {label: obj for label, obj, _ in _script_objects(trainer)}
    bad = []
    for label, e in objects.items() if isinstance(objects, dict) else ():
        failed = object_state.restore(live[label], e) if label in live else ["not in this run"]
        if failed:
            bad.append(f"{label}: {', '.join(failed)}")
    if bad:
        _warn_once(f"warning: the Trainer's objects of the script's classes were not all restored: {'; '.join(bad)}; "
                   "what they hold may differ after this resume")
    trainer.state = type(trainer.state)(**json.loads(saved["state"]))
    by_name: dict[str, list] = {}
    for name, st in json.loads(saved["callbacks"]):
        by_name.setdefault(name, []).append(st)
    for cb in _callbacks(trainer):
        states = by_name.get(type(cb).__name__)
        if states:
            for attr, value in (states.pop(0).get("attributes") or {}).items():
                setattr(cb, attr, value)
    trainer._globalstep_last_logged = saved["globalstep_last_logged"]
    trainer._total_loss_scalar = saved["total_loss_scalar"]
    trainer.current_flos = saved["current_flos"]
    if "tr_loss" in saved and getattr(trainer, "_tr_loss", None) is not None:
        trainer._tr_loss.copy_(saved["tr_loss"])
    if "lr_scheduler" in saved and getattr(trainer, "lr_scheduler", None) is not None:
        trainer.lr_scheduler.load_state_dict(json.loads(saved["lr_scheduler"]))
