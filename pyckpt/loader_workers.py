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

An iterable dataset's position is reached by loading and dropping the epoch's batches, so what a resume needs
is each worker's state at the epoch's *start*. Workers started anew each epoch are seeded from the main
process's generator (replayed as it is); persistent workers carry theirs over from the previous epochs, so
each sends its state before the epoch's ``iter()`` with its first batch, and its state at its dataset's end
with torch's end-of-data marker (``_Ended``); a snapshot stores the epoch-start states and the resumed epoch
starts its workers with them.

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
    its copies' generators could not be read, for a warning line. ``start``, with an iterable dataset's first
    batch of an epoch in this worker: ``(state,)``, the state before the epoch's ``iter()``, or ``(None,)``
    when that is the state after the worker's previous batch; None with any other batch."""

    __slots__ = ("data", "rng", "worker", "note", "start")

    def __init__(self, data: Any, rng: Transport | None, worker: int, note: str | None = None,
                 start: tuple | None = None) -> None:
        self.data, self.rng, self.worker, self.note, self.start = data, rng, worker, note, start

    def __reduce__(self) -> tuple:
        return (_Tagged, (self.data, self.rng, self.worker, self.note, self.start))

    def pin_memory(self, *args: Any) -> "_Tagged":
        """torch's pin-memory thread calls this for unknown types: pin the batch, keep the tag."""
        from torch.utils.data._utils.pin_memory import pin_memory

        return _Tagged(pin_memory(self.data), self.rng, self.worker, self.note, self.start)


_PENDING: list = []  # in a resumed worker: its saved state, for the dataset and collate_fn copies (WorkerHook)


_LAST: list = [(None, None)]  # in a worker: its state as last sent (compared, so an unchanged one is not sent)


class _CapturingFetcher:
    """Wraps a worker's fetcher: tags every batch with the generator state after it (the worker's and its
    dataset's and collate_fn's copies'), ``None`` when unchanged since its previous batch. An iterable
    dataset's fetcher (made at each epoch's ``iter()``) also sends ``start`` with its first batch: a resume
    replays that epoch from there. Made, in a resumed worker, right after the copies' generators got their
    saved states back."""

    def __init__(self, inner: Any, worker: int, note: str | None = None, start: tuple | None = None) -> None:
        self.inner, self.worker, self.note, self.unread, self.start = inner, worker, note, False, start

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def state(self, dataset: Any, collate: Any) -> tuple[Transport, bool]:
        """This worker's state now, and whether it changed since the one last sent."""
        try:
            state = current_state(dataset, collate)
        except Exception as e:  # noqa: BLE001 - the copies' generators: never in the way of a batch (said once)
            state = current_state()
            if not self.unread:
                self.unread, self.note = True, (f"the random generators of its copies of the dataset and collate_fn "
                                                f"could not be read ({type(e).__name__}: {e}), so they are not saved")
        # (the copies' states may hold NumPy arrays: compared as pickled bytes)
        now = (state[:3], pickle.dumps(state[3:], protocol=pickle.HIGHEST_PROTOCOL))
        changed = now != _LAST[0]
        _LAST[0] = now
        return state, changed

    def fetch(self, index: Any) -> _Tagged:
        try:
            data = self.inner.fetch(index)
        except StopIteration:  # an iterable dataset's end in this worker: its state goes with torch's marker
            state, changed = self.state(getattr(self.inner, "dataset", None),
                                        getattr(self.inner, "collate_fn", None))
            _ENDED[:] = [(state if changed else None, self.start)]
            self.start = None
            raise
        state, changed = self.state(getattr(self.inner, "dataset", None), getattr(self.inner, "collate_fn", None))
        note, self.note = self.note, None
        start, self.start = self.start, None
        return _Tagged(data, state if changed else None, self.worker, note, start)


_ENDED: list = []  # in a worker: (state, start) at its iterable dataset's end, for the marker torch sends then


def _ended_class() -> type:
    """torch's marker of an iterable dataset's end in a worker, carrying the worker's state then (its
    ``rng``; and ``start`` when the epoch gave it no batch): a persistent worker starts its next epoch
    from there, and a snapshot taken before that epoch's first batch of it came back saves it."""
    from torch.utils.data._utils.worker import _IterableDatasetStopIteration

    class _Ended(_IterableDatasetStopIteration):
        def __init__(self, worker_id: int) -> None:
            super().__init__(worker_id)
            rng, start = _ENDED.pop() if _ENDED else (None, None)
            object.__setattr__(self, "rng", rng)  # (a frozen dataclass)
            object.__setattr__(self, "start", start)

    _Ended.__module__, _Ended.__qualname__ = __name__, "_Ended"
    return _Ended


try:
    _Ended = _ended_class()
except (ImportError, TypeError):  # another torch layout: the marker goes as torch makes it (starts as sent)
    _Ended = None


