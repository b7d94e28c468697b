"""A relaunch with another number of ranks: replicated (DDP) state resumes, each new rank taking the
per-rank part of saved rank ``rank % N`` and its loader position marked for the re-split
(tests/dist/test_resize_ddp.py runs whole jobs); what cannot be re-cut is refused on every rank with
one line naming both sizes. Real gloo process groups."""
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

DIST_SIG = ["TensorDataset", 27, 3, "DistributedSampler", "BatchSampler", False, 0]


def state():
    return {"modules": {"0": {"module.w": torch.arange(100, dtype=torch.float32)}}}


def rank_state(rank, replicated=True, sig=DIST_SIG, loader=True):
    rs = {"pyckpt": {"step": 4, "replicated": replicated}, "rng": {"rank": torch.tensor([rank])},
          "loader": {"sig": sig, "epoch": 2, "batch": 3, "fetched": 3} if loader else None,
          "loop": {"rank": rank}}
    if not replicated:
        rs["objects"] = {"w": torch.full((3,), float(rank))}
    return rs


ROOTS = {"ok": {}, "perrank": {"replicated": False},
         "sampler": {"sig": DIST_SIG[:3] + ["RandomSampler"] + DIST_SIG[4:]}, "noloader": {"loader": False}}


def _worker(rank, world, tmp, job):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous-{job}", rank=rank, world_size=world)
    try:
        from pyckpt.coord import StoreCoordinator

        coord = StoreCoordinator(timeout_s=120)
        if job == "save":
            for root, kw in ROOTS.items():
                with pyckpt.Checkpointer(f"{tmp}/{root}", keep=2, coordinator=coord) as ck:
                    if root == "ok":  # an older one too: what resume falls back to when step 4 lacks a rank
                        ck.save(2, state(), rank_state=rank_state(rank, **kw)).result(120)
                    ck.save(4, state(), rank_state=rank_state(rank, **kw)).result(120)
            out = {}
        else:
            with pyckpt.Checkpointer(f"{tmp}/ok", keep=2, coordinator=coord) as ck:
                src = resume.choose(ck, coord, "auto")
                into = {"modules": {"0": {"module.w": torch.zeros(100)}}}
                restored = src.restore(into)
            out = {"src": src.src_rank, "rng": int(restored.rank_state["rng"]["rank"]),
                   "from_world": src.rank_state["loader"]["from_world"], "loop": "loop" in src.rank_state,
                   "equal": torch.equal(into["modules"]["0"]["module.w"], state()["modules"]["0"]["module.w"])}
        with open(f"{tmp}/{job}{rank}.json", "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def refusal(tmp, root, saved, now, why):
    path = os.path.join(tmp, root, "step-000000004")
    return (f"checkpoint {path} was written by {saved} rank(s), this job has {now}: {why}; set PYCKPT_RESUME=never "
            f"(or use a new PYCKPT_DIR) to start over, or use {saved} rank(s)")


def test_two_ranks_then_one_resumes_or_refuses(tmp_path, capsys, caplog):
    mp.spawn(_worker, args=(2, str(tmp_path), "save"), nprocs=2, join=True)
    with pyckpt.Checkpointer(tmp_path / "ok") as ck:
        src = resume.choose(ck, LocalCoordinator(), "auto")
        assert src.src_rank == 0 and src.rank_state["loader"]["from_world"] == 2
        assert "loop" not in src.rank_state  # another rank's script variables are never taken
        into = {"modules": {"0": {"module.w": torch.zeros(100)}}}
        restored = src.restore(into)
        assert torch.equal(into["modules"]["0"]["module.w"], state()["modules"]["0"]["module.w"])
        assert int(restored.rank_state["rng"]["rank"]) == 0
    err = capsys.readouterr().err
    assert err.count("pyckpt: ") == 1 and "(written by 2 rank(s)) on 1 rank(s)" in err
    assert "the RNG streams of saved rank(s) 1..1 are dropped" in err and "[0<-0]" in err
    whys = {"perrank": "its model/optimizer state is per rank or sharded (not DDP-replicated), which cannot be "
                       "re-cut for another number of ranks",
            "sampler": "its training loader uses RandomSampler / BatchSampler; only DistributedSampler with a plain "
                       "BatchSampler can have its data position re-split",
            "noloader": "it holds no DataLoader position (a loop no DataLoader drives), so there is no data position "
                        "to re-split"}
    for root, why in whys.items():
        with pyckpt.Checkpointer(tmp_path / root) as ck:
            with pytest.raises(pyckpt.PyckptError) as ei:
                resume.choose(ck, LocalCoordinator(), "auto")
            assert str(ei.value) == refusal(str(tmp_path), root, 2, 1, why)
            assert resume.choose(ck, LocalCoordinator(), "never") is None  # the way out the message names
    check_missing_rank(tmp_path, capsys, caplog)


def check_missing_rank(tmp_path, capsys, caplog):
    """Rank 1's files of the newest checkpoint lost after the commit: resume takes the older one, and
    `pyckpt verify` fails naming rank 1's part file."""
    import shutil

    from pyckpt.cli import main

    newest = tmp_path / "ok" / "step-000000004"
    (newest / "rank-00001.json").unlink()
    shutil.rmtree(newest / "rank-00001")
    assert main(["verify", str(newest)]) == 1
    err = capsys.readouterr().err
    assert f"part {newest}/rank-00001.json is missing" in err and "FAILED" in err
    with pyckpt.Checkpointer(tmp_path / "ok") as ck:
        src = resume.choose(ck, LocalCoordinator(), "auto")
    assert src.path == str(tmp_path / "ok" / "step-000000002")
    assert f"skipping damaged checkpoint {newest}: part {newest}/rank-00001.json is missing" in caplog.text


def test_one_rank_then_two_resumes_on_every_rank(tmp_path):
    with pyckpt.Checkpointer(tmp_path / "ok") as ck:
        ck.save(4, state(), rank_state=rank_state(0)).result(60)
    mp.spawn(_worker, args=(2, str(tmp_path), "resume"), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"resume{r}.json").read_text()) for r in range(2)]
    # rank 1 has no saved part of its own: it takes rank 0's (RNG included) and the one replicated copy
    assert got == [{"src": 0, "rng": 0, "from_world": 1, "loop": False, "equal": True}] * 2
    assert json.loads((tmp_path / "ok" / "step-000000004" / "MANIFEST.json").read_text())["world_size"] == 1
