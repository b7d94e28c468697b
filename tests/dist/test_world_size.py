"""A relaunch with another number of ranks is refused on every rank with one line naming both sizes
(resharding does not exist yet), instead of resuming silently with another data split (2 -> 1) or
failing with an unclear message on one rank (1 -> 2). Real gloo process groups."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pyckpt
from pyckpt import resume
from pyckpt.coord import LocalCoordinator

pytestmark = pytest.mark.dist


def state():
    return {"w": torch.arange(100, dtype=torch.float32)}


def _worker(rank, world, tmp, job):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous-{job}", rank=rank, world_size=world)
    try:
        from pyckpt.coord import StoreCoordinator

        coord = StoreCoordinator(timeout_s=120)
        ck = pyckpt.Checkpointer(f"{tmp}/root", keep=2, coordinator=coord)
        if job == "save":
            ck.save(4, state(), rank_state={"loader": {"rank": rank}}).result(120)
            out = "saved"
        else:
            try:
                resume.choose(ck, coord, "auto")
                out = "resumed"
            except pyckpt.PyckptError as e:
                out = str(e)
        ck.close()
        with open(f"{tmp}/{job}{rank}.txt", "w") as f:
            f.write(out)
    finally:
        dist.destroy_process_group()


def expected(tmp, saved, now):
    path = os.path.join(tmp, "root", "step-000000004")
    return (f"checkpoint {path} was written by {saved} rank(s), this job has {now}; resuming with a different "
            "number of ranks is not supported yet: set PYCKPT_RESUME=never (or use a new PYCKPT_DIR) to start over, "
            "or use the same number of ranks")


def test_two_ranks_then_one_is_refused(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path), "save"), nprocs=2, join=True)
    with pyckpt.Checkpointer(tmp_path / "root") as ck:
        with pytest.raises(pyckpt.PyckptError) as ei:
            resume.choose(ck, LocalCoordinator(), "auto")
        assert str(ei.value) == expected(str(tmp_path), 2, 1)
        assert resume.choose(ck, LocalCoordinator(), "never") is None  # the way out the message names


def test_one_rank_then_two_is_refused_on_every_rank(tmp_path):
    with pyckpt.Checkpointer(tmp_path / "root") as ck:
        ck.save(4, state(), rank_state={"loader": {"rank": 0}}).result(60)
    mp.spawn(_worker, args=(2, str(tmp_path), "resume"), nprocs=2, join=True)
    msgs = [(tmp_path / f"resume{r}.txt").read_text() for r in range(2)]
    assert msgs == [expected(str(tmp_path), 1, 2)] * 2
    assert json.loads((tmp_path / "root" / "step-000000004" / "MANIFEST.json").read_text())["world_size"] == 1
