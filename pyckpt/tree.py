"""Nested state <-> (JSON tree, list of tensors).

Every tensor becomes ``{"__pyckpt__": "tensor", "id": N}``; the other
supported non-JSON values become tagged objects (docs/FORMAT.md "State
tree"). Anything else raises ``UnsupportedStateError`` naming its key path,
before anything is written. Decoding builds only plain containers and the
few listed types: it never imports or calls anything named in the file.
"""
from __future__ import annotations

import base64
import collections
import functools
import math
import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from . import _native
from .dtypes import DTYPE_TO_CODE, dtype_of
from .errors import CorruptCheckpointError, PyckptError, UnsupportedStateError

TAG = "__pyckpt__"
_MAX_DEPTH = 200
MAX_DEPTH = _MAX_DEPTH


def _path(parent: str, key: object) -> str:
    return f"{parent}/{key}" if parent else str(key)


def _short_path(path: str) -> str:
    """A key path of hundreds of levels cut to its first four keys and its last two (for one line)."""
    keys = path.split("/")
    return path if len(keys) <= 8 else "/".join(keys[:4] + ["..."] + keys[-2:])


_TENSOR_TYPES = frozenset((torch.Tensor, torch.nn.Parameter))


class _Encoder:
    """Encodes a state tree. A training state has thousands of tensors and their containers, encoded
    at every snapshot: the children of plain dicts and lists that are plain scalars or plain tensors
    are encoded inline (no call, no key path made for a scalar); everything else takes ``value``."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []
        self.paths: list[str] = []
        self.arrays: dict[int, torch.Tensor] = {}  # id of a NumPy array -> its copy (held by the state: ids stable)

    def value(self, v: Any, path: str, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise UnsupportedStateError(f"state is nested deeper than {_MAX_DEPTH} levels at {_short_path(path)!r} (as a "
                                        "container that holds itself does)", key=path)
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, int):
            return int(v)
        if isinstance(v, float):
            return float(v) if math.isfinite(v) else {TAG: "float", "value": repr(float(v))}
        if isinstance(v, torch.Tensor):
            self.tensors.append(v)
            self.paths.append(path)
            return {TAG: "tensor", "id": len(self.tensors) - 1}
        if type(v) is collections.Counter:  # MultiStepLR's milestones: its step(epoch) calls Counter.elements()
            enc = self.mapping(v, path, depth)
            items = enc["items"] if TAG in enc else [[k, x] for k, x in enc.items()]
            return {TAG: "counter", "items": items}
        if isinstance(v, dict):
            return self.mapping(v, path, depth)
        if isinstance(v, list):
            return self.sequence(v, path, depth)
        return self.special(v, path, depth)

    def child(self, x: Any, path: str, key: Any, depth: int) -> Any:
        """``value(x, _path(path, key), depth)``, inline for plain scalars and tensors."""
        tp = type(x)
        if tp is str or tp is int or tp is bool or x is None:
            if depth <= _MAX_DEPTH:
                return x
        elif tp in _TENSOR_TYPES:
            if depth <= _MAX_DEPTH:
                self.tensors.append(x)
                self.paths.append(_path(path, key))
                return {TAG: "tensor", "id": len(self.tensors) - 1}
        return self.value(x, _path(path, key), depth)

    def sequence(self, v: list, path: str, depth: int) -> list:
        d1 = depth + 1
        if d1 > _MAX_DEPTH or not _SCALAR_TYPES.issuperset(map(type, v)):
            child = self.child
            return [child(x, path, i, d1) for i, x in enumerate(v)]
        return list(v)  # plain scalars only (an optimizer's parameter ids): as they are

    def special(self, v: Any, path: str, depth: int) -> Any:
        # torch.Size is a tuple subclass: test it first.
        if isinstance(v, torch.Size):
            return {TAG: "size", "dims": list(v)}
        if type(v) is tuple:
            return {TAG: "tuple", "items": self.sequence(list(v), path, depth)}
        if isinstance(v, torch.dtype) and v in DTYPE_TO_CODE:
            return {TAG: "dtype", "code": DTYPE_TO_CODE[v]}
        if isinstance(v, torch.device):
            return {TAG: "device", "value": str(v)}
        if isinstance(v, (bytes, bytearray)):
            return {TAG: "bytes", "base64": base64.b64encode(bytes(v)).decode("ascii")}
        np = sys.modules.get("numpy")  # an array or a NumPy scalar means NumPy is imported already
        if np is not None and isinstance(v, (np.ndarray, np.generic)):
            return self.array(v, np, path)
        raise UnsupportedStateError(
            f"cannot save {type(v).__module__}.{type(v).__qualname__} at {path!r}: pyckpt stores tensors, "
            "JSON values, tuples, bytes, torch.dtype/Size/device and NumPy arrays only (no pickle); convert "
            "it, e.g. to a dict of those, or drop it from the state",
            key=path,
        )

    def array(self, v: Any, np: Any, path: str) -> dict:
        """A NumPy array or scalar: its bytes as a tensor entry (no pickle), tagged to come back as NumPy.

        Copied here, at the save call: a write to the array before the copy in the background would not
        move a tensor version counter (the torn-save check), so it would be saved silently."""
        # One array held in several places is copied once: its entries share that copy's storage, so they
        # load as arrays sharing memory, as torch.save's do.
        is_array = isinstance(v, np.ndarray)
        t = self.arrays.get(id(v)) if is_array else None
        if t is None:
            a = np.asarray(v)
            try:
                t = torch.from_numpy(a.astype(a.dtype.newbyteorder("="), order="C", copy=True))
            except TypeError:
                raise UnsupportedStateError(
                    f"cannot save a NumPy array of dtype {v.dtype} at {path!r}: only bool and numeric dtypes have "
                    "a byte layout pyckpt stores (no pickle); convert it, e.g. to a list", key=path) from None
            if is_array:
                self.arrays[id(v)] = t
        self.tensors.append(t)
        self.paths.append(path)
        node = {TAG: "ndarray", "id": len(self.tensors) - 1}
        if not is_array:  # an np.generic
            node["scalar"] = True
        return node

    def mapping(self, d: dict, path: str, depth: int) -> Any:
        d1 = depth + 1
        if TAG not in d and _STR_ONLY.issuperset(map(type, d)):
            if d1 > _MAX_DEPTH:  # every child is too deep: the first one says where
                for k, x in d.items():
                    return self.value(x, _path(path, k), d1)
                return {}
            return self.plain_mapping(d, path, d1)
        # Non-string keys (optimizer state's int keys) keep their type.
        child, items = self.child, []
        for k, x in d.items():
            tk = type(k)
            if tk is int or tk is str:
                ek = k  # the common keys, as child() returns them (too deep: the value below says so, same path)
            elif k is None or isinstance(k, (bool, int, float, str, tuple)) or _numpy_scalar(k):
                ek = child(k, path, k, d1)
            else:
                raise UnsupportedStateError(f"cannot save dict key {k!r} of type {type(k).__name__} at {path!r}",
                                            key=path)
            if type(x) is dict and d1 < _MAX_DEPTH and TAG not in x and _STR_ONLY.issuperset(map(type, x)):
                items.append([ek, self.plain_mapping(x, _path(path, k), d1 + 1)])  # an optimizer's per-parameter state
            else:
                items.append([ek, child(x, path, k, d1)])
        return {TAG: "dict", "items": items}

    def plain_mapping(self, d: dict, path: str, d1: int) -> dict:
        """A dict with plain ``str`` keys whose children sit at depth ``d1`` (<= the limit): children that
        are plain scalars, tensors or such dicts are encoded here, without a call each."""
        out = {}
        tensors, paths = self.tensors, self.paths
        pre = f"{path}/" if path else ""
        for k, x in d.items():
            tp = type(x)
            if tp is str or tp is int or tp is bool or x is None:
                out[k] = x
            elif tp in _TENSOR_TYPES:
                out[k] = {TAG: "tensor", "id": len(tensors)}
                tensors.append(x)
                paths.append(pre + k)
            elif tp is dict and d1 < _MAX_DEPTH and TAG not in x and _STR_ONLY.issuperset(map(type, x)):
                out[k] = self.plain_mapping(x, pre + k, d1 + 1)
            else:
                out[k] = self.value(x, pre + k, d1)
        return out


def _numpy_scalar(v: Any) -> bool:
    np = sys.modules.get("numpy")
    return np is not None and isinstance(v, np.generic)


_STR_ONLY = frozenset((str,))
_SCALAR_TYPES = frozenset((str, int, bool, type(None)))


class Flat(NamedTuple):
    """An encoded state: its JSON tree, its tensors (the tree's ``{"__pyckpt__": "tensor", "id": N}``
    is ``tensors[N]``) and each tensor's key path. A save takes one in place of a state: the transparent
    layer encodes a snapshot once and swaps tensors in the list (lazy.py) instead of walking and
    rebuilding the state's containers."""

    tree: Any
    tensors: list[torch.Tensor]
    paths: list[str]


