"""The files a relaunch's script writes with ``torch.save`` before its restore point.

A relaunch runs the script's per-epoch code again in the epochs before the checkpoint's (without data), from the
state before the restore: the freshly built model. A "save the best model" step there (``best_acc`` starts at 0,
so the first evaluation is an improvement) or a file per epoch (``torch.save(model.state_dict(),
f"epoch{epoch}.pt")``) wrote those initial weights over the files the run had written, and a script that loads its
best model at the end then finished with them: silently. While the restore is pending, a ``torch.save`` to a path
that exists is therefore left undone (the file keeps what the run wrote; the script writes it again after the
resume wherever the run did), said once. A path that does not exist (the run's copy is not here: another node, a
deleted file) is written as asked, with one warning line, since the script may read it back before the restore
point. Writes to file objects and buffers are not touched.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch

from .hooks import HookSet


class HeldWrites:
    """Holds back ``torch.save`` to existing files while ``pending()`` says the restore point is not reached."""

    def __init__(self, pending: Callable[[], bool], say: Callable[[str, str], None]) -> None:
        self.pending, self.say = pending, say
        self.left: list[str] = []  # files left as the run wrote them
        self.written: list[str] = []  # files written from the state before the restore (no copy of the run's)
        self._patch: tuple[Any, Any] | None = None

    def install(self, hooks: HookSet) -> None:
        """Wrap ``torch.save`` (undone with ``hooks``, or by ``drop()`` once the restore is done)."""
        original = torch.save
        held = self

        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
            if held.pending() and isinstance(f, (str, os.PathLike)):
                path = os.fspath(f)
                if os.path.exists(path):
                    held._note(held.left, path)
                    return None
                held._note(held.written, path)
            return original(obj, f, *args, **kwargs)

        save.__doc__, save.__wrapped__ = original.__doc__, original  # type: ignore[attr-defined]
        self._patch = (save, original)
        hooks.patch(torch, "save", save)

    def drop(self) -> None:
        """The restore is done (or will not happen): torch's own ``save`` back, unless something wrapped it over
        this one since (the hook set puts it back then)."""
        if self._patch is not None and torch.save is self._patch[0]:
            torch.save = self._patch[1]
        self._patch = None

    def _note(self, into: list[str], path: str) -> None:
        into.append(path)
        if len(into) > 1:
            return
        if into is self.left:
            self.say(f"{path}: left as the run wrote it: the script's torch.save before the restore point would "
                     "write the state before the restore over it (so are other files it saves there; the script "
                     "writes them again after the resume, where the run did)", "info")
        else:
            self.say(f"warning: {path} was written before the restore point from the state before the restore (the "
                     "run's copy is not here: another node, or removed); it holds that state until the script saves "
                     "it again after the resume (so may other files it saves there)", "warning")
