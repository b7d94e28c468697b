"""Two real ranks (gloo): damage that only one rank reads (its own rank_state chunk) makes every
rank fall back to the same older checkpoint, with no rank left waiting."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.dist


def _worker(rank, world, tmp, phase):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous-{phase}", rank=rank, world_size=world)
    try:
        import pyckpt
        from pyckpt.coord import StoreCoordinator

        with pyckpt.Checkpointer(f"{tmp}/root", keep=3, coordinator=StoreCoordinator(timeout_s=120)) as ck:
            if phase == "save":
                for step in (1, 2):
                    rs = {"mine": torch.full((5000,), float(10 * step + rank))}
                    ck.save(step, {"w": torch.full((5000,), float(step))}, rank_state=rs).result(120)
                out = {}
            else:
                unverified = ck.latest().step
                verified = ck.latest(verify=True).step
                r = ck.restore()
                out = {"unverified": unverified, "verified": verified, "step": r.step, "w": r.state["w"][0].item(),
                       "mine": r.rank_state["mine"][0].item()}
        with open(f"{tmp}/{phase}{rank}.json", "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def flip_rank_state_chunk(ckpt, rank):
    with open(os.path.join(ckpt, f"rank-{rank:05d}.json")) as f:
        part = json.load(f)
    sid = next(s for s in part["storages"] if s["scope"] == "rank")
    chunk = part["chunks"][sid["pieces"][0]["chunk"]]
    with open(os.path.join(ckpt, chunk["file"]), "r+b") as f:
        f.seek(chunk["offset"] + 7)
        b = f.read(1)
        f.seek(chunk["offset"] + 7)
        f.write(bytes([b[0] ^ 0x55]))


def test_damage_seen_by_one_rank_moves_every_rank_to_the_same_older_checkpoint(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path), "save"), nprocs=2, join=True)
    flip_rank_state_chunk(str(tmp_path / "root" / "step-000000002"), rank=1)
    mp.spawn(_worker, args=(2, str(tmp_path), "load"), nprocs=2, join=True)
    outs = [json.loads((tmp_path / f"load{r}.json").read_text()) for r in range(2)]
    for rank, out in enumerate(outs):
        assert out == {"unverified": 2, "verified": 1, "step": 1, "w": 1.0, "mine": 10.0 + rank}
