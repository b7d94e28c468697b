"""The training script's own loop state: capture at a consistent point, put back at the same point.

Captured (docs/TRANSPARENCY.md "Loop state"): the globals of ``__main__`` and of every other script
module on the stack, and of the script's modules those reach (``_reached_modules``), the locals of
every script frame (``frames.user_frames``), the plain attributes of plain objects those reference (a
trainer's ``self.iter_num``), and the positions of the ``for``-loop iterators the frames are executing.
Only values of restorable kinds are kept (None, bool, int, float, str, bytes, tensors,
tuples/lists/dicts/sets/deques of them, ``torch.Generator``, ``random.Random``, NumPy arrays and
generators); nothing is pickled. The
result is a plain tree for pyckpt's own state format, with every tensor once in a table. An
``nn.Module`` no optimizer owns a parameter of (an EMA copy, a teacher) or a library object with
``load_state_dict()`` (an EMA helper) is kept by reference: its ``state_dict()`` goes with the
rank's state (``Capture.states``), not into the table.

With the tracked modules, the tree's ``modules`` holds their ``train()``/``eval()`` flags and the
attributes of their submodules of script classes and of torch's layers, and ``optimizers`` the
attributes of the tracked optimizers of script classes (``object_attrs``: values in the encoding below,
one budget of ``max_bytes`` for them all; plain objects they hold are followed through ``objects`` at
paths ``["m", root, submodule name, attribute, ...]`` and ``["o", optimizer, attribute, ...]``). A
module no optimizer owns without ``state_dict()`` entries (a loss function) is ``["ob", ...]`` of its
flag and settings (``object_attrs.stateless_members``), put back in place.

Restoring first checks that the script's stack has the same shape (same code objects, same
instruction in each frame, or a call whose continuation is provably the same: ``continuation``),
decodes and checks everything, and only then writes: a mismatch
raises ``PyckptError`` before anything changed (never a partial restore).

Values are encoded as small tagged lists: ``["v", scalar]``, ``["t", i, device, requires_grad]``,
``["l", [...]]`` list, ``["u", [...]]`` tuple, ``["d", [[k, v], ...]]`` dict, ``["s", [...]]`` set,
``["f", [...]]`` frozenset, ``["q", [...], maxlen]`` deque, ``["n", i, dtype]`` NumPy array (``"ns"``: scalar),
``["g", i, device]`` torch.Generator (no device: CPU), ``["r", state]`` random.Random, ``["ng", state]``
NumPy generator, ``["tq", n]`` a tqdm progress bar's count, ``["M", class qualname, ref]`` a module and
``["O", class qualname, ref]`` a library object whose ``state_dict()`` is saved with the rank's state under
``ref`` (``Capture.states``; loaded into the live object). A generator's state goes into the live generator
at the same place, inside containers too, or into a new one where the script holds none there yet. The tree's
``changed`` lists the variables the loop changed since its epoch's ``iter()`` (``changed_since``).

Values of the script's own classes (``_Encoder.struct``; members are ``[[name, value], ...]``):
``["nt", class qualname, members]`` a namedtuple (``typing.NamedTuple`` too), ``["dc", class qualname,
members]`` a frozen dataclass, ``["dd", class qualname, [[k, v], ...], members]`` a dict subclass (an
AttrDict: its items, then its attributes), ``["ob", class qualname, members]`` a plain object held
inside a container or another value (attributes of ``__dict__`` and ``__slots__``), ``["en", class
qualname, member name]`` an enum member. None of them names a class to look up: each is put back
through the live value at the same place, of the same class (``_Struct``): a namedtuple is
``type(live)._make``, a frozen dataclass ``dataclasses.replace(live, ...)`` (both rebound), a dict
subclass and an object are refilled in place; another class there refuses the resume, nothing there
(not bound yet at the restore point) leaves the variable out with a warning. A plain object held by
a variable or attribute (a slots class and a non-frozen dataclass too) is followed in place through
``objects`` (``{"at": path, "type": qualname, "attrs": {...}}``), as before. Checkpoints written
before these tags load unchanged (``VERSION`` 1)."""
from __future__ import annotations

import array
import collections
import copy
import dataclasses
import decimal
import enum
import fractions
import functools
import hashlib
import itertools
import os
import random
import sys
import types
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import carried, continuation, frames, hook_objects, numpy_state, object_attrs
from .errors import PyckptError
from .tree import flatten as _flatten_state

VERSION = 1
MAX_OBJECTS = 256  # plain objects followed per snapshot
MAX_DEPTH = 4  # object attribute nesting followed

_SCALARS = (type(None), bool, int, float, str, bytes)
# The standard library's number and buffer kinds a loop computes with (exact types only), by value:
# ``["cx", real, imag]``, ``["fr", numerator, denominator]``, ``["de", str]``, ``["ba", bytes]``,
# ``["aa", typecode, bytes]``. A bytearray or array is refilled in place on resume (``_assign``).
_STDLIB_VALUES: dict[type, Callable[[Any], list]] = {
    complex: lambda v: ["cx", v.real, v.imag],
    fractions.Fraction: lambda v: ["fr", v.numerator, v.denominator],
    decimal.Decimal: lambda v: ["de", str(v)],
    bytearray: lambda v: ["ba", bytes(v)],
    array.array: lambda v: ["aa", v.typecode, v.tobytes()],
}
_CONTAINERS = (list, tuple, dict, set, frozenset, collections.deque)
_SCALAR_SET = frozenset(_SCALARS)
_CONTAINER_SET = frozenset(_CONTAINERS)
_VALUE_SET = _SCALAR_SET | _CONTAINER_SET | {torch.Tensor}  # never an object followed in place (a quick test)


class _Skip(Exception):
    """A value that is not captured; ``warn``: the loop may depend on it (said once, by name)."""

    def __init__(self, why: str, warn: bool) -> None:
        super().__init__(why)
        self.why, self.warn = why, warn


@dataclass
class Capture:
    """One capture: the tree to store, and what was left out (name -> reason)."""

    tree: dict
    warnings: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    # The state_dict() of each module or library object the tree refers to (["M"/"O", class, ref]),
    # by ref: saved with the rank's state itself, not copied into the loop state (any size, lazily).
    states: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- classification

_SILENT_TYPES: tuple[type, ...] = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType,
                                   types.MethodType, type, torch.device, torch.dtype, torch.nn.Module,
                                   torch.optim.Optimizer, staticmethod, classmethod, property,
                                   types.CodeType, types.FrameType, types.TracebackType)


@functools.lru_cache(maxsize=1)
def _silent_kinds() -> tuple[type, ...]:
    from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
    from torch.utils.data import DataLoader, Dataset, Sampler
    from torch.utils.data.dataloader import _BaseDataLoaderIter

    return _SILENT_TYPES + (LRScheduler, ReduceLROnPlateau, DataLoader, Dataset, Sampler, _BaseDataLoaderIter,
                            torch.amp.GradScaler)


@functools.lru_cache(maxsize=1)
def _wrappers() -> tuple[type, ...]:
    """Standard-library objects whose state is their attributes: argparse/SimpleNamespace, and
    UserDict/UserList/UserString/ChainMap, which training loops use for running metrics and layered
    settings (a wrapper's ``data``/``maps`` is refilled in place like a plain object's attribute)."""
    import argparse

    return (argparse.Namespace, types.SimpleNamespace, collections.UserDict, collections.UserList,
            collections.UserString, collections.ChainMap)


_script_class = frames.is_script_class


@functools.lru_cache(maxsize=512)
def _slot_names(t: type) -> tuple[str, ...] | None:
    """The attribute names the ``__slots__`` of ``t`` and its bases declare (private names mangled), or
    None when no class of its MRO declares ``__slots__``."""
    names: list[str] = []
    declared = False
    for c in t.__mro__:
        s = c.__dict__.get("__slots__")
        if s is None:
            continue
        declared = True
        for n in ([s] if isinstance(s, str) else list(s)):
            if not isinstance(n, str) or n in ("__dict__", "__weakref__"):
                continue
            if n.startswith("__") and not n.endswith("__"):
                n = f"_{c.__name__.lstrip('_')}{n}"
            if n not in names:
                names.append(n)
    return tuple(names) if declared else None


def _instance_dict(obj: Any) -> dict | None:
    """``obj.__dict__``, or None (read without the class's ``__getattr__``: an AttrDict's raises KeyError)."""
    try:
        d = object.__getattribute__(obj, "__dict__")
    except AttributeError:
        return None
    return d if isinstance(d, dict) else None


def _attrs(obj: Any) -> dict:
    """An object's own attributes: its ``__dict__`` and the ``__slots__`` that are set (read with the
    slot descriptors: no ``__getattr__`` of the class runs)."""
    d = _instance_dict(obj)
    out = dict(d) if d is not None else {}
    for n in _slot_names(type(obj)) or ():
        try:
            out[n] = object.__getattribute__(obj, n)
        except AttributeError:  # an unset slot
            pass
    return out


_CELL = "<cell>"  # a path segment: the closure cell of that free variable name (``_cells``)


def _cells(fn: Any) -> dict:
    """The filled closure cells of a function, by ``<cell>`` + free variable name."""
    out = {}
    for var, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        try:
            out[_CELL + var] = cell.cell_contents
        except ValueError:  # not bound yet
            pass
    return out


def _script_closure(v: Any) -> bool:
    """A function of the script with closure cells (a train step a factory made, ``nonlocal calls``):
    its cells are followed like a plain object's attributes."""
    return (type(v) is types.FunctionType and bool(v.__closure__)
            and frames.is_user_file(v.__code__.co_filename))


_DEFAULT = "<default>"  # a path segment: the default argument at that position (``_fn_values``)


def _fn_values(fn: types.FunctionType) -> dict:
    """A function's own values besides its closure: its attributes (``fn.calls += 1``) and its default arguments
    that are containers (``def smooth(x, hist=[])``), by ``<default>`` + position."""
    out = {k: v for k, v in _attrs(fn).items() if not k.startswith("__")}  # (not functools.wraps' __wrapped__)
    for i, d in enumerate(fn.__defaults__ or ()):
        if type(d) in (list, dict, set, collections.deque):
            out[f"{_DEFAULT}{i}"] = d
    return out


def _class_values(cls: type) -> dict:
    """A class's own data attributes (``Net.temperature *= 0.98``): not its methods, properties or other
    descriptors, nested classes or dunder names; nothing of an enum (its members are class attributes)."""
    if issubclass(cls, enum.Enum):
        return {}
    return {k: v for k, v in vars(cls).items() if not k.startswith("__") and not hasattr(type(v), "__get__")
            and not isinstance(v, (type, types.ModuleType))}


# function or class -> (what its answer depends on, _stateful_code's answer): weak, so a freed one's entry goes
_CODE_MEMO: "weakref.WeakKeyDictionary[Any, tuple[tuple, bool]]" = weakref.WeakKeyDictionary()


def _stateful_code(v: Any) -> bool:
    """A function or class of the script holding values a loop may change (``_fn_values``, ``_class_values``):
    followed like a plain object. Worked out again when the number of its attributes (or its defaults) change."""
    if type(v) is types.FunctionType:
        d = _instance_dict(v)
        token = (len(d) if d is not None else 0, id(v.__defaults__))
    elif isinstance(v, type):
        token = (len(vars(v)),)
    else:
        return False
    try:
        known = _CODE_MEMO.get(v)
    except TypeError:  # (a class that cannot be weakly referenced or hashed)
        known = None
    if known is not None and known[0] == token:
        return known[1]
    if type(v) is types.FunctionType:
        answer = frames.is_user_file(v.__code__.co_filename) and bool(_fn_values(v))
    else:
        answer = _script_class(v) and bool(_class_values(v))
    try:
        _CODE_MEMO[v] = (token, answer)
    except TypeError:
        pass
    return answer


def _followed(obj: Any) -> dict:
    """What is followed of an object held in place: a function's closure cells and own values, a class's data
    attributes, any other object's attributes."""
    if type(obj) is types.FunctionType:
        return {**_cells(obj), **_fn_values(obj)}
    if isinstance(obj, type):
        return _class_values(obj)
    return _attrs(obj)


def _code_not_state(v: Any) -> bool:
    """A module, class or function (not a closure of the script's, ``_script_closure``, nor one holding values,
    ``_stateful_code``): code, never loop state."""
    return isinstance(v, (types.ModuleType, types.FunctionType, type, types.BuiltinFunctionType)) and not (
        _script_closure(v) or _stateful_code(v))


def _module_globals(user: list[types.FrameType], modname: Any, imported: bool = False) -> dict | None:
    """The globals of module ``modname`` as a frame on the stack sees them (``imported``: else the loaded
    module's), or None."""
    g = next((f.f_globals for f in user if f.f_globals.get("__name__") == modname), None)
    if g is None and imported:
        mod = sys.modules.get(modname) if isinstance(modname, str) else None
        g = mod.__dict__ if mod is not None else None
    return g


_REACHED_MAX = 16  # script modules whose globals are kept besides those on the stack
_MIN_ITEM_BYTES = 16  # the least an element of a container adds to a value's size (sys.getsizeof(None))


_REACHED_MEMO: list = [None, []]  # [what the last answer depends on, that answer]


def _reached_modules(sources: list[dict]) -> list[dict]:
    """The globals of the script's own modules (files of the script, not installed packages) that the modules
    of ``sources`` reach through their globals, breadth-first, at most ``_REACHED_MAX``: ``import settings``,
    ``from helpers import f``, a class or an object of theirs. A setting such a module keeps and the loop changes
    (``settings.SCALE *= 0.97``, a call counter behind ``f``) is loop state, though no frame of it is running.
    Looked for again when a module's number of globals changes (an import binds a name)."""
    token = tuple((id(g), len(g)) for g in sources)
    if _REACHED_MEMO[0] == token and all(len(g) == n for g, n in _REACHED_MEMO[1]):
        return [g for g, _ in _REACHED_MEMO[1]]
    out = _walk_modules(sources)
    _REACHED_MEMO[:] = [token, [(g, len(g)) for g in out]]
    return out


def _walk_modules(sources: list[dict]) -> list[dict]:
    """``_reached_modules``' breadth-first walk."""
    names = {g.get("__name__") for g in sources}
    out: list[dict] = []
    queue = list(sources)
    while queue and len(out) < _REACHED_MAX:
        for v in list(queue.pop(0).values()):
            if isinstance(v, types.ModuleType):
                mod = v
            else:
                owner = v if isinstance(v, (types.FunctionType, type)) else type(v)
                mod = sys.modules.get(getattr(owner, "__module__", None) or "")
            name = getattr(mod, "__name__", None)
            if mod is None or name in names or not isinstance(name, str):
                continue
            f = getattr(mod, "__file__", None)
            names.add(name)
            if isinstance(f, str) and frames.is_user_file(f):
                out.append(mod.__dict__)
                queue.append(mod.__dict__)
                if len(out) >= _REACHED_MAX:
                    break
    return out


_DIGESTS: dict[str, tuple[tuple[int, int], str]] = {}  # module file -> ((mtime_ns, size), digest of its text)


def _file_digest(path: Any) -> str:
    """A digest of a module's file (cached while its time and size stay), "" when it cannot be read: a reached
    module's variables go back only into the same text of it (an edited setting is the relaunch's)."""
    try:
        st = os.stat(path)
        key = (st.st_mtime_ns, st.st_size)
        known = _DIGESTS.get(path)
        if known is not None and known[0] == key:
            return known[1]
        with open(path, "rb") as f:
            digest = hashlib.blake2b(f.read(), digest_size=12).hexdigest()
    except (OSError, TypeError, ValueError):
        return ""
    _DIGESTS[path] = (key, digest)
    return digest


def _frozen_dataclass(t: type) -> bool:
    params = getattr(t, "__dataclass_params__", None)
    return params is not None and bool(getattr(params, "frozen", False)) and isinstance(
        getattr(t, "__dataclass_fields__", None), dict)


def _namedtuple(t: type) -> bool:
    return issubclass(t, tuple) and isinstance(getattr(t, "_fields", None), tuple) and callable(getattr(t, "_make", None))


