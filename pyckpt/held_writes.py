"""The files a relaunch's script writes before its restore point.

A relaunch runs the script's per-epoch code again in the epochs before the checkpoint's (without data), from the
state before the restore: the freshly built model. A "save the best model" step there (``best_acc`` starts at 0,
so the first evaluation is an improvement) or a file per epoch (``torch.save(model.state_dict(),
f"epoch{epoch}.pt")``) wrote those initial weights over the files the run had written, and a script that loads its
best model at the end then finished with them: silently. While the restore is pending, therefore:

* ``torch.save`` and safetensors' writes (``save_file``, ``save_pretrained``, accelerate's ``save_state``) to a path
  that exists are left undone: the file keeps what the run wrote, and the script writes it again after the resume
  wherever the run did. A path that does not exist is written as asked (the script may read it back, or move it);
* ``shutil.copyfile`` (``copy``, ``copy2``) onto an existing file is left undone: PyTorch's ImageNet example copies
  its checkpoint to ``model_best.pth.tar`` when the (pre-restore) evaluation beats ``best_acc1``, which starts at 0;
* ``os.replace`` / ``os.rename`` of a file written so (an atomic save: ``torch.save`` to a temporary name, then a
  rename) onto an existing file removes the temporary file instead.

Said once each; at the restore point one warning line names the files written from the state before the restore
that are still there (the run's copy was not here: another node, a file removed). Writes to file objects and
buffers are not touched (a file the script opened for writing is truncated by then), nor other writers (``np.save``,
a CSV log).
"""
from __future__ import annotations

import os
import shutil
import sys
from typing import Any, Callable

import torch

from .hooks import HookSet


class HeldWrites:
    """Holds back the script's writes over existing files while ``pending()`` says the restore point is not
    reached (module docstring)."""

    def __init__(self, pending: Callable[[], bool], say: Callable[[str, str], None]) -> None:
        self.pending, self.say = pending, say
        self.left: list[str] = []  # files left as the run wrote them
        self.written: set[str] = set()  # absolute paths written from the state before the restore
        self._patches: list[tuple[Any, str, Any, Any]] = []  # (owner, name, wrapper, original)

    def install(self, hooks: HookSet) -> None:
        """Wrap the writers (undone with ``hooks``, or by ``drop()`` once the restore is done). Safetensors is
        wrapped at the function every ``save_file`` goes through, however the caller imported ``save_file``, and
        only where the script imported it."""
        self._wrap_writer(hooks, torch, "save")
        safetensors_torch = sys.modules.get("safetensors.torch")
        if safetensors_torch is not None and callable(getattr(safetensors_torch, "serialize_file", None)):
            self._wrap_writer(hooks, safetensors_torch, "serialize_file")
        self._wrap_copy(hooks)
        for name in ("replace", "rename"):
            self._wrap_move(hooks, name)

    def _patch(self, hooks: HookSet, owner: Any, name: str, wrapper: Any, original: Any) -> None:
        wrapper.__doc__, wrapper.__wrapped__ = original.__doc__, original
        self._patches.append((owner, name, wrapper, original))
        hooks.patch(owner, name, wrapper)

    def _wrap_writer(self, hooks: HookSet, owner: Any, name: str) -> None:
        """``owner.name(obj, path, ...)``: left undone onto an existing path while the restore is pending."""
        original, held = getattr(owner, name), self

        def write(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
            if held.pending() and isinstance(f, (str, os.PathLike)):
                path = os.fspath(f)
                if held._holds(path):
                    return None
                held.written.add(os.path.abspath(path))
            return original(obj, f, *args, **kwargs)

        self._patch(hooks, owner, name, write, original)

    def _wrap_copy(self, hooks: HookSet) -> None:
        """``shutil.copyfile`` (which ``copy`` and ``copy2`` call): left undone onto an existing file."""
        original, held = shutil.copyfile, self

        def copyfile(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
            if held.pending() and isinstance(dst, (str, os.PathLike)):
                if held._holds(os.fspath(dst)):
                    return dst
                held.written.add(os.path.abspath(os.fspath(dst)))
            return original(src, dst, *args, **kwargs)

        self._patch(hooks, shutil, "copyfile", copyfile, original)

    def _wrap_move(self, hooks: HookSet, name: str) -> None:
        """``os.replace`` / ``os.rename`` of a file written before the restore point onto an existing file: the
        written one is removed instead (an atomic save's temporary file)."""
        original, held = getattr(os, name), self

        def move(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
            if (held.written and not args and not kwargs and isinstance(src, (str, os.PathLike))
                    and isinstance(dst, (str, os.PathLike)) and held.pending()):
                source = os.path.abspath(os.fspath(src))
                if source in held.written:
                    held.written.discard(source)
                    if held._holds(os.fspath(dst)):
                        os.unlink(source)
                        return None
                    held.written.add(os.path.abspath(os.fspath(dst)))
            return original(src, dst, *args, **kwargs)

        self._patch(hooks, os, name, move, original)

    def drop(self) -> None:
        """The restore is done (or dropped): the originals back, unless something wrapped one over this since (the
        hook set puts it back then); one warning line for the files written from the state before the restore."""
        for owner, name, wrapper, original in self._patches:
            if getattr(owner, name, None) is wrapper:
                setattr(owner, name, original)
        self._patches = []
        there = sorted(p for p in self.written if os.path.exists(p))
        self.written = set()
        if there:
            more = f" and {len(there) - 1} other file(s)" if len(there) > 1 else ""
            self.say(f"warning: written before the restore point from the state before the restore (the run's copy "
                     f"was not here: another node, or removed): {there[0]}{more}; such a file holds that state until "
                     "the script saves it again", "warning")

    def _holds(self, path: str) -> bool:
        """Whether a write onto ``path`` is left undone: a file the run wrote (not one written here since)."""
        if not os.path.isfile(path) or os.path.abspath(path) in self.written:
            return False
        self.left.append(path)
        if len(self.left) == 1:
            self.say(f"{path}: left as the run wrote it: the script's save or copy before the restore point would "
                     "write the state before the restore over it (so are other files it writes there; the script "
                     "writes them again after the resume, where the run did)", "info")
        return True
