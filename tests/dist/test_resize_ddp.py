"""DDP, FSDP2 and ZeRO-1 resumed on another number of ranks (transparent mode, real gloo processes,
SIGKILL of the whole job).

A job is killed mid-epoch right after a committed checkpoint and relaunched with another world size:
the restored parameters and optimizer state equal the saved ones exactly (FSDP2: shards re-cut;
ZeRO: every saved rank's share read, each rank keeping what it owns now), the interrupted epoch's
samples (every rank's log, dead attempts' steps after the checkpoint discarded) are each trained
exactly once, and the next epoch is the normal sampler's on the new world size."""
from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import pyckpt
from pyckpt import layout, sharded
from pyckpt.reshard_data import Remap, epoch_order, split_sizes
from sample_ranks import launch_samples

pytestmark = pytest.mark.dist

N, BS = 27, 3


def launch(tmp: Path, run: str, world: int, stop_at: int = -1, stop_after: int = -1, **env) -> str:
    """``world`` ranks of the script checkpointing every 2 steps; with ``stop_at``, SIGKILLed together once
    checkpoint ``stop_after`` committed (``sample_ranks.launch_samples``). Rank 0's stderr."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PYCKPT_")}
    base.update(PYCKPT_DIR=str(tmp / "ck"), PYCKPT_EVERY_STEPS="2", PYCKPT_KEEP="20", OMP_NUM_THREADS="1", **env)
    after = tmp / "ck" / layout.step_dir_name(stop_after) / layout.MANIFEST if stop_at >= 0 else None
    return launch_samples(tmp, run, world, base, stop_at, after)


def trained(tmp: Path, run: str, world: int, upto: int = 1 << 30) -> list[tuple[int, int, int, list[int]]]:
    """(epoch, step, rank, sample indices) of every logged step <= ``upto`` of one launch."""
    out = []
    for r in range(world):
        for line in (tmp / f"{run}-{r}.txt").read_text().splitlines():
            e, s, *idx = map(int, line.split())
            if s <= upto:
                out.append((e, s, r, idx))
    return out


def saved_optimizer(tmp: Path, step: int, saved: dict, parallel: str) -> dict:
    """The checkpoint's optimizer state ({param index: {name: tensor}}, param_groups); ZeRO: every
    saved rank's share (each saved only the parameters it owned) merged."""
    if parallel != "zero":
        opt = saved["optimizers"]["0"]
        return {"state": {int(k): v for k, v in opt["state"].items()}, "param_groups": opt["param_groups"]}
    shares = [rs["zero"]["0"] for rs in sharded.rank_states(str(tmp / "ck" / layout.step_dir_name(step)))]
    state = {int(k): v for z in shares for k, v in z["state"].items()}
    assert len(state) == sum(len(z["state"]) for z in shares)  # disjoint shares
    return {"state": state, "param_groups": shares[0]["param_groups"]}


def assert_restored(tmp: Path, run: str, world: int, step: int, parallel: str = "ddp") -> None:
    """Every rank's state at its first batch is exactly the checkpoint's (parameters, optimizer; FSDP2:
    the gathered shards; ZeRO: each rank's share, together every parameter's)."""
    with pyckpt.Checkpointer(tmp / "ck") as ck:
        saved = ck.load(step=step)
    model, opt = saved["modules"]["0"], saved_optimizer(tmp, step, saved, parallel)
    restored: set[int] = set()
    for r in range(world):
        first = torch.load(tmp / f"{run}-first-{r}.pt", weights_only=True)
        assert first["model"].keys() == model.keys()
        assert all(torch.equal(first["model"][k], model[k]) for k in model)
        for pid, st in first["opt"]["state"].items():
            assert st.keys() == opt["state"][int(pid)].keys()
            assert all(torch.equal(v, opt["state"][int(pid)][k]) for k, v in st.items()), (r, pid)
            restored.add(int(pid))
        assert first["opt"]["param_groups"][0]["lr"] == opt["param_groups"][0]["lr"]
    assert restored == set(opt["state"]) and restored  # every parameter's state restored on some rank


def assert_prefixes(log: list, epoch: int, g: list[int]) -> None:
    """After every step of ``epoch``, the samples trained so far are a prefix of the epoch's global list
    ``g`` (positions are global sample counts, on any world size)."""
    seen: set[int] = set()
    for step in sorted({s for e, s, _, _ in log if e == epoch}):
        seen |= {i for e, s, _, idx in log if s == step for i in idx}
        assert seen == set(g[:len(seen)]), step
    assert len(seen) == len(g)


