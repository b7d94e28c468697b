"""``Checkpointer``: asynchronous, atomic, retained checkpoints under one root.

``save()`` validates and plans on the caller's thread, hands the bytes to the
engine and returns a ``SaveFuture`` at once; a background thread waits for
the engine, writes this rank's part and runs the commit protocol. Only one
save is in flight per Checkpointer. A failure (disk full, staging timeout,
another rank failing) never raises into training: it is logged on the
"pyckpt" logger and reported by the future, and the previous good checkpoint
stays in place.

Rank 0 holds the directory lock (``pyckpt/lock.py``) from construction to
``close()``: a second Checkpointer or job on the same directory gets a clear
error instead of deleting or taking over this one's checkpoints.
"""
from __future__ import annotations

import errno
import logging
import operator
import os
import stat
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

from . import incremental as incremental_mod
from . import activation, catalog, commit, gcpause, knobs, layout, lock, metrics, reader, remote, sharded, threads, tree
from . import writer
from ._native import CODEC_IDS, name_os_thread, require_codec
from .coord import Coordinator, LocalCoordinator
from .errors import (CheckpointNotFoundError, CorruptCheckpointError, PyckptError, StagingTimeoutError, TornSaveError,
                     UnsupportedStateError)

log = logging.getLogger("pyckpt")


_UNREAD: Any = object()  # _restore_path: the rank section is still to be read


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    step: int
    time: float  # mtime of MANIFEST.json (commit time), seconds since the epoch


@dataclass
class Restored:
    state: Any
    rank_state: Any
    step: int
    path: str


