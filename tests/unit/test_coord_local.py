"""LocalCoordinator and StoreCoordinator over a real in-process HashStore."""
import threading

import torch.distributed as dist

from pyckpt.coord import Coordinator, LocalCoordinator, StoreCoordinator


def test_local_coordinator_is_a_world_of_one():
    c = LocalCoordinator()
    assert isinstance(c, Coordinator)
    obj = {"a": [1]}
    out = c.broadcast_json(obj, "t")
    assert out == obj and out is not obj
    assert c.all_gather_json(3, "t") == [3]


def test_store_coordinator_with_threads_as_ranks():
    store = dist.HashStore()
    coords = [StoreCoordinator(store, r, 3, timeout_s=30) for r in range(3)]
    results = [None] * 3

    def run(r):
        c = coords[r]
        out = []
        for i in range(3):
            out.append(c.all_gather_json({"r": r, "i": i}, "g"))
        out.append(c.broadcast_json(f"from{r}", "b"))
        c.barrier("end")
        results[r] = out

    threads = [threading.Thread(target=run, args=(r,)) for r in range(3)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    for r in range(3):
        assert results[r][:3] == [[{"r": k, "i": i} for k in range(3)] for i in range(3)]
        assert results[r][3] == "from0"
