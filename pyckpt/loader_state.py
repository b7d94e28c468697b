"""DataLoader tracking and fast-forward.

Loaders are grouped into *streams* by a signature (dataset type and length,
batch size, sampler types, ...), so a loader re-created every epoch continues
the same stream. For each stream we count ``iter()`` calls (epochs started)
and batches returned in the current epoch, and keep the RNG state(s) from
right before the current epoch's ``iter()``: a shuffling sampler and the
worker base seed are drawn from them then.

Fast-forward to (epoch E, batch B) of one stream: ``iter()`` number < E
returns a finished iterator (a real ``_BaseDataLoaderIter`` that raises
StopIteration at once: no data loaded, no workers started); ``iter()``
number E puts the epoch-start RNG state back, builds the real iterator (so it
draws the same permutation and worker seeds) and drops the first B index
batches at the *sampler* level (``DataLoader._index_sampler`` is patched for
that one call), which also works with worker processes because the workers
only ever see the remaining indices. An ``IterableDataset`` has no sampler:
its B batches are consumed (loaded) and dropped.

Look-ahead wrappers (accelerate's ``DataLoaderShard`` fetches batch k+1 before
it hands batch k to the loop) are registered with ``count_handed_by``: their
``__iter__`` is wrapped to count the batches handed to the loop, so a position
is (batches handed B, batches fetched F >= B). Fast-forward skips B and the
restore waits until the wrapper has fetched F again (its look-ahead refilled).
Loaded in the main process (no workers), those F - B batches may draw random
numbers (a masking collator): the random state before each of them is saved
(``ahead_rng``), with the states of the loader's own generators then (``ahead_own``: a masking collator's
``generator``), and put back before each is fetched again. Unregistered ones (a class with
``__next__``, or the script's own no-argument ``next()`` of the apex/YOLOX prefetchers) are found on
the stack at an epoch's first fetch (``_probe_wrapper``). A snapshot point after the epoch's end (an
apex ``next()`` asks the ended iterator again) is marked ``ended``; the restore waits for that end too.
A rank that another rank reads for (accelerate's dispatcher) counts its
``follow_fetch`` calls instead: the same points, in the loop's terms. Each
stream also keeps the step count at each epoch start (``epoch_steps``), which
places a checkpoint of the script's own framework in pyckpt's epoch count.

The rest of the pipeline (docs/TRANSPARENCY.md, "The data pipeline"): worker
processes' generator states per batch and the base seed (``loader_workers``),
an ``IterableDataset``'s own ``state_dict()``, and the positions of loaders
zipped with the training loader (``zipped_with``: fetched before each of the
last two optimizer steps, mid-epoch), each positioned as of the last step.
"""
from __future__ import annotations

import collections
import functools
import inspect
import os
import sys
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.dataloader import _BaseDataLoaderIter, _DatasetKind, _MultiProcessingDataLoaderIter

from . import (epoch_gaps, frames, held_rngs, knobs, loader_kept, loader_workers, loopstate, pipeline_attrs,
               reshard_data, rng, sampler_draws)
from .hooks import HookSet


def signature(loader: DataLoader) -> list:
    """What identifies "the same" loader across re-creation and across runs (JSON-able)."""
    try:
        n = len(loader.dataset)  # type: ignore[arg-type]
    except (TypeError, NotImplementedError):
        n = -1
    bs = loader.batch_sampler
    return [type(loader.dataset).__qualname__, n, loader.batch_size, type(loader.sampler).__qualname__,
            type(bs).__qualname__ if bs is not None else None, bool(loader.drop_last), int(loader.num_workers)]


def generators(loader: DataLoader | None, dataset: Any = None, collate: Any = None,
               pids: list[str] | None = None) -> list[tuple[str, str, Any]]:
    """The random generators the loader's parts keep, as (key, kind, generator), deduplicated, in a fixed order:
    torch.Generator, random.Random, NumPy RandomState and Generator objects held as attributes (``vars()``, or items of
    a list, tuple or dict attribute of at most ``HELD_MAX`` items) of the loader (``"loader.generator"``), each sampler
    of ``_sampler_chain`` (``"sampler.1.rng"``) and the helper objects each holds, one level
    (``"sampler.0.shuffler.rng"``), the dataset (``"dataset.rng"``) and the datasets it wraps, two levels
    down (a Subset's ``"dataset.dataset.rng"``, a ConcatDataset's ``"dataset.datasets.0.rng"``) and the callable objects
    each holds, two levels down (a transform's ``"dataset.transform.rng"``, one in a Compose's list
    ``"dataset.transform.transforms.0.rng"``), the ``collate_fn`` object (or a bound method's object) and the callable
    objects it holds, one level down (``"collate.generator"``: transformers'
    ``DataCollatorForLanguageModeling(seed=...)``; ``"collate.data_collator.generator"``: the same under the Trainer's
    ``RemoveColumnsCollator``), or the arguments a ``functools.partial`` binds (``"collate.keywords.generator"``), and
    the closure of a ``collate_fn`` function or of a function a dataset or transform holds (``"collate.closure.rng"``).
    A sampler drawing its order from one, or a dataset or collator its augmentation in this process, draws other numbers
    on a relaunch that skipped what drew them; the key is stored with each state, so a checkpoint of another layout is
    detected rather than misapplied. A plain loader has a few dozen attributes to look at: no cache (a generator
    replaced is seen). ``loader`` None: ``dataset``'s and ``collate``'s only (a worker's copies). ``pids`` given: the
    keys of int attributes holding this process's id next to a generator are added to it (a generator made per process,
    remade where the id is not the current one: transformers' ``_generator_pid``)."""
    found: list[tuple[str, str, Any]] = []
    seen: set[int] = set()
    kind_of = rng.kind_of
    pid = os.getpid() if pids is not None else None

    def add(key: str, kind: str, v: Any) -> None:
        if id(v) not in seen and len(found) < OWN_RNG_MAX:
            seen.add(id(v))
            found.append((key, kind, v))

    def closure(prefix: str, fn: Any) -> None:
        """The generators a function's closure holds (``rng`` of ``def make_collate(seed): rng = ...``)."""
        cells = fn.__closure__
        for name, cell in zip(fn.__code__.co_freevars, cells or ()):
            try:
                v = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            kind = kind_of(v)
            if kind is not None:
                add(f"{prefix}.closure.{name}", kind, v)

    def look(prefix: str, owner: Any, inner: list | None, part: Callable[[type], bool] = None,
             closures: bool = True) -> None:
        attrs = getattr(owner, "__dict__", None)
        if type(attrs) is not dict:
            return
        part = part or _is_dataset
        held = len(found)
        for name, v in attrs.items():
            t = type(v)
            if t is types.FunctionType:
                if closures:  # a transform made by a function: its closure (not the loader's own functions)
                    closure(f"{prefix}.{name}", v)
                continue
            if t is list or t is tuple or t is dict:
                if len(v) > HELD_MAX:
                    continue
                for k, x in (v.items() if t is dict else enumerate(v)):
                    kind = kind_of(x)
                    if kind is not None and (type(k) is int or type(k) is str):
                        add(f"{prefix}.{name}.{k}", kind, x)
                    elif inner is not None and part(type(x)):
                        inner.append((f"{prefix}.{name}.{k}", x))
                continue
            kind = kind_of(v)
            if kind is not None:
                add(f"{prefix}.{name}", kind, v)
            elif inner is not None and part(t):
                inner.append((f"{prefix}.{name}", v))
        if pid is not None and len(found) > held:
            pids.extend(f"{prefix}.{name}" for name, v in attrs.items() if type(v) is int and v == pid)

    if loader is not None:
        look("loader", loader, None, closures=False)
        chain = _sampler_chain(loader)
        for i, s in enumerate(chain):  # and the helper objects it holds, one level (``self.shuffler.rng``)
            helpers: list = []
            look(f"sampler.{i}", s, helpers, _is_helper, closures=False)
            for key, x in helpers:
                if all(x is not c for c in chain):
                    look(key, x, None, closures=False)
    datasets: list = [("dataset", loader.dataset if loader is not None else dataset)]
    for depth in range(3):  # the dataset, what it wraps, what that wraps
        inner: list = []
        for prefix, ds in datasets:
            look(prefix, ds, inner, _is_dataset_part)
        datasets = [(key, x) for key, x in inner if _is_dataset(type(x))] if depth < 2 else []
        for key, x in inner:  # its transforms, and those a Compose of them holds
            if not _is_dataset(type(x)):
                parts: list = []
                look(key, x, parts, _is_callable_part)
                for key2, y in parts:
                    look(key2, y, None)
    fn = loader.collate_fn if loader is not None else collate
    if type(fn) is types.FunctionType:
        closure("collate", fn)
    if isinstance(fn, functools.partial):  # partial(mask, generator=g): its bound arguments
        for k, x in [*enumerate(fn.args[:HELD_MAX]), *list(fn.keywords.items())[:HELD_MAX]]:
            kind = kind_of(x)
            if kind is not None:
                add(f"collate.{'args' if type(k) is int else 'keywords'}.{k}", kind, x)
    owner = collate_owner(fn)
    if owner is not None:
        parts = []
        look("collate", owner, parts, _is_callable_part)
        for prefix, x in parts:
            look(prefix, x, None)
    # Then whatever those parts hold further down (a dataset's ``self.aug.rng``): new keys only.
    roots = [("dataset", loader.dataset if loader is not None else dataset)]
    if isinstance(fn, functools.partial):
        roots += [("collate.args", fn.args), ("collate.keywords", fn.keywords)]
    elif owner is not None or type(fn) is types.FunctionType:
        roots.append(("collate", owner if owner is not None else fn))
    if loader is not None:
        roots += [*((f"sampler.{i}", s) for i, s in enumerate(_sampler_chain(loader))), ("loader", loader)]
    held_rngs.walk(roots, add, pids, pid)
    return found


def collate_owner(fn: Any) -> Any:
    """The object whose attributes ``generators`` looks into for a loader's ``collate_fn``: a collator object,
    a bound method's object; None for a function (torch's ``default_collate``) or nothing."""
    if fn is None or isinstance(fn, (types.FunctionType, types.BuiltinFunctionType, functools.partial)):
        return None
    if isinstance(fn, types.MethodType):
        fn = fn.__self__
    return None if isinstance(fn, (type, types.ModuleType)) else fn


_PART_TYPES: dict[type, bool] = {}


def _is_dataset_part(t: type) -> bool:
    return _is_dataset(t) or _is_callable_part(t)


def _is_callable_part(t: type) -> bool:
    """A dataset's or collator's attribute of this class is looked into: an object with attributes that is
    called (a dataset's transform: albumentations' ``Compose(seed=...)``, a script's augmentation class; a
    collator it wraps: the Trainer's ``RemoveColumnsCollator`` around the data collator)."""
    is_part = _PART_TYPES.get(t)
    if is_part is None:
        is_part = _PART_TYPES[t] = (t.__module__ != "builtins" and not issubclass(t, (type, torch.nn.Module))
                                    and any("__call__" in vars(c) for c in t.__mro__[:-1]))
    return is_part


def _is_helper(t: type) -> bool:
    """A sampler's attribute of this class is looked into: an object of a script's or a library's class that is
    not a dataset (its ``data_source``), a module, a class or a torch tensor (a sampler's order drawn through a
    helper object of its own, called or not)."""
    is_helper = _HELPER_TYPES.get(t)
    if is_helper is None:
        is_helper = _HELPER_TYPES[t] = (t.__module__ != "builtins" and not issubclass(
            t, (type, torch.nn.Module, torch.Tensor, Dataset, types.ModuleType)))
    return is_helper


_HELPER_TYPES: dict[type, bool] = {}
_DATASET_TYPES: dict[type, bool] = {}


def _is_dataset(t: type) -> bool:
    is_ds = _DATASET_TYPES.get(t)
    if is_ds is None:
        is_ds = _DATASET_TYPES[t] = issubclass(t, Dataset)
    return is_ds


def _legacy_generators(loader: DataLoader) -> list[torch.Generator]:
    """The generators a checkpoint written before ``generators`` kept its ``"gens"`` for: the torch.Generator
    attributes named ``generator`` of the loader, then its samplers, deduplicated, in that order."""
    found: list[torch.Generator] = []
    for owner in (loader, *_sampler_chain(loader)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not x for x in found):
            found.append(g)
    return found


OWN_RNG_MAX = 32  # generators kept per loader
HELD_MAX = 32  # items of a list/tuple/dict attribute looked into (not a dataset's list of samples)


def _own_raw(loader: DataLoader, pids: list[str] | None = None, also: list = ()) -> tuple:
    """The states of ``generators(loader, pids=pids)`` and of ``also`` (more (key, kind, generator)), raw
    (cheap: taken at every ``iter()``); a tuple marks the raw form."""
    return tuple((key, kind, rng.raw_state(g, kind)) for key, kind, g in [*generators(loader, pids=pids), *also])


def _own_saved(raw: tuple) -> list:
    """``_own_raw``'s result in the checkpoint's form: [key, kind, state] each (no pickle)."""
    return [[key, kind, rng.saved_state(kind, state)] for key, kind, state in raw]


