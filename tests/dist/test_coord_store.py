"""StoreCoordinator across two real processes in a gloo process group."""
import json
import os
import threading

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.dist


def _worker(rank, world, tmp):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        from pyckpt.coord import StoreCoordinator, default_coordinator

        c = StoreCoordinator(timeout_s=60)
        out = {"default_is_store": isinstance(default_coordinator(), StoreCoordinator)}
        out["gather"] = [c.all_gather_json({"rank": rank, "i": i}, "g") for i in range(3)]
        out["bcast"] = c.broadcast_json({"token": f"tok{rank}"}, "b")
        # Store traffic on a background thread while the main thread runs a real collective.
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("bg", c.all_gather_json(rank * 10, "bg")))
        t.start()
        import torch

        x = torch.tensor([rank + 1.0])
        dist.all_reduce(x)
        t.join(60)
        out["bg"], out["allreduce"] = box.get("bg"), x.item()
        c.barrier("end")
        with open(f"{tmp}/out{rank}.json", "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def test_store_coordinator_two_processes(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        out = json.loads((tmp_path / f"out{rank}.json").read_text())
        assert out["default_is_store"] is True
        assert out["gather"] == [[{"rank": 0, "i": i}, {"rank": 1, "i": i}] for i in range(3)]
        assert out["bcast"] == {"token": "tok0"}
        assert out["bg"] == [0, 10]
        assert out["allreduce"] == 3.0
