"""NumPy's legacy ``RandomState.get_state()``, read in place: 1 to 2 us instead of about 30.

``get_state()`` takes about 30 us (the 2-vCPU development box, a one-off probe), and pyckpt reads NumPy's
global state several times per epoch (``loader_state``: at each ``iter()``, first fetch and end of an
epoch) and before each watched pull of a sampler (``sampler_draws``). ``get_state(rs)`` returns the
same tuple, ``(name, key, pos, has_gauss, gauss)``, from two reads of memory:

- the key words and position from the bit generator's ``mt19937_state`` (``uint32 key[624]; int pos``),
  whose address NumPy publishes (``bit_generator.ctypes.state_address``);
- ``has_gauss`` and ``gauss`` (the cached second normal of the legacy Box-Muller pair) from the
  ``RandomState`` object itself, at offsets found once per process by setting known values on a private
  ``RandomState`` and finding them in its memory.

``raw(rs)`` gives those bytes as they are (0.5 us): ``same`` compares two, ``from_raw`` makes the tuple
only where one is kept.

Nothing is trusted unchecked: the offsets must read back three different settings exactly, and the
first read of each generator is compared with its ``get_state()``. Where either check fails (another
NumPy build, a subclass, another bit generator), ``get_state()`` itself is used, always.
"""
from __future__ import annotations

import ctypes
import struct
import sys
from typing import Any

_KEY_BYTES = 624 * 4
_GAUSS = struct.Struct("=i4xd")  # int has_gauss; (padding) double gauss: as in NumPy's aug_bitgen_t
_SETTINGS = ((1, 0.7390851332151607), (0, 0.0), (1, -3.0517578125e-05))

_offset: int | None | bool = False  # of has_gauss in a RandomState; False: not probed yet, None: unusable
_checked: dict[tuple[int, int], tuple[Any, Any, int | None]] = {}  # (id(rs), id(bit generator)) -> _check's


def get_state(rs: Any) -> tuple:
    """``rs.get_state()`` (legacy tuple form, a fresh key array) for a NumPy ``RandomState``, read fast."""
    return from_raw(raw(rs))


def raw(rs: Any) -> bytes | tuple:
    """``rs``'s state as it is in memory (bytes: the key words, position, ``has_gauss`` and ``gauss``; 0.5 us in
    a one-off probe), or ``get_state()``'s tuple where it cannot be read in place. Compare two with ``same``;
    ``from_raw`` makes ``get_state()``'s form of one."""
    bg = getattr(rs, "_bit_generator", None)
    entry = _checked.get((id(rs), id(bg)))
    if entry is None:
        # Held (neither object takes a weak reference), so the ids stay theirs: at most 65 generators are
        # kept alive by this cache.
        entry = _checked[(id(rs), id(bg))] = _check(rs, bg)
    if entry[2] is None:
        return rs.get_state()
    with bg.lock:  # as get_state(): another thread's draw may run without the GIL
        return _read(rs, entry[2])


def from_raw(state: bytes | tuple) -> tuple:
    """``raw``'s result in ``get_state()``'s form (a fresh key array)."""
    if type(state) is not bytes:
        return state
    import numpy as np

    key = np.frombuffer(bytearray(state[:_KEY_BYTES]), dtype=np.uint32, count=624)
    pos = int.from_bytes(state[_KEY_BYTES:_KEY_BYTES + 4], sys.byteorder, signed=True)
    has_gauss, gauss = _GAUSS.unpack(state[_KEY_BYTES + 4:])
    return "MT19937", key, pos, has_gauss, gauss


def _read(rs: Any, address: int) -> bytes:
    return (ctypes.string_at(address, _KEY_BYTES + 4)
            + ctypes.string_at(id(rs) + _offset, _GAUSS.size))  # type: ignore[operator]


def _check(rs: Any, bg: Any) -> tuple:
    """``(rs, bg, address of the key words)`` when ``rs`` can be read in place (its first read equals
    ``get_state()``), else ``(rs, bg, None)``."""
    global _offset
    if len(_checked) > 64:  # generators come and go (a dataset's per-epoch RandomState): keep few
        _checked.clear()
    np = sys.modules.get("numpy")
    if np is None or type(rs) is not np.random.RandomState or type(bg) is not np.random.MT19937:
        return rs, bg, None
    if _offset is False:
        _offset = _probe()
    if _offset is None:
        return rs, bg, None
    try:
        address = int(bg.ctypes.state_address)
        with bg.lock:
            fast, slow = from_raw(_read(rs, address)), rs.get_state()
    except Exception:  # noqa: BLE001 - another build: the documented way
        return rs, bg, None
    return rs, bg, (address if same(fast, slow) else None)


def _probe() -> int | None:
    """The offset of ``has_gauss`` in a ``RandomState`` object: where three known settings read back exactly."""
    import numpy as np

    try:
        rs = np.random.RandomState(0)
        key, pos = rs.get_state()[1:3]
        size = np.random.RandomState.__basicsize__
        rs.set_state(("MT19937", key, pos) + _SETTINGS[0])
        found = ctypes.string_at(id(rs), size).find(struct.pack("=d", _SETTINGS[0][1]))
        offset = found - 8
        if found < 0 or offset < 0 or found + 8 > size:
            return None
        for setting in _SETTINGS:
            rs.set_state(("MT19937", key, pos) + setting)
            if _GAUSS.unpack(ctypes.string_at(id(rs) + offset, _GAUSS.size)) != setting:
                return None
    except Exception:  # noqa: BLE001 - another build: the documented way
        return None
    return offset


def same(a: bytes | tuple, b: bytes | tuple) -> bool:
    """Whether two states (``raw``'s or ``get_state()``'s forms) are one state, every field of it
    (``has_gauss`` moves alone when a legacy ``normal()`` takes the cached value)."""
    if type(a) is bytes and type(b) is bytes:
        return a == b
    a, b = from_raw(a), from_raw(b)
    return (a[0] == b[0] and tuple(a[2:]) == tuple(b[2:]) and len(a[1]) == len(b[1])
            and bool((a[1] == b[1]).all()))


def global_state(np: Any) -> tuple:
    """``np.random.get_state()``, read fast."""
    return from_raw(global_raw(np))


def global_raw(np: Any) -> bytes | tuple:
    """``raw`` of the RandomState NumPy's module functions are bound to."""
    rs = getattr(np.random.get_state, "__self__", None)
    return raw(rs) if rs is not None else np.random.get_state()