@pytest.fixture(scope="module")
def zero_first(tmp_path_factory):
    """The ZeRO test's first launch (2 ranks, killed after step 9), started with the module's first
    whole-job test so that it overlaps with it (the launches are mostly start-up and waiting)."""
    tmp = tmp_path_factory.mktemp("zero")
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield tmp, pool.submit(launch, tmp, "a", 2, stop_at=9, stop_after=8, PARALLEL="zero")


def test_two_ranks_to_one_to_three_no_drop_last(tmp_path, zero_first):
    """2 -> 1 mid-epoch, then 1 -> 3 inside the same (already re-split) epoch, DistributedSampler padding."""
    # 2 ranks: 14 samples each (one pad), 5 batches per epoch; step 8 = epoch 1, batch 3.
    launch(tmp_path, "a", 2, stop_at=9, stop_after=8)
    err_b = launch(tmp_path, "b", 1, stop_at=11, stop_after=10)
    assert "written by 2 rank(s)) on 1 rank(s)" in err_b and "saved rank(s) 1..1 are dropped" in err_b
    assert "the rest of epoch 1 (9 of 27 samples, 18 trained) is split across 1 rank(s)" in err_b
    assert "pyckpt: resumed from step 8 (epoch 1, batch 3)" in err_b
    err_c = launch(tmp_path, "c", 3)
    assert "written by 1 rank(s)) on 3 rank(s)" in err_c and "[0<-0, 1<-0, 2<-0]" in err_c
    assert "the rest of epoch 1 (3 of 27 samples, 24 trained) is split across 3 rank(s)" in err_c
    assert_restored(tmp_path, "b", 1, 8)
    assert_restored(tmp_path, "c", 3, 10)
    log = trained(tmp_path, "a", 2, upto=8) + trained(tmp_path, "b", 1, upto=10) + trained(tmp_path, "c", 3)
    epoch1 = Counter(i for e, _, _, idx in log if e == 1 for i in idx)
    assert epoch1 == Counter(range(N))  # every sample once: none twice, none skipped
    assert_prefixes(log, 1, epoch_order(N, True, 3, 1, 2, False))
    # Each step trained on every rank (DDP needs it): steps 11 had one sample per rank.
    assert sorted((r, len(idx)) for e, s, r, idx in log if s == 11) == [(0, 1), (1, 1), (2, 1)]
    epoch2 = [i for e, _, _, idx in log if e == 2 for i in idx]
    assert sorted(epoch2) == list(range(N)) and len({s for e, s, _, _ in log if e == 2}) == 3  # normal, 3 ranks


def test_fsdp2_two_ranks_to_one_to_two_drop_last(tmp_path, zero_first):
    """FSDP2 (fully_shard, AdamW) with DistributedSampler(drop_last=True) (G = 26 of 27 samples): 2 -> 1
    mid-epoch, then 1 -> 2 inside the re-split epoch; the shards are re-cut both ways."""
    env = {"DROP_LAST": "1", "PARALLEL": "fsdp"}
    launch(tmp_path, "a", 2, stop_at=9, stop_after=8, **env)  # 13 per rank, 5 batches (last of 1)
    err_b = launch(tmp_path, "b", 1, stop_at=11, stop_after=10, **env)
    assert "written by 2 rank(s)) on 1 rank(s)" in err_b and "pyckpt: resumed from step 8 (epoch 1, batch 3)" in err_b
    assert "the rest of epoch 1 (8 of 26 samples, 18 trained) is split across 1 rank(s) by global sample count: " \
           "3 batch(es) per rank" in err_b
    err_c = launch(tmp_path, "c", 2, **env)
    assert "written by 1 rank(s)) on 2 rank(s)" in err_c and "pyckpt: resumed from step 10 (epoch 1, batch 5)" in err_c
    assert "the rest of epoch 1 (2 of 26 samples, 24 trained) is split across 2 rank(s)" in err_c
    assert_restored(tmp_path, "b", 1, 8, "fsdp")
    assert_restored(tmp_path, "c", 2, 10, "fsdp")
    log = trained(tmp_path, "a", 2, upto=8) + trained(tmp_path, "b", 1, upto=10) + trained(tmp_path, "c", 2)
    g = epoch_order(N, True, 3, 1, 2, True)
    assert len(g) == 26
    assert Counter(i for e, _, _, idx in log if e == 1 for i in idx) == Counter(g)
    assert_prefixes(log, 1, g)
    epoch2 = [i for e, _, _, idx in log if e == 2 for i in idx]
    assert sorted(epoch2) == sorted(epoch_order(N, True, 3, 2, 2, True))  # the normal sampler, 2 ranks


