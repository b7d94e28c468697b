"""Optional integrations with training libraries, installed only when the script imports them.

Each integration is keyed by the module that defines what it patches; ``install`` patches at
once when that module is already imported, else an ``AfterImport`` finder patches right after
the script imports it. pyckpt itself never imports these libraries.
"""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ..after_import import AfterImport
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
        hooks.add_handle(AfterImport({name: functools.partial(_safely, name, patch)
                                      for name, patch in pending.items()}).install())


def _safely(name: str, patch: Patcher, module: ModuleType) -> None:
    try:
        patch(module)
    except Exception as e:  # a library version we do not know must never break the script
        from ..transparent import say

        say(f"warning: integration with {name} not installed ({type(e).__name__}: {e}); resume positions "
            "under its data loader wrappers may be off by their look-ahead", "warning")