def _set_own(loader: DataLoader, state: dict[str, Any], when: str, also: list = ()) -> None:
    """Put the loader's generators (and ``also``: more (key, kind, generator)) back from ``state["rngs"]``
    (``_own_raw``'s or ``_own_saved``'s form) through ``restore_by_key``; what it could not restore (malformed,
    no such generator in this run, another kind, a generator of this run the checkpoint holds no state for) is
    named in one warning line. A checkpoint written before these were kept has ``"gens"`` only: the
    ``generator`` attributes, as then (``_legacy_generators``)."""
    saved = state.get("rngs")
    live = [*generators(loader), *also]
    if saved is None:
        legacy = _legacy_generators(loader)
        gens = state.get("gens")
        try:
            for g, s in zip(legacy, gens if isinstance(gens, list) else []):
                rng.check_state(g, "torch", rng.raw_from_saved("torch", s))
            for g, s in zip(legacy, gens if isinstance(gens, list) else []):
                rng.set_generator_state(g, s)
        except Exception as e:  # malformed: nothing read from a checkpoint is trusted unchecked
            _say_once(f"warning: loader {_sig_of(loader)}: the generator state saved {when} is not usable "
                      f"({type(e).__name__}: {e}); its order of batches may differ after this resume", "warning")
        rest = [key for key, _, g in live if all(g is not x for x in legacy)]
        if rest:
            _say_once(f"warning: loader {_sig_of(loader)}: the checkpoint (written by an older pyckpt) holds no "
                      f"state of its random generator(s) {_keys(rest)}; what they draw may differ after this "
                      "resume", "warning")
        return
    parts = restore_by_key(saved, live, lambda key, kind: lazy_slot(loader, key, kind), isinstance(saved, tuple))
    if parts:
        _say_once(f"warning: loader {_sig_of(loader)}: random generators saved {when} not restored: "
                  f"{'; '.join(parts)}; what they draw may differ after this resume", "warning")


def restore_by_key(saved: Any, live: list, slot_for: Callable[[str, Any], Any], raw_form: bool) -> list[str]:
    """Put the generators ``live`` ((key, kind, generator) each) back from ``saved`` ([key, kind, state] each;
    ``raw_form``: states as ``rng.raw_state`` gives them, else the checkpoint's form), matched by key and kind.
    A key with no live generator gets one from ``slot_for(key, kind)`` (``lazy_slot``: (owner, attribute, new
    generator), set there) where it gives one. Every entry is checked before any generator is written; returns
    what was not restored, for a warning line (empty: all were): entries that do not fit, live generators
    without a state, generators that refused theirs."""
    live = list(live)
    by_key = {key: (kind, g) for key, kind, g in live}
    todo, bad, made = [], [], []
    for entry in saved if isinstance(saved, (list, tuple)) else [None]:
        key = entry[0] if isinstance(entry, (list, tuple)) and entry and isinstance(entry[0], str) else "?"
        try:
            if not isinstance(entry, (list, tuple)) or len(entry) != 3 or key == "?":
                raise KeyError(key)
            slot = slot_for(key, entry[1]) if key not in by_key else None
            if key not in by_key and slot is None:
                raise KeyError(key)
            kind, g = (entry[1], slot[2]) if slot is not None else by_key.pop(key)
            if entry[1] != kind:
                raise TypeError(kind)
            raw = entry[2] if raw_form else rng.raw_from_saved(kind, entry[2])
            rng.check_state(g, kind, raw)
            todo.append((g, kind, raw))
            if slot is not None:
                made.append((slot[0], slot[1], key, g))
        except Exception:  # noqa: BLE001 - nothing read from a checkpoint is trusted unchecked
            bad.append(key[:60])
    for owner, name, key, g in made:  # (after every entry was checked: nothing is written before)
        setattr(owner, name, g)
        live.append((key, rng.kind_of(g), g))
    failed = []
    for g, kind, raw in todo:
        try:
            rng.set_state(g, kind, raw)
        except Exception:  # noqa: BLE001 - checked above; a generator refusing it anyway is said
            failed.append(next(k for k, _, x in live if x is g))
    parts = []
    if bad:
        parts.append(f"the state(s) {_keys(bad)} do not fit a generator of this run")
    if by_key:
        parts.append(f"the checkpoint holds no state of {_keys(list(by_key))}")
    if failed:
        parts.append(f"{_keys(failed)} refused their state")
    return parts


def lazy_slot(loader: DataLoader | None, key: str, kind: Any, dataset: Any = None,
              collate: Any = None) -> tuple[Any, str, Any] | None:
    """(owner, attribute, a new generator of ``kind``) for a saved generator ``key`` (``"loader.generator"``,
    ``"sampler.1.generator"``, ``"dataset.rng"``, ``"dataset.datasets.0.rng"``, ``"collate.generator"``) whose
    live owner holds None under that attribute: a sampler that makes its generator at its first ``__iter__``
    (accelerate's SeedableRandomSampler), a dataset that makes its augmentation generator at its first
    ``__getitem__``, a collator at its first call (transformers' ``DataCollatorForLanguageModeling(seed=...)``),
    a collate_fn function its ``nonlocal`` one (the closure's cell: owner the cell, attribute ``cell_contents``),
    made none yet in a relaunch that skipped the earlier epochs without data. The caller checks the saved
    state against the new generator and puts it there, as the first run held one. None for anything else.
    ``loader`` None: ``"dataset..."`` and ``"collate..."`` keys of ``dataset`` and ``collate`` only (a
    worker's copies)."""
    parts = key.split(".")
    if len(parts) < 2 or kind not in ("torch", "random", "numpy.RandomState", "numpy.Generator"):
        return None
    if len(parts) >= 3 and parts[-2] == "closure":  # a function's ``nonlocal`` generator, made at its first call
        owner, name = _closure_cell(loader, parts, dataset, collate), "cell_contents"
        try:
            if owner is None or owner.cell_contents is not None:
                return None
        except ValueError:  # an empty cell: not one holding None
            return None
    else:
        owner, name = _owner_of(loader, parts, dataset, collate), parts[-1]
        attrs = getattr(owner, "__dict__", None)
        if type(attrs) is not dict or name not in attrs or attrs[name] is not None:
            return None
    return owner, name, rng.new_generator(kind)


def _closure_cell(loader: DataLoader | None, parts: list[str], dataset: Any = None, collate: Any = None) -> Any:
    """The cell of the closure that key ``parts`` (``[..., "closure", name]``: ``collate.closure.rng``,
    ``dataset.transform.closure.rng``) names, or None."""
    if parts[0] == "collate" and len(parts) == 3:
        fn = loader.collate_fn if loader is not None else collate
    else:
        fn = _owner_of(loader, parts[:-1], dataset, collate)
    if type(fn) is not types.FunctionType:
        return None
    return dict(zip(fn.__code__.co_freevars, fn.__closure__ or ())).get(parts[-1])


def _owner_of(loader: DataLoader | None, parts: list[str], dataset: Any = None, collate: Any = None) -> Any:
    """The object holding the attribute of key ``parts`` (``generators``' keys, split at dots), or None."""
    if loader is None and parts[0] not in ("dataset", "collate"):
        return None
    if parts[0] == "loader":
        owner, path = loader, parts[1:-1]
    elif parts[0] == "sampler" and len(parts) >= 3 and parts[1].isdigit():
        chain = _sampler_chain(loader)
        owner, path = (chain[int(parts[1])] if int(parts[1]) < len(chain) else None), parts[2:-1]
    elif parts[0] == "dataset":
        owner, path = (loader.dataset if loader is not None else dataset), parts[1:-1]
    elif parts[0] == "collate":
        fn = loader.collate_fn if loader is not None else collate
        owner = collate_owner(fn)
        owner, path = (fn if owner is None and type(fn) is types.FunctionType else owner), parts[1:-1]
    else:
        return None
    names = iter(path)
    for name in names:  # what generators() looked into: attributes, items of a list, tuple or dict, cells
        if type(owner) is types.FunctionType and name == "closure":
            cell = dict(zip(owner.__code__.co_freevars, owner.__closure__ or ())).get(next(names, ""))
            try:
                owner = cell.cell_contents if cell is not None else None
            except ValueError:  # an empty cell
                owner = None
        elif type(owner) in (list, tuple) and name.isdigit() and int(name) < len(owner):
            owner = owner[int(name)]
        elif type(owner) is dict:
            owner = owner.get(name)
        else:
            attrs = getattr(owner, "__dict__", None)
            owner = attrs.get(name) if type(attrs) is dict else None
    return owner


def set_pids(loader: DataLoader | None, keys: Any, dataset: Any = None, collate: Any = None) -> None:
    """Put this process's id into the attributes ``keys`` (``generators``' ``pids``: where the run that
    wrote the checkpoint held its process's id next to a generator), where they hold None or an int: a
    generator restored there is then not remade as one of another process."""
    pid = os.getpid()
    for key in keys if isinstance(keys, list) else []:
        if not isinstance(key, str) or key.count(".") > 8:
            continue
        parts = key.split(".")
        attrs = getattr(_owner_of(loader, parts, dataset, collate), "__dict__", None)
        if type(attrs) is dict and parts[-1] in attrs and (attrs[parts[-1]] is None or type(attrs[parts[-1]]) is int):
            attrs[parts[-1]] = pid


def _keys(keys: list[str]) -> str:
    return ", ".join(keys[:6]) + (f" (+{len(keys) - 6})" if len(keys) > 6 else "")


def _sig_of(loader: DataLoader) -> list:
    try:
        return signature(loader)
    except Exception:  # noqa: BLE001 - a message only
        return [type(loader).__qualname__]


def _sampler_chain(loader: DataLoader) -> list:
    """The loader's sampler and batch sampler and what they wrap (``sampler`` / ``batch_sampler``
    attributes, breadth first): accelerate's ``BatchSamplerShard`` wraps the BatchSampler that
    holds the shuffling sampler, one level deeper than a plain loader's."""
    chain: list = []
    todo = [loader.sampler, loader.batch_sampler]
    while todo and len(chain) < 8:
        s = todo.pop(0)
        if s is None or any(s is x for x in chain):
            continue
        chain.append(s)
        todo += [getattr(s, "sampler", None), getattr(s, "batch_sampler", None)]
    return chain


def _epoch_rng(loader: DataLoader, host: bool = True, now: tuple | None = None) -> dict[str, Any]:
    """What an epoch may draw from at its ``iter()``: a sampler shuffling with torch's, Python's or NumPy's
    global stream (a bucketing batch sampler with ``random.shuffle``) or the loader's generators, and a
    sampler's own epoch counter. A relaunch skipping epochs runs no sampler, so the resumed epoch's
    ``iter()`` is given these back. Python's and NumPy's are kept raw (cheap, at every ``iter()``) and
    converted when a checkpoint stores them (``_stored_epoch_rng``). ``host=False``: torch's and the
    generators' only (a plan an integration makes from the current state, as before). The generators the
    loader's sampler and dataset keep (``generators``) are kept raw in ``"rngs"`` too; ``"gens"`` (the
    ``generator`` attributes, in checkpoints written before) stays empty. ``now``: ``rng.cpu_raw()`` taken at
    this moment already."""
    state = {"torch": torch.get_rng_state(), "gens": [], "rngs": _own_raw(loader)}
    if host:
        state.update(host=now if now is not None else rng.cpu_raw(),
                     samplers=[_sampler_state(s) for s in _samplers(loader)],
                     attrs=_capture_attrs(loader))
    return state


def _stored_epoch_rng(state: dict[str, Any] | None) -> dict[str, Any] | None:
    if state is None:
        return state
    if isinstance(state.get("host"), tuple):
        state = dict(state, host=rng.cpu_saved(state["host"]))
    if isinstance(state.get("rngs"), tuple):
        try:
            state = dict(state, rngs=_own_saved(state["rngs"]))
        except Exception:  # noqa: BLE001 - a malformed checkpoint's (read back as a tuple): said when it was read
            state = dict(state, rngs=[])
    return state


def _set_epoch_rng(loader: DataLoader, state: dict[str, Any]) -> None:
    host = state.get("host")  # absent in checkpoints written before it was kept
    if host is not None:
        try:
            rng.restore(rng.cpu_saved(host) if isinstance(host, tuple) else host)
        except Exception as e:  # malformed: nothing read from a checkpoint is trusted unchecked
            _say_once(f"warning: the Python/NumPy random state saved at the start of the resumed epoch is not "
                      f"usable ({type(e).__name__}: {e}); a sampler drawing from them may shuffle differently "
                      "after this resume", "warning")
    torch.set_rng_state(rng.cpu_bytes(state["torch"]))
    _set_own(loader, state, "at the start of the resumed epoch")
    _set_sampler_states(loader, state.get("samplers"))
    _set_attrs(loader, state.get("attrs"), "at the start of the resumed epoch")


def _capture_attrs(loader: DataLoader) -> dict[str, Any]:
    """``pipeline_attrs.capture`` of the loader's parts; a sampler's tensor over its size limit said once."""
    def over(name: str) -> None:
        _say_once(f"warning: loader {_sig_of(loader)}: {name} is over {pipeline_attrs.MAX_TENSOR_BYTES >> 20} MiB and "
                  "is not kept; if the loop changes it, the batches after a resume may differ", "warning")

    return pipeline_attrs.capture(loader, _sampler_chain(loader), over)


def _set_attrs(loader: DataLoader, saved: Any, when: str) -> None:
    """The settings of the loader's parts (the script's classes', its samplers') as ``when`` (pipeline_attrs.py)."""
    why = pipeline_attrs.restore(loader, _sampler_chain(loader), saved)
    if why is not None:
        _say_once(f"warning: loader {_sig_of(loader)}: the settings of its dataset, sampler or collate_fn saved "
                  f"{when} were not put back ({why}); the batches after this resume may differ", "warning")


def _set_sampler_states(loader: DataLoader, states: Any) -> None:
    """Put samplers' plain counters back (``_sampler_state``'s; only ints are taken from a checkpoint)."""
    for smp, s in zip(_samplers(loader), states if isinstance(states, list) else []):
        for k, v in (s if isinstance(s, dict) else {}).items():
            if k in ("epoch", "seed") and isinstance(v, int) and not isinstance(v, bool):
                setattr(smp, k, v)


