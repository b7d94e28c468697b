"""Lazy capture (pyckpt/lazy.py) with two real ranks (gloo): a state one rank cannot encode is refused
on every rank, by the save's agreement, instead of leaving the other rank waiting in it; the next
snapshot of both ranks then commits."""
import json
import os
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.dist


def _worker(rank, world, tmp):
    os.environ.update(WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        from pyckpt import lazy
        from pyckpt.checkpointer import Checkpointer
        from pyckpt.coord import StoreCoordinator
        from pyckpt.errors import UnsupportedStateError

        p = torch.nn.Parameter(torch.ones(4))
        opt = torch.optim.SGD([p], lr=0.1)
        ck = Checkpointer(f"{tmp}/ck", coordinator=StoreCoordinator(timeout_s=60))
        session = types.SimpleNamespace(ckpt=ck, coord=ck.coord, optimizers=[opt], step=1, sigterm=None)
        lz = lazy.Lazy(session)
        out = {"lazy": lz.enabled}
        try:  # rank 1's per-rank state holds a set: no encoding for it
            lz.save({"w": p.detach()}, {"x": {1, 2} if rank == 1 else 1})
            out["refused"] = None
        except UnsupportedStateError as e:
            out["refused"] = str(e)
        session.step = 2
        fut = lz.save({"w": p.detach()}, {"x": rank})
        lz.settle()
        out["committed"] = os.path.basename(fut.result(60))
        ck.close()
        with open(f"{tmp}/out{rank}.json", "w") as fh:
            json.dump(out, fh)
    finally:
        dist.destroy_process_group()


def test_a_state_one_rank_cannot_encode_is_refused_on_every_rank(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    outs = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in range(2)]
    assert all(o["lazy"] for o in outs)
    assert "rank 1 cannot save its state" in outs[0]["refused"] and "'x'" in outs[0]["refused"]
    assert "set" in outs[1]["refused"]
    assert [o["committed"] for o in outs] == ["step-000000002"] * 2
