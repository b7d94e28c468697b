"""Capture and restore the process's random number streams.

Covered: Python ``random``, NumPy's global generator (when NumPy is
imported), torch's CPU generator and every CUDA device's generator (when
CUDA has been initialised: a program that never touched CUDA has no CUDA
random state worth saving, and initialising it here would cost memory on
every device). The captured state uses only tensors, tuples and JSON values,
so it goes through the checkpoint format without pickle.

Generator *objects* a program keeps (a sampler's ``random.Random``, a dataset's
``np.random.default_rng``, a ``torch.Generator``): ``kind_of``, ``raw_state``
(a cheap copy), ``saved_state`` (the checkpoint's form, the same forms as the
global streams'), ``raw_from_saved``, ``check_state`` (refuses what the object
could not take, writing nothing) and ``set_state``.
"""
from __future__ import annotations

import ctypes
import functools
import random
import sys
from typing import Any

import torch

from . import numpy_state, python_state


def capture() -> dict[str, Any]:
    """The current state of every stream; reading a state draws no random numbers.

    The Mersenne Twister words (625 for Python, 624 for NumPy) are one int64 tensor each,
    not a list of ints: a list costs one state-tree leaf per word in every snapshot."""
    state: dict[str, Any] = {"python": python_saved(python_state.getstate()), "torch": torch.get_rng_state()}
    np = sys.modules.get("numpy")
    if np is not None:
        state["numpy"] = numpy_saved(numpy_state.global_state(np))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore(state: dict[str, Any]) -> None:
    """Put every stream back to ``state`` (as returned by ``capture``)."""
    random.setstate(python_raw(state["python"]))
    torch.set_rng_state(cpu_bytes(state["torch"]))
    if "numpy" in state:
        import numpy as np

        np.random.set_state(numpy_raw(state["numpy"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        torch.cuda.set_rng_state_all([cpu_bytes(t) for t in cuda[:n]])


def restore_some(state: dict[str, Any]) -> None:
    """Put back only the CPU streams ``state`` holds (``"python"``, ``"torch"``, ``"numpy"``). Each is
    converted before any is set, so a malformed value raises first (a state of the wrong size is refused
    by torch or ``random`` only when set: the streams before it are then set)."""
    setters = []
    if "python" in state:
        setters.append(functools.partial(random.setstate, python_raw(state["python"])))
    if "torch" in state:
        setters.append(functools.partial(torch.set_rng_state, cpu_bytes(state["torch"])))
    if "numpy" in state:
        import numpy as np

        np_state = numpy_raw(state["numpy"])
        setters.append(lambda: np.random.set_state(np_state))
    for put in setters:
        put()


def python_saved(raw: tuple) -> tuple:
    """``random.getstate()``'s (or a ``random.Random``'s) state in the checkpoint's form."""
    version, words, gauss_next = raw
    return (version, torch.tensor(words, dtype=torch.int64), gauss_next)


def python_raw(saved: Any) -> tuple:
    """``python_saved``'s form back as ``random.setstate()`` takes it. The words as a tensor (this
    version) or a tuple/list of ints (checkpoints written before)."""
    return (saved[0], tuple(_ints(saved[1])), saved[2])


def numpy_saved(raw: tuple) -> dict[str, Any]:
    """NumPy's legacy ``get_state()`` tuple (the global stream's, a ``RandomState``'s) in the checkpoint's form."""
    name, keys, pos, has_gauss, gauss = raw
    return {"name": str(name), "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def numpy_raw(saved: dict[str, Any]) -> tuple:
    import numpy as np

    return (saved["name"], np.array(_ints(saved["keys"]), dtype=np.uint32), saved["pos"], saved["has_gauss"],
            saved["gauss"])


# -- generator objects ---------------------------------------------------------------------------

_KIND_OF_TYPE: dict[type, str | None] = {}  # kind_of's answer per class (torch.Generator's isinstance is slow)


def kind_of(v: Any) -> str | None:
    """``v``'s kind of random generator object, or None (not one, or one without state: SystemRandom).
    Cheap (one dict look-up per class seen before): looked up for every attribute of a loader's parts."""
    t = type(v)
    kind = _KIND_OF_TYPE.get(t, "")
    if kind == "":
        kind = _KIND_OF_TYPE[t] = _kind_of(v)
    return kind


def _kind_of(v: Any) -> str | None:
    if isinstance(v, torch.Generator):
        return "torch"
    if isinstance(v, random.Random):
        return None if isinstance(v, random.SystemRandom) else "random"
    np = sys.modules.get("numpy")
    if np is not None and hasattr(np, "random"):
        if isinstance(v, np.random.RandomState):
            return "numpy.RandomState"
        if isinstance(v, np.random.Generator):
            return "numpy.Generator"
    return None


def new_generator(kind: str) -> Any:
    """A new generator object of ``kind`` (``kind_of``'s names), for a saved state where the relaunch holds
    none yet (made at first use); ValueError for another kind. A NumPy ``Generator`` is ``default_rng()``'s."""
    if kind == "torch":
        return torch.Generator()
    if kind == "random":
        return random.Random()
    if kind in ("numpy.RandomState", "numpy.Generator"):
        import numpy as np  # (a NumPy state was saved: NumPy is there)

        return np.random.RandomState() if kind == "numpy.RandomState" else np.random.default_rng()
    raise ValueError(f"unknown generator kind {str(kind)[:40]!r}")


def raw_state(v: Any, kind: str) -> Any:
    """A copy of generator object ``v``'s state, cheap to take (``saved_state`` converts it)."""
    if kind == "torch":
        return v.get_state()
    if kind == "random":
        return v.getstate()
    if kind == "numpy.RandomState":
        return numpy_state.get_state(v)
    return v.bit_generator.state


def saved_state(kind: str, raw: Any) -> Any:
    """``raw_state``'s result in the checkpoint's form (tensors, tuples, JSON values; no pickle): a torch
    generator's state tensor, ``random.Random``'s and ``RandomState``'s as the global streams' in
    ``capture``, a NumPy ``Generator``'s bit generator state dict with its integers as decimal strings
    (PCG64's are 128-bit) and its arrays as byte tensors."""
    if kind == "torch":
        return raw
    if kind == "random":
        return python_saved(raw)
    if kind == "numpy.RandomState":
        return numpy_saved(raw)
    if kind == "numpy.Generator":
        return _tree_saved(raw, 0)
    raise ValueError(f"unknown generator kind {kind!r}")


def raw_from_saved(kind: str, saved: Any) -> Any:
    """``saved_state``'s form back as the generator takes it (ValueError/TypeError/KeyError: malformed)."""
    if kind == "torch":
        if not isinstance(saved, torch.Tensor):
            raise TypeError("a torch generator state is not a tensor")
        return cpu_bytes(saved)
    if kind == "random":
        if not isinstance(saved, (tuple, list)) or len(saved) != 3:
            raise TypeError("malformed random.Random state")
        return python_raw(saved)
    if kind == "numpy.RandomState":
        if not isinstance(saved, dict):
            raise TypeError("malformed RandomState state")
        return numpy_raw(saved)
    if kind == "numpy.Generator":
        raw = _tree_raw(saved, 0)
        if not isinstance(raw, dict):
            raise TypeError("malformed numpy Generator state")
        return raw
    raise ValueError(f"unknown generator kind {str(kind)[:40]!r}")


def check_state(v: Any, kind: str, raw: Any) -> None:
    """Raise (ValueError, TypeError, ...) unless ``set_state(v, kind, raw)`` would succeed; writes nothing
    to ``v`` (the state is set into a new generator of ``v``'s kind)."""
    if kind != kind_of(v):
        raise TypeError(f"the generator is a {type(v).__qualname__}, the state a {kind}'s")
    if kind == "torch":
        if not isinstance(raw, torch.Tensor):
            raise TypeError("a torch generator state is not a tensor")
        if v.device.type == "cpu":
            torch.Generator().set_state(cpu_bytes(raw))
        elif raw.numel() != v.get_state().numel():
            raise ValueError(f"a {v.device.type} generator state of {raw.numel()} bytes")
    elif kind == "random":
        random.Random().setstate(raw)
    elif kind == "numpy.RandomState":
        import numpy as np

        np.random.RandomState().set_state(raw)
    else:
        import numpy as np

        np.random.Generator(type(v.bit_generator)()).bit_generator.state = raw


def set_state(v: Any, kind: str, raw: Any) -> None:
    """Put ``raw`` (``raw_state``'s or ``raw_from_saved``'s result) into generator object ``v``."""
    if kind == "torch":
        v.set_state(cpu_bytes(raw))
    elif kind == "random":
        v.setstate(raw)
    elif kind == "numpy.RandomState":
        v.set_state(raw)
    else:
        v.bit_generator.state = raw


def _tree_saved(v: Any, depth: int) -> Any:
    """A NumPy bit generator state (dicts of str, int, float and arrays) as tagged JSON values and tensors."""
    import numpy as np

    if depth > 8:
        raise ValueError("a numpy generator state nested too deeply")
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            raise TypeError("a numpy generator state with non-string keys")
        return {k: _tree_saved(x, depth + 1) for k, x in v.items()}
    if isinstance(v, str):
        return ["s", v]
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return ["i", str(int(v))]
    if isinstance(v, (float, np.floating)):
        return ["f", float(v)]
    if isinstance(v, np.ndarray) and v.dtype.kind in "iuf":
        flat = np.ascontiguousarray(v).reshape(-1)
        return ["a", v.dtype.str, list(v.shape), torch.from_numpy(flat.view(np.uint8).copy())]
    raise TypeError(f"a {type(v).__qualname__} in a numpy generator state")


def _tree_raw(e: Any, depth: int) -> Any:
    import numpy as np

    if depth > 8:
        raise ValueError("a numpy generator state nested too deeply")
    if isinstance(e, dict):
        return {str(k): _tree_raw(x, depth + 1) for k, x in e.items()}
    if not isinstance(e, (list, tuple)) or not e:
        raise TypeError("malformed numpy generator state")
    tag = e[0]
    if tag == "s" and len(e) == 2 and isinstance(e[1], str):
        return e[1]
    if tag == "i" and len(e) == 2 and isinstance(e[1], str) and len(e[1]) <= 80:
        return int(e[1])
    if tag == "f" and len(e) == 2 and isinstance(e[1], (int, float)) and not isinstance(e[1], bool):
        return float(e[1])
    if (tag == "a" and len(e) == 4 and isinstance(e[1], str) and isinstance(e[2], (list, tuple))
            and all(type(n) is int and n >= 0 for n in e[2]) and isinstance(e[3], torch.Tensor)):
        dtype = np.dtype(e[1])
        if dtype.kind not in "iuf":
            raise TypeError(f"a numpy generator state array of dtype {dtype}")
        data = e[3].detach().to(device="cpu", dtype=torch.uint8).contiguous().numpy().tobytes()
        return np.frombuffer(data, dtype=dtype).reshape(tuple(e[2])).copy()
    raise TypeError("malformed numpy generator state")


def _ints(words: Any) -> list[int]:
    """Mersenne Twister words from a tensor or a sequence of ints."""
    if isinstance(words, torch.Tensor):
        return [int(w) for w in words.tolist()]
    return [int(w) for w in words]


def generator_state(gen: torch.Generator) -> torch.Tensor:
    """A copy of ``gen``'s state (a CPU byte tensor)."""
    return gen.get_state().clone()


def set_generator_state(gen: torch.Generator, state: torch.Tensor) -> None:
    """Restore ``gen`` from ``generator_state``'s result."""
    gen.set_state(cpu_bytes(state))


def cpu_raw() -> tuple:
    """The CPU streams as they are now (CUDA's aside), cheap to take and to compare (``cpu_moved``): Python's
    and NumPy's as they are in memory (``python_state.raw``, ``numpy_state.raw``; NumPy's None before it is
    imported) and torch's state. Converted to ``capture``'s form only where one is kept (``cpu_saved``)."""
    np = sys.modules.get("numpy")
    return python_state.raw(), torch.get_rng_state(), (numpy_state.global_raw(np) if np is not None else None)


def cpu_moved(then: tuple, now: tuple) -> list[str]:
    """The streams ("python", "torch", "numpy") that differ between two ``cpu_raw()`` results (NumPy imported
    in between counts as moved)."""
    moved = []
    if not python_state.same(then[0], now[0]):
        moved.append("python")
    if not same_cpu_state(then[1], now[1]):
        moved.append("torch")
    if (then[2] is None) != (now[2] is None) or (then[2] is not None and not numpy_state.same(then[2], now[2])):
        moved.append("numpy")
    return moved


def cpu_saved(raw: tuple, streams: Any = ("python", "torch", "numpy")) -> dict[str, Any]:
    """``streams`` of ``cpu_raw()``'s result in ``capture``'s form (``restore``/``restore_some`` put them back;
    no pickle)."""
    py, cpu, np_state = raw
    out: dict[str, Any] = {}
    if "python" in streams:
        out["python"] = python_saved(python_state.from_raw(py))
    if "torch" in streams:
        out["torch"] = cpu  # (torch.get_rng_state() made it: nothing else holds it)
    if "numpy" in streams and np_state is not None:
        out["numpy"] = numpy_saved(numpy_state.from_raw(np_state))
    return out


def put_cpu_raw(raw: tuple) -> None:
    """Put ``cpu_raw()``'s result back as it is."""
    random.setstate(python_state.from_raw(raw[0]))
    torch.set_rng_state(raw[1])
    if raw[2] is not None:
        sys.modules["numpy"].random.set_state(numpy_state.from_raw(raw[2]))


def same_cpu_state(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two states ``torch.get_rng_state()`` gave are equal: their bytes compared (``torch.equal``
    took 2.6 us, this 1.4: a one-off probe on the 2-vCPU development box)."""
    n = a.numel()
    if not (b.numel() == n and a.dtype == b.dtype == torch.uint8 and a.is_contiguous() and b.is_contiguous()
            and a.device.type == b.device.type == "cpu"):
        return torch.equal(a, b)
    return ctypes.string_at(a.data_ptr(), n) == ctypes.string_at(b.data_ptr(), n)


def cpu_bytes(t: torch.Tensor) -> torch.Tensor:
    """A generator state as ``set_state``/``set_rng_state`` take it: a CPU byte tensor of its own."""
    # A tensor of its own: set_state/set_rng_state read a view with a storage offset (a row of a stacked
    # table, epoch_gaps.py) from its storage's start and crashed the process.
    return t.detach().to(device="cpu", dtype=torch.uint8).clone(memory_format=torch.contiguous_format)
