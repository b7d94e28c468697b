"""Plain settings the data pipeline's objects keep (of the script's classes, and collators), set while training.

A dataset's ``seq_len`` warmed up after each step, a curriculum's ``difficulty`` raised at some step, a
collator's ``mask_prob`` annealed, a batch sampler's ``batch_size`` grown: the loop sets them on the
dataset, sampler or ``collate_fn`` object, which are no loop state (``loopstate`` leaves datasets and
samplers to the loader's fast-forward), and the relaunch's fast-forward skips the steps that set them.
The resumed epoch then loaded its batches with the relaunch's values: silently other data.

So the loader's parts of the script's classes (the dataset and the datasets it wraps, two levels down;
each sampler of the chain; a ``collate_fn`` that is an object), the samplers of torch's own classes and a
``collate_fn`` object of a library's class with the collator it wraps (transformers'
``DataCollatorForLanguageModeling``, whose ``mlm_probability`` a Trainer callback may anneal), except
those with a ``state_dict()``/``load_state_dict()`` of their own (restored through it), have their plain
attributes (``None``, ``bool``, ``int``, ``float``, ``str``) kept twice in the loader's position: as they
were at the epoch's ``iter()`` (when worker processes took their copies of the dataset, and a sampler
draws its order; for persistent workers reused, the dataset's and collator's as at the ``iter()`` that started
them, the samplers' as at this one, since they run in the main process at every epoch), put back before the
resumed epoch's ``iter()`` starts its workers, and as they were at the snapshot point, put back there. A
sampler's tensor attributes are kept so too (the weights of a ``WeightedRandomSampler`` the loop updates
from per-sample losses, hard-example mining: the resumed epoch drew its samples with the relaunch's
weights), up to ``MAX_TENSOR_BYTES`` each (one above is named in a warning), copied back into the live
tensor (the script's variable is often the same tensor). Containers and other values are left to the
relaunch (a file list is made again; an order shuffled per epoch comes out the same from ``epoch_gaps``).
"""
from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

from . import frames

_PLAIN = (type(None), bool, int, float, str)
MAX_ATTRS = 64  # per object: settings, not data
MAX_TENSOR_BYTES = 64 << 20  # per sampler tensor (a weight per sample: 8 million samples in float64)


def _torch_sampler(t: type) -> bool:
    return t.__module__.startswith("torch.utils.data") and issubclass(t, torch.utils.data.Sampler)


def parts(loader: Any, samplers: list) -> list[tuple[str, Any]]:
    """(key, object) for the loader's parts that are instances of the script's classes, its samplers of
    torch's classes and its collator objects, in a fixed order: ``dataset`` and what it wraps
    (``dataset.dataset``, ``dataset.datasets.0``, two levels down), each of ``samplers`` (``sampler.0`` ...),
    ``collate_fn`` and a collator it holds (``collate_fn.data_collator``)."""
    found: list[tuple[str, Any]] = []
    seen: set[int] = set()

    def add(key: str, obj: Any) -> None:
        t = type(obj)
        ours = (frames.is_script_class(t) or (key.startswith("sampler.") and _torch_sampler(t))
                or (key.startswith("collate_fn") and _collator(t)))
        if (id(obj) not in seen and ours and isinstance(getattr(obj, "__dict__", None), dict)
                and not (callable(getattr(t, "state_dict", None)) and callable(getattr(t, "load_state_dict", None)))):
            seen.add(id(obj))  # (one with its own state_dict() is positioned through it: loader_state)
            found.append((key, obj))

    level = [("dataset", getattr(loader, "dataset", None))]
    for _ in range(3):
        inner = []
        for key, ds in level:
            if not isinstance(ds, Dataset):
                continue
            add(key, ds)
            held = getattr(ds, "__dict__", None)
            for name, v in (held.items() if isinstance(held, dict) else ()):
                if isinstance(v, Dataset):
                    inner.append((f"{key}.{name}", v))
                elif type(v) in (list, tuple) and len(v) <= 32:
                    inner += [(f"{key}.{name}.{i}", x) for i, x in enumerate(v) if isinstance(x, Dataset)]
        level = inner
    for i, s in enumerate(samplers):
        add(f"sampler.{i}", s)
    collate = getattr(loader, "collate_fn", None)
    if collate is not None:  # an object (a function is no script class's instance nor a collator)
        add("collate_fn", collate)
        held = getattr(collate, "__dict__", None) if not isinstance(collate, types.FunctionType) else None
        for name, v in (list(held.items())[:MAX_ATTRS] if isinstance(held, dict) else ()):
            if _collator(type(v)):  # the collator a wrapper calls (the Trainer's RemoveColumnsCollator's)
                add(f"collate_fn.{name}", v)
    return found