@dataclass
class Stream:
    """One logical training/evaluation data stream (loaders with the same signature)."""

    sig: list
    tracker: "LoaderTracker"
    epochs: int = 0  # iter() calls so far; the current epoch is number `epochs`
    batches: int = 0  # batches returned by the current epoch's iterator
    epoch_rng: dict | None = None
    reused: bool = False  # current epoch reused a persistent-workers iterator
    loader: Any = None  # weakref to the loader of the current epoch
    # Batches a look-ahead wrapper handed to the training loop in the current epoch (None: the loop
    # iterates the DataLoader itself, so handed == fetched).
    handed: int | None = None
    skipping: bool = False  # the current epoch finished before the checkpoint being resumed
    iterator: Any = None  # weakref to the current epoch's iterator
    # Zipped loaders (issue 6): batches at the last optimizer step, consecutive steps with a
    # fetch from this stream before them, and whether its current epoch has ended.
    mark: int = 0
    streak: int = 0
    ended: bool = False
    probe: bool = False  # look for an unregistered prefetching iterator at this epoch's first fetch
    wrapper_cls: Any = None  # the class found by that probe (counted once it proved one batch per item)
    # The primary step count at each iter() of this stream, for the last EPOCH_STEPS_KEPT epochs
    # (epoch_steps[i]: at epoch number epoch_steps_from + i; -1: not known): maps the optimizer steps
    # of a checkpoint the script's framework loads to the epoch it resumes in.
    epoch_steps: list = field(default_factory=list)
    epoch_steps_from: int = 1
    # Another rank reads this loader and sends this rank its batches (accelerate's DataLoaderDispatcher
    # on processes other than 0): its fetches are that rank's, one per batch handed; no worker state.
    follower: bool = False
    # Optimizer steps whose last fetch was from this stream: a loader of another signature that fed steps
    # before the training loader's current epoch (the training loader rebuilt with another batch size or
    # dataset length at each epoch: progressive batching, a growing curriculum) is skipped on resume.
    fed_steps: int = 0
    fed_in_epoch: int = 0  # of those, in its current epoch
    # Weak references to its live loaders that made a persistent-workers iterator, and how many loaders made
    # one (more than are live: the script makes such loaders anew) (loader_kept.py).
    persistent: list = field(default_factory=list)
    persistent_made: int = 0
    # Whether one of its epochs fed two steps or more: a training loader. A validation pass run between
    # backward() and step() is the last fetch before one step per pass: never taken for one.
    trained: bool = False
    # Under a look-ahead wrapper with no worker processes: (batches fetched before, (raw random state, the
    # loader's own generators' raw states, the keys of the process ids beside them)) right before each of
    # the last fetches. A batch loaded and collated in the main process may draw random
    # numbers; the batches fetched ahead of the snapshot point are fetched again by the relaunch before the
    # restore, so it needs the states they were drawn from (``ahead_rng`` in the position).
    pre_fetch: Any = field(default_factory=lambda: collections.deque(maxlen=AHEAD_RNG_KEPT))
    # A *side* stream: an iteration of this signature started while the stream's epoch iterator was live
    # and not at its end (an evaluation drawing batches from the training loader inside its epoch, a
    # loader of the same kind sampled there). It runs only because steps ran, so a relaunch that skips
    # epochs never repeats it: counted as an epoch it moved the epoch count away from what the relaunch
    # reaches, and its batches mixed into the training epoch's position. ``main``: the stream it nests in.
    main: "Stream | None" = None
    # The random state right before this epoch's first fetch, loaded in this process (raw ``rng.cpu_raw()``, or
    # a checkpoint's form after a resume): a sampler draws its permutation then, after whatever ran
    # between the epoch's iter() and that fetch (a zipped loader's iter(), an evaluation, an earlier
    # loader's first batch drawing random augmentation), which the relaunch does not repeat.
    first_rng: Any = None
    # The random state when the previous epoch ended (its iterator raised StopIteration; raw, or the
    # checkpoint's form once stored), and this epoch's end: what the script's per-epoch code between the
    # two epochs drew from (a subset drawn with torch.randperm, a per-epoch augmentation choice). A relaunch
    # gets it back where its last skipped epoch ends, so that code draws the same numbers again.
    prev_end_rng: Any = None
    end_rng: Any = None
    # The streams each earlier gap's per-epoch code drew from (epoch_gaps.py): code whose effect carries
    # over (a dataset's order shuffled in place every epoch) needs every gap's, not only the last one's.
    gaps: epoch_gaps.Gaps = field(default_factory=epoch_gaps.Gaps)
    # What the sampler drew from the global generators in the middle of this epoch's iterator (a pass of a
    # repeated RandomSampler: sampler_draws.py), with the number of the index batch it pulled then.
    draws: sampler_draws.Draws = field(default_factory=sampler_draws.Draws)
    # An IterableDataset loaded in this process, replayed on resume (LoaderTracker._probe_draws): fetches
    # still watched this epoch, the global random state after the last one, what was seen, said once.
    draw_probe: int = 0
    last_mark: Any = None
    fetch_draws: bool = False
    step_draws: bool = False
    draws_said: bool = False
    side_steps: int = 0  # steps with a fetch from this side stream before them (lockstep: said once)
    # The epochs the run left before their end, the last ABANDONED_KEPT, as [epoch, batches fetched]: one
    # sample batch drawn with next(iter(loader)) before training or at each epoch's end, a learning-rate range
    # test. A relaunch whose script draws one of them with next() replays it with its data (``_replay``).
    abandoned: list = field(default_factory=list)
    # Its epochs that fed no optimizer step though they yielded batches, the last ABANDONED_KEPT, as [epoch, batches
    # fetched, 1 if it ran to its end]: an evaluation pass over the training loader in per-epoch code
    # (``check_accuracy(train_loader)``), dataset statistics or ``update_bn`` before training. A relaunch runs them
    # with their data: passed without any, their code's counters stay at zero (``num_correct / num_samples``).
    # ``unfed_count``: how many there were in all (the loop's epoch number leaves them out: ``loop_epoch``).
    unfed: list = field(default_factory=list)
    unfed_count: int = 0
    # The marks of the script's variables at this epoch's iter() (``loopstate.marks``): a snapshot records which
    # ones the loop changed since (accumulators), which a relaunch binds where it runs this epoch without data.
    var_marks: Any = None

    def note_epoch_over(self) -> None:
        """The next epoch starts: record the current one in ``abandoned`` if the run left it before its end, and
        in ``unfed`` if it fed no optimizer step."""
        if not self.epochs or self.skipping or not self.batches:
            return
        if not self.ended:
            self.abandoned.append([self.epochs, self.batches])
            del self.abandoned[:-ABANDONED_KEPT]
        if not self.fed_in_epoch:
            self.unfed.append([self.epochs, self.batches, int(self.ended)])
            del self.unfed[:-ABANDONED_KEPT]
            self.unfed_count += 1

    def position(self, batch: int | None = None, others: bool = True) -> dict[str, Any]:
        """This stream's position and sampler state, for a checkpoint's per-rank part.

        ``batch`` is in the training loop's terms (batches handed to it); ``fetched`` counts the
        batches taken from the DataLoader, more than ``batch`` under a look-ahead wrapper.
        ``batch`` given: the position as of that many batches (a zipped loader's at the step).
        ``others``: also the positions of the loaders zipped with this one."""
        loader = self.loader() if self.loader is not None else None
        handed = self.batches if self.handed is None else min(self.handed, self.batches)
        if self.wrapper_cls is not None and self.tracker._found.get(self.wrapper_cls) is not True:
            handed = self.batches  # a probed iterator class not yet seen handing one batch per item
        if batch is not None:
            handed = max(0, min(batch, handed))
        # Converted once per epoch, not at every snapshot (the stored form is what a resume reads anyway).
        self.epoch_rng = _stored_epoch_rng(self.epoch_rng)
        if isinstance(self.first_rng, tuple):
            self.first_rng = rng.cpu_saved(self.first_rng)
        pos: dict[str, Any] = {"sig": self.sig, "epoch": self.epochs, "batch": handed, "fetched": self.batches,
                               "epoch_rng": self.epoch_rng, "reused": self.reused, "gens": [], "rngs": [],
                               "samplers": [], "epoch_steps": list(self.epoch_steps),
                               "epoch_steps_from": self.epoch_steps_from}
        if self.follower:
            pos["follower"] = True
        if self.abandoned:
            pos["abandoned"] = [list(e) for e in self.abandoned]
        if self.unfed and self.fed_steps:  # (a stream no step was seen to feed has no epoch told from the others)
            pos["unfed"] = [list(e) for e in self.unfed]
            pos["unfed_count"] = self.unfed_count
        if self.fed_in_epoch:
            pos["fed_in_epoch"] = self.fed_in_epoch  # (so a relaunch does not take its epoch for an unfed one)
        if batch is None and self.ended and self.main is None:
            # This point is a fetch after the epoch's end (an apex prefetcher's next() after its last batch
            # calls next() on the exhausted iterator again): the relaunch's restore waits for its end too.
            pos["ended"] = True
        if self.first_rng is not None:
            pos["first_rng"] = self.first_rng
        if self.prev_end_rng is not None:
            if isinstance(self.prev_end_rng, tuple):
                self.prev_end_rng = rng.cpu_saved(self.prev_end_rng)
            pos["prev_end_rng"] = self.prev_end_rng
        if self.gaps.states:
            pos["past_ends"] = self.gaps.stored()
        if self.draws.at or self.draws.lost:
            pos["sampler_draws"] = self.draws.stored()
        if loader is not None:
            pids: list[str] = []
            own = generators(loader, pids=pids)
            pos["rngs"] = [[key, kind, rng.saved_state(kind, rng.raw_state(g, kind))] for key, kind, g in own]
            if pids:
                pos["pids"] = pids
            pos["samplers"] = [_sampler_state(s) for s in _samplers(loader)]
            pos["attrs"] = _capture_attrs(loader)
            if loader.num_workers > 0 and getattr(loader, "in_order", True) is False:
                # Batches come back as workers finish them; a resume skips the epoch's first B by index.
                _say_once(f"warning: loader {self.sig} has in_order=False: its batches come back in the order its "
                          "workers finish them, so a resume skips the first batches of the epoch's order, which "
                          "may not be the ones the loop trained on (a few may repeat, a few be left out); pass "
                          "in_order=True for an exact resume", "warning")
            in_workers = ([key for key, _, _ in own if key.startswith(("dataset.", "collate."))]
                          if loader.num_workers > 0 else [])
            # An iterable dataset's position is reached by loading and dropping batches: workers started anew
            # for the epoch, from the main process's copy as at its iter() (restored), draw those numbers again.
            replayed = (loader._dataset_kind == _DatasetKind.Iterable and not loader.persistent_workers
                        and _stateful_owner(loader)[0] is None)
            if in_workers and self._worker_record() is None and not replayed:
                # Copied into each worker; their states travel with the batches of a map-style dataset's
                # workers (loader_workers), not an iterable dataset's.
                _say_once(f"warning: loader {self.sig}: each worker process draws from its own copy of the "
                          f"dataset's or collate_fn's random generator(s) {_keys(in_workers)}; those copies are "
                          "not saved here (an iterable dataset's, or a loader with iterators of its own), so what "
                          "they draw may differ after a resume (derive per-sample generators from "
                          "get_worker_info().seed, or draw from torch's, Python's or NumPy's global generators)",
                          "warning")
        pos.update(reshard_data.position_extra(self))  # a remapped epoch (another world size) stores its split
        if loader is not None and not self.follower:  # a follower's loader is never read: nothing to save
            pos.update(self._pipeline_position(loader, self.batches - handed))
            if batch is None and self.batches > handed and loader.num_workers == 0:
                pos.update(self._ahead_rng(handed))
        if others:
            zipped = self.tracker.zipped_with(self)
            pos["others"] = [st.position(batch=st.mark, others=False) for st in zipped]
            # Loaders of other signatures that fed steps, their epochs all over (one still in its epoch, fed
            # by turns with this one, would lose the rest of it if skipped: its relaunch is refused as before).
            fed = [[st.sig, st.epochs] for st in self.tracker.streams.values()
                   if st.trained and st.ended and st.main is None and st.sig != self.sig
                   and all(st is not z for z in zipped)]
            if fed:
                pos["fed_before"] = fed
        return pos

    def _worker_record(self) -> Any:
        """The ``loader_workers.Record`` of this stream's live multi-process iterator, or None."""
        it = self.iterator() if self.iterator is not None else None
        return it.__dict__.get("_pyckpt_workers") if it is not None else None

    def _pipeline_position(self, loader: DataLoader, ahead: int) -> dict[str, Any]:
        """Worker generator states and base seed; a stateful loader's or dataset's own state.
        ``ahead``: batches fetched beyond the position (a look-ahead wrapper's, a zipped loader's)."""
        out: dict[str, Any] = {}
        record = self._worker_record()
        if record is not None:
            iterable = loader._dataset_kind == _DatasetKind.Iterable
            # An iterable dataset's epoch is replayed on resume: its workers' states at the epoch's start.
            states, exact = record.epoch_starts(ahead) if iterable else record.states_before(ahead)
            if not exact:
                _say_once(f"warning: the worker random state of loader {self.sig} is {ahead} batches back, more "
                          "than pyckpt keeps; random augmentation in workers may differ after a resume", "warning")
            out["workers"] = {"base_seed": record.base_seed, "rng": [loader_workers.to_saved(s) for s in states]}
            if iterable:
                out["workers"]["at"] = "epoch_start"
        owner, key = _stateful_owner(loader)
        if owner is not None and ahead > 0:
            _say_once(f"warning: {type(owner).__name__}.state_dict() is not saved: a wrapper fetches {ahead} "
                      "batch(es) ahead of the loop; its position is reached by loading and dropping batches, "
                      "which does not restore the dataset's own state", "warning")
        elif owner is not None:
            state = owner.state_dict()
            if _plain(state):
                out[key] = state
            else:
                _say_once(f"warning: {type(owner).__name__}.state_dict() holds values a checkpoint cannot store "
                          "without pickle; its position is reached by loading and dropping batches", "warning")
        return out

    def _ahead_rng(self, handed: int) -> dict[str, Any]:
        """The random state before each batch fetched beyond ``handed`` (loaded in this process), and the
        states of the loader's own generators then (``generators``)."""
        kept = dict(self.pre_fetch)
        raw = [kept.get(n) for n in range(handed, self.batches)]
        if any(r is None for r in raw):
            _say_once(f"warning: loader {self.sig}: the random state before the {self.batches - handed} batch(es) "
                      f"fetched ahead of the loop is not kept (at most {AHEAD_RNG_KEPT}); random draws of the "
                      "dataset or collate_fn for them may differ after a resume", "warning")
            return {}
        return {"ahead_rng": [rng.cpu_saved(r[0]) for r in raw],
                "ahead_own": [{"rngs": _own_saved(r[1]), "pids": list(r[2]), "attrs": r[3]} for r in raw]}

    def restore_sampler_state(self, pos: dict[str, Any]) -> None:
        """Put generators and DistributedSampler epoch/seed back (the position itself is reached by fast-forward):
        the loader's, its samplers' and its dataset's generators (``generators``) as at the snapshot."""
        loader = self.loader() if self.loader is not None else None
        if loader is None:
            return
        _set_own(loader, pos, "at the checkpoint")
        _set_sampler_states(loader, pos.get("samplers"))
        _set_attrs(loader, pos.get("attrs"), "at the checkpoint")
        set_pids(loader, pos.get("pids"))  # (after the attributes: they hold the process id of the run that wrote it)
        first, steps = epoch_steps_of(pos)
        if steps:
            self.epoch_steps, self.epoch_steps_from = steps, first
        # The run's record of the epochs it left early goes on into the checkpoints written after this
        # resume (the relaunch passed most epochs without data, recording nothing of them).
        replay = _replayed(pos)
        self.abandoned = [[e, replay[e]] for e in sorted(replay)]
        unfed, self.unfed_count = _unfed(pos)
        self.unfed = [[e, *unfed[e]] for e in sorted(unfed)]
        fed = pos.get("fed_in_epoch", 0)
        self.fed_in_epoch = fed if type(fed) is int and fed > 0 else 0

    def note_epoch_start(self, step: int) -> None:
        """Record the step count at this epoch's ``iter()`` (epoch number ``self.epochs``)."""
        n, first = self.epochs, self.epoch_steps_from
        if n < first or not self.epoch_steps:
            steps, first = [], n
        else:
            steps = (self.epoch_steps + [-1] * (n - first))[:n - first]  # earlier epochs; gaps unknown
        steps.append(int(step))
        drop = max(0, len(steps) - EPOCH_STEPS_KEPT)
        self.epoch_steps, self.epoch_steps_from = steps[drop:], first + drop