def flatten(state: Any) -> Flat:
    """Encode ``state``: returns (json_tree, tensors, key path of each tensor)."""
    if _native_encode is None:
        return flatten_python(state)
    enc = _Encoder()  # the same encoding, its common cases in C++ (the rest calls back into enc)
    tree = _native_encode(enc, state, TAG, torch.Tensor, torch.nn.Parameter, OrderedDict, _MAX_DEPTH)
    return Flat(tree, enc.tensors, enc.paths)


def flatten_python(state: Any) -> Flat:
    """``flatten`` in Python only (the reference the native encoder is tested against)."""
    enc = _Encoder()
    return Flat(enc.value(state, "", 0), enc.tensors, enc.paths)


# None without the extension (or with a build older than it): flatten is then flatten_python.
_native_encode: Callable[..., Any] | None = getattr(_native._C, "encode_state_tree", None)


def numpy_keys(flat: Flat) -> list[str]:
    """The key paths of the NumPy arrays and scalars in an encoded state."""
    found: list[str] = []
    todo = [flat.tree]
    while todo:
        v = todo.pop()
        if type(v) is dict:
            if v.get(TAG) == "ndarray":
                found.append(flat.paths[v["id"]])
            else:
                todo.extend(v.values())
        elif type(v) is list:
            todo.extend(v)
    return sorted(found)