class SaveFuture:
    """Progress of one ``Checkpointer.save``.

    ``captured()`` says when the caller may modify its tensors again;
    ``result()`` gives the committed checkpoint's path or raises its error."""

    def __init__(self, step: int, job: Any = None, keep: list | None = None) -> None:
        self.step = step
        self._job = job
        self._keep = keep  # source tensors, dropped once the engine has copied them
        self._done = threading.Event()
        self._path: str | None = None
        self._exc: BaseException | None = None
        self._timer: metrics.SaveTimer | None = None
        self._gate: Callable[[], BaseException | None] | None = None
        # (part, plan) of this rank once committed, for a memory-tier Checkpointer only (``hand_over_parts``):
        # storage's copy of it (tier_publish.py) then neither parses the part back nor encodes it anew.
        self._committed: tuple[dict, Any] | None = None
        self._baseline: Any = None  # the Checkpointer's incremental Baseline this save was planned with
        # Explicit saves: (section, its keeps, their versions at save()) to compare once captured, and
        # whether captured() has returned True to the caller (who may write the tensors from then on).
        self._watch: list[tuple[Any, list, list]] | None = None
        self._waited = False

    def captured(self, timeout: float | None = None) -> bool:
        """Block until every tensor is copied to staging (or the save failed); False on timeout."""
        if self._job is None:
            return True
        t = time.monotonic()
        ok = self._job.wait_captured(timeout)
        if self._timer is not None:
            self._timer.add_blocked(time.monotonic() - t)
        if ok:
            self._keep = None  # the engine reads no source memory once this is true, even after a failure
            self._waited = True  # before returning: any write the caller makes now comes after it
        return ok

    def done(self) -> bool:
        """True once the checkpoint is committed or the save failed."""
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> str:
        """The committed checkpoint's path; raises the save's error, or TimeoutError."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"checkpoint of step {self.step} still in progress after {timeout} s")
        if self._exc is not None:
            raise self._exc
        assert self._path is not None
        return self._path

    def wait(self, timeout: float | None = None) -> bool:
        """Block until done; True when it committed (never raises the save's error)."""
        return self._done.wait(timeout) and self._exc is None

    def exception(self) -> BaseException | None:
        return self._exc if self._done.is_set() else None

    def _finish(self, path: str | None, exc: BaseException | None) -> None:
        self._path, self._exc, self._keep = path, exc, None
        self._done.set()


def check_step(step: Any) -> int:
    """``step`` as a non-negative int; TypeError / ValueError naming it otherwise."""
    if isinstance(step, bool):
        raise TypeError(f"step must be an integer, got the bool {step!r}")
    try:
        value = operator.index(step)
    except TypeError:
        raise TypeError(f"step must be an integer, got {type(step).__name__} {step!r}") from None
    if value < 0:
        raise ValueError(f"step must be >= 0, got {value}")
    if value > layout.MAX_STEP:  # the manifest's range (a reader refuses a larger one as corrupt)
        raise ValueError(f"step must be <= {layout.MAX_STEP} (a signed 64-bit integer, docs/FORMAT.md), got {value}")
    return value


class _StorageLayout(NamedTuple):
    """The storages of one plan section and what ``_moved_chunks`` reads of them at every save."""

    storages: list  # the section's ``mine`` (the same list while a plan is reused)
    ids: list[int]
    starts: list[int]
    chunks: list[list[int]]  # the chunks each storage is cut into
    every: frozenset[int]  # the union of ``chunks``

    @classmethod
    def of(cls, mine: list) -> "_StorageLayout":
        chunks = [[p.chunk for p in s.pieces] for s in mine]
        return cls(mine, [s.id for s in mine], [s.start for s in mine], chunks, frozenset().union(*chunks))


def _versions_of(tensors: list[Any]) -> list[int | None]:
    """Each tensor's version counter; None for an inference-mode tensor (it has none)."""
    try:
        return [t._version for t in tensors]
    except RuntimeError:
        out: list[int | None] = []
        for t in tensors:
            try:
                out.append(t._version)
            except RuntimeError:
                out.append(None)
        return out


def _written_before_captured(fut: SaveFuture, step: int) -> BaseException | None:
    """A TornSaveError when a tensor's version counter moved after save() while the caller had not had
    ``captured()`` return True: the copy may hold part of it from before the write and part from after.

    Versions are read before the flag: a write the caller makes after captured() returned then finds
    the flag set (no error), one made without waiting does not. A write through ``.data`` moves no
    counter and is not seen."""
    watch, fut._watch = fut._watch, None
    changed = []
    for sec, keeps, versions in watch:
        for i, (t, v) in enumerate(zip(keeps, versions)):
            if v is not None and t._version != v:
                changed.append((sec, sec.mine[i].id))
    if not changed or fut._waited:
        return None
    names = []
    for sec, sid in changed[:3]:
        at = next((k for k, e in enumerate(sec.entries) if e["storage"] == sid), None)
        names.append(repr(sec.paths[at]) if at is not None and at < len(sec.paths) else f"storage {sid}")
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    return TornSaveError(
        f"checkpoint of step {step} not written: {', '.join(names)}{more} changed after save() and before the "
        "save had copied it, so it would hold parts of two steps; call future.captured() before the next "
        "optimizer step (or any in-place write) when saving with Checkpointer.save")


def _every_rank_hint() -> str:
    """For a directory already in use: the likely cause when this process is one rank of several and its
    Checkpointer was made without a coordinator (each rank then made its own), and what to do."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return ""
    return (f" (this is rank {dist.get_rank()} of {dist.get_world_size()} and its Checkpointer has no coordinator: "
            "create it on rank 0 only, or on every rank with coordinator=pyckpt.StoreCoordinator())")


def _failed(step: int, exc: BaseException) -> SaveFuture:
    f = SaveFuture(step)
    f._finish(None, exc)
    return f


class Checkpointer:
    """Periodic checkpoints of ``state`` (replicated) and ``rank_state`` (per rank) under ``directory``.

    Holds the directory's lock until ``close()`` (also a context manager);
    raises ``PyckptError`` naming the holder when another Checkpointer or job
    already uses ``directory``. ``coordinator``: None (default) saves what this
    process holds, as one rank (in DDP, make it on rank 0 only);
    ``pyckpt.StoreCoordinator()`` on every rank of a job writes one checkpoint
    together, each rank its share (sharded state: its shards).
    ``keep_best=K, monitor=fn, mode="min"``: besides
    the newest ``keep``, keep the K checkpoints with the best ``fn()`` (called
    at each ``save()``; docs/OPERATIONS.md). ``directory`` may be an object-storage
    URL such as ``s3://bucket/run`` (``storage_options`` go to fsspec; local
    staging under ``cache_dir``, default PYCKPT_CACHE_DIR; docs/OPERATIONS.md).
    ``incremental`` (default: PYCKPT_INCREMENTAL, on): chunks whose fingerprint did
    not change since the previous save are neither copied nor written but
    referenced in the earlier checkpoint, which retention then keeps as long as
    it is referenced (docs/FORMAT.md §14)."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3, compress: str = "none",
                 coordinator: Coordinator | None = None, keep_best: int = 0, monitor: Any = None,
                 mode: str = "min", storage_options: dict | None = None,
                 cache_dir: str | os.PathLike | None = None, incremental: bool | None = None) -> None:
        activation.explicit_api_used("Checkpointer")  # a bare `import pyckpt` must not resume behind it
        directory = knobs.check_local_path(directory, allow_url=True)  # "s3://b/x" is no local folder "s3:"
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:  # (1.5 would fail every retention)
            raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
        if compress not in CODEC_IDS:
            raise ValueError(f"compress must be one of {sorted(CODEC_IDS)}, got {compress!r}")
        require_codec(compress)  # fail now, not in the first save, when zstd is unavailable
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep, self.compress = keep, compress
        # Unchanged chunks reference the earlier checkpoint (pyckpt/incremental.py); default PYCKPT_INCREMENTAL.
        self.incremental = knobs.get("PYCKPT_INCREMENTAL") if incremental is None else bool(incremental)
        self._baseline = incremental_mod.Baseline()
        self._versions: list[tuple] = []  # per plan section at the last save: (layout, addresses, versions)
        self.hand_over_parts = False  # set by the memory tier: futures keep their committed part (SaveFuture)
        self._last_plan: dict = {}  # the previous plan (writer.prepare), reused while the layout stays the same
        catalog.check_best(keep_best, monitor, mode)  # best K by monitor() are kept besides the newest `keep`
        self.keep_best, self.monitor, self.mode = keep_best, monitor, mode
        self.coord = coordinator if coordinator is not None else LocalCoordinator()
        # An object-storage root: saves go to a local staging root, each commit is uploaded (pyckpt/remote.py).
        self.remote = (remote.RemoteRoot(directory, storage_options, cache_dir, writer=self.coord.rank == 0)
                       if knobs.is_url(directory) else None)
        if self.remote is not None:
            self.directory = self.remote.staging
        self._dirlock: lock.DirLock | None = None
        self._closed = False
        error = None
        if self.coord.rank == 0:
            try:
                os.makedirs(self.directory, exist_ok=True)
                self._dirlock = lock.DirLock(self.directory)
            except (PyckptError, OSError) as e:
                error = str(e) if isinstance(e, PyckptError) else f"cannot create {self.directory}: {e}"
                if coordinator is None and isinstance(e, PyckptError):
                    error += _every_rank_hint()
        # One token per Checkpointer, agreed by all ranks, names its tmp directories; every rank
        # learns whether rank 0 got the directory.
        agreed = self.coord.broadcast_json({"token": commit.new_token(), "error": error}, "session")
        if agreed["error"] is not None:
            self._closed = True
            raise PyckptError(agreed["error"])
        self._session = agreed["token"]
        self._seq = 0
        self._inflight: SaveFuture | None = None
        self._lock = threading.Lock()
        self._saving = threading.RLock()  # held through save(): saves from several threads run one by one
        # The memory tier (shm_tier) sets these: retention (rank 0) parks an evicted checkpoint's data
        # files in ``_spares``, and each rank's next save writes into its own in place, mapped (when
        # ``_may_recycle()``: nothing of this rank may still read it), so a snapshot neither allocates
        # nor frees a snapshot's worth of tmpfs pages.
        self._spares: str | None = None
        self._may_recycle: Callable[[], bool] = lambda: True
        os.makedirs(self.directory, exist_ok=True)

    def close(self) -> None:
        """Wait for the in-flight save, then release the directory (idempotent)."""
        if self._closed:
            return
        with self._saving:  # a save() under way in another thread starts its save first, then is waited for
            if self._closed:
                return
            self.wait()
            self._closed = True
        self._baseline.stop_precheck()
        if self._dirlock is not None:
            self._dirlock.release()
        if self.remote is not None:
            self.remote.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- saving -------------------------------------------------------------
    def save(self, step: int, state: Any, rank_state: Any = None, *,
             _gate: Callable[[], BaseException | None] | None = None, _as_state_dict: bool = False) -> SaveFuture:
        """Start checkpointing ``state`` at ``step``; returns at once.

        Raises ``UnsupportedStateError`` (nothing written) for values that
        cannot be stored, ``TypeError`` for a step that is not an integer;
        with a coordinator of several ranks, on every rank, also when any
        rank's ``state`` cannot be stored or is laid out unlike rank 0's
        (``UnsupportedStateError``) and when the ranks' steps differ
        (``ValueError``); every later failure is reported by the future.

        (``_gate`` and ``_as_state_dict`` are the transparent layer's: lazy.py.)"""
        # One save at a time: saves from several threads (a loop and a callback) each saw none in flight,
        # and one's clean-up removed the other's temporary directory. Re-entrant: a signal handler on the
        # saving thread that saves again must not deadlock.
        with self._saving, gcpause.paused(promote=True):  # planning must not start collector passes (gcpause.py)
            return self._save(step, state, rank_state, _gate, _as_state_dict)

    def _save(self, step: int, state: Any, rank_state: Any, _gate: Callable[[], BaseException | None] | None,
              as_state_dict: bool = False) -> SaveFuture:
        from ._native import get_engine

        step = check_step(step)
        if self._closed:
            raise PyckptError(f"this Checkpointer of {self.directory} is closed")
        timer = metrics.SaveTimer(step)
        timer.monitor = catalog.monitor_value(self.monitor) if self.coord.rank == 0 else None
        engine = get_engine()
        try:
            # Encoded first: the DTensor search then reads the tensor list, not the containers again
            # (a process group is up in every DDP job, and a walk of thousands of tensors cost each save ms).
            flat = state if type(state) is tree.Flat else tree.flatten(state)
            state, found = sharded.split(flat)  # DTensors: each rank writes its own shards (sharded.py)
            shards = sharded.plan(found) if found else None
            if shards is not None and self.coord.world_size == 1:
                sharded.check_alone(shards)  # one rank's shards of a tensor cut over several: refused here
            plan = writer.prepare(state, rank_state, self.coord.rank, self.coord.world_size, engine.chunk_bytes(),
                                  self._last_plan, as_state_dict)
            if shards is not None:
                sharded.add_chunks(shards, plan.chunks, engine.chunk_bytes())
                plan.shards = shards
            bad = None
        except UnsupportedStateError as e:
            plan, bad = None, e
        ready = self._agree(step, bad, plan)  # every rank learns about a bad value on any rank
        if not ready:
            exc = StagingTimeoutError(f"checkpoint of step {step} skipped: the previous checkpoint is still being "
                                      f"written after PYCKPT_STAGING_TIMEOUT_S={knobs.get('PYCKPT_STAGING_TIMEOUT_S')} s")
            log.warning("pyckpt: %s", exc)
            if self.coord.rank == 0:
                metrics.save_done(self.directory, timer, None, exc)
            return _failed(step, exc)
        seq, self._seq = self._seq, self._seq + 1
        token = f"{self._session}-{seq}"
        final = os.path.join(self.directory, layout.step_dir_name(step))
        tmp = os.path.join(self.directory, layout.tmp_dir_name(layout.step_dir_name(step), token))
        self._plan_incremental(plan, final)
        fut = SaveFuture(step)
        if _gate is None:  # the transparent layer guards its own tensors (lazy.py)
            versions = plan.versions or [_versions_of(sec.keeps) for sec in plan.sections()]
            fut._watch = [(sec, sec.keeps, v) for sec, v in zip(plan.sections(), versions)]
        fut._timer = timer
        fut._baseline = self._baseline
        fut._gate = _gate  # transparent lazy capture: None, or why this save must not commit
        with self._lock:
            self._inflight = fut
        # The commit thread starts before the engine does: ``Thread.start`` waits until the new thread
        # runs, and once the engine's threads copy on every core that wait is a scheduling delay of
        # milliseconds on the training thread.
        started: Future = Future()  # (job, error) of _start
        commit_args = (fut, plan, started, tmp, final, step, seq)
        threaded = threads.start(threading.Thread(target=self._finish_when_started, args=commit_args,
                                                  name=f"pyckpt-commit-{step}", daemon=False),
                                 f"the commit thread of step {step}", "it commits on this thread instead")
        try:
            job, err = self._start(engine, plan, tmp)
            if job is not None:
                fut._job, fut._keep = job, plan.keep_alive() + sharded.keep_alive(plan)
            started.set_result((job, err))
        finally:
            if not started.done():  # interrupted: the commit thread ends with this save failed
                started.set_result((None, PyckptError(f"checkpoint of step {step} interrupted before it started")))
        timer.returned()
        if not threaded:  # what the commit thread would have done: the save ends, the next one need not wait
            self._finish_when_started(*commit_args)
        return fut

    def _finish_when_started(self, fut: SaveFuture, plan: writer.RankPlan, started: Future, *rest: Any) -> None:
        name_os_thread()
        job, err = started.result()
        try:
            self._finish(fut, plan, job, err, *rest)
        finally:
            for sec in plan.sections():  # (again, where _finish ended before its own call)
                sec.forget_tree()

    def _agree(self, step: int, bad: UnsupportedStateError | None, plan: writer.RankPlan | None = None) -> bool:
        """Wait (bounded) for the previous save; all ranks agree whether to go ahead.

        Raises ``UnsupportedStateError`` on every rank when any rank's state
        cannot be stored, or when the ranks' replicated states are not laid
        out alike (``writer.Section.layout_key``), and ``ValueError`` when
        their steps differ, so no rank is left waiting for the others and
        nothing is written."""
        prev = self._inflight
        ready = bad is None and (prev is None or prev._done.wait(knobs.get("PYCKPT_STAGING_TIMEOUT_S")))
        if self.coord.world_size > 1:
            mine = {"ready": bool(ready), "bad": None if bad is None else [str(bad), bad.key], "step": step,
                    "layout": None if plan is None else plan.replicated.layout_key()}
            votes = self.coord.all_gather_json(mine, "ready")
            steps = [v.get("step") for v in votes]
            if len(set(steps)) > 1:  # each rank would write into its own step's directory: rank 0's commit lacks parts
                raise ValueError(f"checkpoint not written: the ranks called save() with different steps "
                                 f"({', '.join(f'rank {r}: {s}' for r, s in enumerate(steps))}); every rank must "
                                 "save the same step")
            others = [(r, v["bad"]) for r, v in enumerate(votes) if v["bad"] is not None]
            if bad is None and others:
                r, (msg, key) = others[0]
                raise UnsupportedStateError(f"rank {r} cannot save its state: {msg}", key=key)
            layouts = [v.get("layout") for v in votes]
            if bad is None and len(set(layouts)) > 1:
                r = next(r for r, lay in enumerate(layouts) if lay != layouts[0])
                raise UnsupportedStateError(
                    f"checkpoint of step {step} not written: rank {r}'s state is laid out unlike rank 0's (its tensors' "
                    "keys, their order, dtypes, shapes or strides differ); the state of a save must be alike on "
                    "every rank, and what differs between ranks goes in rank_state", key="")
            ready = all(v["ready"] for v in votes)
        if bad is not None:
            raise bad
        return ready

    def _plan_incremental(self, plan: writer.RankPlan, final: str) -> None:
        """Mark the plan's chunks that may be skipped as unchanged (incremental saves only; never
        for an object-storage root, whose uploads and retention know nothing of references)."""
        plan.deferred = {}  # unmoved chunks' references not checked yet: checked on the commit thread
        if not self.incremental or self.remote is not None or not plan.chunks:
            return
        try:
            if not self._baseline.seeded and not self._baseline:
                self._baseline.seed(self.directory, self.coord.rank)
            moved = plan.moved = self._moved_chunks(plan)
            plan.expect, plan.refs = self._baseline.expectations(
                writer.storages_json(plan) + sharded.storages_json(plan), [c.raw_len for c in plan.chunks],
                list(map(bool, writer.chunk_gpus(plan))), os.path.basename(final),
                self.directory, knobs.get("PYCKPT_INCREMENTAL_VERIFY"), moved, plan.deferred)
            expected = {e[0] for e in plan.expect}
            plan.no_fp = {i for i in moved - expected
                          if (i + self._baseline.saves) % incremental_mod.SAMPLE_EVERY > 1}
        except Exception as e:  # never into training: this save is simply written in full
            log.warning("pyckpt: incremental save not possible, writing every chunk: %s", e)
            damaged = self._baseline.damaged
            self._baseline.stop_precheck()
            self._baseline = incremental_mod.Baseline()
            self._baseline.seeded = True  # start over from this save's chunks
            self._baseline.damaged = damaged
            plan.expect, plan.refs, plan.deferred = None, {}, {}

    def _moved_chunks(self, plan: writer.RankPlan) -> set[int]:
        """Chunks every storage of which moved its version counter since the last save (trained
        weights, optimizer moments). Those with no expectation (no fingerprint to compare with, or
        one that changed at the last save) are written without computing a fingerprint, one pass
        over their bytes less per save, except at two saves in a row of every SAMPLE_EVERY: a tensor
        updated in place without changing (a frozen group with lr=0) gets the same fingerprint at both,
        is then read back by the pre-check and referenced from the next save on; one that changes gets
        two that differ, and is neither read back nor fingerprinted before its copy (Baseline.unproven).
        A version that did not move proves nothing (``.data`` writes bypass it, a new tensor may sit at an
        old address): those chunks keep the fingerprint."""
        moved: set[int] = set()
        still: set[int] = set()
        now: list[tuple] = []  # per section: (its storages' layout, their addresses, their versions)
        for k, sec in enumerate(plan.sections()):
            prev = self._versions[k] if k < len(self._versions) else None
            # A reused plan keeps ``mine``: its layout is read once, not at every save.
            lay = prev[0] if prev is not None and prev[0].storages is sec.mine else _StorageLayout.of(sec.mine)
            addrs = list(map(operator.add, map(sec.described.bases.__getitem__, lay.ids), lay.starts))
            versions = _versions_of(sec.keeps)
            now.append((lay, addrs, versions))
            if prev is not None and prev[0] is lay and prev[1] == addrs:
                olds = prev[2]  # the same storages in the same memory: compared one by one
            else:  # anything else: matched by (device, address, bytes) within the section's scope
                old_keyed = {} if prev is None else {(str(s.device), a, s.nbytes): v
                                                     for s, a, v in zip(prev[0].storages, prev[1], prev[2])
                                                     if v is not None}
                olds = [old_keyed.get((str(s.device), a, s.nbytes)) for s, a in zip(sec.mine, addrs)]
            if None not in versions and None not in olds:  # the common cases first: a union per storage costs
                if all(map(operator.ne, olds, versions)):  # every storage moved (a step of full training)
                    moved.update(lay.every)
                    continue
                if olds == versions:  # none did (a frozen model)
                    still.update(lay.every)
                    continue
            # True: moved; False: did not, or nothing to compare with; None: an inference-mode tensor has no
            # version counter (fingerprinted). Unions of whole lists: thousands of storages at every save.
            flags = [None if v is None else (o is not None and o != v) for o, v in zip(olds, versions)]
            moved.update(*[c for c, f in zip(lay.chunks, flags) if f])
            still.update(*[c for c, f in zip(lay.chunks, flags) if f is False])
        self._versions = now
        plan.versions = [n[2] for n in now]
        return moved - still

    def _start(self, engine: Any, plan: writer.RankPlan, tmp: str) -> tuple[Any, BaseException | None]:
        try:
            commit._crash_point("save.mkdir.before")
            os.makedirs(tmp, exist_ok=True)
            commit._crash_point("save.mkdir.after")
            commit._crash_point("save.data.before")
            in_place = self._spares is not None and self.compress == "none"
            if in_place:
                self._take_spare(tmp)
            return writer.start(engine, plan, tmp, self.compress, map_files=in_place), None
        except Exception as e:  # disk full, permissions: reported by the future
            # Without its traceback: its frames lead back (f_back) to save()'s, whose locals hold the
            # caller's state, which the future would keep alive. The message names the path and errno.
            return None, e.with_traceback(None)

    def _take_spare(self, tmp: str) -> None:
        """Move this rank's parked data file (``_salvage``) to where this save writes it, unless this
        rank may still read it (then it stays parked and this save writes a new file)."""
        if not self._may_recycle():
            return
        dst = os.path.join(tmp, layout.data_file_name(self.coord.rank))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            os.rename(os.path.join(self._spares, f"rank-{self.coord.rank:05d}.bin"), dst)
        except FileNotFoundError:
            pass  # none parked (the first saves, or a victim read by a publication): a new file

    def _salvage(self, victim: str) -> None:
        """Retention's hook for a victim renamed to garbage: park its data files for reuse (every rank's:
        retention runs on rank 0)."""
        if self._spares is None:
            return
        try:
            names = os.listdir(victim)
        except OSError:
            return
        for name in names:
            if not (name.startswith("rank-") and name[5:].isdigit()):
                continue
            if int(name[5:]) >= self.coord.world_size:
                continue  # a rank a resized job no longer has: never written over, its pages would stay held
            src = os.path.join(victim, layout.data_file_name(int(name[5:])))
            try:
                if stat.S_ISREG(os.lstat(src).st_mode):  # never a link planted there
                    os.rename(src, os.path.join(self._spares, f"{name}.bin"))
            except OSError:
                pass  # deleted with the victim instead

    def _finish(self, fut: SaveFuture, plan, job, err, tmp: str, final: str, step: int, seq: int) -> None:
        part = None
        if self.coord.rank == 0:
            # Under the directory lock no other writer exists (the previous save has finished: _agree),
            # so every leftover but ours is garbage. Here, not in save(): it lists and reads the
            # directory's manifests, which the training thread should not wait for.
            commit.gc_tmp(self.directory, {f"{self._session}-{seq}"}, locked=True)
        if err is None:
            captured = job.wait_captured(None)
            fut._timer.captured()
            if captured and fut._watch is not None:
                err = _written_before_captured(fut, step)
            if captured:
                # The engine no longer reads the caller's tensors (captured, or failed and stopped).
                fut._keep = None
                plan.release()
            part, collect_err = writer.collect(job, plan, tmp)
            err = err or collect_err
            if err is None and part is not None and plan.deferred:
                err = self._baseline.check_deferred(self.directory, plan.deferred, part)
            if part is not None and getattr(plan, "shards", None) is not None:
                sharded.add_to_part(part, plan)
            if err is None and fut._gate is not None:
                err = fut._gate()
            if err is None:
                commit._crash_point("save.data.after")
        plan.release()
        fut._watch = None  # (a save that failed before its capture kept the caller's tensors here)
        if err is None and self.coord.rank == 0 and fut._timer.monitor is not None:
            err = _try(lambda: catalog.write_monitor(tmp, fut._timer.monitor), OSError)  # keep_best reads it
        raw = None
        if err is None:
            try:  # a reused layout's records and entries from their cached encoding (writer.encode_part)
                raw = writer.encode_part(plan, part)
            except Exception as e:  # reported by every rank's commit, never raised before it
                err = e
        for sec in plan.sections():  # before the future is done: the caller may free its tensors then
            sec.forget_tree()
        try:
            fut._timer.figures = commit.commit_parts(self.coord, f"save/{seq}", tmp, final, step, part, err,
                                                     self.directory, raw)
        except Exception as e:
            removed, kept = self._make_room(e)
            if removed:
                log.warning("pyckpt: checkpoint of step %d failed: %s; the disk is full: removed %s (older than the "
                            "newest) to make room for the next one, %s kept", step, e,
                            ", ".join(os.path.basename(p) for p in removed), kept)
            elif not getattr(e, "quiet", False):  # a vetoed lazy capture has said so in its own line
                log.warning("pyckpt: checkpoint of step %d failed, previous checkpoints kept: %s", step, e)
            self._record(fut, None, e)
            fut._finish(None, e)
            return
        if part is not None and plan.refs is not None and fut._baseline is self._baseline:
            # The next save references this one; unless damage found meanwhile started the baseline
            # over (_found_damaged): this save's references may point into the damaged data. Its chunks
            # are read back and checked now, in the background, not in the next save call.
            self._baseline.update(part, os.path.basename(final), self.directory, plan.moved)
        if self.hand_over_parts and part is not None:
            fut._committed = (part, plan)
        url = None
        if self.remote is not None:  # upload, then remote retention; staging keeps only its newest
            url, e = remote.publish(self, final, seq)
            fut._timer.url = url  # the metrics line names the uploaded checkpoint too
            if e is not None:
                log.warning("pyckpt: %s", e)
                self._record(fut, None, e)
                fut._finish(None, e)
                return
        if self.coord.rank == 0:
            try:
                keep, best = (1, set()) if self.remote is not None else (self.keep, self._best())
                commit.apply_retention(self.directory, keep, protect={os.path.basename(final)} | best,
                                       salvage=self._salvage if self._spares is not None else None)
            except Exception as e:  # the save committed; retention tries again after the next one
                log.warning("pyckpt: checkpoint of step %d committed, but retention failed: %s", step, e)
        self._record(fut, final, None)
        fut._finish(url or final, None)

    def _make_room(self, e: BaseException) -> tuple[list[str], str]:
        """After a save failed for lack of space (rank 0): the committed checkpoints older than the newest
        are removed, as retention with ``keep=1`` would (keep_best's and referenced data are spared), so
        the next save has their room. Without this, checkpoints stopped advancing for the rest of a run
        whose disk filled up, and a crash lost everything since the last one that fit. The newest commit
        is never removed. Returns the removed paths (none: nothing to free, or not a full disk) and the
        newest commit's name. Never raises: the caller is the save's failure path."""
        if self.coord.rank != 0 or self.remote is not None or not _out_of_space(e):
            return [], ""
        try:
            order = layout.committed(self.directory)
            # No salvage: parked data files would hold the pages this is meant to free.
            removed = commit.apply_retention(self.directory, 1, protect=self._best()) if order else []
            return removed, order[0].name if order else ""
        except Exception as exc:  # the failure is said in its line; retention tries again after the next save
            log.debug("pyckpt: making room after a full disk failed: %s", exc)
            return [], ""

    def _record(self, fut: SaveFuture, path: str | None, exc: BaseException | None) -> None:
        """The save's metrics line and on_checkpoint callbacks (rank 0; never raises)."""
        if self.coord.rank == 0 and fut._timer is not None:
            metrics.save_done(self.directory, fut._timer, path, exc)

    def _best(self) -> set[str]:
        """Names retention must spare for keep_best (the best stored monitor values)."""
        return catalog.best_names(self.directory, self.keep_best, self.mode) if self.keep_best else set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the in-flight save; True when there was none or it committed."""
        fut = self._inflight
        return fut is None or fut.wait(timeout)

    # -- finding and loading -----------------------------------------------
    def latest(self, verify: bool = False, check: Callable[[str], None] | None = None) -> CheckpointInfo | None:
        """The newest commit (commit order, not step number) that validates and every rank sees, or None.

        ``verify=False`` (default, cheap) checks the manifest, every part and
        every data file's size; a damaged chunk is then found while loading,
        and ``load()``/``restore()`` fall back past it. ``verify=True`` also
        reads every chunk and checks its checksums (ranks share the work), so
        what it returns loads, at the cost of reading the checkpoint once.
        ``check(path)`` runs first for each candidate; what it raises propagates.
        None does not mean "nothing saved yet": it is also the answer when
        committed checkpoints exist but none validates (``restore()`` tells the
        two apart: ``CheckpointNotFoundError`` versus ``CorruptCheckpointError``)."""
        with reader.reusing():  # the candidate scan and verify_share open the same checkpoint
            return self._latest(verify, check)

    def _latest(self, verify: bool, check: Callable[[str], None] | None) -> CheckpointInfo | None:
        for path in self._candidates():
            if check is not None:
                check(path)
            if not verify:
                return info_for(path)
            with reader.checked_reads() as checked:
                err = _try(lambda: verify_share(path, self.coord.rank, self.coord.world_size))
            errors = self._gather_errors(err)
            if not errors:
                self._verified(path, checked)
                return info_for(path)
            if err is not None and not isinstance(err, CorruptCheckpointError):
                raise err
            self._found_damaged(path)
            self._skip_line(path, errors)
        return None

    def _candidates(self, on_damaged: Callable[[str, BaseException], None] | None = None):
        """Paths of the commits that validate on every rank, newest first (lazily with one rank).

        ``on_damaged(path, error)`` hears of each commit whose manifest, parts or data file sizes
        do not validate here."""
        if self.remote is not None:
            return remote.candidates(self)  # downloaded and validated one by one, newest first

        def damaged(path: str, exc: BaseException) -> None:
            self._found_damaged(path)
            if on_damaged is not None:
                on_damaged(path, exc)

        if self.coord.world_size == 1:
            return (i.path for i in iter_valid(self.directory, on_damaged=damaged))
        mine = [os.path.basename(i.path)
                for i in iter_valid(self.directory, warn=self.coord.rank == 0, on_damaged=damaged)]
        common = set(mine)
        for names in self.coord.all_gather_json(mine, "latest"):
            common &= set(names)
        for n in mine:
            if n not in common:  # another rank cannot load it: as damaged for this rank's baseline too
                self._found_damaged(os.path.join(self.directory, n))
        return [os.path.join(self.directory, n) for n in mine if n in common]

    def _gather_errors(self, err: BaseException | None) -> list[tuple[int, str, bool]]:
        """(rank, message, is damage) of every rank whose attempt failed (the same list on every rank)."""
        mine = None if err is None else [str(err), isinstance(err, CorruptCheckpointError)]
        if self.coord.world_size == 1:
            return [] if mine is None else [(0, mine[0], mine[1])]
        gathered = self.coord.all_gather_json(mine, "attempt")
        return [(r, g[0], g[1]) for r, g in enumerate(gathered) if g is not None]

    def _skip_line(self, path: str, errors: list[tuple[int, str, bool]]) -> None:
        if self.coord.rank == 0:
            rank, msg, _ = errors[0]
            where = f" (rank {rank})" if self.coord.world_size > 1 else ""
            log.warning("pyckpt: skipping damaged checkpoint %s%s: %s", path, where, msg)

    def _verified(self, path: str, checked: dict | None = None) -> None:
        """Every chunk of checkpoint ``path`` that this rank's part holds or references was read and
        its checksum checked (a restore, ``latest(verify=True)``): a process that has not saved yet
        seeds its first incremental save from it, not from whatever is newest (incremental.Baseline).
        ``checked`` (``reader.checked_reads``): the chunks found sound, which that save need not read again."""
        if not self._baseline.seeded and not self._baseline:
            self._baseline.source = os.path.abspath(path)
            if checked:
                self._baseline.checked_on_disk(self.directory, checked)

    def _start_over(self) -> None:
        """The job trains from scratch next to earlier checkpoints (PYCKPT_RESUME=never, the way out
        when every one is damaged): its first save references none of their data, which nothing here
        verified (written in full; later saves reference this run's own)."""
        if not self._baseline.seeded and not self._baseline:
            self._baseline.seeded = True

    def _found_damaged(self, path: str) -> None:
        """Checkpoint ``path`` does not load. The chunks the next save would reference (this process's
        own last save, or the seed) may be in it or in data it references, and a reference is checked
        against the CRC record, not the bytes: start the baseline over, so the next save references
        only a checkpoint verified from now on (``_verified``), or is written in full."""
        path = os.path.abspath(path)
        if path in self._baseline.damaged:
            return  # known: found again by every later scan, which must not undo incremental saves
        damaged = self._baseline.damaged | {path}
        self._baseline.stop_precheck()
        self._baseline = incremental_mod.Baseline()
        self._baseline.damaged = damaged

    def load(self, step: int | None = None, into: Any = None, map_location: Any = None, *,
             strict: bool | None = None) -> Any:
        """The replicated state of checkpoint ``step`` (default: the newest that loads); ``into`` and
        ``strict`` as for ``restore``."""
        return self.restore(step, into=into, map_location=map_location, strict=strict).state

    def restore(self, step: int | None = None, into: Any = None, rank_into: Any = None,
                map_location: Any = None, *, strict: bool | None = None) -> Restored:
        """Replicated state plus this rank's ``rank_state`` of checkpoint ``step``.

        ``into`` / ``rank_into``: structures parallel to the saved ones whose
        tensors receive the values in place (same shape and dtype, checked
        before anything is written). By default every target needs a saved
        tensor (one without would silently keep its old value), while saved
        tensors without a target come back as new tensors (a fresh optimizer
        has no state tensors yet: pass its ``state_dict()`` and load the
        returned one); either way ``IntoMismatchError`` lists every problem
        and nothing is written. ``strict=True``: saved tensors without a
        target are errors too (as ``pyckpt.load``'s default);
        ``strict=False``: neither is, both are named in one ``pyckpt:`` line.

        Without ``step``: the newest commit; when its data turns out damaged
        while loading (a checksum, a truncated file), one line
        ``pyckpt: skipping damaged checkpoint <path>: <reason>`` is logged and
        the next older one is loaded instead (``into`` targets are then fully
        overwritten by it). Every rank takes the same one.

        Raises ``CheckpointNotFoundError`` only when the directory holds no
        committed checkpoint (or ``step`` names none); when committed ones exist
        but none loads (checksums, missing or truncated files, bad parts),
        ``CorruptCheckpointError`` naming each and what is wrong, so that
        "no checkpoint yet, start fresh" is never mistaken for lost progress.
        The next incremental save references only chunks of the checkpoint
        restored (or of a later save), never of one that failed."""
        with reader.reusing():  # the candidate scan and the load open the same checkpoint
            return self._restore(step, into, rank_into, map_location, reader.TARGETS if strict is None else strict)

    def _restore(self, step: int | None, into: Any, rank_into: Any, map_location: Any,
                 strict: bool | str) -> Restored:
        if step is not None and self.remote is not None:
            return self._restore_path(remote.fetch_step(self, check_step(step)), into, rank_into, map_location,
                                      strict=strict)
        if step is not None:
            path = os.path.join(self.directory, layout.step_dir_name(check_step(step)))
            if not (layout.is_real_dir(path) and layout.is_checkpoint_dir(path)):  # never through a link
                raise CheckpointNotFoundError(f"no complete checkpoint for step {step} in {self.directory}")
            return self._restore_path(path, into, rank_into, map_location, strict=strict)
        why: dict[str, str] = {}  # step directory name -> why it does not load (scan or load)
        for path in self._candidates(lambda p, exc: why.setdefault(os.path.basename(p), str(exc))):
            out: list[Restored] = []
            err = _try(lambda: out.append(self._restore_path(path, into, rank_into, map_location, strict=strict)))
            errors = self._gather_errors(err)  # every rank leaves or goes on together
            if not errors:
                return out[0]
            if err is not None and not isinstance(err, CorruptCheckpointError):
                raise err  # not damage (a wrong ``into``, a device): falling back would hide it
            fatal = [(r, m) for r, m, corrupt in errors if not corrupt]
            if fatal:
                raise PyckptError(f"rank {fatal[0][0]} could not load {path}: {fatal[0][1]}")
            self._found_damaged(path)  # damage another rank found: this rank's load succeeded
            self._skip_line(path, errors)
            why[os.path.basename(path)] = errors[0][1]
        # Nothing loaded. The candidate scan drops a commit whose manifest, parts or data files do
        # not validate (a deleted data file) without trying it: those count as damaged too.
        from .resume import committed_anywhere

        unsound = committed_anywhere(self, self.coord)  # the same list on every rank
        if unsound:
            raise unloadable_error(self.directory, unsound, why)
        raise CheckpointNotFoundError(f"no complete checkpoint in {self.directory}")

    def _restore_path(self, path: str, into: Any, rank_into: Any, map_location: Any,
                      rank_state: Any = _UNREAD, strict: bool | str | None = None) -> Restored:
        """``rank_state``: this rank's section as already read (same ``map_location``, no ``rank_into``).
        ``strict``: reader.load_section's (None: the transparent resume's partial targets, on purpose)."""
        from ._native import get_engine

        t0 = time.monotonic()
        try:
            with reader.checked_reads() as checked:
                op = reader.open_checkpoint(path)
                engine = get_engine()
                state = reader.load_section(engine, op, "replicated", 0, into, map_location, strict)
                rs = rank_state if rank_state is not _UNREAD else reader.load_section(
                    engine, op, "rank", self.coord.rank, rank_into, map_location, strict)
        except CorruptCheckpointError:
            self._found_damaged(path)
            raise
        self._verified(path, checked)  # every chunk it read passed its checksum
        if self.coord.rank == 0:
            metrics.restore_done(self.directory, op.step, path, time.monotonic() - t0)
        return Restored(state, rs, op.step, path)


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _out_of_space(e: BaseException) -> bool:
    """Whether a save failed for lack of space or quota: an ``OSError`` in its chain, or the engine's and
    other ranks' messages, which carry ``(errno N)`` and the system's text for it."""
    seen = 0
    while e is not None and seen < 16:
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return True
        text = str(e)
        if any(f"(errno {n})" in text or os.strerror(n) in text for n in _NO_SPACE):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _try(fn, catch: type[BaseException] | tuple = Exception) -> BaseException | None:
    """Run ``fn``; the exception it raised (of ``catch``), else None."""
    try:
        fn()
    except catch as e:
        return e
    return None


def verify_share(path: str, rank: int, world_size: int) -> None:
    """Check every chunk checksum of the parts ``p`` of checkpoint ``path`` with ``p % world_size == rank``
    (all of them with one rank), in bounded memory; raises ``CorruptCheckpointError``."""
    from ._native import get_engine

    if world_size == 1:
        reader.verify(get_engine(), path)  # also checks the trees, as a single rank must
        return
    op = reader.open_checkpoint(path)
    reader.verify_chunks(get_engine(), op, range(rank, len(op.parts), world_size))


def info_for(path: str) -> CheckpointInfo:
    step = layout.parse_step(os.path.basename(path))
    return CheckpointInfo(path, step if step is not None else -1,
                          os.path.getmtime(os.path.join(path, layout.MANIFEST)))


def unloadable_error(root: str, paths: list[str], why: dict[str, str], shown: int = 4) -> CorruptCheckpointError:
    """The error for a root whose committed checkpoints ``paths`` (newest first) all fail to load;
    ``why`` maps a step directory name to what is wrong with it (one line)."""
    def reason(p: str) -> str:
        r = why.get(os.path.basename(p.rstrip("/")), "does not validate")
        return " ".join(r.split())  # one line, whatever the underlying message holds

    items = [f"{p}: {reason(p)}" for p in paths[:shown]]
    more = f"; and {len(paths) - shown} more" if len(paths) > shown else ""
    return CorruptCheckpointError(f"no checkpoint in {root} loads: every one is damaged ({'; '.join(items)}{more})",
                                  path=paths[0])


def iter_valid(root: str, warn: bool = True, on_damaged: Callable[[str, BaseException], None] | None = None):
    """Committed checkpoints of ``root`` whose manifest and parts validate, newest commit first
    (damaged ones are warned about, and handed to ``on_damaged(path, error)``).

    The ``latest`` pointer is a hint only: the commit order (``layout.committed``)
    decides, so a stale or missing pointer changes nothing."""
    committed = layout.committed(root)
    pointer = commit.read_latest(root)
    if committed and pointer is not None and pointer != committed[0].name:
        log.debug("pyckpt: %s/latest names %s, newest committed is %s", root, pointer, committed[0].name)
    if warn:
        for name in layout.links(root):
            log.warning("pyckpt: ignoring %s: a symbolic link is never a checkpoint", os.path.join(root, name))
    for e in committed:
        try:
            reader.open_checkpoint(e.path)
        except PyckptError as exc:
            if warn:
                log.warning("pyckpt: skipping damaged checkpoint %s: %s", e.path, exc)
            if on_damaged is not None:
                on_damaged(e.path, exc)
            continue
        yield info_for(e.path)