EPOCH_STEPS_KEPT = 256  # a framework's checkpoint older than that many epochs is not mapped (its resume wins)
AHEAD_RNG_KEPT = 8  # random states before main-process fetches kept per stream (a wrapper's look-ahead depth)
ABANDONED_KEPT = 256  # epochs left before their end kept per stream, the last ones (Stream.abandoned)


DRAW_PROBE_FETCHES = 16


def _close_gap(st: Stream, now: tuple | None = None) -> None:
    """``st``'s next epoch starts (``st.epochs`` counts it): the gap after the previous one is over
    (``epoch_gaps``) at ``now`` (``rng.cpu_raw()``, taken here if None)."""
    if st.epochs > 1:
        st.gaps.close(st.end_rng if isinstance(st.end_rng, tuple) else None, now if now is not None else rng.cpu_raw())
    st.prev_end_rng, st.end_rng = st.end_rng, None


def loop_epoch(pos: dict) -> int:
    """The 0-based index a ``for epoch in range(...)`` loop shows for a loader position: ``pos["epoch"]``
    counts the iter() calls of the training loader's signature, less those that fed no step (``unfed``: an
    evaluation pass over it), plus those of loaders of other signatures that fed training before (the loader
    rebuilt with another batch size or length at each epoch)."""
    fed = 0
    for entry in pos.get("fed_before") or []:
        try:
            fed += max(int(entry[1]), 0)
        except (TypeError, ValueError, IndexError):
            pass  # (said when the plan was read)
    unfed = _unfed(pos)[1]  # evaluation passes over the training loader: not the loop's epochs
    return max(int(pos.get("epoch", 1)) - 1 - unfed, 0) + fed


def epoch_steps_of(pos: dict[str, Any]) -> tuple[int, list[int]]:
    """A checkpoint's (``epoch_steps_from``, ``epoch_steps``); (1, []) when absent or malformed
    (nothing read from a checkpoint is trusted unchecked)."""
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    steps = pos.get("epoch_steps") if isinstance(pos, dict) else None
    first = pos.get("epoch_steps_from", 1) if isinstance(pos, dict) else 1
    if not isinstance(steps, list) or not all(is_int(s) for s in steps) or not is_int(first) or first < 1:
        return 1, []
    return first, list(steps)


class SkippedEpoch(Exception):
    """Raised inside a registered wrapper's iteration of an epoch that finished before the checkpoint,
    where the wrapper cannot take an empty DataLoader (accelerate's ``DataLoaderDispatcher`` fails on
    one): ``count_handed_by``'s iterator ends the wrapper's epoch instead."""


def _samplers(loader: DataLoader) -> list:
    inner = getattr(loader.batch_sampler, "sampler", None)
    return [s for s in (loader.sampler, inner) if s is not None]


def _sampler_state(sampler: Any) -> dict[str, Any] | None:
    # DistributedSampler keeps epoch (from set_epoch) and seed as plain ints; a custom sampler may keep
    # an epoch counter of its own, advanced in its __iter__.
    state = {k: v for k in ("epoch", "seed") if type(v := getattr(sampler, k, None)) is int}
    return state if "epoch" in state else None


@dataclass
class FastForward:
    """Where one stream must be brought to: the epoch-th iter() call, `batch` batches handed to the
    loop; the restore happens once `fetched` batches were taken from the loader."""

    sig: list
    epoch: int
    batch: int
    epoch_rng: dict | None
    reused: bool
    position: dict = field(default_factory=dict)
    fetched: int = -1
    others: list = field(default_factory=list)  # zipped loaders' FastForwards (reached, not restored at)
    # The random state before each of the fetched - batch fetches ahead of the loop (main-process loading),
    # and the loader's own generators' ({"rngs", "pids"} each; empty in a checkpoint written before)
    ahead_rng: list = field(default_factory=list)
    ahead_own: list = field(default_factory=list)
    # Loaders of other signatures that fed the optimizer before: signature -> the iter() calls made of it
    # (all before the snapshot: each such epoch runs again without data)
    fed_before: dict = field(default_factory=dict)
    ended: bool = False  # the snapshot point came after the epoch's iterator had ended
    gaps: epoch_gaps.Gaps = field(default_factory=epoch_gaps.Gaps)  # the states of the gaps between epochs
    draws: sampler_draws.Draws = field(default_factory=sampler_draws.Draws)  # the sampler's, mid-epoch
    replay: dict = field(default_factory=dict)  # epoch -> batches: the run's epochs left early (Stream.abandoned)
    unfed: dict = field(default_factory=dict)  # epoch -> (batches, ran to its end): fed no step (Stream.unfed)

    def __post_init__(self) -> None:
        if self.fetched < self.batch:  # checkpoints without "fetched": no look-ahead
            self.fetched = self.batch

    @classmethod
    def from_position(cls, pos: dict[str, Any]) -> "FastForward":
        batch = int(pos["batch"])
        others = []
        for p in pos.get("others") or []:
            try:
                others.append(cls.from_position(p))
            except (KeyError, TypeError, ValueError, AttributeError):
                _say_once("warning: a zipped loader's position in the checkpoint is malformed; that loader "
                          "restarts its epoch", "warning")
        fetched = int(pos.get("fetched", batch))
        ahead = pos.get("ahead_rng")
        if not isinstance(ahead, list) or len(ahead) != fetched - batch:
            ahead = []  # absent (workers, no look-ahead) or malformed: _fast_forward says so if it matters
        own = pos.get("ahead_own")
        if not isinstance(own, list) or len(own) != len(ahead) or not all(isinstance(o, dict) for o in own):
            own = []  # (_set_own checks each entry it is given)
        gaps = _parsed(pos, "past_ends", epoch_gaps.Gaps, "the random states of the gaps between epochs in the "
                       "checkpoint are malformed; the per-epoch code of the epochs a resume runs again draws from "
                       "others")
        draws = _parsed(pos, "sampler_draws", sampler_draws.Draws, "the random states the sampler drew from in the "
                        "middle of its epoch are malformed in the checkpoint; the order of the batches after this "
                        "resume may differ")
        fed: dict = {}
        for entry in pos.get("fed_before") or []:
            try:
                fed[tuple(entry[0])] = int(entry[1])
            except (TypeError, ValueError, IndexError, KeyError):
                _say_once("warning: the checkpoint's record of the loaders that fed training before is malformed; "
                          "a loader rebuilt with another batch size or length may not be skipped", "warning")
        return cls(list(pos["sig"]), int(pos["epoch"]), batch, pos.get("epoch_rng"),
                   bool(pos.get("reused")), pos, fetched, others, ahead, own, fed, pos.get("ended") is True, gaps,
                   draws, _replayed(pos), _unfed(pos)[0])


def _replayed(pos: dict[str, Any]) -> dict[int, int]:
    """The position's abandoned epochs before the resumed one (``Stream.abandoned``) as {epoch: batches};
    malformed ones are said and dropped (the relaunch skips those epochs, as before they were kept)."""
    out: dict[int, int] = {}
    raw = pos.get("abandoned") or []
    try:
        for epoch, batches in raw:
            if type(epoch) is not int or type(batches) is not int or not 0 < epoch < int(pos["epoch"]) \
                    or batches < 1:
                raise ValueError(epoch)
            out[epoch] = batches
    except (TypeError, ValueError):
        _say_once("warning: the checkpoint's record of the epochs the run left before their end is malformed; "
                  "those epochs are skipped without data", "warning")
        return {}
    return out


def _unfed(pos: dict[str, Any]) -> tuple[dict[int, tuple[int, int]], int]:
    """The position's epochs before the resumed one that fed no step (``Stream.unfed``) as {epoch: (batches,
    ran to its end)}, and how many there were in all; malformed ones are said and dropped (the relaunch passes
    those epochs without data, as it did before they were kept)."""
    out: dict[int, tuple[int, int]] = {}
    raw, count = pos.get("unfed") or [], pos.get("unfed_count", 0)
    try:
        resumed = int(pos["epoch"])
        for epoch, batches, ended in raw:
            if (type(epoch) is not int or type(batches) is not int or ended not in (0, 1) or type(ended) is not int
                    or not 0 < epoch < resumed or batches < 1):
                raise ValueError(epoch)
            out[epoch] = (batches, ended)
        if type(count) is not int or not len(out) <= count < resumed:
            raise ValueError(count)
    except (TypeError, ValueError, KeyError):
        _say_once("warning: the checkpoint's record of the epochs that fed no optimizer step (an evaluation pass "
                  "over the training loader) is malformed; those epochs are passed without data", "warning")
        return {}, 0
    return out, count


def _parsed(pos: dict[str, Any], key: str, kind: Any, malformed: str) -> Any:
    """``kind.parse(pos[key])``; an empty ``kind()`` when the position has none (checkpoints written before)
    or, said in one warning line, when it is malformed."""
    if key not in pos:
        return kind()
    got = kind.parse(pos[key])
    if got is None:
        _say_once(f"warning: {malformed}", "warning")
        return kind()
    return got


class _SkipFirst:
    """Stands in for the loader's index sampler during one ``iter()``: the first iterator
    advanced drops ``k`` index batches (``pending``); later ones (persistent workers' next epochs) do not.
    Each iterator's pulls are watched for draws from the global generators (into ``stream.draws``, as
    ``sampler_draws.watched`` says), and the skipping one's draws at the pulls of ``replay`` ({pull number:
    state}) are made from those states."""

    def __init__(self, inner: Any, k: int, before_first_draw: Callable[[], None] | None,
                 stream: "Stream | None" = None, replay: dict | None = None, pending: bool = True) -> None:
        self.inner, self.k, self.pending, self.before_first_draw = inner, k, pending, before_first_draw
        self.stream, self.replay = stream, replay

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> "_Skipping":
        return _Skipping(self.inner, self)


class _Skipping:
    """Index-batch iterator that drops ``owner.k`` batches once, on ``prime()`` or first use; watches what
    the pulls ``sampler_draws.watched`` names draw from the global generators."""

    def __init__(self, inner: Any, owner: _SkipFirst) -> None:
        self.it, self.owner, self.primed = iter(inner), owner, not owner.pending
        self.pulled, self.replay = 0, None
        self.draws = owner.stream.draws if owner.stream is not None else None  # this epoch's
        try:
            self.length: int | None = len(inner)
        except TypeError:  # no len(): a sampler repeated forever (MultiEpochsDataLoader's)
            self.length = None

    def _pull(self) -> Any:
        n = self.pulled
        self.pulled += 1
        saved = self.replay.get(n) if self.replay else None
        if saved is not None:  # the original pulled it from this state (kept in the checkpoint)
            now = rng.cpu_raw()
            try:
                rng.restore_some(saved)
            except Exception as e:  # noqa: BLE001 - nothing read from a checkpoint is trusted unchecked
                self.replay = None
                rng.put_cpu_raw(now)
                _say_once(f"warning: the random state the sampler drew from in the middle of its epoch is not usable "
                          f"({type(e).__name__}: {e}); the order of the batches after this resume may differ",
                          "warning")
                return next(self.it)
            try:
                return next(self.it)
            finally:
                rng.put_cpu_raw(now)  # what runs next draws as it would have without this pull
        d = self.draws
        if d is None or not sampler_draws.watched(d, n, self.length):
            return next(self.it)
        then = sampler_draws.before(d)
        out = next(self.it)
        sampler_draws.drawn(d, n, then, self.length)
        return out

    def __iter__(self) -> "_Skipping":
        return self

    def prime(self) -> None:
        """Skip now (a lazy sampler draws its permutation now, right after the worker seed)."""
        if self.primed:
            return
        self.primed = True
        if self.owner.pending:  # the first iterator used (torch makes two: in __init__ and _reset)
            self.owner.pending = False
            self.replay, self.owner.replay = self.owner.replay, None
            if self.owner.before_first_draw is not None:
                # Before the sampler's first draw (a lazy sampler draws on first next()).
                self.owner.before_first_draw()
            for _ in range(self.owner.k):
                self._pull()

    def __next__(self) -> Any:
        n = self.pulled
        if self.primed and not self.replay and self.length is not None and PULLS_QUIET <= n < self.length \
                and (self.draws is None or not self.draws.every):
            self.pulled = n + 1  # a pull nothing watches (most of them): as cheap as can be
            return next(self.it)
        if not self.primed:
            try:
                self.prime()
            except StopIteration:
                pass  # fewer batches than the skip: the epoch is over
        return self._pull()


