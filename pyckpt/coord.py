"""Rank coordination for checkpoints: barrier, broadcast, all-gather of small JSON.

``StoreCoordinator`` talks only through the c10d key-value store of the
default process group (set / check / get with unique keys: polls, never a blocking
``store.wait``, see ``_wait``), never through
collectives, so the background commit thread can use it while training runs
collectives on the main thread. Operations with the same ``tag`` must be
called in the same order on every rank; different tags are independent.

A rank that dies (a lost node) never sets its keys. So that the others do not
wait for it until the timeout (30 min; under torchrun the agent's SIGKILL comes
first, 30 s after its SIGTERM), every coordinator bumps a heartbeat counter in
the store (``<prefix>/alive/<rank>``, every ``HEARTBEAT_S``) from a daemon
thread, and a wait longer than half a second looks at the counters of the ranks it
still misses: one that has not moved for ``DEAD_AFTER_S`` is gone, and the
wait raises ``RankLostError`` naming it (a save then fails with one line and
the job goes on, or ends, at once). Giving up is agreed through the store
(``_decide``): a rank taken for gone that was only slow fails the same
operation when it arrives, so no rank goes on with the others one step apart.
"""
from __future__ import annotations

import atexit
import json
import threading
import time
import weakref
from datetime import timedelta
from typing import Any, Protocol, runtime_checkable

from . import _native

_POLL_MIN_S, _POLL_MAX_S = 0.0002, 0.01  # store polls back off from 0.2 ms to 10 ms
HEARTBEAT_S = 0.5  # how often each rank bumps its heartbeat counter
DEAD_AFTER_S = 5.0  # a waited-for rank whose counter has not moved this long (waiter's clock) is gone
_LOOK_AFTER_S = 0.5  # waits shorter than this never read heartbeats; longer ones read them this often


class RankLostError(RuntimeError):
    """A rank this one waits for has stopped (its heartbeat no longer moves)."""


@runtime_checkable
class Coordinator(Protocol):
    rank: int
    world_size: int

    def barrier(self, tag: str) -> None: ...
    def broadcast_json(self, obj: Any, tag: str) -> Any: ...
    def all_gather_json(self, obj: Any, tag: str) -> list[Any]: ...


class LocalCoordinator:
    """The single-process coordinator (world size 1)."""

    rank = 0
    world_size = 1

    def barrier(self, tag: str) -> None:
        return None

    def broadcast_json(self, obj: Any, tag: str) -> Any:
        return json.loads(json.dumps(obj))  # same copy semantics as a real broadcast

    def all_gather_json(self, obj: Any, tag: str) -> list[Any]:
        return [json.loads(json.dumps(obj))]


