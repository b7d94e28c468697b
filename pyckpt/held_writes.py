"""The files a relaunch's script writes with ``torch.save`` before its restore point.

A relaunch runs the script's per-epoch code again in the epochs before the checkpoint's (without data), from the
state before the restore: the freshly built model. A "save the best model" step there (``best_acc`` starts at 0,
so the first evaluation is an improvement) or a file per epoch (``torch.save(model.state_dict(),
f"epoch{epoch}.pt")``) wrote those initial weights over the files the run had written, and a script that loads its
best model at the end then finished with them: silently. While the restore is pending, a ``torch.save`` to a path
that exists is therefore left undone (the file keeps what the run wrote; the script writes it again after the
resume wherever the run did), said once. A path that does not exist (the run's copy is not here: another node, a
deleted file) is written as asked, with one warning line, since the script may read it back before the restore
point. Files written through safetensors (``save_file``, ``save_pretrained``) are held the same way. Writes to file
objects and buffers are not touched (a file the script opened for writing is truncated by then).
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

import torch

from .hooks import HookSet


class HeldWrites:
    """Holds back ``torch.save`` (and safetensors' writes) to existing files while ``pending()`` says the restore
    point is not reached."""

    def __init__(self, pending: Callable[[], bool], say: Callable[[str, str], None]) -> None:
        self.pending, self.say = pending, say
        self.left: list[str] = []  # files left as the run wrote them
        self.written: list[str] = []  # files written from the state before the restore (no copy of the run's)
        self._patches: list[tuple[Any, str, Any, Any]] = []  # (owner, name, wrapper, original)

    def install(self, hooks: HookSet) -> None:
        """Wrap ``torch.save`` and, where the script imported safetensors, the function every
        ``safetensors.torch.save_file`` writes through (``save_pretrained``, accelerate's ``save_state``: however the
        caller imported ``save_file``), so a checkpoint directory is not left half the run's, half the state before
        the restore. Undone with ``hooks``, or by ``drop()`` once the restore is done."""
        self._wrap(hooks, torch, "save")
        safetensors_torch = sys.modules.get("safetensors.torch")
        if safetensors_torch is not None and callable(getattr(safetensors_torch, "serialize_file", None)):
            self._wrap(hooks, safetensors_torch, "serialize_file")

    def _wrap(self, hooks: HookSet, owner: Any, name: str) -> None:
        """Hold back ``owner.name(obj, path, ...)`` to an existing path while the restore is pending."""
        original, held = getattr(owner, name), self

        def write(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
            if held.pending() and isinstance(f, (str, os.PathLike)):
                path = os.fspath(f)
                if os.path.exists(path):
                    held._note(held.left, path)
                    return None
                held._note(held.written, path)
            return original(obj, f, *args, **kwargs)

        write.__doc__, write.__wrapped__ = original.__doc__, original  # type: ignore[attr-defined]
        self._patches.append((owner, name, write, original))
        hooks.patch(owner, name, write)

    def drop(self) -> None:
        """The restore is done (or will not happen): the originals back, unless something wrapped one over this
        since (the hook set puts it back then)."""
        for owner, name, write, original in self._patches:
            if getattr(owner, name, None) is write:
                setattr(owner, name, original)
        self._patches = []

    def _note(self, into: list[str], path: str) -> None:
        into.append(path)
        if len(into) > 1:
            return
        if into is self.left:
            self.say(f"{path}: left as the run wrote it: the script's save (torch.save, safetensors) before the "
                     "restore point would write the state before the restore over it (so are other files it saves "
                     "there; the script writes them again after the resume, where the run did)", "info")
        else:
            self.say(f"warning: {path} was written before the restore point from the state before the restore (the "
                     "run's copy is not here: another node, or removed); it holds that state until the script saves "
                     "it again after the resume (so may other files it saves there)", "warning")
