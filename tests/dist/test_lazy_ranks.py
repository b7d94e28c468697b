"""Lazy capture (pyckpt/lazy.py) with two real ranks (gloo): a state one rank cannot encode is refused
on every rank, by the save's agreement, instead of leaving the other rank waiting in it; the next
snapshot of both ranks then commits."""
import os
import types

import pytest
import torch

from gloo_ranks import run_ranks

pytestmark = pytest.mark.dist


def _snapshots(rank, world, tmp):
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
    return out


def test_a_state_one_rank_cannot_encode_is_refused_on_every_rank(tmp_path):
    outs = run_ranks(_snapshots, 2, tmp_path)
    assert all(o["lazy"] for o in outs)
    assert "rank 1 cannot save its state" in outs[0]["refused"] and "'x'" in outs[0]["refused"]
    assert "set" in outs[1]["refused"]
    assert [o["committed"] for o in outs] == ["step-000000002"] * 2