MakeTensor = Callable[[int, Any, str], torch.Tensor]


class NumpyLeaf(NamedTuple):
    """The ``into_leaf`` ``make_tensor`` gets for a NumPy array's or scalar's entry: a value, like an
    int, that ``into=`` never supplies a target for (and a strict load does not ask one of). The reader
    checks the entry by it before reading anything: a dtype NumPy has, no dimensions for a scalar."""

    scalar: bool


ARRAY, SCALAR = NumpyLeaf(False), NumpyLeaf(True)


def unflatten(tree: Any, make_tensor: MakeTensor, into: Any = None, where: str = "") -> Any:
    """Decode a JSON tree. ``make_tensor(id, into_leaf, key_path)`` supplies each tensor;
    ``into`` is walked in parallel so the tensor at each path gets its destination."""
    try:
        return _Decoder(make_tensor, where).value(tree, into, "")
    except RecursionError:
        raise CorruptCheckpointError(f"state tree in {where} is nested too deeply", path=where) from None


class _Decoder:
    def __init__(self, make_tensor: MakeTensor, where: str) -> None:
        self.make_tensor = make_tensor
        self.where = where

    def bad(self, path: str, why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"malformed state tree in {self.where} at {path!r}: {why}", path=self.where)

    def value(self, v: Any, into: Any, path: str) -> Any:
        tp = type(v)
        if tp in _SCALARS:
            return v
        # Most nodes are plain JSON objects and lists: decoded inline, with no key path made
        # for a scalar child (a checkpoint of many tensors has tens of thousands of nodes).
        if tp is dict:
            if TAG in v:
                return self.tagged(v, into, path)
            pre, val, sub = f"{path}/" if path else "", self.value, _children(into)
            return {k: x if type(x) in _SCALARS else val(x, sub(k), f"{pre}{k}") for k, x in v.items()}
        if tp is list:
            pre, val, sub = f"{path}/" if path else "", self.value, _children(into)
            return [x if type(x) in _SCALARS else val(x, sub(i), f"{pre}{i}") for i, x in enumerate(v)]
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, list):
            return [self.value(x, _child(into, i), _path(path, i)) for i, x in enumerate(v)]
        if not isinstance(v, dict):
            raise self.bad(path, f"unexpected {type(v).__name__}")
        if TAG not in v:
            return {k: self.value(x, _child(into, k), _path(path, k)) for k, x in v.items()}
        return self.tagged(v, into, path)

    def tagged(self, v: dict, into: Any, path: str) -> Any:
        tag = v[TAG]
        try:
            if tag == "tensor":
                if type(v["id"]) is not int:
                    raise TypeError("tensor id must be an integer")
                return self.make_tensor(v["id"], into if isinstance(into, torch.Tensor) else None, path)
            if tag == "float":
                return float(_FLOATS[v["value"]])
            if tag == "tuple":
                return tuple(self.value(x, _child(into, i), _path(path, i)) for i, x in enumerate(v["items"]))
            if tag == "dict":
                return self.mapping(v["items"], into, path)
            if tag == "counter":
                return collections.Counter(self.mapping(v["items"], into, path))
            if tag == "size":
                return torch.Size([int(d) for d in v["dims"]])
            if tag == "dtype":
                return dtype_of(v["code"], self.where)
            if tag == "device":
                return torch.device(str(v["value"]))
            if tag == "bytes":
                return base64.b64decode(v["base64"], validate=True)
            if tag == "ndarray":
                if type(v["id"]) is not int:
                    raise TypeError("tensor id must be an integer")
                scalar = v.get("scalar") is True
                return _as_numpy(self.make_tensor(v["id"], SCALAR if scalar else ARRAY, path), scalar)
        except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as e:
            if isinstance(e, PyckptError):
                raise  # from make_tensor: already says what is wrong
            raise self.bad(path, f"bad {_short(tag)} object ({type(e).__name__})") from None
        raise self.bad(path, f"unknown tag {_short(tag)} (written by a newer pyckpt?)")

    def mapping(self, items: list, into: Any, path: str) -> dict:
        if not isinstance(items, list):
            raise TypeError("dict items must be a list")
        out = {}
        for item in items:
            if not (isinstance(item, list) and len(item) == 2):
                raise ValueError("dict items must be [key, value] pairs")
            k = self.value(item[0], None, path)
            if k in out:
                raise self.bad(path, f"dict key {_short(k)} appears twice")
            out[k] = self.value(item[1], _child(into, k), _path(path, k))
        return out


