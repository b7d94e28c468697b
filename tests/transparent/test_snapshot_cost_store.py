"""Coordinators sharing one c10d store client never wait while holding it.

A TCPStore client runs one operation at a time: a blocking ``wait`` holds it until the keys
appear. Transparent mode and a script's own ``Checkpointer`` (or a commit thread and the training
thread) coordinate through the same store object of the default process group, so a coordinator
that waited with ``store.wait`` could hold the client while the other rank's keys it waits for
sit behind that other rank's own waiting operation: two DDP ranks deadlocked, and a main-thread
store operation stalled for as long as a background commit waited. Here: two ranks, each one real
TCPStore client shared by two coordinators with different prefixes, calls started in the
crosswise order that deadlocks.
"""
from __future__ import annotations

import threading
import time

from torch.distributed import TCPStore

from pyckpt.coord import StoreCoordinator

BOUND_S = 20.0


def test_two_coordinators_on_one_store_client_per_rank_do_not_deadlock():
    server = TCPStore("127.0.0.1", 0, 2, True, wait_for_workers=False)
    clients = [TCPStore("127.0.0.1", server.port, 2, False) for _ in range(2)]
    coords = {(r, p): StoreCoordinator(clients[r], r, 2, prefix=p, timeout_s=BOUND_S)
              for r in range(2) for p in ("transparent", "explicit")}
    results: dict[tuple[int, str], object] = {}

    def gather(rank: int, prefix: str, delay: float) -> None:
        time.sleep(delay)
        try:
            results[(rank, prefix)] = coords[(rank, prefix)].all_gather_json([rank, prefix], "commit")
        except Exception as e:  # a timed-out wait: reported below
            results[(rank, prefix)] = e

    # Rank 0 waits on "transparent" and rank 1 on "explicit" first; the other calls come later.
    plan = [(0, "transparent", 0.0), (1, "explicit", 0.0), (0, "explicit", 0.3), (1, "transparent", 0.3)]
    threads = [threading.Thread(target=gather, args=a, daemon=True) for a in plan]
    for t in threads:
        t.start()
    for t in threads:
        t.join(BOUND_S + 10)
    for p in ("transparent", "explicit"):
        for r in range(2):
            assert results.get((r, p)) == [[0, p], [1, p]], results
