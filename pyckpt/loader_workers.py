"""DataLoader worker processes: their random streams, captured per batch and put back on resume.

A map-style dataset that augments at random in ``__getitem__`` draws from the *worker's*
generators (torch, Python ``random``, NumPy's global one), which torch seeds from the
iterator's base seed and the worker id, then advance with every sample that worker loads.
A resume skips batches at the sampler level without loading them, so the workers would
restart from their seeds. Instead:

* every worker sends, with each batch, the state of its three generators right after it
  loaded that batch, and of the generators its copy of the dataset holds (``self.rng``, copied
  at the worker's start or made there at the first ``__getitem__``) (``None`` when nothing was
  drawn since its previous batch; the main process keeps the previous one then), wrapped around
  the batch in ``_Tagged``;
* the main process unwraps it before the batch reaches anyone (an instance override of the
  iterator's ``_process_data``, so an iterator made while pyckpt was on keeps unwrapping
  after it is turned off) and keeps, per worker, the last few states in return order;
* a position records, per worker, the state after its last batch *handed to the loop*, and
  the iterator's base seed (persistent workers were seeded at an earlier epoch);
* a resumed iterator starts its workers with the saved base seed, sends its first remaining
  batch to the worker that loaded it originally (batch b goes to worker b mod W), and each
  worker puts its saved state back after ``worker_init_fn`` and before its first batch (its
  dataset copy's generators by key, made where the copy holds None: it made them at first use).

Everything worker-side travels in a picklable ``worker_init_fn`` wrapper (``WorkerHook``),
so it works with the fork, spawn and forkserver start methods alike.
"""
from __future__ import annotations

import pickle
import random
import sys
import types
from array import array
import weakref
from collections import deque
from typing import Any

import torch

from . import frames, held_rngs, numpy_state, python_state, rng

HISTORY = 16  # states kept per worker: covers a look-ahead wrapper's fetches beyond the loop

# Transport form of a worker's generator state (picklable without shared memory): (torch CPU state
# bytes, (random's version, its 625 words as uint32 bytes, gauss_next), (numpy name, keys bytes, pos,
# has_gauss, gauss) | None, ((key, kind, raw state), ...) of its dataset's and collate_fn's copies' generators:
# ``rng.raw_state``'s, a torch generator's as bytes, (key, ...) of the attributes holding the worker's pid next
# to one (``loader_state.generators``' ``pids``)).
Transport = tuple


def current_state(dataset: Any = None, collate: Any = None) -> Transport:
    """The generator states of this process, and of the generators ``dataset`` and ``collate`` hold, in
    transport form."""
    np = sys.modules.get("numpy")
    npst = None
    if np is not None:
        name, keys, pos, has_gauss, gauss = numpy_state.global_state(np)
        npst = (str(name), keys.tobytes(), int(pos), int(has_gauss), float(gauss))
    version, words, gauss_next = python_state.getstate()
    own, pids = dataset_states(dataset, collate)
    return (torch.get_rng_state().numpy().tobytes(), (version, array("I", words).tobytes(), gauss_next), npst,
            own, pids)


def dataset_states(dataset: Any, collate: Any) -> tuple[tuple, tuple]:
    """((key, kind, raw state), ...) of the generators ``dataset`` and ``collate`` hold
    (``loader_state.generators``'s keys), and the keys of the attributes holding this process's id by them."""
    if dataset is None and collate is None:
        return (), ()
    from .loader_state import generators  # (imported by then: loader_state installs the workers' hooks)

    pids: list[str] = []
    found = generators(None, dataset, collate, pids) + module_generators(dataset, collate)
    return (tuple((key, kind, _bytes_of(rng.raw_state(g, kind)) if kind == "torch" else rng.raw_state(g, kind))
                  for key, kind, g in found), tuple(pids))


_MODULES_MAX = 8  # script modules looked into per worker
_GLOBALS_MAX = 4096  # names looked at per module