def _install_in_worker(worker_id: int) -> None:
    """In a worker process: wrap the fetchers it creates from now on."""
    from torch.utils.data import _DatasetKind

    if getattr(_DatasetKind.create_fetcher, "_pyckpt", False):
        return
    original = _DatasetKind.create_fetcher

    def create_fetcher(kind, dataset, auto_collation, collate_fn, *args, **kwargs):
        note = None
        if _PENDING:  # (torch makes the worker's fetcher right after worker_init_fn)
            problems = set_dataset_states(dataset, collate_fn, _PENDING.pop())
            if problems:
                note = ("random generators of its copies of the dataset and collate_fn saved at the checkpoint not "
                        f"restored: {'; '.join(problems)}")
        if kind == _DatasetKind.Map:
            return _CapturingFetcher(original(kind, dataset, auto_collation, collate_fn, *args, **kwargs),
                                     worker_id, note)
        # An iterable dataset's epoch starts here (its iter(), which may draw, is in the fetcher's making).
        tagger = _CapturingFetcher(None, worker_id, note)
        state, changed = tagger.state(dataset, collate_fn)
        tagger.start = (state if changed else None,)
        tagger.inner = original(kind, dataset, auto_collation, collate_fn, *args, **kwargs)
        return tagger

    create_fetcher._pyckpt = True
    _DatasetKind.create_fetcher = staticmethod(create_fetcher)
    if _Ended is not None:
        from torch.utils.data._utils import worker

        worker._IterableDatasetStopIteration = _Ended  # (what the worker loop makes at the dataset's end)


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
    """Main-process side: per worker, the states after its last batches, in return order; for an iterable
    dataset, also its state at the start of the epoch (a resume replays the epoch from there)."""

    def __init__(self, workers: int, base_seed: int, initial: list | None = None) -> None:
        self.base_seed = int(base_seed)
        self.count = 0  # tagged batches returned so far by this iterator (all epochs)
        # Per worker: (index in return order, state) of its recent batches; `settled` is its
        # state before the oldest kept entry (its start state: None = as seeded, or restored).
        self.recent: list[deque] = [deque(maxlen=HISTORY) for _ in range(workers)]
        self.settled: list[Any] = list(initial) if initial is not None else [None] * workers
        self.draining = False  # persistent workers' _reset is dropping an epoch's leftover batches
        # Iterable datasets: per worker, (its state at this epoch's start,) once its first batch came back; the
        # previous epoch's (a look-ahead wrapper's position may be in it); `count` at this epoch's start; the
        # workers whose start a position had to take as their state after their previous batch.
        self.starts: list[tuple | None] = [None] * workers
        self.prev_starts: list[tuple | None] = [None] * workers
        self.reset_at = 0
        self.guessed: set[int] = set()
        self.sent: list[Any] = list(self.settled)  # per worker: the state it sent last (what None stands for)
        # Per worker: its state at its iterable dataset's end in this epoch (torch's marker), else None. The
        # marker is taken when it arrives, which may be before that worker's last batches are handed (they
        # waited for another worker's): those are older, so the marker's state goes into ``sent`` only at
        # the next epoch (``new_epoch``).
        self.ended: list[Any] = [None] * workers

    def take(self, worker: int, tagged: Any) -> None:
        """A tagged batch from ``worker`` in return order, or the marker of its iterable dataset's end."""
        if tagged.start is not None:
            start = tagged.start[0]
            if start is None:  # its state as last sent
                start = self.sent[worker]
            elif worker in self.guessed:
                from .loader_state import _say_once

                _say_once(f"warning: DataLoader worker {worker} drew random numbers between its last batch of an "
                          "epoch and its next epoch's start; a checkpoint taken before that worker's first batch of "
                          "the epoch reached the loop resumes what it draws differently (later ones are exact)",
                          "warning")
            self.starts[worker] = (start,)
        if isinstance(tagged, _Tagged):
            self.add(worker, tagged.rng)
        elif tagged.rng is not None:
            self.ended[worker] = tagged.rng

    def add(self, worker: int, state: Transport | None) -> None:
        recent = self.recent[worker]
        if state is None:  # unchanged since this worker's previous batch
            state = self.sent[worker]
        if len(recent) == recent.maxlen:
            self.settled[worker] = recent[0][1]
        recent.append((self.count, state))
        self.sent[worker] = state
        self.count += 1

    def new_epoch(self) -> None:
        """Persistent workers started the next epoch."""
        self.sent = self.latest()
        self.ended = [None] * len(self.ended)
        self.prev_starts, self.starts = self.starts, [None] * len(self.starts)
        self.reset_at, self.guessed = self.count, set()

    def latest(self) -> list:
        """Each worker's last state in its own order: at its dataset's end, else after its last batch handed."""
        return [e if e is not None else s for e, s in zip(self.ended, self.sent)]

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

    def epoch_starts(self, ahead: int) -> tuple[list, bool]:
        """Each worker's state at the start of the epoch the loop is in ``ahead`` returned batches ago (an
        iterable dataset's); and whether exact. A worker whose first batch of the epoch has not come back yet
        (a snapshot among the epoch's first batches) starts it as it last sent: after its previous epoch's end
        (torch's marker carries it) or its batches dropped when that epoch was left early."""
        before, exact = self.states_before(ahead)
        if ahead > 0 and self.count - ahead <= self.reset_at:  # a look-ahead wrapper started the next epoch
            return [s[0] if s is not None else before[w] for w, s in enumerate(self.prev_starts)], exact
        out = []
        for w, s in enumerate(self.starts):
            if s is None:
                self.guessed.add(w)
                out.append(self.sent[w])
            else:
                out.append(s[0])
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
            self.record.take(worker_idx, data)
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
                self.record.take(tagged.worker, tagged)
        self.record.draining = True
        try:
            type(it)._reset(it, loader, first_iter, *rest)
        finally:
            self.record.draining = False
        self.record.new_epoch()


class _GetData:
    """Instance override of ``_get_data``: while ``_reset`` drains the epoch left early, record the
    batches it drops (still in flight when the epoch was left); and the state an iterable dataset's worker had
    at its end (torch's marker)."""

    __slots__ = ("ref", "record")

    def __init__(self, it: Any, record: Record) -> None:
        self.ref, self.record = weakref.ref(it), record

    def __call__(self) -> Any:
        it = self.ref()
        idx, data = type(it)._get_data(it)
        if _Ended is not None and isinstance(data, _Ended):
            self.record.take(data.worker_id, data)
            return idx, data
        tagged = _tagged(data) if self.record.draining else None
        if tagged is not None:
            self.record.take(tagged.worker, tagged)
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