def _plain_object(v: Any) -> bool:
    """A plain object whose attributes are followed in place: an instance of a script class with a
    ``__dict__`` or ``__slots__`` (a dataclass too, unless frozen), argparse/SimpleNamespace and the
    standard library's wrappers of a container (``_wrappers``: their ``data`` or ``maps``). A script
    subclass of a container (a namedtuple, an ``AttrDict(dict)``) and a frozen dataclass are values
    (``_Encoder.struct``), not plain objects: their items or fields are what changes."""
    t = type(v)
    if t in _wrappers():
        return True
    if isinstance(v, _silent_kinds()) or isinstance(v, (type, enum.Enum)) or isinstance(v, _CONTAINERS):
        return False
    if _instance_dict(v) is None and _slot_names(t) is None:
        return False
    if _frozen_dataclass(t):
        return False  # immutable: rebound by the script, so restored as a value ("dc")
    return _script_class(t)


def _bar_count(v: Any) -> int | float | None:
    """The count of a tqdm progress bar (``tqdm.std.tqdm``, and its notebook, rich and auto kinds), or None
    for anything else. Its other attributes (file, lock, timings) are the relaunch's."""
    std = sys.modules.get("tqdm.std")
    if std is None or not isinstance(v, std.tqdm):
        return None
    n = getattr(v, "n", None)
    return n if type(n) in (int, float) and 0 <= n < float("inf") else None


def _stateful(v: Any) -> bool:
    """A library object with ``state_dict()`` and ``load_state_dict()`` that pyckpt does not restore
    elsewhere (optimizers, schedulers, scalers and loaders are) and that is not iterable (a loader
    wrapper, whose position pyckpt's fast-forward sets, would be positioned twice)."""
    t = type(v)
    return (callable(getattr(t, "state_dict", None)) and callable(getattr(t, "load_state_dict", None))
            and not hasattr(t, "__iter__") and not isinstance(v, type) and not isinstance(v, _silent_kinds()))


def _savable(state: Any, why: str) -> None:
    """Raise ``_Skip`` (``why`` with the reason) unless the rank's state can hold ``state``: checked here,
    or the snapshot would fail at every step point."""
    try:
        _flatten_state(state)
    except PyckptError as e:
        raise _Skip(why.format(e), True) from None