_SCRIPT_FILES: dict[str, bool] = {}  # module file -> whether it is the script's (frames.is_user_file: a realpath)


def _script_module(m: Any) -> bool:
    f = getattr(m, "__file__", None)
    if not isinstance(f, str):
        return False
    known = _SCRIPT_FILES.get(f)
    if known is None:
        known = _SCRIPT_FILES[f] = frames.is_user_file(f)
    return known


def module_generators(dataset: Any, collate: Any) -> list[tuple[str, str, Any]]:
    """(key, kind, generator) for the generator objects held by module globals of the script's modules the
    data pipeline's code runs in: ``__main__`` (``__mp_main__`` in a spawned worker) and the modules of the
    classes of the dataset, the datasets it wraps and the collate_fn object (``RNG = np.random.default_rng(5)``
    at a script's top, drawn from in ``__getitem__``). Each worker draws from its own copy; the main process's
    are the script's globals (loop state). Keys ``"module.__main__.RNG"``."""
    from torch.utils.data import Dataset

    from .loader_state import collate_owner

    mods: list = []
    owners = [dataset, collate_owner(collate), collate]  # (a collate function: its module)
    inner = getattr(dataset, "__dict__", None)
    if type(inner) is dict:
        owners += [v for v in list(inner.values())[:64] if isinstance(v, Dataset)]
    for m in [sys.modules.get("__main__"), sys.modules.get("__mp_main__"),
              *(sys.modules.get(getattr(o, "__module__", None) if isinstance(o, types.FunctionType)
                                else type(o).__module__) for o in owners if o is not None)]:
        if m is None or any(m is x for x in mods) or not _script_module(m):
            continue
        mods.append(m)
        if len(mods) >= _MODULES_MAX:
            break
    found, seen, roots = [], set(), []

    def add(key: str, kind: str, v: Any) -> None:
        if id(v) not in seen:
            seen.add(id(v))
            found.append((key, kind, v))
    for m in mods:
        name = "__main__" if m.__name__ in ("__main__", "__mp_main__") else m.__name__
        for attr, v in list(vars(m).items())[:_GLOBALS_MAX]:
            kind = rng.kind_of(v)
            if kind is not None:
                add(f"module.{name}.{attr}", kind, v)
            elif held_rngs.walkable(type(v)) and (frames.is_script_class(type(v)) or callable(v)):
                roots.append((f"module.{name}.{attr}", v))  # ``AUG = Noise(5)``, its ``self.rng`` drawn from
    held_rngs.walk(roots, add)  # then (keys above unchanged) what the script's objects and classes hold
    return found


def _bytes_of(t: torch.Tensor) -> bytes:
    return t.numpy().tobytes()


