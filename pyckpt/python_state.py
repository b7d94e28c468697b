"""Python's global random state read in place; ``random.getstate()`` built again only when it moved.

``random.getstate()`` builds a tuple of 625 ints (6 us on the 2-vCPU development box, several times that
inside a training loop, a one-off probe). ``raw()`` copies the generator's C object as bytes instead
(CPython's RandomObject: the object header, ``int index``, ``uint32_t state[624]``), with ``gauss_next``
(0.4 us, a one-off probe): ``same`` compares two, ``from_raw`` makes ``getstate()``'s tuple only where one
is kept (``rng.cpu_raw``: each epoch's ``iter()``, first fetch and end, and each watched pull of a
sampler). ``getstate()`` returns the tuple taken last time while the bytes are unchanged (a tuple: nobody
can change it), for a snapshot's ``rng.capture`` and a DataLoader worker's state at every batch.

Checked once against ``getstate()`` itself (the bytes must hold its 624 words and index exactly); where
they do not (another build of Python), ``getstate()`` is called every time.
"""
from __future__ import annotations

import ctypes
import random
import struct
import sys
from array import array
from typing import Any

_OFFSET = 16  # the object header: reference count and type
_SIZE = 4 + 624 * 4  # int index; uint32_t state[624]

_layout_ok: bool | None = None  # None: not checked yet
_last: tuple[tuple, tuple] | None = None  # (raw(), the getstate() tuple) last taken


def getstate() -> tuple:
    """``random.getstate()`` of Python's global generator (the same tuple as last time when it did not move)."""
    global _last
    now = raw()
    if type(now[0]) is not bytes:
        return now  # getstate()'s own
    last = _last
    if last is not None and same(last[0], now):
        return last[1]
    state = random.getstate()
    # Kept only when nothing drew while it was taken (another thread between the two reads).
    if same(raw(), now):
        _last = (now, state)
    return state


def raw() -> tuple:
    """The generator as it is in memory, ``(bytes, gauss_next)`` (0.4 us), or ``getstate()``'s tuple where
    the layout does not match: compare two with ``same``; ``from_raw`` makes ``getstate()``'s form."""
    global _layout_ok
    inst = getattr(random.getstate, "__self__", None)
    if _layout_ok is None:
        _layout_ok = inst is not None and _check(inst)
    if not _layout_ok or inst is None:
        return random.getstate()
    return ctypes.string_at(id(inst) + _OFFSET, _SIZE), inst.gauss_next


def from_raw(state: tuple) -> tuple:
    """``raw``'s result as ``random.getstate()`` gives it."""
    if type(state[0]) is not bytes:
        return state
    memory, gauss_next = state
    index = int.from_bytes(memory[:4], sys.byteorder, signed=True)
    return random.Random.VERSION, tuple(array("I", memory[4:])) + (index,), gauss_next


def same(a: tuple, b: tuple) -> bool:
    """Whether two states (``raw``'s or ``getstate()``'s forms) are one state (``gauss_next`` bit for bit)."""
    if type(a[0]) is bytes and type(b[0]) is bytes:
        return a[0] == b[0] and _same_float(a[1], b[1])
    a, b = from_raw(a), from_raw(b)
    return a[:2] == b[:2] and _same_float(a[2], b[2])


def _check(inst: Any) -> bool:
    try:
        raw = ctypes.string_at(id(inst) + _OFFSET, _SIZE)
        words = inst.getstate()[1]
    except Exception:  # noqa: BLE001 - another build: getstate() itself, always
        return False
    return (len(words) == 625 and int.from_bytes(raw[:4], sys.byteorder, signed=True) == words[-1]
            and tuple(array("I", raw[4:])) == tuple(words[:624]))


def _same_float(a: Any, b: Any) -> bool:
    """None or the same float, bit for bit (0.0 and -0.0 differ)."""
    if a is None or b is None:
        return a is b
    try:
        return struct.pack("=d", a) == struct.pack("=d", b)
    except (struct.error, TypeError):  # not a float (set by hand): taken again
        return False