PULLS_QUIET = sampler_draws.PROBED + 1  # the first pull not watched by default (sampler_draws.watched)


class _FinishedEpoch(_BaseDataLoaderIter):
    """The iterator of an epoch that finished before the checkpoint: a real DataLoader iterator
    (wrappers that inspect it see the usual type and attributes) that raises StopIteration at once.

    ``_BaseDataLoaderIter.__init__`` is not run: it would start no workers here, but it draws a
    worker seed and may warn; the attributes the base class reads are set directly."""

    def __init__(self, loader: DataLoader) -> None:  # noqa: D107 - see the class docstring
        self._dataset = loader.dataset
        self._dataset_kind = loader._dataset_kind
        self._IterableDataset_len_called = loader._IterableDataset_len_called
        self._auto_collation = loader._auto_collation
        self._drop_last = loader.drop_last
        self._index_sampler: list = []
        self._sampler_iter = iter(())
        self._num_workers = loader.num_workers
        self._persistent_workers = loader.persistent_workers
        self._timeout = loader.timeout
        self._collate_fn = loader.collate_fn
        self._pin_memory = False
        self._num_yielded = 0
        self._profile_name = f"enumerate(DataLoader)#{_BaseDataLoaderIter.__name__}.__next__"

    def _reset(self, loader: DataLoader, first_iter: bool = False) -> None:
        self._sampler_iter, self._num_yielded = iter(()), 0

    def _next_data(self) -> Any:
        raise SkippedEpochEnd


class SkippedEpochEnd(StopIteration):
    """The end of an epoch the resume skips (it finished before the checkpoint), raised by its iterator
    at once: a StopIteration to every loop. One the script lets escape is named at exit (``_SkipHook``)."""


class _SkipHook:
    """``sys.excepthook`` while a relaunch skips epochs: a script that asks a skipped epoch's iterator for
    a batch itself, outside a ``for`` loop, and does not catch its end (a prefetcher that re-iterates the
    DataLoader when it ends, made once for the whole run) stopped with a bare StopIteration traceback
    from pyckpt's code; one line now says why, before the traceback."""

    installed = False

    @classmethod
    def install(cls, tracker: "LoaderTracker") -> None:
        if cls.installed:
            return
        cls.installed = True
        previous = sys.excepthook

        def hook(tp, value, tb):
            if tracker.plan is not None and _caused_by_skip(value):
                _say_once("the relaunch stopped before the checkpoint's restore point: the script asked the "
                          "DataLoader itself (outside a for loop) for a batch of an epoch the resume skips (it "
                          "finished before the checkpoint) and did not catch that epoch's end (StopIteration): "
                          "a loop that re-iterates the DataLoader itself cannot resume this many epochs in. "
                          "PYCKPT_RESUME=never (or a new PYCKPT_DIR) trains from scratch", "warning")
            previous(tp, value, tb)

        sys.excepthook = hook


def _caused_by_skip(exc: BaseException | None) -> bool:
    """Whether ``exc`` is a skipped epoch's end, or was raised while handling or because of one (a
    generator turns it into RuntimeError)."""
    seen = 0
    while exc is not None and seen < 16:
        if isinstance(exc, SkippedEpochEnd):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def skip_note(first: int, resumed: int) -> str | None:
    """The line saying that epochs ``first`` .. ``resumed - 1`` (0-based, as ``range()`` numbers them) run
    again without data before the restore point in epoch ``resumed``; None when there are none."""
    if resumed <= first:
        return None
    many = resumed - first > 1
    return (f"epoch{'s' if many else ''} {first}{f'-{resumed - 1}' if many else ''} run{'' if many else 's'} again "
            f"without data before the restore point (epoch {resumed}): what the script's per-epoch code prints or "
            "writes to files there reflects the state before the restore, and variables the loader loop sets or "
            "changes hold the checkpoint's values there")