class StoreCoordinator:
    """Coordinates through a c10d store (default: the default process group's store)."""

    def __init__(self, store: Any = None, rank: int | None = None, world_size: int | None = None,
                 prefix: str = "pyckpt", timeout_s: float = 1800.0) -> None:
        if store is None or rank is None or world_size is None:
            import torch.distributed as dist

            if not dist.is_available() or not dist.is_initialized():
                raise RuntimeError("StoreCoordinator() needs torch.distributed.init_process_group() first, "
                                   "or pass store=, rank= and world_size=")
            from torch.distributed.distributed_c10d import _get_default_store

            store = _get_default_store() if store is None else store
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
        self.store, self.rank, self.world_size = store, rank, world_size
        self.prefix = prefix
        self.timeout = timedelta(seconds=timeout_s)
        self.dead_after_s = DEAD_AFTER_S
        self._seq: dict[str, int] = {}
        self._lock = threading.Lock()
        if world_size > 1:
            _start_heartbeat(self)

    def _alive_key(self, rank: int) -> str:
        return f"{self.prefix}/alive/{rank}"

    def _next_key(self, tag: str) -> tuple[str, int]:
        with self._lock:
            n = self._seq.get(tag, 0)
            self._seq[tag] = n + 1
        return f"{self.prefix}/{tag}/{n}", n

    def all_gather_json(self, obj: Any, tag: str) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        base, n = self._next_key(tag)
        self.store.set(f"{base}/{self.rank}", json.dumps(obj))
        keys = [f"{base}/{r}" for r in range(self.world_size)]
        self._wait(keys)
        decided = self._decide(base, "ok")
        if decided != "ok":  # another rank gave this operation up (a rank lost): so does this one
            raise RankLostError(decided)
        out = [json.loads(self.store.get(k)) for k in keys]
        # Everyone has reached op n, so everyone finished reading op n-1: drop our old key; and
        # everyone finished op n-2 whole, its decision included.
        if n > 0:
            self._delete(f"{self.prefix}/{tag}/{n - 1}/{self.rank}")
        if n > 1 and self.rank == 0:
            self._delete(f"{self.prefix}/{tag}/{n - 2}/decided")
        return out

    def _decide(self, base: str, outcome: str) -> str:
        """The outcome of operation ``base`` every rank sees: the first one proposed ("ok" by a rank that
        saw every key, else why a rank gave up), so a rank wrongly taken for gone that arrives late
        fails the operation too instead of going on alone (its later operations would pair with the
        others' next ones). Stores without compare_set: ``outcome``."""
        try:
            got = self.store.compare_set(f"{base}/decided", "", outcome)
        except (RuntimeError, NotImplementedError, AttributeError):
            return outcome
        return got.decode() if isinstance(got, bytes) else str(got)

    def _wait(self, keys: list[str]) -> None:
        """Until every key exists, polling with ``check``: a TCPStore client runs one operation at a
        time, and a blocking ``store.wait`` would hold it while waiting, so another thread's store
        calls on this rank (a second coordinator, the training thread's policy polls) would queue
        behind it; two ranks each waiting on keys the other's queued call would set deadlock.
        Raises ``RankLostError`` once a rank it waits for is gone (``_check_alive``)."""
        start = time.monotonic()
        deadline = start + self.timeout.total_seconds()
        look = start + _LOOK_AFTER_S
        beats: dict[int, tuple[int, float]] = {}  # rank -> (counter, when it was first seen at that value)
        delay = _POLL_MIN_S
        while not self.store.check(keys):
            now = time.monotonic()
            if now >= deadline:
                from torch.distributed import DistStoreError

                raise DistStoreError(f"pyckpt: timed out after {self.timeout.total_seconds():g} s waiting for "
                                     f"the other ranks at {keys[0].rsplit('/', 1)[0]}")
            if now >= look:
                look = now + _LOOK_AFTER_S
                self._check_alive(keys, beats, now)
            time.sleep(delay)
            delay = min(delay * 2, _POLL_MAX_S)

    def _check_alive(self, keys: list[str], beats: dict[int, tuple[int, float]], now: float) -> None:
        """Raise ``RankLostError`` when a rank whose key is missing has a heartbeat that stopped. A
        rank whose counter never appeared (no heartbeat: another coordinator) is waited for as before."""
        for r, key in enumerate(keys):
            if r == self.rank or self.store.check([key]):
                continue
            count = int(self.store.add(self._alive_key(r), 0))  # reads (creates at 0) without blocking
            seen = beats.get(r)
            if seen is None or seen[0] != count:
                beats[r] = (count, now)
            elif count > 0 and now - seen[1] >= self.dead_after_s:
                base = key.rsplit("/", 1)[0]
                decided = self._decide(base, f"rank {r} is gone: its heartbeat stopped more than "
                                             f"{self.dead_after_s:g} s ago while rank {self.rank} waited for it "
                                             f"at {base}")
                if decided != "ok":
                    raise RankLostError(decided)
                return  # a rank saw every key: it came back in time, the keys are there

    def _delete(self, key: str) -> None:
        try:
            self.store.delete_key(key)
        except (RuntimeError, NotImplementedError, AttributeError):
            pass  # some stores cannot delete; keys are small

    def broadcast_json(self, obj: Any, tag: str) -> Any:
        """Rank 0's ``obj`` on every rank (built on all-gather so every rank's keys can be reclaimed)."""
        return self.all_gather_json(obj if self.rank == 0 else None, tag)[0]

    def barrier(self, tag: str) -> None:
        self.all_gather_json(None, tag)


