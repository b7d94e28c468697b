"""Incremental chunks with two gloo ranks: each rank references only its own earlier data file,
retention (rank 0) reads every rank's references, and a restore on both ranks is bitwise."""
import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES = [700_000, 500_000, 300_000]  # frozen, replicated: spread over both ranks


def state(step):
    frozen = {f"w{i}": torch.arange(n, dtype=torch.float32) * (i + 1) for i, n in enumerate(SIZES)}
    return {"frozen": frozen, "adapter": torch.full((1000,), float(step))}


def _worker(rank, world, tmp):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        import pyckpt
        from pyckpt.coord import StoreCoordinator

        with pyckpt.Checkpointer(f"{tmp}/root", keep=2, coordinator=StoreCoordinator(timeout_s=120)) as ck:
            for step in (1, 2, 3):
                rs = {"rng": torch.tensor([rank, step], dtype=torch.int64)}
                path = ck.save(step, state(step), rank_state=rs).result(120)
            dist.barrier()
            r = ck.restore()
            ok = all(torch.equal(a, b) for a, b in zip(r.state["frozen"].values(), state(3)["frozen"].values()))
            ok = ok and torch.equal(r.state["adapter"], state(3)["adapter"])
            ok = ok and r.rank_state["rng"].tolist() == [rank, 3]
        with open(f"{tmp}/out{rank}.json", "w") as f:
            json.dump({"ok": ok, "path": path, "step": r.step}, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_reference_their_own_files_and_restore(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    outs = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in range(2)]
    assert all(o["ok"] and o["step"] == 3 for o in outs)
    root = tmp_path / "root"
    step3 = root / "step-000000003"
    frozen_bytes = sum(SIZES) * 4
    for r in range(2):
        part = json.loads((step3 / f"rank-0000{r}.json").read_text())
        refs = {c["file"] for c in part["chunks"] if c["file"].startswith("../")}
        assert refs == {f"../step-000000001/rank-0000{r}/data-000.bin"}, refs  # its own file only
    written = sum(os.path.getsize(step3 / f"rank-0000{r}" / "data-000.bin") for r in range(2))
    assert written < 0.05 * frozen_bytes  # the frozen state was not written again
    # keep=2 retired step 1 (referenced by steps 2 and 3): no manifest, data kept.
    assert sorted(os.listdir(root / "step-000000001")) == ["rank-00000", "rank-00000.json", "rank-00001",
                                                           "rank-00001.json"]