class LoaderTracker:
    """Tracks every DataLoader's iteration; drives snapshot points and fast-forward.

    ``on_point(stream)`` is called before a batch is fetched whenever ``armed``
    is set; ``on_first_iter()`` once, at the first ``iter()`` of any loader
    (the resume plan is made then, when the process group exists);
    ``on_idle_fetches()`` once when ``check_at`` fetches were made."""

    def __init__(self, on_point: Callable[[Stream], None], on_first_iter: Callable[[], None],
                 on_idle_fetches: Callable[[], None], check_at: int = 16) -> None:
        self.on_point, self.on_first_iter, self.on_idle_fetches = on_point, on_first_iter, on_idle_fetches
        self.streams: dict[tuple, Stream] = {}
        self.armed = False
        self.fetches = 0
        self.check_at = check_at
        self.last: Stream | None = None
        self.plan: FastForward | None = None
        self.plan_stream: Stream | None = None  # set once the plan's epoch iterator exists
        self.adopted: Stream | None = None  # PYCKPT_RESUME_EDITED=tracked: the training loader over new data
        self.skip_note: str | None = None  # said when the first skipped epoch of the plan's stream ends
        self.skip_span: tuple[int, int] | None = None  # (first, resumed) of that note (set_skip_note)
        self.wrapper_depth = 0  # > 0 while a registered look-ahead wrapper runs its own code
        self._first = True
        self.steps_marked = 0  # optimizer steps with a fetch before them (zipped-loader detection)
        self._fetched_since_step: dict[int, Stream] = {}
        # While a resumed iterator is built: (base seed, first worker[, the generator to put back after its
        # seed is drawn]) for its workers (loader_workers.py, loader_kept.py).
        self._pending_workers: tuple | None = None
        # In a relaunch, after the restore: the checkpoint's persistent iterators of other loaders (loader_kept.py).
        self.kept: loader_kept.Kept | None = None
        self.ok_fetches = 0  # batches returned by any tracked iterator
        self._hooks: HookSet | None = None
        self._found: dict[type, bool] = {}  # iterator classes probed: counted as look-ahead wrappers or not
        self.replaying = False  # an epoch the run left early is being replayed with its data (_replay)
        # ``fetches`` when a skipped epoch of the training loader ended, until the next iter(): a step with no
        # fetch since is that epoch's per-epoch code (an accumulation's leftover step), not training
        self.skip_ended_at: int | None = None

    # -- installation ---------------------------------------------------------
    def install(self, hooks: HookSet) -> None:
        """Patch DataLoader.__iter__, the iterators' __next__ and DataLoader._index_sampler."""
        tracker = self
        orig_iter = DataLoader.__iter__
        orig_next = _BaseDataLoaderIter.__next__
        orig_index_sampler = DataLoader._index_sampler

        def __iter__(loader):  # noqa: N807
            return tracker._on_iter(loader, orig_iter, orig_next)

        def __next__(it):  # noqa: N807
            st = it._pyckpt_stream
            if st is None:
                return orig_next(it)
            if type(it) is _FinishedEpoch:
                real = it.__dict__.get("_pyckpt_real")  # (not ``or``: bool() of an iterator asks len(loader))
                if real is None:
                    real = tracker._collapse(it, st, orig_iter, orig_next)
                if real is None:
                    real = tracker._replay(it, st, orig_iter)
                if real is not None:
                    return __next__(real)
                if tracker._target(st) is tracker.plan:
                    tracker.say_skip_note()  # a skipped epoch of the training loader ends here
            if st.main is not None and tracker._main_gone(st):
                st = tracker._promote(st)
            if st.batches >= it.__dict__.get("_pyckpt_replay", st.batches + 1):
                raise SkippedEpochEnd  # more than the run took from this epoch: the relaunch has gone another way
            skipping = it.__dict__.get("_sampler_iter")
            if type(skipping) is _Skipping and not skipping.primed:
                tracker._prime(skipping, st)  # a resumed epoch's first fetch: skip its batches now
            elif st.batches == 0 and st.first_rng is None and getattr(it, "_num_workers", 1) == 0:
                st.first_rng = rng.cpu_raw()
            if st.probe:
                st.probe = False
                if tracker.wrapper_depth == 0:
                    tracker._probe_wrapper(st)
            if tracker.armed and tracker._ready(st):
                tracker.on_point(st)
            tracker.last = st
            if st.handed is not None and getattr(it, "_num_workers", 1) == 0:
                tracker._before_main_process_fetch(st)
            probe = st.draw_probe > 0
            if probe:
                before = rng.cpu_raw()
                if st.last_mark is not None and rng.cpu_moved(st.last_mark, before):
                    st.step_draws = True
            try:
                data = orig_next(it)
            except StopIteration:
                # The end of an epoch is a fetch event too: a look-ahead wrapper hands its last batch
                # after this, so the loop's last step of the epoch follows no successful fetch.
                tracker.fetches += 1
                if st.main is None:
                    if type(it) is _FinishedEpoch:
                        if not it.__dict__.get("_pyckpt_ended"):  # once: a script may ask again
                            it.__dict__["_pyckpt_ended"] = True
                            tracker._skipped_epoch_ended(st)
                    elif not st.ended:
                        st.end_rng = rng.cpu_raw()
                st.ended = True
                raise
            if probe:
                tracker._probe_draws(st, before)
            tracker._count_batch(st)
            return data

        def _index_sampler(loader):
            skip = loader.__dict__.get("_pyckpt_skip")
            return skip if skip is not None else orig_index_sampler.fget(loader)

        orig_base_init = _BaseDataLoaderIter.__init__
        orig_put = _MultiProcessingDataLoaderIter._try_put_index

        def __init__(it, loader):  # noqa: N807
            pending = tracker._pending_workers
            drawn_from = pending[2] if pending is not None and len(pending) > 2 else None
            before = drawn_from.get_state() if drawn_from is not None else None
            orig_base_init(it, loader)
            if pending is not None:
                # A resumed iterator: the original's base seed (persistent workers drew it at an
                # earlier epoch), and its first batch to the worker that loaded it originally.
                it._base_seed, it.__dict__["_pyckpt_first_worker"] = pending[0], pending[1]
            if before is not None:  # the run reused its iterator here, drawing no seed (loader_kept.py)
                drawn_from.set_state(before)

        def _try_put_index(it):
            first = it.__dict__.pop("_pyckpt_first_worker", 0)
            for _ in range(first):
                next(it._worker_queue_idx_cycle)
            return orig_put(it)

        self._hooks = hooks
        hooks.patch(_BaseDataLoaderIter, "__init__", __init__)
        hooks.patch(_MultiProcessingDataLoaderIter, "_try_put_index", _try_put_index)
        hooks.patch(_BaseDataLoaderIter, "_pyckpt_stream", None)
        hooks.patch(DataLoader, "__iter__", __iter__)
        # Loaders that keep their own position and replace DataLoader.__iter__ (torchdata's
        # StatefulDataLoader) are routed through the tracker too, now and when such a class is made.
        for cls in _subclasses(DataLoader):
            self._route(cls, orig_next)
        orig_init_subclass = DataLoader.__dict__.get("__init_subclass__")

        def __init_subclass__(cls, **kwargs):  # noqa: N807
            if orig_init_subclass is not None:
                orig_init_subclass.__func__(cls, **kwargs)
            else:
                super(DataLoader, cls).__init_subclass__(**kwargs)
            tracker._route(cls, orig_next)

        hooks.patch(DataLoader, "__init_subclass__", classmethod(__init_subclass__))
        hooks.patch(_BaseDataLoaderIter, "__next__", __next__)
        hooks.patch(DataLoader, "_index_sampler", property(_index_sampler))
        self._orig_next = orig_next
        from . import integrations

        integrations.install(self, hooks)

    def count_handed_by(self, hooks: HookSet, cls: type,
                        finish_skipped: Callable[[Any], None] | None = None,
                        per_item: Callable[[Any], int] | None = None) -> None:
        """Treat ``cls`` (an iterable wrapping a DataLoader, possibly fetching ahead) as the loop's
        data source: its ``__iter__`` is wrapped to count the batches it hands to the loop.

        ``finish_skipped(wrapper)`` is called when the wrapper hands over something for an epoch that
        is skipped on resume (its DataLoader yields nothing then; older accelerate versions hand the
        loop ``None`` for an empty loader): the item is dropped, the wrapper's iterator closed, and
        ``finish_skipped`` does the wrapper's end-of-epoch bookkeeping instead (also when the wrapper's
        code raises ``SkippedEpoch``). ``per_item(wrapper)``: DataLoader batches in one item handed to
        the loop (default 1; accelerate's dispatcher concatenates one per process)."""
        orig = cls.__iter__
        tracker = self

        def __iter__(wrapper):  # noqa: N807
            tracker.wrapper_depth += 1
            try:
                inner = orig(wrapper)
            finally:
                tracker.wrapper_depth -= 1
            return tracker._count_handed(wrapper, inner, finish_skipped, per_item(wrapper) if per_item else 1)

        hooks.patch(cls, "__iter__", __iter__)

    def _count_handed(self, wrapper: Any, inner: Any, finish_skipped: Callable[[Any], None] | None,
                      per_item: int = 1) -> Any:
        try:
            while True:
                self.wrapper_depth += 1
                try:
                    item = next(inner)
                except StopIteration:
                    return
                except SkippedEpoch:
                    if finish_skipped is not None:
                        finish_skipped(wrapper)
                    return
                finally:
                    self.wrapper_depth -= 1
                st = self.last
                if st is not None and st.skipping:
                    if finish_skipped is not None:
                        close = getattr(inner, "close", None)
                        if close is not None:
                            close()
                        finish_skipped(wrapper)
                        return
                elif st is not None and st.handed is not None:
                    st.handed += per_item
                yield item
        finally:
            close = getattr(inner, "close", None)
            if close is not None:
                close()  # the loop left early (break, exception): let the wrapper clean up as usual

    def follow_fetch(self, st: Stream, fetch: Callable[[], Any], got_batch: Callable[[Any], bool]) -> Any:
        """A fetch that another rank makes for this one (``st.follower``): a snapshot or restore point
        like a real fetch, at the same place in the loop as the reading rank's; counted in batches
        handed to this rank. ``got_batch(result)``: whether ``fetch()`` brought a batch."""
        st.follower = True
        if self.armed and self._ready(st):
            self.on_point(st)
        self.last = st
        result = fetch()
        if not got_batch(result):
            self.fetches += 1
            st.ended = True
            return result
        self._count_batch(st)
        return result

    def _before_main_process_fetch(self, st: Stream) -> None:
        """A fetch under a look-ahead wrapper, loaded in this process: on resume, the batches fetched ahead
        of the restore point draw from the random state the original run drew them from; and the state
        before this fetch is kept for a snapshot whose look-ahead includes it."""
        plan = self.plan
        loader = st.loader() if st.loader is not None else None
        if plan is not None and plan.ahead_rng and st is self.plan_stream:
            i = st.batches - plan.batch
            if 0 <= i < len(plan.ahead_rng):
                try:
                    rng.restore(plan.ahead_rng[i])
                except Exception as e:  # malformed: nothing read from a checkpoint is trusted unchecked
                    plan.ahead_rng = []
                    _say_once(f"warning: loader {plan.sig}: the random state saved for the batches fetched ahead "
                              f"of the loop is not usable ({type(e).__name__}: {e}); random draws of the dataset "
                              "or collate_fn for them may differ after this resume", "warning")
                if plan.ahead_rng and i < len(plan.ahead_own) and loader is not None:
                    # (with the module-global generators its code draws from: the loop state puts the
                    # script's globals back only at the restore point, after these fetches), and the
                    # dataset's and collator's settings then (a callback annealing mlm_probability between)
                    if "attrs" in plan.ahead_own[i]:
                        why = pipeline_attrs.restore(loader, [], plan.ahead_own[i]["attrs"])
                        if why is not None:
                            _say_once(f"warning: loader {plan.sig}: the settings of its dataset or collate_fn saved "
                                      f"before a batch fetched ahead of the loop were not put back ({why}); that "
                                      "batch may differ after this resume", "warning")
                    _set_own(loader, plan.ahead_own[i], "before a batch fetched ahead of the loop",
                             loader_workers.module_generators(loader.dataset, loader.collate_fn))
                    set_pids(loader, plan.ahead_own[i].get("pids"))
        pids: list[str] = []
        own = (_own_raw(loader, pids, loader_workers.module_generators(loader.dataset, loader.collate_fn))
               if loader is not None else ())
        # The dataset's and collator's settings (not the samplers': their order was drawn at iter())
        attrs = pipeline_attrs.capture(loader, []) if loader is not None else {}
        st.pre_fetch.append((st.batches, (rng.cpu_raw(), own, tuple(pids), attrs)))

    def _count_batch(self, st: Stream) -> None:
        """Book-keeping of a fetch that handed ``st``'s loop a batch (the patched ``__next__`` and
        ``follow_fetch``): counts, the streams fetched since the last step, the idle-fetch check."""
        st.batches += 1
        self.fetches += 1
        self.ok_fetches += 1
        self._fetched_since_step[id(st)] = st
        if self.fetches == self.check_at:
            self.on_idle_fetches()

    def _route(self, cls: type, orig_next: Callable) -> None:
        """Send ``iter()`` of a DataLoader subclass with its own ``__iter__``, ``state_dict()`` and
        ``load_state_dict()`` through the tracker (its own ``__iter__`` makes the iterator)."""
        if "__iter__" not in vars(cls) or not all(callable(getattr(cls, m, None))
                                                    for m in ("state_dict", "load_state_dict", "_get_iterator")):
            return
        own_iter, tracker = vars(cls)["__iter__"], self

        def own(loader):
            return own_iter(loader)

        own._pyckpt_own = True

        def __iter__(loader):  # noqa: N807
            if loader.__dict__.get("_pyckpt_routing"):
                return own_iter(loader)
            loader.__dict__["_pyckpt_routing"] = True  # a super().__iter__() inside is not another epoch
            try:
                return tracker._on_iter(loader, own, orig_next)
            finally:
                loader.__dict__.pop("_pyckpt_routing", None)

        assert self._hooks is not None
        self._hooks.patch(cls, "__iter__", __iter__)

    def _probe_wrapper(self, st: Stream) -> None:
        """At an epoch's first fetch: if it is made by an object of a class that hands items to the loop
        (``_handing_method``: ``__next__``, or the script's own no-argument ``next()`` of the apex/YOLOX
        prefetchers; the outermost such object on the stack below the loop's frame, a fetcher that keeps
        a batch ahead), count the batches that class hands to the loop from now on."""
        frame, found, in_next = sys._getframe(2), None, False
        for _ in range(12):
            if frame is None:
                break
            if not frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
                obj = frame.f_locals.get("self")
                cls = type(obj) if obj is not None else None
                method = _handing_method(cls) if cls is not None else None
                if method is None:
                    break  # the loop's own frame (or a trainer object's method)
                if cls is not found:
                    found, in_next = cls, False
                in_next = in_next or frame.f_code.co_name == method
            frame = frame.f_back
        if found is None or self._found.get(found) is False:
            return
        if found not in self._found:
            self._found[found] = None  # on probation until one counted call took one batch at most
            self._count_next(found)
        # Batches before this fetch were handed (skipped on resume); a call running now hands one more.
        st.handed = st.batches + (1 if in_next else 0)
        st.wrapper_cls = found

    def _count_next(self, cls: type) -> None:
        """Count the items ``cls``'s handing method (``__next__`` or ``next``) hands to the loop (one
        DataLoader batch each, checked: a class that takes more than one batch per item is no look-ahead
        wrapper and is left alone). Its ``__iter__`` starts an epoch counted in its items, and so does a
        ``next()`` class's ``__init__`` (an apex prefetcher, made every epoch, makes the DataLoader's
        iterator and fetches its first batch there)."""
        method = _handing_method(cls)
        assert method is not None
        orig_next, tracker = getattr(cls, method), self

        @functools.wraps(orig_next)
        def handing(wrapper):
            if tracker._found.get(cls) is False:
                return orig_next(wrapper)
            tracker.wrapper_depth += 1
            before, last = tracker.ok_fetches, tracker.last
            # How far ahead of the loop it keeps the stream, and in which epoch: a call that starts the next
            # epoch itself (an "infinite loader" re-iterating on StopIteration) hands an item of the old
            # epoch's look-ahead, and the new epoch's fetches are all ahead of the loop.
            ahead = last.batches - last.handed if last is not None and last.handed is not None else None
            epochs = last.epochs if last is not None else None
            try:
                item = orig_next(wrapper)
            finally:
                tracker.wrapper_depth -= 1
            st = tracker.last
            if tracker.ok_fetches - before > 1:
                tracker._found[cls] = False  # positions stay in the DataLoader's batches
                if st is not None:
                    st.handed = None
            else:
                tracker._found[cls] = True
                if st is not None and st.handed is not None:
                    if st is last and st.epochs != epochs and ahead is not None and ahead > 0:
                        st.handed = max(0, st.batches - ahead)
                    else:
                        st.handed += 1
            return item

        def starting(orig: Callable) -> Callable:
            @functools.wraps(orig)
            def start(wrapper, *args, **kwargs):
                if tracker._found.get(cls) is False:
                    return orig(wrapper, *args, **kwargs)
                tracker.wrapper_depth += 1  # an iter() of the DataLoader inside it starts a counted epoch
                try:
                    return orig(wrapper, *args, **kwargs)
                finally:
                    tracker.wrapper_depth -= 1
            return start

        assert self._hooks is not None
        self._hooks.patch(cls, method, handing)
        for name in ("__iter__", "__init__") if method == "next" else ("__iter__",):
            orig = getattr(cls, name, None)
            if orig is not None and orig is not getattr(object, name, None):
                self._hooks.patch(cls, name, starting(orig))

    def _on_step(self) -> None:
        """An optimizer stepped (called by the session's post-step hook): remember each stream's batches now
        (a zipped loader fetched before the step is positioned as of the step, not as of the snapshot point
        after its next fetch)."""
        fetched = self._fetched_since_step
        if not fetched:
            return  # a second optimizer in the same iteration (a GAN): nothing fetched since
        self._fetched_since_step = {}
        for side in [st for st in fetched.values() if st.main is not None]:
            if id(side.main) in fetched:
                side.side_steps += 1
                if self.last is side:
                    self.last = side.main  # an evaluation fetched after the training batch: the loop's is that
                if side.side_steps == 2:
                    _say_once(f"warning: two loaders of one kind {side.sig} are iterated together across steps; "
                              "the position of the second is not saved, so after a resume it starts its epoch "
                              "again (give it another batch size or dataset length to keep it)", "warning")
            else:  # the steps run on it alone: the loop moved to it (its old iterator idles)
                main = self._promote(side)
                fetched[id(main)] = main
        self.steps_marked += 1
        for st in self.streams.values():
            st.streak = st.streak + 1 if id(st) in fetched else 0
            st.mark = st.batches
        if self.last is not None and self.last.main is None:
            self.last.fed_steps += 1
            self.last.fed_in_epoch += 1
            self.last.trained = self.last.trained or self.last.fed_in_epoch >= 2

    def zipped_with(self, primary: Stream) -> list[Stream]:
        """Loaders iterated in step with ``primary`` (``zip(loader1, loader2)``): fetched before each
        of the last two steps (the only step so far, after the first) and in the middle of an epoch.
        An evaluation loader runs to its end between steps, so it is never one of them."""
        need = min(2, self.steps_marked)
        return [st for st in self.streams.values()
                if st is not primary and need > 0 and st.streak >= need and not st.ended and not st.skipping]

    def _ready(self, st: Stream) -> bool:
        """Whether a point on ``st`` may run now: a pending restore waits until a look-ahead
        wrapper has fetched as many batches as it had when the snapshot was taken (and seen the epoch's
        end, if it had then)."""
        plan = self.plan
        return (plan is None or st is not self.plan_stream
                or (st.batches >= plan.fetched and (st.ended or not plan.ended)))

    # -- iteration --------------------------------------------------------------
    def stream_for(self, loader: DataLoader) -> Stream:
        sig = signature(loader)
        key = tuple(sig)
        st = self.streams.get(key)
        if st is None:
            st = self.streams[key] = Stream(sig, self)
        return st

    def ensure_started(self) -> None:
        """Run ``on_first_iter`` now if no loader was iterated yet (an integration needs the resume
        plan before the training loop's first ``iter()``)."""
        if self._first:
            self._first = False
            self.on_first_iter()

    def _on_iter(self, loader: DataLoader, orig_iter: Callable, orig_next: Callable) -> Any:
        if loader.__dict__.get("_pyckpt_routing") and not getattr(orig_iter, "_pyckpt_own", False):
            return orig_iter(loader)  # DataLoader.__iter__ called by a routed subclass's own: counted there
        self.ensure_started()
        st = self.stream_for(loader)
        self.replaying = False  # a replayed epoch (below) ends with the next iter() of any loader
        self.skip_ended_at = None
        if self._nested(st, loader) and not self._replayed_to_its_end(st):
            st = Stream(st.sig, self, main=st)
        else:
            st.note_epoch_over()
        st.epochs += 1
        st.note_epoch_start(self._step())
        st.var_marks = loopstate.marks(frames.user_frames(sys._getframe(1)))
        now = rng.cpu_raw()  # the random state at this iter(): the gap's end and the epoch's start (read once)
        if st.main is None:
            _close_gap(st, now)
        self._begin_epoch(st, loader)
        target = self._target(st)
        skip = (target is not None and st.epochs < target.epoch) or self._fed_before(st)
        if skip and target is not None and target is self.plan and st.epochs in target.unfed:
            return self._run_unfed(st, loader, orig_iter, target.unfed[st.epochs])
        if skip:
            st.skipping = True
            _SkipHook.install(self)
            it = _FinishedEpoch(loader)
            it._pyckpt_stream = st
            # Over from the start, fetched or not: a loop that keeps it (``batches = zip(a, b)`` held until
            # the next epoch's zip is made, ``b`` never fetched at its end) starts no side iteration.
            st.iterator, st.ended = weakref.ref(it), True
            return it
        if target is not None and st.epochs == target.epoch:
            return self._fast_forward(loader, st, target, orig_iter, orig_next, primary=target is self.plan)
        st.reused = bool(loader.persistent_workers and loader.num_workers > 0 and loader._iterator is not None)
        started = (st.epoch_rng or {}).get("attrs") if st.reused else None
        st.epoch_rng = _epoch_rng(loader, now=now)
        if started is not None:  # persistent workers keep the dataset copies of the iter() that started them
            # (the samplers run here, at every epoch: their settings are this iter()'s, a DistributedSampler's
            # set_epoch() among them)
            st.epoch_rng["attrs"] = {**{k: v for k, v in started.items() if not k.startswith("sampler.")},
                                     **{k: v for k, v in st.epoch_rng["attrs"].items() if k.startswith("sampler.")}}
        if _watched(loader):  # the sampler's draws in the middle of the epoch (sampler_draws.py)
            loader.__dict__["_pyckpt_skip"] = _SkipFirst(loader._index_sampler, 0, None, st, pending=False)
        persistent = bool(loader.persistent_workers and loader.num_workers > 0 and not st.reused)
        kept = (self.kept.take(st, loader) if self.kept is not None and persistent and self._fresh(loader, None)
                else None)
        try:
            it = self._start(loader, orig_iter, kept)
        finally:
            loader.__dict__.pop("_pyckpt_skip", None)
        if persistent and loader.__dict__.get("_iterator") is it:
            loader_kept.note_started(st, loader)
        it._pyckpt_stream = st
        st.iterator = weakref.ref(it)
        return it

    def _run_unfed(self, st: Stream, loader: DataLoader, orig_iter: Callable, took: tuple[int, int]) -> Any:
        """A relaunch's ``iter()`` of an epoch before the checkpoint's that fed no optimizer step in the run
        (``Stream.unfed``: an evaluation pass over the training loader in per-epoch code, dataset statistics
        before training): it runs with its data, up to the batches the run took from it where the run left it
        early (``took``: batches, ran to its end). Passed without data, such code's counters stayed at zero and
        ``num_correct / num_samples`` killed the relaunch. What it computes reflects the state before the
        restore, as the rest of the per-epoch code's does; a step in it is refused (the run took none there)."""
        batches, ended = took
        it = self._start_alone(loader, orig_iter)
        if not ended:
            it.__dict__["_pyckpt_replay"] = batches
        _say_once(f"the passes over loader {st.sig} that fed no optimizer step in the run (an evaluation of the "
                  "training data, a sample batch) run again with their data before the restore point, up to the "
                  "batches the run took from each", "info", key="unfed")
        it._pyckpt_stream = st
        st.iterator = weakref.ref(it)
        return it

    def _start_alone(self, loader: DataLoader, orig_iter: Callable) -> Any:
        """``_start`` for an epoch run with its data before the restore point: a persistent-workers loader gets an
        iterator of its own, shut down when it ends, so that the resumed epoch makes the loader's persistent
        iterator, from the worker states the checkpoint kept, as it does where nothing ran before it."""
        if not (loader.persistent_workers and loader.num_workers > 0 and loader.__dict__.get("_iterator") is None):
            return self._start(loader, orig_iter)
        loader.__dict__["persistent_workers"] = False  # (DataLoader.__setattr__ refuses it after __init__)
        try:
            return self._start(loader, orig_iter)
        finally:
            loader.__dict__["persistent_workers"] = True

    def _replay(self, it: "_FinishedEpoch", st: Stream, orig_iter: Callable) -> Any:
        """The script calls ``next()`` itself, where the relaunch cannot be restored (``_collapse``), on the
        iterator of a skipped epoch the run left early (``plan.replay``: one sample batch drawn with
        ``next(iter(loader))``, a learning-rate range test). Skipped, that ``next()`` got the epoch's end at
        once, which such code does not catch, and the relaunch stopped. Instead the epoch runs again with its
        data, up to the batches the run took from it (more end it). At the run's start nothing was skipped
        before it, so the sampler draws the same order as the run; later, what the code makes of its batches is
        overwritten at the restore point like the rest of the per-epoch code's. Its steps are the run's own
        (``replaying``: counted, no snapshot, no refusal until the next ``iter()``). A ``for`` loop still
        passes it without data."""
        plan = self.plan
        caller = sys._getframe(2)  # _replay <- the patched __next__ <- whoever asked for the item
        if (plan is None or self._target(st) is not plan or st.main is not None or not st.skipping
                or st.epochs not in plan.replay or st.iterator is None or st.iterator() is not it
                or not frames.is_user_file(caller.f_code.co_filename) or not frames.calls_explicitly(caller)):
            return None
        loader = st.loader() if st.loader is not None else None
        if loader is None:
            return None
        self._begin_epoch(st, loader)
        self.replaying = True
        if self.skip_span is not None and self.skip_note is not None and self.skip_span[0] == st.epochs - 1:
            self.set_skip_note(st.epochs, self.skip_span[1])  # this one runs with its data
        n = plan.replay[st.epochs]
        _say_once(f"epoch {st.epochs - 1}, which the run left after {n} batch{'' if n == 1 else 'es'}, runs again "
                  "with its data, as does any other epoch the run left early that the script draws with next() (a "
                  "learning-rate range test) before the restore point", "info", key="replay")
        real = self._start_alone(loader, orig_iter)
        real._pyckpt_stream = st
        real.__dict__["_pyckpt_replay"] = plan.replay[st.epochs]
        it.__dict__["_pyckpt_real"] = real
        st.iterator = weakref.ref(real)
        return real

    def set_skip_note(self, first: int, resumed: int) -> None:
        """The note said when the first skipped epoch of the plan's stream ends: epochs ``first`` ..
        ``resumed - 1`` (0-based) run again without data (``skip_note``)."""
        self.skip_span, self.skip_note = (first, resumed), skip_note(first, resumed)

    def say_skip_note(self) -> None:
        """Say once (rank 0) that the script's per-epoch code ran again in the epochs the resume skipped."""
        note, self.skip_note = self.skip_note, None
        if note is not None:
            _say_once(note, "info")

    def _skipped_epoch_ended(self, st: Stream) -> None:
        """A skipped epoch of the training loader ends in the relaunch: the last one before the resumed epoch
        gets back the random state its original ended with (``prev_end_rng``), for the per-epoch code that
        runs next. Without it, checkpoints written before, or an epoch that ended by ``break``: as it is."""
        plan = self.plan
        if plan is None or self._target(st) is not plan or st.epochs >= plan.epoch:
            return
        session = getattr(self, "session", None)
        if session is not None:  # the caller of the patched __next__ that raised StopIteration: the script's loop
            session.bind_unset(sys._getframe(2))
        self.skip_ended_at = self.fetches
        if st.epochs == plan.epoch - 1:
            saved, put = plan.position.get("prev_end_rng"), rng.restore
        else:  # an earlier gap: the streams its code drew from (epoch_gaps.py)
            saved, lost = plan.gaps.state_of(st.epochs - 1)
            put = rng.restore_some
            if lost:  # (said once: the same line for every such epoch)
                _say_once(f"warning: loader {st.sig}: the random states the per-epoch code drew from are kept for "
                          f"the last {epoch_gaps.KEPT} epochs only: before epochs 1-{plan.gaps.first} it drew from "
                          "others after this resume, so what it made there (a dataset's order shuffled in place) "
                          "may differ", "warning")
        if saved is None:
            return
        try:
            put(saved)
        except Exception as e:  # noqa: BLE001 - nothing read from a checkpoint is trusted unchecked
            _say_once(f"warning: loader {st.sig}: the random state saved at the end of epoch {st.epochs - 1} is not "
                      f"usable ({type(e).__name__}: {e}); what the script draws before epoch {st.epochs} may differ "
                      "after this resume", "warning")

    def _step(self) -> int:
        return getattr(getattr(self, "session", None), "step", 0) or 0

    def _begin_epoch(self, st: Stream, loader: DataLoader) -> None:
        """Reset ``st``'s per-epoch counters for the epoch its ``iter()`` of ``loader`` starts."""
        st.batches, st.fed_in_epoch = 0, 0
        st.mark, st.ended = 0, False  # this epoch's batches all come after the last step
        st.pre_fetch.clear()
        st.first_rng = None
        st.draws = sampler_draws.Draws(st.draws)
        st.probe = True
        st.handed = 0 if self.wrapper_depth else None
        st.skipping = False
        st.loader = weakref.ref(loader)
        # An IterableDataset loaded in this process and positioned by loading and dropping batches: watch
        # whether its fetches and the steps between them draw from the same global generators (below).
        replayed = (loader._dataset_kind == _DatasetKind.Iterable and loader.num_workers == 0
                    and st.main is None and _stateful_owner(loader)[0] is None)
        st.draw_probe = DRAW_PROBE_FETCHES if replayed and not st.draws_said else 0
        st.last_mark, st.fetch_draws, st.step_draws = None, False, False

    def _probe_draws(self, st: Stream, before: tuple) -> None:
        """After a fetch of a watched IterableDataset (``_begin_epoch``): a resume loads and drops its batches
        back to back, so a dataset that draws from the global generators while it yields (a shuffle buffer)
        gives other batches then when the training step also draws from them between its fetches (dropout):
        said once. Watched for the first DRAW_PROBE_FETCHES fetches of an epoch only (the check costs tens
        of microseconds)."""
        after = rng.cpu_raw()
        if rng.cpu_moved(before, after):
            st.fetch_draws = True
        st.last_mark = after
        st.draw_probe -= 1
        if st.fetch_draws and st.step_draws:
            st.draw_probe, st.draws_said = 0, True
            _say_once(f"warning: loader {st.sig}: its IterableDataset draws random numbers in this process while "
                      "it yields, and the training steps draw from the same generators between its batches; a "
                      "resume in the middle of an epoch loads and drops the batches before its position one after "
                      "the other, so the batches after it may differ. Give the dataset state_dict()/"
                      "load_state_dict() (it is then positioned through them), load it in worker processes, or "
                      "let it draw from a generator of its own (kept with the loader)", "warning")

    def _adopts(self, plan: FastForward, st: Stream) -> bool:
        """``PYCKPT_RESUME_EDITED=tracked``: whether ``st`` is the training loader over data of another length
        (samples added or removed between the runs) or with another ``num_workers`` (a node with fewer cores):
        a loader of the same dataset type, batch size, sampler kinds and ``drop_last``, iterated at the place
        of the script where the checkpoint's training loader was fetched (its innermost frame: same code, same
        line). It takes the plan's place: the resume goes on at the checkpoint's epoch and batch, said in one
        line. The first such stream only."""
        if self.adopted is not None:
            return self.adopted is st
        if (st.main is not None or len(st.sig) != len(plan.sig) or st.sig[0] != plan.sig[0]
                or st.sig[2:6] != plan.sig[2:6] or tuple(st.sig) in plan.fed_before
                or knobs.get("PYCKPT_RESUME_EDITED") != "tracked"):
            return False
        source = getattr(getattr(self, "session", None), "source", None)
        loop = (source.rank_state or {}).get("loop") if source is not None else None
        stack = loop.get("stack") if isinstance(loop, dict) else None
        if not _same_line(stack, frames.user_frames(sys._getframe(1))):
            return False
        self.adopted = st
        where = f"PYCKPT_RESUME_EDITED=tracked goes on at its epoch {loop_epoch(plan.position)}, batch {plan.batch}"
        if st.sig[1] == plan.sig[1]:  # the worker count alone: the sampler's batches are the same
            what = ("over the IterableDataset as the new workers split it (other batches than the run's)"
                    if plan.sig[3] == "_InfiniteConstantSampler" else "with the same batches")
            _say_once(f"warning: the training loader's num_workers changed since the checkpoint ({plan.sig[6]} in "
                      f"the checkpoint's run, {st.sig[6]} now): {where} {what}; the resume is not exact where the "
                      "dataset draws random numbers (the workers' streams start anew) or is split among the workers",
                      "warning")
            return True
        _say_once(f"warning: the training data changed since the checkpoint: loader {plan.sig} is now {st.sig}; "
                  f"{where} over the new data (the samples of that epoch are drawn anew over it): the resume is "
                  "not exact", "warning")
        return True

    def _fed_before(self, st: Stream) -> bool:
        """Whether this iter() of ``st`` (another signature than the training loader's) was one of those that
        fed the optimizer before the checkpoint: the relaunch passes it without data, as an earlier epoch."""
        plan = self.plan
        return (plan is not None and self.plan_stream is None and st.main is None and st.sig != plan.sig
                and 0 < st.epochs <= plan.fed_before.get(tuple(st.sig), 0))

    def _target(self, st: Stream) -> FastForward | None:
        """The position a resume fast-forwards ``st`` to, while not reached yet."""
        plan = self.plan if st.main is None else None
        if plan is not None and self.plan_stream is None and (plan.sig == st.sig or self._adopts(plan, st)):
            return plan
        if plan is not None:  # a loader zipped with the training loader, not reached yet
            return next((p for p in plan.others if p.sig == st.sig and st.epochs <= p.epoch), None)
        return None

    def _collapse(self, it: "_FinishedEpoch", st: Stream, orig_iter: Callable, orig_next: Callable) -> Any:
        """The script calls ``next()`` itself on the iterator of an epoch skipped on resume (a loop counted
        in steps: ``try: next(it) except StopIteration: it = iter(loader)``, or a fixed number of
        ``next(it)`` per epoch). Raising StopIteration there ends such a loop (or the script) in an epoch
        the relaunch must pass without data, so it could never reach the restore point. Instead this
        iterator goes on as the resumed epoch itself: the epochs in between count as started, the real
        iterator is fast-forwarded to the checkpoint's position, and the loop state restored at its first
        fetch (the restore point) puts the script's own counters and loops where they were. A ``for``
        loop, or a library's call, ends the skipped epoch as before (its per-epoch code runs again), and so
        does a call the checkpoint's loop state cannot be restored at (the first ``next()`` of a script's
        prefetcher or look-ahead wrapper, which handles the end of the epoch itself): the script's stack
        must be the one the snapshot was taken with."""
        target = self.plan  # the training loader's; a zipped loader's skipped epoch ends as before
        caller = sys._getframe(2)  # _collapse <- the patched __next__ <- whoever asked for the item
        session = getattr(self, "session", None)
        if (target is None or self._target(st) is not target or not st.skipping or st.epochs >= target.epoch
                # the restore is not at this fetch: a wrapper's look-ahead or end, redone only from the epoch's start
                or target.fetched > target.batch or target.ended
                or st.iterator is None or st.iterator() is not it or session is None
                or not frames.is_user_file(caller.f_code.co_filename) or not frames.calls_explicitly(caller)
                or not session.can_restore_at(caller)):
            return None
        loader = st.loader() if st.loader is not None else None
        if loader is None:
            return None
        self.skip_note = self.skip_span = None  # no epoch is run again from here: the script's loop goes on in this one
        step = self._step()
        while st.epochs < target.epoch:
            st.epochs += 1
            st.note_epoch_start(step)  # restored from the checkpoint's position at the restore point
        self._begin_epoch(st, loader)
        real = self._fast_forward(loader, st, target, orig_iter, orig_next)
        it.__dict__["_pyckpt_real"] = real
        return real

    def _prime(self, skipping: "_Skipping", st: Stream) -> None:
        """A resumed epoch's first fetch (before the restore point there, for the training loader): its
        sampler skips its batches now, drawing its permutation from the random state the original epoch's
        first fetch had (``first_rng``); the state is then put back as it was, for what runs next."""
        saved = st.first_rng
        now = rng.cpu_raw() if saved is not None else None
        try:
            if saved is not None:
                rng.restore(saved)
            skipping.prime()
        except StopIteration:
            pass  # fewer batches than the skip: the epoch is over
        except Exception as e:  # a malformed state: nothing read from a checkpoint is trusted unchecked
            _say_once(f"warning: loader {st.sig}: the random state saved at its epoch's first fetch is not usable "
                      f"({type(e).__name__}: {e}); its order of batches may differ after this resume", "warning")
        finally:
            if now is not None:
                rng.put_cpu_raw(now)

    @staticmethod
    def _nested(st: Stream, loader: DataLoader) -> bool:
        """Whether an ``iter()`` of ``st``'s signature starts inside its current epoch: that epoch's
        iterator is still referenced (a loop is on it) and has not ended. A loop that left its epoch
        early dropped its iterator, or drops it right after (the side is promoted at its first fetch, or
        at a step that fetched from it alone: ``_promote``)."""
        cur = st.iterator() if st.iterator is not None else None
        if cur is None or st.ended or st.main is not None:
            return False
        # Persistent workers: iter() resets and returns the loader's one iterator, the next epoch.
        return not (loader.persistent_workers and cur is loader.__dict__.get("_iterator"))

    def _replayed_to_its_end(self, st: Stream) -> bool:
        """Whether ``st``'s current epoch is one the run left early, replayed (``_replay``, or run with its data
        as one that fed no step) up to the batches the run took from it: an ``iter()`` now starts the next epoch,
        as it did in the run, though the script still holds that epoch's iterator (a sample batch drawn with
        ``next(dataiter)``)."""
        plan = self.plan
        if plan is None or st.main is not None:
            return False
        took = plan.replay.get(st.epochs) or plan.unfed.get(st.epochs, (None,))[0]
        return took is not None and st.batches >= took

    @staticmethod
    def _main_gone(side: Stream) -> bool:
        main = side.main
        assert main is not None
        return main.ended or main.iterator is None or main.iterator() is None

    def _promote(self, side: Stream) -> Stream:
        """``side`` turned out to be the stream's next epoch (its first iterator is gone, or no longer
        fetched while steps run): move its state into the main stream, counted as that epoch."""
        main, side.main = side.main, None
        assert main is not None
        # Its epoch may have been left early with its iterator still referenced (``dataiter = iter(loader)`` and
        # one ``next(dataiter)`` before training, as PyTorch's tutorial does): recorded as ``_on_iter`` records one
        # whose iterator was dropped, so a relaunch replays it (``_replay``) instead of stopping there.
        # A step both fed (the first, after a sample batch drawn from the held iterator) was credited to it: the
        # side's, the epoch the loop moved to (else that sample's epoch would not count as feeding no step).
        credited = min(side.side_steps, main.fed_in_epoch)
        main.fed_in_epoch -= credited
        main.note_epoch_over()
        main.fed_in_epoch = credited
        step = side.epoch_steps[-1] if side.epoch_steps else -1
        main.epochs += 1
        main.note_epoch_start(step)
        _close_gap(main)
        for name in ("batches", "epoch_rng", "reused", "loader", "handed", "skipping", "iterator", "mark",
                     "streak", "ended", "probe", "wrapper_cls", "pre_fetch", "first_rng", "draws", "var_marks"):
            setattr(main, name, getattr(side, name))
        it = main.iterator() if main.iterator is not None else None
        if it is not None:
            it._pyckpt_stream = main
        if self.last is side:
            self.last = main
        return main

    def _start(self, loader: DataLoader, orig_iter: Callable, workers: tuple | None = None) -> Any:
        """``iter(loader)``; new worker processes of a map-style dataset, or of an iterable one that they outlive
        the epoch of (persistent) or that resumes from their states, are started with a
        ``loader_workers.WorkerHook`` (they report their generator states with every batch).
        ``workers``: (states, base seed, first worker[, the generator to put back after the seed is drawn]) of a
        resumed epoch or of a persistent iterator the checkpoint kept (loader_kept.py)."""
        if not self._fresh(loader, workers):
            return orig_iter(loader)
        user_fn = loader.worker_init_fn
        states = workers[0] if workers is not None else None
        loader.worker_init_fn = loader_workers.WorkerHook(user_fn, states)
        if workers is not None:
            self._pending_workers = tuple(workers[1:])
        try:
            it = orig_iter(loader)
        finally:
            loader.worker_init_fn = user_fn
            self._pending_workers = None
        if getattr(it, "_num_workers", 0) > 0 and hasattr(it, "_process_data") and "_pyckpt_workers" not in it.__dict__:
            loader_workers.attach(it, loader.num_workers, states)
        return it

    @staticmethod
    def _fresh(loader: DataLoader, workers: tuple | None) -> bool:
        """Whether ``iter(loader)`` starts new worker processes that ``_start`` can give a ``WorkerHook``."""
        # (An iterable dataset's new workers each epoch are seeded from this process's generator: replayed.)
        kind_ok = loader._dataset_kind == _DatasetKind.Map or loader.persistent_workers or workers is not None
        return (loader.num_workers > 0 and kind_ok
                and (type(loader)._get_iterator is DataLoader._get_iterator or _is_routed(type(loader)))
                and not (loader.persistent_workers and loader._iterator is not None))

    def _fast_forward(self, loader: DataLoader, st: Stream, plan: FastForward, orig_iter: Callable,
                      orig_next: Callable, primary: bool = True) -> Any:
        st.reused, st.epoch_rng = plan.reused, plan.epoch_rng
        if not primary:  # reached now: never again
            self.plan.others = [p for p in self.plan.others if p is not plan]
        before = None
        if plan.epoch_rng is not None:
            _set_epoch_rng(loader, plan.epoch_rng)
            if plan.reused:
                # The original epoch reused a persistent iterator, which draws no new worker
                # seed; ours is new and does. Put the state back before the sampler draws.
                before = lambda: _set_epoch_rng(loader, plan.epoch_rng)  # noqa: E731
        iterable = loader._dataset_kind == _DatasetKind.Iterable
        # A loader or iterable dataset with its own state_dict() is positioned through it.
        owner, key = _stateful_owner(loader)
        own = plan.position.get(key) if owner is not None else None
        if own is not None:
            owner.load_state_dict(own)
        remap = None
        if not iterable and own is None:
            remap = reshard_data.index_sampler(loader, plan.position, st)  # another world size: reshard_data.py
            watched = remap is None and _watched(loader)  # (a remapped epoch pulls other index batches)
            st.draws = plan.draws if watched else sampler_draws.Draws()  # the original's, for this epoch's snapshots
            if watched and plan.draws.lost:
                _say_once(f"warning: loader {plan.sig}: its sampler drew from the global random generators at more "
                          f"places in its epoch than pyckpt kept ({sampler_draws.KEPT}, or a NumPy draw seen after "
                          "the fact); the order of the batches after this resume may differ", "warning")
            loader.__dict__["_pyckpt_skip"] = (
                remap if remap is not None
                else _SkipFirst(loader._index_sampler, plan.batch, before, st if watched else None,
                                plan.draws.replay() if watched else None))
        if remap is not None:
            plan.ahead_rng = []  # other batches than the ones fetched ahead originally
        elif (primary and plan.position and plan.fetched > plan.batch and not plan.ahead_rng
              and loader.num_workers == 0 and not plan.position.get("follower")):
            _say_once(f"warning: the checkpoint holds no random state for the {plan.fetched - plan.batch} batch(es) "
                      f"of loader {plan.sig} fetched ahead of the loop; random draws of the dataset or collate_fn "
                      "for them may differ after this resume", "warning")
        # StatefulDataLoader ("loader_state") keeps its positions but not its workers' generators.
        own_workers = own is not None and key != "loader_state"
        workers = None if remap is not None or own_workers else _saved_workers(loader, plan)
        try:
            it = self._start(loader, orig_iter, workers)
        finally:
            loader.__dict__.pop("_pyckpt_skip", None)
        st.iterator = weakref.ref(it)
        if iterable and own is None:
            _consume(it, plan.batch, orig_next)
        # Otherwise a sampler loaded in this process skips at the iterator's first fetch (``_prime``), where
        # the original drew its permutation: after the iter() of every loader zipped with it, say.
        st.first_rng = plan.position.get("first_rng")
        st.prev_end_rng = plan.position.get("prev_end_rng")  # for the snapshots of this epoch, as originally
        st.gaps = plan.gaps  # the original's, for the snapshots after the resume (the skipped ones were none)
        it._pyckpt_stream = st
        st.batches = plan.batch
        if st.handed is not None:
            st.handed = plan.batch
        if primary:
            self.say_skip_note()  # epochs were passed without a fetch from them (a wrapper's own skip)
            self.plan_stream = st
            self.armed = True  # the restore happens at this iterator's next fetch
        return it


