"""Optional integrations with training libraries, installed only when the script imports them.

Each integration is keyed by the module that defines what it patches; ``install`` patches at
once when that module is already imported, else a ``sys.meta_path`` finder patches right after
the script imports it. pyckpt itself never imports these libraries.
"""
from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ..hooks import HookSet

Patcher = Callable[[ModuleType], None]


def _integrations(tracker: Any, hooks: HookSet) -> dict[str, Patcher]:
    from . import accelerate, transformers

    return {accelerate.MODULE: lambda module: accelerate.install(module, tracker, hooks),
            transformers.MODULE: lambda module: transformers.install(module, tracker, hooks)}


def install(tracker: Any, hooks: HookSet) -> None:
    """Install every integration for ``tracker`` now or when its library is imported (undone by ``hooks``)."""
    pending = {}
    for name, patch in _integrations(tracker, hooks).items():
        module = sys.modules.get(name)
        if module is not None:
            _safely(name, patch, module)
        else:
            pending[name] = patch
    if pending:
        finder = _AfterImport(pending)
        sys.meta_path.insert(0, finder)
        hooks.add_handle(finder)


def _safely(name: str, patch: Patcher, module: ModuleType) -> None:
    try:
        patch(module)
    except Exception as e:  # a library version we do not know must never break the script
        from ..transparent import say

        say(f"warning: integration with {name} not installed ({type(e).__name__}: {e}); resume positions "
            "under its data loader wrappers may be off by their look-ahead", "warning")


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a patcher right after a given module's code has executed (once per module)."""

    def __init__(self, pending: dict[str, Patcher]) -> None:
        self.pending = pending
        self._busy = False

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        patch = self.pending.get(fullname)
        if patch is None or self._busy:
            return None
        self._busy = True  # the other finders below may import; never recurse into ourselves
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._busy = False
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            original(module)
            if self.pending.pop(fullname, None) is not None:
                _safely(fullname, patch, module)

        loader.exec_module = exec_module  # this spec's own loader instance
        return spec

    def remove(self) -> None:
        """Take this finder off ``sys.meta_path`` (HookSet undo)."""
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass
