"""Reversible hooks and patches, and registries of live torch objects.

Everything the transparent layer changes in torch goes through a ``HookSet``
so ``pyckpt.disable()`` can undo it exactly: hook handles are removed and
patched attributes get their original value back (or are deleted again when
the class had none of its own).
"""
from __future__ import annotations

import functools
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any

_MISSING = object()


def eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, run as plain Python also when torch.compile traces the code that calls it.

    A hook called inside a compiled region (an optimizer's post-step hook under a compiled ``opt.step()``,
    the ``backward()`` wrapper under a compiled train step) is otherwise traced by Dynamo, which fails
    on what the hooks do (``gc.get_objects()``, files, threads) and takes training down. Wrapped in
    ``torch.compiler.disable`` once Dynamo is imported: importing it here would add seconds to every
    start-up, and nothing is compiled before it is imported. Even then ``fn`` is called directly when
    nothing compiles: Dynamo is not tracing this call and no frame-evaluation callback is set (a callback
    is set while compiled code runs, and would compile ``fn``'s frames too). The disable wrapper
    costs a few microseconds per call in a training step, and the hooks run several times per step."""
    disabled: Callable[..., Any] | None = None
    compiling: Callable[[], bool] | None = None
    callback: Callable[[], Any] | None = None

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal disabled, compiling, callback
        if disabled is None:
            if "torch._dynamo" not in sys.modules:
                return fn(*args, **kwargs)
            import torch

            disabled = torch.compiler.disable(fn)
            compiling = torch.compiler.is_compiling
            # (a build without the query: through the disable wrapper always)
            callback = getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None)
            callback = getattr(callback, "get_eval_frame_callback", lambda: True)
        # is_compiling() first: Dynamo traces it as True, so it never traces the callback query.
        if not compiling() and callback() is None:
            return fn(*args, **kwargs)
        return disabled(*args, **kwargs)

    return call


class HookSet:
    """Owns hook handles and attribute patches; ``remove_all()`` undoes them in reverse order."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def add_handle(self, handle: Any) -> Any:
        """Keep a ``RemovableHandle`` (or anything with ``remove()``) for later removal."""
        self._undo.append(handle.remove)
        return handle

    def patch(self, owner: Any, name: str, value: Any) -> Any:
        """Set ``owner.name = value``; returns the previous attribute (as looked up on ``owner``)."""
        own = owner.__dict__.get(name, _MISSING) if hasattr(owner, "__dict__") else _MISSING
        previous = getattr(owner, name, None)

        def undo() -> None:
            if own is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, own)

        setattr(owner, name, value)
        self._undo.append(undo)
        return previous

    def wrap_init(self, cls: type, on_new: Callable[[Any], None]) -> None:
        """Patch ``cls.__init__`` so every new instance (subclasses too) is passed to ``on_new``."""
        original = cls.__init__

        @functools.wraps(original)
        def __init__(self, *args, **kwargs):  # noqa: N807 - it is an __init__
            original(self, *args, **kwargs)
            # Subclass __init__ chains call us once per level; register the object once.
            on_new(self)

        self.patch(cls, "__init__", __init__)

    def remove_all(self) -> None:
        """Undo every hook and patch, newest first."""
        while self._undo:
            self._undo.pop()()


class Registry:
    """Live instances of one kind, in creation order, held by weak reference."""

    def __init__(self) -> None:
        self._refs: list[weakref.ref] = []
        self._ids: set[int] = set()

    def add(self, obj: Any) -> None:
        """Remember ``obj`` (idempotent)."""
        if id(obj) in self._ids and any(r() is obj for r in self._refs):
            return
        self._prune()
        self._refs.append(weakref.ref(obj))
        self._ids.add(id(obj))

    def _prune(self) -> None:
        alive = [r for r in self._refs if r() is not None]
        if len(alive) != len(self._refs):
            self._refs = alive
            self._ids = {id(r()) for r in alive}

    def __iter__(self) -> Iterator[Any]:
        for r in list(self._refs):
            obj = r()
            if obj is not None:
                yield obj

    def __len__(self) -> int:
        return sum(1 for _ in self)


class WeakIdSet:
    """A set of live objects by identity, held by weak reference (no ``__hash__``/``__eq__`` needed,
    O(1) add; entries vanish when their object dies)."""

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref] = {}

    def add(self, obj: Any) -> None:
        """Remember ``obj`` (idempotent)."""
        key = id(obj)
        r = self._refs.get(key)
        if r is None or r() is not obj:
            self._refs[key] = weakref.ref(obj, functools.partial(self._drop, key))

    def _drop(self, key: int, ref: weakref.ref) -> None:
        if self._refs.get(key) is ref:
            del self._refs[key]

    def __iter__(self) -> Iterator[Any]:
        for r in list(self._refs.values()):
            obj = r()
            if obj is not None:
                yield obj

    def __len__(self) -> int:
        return sum(1 for _ in self)
