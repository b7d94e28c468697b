"""PYCKPT_RESUME=auto with two real ranks (gloo) when committed checkpoints exist but none is sound:
every rank refuses with the same error (never one rank training from scratch while another waits), and
a root with no committed checkpoint still starts over on every rank."""
import os

import pytest
import torch
import torch.distributed as dist

from gloo_ranks import run_ranks

pytestmark = pytest.mark.dist


def _ranks(rank, world, tmp):
    import pyckpt
    from pyckpt import layout, resume
    from pyckpt.coord import StoreCoordinator

    coord = StoreCoordinator(timeout_s=120)
    out = {}
    with pyckpt.Checkpointer(f"{tmp}/ck", coordinator=coord) as ck:
        paths = [ck.save(s, {"w": torch.full((1 << 16,), float(s))}, {"mine": torch.full((64,), float(10 * s + rank))}
                         ).result(120) for s in (2, 4)]
        dist.barrier()
        if rank == 1:  # only rank 1's data is damaged: rank 0 alone would find nothing wrong in its share
            for p in paths:
                with open(os.path.join(p, layout.data_file_name(1)), "r+b") as f:
                    b = f.read(1)
                    f.seek(0)
                    f.write(bytes([b[0] ^ 0xFF]))
        dist.barrier()
        try:
            resume.choose(ck, coord, "auto")
            out["damaged"] = None
        except pyckpt.CorruptCheckpointError as e:
            out["damaged"] = str(e)
        out["paths"] = paths
    with pyckpt.Checkpointer(f"{tmp}/empty", coordinator=coord) as ck:
        out["empty"] = resume.choose(ck, coord, "auto")
    return out


def test_every_rank_refuses_when_no_committed_checkpoint_is_sound(tmp_path):
    got = run_ranks(_ranks, 2, tmp_path)
    msg = got[0]["damaged"]
    assert msg is not None and got[1]["damaged"] == msg, got
    newest, older = got[0]["paths"][1], got[0]["paths"][0]
    assert msg.startswith(f"every committed checkpoint is damaged ({newest}, {older};"), msg
    assert "PYCKPT_RESUME=never trains from scratch" in msg
    assert got[0]["empty"] is None and got[1]["empty"] is None
