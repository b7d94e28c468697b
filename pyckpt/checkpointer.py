"""``Checkpointer``: asynchronous, atomic, retained checkpoints under one root.

``save()`` validates and plans on the caller's thread, hands the bytes to the
engine and returns a ``SaveFuture`` at once; a background thread waits for
the engine, writes this rank's part and runs the commit protocol. Only one
save is in flight per Checkpointer. A failure (disk full, staging timeout,
another rank failing) never raises into training: it is logged on the
"pyckpt" logger and reported by the future, and the previous good checkpoint
stays in place.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from . import commit, knobs, layout, reader, writer
from ._native import CODEC_IDS, require_codec
from .coord import Coordinator, LocalCoordinator
from .errors import (CheckpointNotFoundError, CorruptCheckpointError, PyckptError, StagingTimeoutError,
                     UnsupportedStateError)

log = logging.getLogger("pyckpt")


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

    def captured(self, timeout: float | None = None) -> bool:
        """Block until every tensor is copied to staging (or the save failed); False on timeout."""
        if self._job is None:
            return True
        ok = self._job.wait_captured(timeout)
        if ok:
            self._keep = None  # the engine reads no source memory once this is true, even after a failure
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


def _failed(step: int, exc: BaseException) -> SaveFuture:
    f = SaveFuture(step)
    f._finish(None, exc)
    return f


class Checkpointer:
    """Periodic checkpoints of ``state`` (replicated) and ``rank_state`` (per rank) under ``directory``."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3, compress: str = "none",
                 coordinator: Coordinator | None = None) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if compress not in CODEC_IDS:
            raise ValueError(f"compress must be one of {sorted(CODEC_IDS)}, got {compress!r}")
        require_codec(compress)  # fail now, not in the first save, when zstd is unavailable
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep, self.compress = keep, compress
        self.coord = coordinator if coordinator is not None else LocalCoordinator()
        # One token per Checkpointer, agreed by all ranks, names its tmp directories.
        self._session = self.coord.broadcast_json(commit.new_token(), "session")
        self._seq = 0
        self._inflight: SaveFuture | None = None
        self._lock = threading.Lock()
        os.makedirs(self.directory, exist_ok=True)

    # -- saving -------------------------------------------------------------
    def save(self, step: int, state: Any, rank_state: Any = None) -> SaveFuture:
        """Start checkpointing ``state`` at ``step``; returns at once.

        Raises ``UnsupportedStateError`` (nothing written) for values that
        cannot be stored; every later failure is reported by the future."""
        from ._native import get_engine

        engine = get_engine()
        try:
            plan = writer.prepare(state, rank_state, self.coord.rank, self.coord.world_size, engine.chunk_bytes())
            bad = None
        except UnsupportedStateError as e:
            plan, bad = None, e
        ready = self._agree(step, bad)  # every rank learns about a bad value on any rank
        if not ready:
            exc = StagingTimeoutError(f"checkpoint of step {step} skipped: the previous checkpoint is still being "
                                      f"written after PYCKPT_STAGING_TIMEOUT_S={knobs.get('PYCKPT_STAGING_TIMEOUT_S')} s")
            log.warning("pyckpt: %s", exc)
            return _failed(step, exc)
        seq, self._seq = self._seq, self._seq + 1
        token = f"{self._session}-{seq}"
        final = os.path.join(self.directory, layout.step_dir_name(step))
        tmp = os.path.join(self.directory, layout.tmp_dir_name(layout.step_dir_name(step), token))
        if self.coord.rank == 0:
            commit.gc_tmp(self.directory, {token})
        job, err = self._start(engine, plan, tmp)
        fut = SaveFuture(step, job, plan.keep_alive() if job is not None else None)
        with self._lock:
            self._inflight = fut
        threading.Thread(target=self._finish, args=(fut, plan, job, err, tmp, final, step, seq),
                         name=f"pyckpt-commit-{step}", daemon=False).start()
        return fut

    def _agree(self, step: int, bad: UnsupportedStateError | None) -> bool:
        """Wait (bounded) for the previous save; all ranks agree whether to go ahead.

        Raises ``UnsupportedStateError`` on every rank when any rank's state
        cannot be stored, so no rank is left waiting for the others."""
        prev = self._inflight
        ready = bad is None and (prev is None or prev._done.wait(knobs.get("PYCKPT_STAGING_TIMEOUT_S")))
        if self.coord.world_size > 1:
            mine = {"ready": bool(ready), "bad": None if bad is None else [str(bad), bad.key]}
            votes = self.coord.all_gather_json(mine, "ready")
            others = [(r, v["bad"]) for r, v in enumerate(votes) if v["bad"] is not None]
            if bad is None and others:
                r, (msg, key) = others[0]
                raise UnsupportedStateError(f"rank {r} cannot save its state: {msg}", key=key)
            ready = all(v["ready"] for v in votes)
        if bad is not None:
            raise bad
        return ready

    def _start(self, engine: Any, plan: writer.RankPlan, tmp: str) -> tuple[Any, BaseException | None]:
        try:
            os.makedirs(tmp, exist_ok=True)
            return writer.start(engine, plan, tmp, self.compress), None
        except Exception as e:  # disk full, permissions: reported by the future
            return None, e

    def _finish(self, fut: SaveFuture, plan, job, err, tmp: str, final: str, step: int, seq: int) -> None:
        part = None
        if err is None:
            if job.wait_captured(None):
                # The engine no longer reads the caller's tensors (captured, or failed and stopped).
                fut._keep = None
                plan.release()
            part, err = writer.collect(job, plan, tmp)
        plan.release()
        try:
            commit.commit_parts(self.coord, f"save/{seq}", tmp, final, step, part, err, self.directory)
            if self.coord.rank == 0:
                commit.apply_retention(self.directory, self.keep)
        except Exception as e:
            log.warning("pyckpt: checkpoint of step %d failed, previous checkpoints kept: %s", step, e)
            fut._finish(None, e)
            return
        fut._finish(final, None)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the in-flight save; True when there was none or it committed."""
        fut = self._inflight
        return fut is None or fut.wait(timeout)

    # -- finding and loading -----------------------------------------------
    def latest(self) -> CheckpointInfo | None:
        """The newest checkpoint that validates and that every rank sees, or None."""
        if self.coord.world_size == 1:
            return next(iter_valid(self.directory), None)
        mine = [i.step for i in iter_valid(self.directory, warn=self.coord.rank == 0)]
        common = set(mine)
        for steps in self.coord.all_gather_json(mine, "latest"):
            common &= set(steps)
        mine = sorted(common, reverse=True)
        if not mine:
            return None
        return info_for(os.path.join(self.directory, layout.step_dir_name(mine[0])))

    def load(self, step: int | None = None, into: Any = None, map_location: Any = None) -> Any:
        """The replicated state of checkpoint ``step`` (default: latest)."""
        return self.restore(step, into=into, map_location=map_location).state

    def restore(self, step: int | None = None, into: Any = None, rank_into: Any = None,
                map_location: Any = None) -> Restored:
        """Replicated state plus this rank's ``rank_state`` of checkpoint ``step`` (default: latest)."""
        from ._native import get_engine

        if step is None:
            info = self.latest()
            if info is None:
                raise CheckpointNotFoundError(f"no complete checkpoint in {self.directory}")
            path = info.path
        else:
            path = os.path.join(self.directory, layout.step_dir_name(step))
            if not layout.is_checkpoint_dir(path):
                raise CheckpointNotFoundError(f"no complete checkpoint for step {step} in {self.directory}")
        op = reader.open_checkpoint(path)
        engine = get_engine()
        state = reader.load_section(engine, op, "replicated", 0, into, map_location)
        rs = reader.load_section(engine, op, "rank", self.coord.rank, rank_into, map_location)
        return Restored(state, rs, op.step, path)


def info_for(path: str) -> CheckpointInfo:
    step = layout.parse_step(os.path.basename(path))
    return CheckpointInfo(path, step if step is not None else -1,
                          os.path.getmtime(os.path.join(path, layout.MANIFEST)))


def iter_valid(root: str, warn: bool = True):
    """Committed checkpoints of ``root`` that validate, newest first (corrupt ones are warned about).

    The ``latest`` pointer is a hint: when it names the newest committed
    directory that one is tried first, otherwise (missing, stale, garbage)
    the scan decides."""
    committed = [e for e in reversed(layout.scan(root)) if e.complete]
    pointer = commit.read_latest(root)
    if committed and pointer is not None and pointer != committed[0].name:
        log.debug("pyckpt: %s/latest names %s, newest committed is %s", root, pointer, committed[0].name)
    for e in committed:
        try:
            reader.open_checkpoint(e.path)
        except CorruptCheckpointError as exc:
            if warn:
                log.warning("pyckpt: skipping corrupt checkpoint %s: %s", exc.path or e.path, exc)
            continue
        except PyckptError as exc:
            if warn:
                log.warning("pyckpt: skipping unreadable checkpoint %s: %s", e.path, exc)
            continue
        yield info_for(e.path)