# Heartbeat threads still running, stopped and joined at exit (_stop_heartbeats).
_heartbeats: list[tuple[threading.Event, threading.Thread]] = []
_heartbeats_lock = threading.Lock()
EXIT_JOIN_S = 2.0  # at exit, how long to wait quietly for a heartbeat's store operation in flight
EXIT_PATIENCE_S = 60.0  # then how much longer, after one line saying so


def _start_heartbeat(coord: StoreCoordinator) -> None:
    """Bump ``coord``'s heartbeat counter every ``HEARTBEAT_S`` until ``coord`` is garbage, the store
    fails (its host is gone: the waits fail by themselves then) or the interpreter exits.

    A daemon thread, so a store that hangs can hold up exit for ``EXIT_PATIENCE_S`` at most, but
    stopped by an exit handler all the same: a daemon thread whose store call (a C++ call without
    the GIL) returns once the interpreter is finalizing is ended by ``pthread_exit`` as it takes the
    GIL back, and that unwinding through torch's GIL guard aborts the process ("terminate called
    without an active exception", exit status -6) after the training script ended well."""
    ref, store, key = weakref.ref(coord), coord.store, coord._alive_key(coord.rank)
    stop = threading.Event()

    def beat() -> None:
        _native.name_os_thread()
        while ref() is not None and not stop.is_set():
            try:
                store.add(key, 1)
            except Exception:  # the store is gone or cannot count: nothing to tell anyone
                return
            stop.wait(HEARTBEAT_S)

    thread = threading.Thread(target=beat, name=f"pyckpt-heartbeat-{coord.rank}", daemon=True)
    with _heartbeats_lock:
        if not _heartbeats:
            # Registered with the first heartbeat: exit handlers registered later (the finished-run
            # marker's, which may still commit through this coordinator) run before this one.
            atexit.register(_stop_heartbeats)
        _heartbeats[:] = [(e, t) for e, t in _heartbeats if t.is_alive()] + [(stop, thread)]
    thread.start()


def _stop_heartbeats() -> None:
    """Stop every heartbeat thread and wait for a store operation in flight to return:
    ``EXIT_JOIN_S`` without a word, then up to ``EXIT_PATIENCE_S`` more after one line saying so.
    Past that the interpreter finalizes with the call still out, which aborts the process only if
    the call returns during those last moments."""
    with _heartbeats_lock:
        running = [t for _, t in _heartbeats]
        for stop, _ in _heartbeats:
            stop.set()
    _join(running, EXIT_JOIN_S)
    late = [t for t in running if t.is_alive()]
    if late:
        from .activation import _say

        _say(f"exit waits up to {EXIT_PATIENCE_S:g} s for a store call of the heartbeat ({late[0].name}) "
             "still in flight: a thread coming back from one while the interpreter shuts down would abort "
             "the process", "warning")
        _join(late, EXIT_PATIENCE_S)


def _join(threads: list[threading.Thread], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


def attempt_prefix(env: Any = None) -> str:
    """The store key prefix of this job attempt: the same on every rank of the attempt, on every node,
    and new for each attempt whose store may still hold the previous attempt's keys.

    ``TORCHELASTIC_RESTART_COUNT`` is not the same on every node: after one node's worker failed,
    its agent counts a restart, but the other nodes' agents restart their workers for the membership
    change, which "does not count as a retry" (torch/distributed/elastic/agent/server/api.py), so a
    prefix built from it splits a multi-node job into groups that wait for each other forever. When
    the workers' store is their own (``TORCHELASTIC_USE_AGENT_STORE`` not true, as under pyckpt-run:
    rank 0 of the attempt hosts it), it dies with the attempt and ``MASTER_PORT`` names it. Only the
    agent's shared store outlives attempts; there the restart count is the only attempt number the
    workers get (exact on one node; several nodes need the store not shared, see docs/OPERATIONS.md)."""
    import os

    env = os.environ if env is None else env
    run_id = env.get("TORCHELASTIC_RUN_ID", "")
    if str(env.get("TORCHELASTIC_USE_AGENT_STORE", "")).lower() == "true":
        return f"pyckpt/{run_id}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return f"pyckpt/{run_id}/{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}"


def default_coordinator() -> Coordinator:
    """``StoreCoordinator`` when a default process group with > 1 rank exists, else local."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return StoreCoordinator()
    except (ImportError, RuntimeError):
        pass
    return LocalCoordinator()