def _same_line(stack: Any, user: list) -> bool:
    """Whether the innermost of ``user`` (the script's frames now) runs the same code as the innermost frame
    of a checkpoint's loop-state ``stack`` (``loopstate.stack_signature``), at the same line."""
    if not user or not isinstance(stack, list) or len(stack) < 2:
        return False
    saved, live = stack[-1], user[-1]
    if not isinstance(saved, list) or len(saved) != 5 or list(frames.code_key(live.f_code)) != saved[:4]:
        return False
    try:
        lasti = int(saved[4])
        line = next((ln for start, end, ln in live.f_code.co_lines() if start <= lasti < end), None)
    except (TypeError, ValueError):
        return False
    return line is not None and line == live.f_lineno


def _watched(loader: DataLoader) -> bool:
    """Whether ``loader``'s sampler pulls are watched (``sampler_draws``): a map-style dataset read by torch's
    own iterators (a loader class with iterators of its own may keep its sampler's iterator's state)."""
    return loader._dataset_kind == _DatasetKind.Map and type(loader)._get_iterator is DataLoader._get_iterator


def _handing_method(cls: type) -> str | None:
    """The method by which objects of ``cls`` hand the loop its items: ``__next__`` (a class outside
    torch), or a ``next`` method of the script's own code callable with no argument (apex's
    ``data_prefetcher``, YOLOX's ``DataPrefetcher``); None for any other class."""
    if cls.__module__.startswith("torch"):
        return None
    if callable(getattr(cls, "__next__", None)):
        return "__next__"
    fn = getattr(cls, "next", None)
    if not isinstance(fn, types.FunctionType) or not frames.is_user_file(fn.__code__.co_filename):
        return None
    try:
        inspect.signature(fn).bind(None)  # self only: what ``prefetcher.next()`` passes
    except (TypeError, ValueError):
        return None
    return "next"