def _tensor_of(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def set_state(state: Transport) -> None:
    """Put this process's global generators back to ``state`` (transport form; ``set_dataset_states`` does
    its dataset's)."""
    tb, (version, words, gauss_next), npst = state[:3]
    torch.set_rng_state(_tensor_of(tb))
    random.setstate((version, tuple(array("I", words)), gauss_next))
    if npst is not None:
        import numpy as np

        name, keys, pos, has_gauss, gauss = npst
        np.random.set_state((name, np.frombuffer(keys, dtype=np.uint32).copy(), pos, has_gauss, gauss))


def set_dataset_states(dataset: Any, collate: Any, state: Transport) -> list[str]:
    """Put the generators of ``dataset`` and ``collate`` (a worker's copies) back to ``state``'s, matched by key
    and kind; one a copy holds None for (made at its first use) is made there, and the attributes that held
    the worker's id by them get this worker's. Every entry is checked before any generator is written.
    Returns what was not restored, for a warning line (empty: all were)."""
    from .loader_state import generators, lazy_slot, restore_by_key, set_pids

    saved = [(key, kind, _tensor_of(raw) if kind == "torch" else raw) for key, kind, raw in
             (state[3] if len(state) > 3 else ())]
    live = generators(None, dataset, collate) + module_generators(dataset, collate)
    problems = restore_by_key(saved, live, lambda key, kind: lazy_slot(None, key, kind, dataset, collate), True)
    set_pids(None, list(state[4]) if len(state) > 4 else [], dataset, collate)
    return problems


def to_saved(state: Transport | None) -> dict[str, Any] | None:
    """Transport form -> checkpoint form (tensors and JSON values; no pickle)."""
    if state is None:
        return None
    tb, (version, words, gauss_next), npst = state[:3]
    saved: dict[str, Any] = {"torch": _tensor_of(tb).clone(),
                             "python": [int(version), torch.tensor(array("I", words), dtype=torch.int64),
                                        gauss_next]}
    if npst is not None:
        name, keys, pos, has_gauss, gauss = npst
        words32 = torch.frombuffer(bytearray(keys), dtype=torch.int32).to(torch.int64) & 0xFFFFFFFF
        saved["numpy"] = {"name": name, "keys": words32, "pos": pos, "has_gauss": has_gauss, "gauss": gauss}
    if len(state) > 3 and state[3]:
        saved["dataset"] = [[key, kind, rng.saved_state(kind, _tensor_of(raw).clone() if kind == "torch" else raw)]
                            for key, kind, raw in state[3]]
    if len(state) > 4 and state[4]:
        saved["pids"] = list(state[4])
    return saved


def from_saved(saved: Any) -> Transport | None:
    """Checkpoint form -> transport form; raises ValueError on anything malformed."""
    if saved is None:
        return None
    try:
        tb = saved["torch"].to(torch.uint8).contiguous().numpy().tobytes()
        version, words, gauss_next = saved["python"]
        py = (int(version), array("I", [int(w) & 0xFFFFFFFF for w in words.tolist()]).tobytes(),
              None if gauss_next is None else float(gauss_next))
        npst = None
        if saved.get("numpy") is not None:
            s = saved["numpy"]
            import numpy as np

            keys = np.asarray([int(k) & 0xFFFFFFFF for k in s["keys"].tolist()], dtype=np.uint32).tobytes()
            npst = (str(s["name"]), keys, int(s["pos"]), int(s["has_gauss"]), float(s["gauss"]))
        dataset = []
        for entry in saved.get("dataset") or []:  # (absent in a checkpoint of an older pyckpt)
            key, kind, st = entry
            if not isinstance(key, str) or not isinstance(kind, str) or len(key) > 200:
                raise ValueError("a dataset generator's key or kind is not a short string")
            raw = rng.raw_from_saved(kind, st)
            dataset.append((key, kind, _bytes_of(raw.contiguous()) if kind == "torch" else raw))
        pids = saved.get("pids") or []
        if not isinstance(pids, list) or not all(isinstance(k, str) and len(k) <= 200 for k in pids):
            raise ValueError("the keys of the attributes holding a process id are not short strings")
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, ImportError) as e:
        raise ValueError(f"malformed worker RNG state in the checkpoint: {e}") from None
    if len(tb) == 0 or len(py[1]) != 625 * 4:
        raise ValueError("malformed worker RNG state in the checkpoint")
    return (tb, py, npst, tuple(dataset), tuple(pids))


class _Tagged:
    """A batch from worker ``worker`` with the worker's generator state after loading it; with its first
    batch, ``note``: what of its saved state the worker could not put back (``set_dataset_states``), or that
    its copies' generators could not be read, for a warning line."""

    __slots__ = ("data", "rng", "worker", "note")

    def __init__(self, data: Any, rng: Transport | None, worker: int, note: str | None = None) -> None:
        self.data, self.rng, self.worker, self.note = data, rng, worker, note

    def __reduce__(self) -> tuple:
        return (_Tagged, (self.data, self.rng, self.worker, self.note))

    def pin_memory(self, *args: Any) -> "_Tagged":
        """torch's pin-memory thread calls this for unknown types: pin the batch, keep the tag."""
        from torch.utils.data._utils.pin_memory import pin_memory

        return _Tagged(pin_memory(self.data), self.rng, self.worker, self.note)