def _as_numpy(t: Any, scalar: bool) -> Any:
    """An ``ndarray`` node's tensor as NumPy: a new array (a scalar where the node says so). A leaf
    without bytes (a meta tensor, ``pyckpt inspect``'s description) is returned as it is."""
    if not isinstance(t, torch.Tensor) or t.is_meta:
        return t
    try:
        import numpy  # noqa: F401  (torch's .numpy() needs it)
    except ImportError:
        raise PyckptError("this checkpoint holds NumPy arrays: install numpy to load it") from None
    a = t.detach().cpu().numpy()
    if scalar:
        if a.ndim != 0:
            raise ValueError("a scalar's tensor must have no dimensions")
        return a[()]
    return a


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_SCALARS = frozenset({type(None), bool, int, float, str})  # JSON's scalars, decoded as they are
_NO_CHILDREN: dict = {}


def _children(into: Any) -> Callable[[Any], Any]:
    """``key -> _child(into, key)``, a plain ``dict.get`` where ``into`` is a plain mapping or None."""
    if into is None:
        return _NO_CHILDREN.get
    if type(into) is dict or type(into) is OrderedDict:
        return into.get
    return functools.partial(_child, into)


def _child(into: Any, key: Any) -> Any:
    """The parallel ``into`` node at ``key``, or None when ``into`` has none."""
    if into is None:
        return None
    try:
        if isinstance(into, dict):
            return into.get(key)
        if isinstance(into, (list, tuple)) and isinstance(key, int) and 0 <= key < len(into):
            return into[key]
    except TypeError:
        return None
    return None
