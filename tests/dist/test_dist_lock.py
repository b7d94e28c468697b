"""Two real ranks (gloo) of a second job on a directory another process holds: every rank gets the
same clear error naming the holder (rank 0 owns the lock; the others must not hang or go on)."""
import os

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

import pyckpt

pytestmark = pytest.mark.dist


def _worker(rank, world, tmp):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        from pyckpt.coord import StoreCoordinator

        try:
            pyckpt.Checkpointer(f"{tmp}/root", coordinator=StoreCoordinator(timeout_s=120))
            out = "acquired"
        except pyckpt.PyckptError as e:
            out = str(e)
        with open(f"{tmp}/out{rank}.txt", "w") as f:
            f.write(out)
    finally:
        dist.destroy_process_group()


def test_every_rank_of_a_second_job_is_refused(tmp_path):
    with pyckpt.Checkpointer(tmp_path / "root"):
        mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    outs = [(tmp_path / f"out{r}.txt").read_text() for r in range(2)]
    assert outs[0] == outs[1] and f"is in use by pid {os.getpid()} on host " in outs[0]