_PENDING: list = []  # in a resumed worker: its saved state, for the dataset and collate_fn copies (WorkerHook)


class _CapturingFetcher:
    """Wraps a worker's map-style fetcher: tags every batch with the generator state after it (the
    worker's and its dataset's and collate_fn's copies'), ``None`` when unchanged since its previous batch.
    Made, in a resumed worker, right after the copies' generators got their saved states back."""

    def __init__(self, inner: Any, worker: int, note: str | None = None) -> None:
        self.inner, self.last, self.worker, self.note, self.unread = inner, (None, None), worker, note, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def fetch(self, index: Any) -> _Tagged:
        data = self.inner.fetch(index)
        try:
            state = current_state(getattr(self.inner, "dataset", None), getattr(self.inner, "collate_fn", None))
        except Exception as e:  # noqa: BLE001 - the copies' generators: never in the way of a batch (said once)
            state = current_state()
            if not self.unread:
                self.unread, self.note = True, (f"the random generators of its copies of the dataset and collate_fn "
                                                f"could not be read ({type(e).__name__}: {e}), so they are not saved")
        # (the copies' states may hold NumPy arrays: compared as pickled bytes)
        now = (state[:3], pickle.dumps(state[3:], protocol=pickle.HIGHEST_PROTOCOL))
        changed = now != self.last
        self.last = now
        note, self.note = self.note, None
        return _Tagged(data, state if changed else None, self.worker, note)


def _install_in_worker(worker_id: int) -> None:
    """In a worker process: wrap the fetchers it creates from now on (map-style datasets only)."""
    from torch.utils.data import _DatasetKind

    if getattr(_DatasetKind.create_fetcher, "_pyckpt", False):
        return
    original = _DatasetKind.create_fetcher

    def create_fetcher(kind, *args, **kwargs):
        fetcher = original(kind, *args, **kwargs)
        if kind != _DatasetKind.Map:
            return fetcher
        note = None
        if _PENDING:  # (torch makes the worker's fetcher right after worker_init_fn)
            problems = set_dataset_states(fetcher.dataset, getattr(fetcher, "collate_fn", None), _PENDING.pop())
            if problems:
                note = ("random generators of its copies of the dataset and collate_fn saved at the checkpoint not "
                        f"restored: {'; '.join(problems)}")
        return _CapturingFetcher(fetcher, worker_id, note)

    create_fetcher._pyckpt = True
    _DatasetKind.create_fetcher = staticmethod(create_fetcher)


class WorkerHook:
    """Stands in for the loader's ``worker_init_fn`` while an iterator starts its workers: runs the
    user's function, then puts this worker's saved generator state back (on resume; its dataset's and
    collate_fn's copies' when it makes its fetcher), then makes the worker tag its batches. Picklable
    (spawn) when the user's function is."""

    def __init__(self, user_fn: Any, states: list | None) -> None:
        self.user_fn, self.states = user_fn, states

    def __call__(self, worker_id: int) -> None:
        if self.user_fn is not None:
            self.user_fn(worker_id)
        if self.states is not None and worker_id < len(self.states) and self.states[worker_id] is not None:
            set_state(self.states[worker_id])
            _PENDING[:] = [self.states[worker_id]]
        _install_in_worker(worker_id)


