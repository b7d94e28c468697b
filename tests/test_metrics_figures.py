"""The byte figures of a save's metrics line come from the ranks' own parts (gathered at the commit),
not from parsing the committed parts back, and equal what ``metrics.data_figures`` reads from disk."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pyckpt
from pyckpt import metrics

FIELDS = ("bytes_raw", "bytes_stored", "bytes_written", "bytes_skipped", "codec_ratio", "world_size")


def _count_data_figures(monkeypatch) -> list:
    calls: list = []
    real = metrics.data_figures

    def counted(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(metrics, "data_figures", counted)
    return calls


def _saves(root: str) -> list[dict]:
    records, bad = metrics.read(root)
    assert bad == 0
    return [r for r in records if r["event"] == "save"]


def _state(model: torch.nn.Module, frozen: torch.Tensor) -> dict:
    return {"model": model.state_dict(), "frozen": frozen, "note": "x"}


@pytest.mark.parametrize("compress, incremental", [("none", False), ("zstd", False), ("none", True)])
def test_single_process_figures_equal_the_files_without_reading_them_back(ckpt_root, monkeypatch, compress,
                                                                           incremental, knob_env):
    calls = _count_data_figures(monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
    frozen = torch.zeros(1 << 18)  # 1 MiB of zeros: compresses; unchanged, so referenced when incremental
    knob_env(PYCKPT_CHUNK_MB=1)  # the engine rebuilt with 1 MiB chunks, and again after the test
    with pyckpt.Checkpointer(ckpt_root, keep=10, compress=compress, incremental=incremental) as ck:
        for step in (1, 2, 3):
            with torch.no_grad():
                model[step].weight.add_(1.0)
            ck.save(step, _state(model, frozen), rank_state={"r": torch.arange(step)}).result(60)
    assert calls == []  # no part was parsed back for the metrics line
    records = _saves(ckpt_root)
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["ok"] for r in records)
    for r in records:
        assert "figures_error" not in r
        assert {k: r[k] for k in FIELDS} == metrics.data_figures(r["path"]), r["step"]
        assert r["throughput_mb_s"] == round(r["bytes_raw"] / r["durable_s"] / 1e6, 3)
    last = records[-1]
    if incremental:
        assert last["bytes_skipped"] >= 1 << 20  # the frozen tensor's chunk is referenced
    else:
        assert last["bytes_skipped"] == 0
    if compress == "zstd":
        assert last["bytes_stored"] < last["bytes_raw"] and last["codec_ratio"] > 1


def test_figures_fall_back_to_the_files_without_gathered_ones(ckpt_root):
    with pyckpt.Checkpointer(ckpt_root) as ck:
        path = ck.save(1, {"w": torch.ones(100)}).result(60)
    timer = metrics.SaveTimer(1)
    timer.returned()
    rec = metrics.save_record(timer, path, None)  # timer.figures is None: read from disk
    assert {k: rec[k] for k in FIELDS} == metrics.data_figures(path)
    assert rec["bytes_raw"] == 400 and rec["world_size"] == 1


def test_sum_figures_needs_every_rank():
    share = {"raw": 10, "stored": 5, "skipped": 3, "files": {"rank-00000/data-000.bin": 4096}}
    two = metrics.sum_figures([share, {**share, "files": {"rank-00001/data-000.bin": 100}}])
    assert two == {"bytes_raw": 20, "bytes_stored": 10, "bytes_written": 4196, "bytes_skipped": 6,
                   "codec_ratio": 2.0, "world_size": 2}
    assert metrics.sum_figures([share, None]) is None and metrics.sum_figures([]) is None
    assert metrics.part_figures({"chunks": [{"file": "a"}]}) is None  # not a part: rank 0 reads the files


def _worker(rank: int, world: int, tmp: str) -> None:
    os.environ["PYCKPT_CHUNK_MB"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        from pyckpt import commit, manifest
        from pyckpt import metrics as m
        from pyckpt.coord import StoreCoordinator

        calls, encoded = [], []
        real, real_commit = m.data_figures, commit.commit_parts
        m.data_figures = lambda path: calls.append(path) or real(path)

        def commit_parts(*args):  # the bytes written are the canonical ones (sharded parts included)
            encoded.append(args[8] == manifest.dumps(args[5]))
            return real_commit(*args)

        commit.commit_parts = commit_parts
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)
        weights = [torch.randn(300_000) for _ in range(3)]  # replicated: each rank writes some of them
        frozen = torch.zeros(1 << 18)  # unchanged: referenced from the second save on
        shard = distribute_tensor(torch.arange(1 << 17, dtype=torch.float32), mesh, [Shard(0)])
        with pyckpt.Checkpointer(f"{tmp}/root", keep=5, compress="zstd",
                                 coordinator=StoreCoordinator(timeout_s=120)) as ck:
            for step in (1, 2):
                weights[step].add_(1.0)
                state = {"w": weights, "frozen": frozen, "sharded": shard}
                ck.save(step, state, rank_state={"rank": torch.tensor([rank, step])}).result(120)
            r = ck.restore(2, into={"w": [torch.zeros_like(w) for w in weights], "frozen": torch.zeros_like(frozen),
                                    "sharded": distribute_tensor(torch.zeros(1 << 17), mesh, [Shard(0)])})
        ok = (all(torch.equal(a, b) for a, b in zip(r.state["w"], weights)) and torch.equal(r.state["frozen"], frozen)
              and torch.equal(r.state["sharded"].to_local(), shard.to_local())
              and r.rank_state["rank"].tolist() == [rank, 2])
        with open(f"{tmp}/out{rank}.json", "w") as f:
            json.dump({"calls": calls, "ok": ok, "encoded": encoded}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_two_ranks_figures_are_gathered_and_summed(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        out = json.loads((tmp_path / f"out{rank}.json").read_text())
        assert out == {"calls": [], "ok": True, "encoded": [True, True]}, rank
    records = _saves(str(tmp_path / "root"))
    assert [r["step"] for r in records] == [1, 2] and all(r["ok"] for r in records)
    for r in records:
        assert {k: r[k] for k in FIELDS} == metrics.data_figures(r["path"]), r["step"]
        assert r["world_size"] == 2
    assert records[1]["bytes_skipped"] >= 1 << 20
    parts = [json.loads((tmp_path / "root" / "step-000000002" / f"rank-0000{i}.json").read_text()) for i in range(2)]
    assert all(p["sharded"]["tensors"] for p in parts)  # the parts were extended by sharded.add_to_part