def _saved_workers(loader: DataLoader, plan: FastForward) -> tuple | None:
    """(worker states, base seed, worker of the first remaining batch) saved for this epoch, or
    None (the checkpoint predates worker capture, or the worker count changed: said once). An iterable
    dataset's: the states at the epoch's start (persistent workers), its batches replayed from worker 0."""
    saved = plan.position.get("workers")
    if loader.num_workers <= 0 or plan.position.get("follower"):
        return None
    iterable = loader._dataset_kind == _DatasetKind.Iterable
    if iterable and not (isinstance(saved, dict) and saved.get("at") == "epoch_start"):
        return None  # workers started anew for the epoch: seeded from this process's generator, replayed
    if not isinstance(saved, dict) or len(saved.get("rng") or []) != loader.num_workers:
        if not plan.position or (len(plan.sig) > 6 and plan.sig[6] != loader.num_workers):
            # nothing was saved (the script's framework's own resume won), or the worker count changed: the
            # loader was taken for the training loader with one line saying so (LoaderTracker._adopts)
            return None
        _say_once(f"warning: the checkpoint holds no worker random state for loader {plan.sig} with "
                  f"{loader.num_workers} workers; random augmentation in workers may differ after this resume",
                  "warning")
        return None
    try:
        states = [loader_workers.from_saved(s) for s in saved["rng"]]
        seed = int(saved["base_seed"])
    except (ValueError, TypeError, KeyError) as e:
        _say_once(f"warning: worker random state of loader {plan.sig} not restored: {e}", "warning")
        return None
    return states, seed, 0 if iterable else plan.batch % loader.num_workers


def _stateful_owner(loader: DataLoader) -> tuple[Any, str]:
    """What positions this loader by its own ``state_dict()``/``load_state_dict()``: a DataLoader
    subclass routed by ``LoaderTracker._route`` (torchdata's ``StatefulDataLoader``), or an
    IterableDataset that has them, loaded in the main process (the protocol of Hugging Face
    ``datasets`` iterable datasets). With workers each has its own replica; those are positioned
    by loading and dropping batches (the replay draws what the original drew)."""
    if _is_routed(type(loader)):
        return loader, "loader_state"
    ds = loader.dataset
    if (loader._dataset_kind == _DatasetKind.Iterable and loader.num_workers == 0
            and all(callable(getattr(ds, m, None)) for m in ("state_dict", "load_state_dict"))):
        return ds, "dataset_state"
    return None, ""


def _is_routed(cls: type) -> bool:
    """Whether ``cls.__iter__`` is the one ``LoaderTracker._route`` installed (on it or a base)."""
    return getattr(getattr(cls, "__iter__", None), "__qualname__", "").startswith("LoaderTracker._route.")


def _subclasses(cls: type) -> list[type]:
    out, todo = [], list(cls.__subclasses__())
    while todo:
        c = todo.pop()
        if c not in out:
            out.append(c)
            todo.extend(c.__subclasses__())
    return out


def _plain(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is made of what a checkpoint stores without pickle."""
    if depth > 32:
        return False
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v, depth + 1) for k, v in value.items())
    return False


# Code of these is never a loop's or a wrapper's frame (torch's iterators, pyckpt's hooks).
_LIBRARY_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.abspath(__file__)) + os.sep)

_SAID: set[str] = set()


def _say_once(message: str, level: str, key: str | None = None) -> None:
    """Say ``message`` once per process (once per ``key`` when given: messages that differ in a number)."""
    if (key or message) not in _SAID:
        _SAID.add(key or message)
        from .activation import _say

        _say(message, level)


def _consume(it: Any, n: int, orig_next: Callable) -> None:
    for _ in range(n):
        try:
            orig_next(it)
        except StopIteration:
            return