class Record:
    """Main-process side: per worker, the states after its last batches, in return order."""

    def __init__(self, workers: int, base_seed: int, initial: list | None = None) -> None:
        self.base_seed = int(base_seed)
        self.count = 0  # tagged batches returned so far by this iterator (all epochs)
        # Per worker: (index in return order, state) of its recent batches; `settled` is its
        # state before the oldest kept entry (its start state: None = as seeded, or restored).
        self.recent: list[deque] = [deque(maxlen=HISTORY) for _ in range(workers)]
        self.settled: list[Any] = list(initial) if initial is not None else [None] * workers
        self.draining = False  # persistent workers' _reset is dropping an epoch's leftover batches

    def add(self, worker: int, state: Transport | None) -> None:
        recent = self.recent[worker]
        if state is None:  # unchanged since this worker's previous batch
            state = recent[-1][1] if recent else self.settled[worker]
        if len(recent) == recent.maxlen:
            self.settled[worker] = recent[0][1]
        recent.append((self.count, state))
        self.count += 1

    def states_before(self, ahead: int) -> tuple[list, bool]:
        """Each worker's state as of ``ahead`` returned batches ago (0: now); and whether exact."""
        cut, exact, out = self.count - ahead, True, []
        for w, recent in enumerate(self.recent):
            older = [s for i, s in recent if i < cut]
            if older:
                out.append(older[-1])
                continue
            if len(recent) == recent.maxlen and recent and recent[0][0] >= cut:
                exact = False
            out.append(self.settled[w])
        return out, exact


class _Untag:
    """Instance override of ``_MultiProcessingDataLoaderIter._process_data``: unwrap and record.
    Holds the iterator weakly (its ``__del__`` shuts the workers down; no reference cycle)."""

    __slots__ = ("ref", "record")

    def __init__(self, it: Any, record: Record) -> None:
        self.ref, self.record = weakref.ref(it), record

    def __call__(self, data: Any, worker_idx: int, *rest: Any) -> Any:
        it = self.ref()
        if isinstance(data, _Tagged):
            self.record.add(worker_idx, data.rng)
            if data.note:
                from .loader_state import _say_once

                _say_once(f"warning: a DataLoader worker: {data.note}; what they draw may differ after a resume",
                          "warning")
            data = data.data
        return type(it)._process_data(it, data, worker_idx, *rest)  # torchdata's: + the worker's own state


class _Reset:
    """Instance override of ``_reset`` (persistent workers, next epoch): batches the workers loaded
    for the epoch left early are dropped there, but advanced their generators; record them."""

    __slots__ = ("ref", "record")

    def __init__(self, it: Any, record: Record) -> None:
        self.ref, self.record = weakref.ref(it), record

    def __call__(self, loader: Any, first_iter: bool = False, *rest: Any) -> None:
        it = self.ref()
        # Received ahead of their turn and never handed out, in the order the workers loaded them.
        for idx in sorted(getattr(it, "_task_info", {}) or {}):
            info = it._task_info[idx]
            tagged = _tagged(info[1]) if len(info) == 2 else None
            if tagged is not None:
                self.record.add(tagged.worker, tagged.rng)
        self.record.draining = True
        try:
            type(it)._reset(it, loader, first_iter, *rest)
        finally:
            self.record.draining = False


class _GetData:
    """Instance override of ``_get_data``: while ``_reset`` drains the epoch left early, record the
    batches it drops (still in flight when the epoch was left)."""

    __slots__ = ("ref", "record")

    def __init__(self, it: Any, record: Record) -> None:
        self.ref, self.record = weakref.ref(it), record

    def __call__(self) -> Any:
        it = self.ref()
        idx, data = type(it)._get_data(it)
        tagged = _tagged(data) if self.record.draining else None
        if tagged is not None:
            self.record.add(tagged.worker, tagged.rng)
        return idx, data


def _tagged(item: Any) -> _Tagged | None:
    """The tagged batch in what a worker sent: the batch itself, or torchdata's (batch, worker, state)."""
    if isinstance(item, tuple) and len(item) == 3:
        item = item[0]
    return item if isinstance(item, _Tagged) else None


def attach(it: Any, workers: int, initial: list | None) -> Record:
    """After a multi-process iterator started its workers with a ``WorkerHook``: unwrap its batches."""
    record = Record(workers, it._base_seed, initial)
    it._process_data = _Untag(it, record)
    if it._persistent_workers:
        it._reset, it._get_data = _Reset(it, record), _GetData(it, record)
    it._pyckpt_workers = record
    return record
