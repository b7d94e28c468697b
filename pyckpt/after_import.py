"""Run a callback right after a module's code has executed: a ``sys.meta_path`` finder.

Used to install the hooks when torch finishes importing (``activation``) and to patch a
training library right after the script imports it (``integrations``). Torch-free and
cheap to import: it runs in every Python process's start-up line when PYCKPT_DIR is set.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any


class _Finder:
    """A ``sys.meta_path`` finder that wraps the loader of the modules it chooses, finding their specs with
    the finders after it, so nothing else about those imports changes."""

    _busy = False

    def install(self) -> Any:
        """Put this finder first on ``sys.meta_path``; returns it."""
        sys.meta_path.insert(0, self)
        return self

    def remove(self) -> None:
        """Take this finder off ``sys.meta_path`` (also a HookSet undo handle)."""
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass

    def _wrapped(self, fullname: str, path: Any, target: Any,
                 wrap: Callable[[Callable[[ModuleType], None]], Callable[[ModuleType], None]]) -> Any:
        """The spec the other finders find for ``fullname``, its loader's ``exec_module`` replaced by
        ``wrap(exec_module)`` (on that spec's own loader instance)."""
        if self._busy:
            return None
        self._busy = True  # the other finders below may import; never recurse into ourselves
        try:
            spec = None
            for finder in sys.meta_path:
                find = getattr(finder, "find_spec", None) if finder is not self else None
                if find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._busy = False
        loader = getattr(spec, "loader", None)
        if loader is not None and hasattr(loader, "exec_module"):
            loader.exec_module = wrap(loader.exec_module)
        return spec


class AfterImport(_Finder):
    """``pending[name](module)`` runs once, right after module ``name`` executed; the finder takes
    itself off ``sys.meta_path`` once nothing is pending."""

    def __init__(self, pending: dict[str, Callable[[ModuleType], None]]) -> None:
        self.pending = dict(pending)

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        """The spec the other finders find for a pending module, its loader wrapped; else None."""
        callback = self.pending.get(fullname)
        if callback is None:
            return None

        def wrap(original: Callable[[ModuleType], None]) -> Callable[[ModuleType], None]:
            def exec_module(module: ModuleType) -> None:
                original(module)
                if self.pending.pop(fullname, None) is not None:
                    if not self.pending:
                        self.remove()
                    callback(module)
            return exec_module

        return self._wrapped(fullname, path, target, wrap)


class ImportNesting(_Finder):
    """Counts the modules named ``prefix...`` whose code is running, so that ``when_done(callback)`` runs
    once none is. The transparent hooks wait for ``import torch``; when a pyckpt module is what imports
    torch, that module's names are not defined yet, and installing the hooks (which import it) must wait
    until it has finished."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.depth = 0
        self._then: list[Callable[[], None]] = []

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        """The spec the other finders find for a module under ``prefix``, its loader counting; else None."""
        if not fullname.startswith(self.prefix):
            return None

        def wrap(original: Callable[[ModuleType], None]) -> Callable[[ModuleType], None]:
            def exec_module(module: ModuleType) -> None:
                self.depth += 1
                try:
                    original(module)
                finally:
                    self.depth -= 1
                    if self.depth == 0 and self._then:
                        then, self._then = self._then, []
                        for callback in then:
                            callback()
            return exec_module

        return self._wrapped(fullname, path, target, wrap)

    def when_done(self, callback: Callable[[], None]) -> None:
        """``callback()`` now when no module under ``prefix`` is executing, else right after the outermost has."""
        if self.depth == 0:
            callback()
        else:
            self._then.append(callback)