def _holds_tensor(v: Any, depth: int = 0) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    if depth < 4 and isinstance(v, (list, tuple, dict)):
        return any(_holds_tensor(x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return False


def _is_iterator(v: Any) -> bool:
    return hasattr(type(v), "__next__")


# ----------------------------------------------------------------------------- capture

class _Encoder:
    def __init__(self, max_bytes: int, tracked: "_Tracked") -> None:
        self.tensors: list[torch.Tensor] = []
        self._tid: dict[int, int] = {}
        self._nid: dict[int, list] = {}  # id of a NumPy array -> its entry (held by the script, ids stable)
        self.max_bytes = max_bytes
        self.module_tensors = tracked.tensors  # data_ptrs of module parameters/buffers (restored there)
        self.tracked_modules = tracked.modules  # ids of the modules pyckpt restores elsewhere
        self.states: dict[str, Any] = {}  # ref -> state_dict() of a module or object saved by reference
        self._refs: dict[int, tuple[Any, list]] = {}  # id -> (the object, kept alive; its encoding)
        self.name = ""  # the variable being encoded (a reference is named after it)
        self.nested: list[bool] = []  # modules/objects met inside a container: True for one with state
        self.size = 0
        self.limit = max_bytes  # where the variable being encoded stops (begin() moves it)
        self._active: set[int] = set()  # ids of the script objects being encoded (a back-reference is left out)
        self.running: set[int] = set()  # ids of the frames captured (a generator running there is positioned)
        # ids of the iterators those frames' for loops (and their generators' loops) are running: a variable
        # holding one (a generator expression's ``.0``, ``it = zip(a, b)`` then ``for x in it``) is the loop's
        self.loop_iterators: set[int] = set()
        self.sequences: list[int] = []  # ids of the lists and tuples encoded (held by a variable that is saved)
        self.storages: set[int] = set()  # storage addresses of the script's tensors encoded (put back in place)
        self._seq_mark = 0

    def begin(self) -> tuple[int, int]:
        """Start one variable: its own budget of ``max_bytes``; returns what ``rollback`` needs."""
        self.limit = self.size + self.max_bytes
        self.nested = []
        self._seq_mark = len(self.sequences)
        return self.size, len(self.tensors)

    def rollback(self, mark: tuple[int, int]) -> None:
        """Forget a variable that was left out part-way (its size and the tensors it had added)."""
        self._truncate(mark)
        del self.sequences[self._seq_mark:]
        self.nested = []
        self._active = set()

    def _truncate(self, mark: tuple[int, int]) -> None:
        self.size, n = mark
        if len(self.tensors) > n:
            del self.tensors[n:]
            self._tid = {k: i for k, i in self._tid.items() if i < n}
            self._nid = {k: e for k, e in self._nid.items() if e[1] < n}

    def _grow(self, n: int) -> None:
        # Python objects count their in-memory size (sys.getsizeof: a list its header and slots, an
        # int 28 bytes), so a list of a million small lists is over the cap, and the walk stops there
        # instead of encoding (and flattening, and writing) every element at every snapshot.
        self.size += n
        if self.size > self.limit:  # (inline: called for every value encoded)
            self._over()

    def _room(self, n: int) -> None:
        """Raise if ``n`` more bytes would be over the cap (``_grow`` without growing)."""
        if self.size + n > self.limit:
            self._over()

    def _over(self) -> None:
        raise _Skip(f"over PYCKPT_LOOP_STATE_MAX_BYTES={self.max_bytes} (Python objects counted "
                    f"by their in-memory size)", True)

    def value(self, v: Any, depth: int = 0) -> list:
        t = type(v)
        if depth > 32:
            raise _Skip("nested too deeply", True)
        if t in _SCALARS:
            self._grow(sys.getsizeof(v))
            return ["v", v]
        if isinstance(v, torch.Tensor):
            return self.tensor(v)
        if t in _CONTAINER_SET or isinstance(v, dict):
            self._grow(sys.getsizeof(v))
            # Every element counts 16 bytes at least (None's size): a container over the cap by its length alone
            # is left out before its elements are walked (a module's list of a million file names, every snapshot).
            self._room(_MIN_ITEM_BYTES * len(v) * (2 if isinstance(v, dict) else 1))
        if t is list or t is tuple:
            self.sequences.append(id(v))
            return ["l" if t is list else "u", self._items(v, depth + 1)]
        if isinstance(v, dict) and (t is dict or t.__module__ == "collections"):
            return ["d", self._pairs(v, depth + 1)]
        if t in (set, frozenset):
            return ["s" if t is set else "f", self._items(v, depth + 1)]
        if t is collections.deque:
            return ["q", self._items(v, depth + 1), v.maxlen]
        if t is torch.device or t is torch.dtype:
            return ["x", v]  # the state format stores both
        if t in _STDLIB_VALUES:
            self._grow(sys.getsizeof(v))
            return _STDLIB_VALUES[t](v)
        if isinstance(v, torch.Generator):
            return ["g", self.add_tensor(v.get_state()), str(v.device)]  # the device: to make one anew
        if t is random.Random:
            ver, words, gauss = v.getstate()
            return ["r", [ver, self.add_tensor(torch.tensor(words, dtype=torch.int64)), gauss]]
        np = sys.modules.get("numpy")
        if np is not None:
            if isinstance(v, (np.ndarray, np.generic)):  # a scalar keeps its dtype: np.float32 math is not float's
                return self.numpy(v, np)
            if isinstance(v, np.random.Generator):
                return ["ng", self.value(v.bit_generator.state, depth + 1)]
            if isinstance(v, np.random.RandomState):
                name, keys, pos, has_gauss, gauss = numpy_state.get_state(v)
                return ["nr", [str(name), self.add_tensor(torch.from_numpy(keys.astype(np.int64))), int(pos),
                               int(has_gauss), float(gauss)]]
        if isinstance(v, enum.Enum) and _script_class(t) and t.__members__.get(v.name) is v:  # not a Flag combination
            self._grow(sys.getsizeof(v.name))
            return ["en", t.__qualname__, v.name]  # a member of the live value's enum class on resume
        if isinstance(v, (float, int)) and not isinstance(v, (bool, enum.Enum)):  # numpy float64 is a float
            return ["v", float(v) if isinstance(v, float) else int(v)]
        if isinstance(v, torch.nn.Module):
            return self.module(v, depth)
        if t is itertools.cycle and id(v) not in self.loop_iterators and (cyc := _cycle_state(v)) is not None:
            # ``it = itertools.cycle(loader)`` drawn with next(it): the batches it keeps, with its place
            items, phase, index = cyc
            return ["cy", phase, [self.value(x, depth + 1) for x in items], index]
        if (n := _bar_count(v)) is not None:  # a tqdm bar: where it is at, so its display goes on from there
            return ["tq", n]
        if _stateful(v):
            return self.stateful(v, depth)
        out = self.struct(v, depth)
        if out is not None:
            return out
        raise self.skip(v)

    def _items(self, v: Any, depth: int) -> list:
        """``value`` of each element of ``v`` at ``depth``. Scalars, most elements of a loop's lists, are encoded
        here rather than by a call each (a capture runs at every snapshot), and the cap checked after them."""
        if depth > 32 and len(v):
            raise _Skip("nested too deeply", True)
        out: list = []
        add = out.append
        size = self.size
        for x in v:
            if type(x) in _SCALAR_SET:
                size += sys.getsizeof(x)
                add(["v", x])
            else:
                self.size = size
                add(self.value(x, depth))
                size = self.size
        self._grow(size - self.size)
        return out

    def _pairs(self, v: dict, depth: int) -> list:
        """``[[key, value], ...]`` of a dict, each encoded by ``value`` at ``depth`` (scalars here, as ``_items``)."""
        if depth > 32 and len(v):
            raise _Skip("nested too deeply", True)
        out: list = []
        add = out.append
        size = self.size
        for k, x in v.items():
            if type(k) in _SCALAR_SET:
                size += sys.getsizeof(k)
                ek = ["v", k]
            else:
                self.size = size
                ek = self.value(k, depth)
                size = self.size
            if type(x) in _SCALAR_SET:
                size += sys.getsizeof(x)
                add([ek, ["v", x]])
            else:
                self.size = size
                add([ek, self.value(x, depth)])
                size = self.size
        self._grow(size - self.size)
        return out

    def struct(self, v: Any, depth: int) -> list | None:
        """A value of a script class (``_script_class``) that is not a plain object followed in place at
        the top (``capture``): ``["nt", class, members]`` a namedtuple and ``["dc", class, members]`` a
        frozen dataclass, rebuilt on resume from the live value at the same place; ``["dd", class, items,
        members]`` a dict subclass (an AttrDict) and ``["ob", class, members]`` a plain object inside a
        container or another value, refilled in place there. None: none of those. Members are
        ``[[name, value], ...]``; one that pyckpt restores elsewhere or that is stateless (a model, an
        optimizer, a back-reference) is left out and keeps the live value."""
        t = type(v)
        namespace = _plain_object(v) and not _script_class(t)  # argparse/SimpleNamespace in a container
        if not (_script_class(t) or namespace):
            return None
        q = t.__qualname__
        if id(v) in self._active:  # a back-reference: the live object at that place refers back the same way
            raise _Skip(f"a {q} that refers back to an object holding it", False)
        self._active.add(id(v))
        try:
            if _namedtuple(t):
                self._grow(sys.getsizeof(v))
                vals = [tuple.__getitem__(v, i) for i in range(min(tuple.__len__(v), len(t._fields)))]
                return ["nt", q, self.members(dict(zip(t._fields, vals)), depth)]
            if isinstance(v, dict):  # grown by value() already
                items = [[self.value(k, depth + 1), self.value(x, depth + 1)] for k, x in dict.items(v)]
                return ["dd", q, items, self.members(_attrs(v), depth)]
            if _frozen_dataclass(t):
                self._grow(sys.getsizeof(v))
                vals = {}
                for f in dataclasses.fields(v):
                    try:
                        vals[f.name] = object.__getattribute__(v, f.name)
                    except AttributeError:
                        pass
                return ["dc", q, self.members(vals, depth)]
            if _plain_object(v):
                self._grow(sys.getsizeof(v))
                return ["ob", q, self.members(_attrs(v), depth)]
            return None
        finally:
            self._active.discard(id(v))

    def members(self, values: dict, depth: int) -> list:
        """``[[name, encoded], ...]`` of a struct's fields or attributes (``struct``); a member left out
        quietly (``_Skip`` without ``warn``, a module restored with the model) is not listed."""
        out = []
        for name, x in values.items():
            if not isinstance(name, str) or name.startswith("__"):
                continue
            mark, n = (self.size, len(self.tensors)), len(self.nested)
            try:
                e = self.value(x, depth + 1)
            except _Skip as s:
                if s.warn:
                    raise
                self._truncate(mark)
                continue
            if e == ["k"] and not any(self.nested[n:]):  # a module pyckpt restores with the model
                del self.nested[n:]
                continue
            out.append([name, e])
        return out

    def stateful(self, v: Any, depth: int) -> list:
        """A library object with ``state_dict()``/``load_state_dict()`` pyckpt does not track whose state
        holds tensors (an EMA helper such as diffusers' ``EMAModel``): saved by reference (``reference``),
        loaded into the live object on resume. One whose state holds no tensor (a scheduler or callback
        wrapper of a library) is left to that library, as before."""
        if id(v) in self.tracked_modules:  # registered
            if depth:
                self.nested.append(False)
                return ["k"]
            raise _Skip("saved by pyckpt.register", False)
        if id(v) in self._refs and not depth:
            return self._refs[id(v)][1]
        what = f"a {type(v).__module__}.{type(v).__qualname__} with state_dict()"
        try:
            sd = v.state_dict()
        except Exception:  # not the state_dict() of the convention (arguments needed): not a helper's
            raise self.skip(v) from None
        if not _holds_tensor(sd):
            raise _Skip(f"{what} without tensors: left to its library", False)
        if depth:
            self.nested.append(True)
            return ["k"]
        _savable(sd, f"{what}, not savable ({{}}); pyckpt.register it with getter= and setter=")
        return self.reference("O", v, sd)

    def module(self, v: torch.nn.Module, depth: int) -> list:
        """A module pyckpt does not restore with the model (it owns no optimizer parameter: an EMA
        copy, a teacher, a target network): saved by reference (``reference``), loaded into the live
        module found at the same place on resume. Entries sharing memory with the model's tensors are
        left to the model. Inside a container (which a restore rebuilds around new objects) a module
        is only noted."""
        tracked = id(v) in self.tracked_modules
        if depth:
            self.nested.append(not tracked and self._own_state(v))
            return ["k"]
        if tracked:
            raise _Skip("an nn.Module restored by pyckpt with the model", False)
        if id(v) in self._refs:
            return self._refs[id(v)][1]
        what = f"an nn.Module ({type(v).__qualname__}) that owns no optimizer parameter"
        try:
            sd = v.state_dict()
        except Exception as e:  # cannot be saved: said, not hidden
            raise _Skip(f"{what}, whose state_dict() failed ({type(e).__name__}: {e}); pyckpt.register it",
                        True) from None
        own = self._own_entries(sd)
        if not own:  # a loss function: its flag and settings (label_smoothing set at some step), in place
            members = object_attrs.stateless_members(v, _script_class, _attrs)
            self._grow(sys.getsizeof(v))
            return ["ob", type(v).__qualname__, self.members(members, depth)]
        if any(not isinstance(x, torch.Tensor) for x in own.values()):  # get_extra_state()
            _savable(own, f"{what}, not savable ({{}}); pyckpt.register it")
        return self.reference("M", v, own)

    def reference(self, tag: str, v: Any, state: Any) -> list:
        """``[tag, class, ref]``: ``state`` goes into ``states[ref]``, saved with the rank's state (copied
        lazily like the model's, written incrementally, of any size), not into the loop state."""
        ref, n = self.name, 1
        while ref in self.states:
            n += 1
            ref = f"{self.name} #{n}"
        self.states[ref] = state
        out = [tag, type(v).__qualname__, ref]
        self._refs[id(v)] = (v, out)
        return out

    def _own_entries(self, sd: dict) -> dict:
        """The entries of a module's state_dict() that are not the tracked modules' tensors."""
        own = {}
        for key, x in sd.items():
            if isinstance(x, torch.Tensor):
                try:
                    if x.untyped_storage().data_ptr() in self.module_tensors:
                        continue  # the model's (a tied weight): restored with it
                except (RuntimeError, NotImplementedError):
                    continue  # no storage: nothing to save
            own[key] = x
        return own

    def _own_state(self, v: torch.nn.Module) -> bool:
        """Whether ``v`` holds state besides the tracked modules' tensors (a failing state_dict(): yes)."""
        try:
            return bool(self._own_entries(v.state_dict()))
        except Exception:
            return True

    def skip(self, v: Any) -> _Skip:
        t = type(v)
        name = f"{t.__module__}.{t.__qualname__}"
        if isinstance(v, types.GeneratorType) and v.gi_frame is None:  # run to its end: model.parameters()
            return _Skip(f"a finished generator ({v.__qualname__}): nothing to restore", False)  # an optimizer took
        if id(v) in self.loop_iterators:  # the loop's position is captured (or said) with the loop's
            return _Skip(f"the iterator of a running for loop ({name}): positioned with that loop", False)
        if isinstance(v, types.GeneratorType) and id(v.gi_frame) in self.running:
            # The snapshot point is inside it (``batch = next(batches)`` of a ``cycle(loader)`` stream): it is
            # positioned through its frame on the stack, and the variable keeps the relaunch's generator.
            return _Skip(f"a generator ({v.__qualname__}) running on the stack: positioned through its frame", False)
        if isinstance(v, (types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType)):
            return _Skip(f"a generator ({getattr(v, '__qualname__', name)}) whose position cannot be restored", True)
        if isinstance(v, _silent_kinds()):
            return _Skip(f"{name}: restored by pyckpt elsewhere or stateless", False)
        if _is_iterator(v) and not hasattr(v, "read"):  # file objects are iterators too
            return _Skip(f"an iterator ({name}) whose position cannot be restored", True)
        if _script_class(t):  # the script's own kind: it may hold loop state, so said
            return _Skip(f"a {t.__qualname__} (a class of the script) is not a restorable kind", True)
        return _Skip(f"{name} is not a restorable kind", False)

    def tensor(self, v: torch.Tensor) -> list:
        if type(v) is not torch.Tensor and isinstance(v, torch.nn.Parameter):  # (Parameter's isinstance is slow)
            raise _Skip("a parameter (restored with its module)", False)
        try:
            ptr = v.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            raise _Skip("a tensor without storage", False) from None
        if ptr and ptr in self.module_tensors:
            raise _Skip("shares memory with a module's parameters or buffers or an optimizer's parameters "
                        "(restored there)", False)
        nbytes = v.numel() * v.element_size()
        if nbytes > self.max_bytes:
            raise _Skip(f"a tensor of {nbytes} bytes, over PYCKPT_LOOP_STATE_MAX_BYTES={self.max_bytes}",
                        v._version > 0)  # never changed in place: the relaunch makes it again
        out = ["t", self.add_tensor(v, shared=True), str(v.device), bool(v.requires_grad)]
        try:  # a whole storage of its own is written back in place (_fits): views of it see the checkpoint's
            st = v.untyped_storage()
            if v._base is None and v.storage_offset() == 0 and st.nbytes() == v.numel() * v.element_size():
                self.storages.add(st.data_ptr())
        except (RuntimeError, NotImplementedError):
            pass
        return out

    def add_tensor(self, v: torch.Tensor, shared: bool = False) -> int:
        """Index of a copy of ``v`` in the tensor table; ``shared``: the script's own tensor, stored once
        however often it is referenced (a temporary's id may be reused, so only those are memoised)."""
        if shared and id(v) in self._tid:
            return self._tid[id(v)]
        nbytes = v.numel() * v.element_size()
        if self.size + nbytes > self.limit:  # before copying: the variable is left out anyway
            raise _Skip(f"over PYCKPT_LOOP_STATE_MAX_BYTES={self.max_bytes} with its tensors", True)
        self.tensors.append(v.detach().clone())  # the script may change it in place after this point
        self.size += nbytes
        if shared:
            self._tid[id(v)] = len(self.tensors) - 1
        return len(self.tensors) - 1

    def numpy(self, v: Any, np: Any) -> list:
        """A NumPy array (``["n", ...]``) or scalar (``["ns", ...]``) by its bytes and dtype."""
        scalar = isinstance(v, np.generic)
        what = "scalar" if scalar else "array"
        if not scalar and id(v) in self._nid:  # one array held in several places: stored (and restored) once
            return self._nid[id(v)]
        if v.nbytes > self.max_bytes:
            raise _Skip(f"a NumPy {what} of {v.nbytes} bytes, over PYCKPT_LOOP_STATE_MAX_BYTES", True)
        a = np.asarray(v)
        try:
            if not (a.dtype.isnative and a.flags.writeable and a.flags.c_contiguous):  # what torch wraps as it is
                a = a.astype(a.dtype.newbyteorder("="), order="C", copy=True)
            t = torch.from_numpy(a)
        except TypeError:
            raise _Skip(f"a NumPy {what} of dtype {v.dtype}", True) from None
        entry = ["ns" if scalar else "n", self.add_tensor(t), str(a.dtype)]
        if not scalar:
            self._nid[id(v)] = entry
        return entry


@dataclass
class _Tracked:
    """What pyckpt restores elsewhere: storage addresses of the tracked modules' tensors, and the ids
    of those modules, their submodules and the registered objects."""

    tensors: set[int]
    modules: set[int]


def _tracked(modules: list, registered: list, loose: list = ()) -> _Tracked:
    """Storage addresses of the modules' parameters and buffers, and the ids of the modules, their
    submodules and ``registered``. Read from each submodule's own ``_parameters``/``_buffers`` (what
    ``parameters()``/``buffers()`` walk, without making a name per tensor): this runs at every
    snapshot, over every tensor of the model."""
    tensors: list = []
    ids = {id(r) for r in registered}
    for m in modules:
        for sub in m.modules():
            ids.add(id(sub))
            tensors += sub._parameters.values()
            tensors += sub._buffers.values()
    tensors += loose  # optimizer parameters outside modules: restored in place with the optimizers
    out = set()
    for t in tensors:
        if t is None:
            continue
        try:
            out.add(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):
            pass
    return _Tracked(out, ids)


def stack_signature(user: list[types.FrameType], point: str) -> list:
    """What the relaunch must match: the point kind and each script frame's code and instruction."""
    return [point] + [[*frames.code_key(f.f_code), frames.position(f)] for f in user]


def capture(user: list[types.FrameType], point: str, max_bytes: int, modules: list,
            registered: list = (), loose: list = (), optimizers: list = (), schedulers: list = ()) -> Capture:
    """The loop state of the script frames ``user`` (outermost first) at a ``point`` ("loader",
    "step" or "backward"). ``modules``: the tracked root modules; ``registered``: objects saved
    through ``pyckpt.register``; ``loose``: optimizer parameters outside modules (none of them is
    saved again here: a variable naming one keeps the live tensor, which is restored in place);
    ``optimizers``: the tracked optimizers (the attributes of those of script classes, ``object_attrs``);
    ``schedulers``: the tracked LR schedulers (a ``LambdaLR``'s closures, ``hook_objects``)."""
    if max_bytes <= 0:  # turned off: the stack only, so a step-point checkpoint still resumes where it was
        cap = Capture({"version": VERSION, "stack": stack_signature(user, point),
                       "argv": [str(a) for a in sys.argv[1:]], "globals": {}, "locals": [{} for _ in user],
                       "objects": [], "iters": [None for _ in user], "tensors": []})
        cap.warnings["variables"] = "not captured (PYCKPT_LOOP_STATE_MAX_BYTES=0)"
        return cap
    enc = _Encoder(max_bytes, _tracked(modules, list(registered), list(loose)))
    enc.running = {id(f) for f in user}
    frame_iterators = [frames.loop_iterators(f) for f in user]  # (read once: the stack walk is not free)
    enc.loop_iterators = _nested_iterators([it for its in frame_iterators for it in its or ()])
    cap = Capture({})
    objects: list[tuple[Any, list]] = []  # (object, path)
    seen: set[int] = set()

    main = sys.modules.get("__main__")
    exclude = getattr(main, "__pyckpt_exclude__", ()) if main is not None else ()
    exclude = set(exclude) if isinstance(exclude, (list, tuple, set, frozenset)) else set()
    quiet_modules: set[str] = set()  # modules only reached (``_reached_modules``): what they hold unkept is not said

    def keep(name: str, v: Any, path: list, quiet: bool = False, limit: int | None = None) -> list | None:
        """The encoded value, or None (left out: warned, or listed for debug when ``quiet``). ``limit``: where
        a budget shared with other values ends (``enc.size``), besides the value's own cap."""
        if path[0] == "g" and path[1] in quiet_modules:
            quiet = True  # (a reached module's value that cannot be kept was never kept before, nor said: noise)
        warned = cap.skipped if quiet else cap.warnings
        if path[-1] in exclude:  # the script's own opt-out: __pyckpt_exclude__ = {"name", ...}
            cap.skipped[name] = "listed in __pyckpt_exclude__"
            return None
        if type(v) not in _VALUE_SET and (_plain_object(v) or _script_closure(v) or _stateful_code(v)):
            if path[0] != "gen" and id(v) not in seen:  # not via generators
                if len(objects) < MAX_OBJECTS:
                    seen.add(id(v))
                    objects.append((v, path))
                elif "plain objects" not in cap.warnings:  # the first one left out, and the rest
                    cap.warnings["plain objects"] = (f"more than {MAX_OBJECTS} objects of the script's classes: {name} "
                                                     "and the ones after it are not followed")
            return None
        mark = enc.begin()
        if limit is not None:
            enc.limit = min(enc.limit, limit)
        enc.name = name
        try:
            out = enc.value(v)
        except _Skip as s:
            enc.rollback(mark)
            (warned if s.warn else cap.skipped)[name] = _shared(s.why, max_bytes, limit)
            return None
        if enc.nested:  # modules or EMA helpers inside a container (see _Encoder.module): left out
            stateful = any(enc.nested)
            enc.rollback(mark)
            if stateful:
                warned[name] = ("holds a module or EMA helper that no optimizer owns (an EMA copy, a teacher?) in "
                                "a container; keep it in a variable or attribute of its own, or pyckpt.register it")
            else:
                cap.skipped[name] = "holds nn.Modules restored by pyckpt with the model"
            return None
        size = enc.size - mark[0]
        if size > max_bytes or (limit is not None and enc.size > limit):  # several tensors, each under the cap
            enc.rollback(mark)
            warned[name] = f"{size} bytes, over PYCKPT_LOOP_STATE_MAX_BYTES={max_bytes}" + (
                " with the model's other attributes" if limit is not None else "")
            return None
        return out

    modules_seen: dict[str, dict] = {}
    gl: dict[str, dict] = {}
    glob_sources = ([main.__dict__] if main is not None else []) + [f.f_globals for f in user]
    reached = _reached_modules(glob_sources)
    quiet_modules.update(g["__name__"] for g in reached)
    for g in glob_sources + reached:
        modname = g.get("__name__")
        if not isinstance(modname, str) or modname in modules_seen:
            continue
        modules_seen[modname] = g
        out = gl[modname] = {}
        for name, v in list(g.items()):
            if name.startswith("__") and name.endswith("__"):
                continue
            if _code_not_state(v):
                continue
            e = keep(f"{name}" if modname == "__main__" else f"{modname}.{name}", v, ["g", modname, name])
            if e is not None:
                out[name] = e
    loc: list[dict] = []
    iters: list[list] = []
    for n, f in enumerate(user):
        out = {}
        if not frames.is_module_frame(f):
            for name, v in f.f_locals.items():
                e = keep(f"{name} (in {f.f_code.co_name})", v, ["l", n, name])
                if e is not None:
                    out[name] = e
        loc.append(out)
        its = frame_iterators[n]
        if its is None:
            iters.append(None)
            if frames.active_loops(f):
                cap.warnings[f"loops in {f.f_code.co_name}"] = (
                    "positions of for-loop iterators are not captured on Python "
                    f"{sys.version_info[0]}.{sys.version_info[1]} ({sys.implementation.name})")
            continue
        iters.append([_iter_state(it, f"the for-loop iterator in {f.f_code.co_name}", cap, keep, enc)
                      for it in its])
    objs: list[dict] = []
    done = 0

    def follow() -> None:
        """Follow the plain objects found so far (and those they hold) in place."""
        nonlocal done
        while done < len(objects):
            obj, path = objects[done]
            done += 1
            attrs = {}
            label = _label(path)
            code = isinstance(obj, (type, types.FunctionType))
            for name, v in _followed(obj).items():
                if name.startswith("__") or _code_not_state(v):
                    continue  # (a cell holding a helper function or a module: code, not state)
                # A class's or function's own values that cannot be stored were never kept, nor said: not now either.
                quiet = code and not name.startswith(_CELL)
                e = None if len(path) > 3 + MAX_DEPTH else keep(f"{label}.{name}", v, path + [name], quiet=quiet)
                if e is not None:
                    attrs[name] = e
            objs.append({"at": path, "type": type(obj).__qualname__, "attrs": attrs}
                        | ({"fn": obj.__qualname__} if type(obj) is types.FunctionType else {}))

    follow()  # first: the frames' objects (a trainer's counters) before those the model's layers hold
    mods = opts = None
    if modules or optimizers:
        # The model's attributes share one budget of max_bytes: activations a layer keeps for logging
        # (self.attn_probs) would be copied at every snapshot, each under the cap, for every layer.
        end = enc.size + max_bytes

        def keep_attr(name: str, v: Any, path: list) -> list | None:
            return keep(name, v, path, limit=end)

        def keep_tensor(name: str, t: torch.Tensor) -> list | None:
            """A buffer not in state_dict() (``keep`` leaves module tensors to the module)."""
            mark = enc.begin()
            enc.limit = min(enc.limit, end)
            try:
                if t.numel() * t.element_size() > max_bytes:  # never changed in place: the relaunch makes it again
                    raise _Skip(f"a buffer of {t.numel() * t.element_size()} bytes, over "
                                f"PYCKPT_LOOP_STATE_MAX_BYTES={max_bytes}", t._version > 0)
                return ["t", enc.add_tensor(t, shared=True), str(t.device), bool(t.requires_grad)]
            except _Skip as s:
                enc.rollback(mark)
                (cap.warnings if s.warn else cap.skipped)[name] = _shared(s.why, max_bytes, end)
                return None

        mods = object_attrs.capture(list(modules), keep_attr, keep_tensor, _script_class, _attrs)
        opts = object_attrs.capture_optimizers(list(optimizers), keep_attr, _script_class, _attrs)
        for path, hook in hook_objects.find(list(modules), list(optimizers), _hook_state, schedulers):
            keep_attr(hook_objects.label(path), hook, path)  # followed as a plain object or closure
        follow()
    cap.tree = {"version": VERSION, "stack": stack_signature(user, point), "argv": [str(a) for a in sys.argv[1:]],
                "globals": gl, "locals": loc,
                "objects": objs, "iters": iters, "tensors": enc.tensors}
    if reached:  # (a relaunch that has not imported one of these by the restore point is told, not refused)
        cap.tree["reached"] = [[g["__name__"], _file_digest(g.get("__file__"))] for g in reached]
    if mods is not None:  # train()/eval() flags and attributes of the modules (object_attrs.py)
        cap.tree["modules"] = mods
    if opts is not None and any(opts):  # attributes of optimizers of script classes
        cap.tree["optimizers"] = opts
    cap.states = enc.states
    return cap


def _shared(why: str, max_bytes: int, limit: int | None) -> str:
    """``why`` a value was left out, saying when the budget it was over is shared (``keep``'s ``limit``)."""
    if limit is not None and why.startswith("over PYCKPT_LOOP_STATE_MAX_BYTES"):
        return f"over PYCKPT_LOOP_STATE_MAX_BYTES={max_bytes} with the model's other attributes"
    return why


def _hook_state(v: Any) -> bool:
    """A hook torch holds that is the script's state (``hook_objects``): one of its objects or closures."""
    return _plain_object(v) or _script_closure(v)


def _label(path: list) -> str:
    if path[0] in _HOOK_PATHS:  # a hook torch holds (hook_objects.py)
        n = 4 if path[0] in ("oh", "sh") else 5
        return ".".join([hook_objects.label(path[:n]), *map(str, path[n:])])
    if path[0] == "g":
        base = path[2] if path[1] == "__main__" else f"{path[1]}.{path[2]}"
        rest = path[3:]
    elif path[0] == "m":  # an attribute of a submodule (object_attrs.py)
        base, rest = ".".join(x for x in (f"model[{path[1]}]", str(path[2])) if x), path[3:]
    elif path[0] == "o":  # an attribute of an optimizer
        base, rest = f"optimizer[{path[1]}]", path[2:]
    else:
        base, rest = str(path[2]), path[3:]
    return ".".join([base, *map(str, rest)])


REST_ITEMS_MAX = 4096  # items of a list or tuple left whose digest identifies what a loop goes on with


def _rest_of(it: Any, skip: int = 0) -> list | None:
    """What a sequence iterator goes on with after ``skip`` more items, to tell at a restore whether the
    relaunch's loop iterates the same items: for a range the range left (``["range", start, stop,
    step]``), for a list, tuple or string of plain values a digest of those left (``["items", hex]``);
    None when it cannot be told (other values: the loop's items are trusted to be the same)."""
    if type(it).__name__ not in _FORWARD:  # (a reversed list's index counts down: not what is left after it)
        return None
    try:
        red = it.__reduce__()
    except TypeError:
        return None
    if len(red) < 3 or not isinstance(red[1], tuple) or len(red[1]) != 1 or type(red[2]) is not int:
        return None  # (an exhausted list iterator reduces to an empty list)
    seq, at = red[1][0], red[2] + skip
    if type(seq) is range:
        left = seq[at:]
        return ["range", left.start, left.stop, left.step]
    if type(seq) not in (list, tuple, str, bytes) or len(seq) - at > REST_ITEMS_MAX:
        return None
    items = seq[at:]
    if type(seq) in (list, tuple) and not all(type(x) in _PLAIN_ITEMS for x in items):
        return None
    return ["items", hashlib.blake2b(repr(tuple(items) if type(seq) is list else items).encode(),
                                     digest_size=12).hexdigest()]


_PLAIN_ITEMS = frozenset((int, float, str, bool, type(None), bytes))
_FORWARD = frozenset(("range_iterator", "longrange_iterator", "list_iterator", "tuple_iterator", "str_ascii_iterator",
                      "str_iterator", "bytes_iterator"))
_TENSORS = (torch.Tensor, torch.nn.Parameter)

_DICT_ITERATORS = frozenset(("dict_keyiterator", "dict_valueiterator", "dict_itemiterator"))


def _dict_rest(it: Any, skip: int = 0) -> list | None:
    """``["items", hex]``: a digest of the keys a dict iterator goes on with after ``skip`` more (the values
    for ``.values()``), to tell at a restore whether the relaunch's dict is the checkpoint's. None when they
    are not plain values or more than ``REST_ITEMS_MAX`` (the dict is then trusted to be the same)."""
    if it.__length_hint__() - skip > REST_ITEMS_MAX:
        return None
    red = it.__reduce__()  # (iter, (a list of what is left,)): a copy, the iterator does not move
    left = red[1][0][skip:] if len(red) > 1 and isinstance(red[1], tuple) and len(red[1]) == 1 else None
    if not isinstance(left, list):
        return None
    keys = [x[0] for x in left] if type(it).__name__ == "dict_itemiterator" else left
    if not all(type(k) in _PLAIN_ITEMS for k in keys):
        return None
    return ["items", hashlib.blake2b(repr(tuple(keys)).encode(), digest_size=12).hexdigest()]


def _saved_items(seq: Any, left: int, where: str, cap: Capture, enc: "_Encoder") -> list | None:
    """``["values", encoded]``: the ``left`` last items of ``seq`` as loop-state values. None where they need
    not be saved (views of tensors put back in place; optimizers and modules, the same objects in a relaunch)
    and, with the loop named in a warning, where they cannot be (a kind pyckpt does not store, over the cap)."""
    items = tuple(seq[len(seq) - left:]) if left else ()
    try:
        if all(type(x) in _TENSORS and x.untyped_storage().data_ptr() in enc.storages for x in items):
            return None  # views of the script's saved tensors (``for xb in X.split(bs)``): put back in place
    except (RuntimeError, NotImplementedError):
        pass
    mark = enc.begin()
    enc.name = where
    try:
        out = enc.value(items)
    except _Skip as s:
        enc.rollback(mark)
        if s.warn:
            cap.warnings[where] = f"a loop over items no variable holds, which cannot be saved ({s.why})"
        return None  # (else objects pyckpt restores elsewhere, an optimizer: the relaunch's loop holds the same)
    if enc.nested:  # modules (``for net, opt in ((G, opt_g), (D, opt_d))``): the relaunch's are the same objects
        enc.rollback(mark)
        return None
    return ["values", out]


def _sequence_of(it: Any) -> Any:
    """The list, tuple, range or string a sequence iterator iterates (None: exhausted, or another kind)."""
    try:
        red = it.__reduce__()
    except TypeError:
        return None
    return red[1][0] if len(red) > 2 and isinstance(red[1], tuple) and len(red[1]) == 1 else None


def _nested_iterators(its: list) -> set[int]:
    """ids of ``its`` and of the iterators inside them that ``_iter_state`` positions (an ``enumerate``'s,
    a ``zip``'s): a variable holding one is positioned with its loop (``_Encoder.skip``)."""
    out: set[int] = set()
    todo = list(its)
    while todo:
        it = todo.pop()
        if id(it) in out:
            continue
        out.add(id(it))
        if type(it) is enumerate:
            todo.append(it.__reduce__()[1][0])
        elif type(it) is zip:
            todo.extend(it.__reduce__()[1])
        elif (inner := _wrapped(it)) is not None:
            todo.extend(inner)
        elif (sl := _islice_state(it)) is not None:
            todo.append(sl[0])
    return out


def _dict_positioner(it: Any, st: list, where: str) -> Callable[[], None]:
    """Put a dict iterator where the checkpoint's was: it goes on by taking the items the relaunch has
    left beyond the checkpoint's (a replay to the restore point has usually taken them already), after
    checking that the keys left are the checkpoint's."""
    _check(len(st) == 2 or (isinstance(st[2], list) and len(st[2]) == 2 and st[2][0] == "items"), "dict items")
    extra = int(it.__length_hint__()) - st[1]
    if extra < 0 or (len(st) == 3 and _dict_rest(it, extra) != st[2]):
        raise PyckptError(f"a for loop in {where} iterates a dict with other keys left than in the checkpoint "
                          f"({it.__length_hint__()} left now, {st[1]} then)")
    if extra and type(it).__name__ != "dict_keyiterator":
        # The loop goes on from a later item than the relaunch's current one, whose variables the loop state
        # puts back: only where that item's value is a plain one (a module, an optimizer, a loader is not).
        current = it.__reduce__()[1][0][extra - 1]
        value = current[1] if type(it).__name__ == "dict_itemiterator" else current
        parts = value if type(value) is tuple else (value,)
        if not all(type(x) in _PLAIN_ITEMS for x in parts):
            raise PyckptError(f"a for loop in {where} over a dict is at a later item in the checkpoint than in this "
                              f"run at its restore point, and that item's value ({type(value).__name__}) is not one "
                              "pyckpt puts back; pyckpt cannot go on from there")

    def advance() -> None:
        collections.deque(itertools.islice(it, extra), maxlen=0)
    return advance


def _reduced(it: Any) -> tuple | None:
    """``it.__reduce__()`` of an itertools object or builtin iterator, quietly (3.12 and 3.13 warn that
    itertools' pickle support goes), or None where there is none (3.14)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            red = it.__reduce__()
    except (AttributeError, TypeError, ValueError):
        return None
    return red if isinstance(red, tuple) else None


def _wrapped(it: Any) -> tuple | None:
    """The iterators a ``map``, ``filter`` or ``itertools.starmap`` draws from (stateless wrappers: positioning
    those positions it), or None for any other object or where the interpreter cannot tell (starmap's pickle
    support went in 3.14)."""
    if type(it) not in (map, filter, itertools.starmap) or (red := _reduced(it)) is None:
        return None
    inner = red[1][1:] if len(red) > 1 and isinstance(red[1], tuple) else None
    return inner if inner and all(hasattr(x, "__next__") for x in inner) else None


def _islice_state(it: Any) -> tuple[Any, int, int | None] | None:
    """(the iterator inside, items taken from it, stop) of ``itertools.islice(x, [start,] stop)`` with step 1,
    which ``_positioner`` can put back: ``__setstate__`` sets that count, and with step 1 a new islice of the
    same start and stop goes on from it as the saved one would (items before start are still skipped). None
    for any other object, another step, or an interpreter without islice's pickle support (3.14)."""
    if type(it) is not itertools.islice:
        return None
    try:
        _, (inner, _next, stop, step), cnt = _reduced(it)
    except (TypeError, ValueError):  # (None: no pickle support)
        return None
    if step != 1 or type(cnt) is not int or not (stop is None or type(stop) is int):
        return None
    return inner, cnt, stop


def _cycle_state(it: Any) -> tuple[list, int, int] | None:
    """(the items ``itertools.cycle`` keeps, its phase, its place) where a resume can rebuild it: in its first
    pass over a DataLoader (phase 1: the batches taken so far; the loader's fast-forward puts the loader's
    iterator at the next one) or replaying what it kept (phase 2: all of them, and the index of the next).
    None for a cycle over anything else, or an interpreter without itertools' pickle support (3.14)."""
    from torch.utils.data.dataloader import _BaseDataLoaderIter

    try:
        (inner,), (items, firstpass) = _reduced(it)[1:3]
    except (TypeError, ValueError):  # (None: no pickle support)
        return None
    if not isinstance(items, list):
        return None
    if not firstpass and isinstance(inner, _BaseDataLoaderIter):
        return list(items), 1, 0
    if firstpass and type(inner).__name__ == "list_iterator" and _sequence_of(inner) is items and items:
        return list(items), 2, len(items) - int(inner.__length_hint__())
    if not firstpass and type(inner).__name__ in ("list_iterator", "tuple_iterator"):
        # A cycle over a list (one a resume made, or the script's own): it will keep all of the list
        seq = _sequence_of(inner)
        left = int(inner.__length_hint__())
        if isinstance(seq, (list, tuple)) and seq and 0 < left <= len(seq):
            return list(seq), 2, len(seq) - left
    return None


class _Cycle:
    """An ``itertools.cycle`` as decoded (``_cycle_state``): in its first pass, the batches it kept go into
    the live cycle (its loader's iterator was put at the next batch by the fast-forward); replaying, a new
    cycle over the kept batches from the saved place takes the variable (the relaunch's went on drawing from
    a new epoch of the loader)."""

    def __init__(self, phase: int, items: list, index: int) -> None:
        self.phase, self.items, self.index = phase, items, index

    def bind(self, live: Any) -> Any:
        if self.phase == 1 and type(live) is itertools.cycle:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                live.__setstate__((list(self.items), False))
            return live
        return itertools.cycle(self.items[self.index:] + self.items[:self.index])


def _loaders_left(it: Any) -> int | None:
    """For ``itertools.chain(loader_a, loader_b)``: the loaders its source has left, where it chains
    DataLoaders only (the one it runs through, if any, is a loader's iterator): the loaders' fast-forward
    then positions it, each ``iter()`` before the restore point giving an empty epoch as for any loop over
    a loader. None for any other chain (``chain.from_iterable``, a list among them) or an interpreter
    without itertools' pickle support (3.14)."""
    from torch.utils.data import DataLoader
    from torch.utils.data.dataloader import _BaseDataLoaderIter

    if (red := _reduced(it)) is None:
        return None
    state = red[2] if len(red) > 2 and isinstance(red[2], tuple) else ()
    if not state:
        return 0  # run to its end
    source, active = state[0], (state[1] if len(state) > 1 else None)
    if active is not None and not isinstance(active, _BaseDataLoaderIter):
        return None
    seq = _sequence_of(source) if type(source).__name__ == "tuple_iterator" else None
    if not isinstance(seq, tuple):
        return None
    left = int(source.__length_hint__())
    rest = seq[len(seq) - left:] if left else ()
    return left if all(isinstance(x, DataLoader) for x in rest) else None


def _iter_state(it: Any, where: str, cap: Capture, keep: Any, enc: "_Encoder", depth: int = 0,
                swappable: bool = True) -> list:
    """The position of one loop iterator (see ``_positioner``). A generator (a script's batch generator,
    tqdm's iterator) is positioned through its frame: its locals and its own loop iterators. Locals
    of a library's generator that cannot be stored are the library's business (listed for debug, not
    warned); pyckpt's own wrapper generators are positioned by pyckpt (the loader's fast-forward)."""
    from torch.utils.data.dataloader import _BaseDataLoaderIter

    t = type(it)
    tn = t.__name__
    if isinstance(it, _BaseDataLoaderIter):
        return ["loader"]
    if tn in ("range_iterator", "longrange_iterator", "list_iterator", "tuple_iterator", "list_reverseiterator",
              "str_ascii_iterator", "str_iterator", "bytes_iterator"):
        # Items left, not __reduce__'s index: 3.12 reduces a range iterator to a range of what is left.
        rest = _rest_of(it)
        if rest is None and swappable and tn in ("list_iterator", "tuple_iterator") \
                and (seq := _sequence_of(it)) is not None and id(seq) not in enc.sequences:
            # A sequence no saved variable holds (``for idx in torch.randperm(n).split(bs)``): the relaunch's is
            # made from other values, so the items left are saved and put in its place (_positioner).
            rest = _saved_items(seq, int(it.__length_hint__()), where, cap, enc)
        return [tn, int(it.__length_hint__())] + ([rest] if rest is not None else [])
    if tn in _DICT_ITERATORS and t.__module__ == "builtins":  # ``for phase, lr in phases.items()``
        rest = _dict_rest(it)
        return [tn, int(it.__length_hint__())] + ([rest] if rest is not None else [])
    if t is enumerate:
        red = it.__reduce__()
        return ["enumerate", int(red[1][1]), _iter_state(red[1][0], where, cap, keep, enc, depth + 1, swappable)]
    if t is zip:
        return ["zip", [_iter_state(x, where, cap, keep, enc, depth + 1, False) for x in it.__reduce__()[1]]]
    if (inner := _wrapped(it)) is not None:  # ``map(to_device, loader)``: what it draws from
        return ["wraps", tn, [_iter_state(x, where, cap, keep, enc, depth + 1, False) for x in inner]]
    if isinstance(it, types.GeneratorType) and it.gi_frame is not None and frames.is_own_file(
            it.gi_frame.f_code.co_filename):
        return ["pyckpt", it.__qualname__]
    if isinstance(it, types.GeneratorType) and it.gi_frame is not None and depth < 8:
        f = it.gi_frame
        quiet = not frames.is_user_file(f.f_code.co_filename)
        its = frames.loop_iterators(f)
        if its is not None:
            name = getattr(it, "__qualname__", "generator")
            enc.loop_iterators.update(_nested_iterators(its))  # before its locals: a local holding one is that loop's
            loc = {}
            for k, v in f.f_locals.items():
                e = keep(f"{k} (in generator {name})", v, ["gen", k], quiet)
                if e is not None:
                    loc[k] = e
            return ["generator", [*frames.code_key(f.f_code), frames.position(f)], loc,
                    [_iter_state(x, f"the for-loop iterator in generator {name}", cap, keep, enc, depth + 1) for x in its]]
    if (sl := _islice_state(it)) is not None:
        return ["islice", sl[1], sl[2], _iter_state(sl[0], where, cap, keep, enc, depth + 1, False)]
    if t is itertools.chain and (left := _loaders_left(it)) is not None:
        return ["chain", left]
    if t is itertools.count:
        args = it.__reduce__()[1]
        if all(type(a) is int for a in args):
            return ["count", int(args[0])]
    cap.warnings[where] = f"a loop over {t.__module__}.{t.__qualname__}, whose position cannot be restored"
    return ["unknown", f"{t.__module__}.{t.__qualname__}"]


# ----------------------------------------------------------------------------- restore

class StackChanged(PyckptError):
    """The script's code or call stack at the restore point differs from the checkpoint's (an edited
    script): its loop state cannot be put back. ``PYCKPT_RESUME_EDITED=tracked`` resumes without it."""


class _Bad(PyckptError):
    pass


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise _Bad(f"the checkpoint's loop state is malformed ({what})")


class _Holders(set):
    """``_Decoder.holders``, with the tensors written in place so far (``_assign``): ``into[id(live)]`` is the
    saved tensor copied into ``live``, ``live_of[id(saved)]`` the live tensor it went into. One live tensor that
    two variables share in the relaunch but not in the checkpoint (``best = current = torch.zeros(())`` before
    the loop rebinds one) takes the first one's value; the second is bound to a new tensor. Two variables
    sharing one tensor in the checkpoint get one live tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.into: dict[int, Any] = {}
        self.live_of: dict[int, Any] = {}


class _Decoder:
    def __init__(self, tensors: list, states: dict) -> None:
        _check(isinstance(tensors, list) and all(isinstance(t, torch.Tensor) for t in tensors), "tensor table")
        _check(isinstance(states, dict), "module states")
        self.tensors, self.states = tensors, states
        self.made: dict[int, torch.Tensor] = {}
        self.made_arrays: dict[int, Any] = {}  # NumPy arrays by tensor index
        # ids of the decoded containers holding a random generator at any depth: only those are walked
        # to put each generator's state into the live one at the same place (see _live_generators)
        self.holders: _Holders = _Holders()

    def _note(self, out: Any, items: Any) -> Any:
        if any(isinstance(x, (_InPlace, _Struct)) or id(x) in self.holders for x in items):
            self.holders.add(id(out))
        return out

    def tensor(self, i: Any) -> torch.Tensor:
        _check(type(i) is int and 0 <= i < len(self.tensors), "tensor index")
        return self.tensors[i]

    def value(self, e: Any, depth: int = 0) -> Any:
        _check(isinstance(e, list) and e and isinstance(e[0], str) and depth < 64, "value")
        tag = e[0]
        if tag == "v":
            _check(len(e) == 2 and type(e[1]) in _SCALARS, "scalar")
            return e[1]
        if tag == "x":
            _check(len(e) == 2 and isinstance(e[1], (torch.device, torch.dtype)), "device or dtype")
            return e[1]
        if tag in ("cx", "fr", "de", "ba", "aa"):
            return _stdlib_value(e)
        if tag == "t":
            _check(len(e) == 4 and isinstance(e[2], str) and isinstance(e[3], bool), "tensor")
            key = e[1]
            t = self.made.get(key) if type(key) is int else None
            if t is None:
                t = self.tensor(key).to(torch.device(e[2]))
                if e[3] and (t.is_floating_point() or t.is_complex()):
                    t.requires_grad_(True)
                self.made[key] = t
            return t
        if tag in ("l", "u", "s", "f", "q"):
            _check(len(e) >= 2 and isinstance(e[1], list), "container")
            items = [self.value(x, depth + 1) for x in e[1]]
            if tag == "q":
                _check(len(e) == 3 and (e[2] is None or type(e[2]) is int), "deque")
                return self._note(collections.deque(items, e[2]), items)
            try:
                return self._note({"l": list, "u": tuple, "s": set, "f": frozenset}[tag](items), items)
            except TypeError:
                raise _Bad("the checkpoint's loop state is malformed (unhashable set item)") from None
        if tag == "d":
            _check(len(e) == 2 and isinstance(e[1], list), "dict")
            out = {}
            for kv in e[1]:
                _check(isinstance(kv, list) and len(kv) == 2, "dict item")
                k = self.value(kv[0], depth + 1)
                try:
                    out[k] = self.value(kv[1], depth + 1)
                except TypeError:
                    raise _Bad("the checkpoint's loop state is malformed (unhashable key)") from None
            return self._note(out, itertools.chain(out.keys(), out.values()))
        if tag in ("n", "ns"):
            import numpy as np

            _check(len(e) == 3 and isinstance(e[2], str), "array")
            if tag == "n" and e[1] in self.made_arrays:  # the checkpoint's one array, held in several places
                return self.made_arrays[e[1]]
            try:
                a = self.tensor(e[1]).numpy().astype(np.dtype(e[2]), copy=True)
            except (TypeError, ValueError):
                raise _Bad("the checkpoint's loop state is malformed (array)") from None
            _check(tag == "n" or a.ndim == 0, "scalar")
            if tag == "ns":
                return a[()]
            self.made_arrays[e[1]] = a
            return a
        if tag == "g":
            _check(len(e) in (2, 3) and (len(e) == 2 or isinstance(e[2], str)), "torch generator")
            return _InPlace(tag, e[1], self, e[2] if len(e) == 3 else "cpu")  # written without a device: CPU
        if tag in ("r", "ng", "nr"):
            _check(len(e) == 2, "random generator")
            return _InPlace(tag, e[1], self)
        if tag == "tq":
            _check(len(e) == 2 and type(e[1]) in (int, float) and 0 <= e[1] < float("inf"), "progress bar")
            return _Bar(e[1])
        if tag in ("nt", "dc", "ob"):
            _check(len(e) == 3 and isinstance(e[1], str), "object")
            return _Struct(tag, e[1], self._members(e[2], depth), self)
        if tag == "dd":
            _check(len(e) == 4 and isinstance(e[1], str) and isinstance(e[2], list), "dict subclass")
            items = self.value(["d", e[2]], depth)
            return _Struct(tag, e[1], self._members(e[3], depth), self, items)
        if tag == "cy":
            _check(len(e) == 4 and e[1] in (1, 2) and isinstance(e[2], list) and type(e[3]) is int
                   and 0 <= e[3] <= max(len(e[2]) - 1, 0), "itertools.cycle")
            if e[1] == 1 and not hasattr(itertools.cycle, "__setstate__"):
                raise PyckptError("the checkpoint holds an itertools.cycle in its first pass, which this "
                                  f"interpreter (Python {sys.version_info[0]}.{sys.version_info[1]}) cannot put back")
            return _Cycle(e[1], [self.value(x, depth + 1) for x in e[2]], e[3])
        if tag == "en":
            _check(len(e) == 3 and isinstance(e[1], str) and isinstance(e[2], str), "enum member")
            return _Struct(tag, e[1], {}, self, name=e[2])
        if tag in ("M", "O") and depth == 0:
            _check(len(e) == 3 and isinstance(e[1], str) and isinstance(e[2], str) and e[2] in self.states
                   and (tag == "O" or isinstance(self.states[e[2]], dict)), "module or object state")
            return _StateOf(tag, e[1], self.states[e[2]])
        raise _Bad(f"the checkpoint's loop state is malformed (unknown tag {tag[:20]!r})")

    def _members(self, e: Any, depth: int) -> dict:
        _check(isinstance(e, list), "object members")
        out = {}
        for m in e:
            _check(isinstance(m, list) and len(m) == 2 and isinstance(m[0], str), "object member")
            out[m[0]] = self.value(m[1], depth + 1)
        return out


class _Mismatch(Exception):
    """A live value of another class than the checkpoint's where a struct is put back (refused)."""


class _Struct:
    """A value of a script class (``_Encoder.struct``) as decoded: put back at the same place through the
    live value there, never made from the checkpoint (no class is looked up by name): a namedtuple
    ("nt") is ``type(live)._make(...)``, a frozen dataclass ("dc") ``dataclasses.replace(live, ...)``
    (both rebound: the script rebinds them), a dict subclass ("dd") and a plain object ("ob") are
    refilled in place, an enum member ("en") is the live enum class's member of the saved name.
    Members left out at capture keep the live value. (A missing entry of a ``defaultdict`` whose factory
    is that class is made by the live factory: ``_made_by_factory``.)"""

    def __init__(self, tag: str, qualname: str, members: dict, dec: "_Decoder", items: dict | None = None,
                 name: str = "") -> None:
        self.tag, self.qualname, self.members, self.dec, self.items, self.name = tag, qualname, members, dec, items, name

    def _fits(self, live: Any) -> bool:
        t = type(live)
        if t.__qualname__ != self.qualname or isinstance(live, type):
            return False
        if self.tag == "nt":
            return _namedtuple(t) and set(self.members) <= set(t._fields)
        if self.tag == "dc":
            return _frozen_dataclass(t) and set(self.members) <= {f.name for f in dataclasses.fields(live)}
        if self.tag == "dd":
            return isinstance(live, dict)
        if self.tag == "en":
            return isinstance(live, enum.Enum) and self.name in t.__members__
        return not isinstance(live, (dict, tuple, enum.Enum))

    def _live_member(self, live: Any, name: str) -> Any:
        if self.tag == "nt":
            return tuple.__getitem__(live, type(live)._fields.index(name))
        if self.tag == "dc":
            return getattr(live, name, _MISSING)
        return _attrs(live).get(name, _MISSING)

    def problem(self, live: Any) -> str | None:
        """Why nothing can be put back at this place (nothing there: the variable is left as it is, said),
        or None; raises ``_Mismatch`` where a value of another class is there (refused)."""
        if live is None or live is _MISSING:
            return f"is {'None' if live is None else 'not there'} at this point of the run, the checkpoint holds a {self.qualname} there"
        if not self._fits(live):
            raise _Mismatch(f"is a {type(live).__qualname__} now, the checkpoint holds a {self.qualname} there")
        for k, v in (self.items or {}).items():
            why = _problem(k, _MISSING, self.dec.holders) or _problem(v, dict.get(live, k, _MISSING), self.dec.holders)
            if why:
                return _at(f"[{k!r}]", why)
        for k, v in self.members.items():
            why = _problem(v, self._live_member(live, k), self.dec.holders)
            if why:
                return _at(f".{k}", why)
        return None

    def into(self, live: Any) -> Any:
        """The value to hold at this place (checked by ``problem`` before anything was written)."""
        if live is None or live is _MISSING or not self._fits(live):
            return live
        h = self.dec.holders
        t = type(live)
        if self.tag == "en":
            return t.__members__[self.name]
        vals, same = {}, True
        for k, v in self.members.items():
            now = self._live_member(live, k)
            vals[k] = _assign(None if now is _MISSING else now, v, h)
            same = same and (vals[k] is now or (type(now) is type(vals[k]) and type(now) in _SCALARS
                                                and now == vals[k]))
        if same and self.tag in ("nt", "dc"):
            return live  # already what the checkpoint holds (a constant): not made again
        if self.tag == "nt":
            fields = dict(zip(t._fields, (tuple.__getitem__(live, i) for i in range(len(t._fields)))))
            fields.update(vals)
            return t._make([fields[f] for f in t._fields])
        if self.tag == "dc":
            init = {f.name for f in dataclasses.fields(live) if f.init}
            try:  # __init__ and __post_init__ run, as when the script made it (attributes they derive)
                new = dataclasses.replace(live, **{k: x for k, x in vals.items() if k in init})
            except (TypeError, ValueError):  # an InitVar without default: a copy of the live one
                new = copy.copy(live)
            for k, x in vals.items():  # the saved values exactly (init=False fields too)
                object.__setattr__(new, k, x)
            return new
        if self.tag == "dd":
            items = {k: _assign(dict.get(live, k), v, h) for k, v in self.items.items()}
            dict.clear(live)
            dict.update(live, items)
            for k, x in vals.items():
                object.__setattr__(live, k, x)
            return live
        for k, x in vals.items():
            setattr(live, k, x)
        return live


def _at(where: str, why: str) -> str:
    """``why`` said of the member or item ``where`` (``.name``, ``[key]``) of a value."""
    return where + (why if why[:1] in "[." else " " + why)


def _problem(saved: Any, live: Any, holders: set[int]) -> str | None:
    """Why ``saved`` cannot be put back over ``live`` (``_Struct.problem``), walking the containers in
    ``holders`` the way ``_live_generators`` does; None when it can."""
    if isinstance(saved, _Struct):
        return saved.problem(live)
    if id(saved) not in holders:
        return None
    t = type(saved)
    if t is dict:
        at = live if isinstance(live, dict) else {}
        for k, v in saved.items():
            now = dict.get(at, k, _MISSING)
            why = _problem(k, _MISSING, holders) or (None if now is _MISSING and _made_by_factory(at, v)
                                                     else _problem(v, now, holders))
            if why:
                return _at(f"[{k!r}]", why)
        return None
    if t in (set, frozenset):
        return next((f"(in a set) {w}" for x in saved if (w := _problem(x, _MISSING, holders))), None)
    at = list(live) if isinstance(live, (list, tuple, collections.deque)) else []
    for i, x in enumerate(saved):
        why = _problem(x, at[i] if i < len(at) else _MISSING, holders)
        if why:
            return _at(f"[{i}]", why)
    return None


class _InPlace:
    """A random generator's state: put into the live generator object at the same place (others may
    share it), or into a new generator of the saved kind where the script holds none there (yet)."""

    def __init__(self, tag: str, state: Any, dec: _Decoder, device: str = "cpu") -> None:
        self.tag = tag
        if tag == "g":
            self.state = dec.tensor(state).to(torch.uint8)
            try:
                self.device = torch.device(device)
                fresh: Any = torch.Generator(device=self.device)
                fresh.set_state(self.state)
            except RuntimeError as e:  # here, not halfway through writing the script's variables
                raise PyckptError(f"a torch.Generator on {device} in the checkpoint's loop state cannot be "
                                  f"made in this run ({e})") from None
        elif tag == "r":
            _check(isinstance(state, list) and len(state) == 3, "random state")
            words = dec.tensor(state[1])
            self.state = (state[0], tuple(int(w) for w in words.tolist()), state[2])
            fresh = random.Random()
            try:
                fresh.setstate(self.state)
            except (TypeError, ValueError):
                raise _Bad("the checkpoint's loop state is malformed (random state)") from None
        elif tag == "ng":
            import numpy as np

            self.state = dec.value(state)
            _check(isinstance(self.state, dict), "numpy generator state")
            kind = getattr(np.random, str(self.state.get("bit_generator")), None)
            _check(isinstance(kind, type) and issubclass(kind, np.random.BitGenerator), "numpy bit generator")
            fresh = np.random.Generator(kind())
            try:
                fresh.bit_generator.state = self.state
            except (TypeError, ValueError, KeyError):
                raise _Bad("the checkpoint's loop state is malformed (numpy generator state)") from None
        else:
            _check(isinstance(state, list) and len(state) == 5, "numpy random state")
            import numpy as np

            keys = dec.tensor(state[1]).numpy().astype(np.uint32)
            self.state = (state[0], keys, state[2], state[3], state[4])
            fresh = np.random.RandomState()
            try:
                fresh.set_state(self.state)
            except (TypeError, ValueError):
                raise _Bad("the checkpoint's loop state is malformed (numpy random state)") from None
        # Made and set now, so a state this run cannot take is refused before anything is written.
        self.fresh = fresh

    def into(self, live: Any) -> Any:
        """The generator to hold: ``live`` with the saved state when it is a generator of the saved kind,
        else the new one (the script made its generator later than this point, or another kind)."""
        np = sys.modules.get("numpy")
        if self.tag == "g" and isinstance(live, torch.Generator) and live.device.type == self.device.type:
            live.set_state(self.state)
        elif self.tag == "r" and isinstance(live, random.Random):
            live.setstate(self.state)
        elif (self.tag == "ng" and np is not None and isinstance(live, np.random.Generator)
              and type(live.bit_generator) is type(self.fresh.bit_generator)):
            live.bit_generator.state = self.state
        elif self.tag == "nr" and np is not None and isinstance(live, np.random.RandomState):
            live.set_state(self.state)
        else:
            return self.fresh
        return live


class _StateOf:
    """The ``state_dict()`` of a module no optimizer owns a parameter of (kind "M") or of a library
    object (kind "O"), as read back with the rank's state: loaded into the live object at the same
    place (others may hold it: an attribute, a closure)."""

    def __init__(self, kind: str, qualname: str, state: Any) -> None:
        self.kind, self.qualname, self.state = kind, qualname, state

    def problem(self, live: Any) -> str | None:
        """Why ``live`` cannot take this state (checked before anything is written), or None."""
        fits = isinstance(live, torch.nn.Module) if self.kind == "M" else _stateful(live)
        if not fits or type(live).__qualname__ != self.qualname:
            return f"is a {type(live).__qualname__} now, the checkpoint holds {self.qualname} state there"
        if self.kind == "O":
            return None  # its own load_state_dict() checks the rest
        now = live.state_dict()
        for k, v in self.state.items():
            if k not in now:
                return f"has no {k!r} now (the checkpoint has it)"
            cur = now[k]
            if isinstance(v, torch.Tensor) and not (isinstance(cur, torch.Tensor) and cur.shape == v.shape
                                                    and cur.dtype == v.dtype):
                desc = f"{tuple(cur.shape)} {cur.dtype}" if isinstance(cur, torch.Tensor) else type(cur).__name__
                return f"has {k!r} of {desc} now, the checkpoint {tuple(v.shape)} {v.dtype}"
        return None

    def apply(self, live: Any) -> None:
        if self.kind == "M":
            live.load_state_dict(self.state, strict=False)  # entries shared with the model were left to it
        else:
            live.load_state_dict(self.state)


class _Bar(_InPlace):
    """A tqdm progress bar's count, put into the live bar at the same place: its display goes on from the
    checkpoint's count and its rate is counted from the resume (tqdm's ``initial``), as a bar made with
    ``tqdm(initial=...)`` for a resumed run does. Where the script holds no bar there (yet), a disabled
    bar at that count stands in."""

    def __init__(self, n: int | float) -> None:  # (no state to decode: _InPlace's is not called)
        self.tag, self.n = "tq", n

    def into(self, live: Any) -> Any:
        std = sys.modules.get("tqdm.std")
        if std is None:
            return live
        if not isinstance(live, std.tqdm):
            return std.tqdm(disable=True, initial=self.n)
        live.n = live.initial = self.n
        if hasattr(live, "last_print_n"):  # a disabled bar has none
            live.last_print_n = self.n
        return live


def _check_states(decoded: dict, live: dict, label: Any, plan: "Plan", holders: set[int] = frozenset()) -> None:
    """Raise ``PyckptError`` when a module's or object's state in ``decoded`` meets something else in
    ``live``. Where nothing is there yet (None, or no such name: made lazily, or at the first
    evaluation), the state is dropped from ``decoded`` with a warning for the plan. The same for a
    value of a script class (``_Struct``), at any depth of containers."""
    for k, v in list(decoded.items()):
        if not isinstance(v, _StateOf):
            try:
                why = _problem(v, live.get(k, _MISSING), holders)
            except _Mismatch as e:
                raise PyckptError(f"{label(k)} {e}") from None
            if why is not None:
                del decoded[k]
                plan.warnings.append(f"{_at(label(k), why)}: not restored (exact only if the script makes it again "
                                     "from restored state)")
            continue
        cur = live.get(k, _MISSING)
        if cur is None or cur is _MISSING:
            del decoded[k]
            plan.warnings.append(f"{label(k)} is {'None' if cur is None else 'not there'} at this point of the run, "
                                 f"the checkpoint holds {v.qualname} state there: not restored (exact "
                                 "only if the script makes it again from restored state)")
            continue
        why = v.problem(cur)
        if why is not None:
            raise PyckptError(f"{label(k)} {why}")


def _made_by_factory(live: Any, saved: Any) -> bool:
    """Whether the object of a script class ``saved`` holds is made where ``live``, a ``defaultdict`` whose
    factory is that very class, has no entry yet: the script makes it there at its first use
    (``self.meters = defaultdict(SmoothedValue)`` of the torchvision references' MetricLogger, an entry
    made at the first ``update()`` after the restore point), and its saved members go into it. The factory
    is the running script's class (nothing is looked up by a name from the checkpoint)."""
    factory = getattr(live, "default_factory", None) if isinstance(live, collections.defaultdict) else None
    return (isinstance(saved, _Struct) and saved.tag == "ob" and isinstance(factory, type)
            and frames.is_script_class(factory) and factory.__qualname__ == saved.qualname)


def _live_generators(saved: Any, live: Any, holders: set[int]) -> Any:
    """``saved`` with each random generator state in it put into the generator ``live`` holds at the same
    place (dict key, list/tuple/deque index, at any depth): the script and any other reference keep
    that object. Only containers in ``holders`` (``_Decoder.holders``) are walked and copied."""
    if isinstance(saved, (_InPlace, _Struct)):
        return saved.into(live)
    if id(saved) not in holders:
        return saved
    t = type(saved)
    if t is dict:
        at = live if isinstance(live, dict) else {}

        def place(k: Any, v: Any) -> Any:  # the live value at key k, made as the script would make it
            return at.default_factory() if k not in at and _made_by_factory(at, v) else dict.get(at, k)

        # A generator as a key has no place to match (nor a live key to find): a new one.
        return {_live_generators(k, None, holders): _live_generators(v, place(k, v), holders) for k, v in saved.items()}
    if t in (set, frozenset):  # unordered: no place to match either
        return t(_live_generators(x, None, holders) for x in saved)
    at = list(live) if isinstance(live, (list, tuple, collections.deque)) else []
    items = [_live_generators(x, at[i] if i < len(at) else None, holders) for i, x in enumerate(saved)]
    if t is tuple:
        # Immutable: the live tuple itself when its items are what it would hold anyway.
        same = type(live) is tuple and len(live) == len(items) and all(a is b for a, b in zip(live, items))
        return live if same else tuple(items)
    return collections.deque(items, saved.maxlen) if t is collections.deque else items


def _assign(live: Any, saved: Any, holders: set[int]) -> Any:
    """The value to bind: a random generator's state goes into the live generator (inside a container
    too, see ``_live_generators``), a module's into the live module; a container of the same type is
    refilled in place (a defaultdict keeps its factory, aliases stay aliases)."""
    if isinstance(saved, _StateOf):
        saved.apply(live)  # checked by prepare()
        return live
    if isinstance(saved, _Cycle):
        return saved.bind(live)
    if type(saved) is torch.Tensor:
        written = holders if isinstance(holders, _Holders) else _Holders()
        if id(saved) in written.live_of:  # an alias in the checkpoint stays one
            return written.live_of[id(saved)]
        if (type(live) is torch.Tensor and live is not saved and _fits(live, saved)
                and written.into.setdefault(id(live), saved) is saved):
            with torch.no_grad():
                live.copy_(saved)
            written.live_of[id(saved)] = live
            return live
        return saved
    if _is_ndarray(saved) and type(live) is type(saved) and live is not saved:
        return _assign_array(live, saved, holders)
    saved = _live_generators(saved, live, holders)  # before a refill below clears ``live``
    if (type(saved) is bytearray and type(live) is bytearray
            or type(saved) is array.array and type(live) is array.array and live.typecode == saved.typecode):
        if live is not saved:
            live[:] = saved  # other references to the live buffer see the checkpoint's bytes
        return live
    if type(saved) in (list, dict, set, collections.deque) and isinstance(live, type(saved)) and live is not saved:
        if isinstance(live, collections.deque) and live.maxlen != saved.maxlen:
            return saved
        # Item by item where an item has memory or items of its own: a tensor or array a library object also
        # holds is written into (the container would otherwise hold a new one and the library the relaunch's).
        if type(saved) is dict:
            saved = {k: _assign(dict.get(live, k), v, holders) if _in_place_item(v) else v
                     for k, v in saved.items()}
        elif type(saved) is not set:
            at = list(live)
            saved = [_assign(at[i] if i < len(at) else None, v, holders) if _in_place_item(v) else v
                     for i, v in enumerate(saved)]
        live.clear()
        (live.extend if isinstance(live, (list, collections.deque)) else live.update)(saved)
        return live
    return saved


def _is_ndarray(v: Any) -> bool:
    """Whether ``v`` is a NumPy array (told by its type's name: NumPy need not be imported)."""
    return type(v).__name__ == "ndarray" and type(v).__module__ == "numpy"


def _in_place_item(v: Any) -> bool:
    """Whether a refilled container's item is itself written in place (``_assign``)."""
    return type(v) in _IN_PLACE_ITEMS or _is_ndarray(v)


_IN_PLACE_ITEMS = (torch.Tensor, list, dict, collections.deque, bytearray, array.array)


def _assign_array(live: Any, saved: Any, holders: set[int]) -> Any:
    """A NumPy array is written into the live one, as a tensor is (``_fits``): what else holds the live
    array (a script object, a library object) then sees the checkpoint's values. Only a whole writable
    array of the same shape and dtype, and one live array takes one saved array (``_Holders``)."""
    written = holders if isinstance(holders, _Holders) else _Holders()
    if id(saved) in written.live_of:  # the checkpoint's one array, held in several places
        return written.live_of[id(saved)]
    if (live.shape == saved.shape and live.dtype == saved.dtype and live.base is None and live.flags.writeable
            and written.into.setdefault(id(live), saved) is saved):
        live[...] = saved
        written.live_of[id(saved)] = live
        return live
    return saved


def _stdlib_value(e: list) -> Any:
    """Decode an ``_STDLIB_VALUES`` entry, every field checked first."""
    tag = e[0]
    if tag == "cx":
        _check(len(e) == 3 and all(type(x) is float for x in e[1:]), "complex")
        return complex(e[1], e[2])
    if tag == "fr":
        _check(len(e) == 3 and all(type(x) is int for x in e[1:]) and e[2] > 0, "fraction")
        return fractions.Fraction(e[1], e[2])
    if tag == "de":
        _check(len(e) == 2 and type(e[1]) is str and len(e[1]) < 4096, "decimal")
        try:
            return decimal.Decimal(e[1])
        except decimal.InvalidOperation:
            raise _Bad("the checkpoint's loop state is malformed (decimal)") from None
    if tag == "ba":
        _check(len(e) == 2 and type(e[1]) is bytes, "bytearray")
        return bytearray(e[1])
    _check(len(e) == 3 and type(e[1]) is str and len(e[1]) == 1 and e[1] in array.typecodes
           and type(e[2]) is bytes, "array")
    out = array.array(e[1])
    try:
        out.frombytes(e[2])
    except ValueError:  # not a whole number of items
        raise _Bad("the checkpoint's loop state is malformed (array)") from None
    return out


def _fits(live: torch.Tensor, saved: torch.Tensor) -> bool:
    """Whether ``saved`` is copied into ``live`` rather than bound in its place: a tensor the script passed to
    a library object stays that object's (a WeightedRandomSampler's weights the loop updates in place were
    rebound, and the sampler drew from the relaunch's tensor from then on). Only a leaf of the same shape,
    dtype and device that is a whole storage of its own: a view (``x = data[i:i + 4]``) would write into
    what it views."""
    return (live.shape == saved.shape and live.dtype == saved.dtype and live.device == saved.device
            and live.requires_grad == saved.requires_grad and live.grad_fn is None and live._base is None
            and live.layout == torch.strided and not live.is_inference() and live.storage_offset() == 0
            and live.untyped_storage().nbytes() == live.numel() * live.element_size())


def point_of(tree: Any) -> str | None:
    """The kind of point a checkpoint's loop state was captured at ("loader", "step", "backward")."""
    if isinstance(tree, dict) and isinstance(tree.get("stack"), list) and tree["stack"]:
        p = tree["stack"][0]
        return p if isinstance(p, str) else None
    return None


def script_of(tree: Any) -> str | None:
    """The file name of the script whose loop state ``tree`` holds (its outermost frame's), or None."""
    stack = tree.get("stack") if isinstance(tree, dict) else None
    frame = stack[1] if isinstance(stack, list) and len(stack) > 1 else None
    name = frame[0] if isinstance(frame, list) and frame else None
    return name if isinstance(name, str) and name.endswith(".py") else None


def check_stack(saved: Any, user: list[types.FrameType], point: str) -> None:
    """Raise ``PyckptError`` when the script's stack now differs from the checkpoint's (``StackChanged``
    where the point kind is the same and a script frame differs: other code, another call)."""
    now = stack_signature(user, point)
    _check(isinstance(saved, list) and saved and isinstance(saved[0], str), "stack")
    if saved[0] != point:
        raise PyckptError(f"the checkpoint was taken at a {saved[0]} point, this run reached a {point} point first")
    old = [tuple(x) if isinstance(x, list) else x for x in saved[1:]]
    new = [tuple(x) for x in now[1:]]
    if old == new:
        return
    if len(old) != len(new):
        why = f"{len(old)} script frames in the checkpoint, {len(new)} now"
    else:
        differ = [i for i, (a, b) in enumerate(zip(old, new)) if a != b and not _same_continuation(a, b, user[i])]
        if not differ:
            return
        n = differ[0]
        a, b = old[n], new[n]
        where = f"{b[1]} ({b[0]}, defined at line {b[2]})"
        if isinstance(a, tuple) and len(a) == 5 and a[:3] == b[:3] and a[3] != b[3]:
            why = f"the code of {where} changed since the checkpoint was written"
        elif isinstance(a, tuple) and len(a) == 5 and a[:4] == b[:4]:
            why = f"{where} is at another instruction than in the checkpoint"
        else:
            had = f"{a[1]} ({a[0]})" if isinstance(a, tuple) and len(a) > 1 else a  # (the file: another script)
            why = f"frame {n} is {where}, the checkpoint has {had}"
    raise StackChanged(f"the script or its call stack differs from the run that wrote the checkpoint: {why}")


def _same_continuation(saved: Any, now: tuple, frame: types.FrameType) -> bool:
    """Whether a frame of the same code at another call than the checkpoint's goes on as the
    checkpoint's would (a prefetcher's ``next()`` before the loop and at the end of its body): the
    bytecode after both calls is provably the same (``continuation.same_after``)."""
    if not (isinstance(saved, tuple) and len(saved) == 5 and saved[:4] == now[:4] and type(saved[4]) is int):
        return False
    return continuation.same_after(frame.f_code, saved[4], now[4])


@dataclass
class Plan:
    """Decoded loop state, checked against the live frames, ready to write."""

    writes: list = field(default_factory=list)  # callables, run in order
    # id of each live loop iterator given a positioner -> its saved state. A generator whose frame is on the
    # stack (the snapshot point is inside it: a ``for epoch ...: for b in loader: yield b`` stream) is also
    # the iterator of a loop outside: its own loops' iterators are met twice and must be advanced once.
    positioned: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)  # lines to say once the restore is done (this rank's)
    job_warnings: list = field(default_factory=list)  # the same on every rank (the command line): rank 0 says them
    # ids of the live lists the writes refill in place with the checkpoint's (variables holding a list): a loop
    # over one iterates the checkpoint's items once they are written, whatever it holds now
    refilled: set = field(default_factory=set)
    # id of each live tuple a write rebinds to the checkpoint's -> that tuple: a loop over the live one is made
    # to iterate the checkpoint's (``it = torch.randperm(n).split(bs)``: the relaunch's holds other indices)
    rebound: dict = field(default_factory=dict)
    carried: list = field(default_factory=list)  # the loop's variables an edited script's resume puts back by name

    def refills(self, live: dict, decoded: dict) -> None:
        """Note the lists of ``live`` (a frame's locals, a module's globals) that ``_assign`` refills, and the
        tuples it rebinds."""
        for k, v in decoded.items():
            cur = live.get(k)
            if type(v) is list and isinstance(cur, list) and cur is not v:
                self.refilled.add(id(cur))
            elif type(v) is tuple and type(cur) is tuple and cur is not v:
                self.rebound[id(cur)] = v

    def apply(self) -> None:
        for w in self.writes:
            w()


def prepare_references(tree: Any, user: list[types.FrameType], states: Any) -> Plan:
    """For a script whose code changed (``StackChanged``, ``PYCKPT_RESUME_EDITED=tracked``): the states
    of modules no optimizer owns and of library objects with ``state_dict()`` (an EMA copy, a teacher, an EMA
    helper) that the checkpoint's variables referred to, loaded into the live object held by a variable of the
    same name (a global by module, a local of a frame running the same function at the same depth) when it is
    of the same class and shapes; and the variables the edited script's loops carry (``carried``: a step
    counter, a running loss, a best-so-far, the attributes of a train-state object), by name, where the relaunch's
    variable can take the checkpoint's value (``_carried_writes``). Nothing else of the loop state is written. The plan's warnings name those that cannot
    be put back; ``plan.carried`` lists the variables put back."""
    plan = Plan()
    states = states if isinstance(states, dict) else {}
    dec = _Decoder([], states)
    places: list[tuple[str, str, Any, dict | None]] = []  # (label, name, encoded, live namespace)
    gl = tree.get("globals") if isinstance(tree, dict) else None
    for modname, values in (gl.items() if isinstance(gl, dict) else ()):
        g = _module_globals(user, modname, imported=True)  # (a module the stack's reach: ``_reached_modules``)
        for k, e in (values.items() if isinstance(values, dict) else ()):
            places.append((k if modname == "__main__" else f"{modname}.{k}", k, e, g))
    loc = tree.get("locals") if isinstance(tree, dict) else None
    stack = tree.get("stack") if isinstance(tree, dict) else None
    for n, values in enumerate(loc if isinstance(loc, list) else ()):
        fn = _saved_function(stack, n)
        f = user[n] if n < len(user) else None
        same = f is not None and fn == frames.code_key(f.f_code)[1]
        for k, e in (values.items() if isinstance(values, dict) else ()):
            places.append((f"{k} (in {fn or '?'})", k, e, f.f_locals if same else None))
    objs = tree.get("objects") if isinstance(tree, dict) else None
    for o in (objs if isinstance(objs, list) else ()):  # attributes of plain objects (holder.teacher)
        attrs = o.get("attrs") if isinstance(o, dict) else None
        if not isinstance(attrs, dict) or not any(isinstance(e, list) and e[:1] in (["M"], ["O"]) for e in attrs.values()):
            continue
        try:
            obj = _resolve(o.get("at"), user)
            label = _label(o["at"])
        except Exception:  # noqa: BLE001 - a path this run lacks (the edit moved it): named below
            obj, label = None, str(o.get("at"))
        same = obj is not None and type(obj).__qualname__ == o.get("type")
        live_attrs = (_cells(obj) if type(obj) is types.FunctionType else _attrs(obj)) if same else None
        for k, e in attrs.items():
            places.append((f"{label}.{k}", k, e, live_attrs))
    missed = []
    for label, name, e, live_ns in places:
        if not (isinstance(e, list) and len(e) == 3 and e[0] in ("M", "O")):
            continue
        try:
            state = dec.value(e)
        except PyckptError:
            missed.append(f"{label} (malformed)")
            continue
        live = live_ns.get(name) if live_ns is not None else None
        why = "not there" if live is None else state.problem(live)
        if why:
            missed.append(f"{label} ({why})")
            continue
        plan.writes.append(lambda s=state, v=live: s.apply(v))
    if missed:
        plan.warnings.append("the states of modules no optimizer owns or of library objects the checkpoint's "
                             f"variables held are not restored: {'; '.join(missed)}")
    _carried_writes(tree, user, plan)
    return plan


def _saved_function(stack: Any, n: int) -> str | None:
    """The qualified name of the function the checkpoint's script frame ``n`` ran (``stack[n + 1]``, as
    ``stack_signature`` saved it: a method's ``Trainer.fit``, a nested function's ``main.<locals>.run``)."""
    saved = stack[n + 1] if isinstance(stack, list) and n + 1 < len(stack) else None
    return saved[1] if isinstance(saved, list) and len(saved) > 1 and isinstance(saved[1], str) else None


def _carried_writes(tree: dict, user: list[types.FrameType], plan: Plan) -> None:
    """``prepare_references``'s variables the edited script's loops carry: for each module whose globals the
    checkpoint holds, the names its running module-level loops assign or change in place and those its
    functions change through ``global``; for each frame running a function of the same qualified name at the
    same depth, the names its running loops assign or change. Values (numbers, strings, containers, tensors,
    arrays, values of script classes) and the attributes of the script's objects those names hold (a train
    state, a ``UserDict`` of metrics), where the relaunch holds one of the same class."""
    dec = _Decoder(tree.get("tensors") if isinstance(tree.get("tensors"), list) else [], {})
    stack, loc, gl = tree.get("stack"), tree.get("locals"), tree.get("globals")
    wrong: list[str] = []
    gnames: dict[str, set[str]] = {}  # module -> carried globals
    lnames: dict[int, set[str]] = {}  # frame index -> carried locals
    for modname in (gl if isinstance(gl, dict) else ()):
        g = _module_globals(user, modname)
        if g is not None:
            gnames[modname] = set()
            for f in user:
                if f.f_globals is g:
                    gnames[modname] |= carried.global_names(f.f_code.co_filename)
                    if frames.is_module_frame(f):
                        gnames[modname] |= carried.loop_names(f)
    for n, f in enumerate(user):
        if not frames.is_module_frame(f) and _saved_function(stack, n) == frames.code_key(f.f_code)[1]:
            lnames[n] = carried.loop_names(f)

    def take(values: Any, names: set[str], live: dict, label: Callable[[str], str]) -> dict:
        out = {}
        for k in sorted(names & set(values) if isinstance(values, dict) else ()):
            try:
                v = dec.value(values[k])
            except PyckptError:
                continue
            if isinstance(v, _StateOf):
                continue  # a module's or library object's state: prepare_references's references
            now = live.get(k, _MISSING)
            try:
                why = None if now is _MISSING or isinstance(v, (_Struct, _InPlace)) or _same_kind(now, v) else (
                    f"a {type(now).__name__} now, the checkpoint holds a {type(v).__name__}")
                why = why or _problem(v, now, dec.holders)
            except _Mismatch as e:
                why = str(e)
            if why:
                wrong.append(f"{label(k)} ({why})")
                continue
            out[k] = v
        return out

    for modname, names in gnames.items():
        g = _module_globals(user, modname)
        name = (lambda k: k) if modname == "__main__" else (lambda k, m=modname: f"{m}.{k}")
        got = take(gl[modname], names, g, name)
        if got:
            plan.carried += [name(k) for k in got]
            plan.writes.append(lambda g=g, d=got: g.update({k: _assign(g.get(k), v, dec.holders)
                                                            for k, v in d.items()}))
    for n, names in lnames.items():
        f = user[n]
        name = lambda k, f=f: f"{k} (in {f.f_code.co_name})"  # noqa: E731
        got = take(loc[n] if isinstance(loc, list) and n < len(loc) else None, names, f.f_locals, name)
        if got:
            plan.carried += [name(k) for k in got]

            def write(f=f, d=got):
                cur = f.f_locals
                frames.write_locals(f, {k: _assign(cur.get(k), v, dec.holders) for k, v in d.items()})
            plan.writes.append(write)
    objs = tree.get("objects")
    for o in (objs if isinstance(objs, list) else ()):  # objects a carried variable holds: their attributes
        at = o.get("at") if isinstance(o, dict) else None
        if not (isinstance(at, list) and len(at) >= 3 and isinstance(o.get("attrs"), dict)
                and (at[0] == "g" and at[2] in gnames.get(at[1], ()) or at[0] == "l" and at[2] in lnames.get(at[1], ()))):
            continue
        try:
            obj = _resolve(at, user)
        except PyckptError:
            wrong.append(f"{_label(at)} (not there)")
            continue
        if len(at) == 3 and (isinstance(obj, type) or type(obj) is types.FunctionType and not _script_closure(obj)):
            continue  # values kept on the script's classes and functions: code, which the edit may have changed
        if type(obj).__qualname__ != o.get("type") or type(obj) is types.FunctionType:
            wrong.append(f"{_label(at)} (a {type(obj).__qualname__} now, the checkpoint holds a {o.get('type')})")
            continue
        got = take(o["attrs"], set(o["attrs"]), _attrs(obj), lambda k, p=at: f"{_label(p)}.{k}")
        if got:
            if len(at) == 3:  # (the objects it holds in turn: not listed again)
                plan.carried.append(_label(at))
            plan.writes.append(lambda obj=obj, d=got: [setattr(obj, k, _assign(_attrs(obj).get(k), v, dec.holders))
                                                       for k, v in d.items()])
    if wrong:
        plan.warnings.append("variables the loop carries that cannot be put back keep this run's values: "
                             + "; ".join(wrong))


def _same_kind(live: Any, saved: Any) -> bool:
    """Whether the relaunch's value ``live`` may be replaced by the checkpoint's ``saved``: the same type, a
    container of that type, numbers for numbers, tensors for tensors, or None on either side (set before the
    loop's first step)."""
    if live is None or saved is None or type(live) is type(saved):
        return True
    if type(saved) in (list, dict, set, collections.deque) and isinstance(live, type(saved)):
        return True  # refilled in place (a defaultdict keeps its factory: _assign)
    num = (int, float)
    if isinstance(live, num) and isinstance(saved, num) and not isinstance(live, bool) and not isinstance(saved, bool):
        return True
    return isinstance(live, torch.Tensor) and isinstance(saved, torch.Tensor)


def _mark(v: Any) -> tuple:
    """What tells whether a variable changed: a plain value itself, a tensor's identity and version counter
    (``total += loss`` in place), a container's identity and length (``losses.append(...)``), else identity."""
    t = type(v)
    if v is None or t in _SCALAR_SET:
        return (t, v)
    if isinstance(v, torch.Tensor):
        try:
            return (id(v), v._version)
        except RuntimeError:  # an inference tensor has no version counter
            return (id(v),)
    if t in (list, dict, set, collections.deque, bytearray):
        return (id(v), len(v))
    return (id(v),)


def marks(user: list[types.FrameType]) -> dict:
    """The marks (``_mark``) of the script frames' variables at an epoch's ``iter()``: a module frame's by its
    module name, the others' by frame (with its code, so a freed frame's reused id is not taken for it)."""
    out: dict = {"globals": {}, "frames": {}}
    for f in user:
        if frames.is_module_frame(f):
            name = f.f_globals.get("__name__")
            if isinstance(name, str):
                out["globals"][name] = {k: _mark(v) for k, v in list(f.f_globals.items())}
        else:
            out["frames"][id(f)] = (f.f_code, {k: _mark(v) for k, v in f.f_locals.items()})
    return out


def changed_since(before: dict | None, user: list[types.FrameType]) -> dict | None:
    """The names of the script frames' variables whose mark differs from ``before`` (``marks`` at the epoch's
    ``iter()``): what the loader loop changed in this epoch (accumulators, a step counter), not what it leaves
    alone (the epoch counter, settings). Stored with the loop state: a relaunch binds those to the checkpoint's
    values at the end of an epoch it runs again without data (``bind_unset``). None: nothing recorded."""
    if not before:
        return None
    out: dict = {"globals": {}, "locals": []}
    for f in user:
        names: list[str] | None = None
        if frames.is_module_frame(f):
            name = f.f_globals.get("__name__")
            old = before["globals"].get(name)
            if old is not None:
                out["globals"][name] = sorted(k for k, v in list(f.f_globals.items())
                                              if k in old and old[k] != _mark(v))
        else:
            code, old = before["frames"].get(id(f), (None, None))
            if code is f.f_code:
                names = sorted(k for k, v in f.f_locals.items() if k in old and old[k] != _mark(v))
        out["locals"].append(names)
    return out


def bind_unset(tree: Any, user: list[types.FrameType]) -> list[str]:
    """At the end of an epoch a resume runs again without data: the script's variables that the loop body
    alone sets (``last_x = x``, ``loss``) are unbound there, and per-epoch code reading them (a log line,
    ``total / count``) raised NameError before the restore point. Each such variable of a frame running the
    same code as the checkpoint's frame at that depth (globals: of the same module) is bound to the
    checkpoint's value. So is each variable the loop changed in the checkpoint's epoch (``changed_since``,
    recorded with the tree): an accumulator set before the loop (``seen = 0`` ... ``seen += len(x)``) still
    holds its start there, and ``total / seen`` raised ZeroDivisionError (a tensor or container is written
    in place, as the restore point writes it: a sampler's weights the loop updates stay the sampler's).
    Other bound variables are left alone, and the restore point writes them all as usual. Only plain values
    (numbers, strings, containers, tensors, arrays); the names bound are returned."""
    if not (isinstance(tree, dict) and tree.get("version") == VERSION):
        return []
    stack, loc, gl = tree.get("stack"), tree.get("locals"), tree.get("globals")
    changed = tree.get("changed") if isinstance(tree.get("changed"), dict) else {}
    ch_gl = changed.get("globals") if isinstance(changed.get("globals"), dict) else {}
    ch_loc = changed.get("locals") if isinstance(changed.get("locals"), list) else []

    def names_in(v: Any) -> set:
        return {k for k in v if isinstance(k, str)} if isinstance(v, list) else set()
    dec = _Decoder(tree.get("tensors") if isinstance(tree.get("tensors"), list) else [], {})
    bound: list[str] = []

    def plain(e: Any) -> tuple[bool, Any]:
        try:
            v = dec.value(e)
        except PyckptError:
            return False, None
        return not (isinstance(v, (_InPlace, _Struct, _StateOf)) or id(v) in dec.holders), v

    for modname, values in (gl.items() if isinstance(gl, dict) else ()):
        g = _module_globals(user, modname)
        if g is None or not isinstance(values, dict):
            continue
        moved = names_in(ch_gl.get(modname))
        for k, e in values.items():
            if k not in g or k in moved:
                ok, v = plain(e)
                if ok:
                    g[k] = _assign(g[k], v, dec.holders) if k in g else v
                    bound.append(k)
    for n, f in enumerate(user):
        saved = stack[n + 1] if isinstance(stack, list) and n + 1 < len(stack) else None
        values = loc[n] if isinstance(loc, list) and n < len(loc) else None
        if (not isinstance(saved, list) or saved[:4] != [*frames.code_key(f.f_code)] or not isinstance(values, dict)
                or frames.is_module_frame(f)):
            continue
        live = f.f_locals
        moved = names_in(ch_loc[n] if n < len(ch_loc) else None)
        new = {}
        for k, e in values.items():
            if k not in live or k in moved:
                ok, v = plain(e)
                if ok:
                    new[k] = _assign(live[k], v, dec.holders) if k in live else v
        frames.write_locals(f, new)
        bound += [f"{k} (in {f.f_code.co_name})" for k in new]
    return bound


def prepare(tree: Any, user: list[types.FrameType], point: str, states: Any = None,
            modules: list | None = None, optimizers: list | None = None, schedulers: list | None = None) -> Plan:
    """Check and decode ``tree`` against the live script frames; nothing is written yet. ``states``: the
    module and object states the tree refers to (``Capture.states``, as saved with the rank's state).
    ``modules``, ``optimizers``: the tracked root modules and optimizers, whose flags and attributes
    (``object_attrs``) are put back too (None: not checked, not written)."""
    _check(isinstance(tree, dict) and tree.get("version") == VERSION, "version")
    check_stack(tree.get("stack"), user, point)
    dec = _Decoder(tree.get("tensors"), {} if states is None else states)
    plan = Plan()
    argv = tree.get("argv")
    if isinstance(argv, list) and argv != sys.argv[1:]:
        then, now = " ".join(map(str, argv)), " ".join(sys.argv[1:])
        plan.job_warnings.append(f"the command line differs from the run that wrote the checkpoint ({then!r} then, "
                             f"{now!r} now): the script's variables, including those derived from its arguments, "
                             "are restored as they were then")
    gl = tree.get("globals")
    _check(isinstance(gl, dict), "globals")
    reached = tree.get("reached", [])
    _check(isinstance(reached, list) and all(isinstance(e, list) and len(e) == 2 and all(isinstance(x, str) for x in e)
                                             for e in reached), "reached modules")
    digests = dict(reached)
    for modname, values in gl.items():
        g = _module_globals(user, modname, imported=True)
        if g is None and modname in digests:  # reached from the stack's modules, not running: not imported yet
            plan.warnings.append(f"the checkpoint holds variables of the script's module {str(modname)[:80]!r}, "
                                 "which this run has not imported by the restore point: they start as that "
                                 "module makes them")
            continue
        if modname in digests and _file_digest(g.get("__file__")) != digests[modname]:
            plan.warnings.append(f"the script's module {str(modname)[:80]!r} is not the text the checkpoint was "
                                 "written with (edited?): its variables start as it makes them now, not as they were")
            continue
        if g is None:
            raise PyckptError(f"the checkpoint holds globals of module {modname!r}, which this run does not have")
        _check(isinstance(values, dict), "globals of a module")
        decoded = {k: dec.value(v) for k, v in values.items()}
        _check_states(decoded, g, lambda k, m=modname: k if m == "__main__" else f"{m}.{k}", plan, dec.holders)
        plan.refills(g, decoded)
        plan.writes.append(lambda g=g, d=decoded: g.update({k: _assign(g.get(k), v, dec.holders)
                                                            for k, v in d.items()}))
    loc = tree.get("locals")
    _check(isinstance(loc, list) and len(loc) == len(user), "locals")
    for f, values in zip(user, loc):
        _check(isinstance(values, dict), "locals of a frame")
        decoded = {k: dec.value(v) for k, v in values.items()}
        _check_states(decoded, f.f_locals, lambda k, f=f: f"{k} (in {f.f_code.co_name})", plan, dec.holders)
        plan.refills(f.f_locals, decoded)
        if decoded:
            def write(f=f, d=decoded):
                cur = f.f_locals
                frames.write_locals(f, {k: _assign(cur.get(k), v, dec.holders) for k, v in d.items()})
            plan.writes.append(write)
    if modules is not None and "modules" in tree:  # first: a layer of another class is named as such
        plan.writes += object_attrs.prepare(
            tree["modules"], list(modules), dec.value,
            lambda d, live, lab: _check_states(d, live, lab, plan, dec.holders), _attrs,
            lambda live, v: _assign(live, v, dec.holders), plan.warnings)
    if optimizers is not None and "optimizers" in tree:
        plan.writes += object_attrs.prepare_optimizers(
            tree["optimizers"], list(optimizers), dec.value,
            lambda d, live, lab: _check_states(d, live, lab, plan, dec.holders), _attrs,
            lambda live, v: _assign(live, v, dec.holders))
    objs = tree.get("objects")
    _check(isinstance(objs, list), "objects")
    for o in objs:
        _check(isinstance(o, dict) and isinstance(o.get("attrs"), dict), "object")
        at = o.get("at")
        if isinstance(at, list) and len(at) >= 3 and at[0] == "m":  # held by a layer (object_attrs.py)
            if modules is None:
                continue  # (not checked: can_restore_at)
            if object_attrs.submodule(list(modules), at[1], at[2]) is None:
                continue  # a layer this run lacks: said by object_attrs.prepare
        if isinstance(at, list) and at[:1] == ["o"] and optimizers is None:
            continue  # held by an optimizer: not checked (can_restore_at)
        if isinstance(at, list) and at[:1] in (["mh"], ["ph"], ["oh"], ["sh"]) and (
                {"oh": optimizers, "sh": schedulers}.get(at[0], modules) is None):
            continue  # a hook of a layer, an optimizer or a scheduler: the same
        try:
            obj = _resolve(at, user, modules, optimizers, schedulers)
        except PyckptError as e:
            hook = isinstance(at, list) and bool(at) and at[0] in _HOOK_PATHS
            if not hook and not (isinstance(at, list) and any(isinstance(x, str) and x.startswith(_CELL) for x in at)):
                raise  # (a malformed path too: _resolve's check named it)
            # in a closure another function has now, or a hook the relaunch has not registered (yet)
            plan.warnings.append(f"{e}: its values are not restored")
            continue
        if type(obj).__qualname__ != o.get("type"):
            raise PyckptError(f"{_label(o['at'])} is a {type(obj).__qualname__} now, the checkpoint holds a "
                              f"{o.get('type')}")
        decoded = {k: dec.value(v) for k, v in o["attrs"].items()}
        if type(obj) is types.FunctionType:  # a closure: its cells
            if obj.__qualname__ != o.get("fn"):  # another function there now (a phase's step): said, not refused
                plan.warnings.append(f"{_label(o['at'])} is the function {obj.__qualname__} now, the checkpoint holds "
                                     f"{str(o.get('fn'))[:200]!r} there: its closure's values are not restored")
                continue
            _check_states(decoded, _followed(obj), lambda k, p=o["at"]: f"{_label(p)}.{k}", plan, dec.holders)
            plan.writes.append(lambda fn=obj, d=decoded: _write_function(fn, d, dec.holders))
            continue
        _check_states(decoded, _followed(obj), lambda k, p=o["at"]: f"{_label(p)}.{k}", plan, dec.holders)
        plan.writes.append(lambda obj=obj, d=decoded: [setattr(obj, k, _assign(_followed(obj).get(k), v, dec.holders))
                                                       for k, v in d.items()])
    iters = tree.get("iters")
    _check(isinstance(iters, list) and len(iters) == len(user), "iterators")
    for f, saved in zip(user, iters):
        if saved is None:
            continue
        live = frames.loop_iterators(f)
        _check(isinstance(saved, list), "iterators of a frame")
        if live is None or len(live) != len(saved):
            raise PyckptError(f"the for loops running in {f.f_code.co_name} differ from the checkpoint's")
        for it, st in zip(live, saved):
            plan.writes.append(_positioner(it, st, f.f_code.co_name, dec, plan, functools.partial(
                frames.replace_loop_iterator, f)))
    return plan


def _write_function(fn: types.FunctionType, decoded: dict, holders: set[int]) -> None:
    """Write a function's saved closure cells, default arguments and attributes back (``_followed``)."""
    _write_cells(fn, {k: v for k, v in decoded.items() if k.startswith(_CELL)}, holders)
    defaults = list(fn.__defaults__ or ())
    for k, v in decoded.items():
        if k.startswith(_DEFAULT):
            i = int(k[len(_DEFAULT):]) if k[len(_DEFAULT):].isdigit() else -1
            if 0 <= i < len(defaults):  # (another signature now: said by _check_states)
                defaults[i] = _assign(defaults[i], v, holders)
        elif not k.startswith(_CELL):
            setattr(fn, k, _assign(_attrs(fn).get(k), v, holders))
    if defaults:
        fn.__defaults__ = tuple(defaults)


def _write_cells(fn: types.FunctionType, decoded: dict, holders: set[int]) -> None:
    """Write a closure's saved cells (``<cell>name`` keys) into the live function's cells, in place where
    the value is a container (``_assign``); a name the live function has no cell for is left out
    (``_check_states`` said so)."""
    cells = dict(zip(fn.__code__.co_freevars, fn.__closure__ or ()))
    for k, v in decoded.items():
        cell = cells.get(k[len(_CELL):]) if k.startswith(_CELL) else None
        if cell is None:
            continue
        try:
            cur = cell.cell_contents
        except ValueError:
            cur = None
        cell.cell_contents = _assign(cur, v, holders)


def _resolve(path: Any, user: list[types.FrameType], modules: list | None = None,
             optimizers: list | None = None, schedulers: list | None = None) -> Any:
    _check(isinstance(path, list) and len(path) >= 3 and path[0] in ("g", "l", "m", "o", *_HOOK_PATHS), "object path")
    if path[0] in _HOOK_PATHS:  # a hook torch holds (hook_objects.py)
        n = 4 if path[0] in ("oh", "sh") else 5
        cur = hook_objects.must_resolve(path[:n], list(modules or ()), list(optimizers or ()), _hook_state,
                                        list(schedulers or ()))
        missing, path_rest = False, path[n:]
    elif path[0] == "o":  # an attribute of an optimizer of a script class (object_attrs.py)
        opts = list(optimizers or ())
        _check(type(path[1]) is int and 0 <= path[1] < len(opts) and isinstance(path[2], str), "object path")
        d = _attrs(opts[path[1]])
        cur, missing = d.get(path[2], _MISSING), path[2] not in d
        path_rest = path[3:]
    elif path[0] == "m":  # an attribute of a submodule of a tracked root (object_attrs.py)
        _check(len(path) >= 4 and isinstance(path[3], str), "object path")
        m = object_attrs.submodule(list(modules or ()), path[1], path[2])
        d = _attrs(m) if m is not None else {}
        cur, missing = d.get(path[3], _MISSING), path[3] not in d
        path_rest = path[4:]
    elif path[0] == "g":
        g = _module_globals(user, path[1], imported=True) or {}
        cur, missing = g.get(path[2], _MISSING), path[2] not in g
        path_rest = path[3:]
    else:
        _check(type(path[1]) is int and 0 <= path[1] < len(user), "object frame")
        loc = user[path[1]].f_locals
        cur, missing = loc.get(path[2], _MISSING), path[2] not in loc
        path_rest = path[3:]
    for name in path_rest:
        if missing:
            break
        d = _followed(cur)
        missing = name not in d
        cur = d.get(name) if not missing else None
    if missing:
        raise PyckptError(f"{_label(path)} does not exist at this point of the run (the checkpoint has it)")
    return cur


_MISSING = object()
_HOOK_PATHS = ("mh", "ph", "oh", "sh")


def _positioner(it: Any, st: Any, where: str, dec: "_Decoder", plan: Plan,
                replace: Callable[[Any, Any], bool] | None = None):
    """A write that puts loop iterator ``it`` at saved position ``st``; raises now if it cannot. ``replace``:
    ``frames.replace_loop_iterator`` of the frame whose loop runs ``it`` directly (a range made from other
    values is then replaced by the checkpoint's)."""
    _check(isinstance(st, list) and st and isinstance(st[0], str), "iterator state")
    if id(it) in plan.positioned:
        if plan.positioned[id(it)] != st:  # one iterator, captured at one point: one saved state
            raise PyckptError(f"the checkpoint holds two positions for one loop iterator in {where}")
        return lambda: None
    plan.positioned[id(it)] = st
    kind = st[0]
    tn = type(it).__name__
    from torch.utils.data.dataloader import _BaseDataLoaderIter

    bad = PyckptError(f"a for loop in {where} iterates a {tn} now, the checkpoint has {kind}")
    if kind == "loader":
        if not isinstance(it, _BaseDataLoaderIter):
            raise bad
        return lambda: None  # pyckpt's fast-forward positioned it
    if kind == "unknown":
        return lambda: None  # warned about when the checkpoint was written
    if kind == "pyckpt":
        _check(len(st) == 2 and isinstance(st[1], str), "pyckpt generator")
        f = it.gi_frame if isinstance(it, types.GeneratorType) else None
        if f is None or not frames.is_own_file(f.f_code.co_filename) or it.__qualname__ != st[1]:
            raise bad
        return lambda: None  # pyckpt positions the data source it wraps (the loader's fast-forward)
    if kind == "enumerate":
        _check(len(st) == 3 and type(st[1]) is int, "enumerate")
        if type(it) is not enumerate:
            raise bad
        # A sequence inside to be replaced (a rebound tuple, another range): a new enumerate over the
        # replacement, from the saved index, takes the old one's place in the frame.
        inner = _positioner(it.__reduce__()[1][0], st[2], where, dec, plan, None if replace is None else (
            lambda _old, new: replace(it, enumerate(new, st[1]))))

        def enum() -> None:
            inner()
            if not frames.set_enumerate_index(it, st[1]):
                raise PyckptError("cannot set an enumerate() index on this interpreter")
        return enum
    if kind == "zip":
        _check(len(st) == 2 and isinstance(st[1], list), "zip")
        if type(it) is not zip:
            raise bad
        parts = it.__reduce__()[1]
        if len(parts) != len(st[1]):
            raise bad
        subs = [_positioner(p, s, where, dec, plan) for p, s in zip(parts, st[1])]
        return lambda: [s() for s in subs]
    if kind == "chain":
        _check(len(st) == 2 and type(st[1]) is int, "chain")
        left = _loaders_left(it) if type(it) is itertools.chain else None
        if left is None:
            raise bad
        if left != st[1]:
            raise PyckptError(f"a for loop in {where} over itertools.chain of loaders has {left} loader(s) left "
                              f"in it now, {st[1]} in the checkpoint")
        return lambda: None  # the loaders' fast-forward positioned it
    if kind == "wraps":
        _check(len(st) == 3 and isinstance(st[1], str) and isinstance(st[2], list), "wrapping iterator")
        parts = _wrapped(it)
        if tn != st[1] or parts is None or len(parts) != len(st[2]):
            raise PyckptError(f"a for loop in {where} iterates a {tn} now, the checkpoint has {st[1]}")
        subs = [_positioner(p, s, where, dec, plan) for p, s in zip(parts, st[2])]
        return lambda: [s() for s in subs]
    if kind == "generator":
        _check(len(st) == 4 and isinstance(st[1], list) and isinstance(st[2], dict) and isinstance(st[3], list),
               "generator")
        f = it.gi_frame if isinstance(it, types.GeneratorType) else None
        if f is None or [*frames.code_key(f.f_code), frames.position(f)] != st[1]:
            raise PyckptError(f"a for loop in {where} iterates another generator, or one at another point, "
                              "than in the checkpoint")
        decoded = {k: dec.value(v) for k, v in st[2].items()}
        _check_states(decoded, f.f_locals, lambda k: f"{k} (in generator {it.__qualname__})", plan, dec.holders)
        live = frames.loop_iterators(f)
        if live is None or len(live) != len(st[3]):
            raise PyckptError(f"the for loops running in generator {it.__qualname__} differ from the checkpoint's")
        subs = [_positioner(x, s, f"generator {it.__qualname__}", dec, plan, functools.partial(
            frames.replace_loop_iterator, f)) for x, s in zip(live, st[3])]

        def gen() -> None:
            cur = f.f_locals
            frames.write_locals(f, {k: _assign(cur.get(k), v, dec.holders) for k, v in decoded.items()})
            for s in subs:
                s()
        return gen
    if kind == "islice":
        _check(len(st) == 4 and type(st[1]) is int and st[1] >= 0 and (st[2] is None or type(st[2]) is int),
               "islice")
        live = _islice_state(it)
        if live is None:
            raise bad
        if live[2] != st[2]:
            raise PyckptError(f"a for loop in {where} runs an islice that stops at {live[2]} now, the checkpoint's "
                              f"stopped at {st[2]}")
        inner = _positioner(live[0], st[3], where, dec, plan)

        def islice() -> None:
            inner()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                it.__setstate__(st[1])  # the items taken so far: where it stops counts from them
        return islice
    if kind == "count":
        _check(len(st) == 2 and type(st[1]) is int, "count")
        if type(it) is not itertools.count:
            raise bad
        args = it.__reduce__()[1]
        step = args[1] if len(args) > 1 else 1
        if type(step) is not int or step == 0 or (st[1] - args[0]) % step or (st[1] - args[0]) // step < 0:
            raise bad

        def count() -> None:
            for _ in range((st[1] - it.__reduce__()[1][0]) // step):
                next(it)
        return count
    if tn != kind:
        raise bad
    _check(len(st) in (2, 3) and type(st[1]) is int and st[1] >= 0, "items left")
    if kind in _DICT_ITERATORS:
        return _dict_positioner(it, st, where)
    seq = _sequence_of(it)
    if seq is not None and id(seq) in plan.rebound:
        # The loop runs over a tuple a variable held, which the restore rebinds to the checkpoint's: it goes on
        # through the checkpoint's tuple from the saved position.
        saved = plan.rebound[id(seq)]
        if replace is None or st[1] > len(saved):
            raise PyckptError(f"a for loop in {where} iterates a tuple that is restored as another object; pyckpt "
                              "cannot make the loop iterate the restored one there")
        new = iter(saved)
        collections.deque(itertools.islice(new, len(saved) - st[1]), maxlen=0)

        def swap_tuple() -> None:
            if not replace(it, new):
                raise PyckptError(f"cannot make a for loop in {where} iterate the restored tuple on this interpreter")
        return swap_tuple
    _check(len(st) == 2 or (isinstance(st[2], list) and st[2] and st[2][0] in ("range", "items", "values")), "items")
    if len(st) == 3 and st[2][0] == "values":
        _check(len(st[2]) == 2, "saved items")
        items = dec.value(st[2][1])
        _check(isinstance(items, tuple) and len(items) == st[1], "saved items")
        if replace is None:
            raise PyckptError(f"a for loop in {where} iterates items no variable holds, inside another iterator; "
                              "pyckpt cannot put the checkpoint's back there")
        new = iter(items)

        def swap_items() -> None:
            if not replace(it, new):
                raise PyckptError(f"cannot put the items a for loop in {where} iterates back on this interpreter")
        return swap_items
    skip = it.__length_hint__() - st[1]
    refilled = seq is not None and id(seq) in plan.refilled  # compared with the checkpoint's once written
    rest = _rest_of(it, max(skip, 0)) if len(st) == 3 and not refilled else None
    if rest is not None and rest != st[2]:
        # The loop's items depend on what ran before it (``for k in range(part * 10, part * 10 + 5)`` inside
        # ``for part in ...``): the relaunch made its iterator from other values than the checkpoint's run.
        if st[2][0] == "range" and replace is not None and all(type(x) is int for x in st[2][1:]) and st[2][3]:
            new = iter(range(st[2][1], st[2][2], st[2][3]))

            def swap() -> None:
                if not replace(it, new):
                    raise PyckptError(f"cannot put the range a for loop in {where} iterates back on this interpreter")
            return swap
        raise PyckptError(f"a for loop in {where} iterates other items now than in the checkpoint (its iterable "
                          "depends on what ran before it); pyckpt cannot put them back")
    if skip < 0:
        raise PyckptError(f"a for loop in {where} has fewer items left now ({it.__length_hint__()}) than in the "
                          f"checkpoint ({st[1]})")
    # Advance at C speed (the same on every Python version; __setstate__'s meaning changed in 3.12).
    return lambda: collections.deque(itertools.islice(it, skip), maxlen=0)