def test_zero1_two_ranks_to_one_to_two(zero_first):
    """ZeRO-1 (DDP + ZeroRedundancyOptimizer over AdamW) 2 -> 1 mid-epoch: the one rank loads both saved
    ranks' optimizer shares and owns every parameter's state; then 1 -> 2 inside the re-split epoch:
    each rank takes its share of the one saved rank's state."""
    tmp_path, first = zero_first
    first.result(timeout=300)  # launch "a" (2 ranks), killed after step 9
    err_b = launch(tmp_path, "b", 1, stop_at=11, stop_after=10, PARALLEL="zero")
    assert "written by 2 rank(s)) on 1 rank(s)" in err_b and "pyckpt: resumed from step 8 (epoch 1, batch 3)" in err_b
    assert "the rest of epoch 1 (9 of 27 samples, 18 trained) is split across 1 rank(s)" in err_b
    err_c = launch(tmp_path, "c", 2, PARALLEL="zero")
    assert "written by 1 rank(s)) on 2 rank(s)" in err_c and "pyckpt: resumed from step 10 (epoch 1, batch 5)" in err_c
    assert "the rest of epoch 1 (3 of 27 samples, 24 trained) is split across 2 rank(s)" in err_c
    assert_restored(tmp_path, "b", 1, 8, "zero")
    assert_restored(tmp_path, "c", 2, 10, "zero")
    log = trained(tmp_path, "a", 2, upto=8) + trained(tmp_path, "b", 1, upto=10) + trained(tmp_path, "c", 2)
    assert Counter(i for e, _, _, idx in log if e == 1 for i in idx) == Counter(range(N))
    assert_prefixes(log, 1, epoch_order(N, True, 3, 1, 2, False))


@pytest.mark.parametrize("rest,world,bs,loader_dl,sampler_dl,sizes,adjust", [
    (5, 2, 2, False, False, [[2, 1], [1, 1]], 0),  # the last steps share the rest: every rank one batch each
    (1, 3, 4, False, False, [[1, 1, 1]], 2),  # fewer samples than ranks: padded (repeats), as the sampler pads
    (1, 3, 4, False, True, [], -1),  # ... or dropped with drop_last
    (7, 2, 3, True, False, [[3, 3]], -1),  # DataLoader drop_last: full batches only
])
def test_split_sizes_exact_or_says_what_it_changed(rest, world, bs, loader_dl, sampler_dl, sizes, adjust):
    assert split_sizes(rest, world, bs, loader_dl, sampler_dl) == (sizes, adjust)


def test_split_is_exact_whenever_possible():
    """Every sample once, equal batch counts, no empty batch, for all small cases where that exists."""
    for rest in range(40):
        for world in range(1, 5):
            for bs in range(1, 5):
                sizes, adjust = split_sizes(rest, world, bs, False, False)
                assert all(len(s) == world and all(1 <= v <= bs for v in s) for s in sizes)
                assert sum(map(sum, sizes)) == rest + adjust
                possible = rest >= -(-rest // (world * bs)) * world
                assert (adjust == 0) == possible
    r = Remap(N, True, 3, 1, 2, False, 18, 3, BS, False, 3)
    batches = [r.batches(k) for k in range(3)]
    assert sorted(i for b in batches for x in b for i in x) == sorted(epoch_order(N, True, 3, 1, 2, False)[18:])
    assert r.consumed(4) == 27 and r.consumed(3) == 18


def test_plan_same_world_replays_the_split_other_world_resplits():
    """In-process, no process group: the fast-forward plan for a position inside a re-split epoch."""
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from pyckpt import reshard_data

    def loader(world, rank):
        ds = TensorDataset(torch.arange(N))
        return DataLoader(ds, batch_size=BS, sampler=DistributedSampler(ds, world, rank, shuffle=True, seed=3))

    fresh = {"batch": 3, "from_world": 2, "samplers": [{"epoch": 1, "seed": 3}]}
    split, skip = reshard_data.plan(loader(3, 0), fresh)
    assert (split.start, split.world, split.world0, split.batch0, skip) == (18, 3, 2, 3, 0)
    saved = {"batch": 4, "reshard": split.to_json(), "samplers": [{"epoch": 1, "seed": 3}]}
    again, skip = reshard_data.plan(loader(3, 2), saved)  # same world size: the same split, one batch on
    assert again == split and skip == 1
    assert reshard_data.plan(loader(3, 2), {"batch": 4}) is None  # no world change, no split: plain fast-forward
    moved, skip = reshard_data.plan(loader(2, 1), dict(saved, from_world=3))  # then 2 ranks: the rest re-split
    assert (moved.start, moved.world, moved.world0, moved.batch0, skip) == (27, 2, 2, 4, 0)
    assert moved.batches(1) == []  # split (3 ranks x 3) consumed all 9 in its one step
