"""Rank coordination for checkpoints: barrier, broadcast, all-gather of small JSON.

``StoreCoordinator`` talks only through the c10d key-value store of the
default process group (set / check / get with unique keys: polls, never a blocking
``store.wait``, see ``_wait``), never through
collectives, so the background commit thread can use it while training runs
collectives on the main thread. Operations with the same ``tag`` must be
called in the same order on every rank; different tags are independent.
"""
from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from typing import Any, Protocol, runtime_checkable

_POLL_MIN_S, _POLL_MAX_S = 0.0002, 0.01  # store polls back off from 0.2 ms to 10 ms


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
        self._seq: dict[str, int] = {}
        self._lock = threading.Lock()

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
        out = [json.loads(self.store.get(k)) for k in keys]
        # Everyone has reached op n, so everyone finished reading op n-1: drop our old key.
        if n > 0:
            self._delete(f"{self.prefix}/{tag}/{n - 1}/{self.rank}")
        return out

    def _wait(self, keys: list[str]) -> None:
        """Until every key exists, polling with ``check``: a TCPStore client runs one operation at a
        time, and a blocking ``store.wait`` would hold it while waiting, so another thread's store
        calls on this rank (a second coordinator, the training thread's policy polls) would queue
        behind it; two ranks each waiting on keys the other's queued call would set deadlock."""
        deadline = time.monotonic() + self.timeout.total_seconds()
        delay = _POLL_MIN_S
        while not self.store.check(keys):
            if time.monotonic() >= deadline:
                from torch.distributed import DistStoreError

                raise DistStoreError(f"pyckpt: timed out after {self.timeout.total_seconds():g} s waiting for "
                                     f"the other ranks at {keys[0].rsplit('/', 1)[0]}")
            time.sleep(delay)
            delay = min(delay * 2, _POLL_MAX_S)

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