def _collator(t: type) -> bool:
    """A collate_fn object of a library's class (transformers' ``DataCollatorForLanguageModeling``, whose
    ``mlm_probability`` a callback may anneal while training): called, not a function, module or class."""
    return (t.__module__ != "builtins" and not issubclass(t, (type, torch.nn.Module, functools.partial))
            and any("__call__" in vars(c) for c in t.__mro__[:-1]))


def capture(loader: Any, samplers: list, over: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``{key: {"type": class qualname, "attrs": {name: value}}}`` of ``parts``' plain attributes, and of a
    sampler's tensors (copies). ``over(name)``: a sampler's tensor over ``MAX_TENSOR_BYTES``, not kept."""
    out = {}
    for key, obj in parts(loader, samplers):
        tensors = _keeps_tensors(key)
        attrs = {}
        for k, v in vars(obj).items():
            if k.startswith("__"):
                continue
            if type(v) in _PLAIN:
                attrs[k] = v
            elif tensors and type(v) is torch.Tensor and v.layout == torch.strided:
                if v.numel() * v.element_size() <= MAX_TENSOR_BYTES:
                    attrs[k] = v.detach().clone()
                elif over is not None:
                    over(f"{key}.{k}")
        if attrs and len(attrs) <= MAX_ATTRS:
            out[key] = {"type": type(obj).__qualname__, "attrs": attrs}
    return out


def _keeps_tensors(key: str) -> bool:
    return key.startswith("sampler.")  # a sampler's tensors are its settings (weights); a dataset's are data


def _kept(key: str, v: Any) -> bool:
    return type(v) in _PLAIN or (_keeps_tensors(key) and type(v) is torch.Tensor)


def restore(loader: Any, samplers: list, saved: Any) -> str | None:
    """Put ``capture``'s values back into the live parts (an attribute this run holds a container or an
    object in is left alone). Returns what did not fit (a part of another class, a malformed entry), for
    one warning line, else None. Checked before anything is written."""
    if saved is None:
        return None
    if not isinstance(saved, dict):
        return "malformed"
    live = dict(parts(loader, samplers))
    writes = []
    for key, e in saved.items():
        obj = live.get(key)
        if not (isinstance(key, str) and isinstance(e, dict) and isinstance(e.get("attrs"), dict)
                and all(isinstance(k, str) and _kept(key, v) for k, v in e["attrs"].items())):
            return "malformed"
        if obj is None or type(obj).__qualname__ != e.get("type"):
            return f"{key} is {type(obj).__qualname__ if obj is not None else 'not there'} now, " \
                   f"the checkpoint holds a {e.get('type')}"
        mine = vars(obj)
        writes += [(obj, k, v) for k, v in e["attrs"].items() if k not in mine or _kept(key, mine[k])]
    for obj, k, v in writes:
        live = vars(obj).get(k)
        if (isinstance(v, torch.Tensor) and type(live) is torch.Tensor and live.shape == v.shape
                and live.dtype == v.dtype and live.layout == torch.strided):
            with torch.no_grad():
                live.copy_(v)  # in place: the script's variable is often this very tensor
        else:
            setattr(obj, k, v.clone() if isinstance(v, torch.Tensor) else v)
    return None
