"""Random generators the data pipeline's objects hold deeper than ``loader_state.generators``' named shapes.

``generators`` looks at fixed places: the loader, its samplers and one level of their helpers, the dataset and what
it wraps, their callable parts, the collator. A generator one object further (a dataset's ``self.aug =
Noise(seed)`` drawing through a method, not ``__call__``; a transform's ``self.src.rng``; a sampler's helper's
helper) was not kept, and a relaunch, which loads none of the batches it skips, drew other numbers from it: a
silent wrong resume. ``walk`` follows the objects those parts hold, breadth first, up to ``HOPS`` attributes (or
container items, closure cells, a partial's arguments, a bound method's object) from each root and ``BUDGET``
objects in all, and hands each generator it meets to ``add`` under the key of the path it took
(``dataset.aug.rng``), the same form of key ``loader_state._owner_of`` follows back. The class of an object of the
script's own classes is looked into too (``rng = np.random.default_rng(5)`` in a dataset's class body, drawn as
``DS.rng``: key ``dataset.__class__.rng``). It runs after the named shapes, so a generator found there keeps its
key (``add`` ignores one seen before), and a checkpoint of an earlier pyckpt still matches. ``loader_workers``
walks the script's global objects too (``AUG = Noise(5)`` drawn from in ``__getitem__``: each worker's copy).
"""
from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data.dataloader import _BaseDataLoaderIter

from . import frames, rng

HOPS = 5  # attributes from a root: dataset.datasets.0.transform.aug.rng
BUDGET = 512  # objects looked into per call: a few hundred attribute reads (each iter() and snapshot)
HELD_MAX = 32  # items of a list, tuple or dict looked into (not a dataset's list of samples)
CLASS_ATTRS_MAX = 256  # names of a class looked at (its methods among them)

# Objects never looked into: the machinery of processes, threads and I/O (a worker pool's queues), and
# kinds that hold data or code rather than a pipeline's helpers.
_SKIP_MODULES = ("multiprocessing", "threading", "queue", "concurrent", "logging", "weakref", "io", "_io",
                 "socket", "subprocess", "asyncio", "ctypes")
_WALK: dict[type, bool] = {}
_FOLLOWED = (list, tuple, dict, types.FunctionType, types.MethodType, functools.partial)


def walkable(t: type) -> bool:
    """Whether ``walk`` looks into an object of class ``t`` (cached per class)."""
    ok = _WALK.get(t)
    if ok is None:
        mod = t.__module__ or ""
        ok = _WALK[t] = (mod != "builtins" and mod.split(".")[0] not in _SKIP_MODULES
                         and not issubclass(t, (type, types.ModuleType, torch.nn.Module, torch.Tensor,
                                                _BaseDataLoaderIter, torch.utils.data.DataLoader)))
    return ok


def walk(roots: list[tuple[str, Any]], add: Callable[[str, str, Any], None],
         pids: list[str] | None = None, pid: int | None = None) -> None:
    """Hand ``add(key, kind, generator)`` each random generator held below ``roots`` ((key, object) each,
    in order: a generator reachable from two roots is met under the first's key). ``pids`` given: the keys
    of int attributes equal to ``pid`` beside a generator are added to it (see ``loader_state.generators``)."""
    seen: set[int] = {id(obj) for _, obj in roots}
    todo: list[tuple[str, Any, int]] = [(key, obj, 0) for key, obj in roots if obj is not None]
    kind_of = rng.kind_of
    looked = 0
    while todo and looked < BUDGET:
        nxt: list[tuple[str, Any, int]] = []
        classes: list[tuple[str, Any, int]] = []
        for prefix, obj, depth in todo:
            if looked >= BUDGET:
                break
            looked += 1
            if type(obj) is types.FunctionType:  # a closure: its cells, as ``prefix.closure.name``
                items = _cells(obj)
                prefix = f"{prefix}.closure"
            elif type(obj) is functools.partial:  # ``partial(jitter, rng=g)`` as a transform: what it binds
                items = [*((f"args.{i}", a) for i, a in enumerate(obj.args[:HELD_MAX])),
                         *((f"keywords.{k}", a) for k, a in list(obj.keywords.items())[:HELD_MAX])]
            elif type(obj) is types.MethodType:  # ``aug.apply`` as a transform: its object
                items = [("__self__", obj.__self__)]
            elif type(obj) in (list, tuple):
                items = list(enumerate(obj)) if len(obj) <= HELD_MAX else []
            elif type(obj) is dict:
                items = [kv for kv in obj.items() if type(kv[0]) in (int, str)] if len(obj) <= HELD_MAX else []
            elif isinstance(obj, type):  # a script class's own attributes (``rng = ...`` in its body)
                items = [(k, v) for k, v in list(vars(obj).items())[:CLASS_ATTRS_MAX]
                         if not k.startswith("__") and (kind_of(v) is not None or walkable(type(v)))]
            else:
                try:
                    attrs = getattr(obj, "__dict__", None)
                except Exception:  # noqa: BLE001 - a class whose __dict__ is a property that raises: not looked into
                    attrs = None
                items = list(attrs.items()) if type(attrs) is dict else []
                t = type(obj)
                if depth + 1 < HOPS and id(t) not in seen and frames.is_script_class(t):
                    seen.add(id(t))  # (after its attributes below: theirs are met first)
                    classes.append((f"{prefix}.__class__", t, depth + 1))
            beside = False
            for name, v in items:
                kind = kind_of(v)
                if kind is not None:
                    add(f"{prefix}.{name}", kind, v)
                    beside = True
                elif depth + 1 < HOPS and id(v) not in seen and (
                        type(v) in _FOLLOWED or walkable(type(v))):
                    seen.add(id(v))
                    nxt.append((f"{prefix}.{name}", v, depth + 1))
            if beside and pids is not None:
                pids.extend(k for name, v in items if type(v) is int and v == pid
                            and (k := f"{prefix}.{name}") not in pids)  # (the named shapes' own, once)
        todo = nxt + classes


def _cells(fn: types.FunctionType) -> list[tuple[str, Any]]:
    out = []
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        try:
            out.append((name, cell.cell_contents))
        except ValueError:  # an empty cell
            pass
    return out
