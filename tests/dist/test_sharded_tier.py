"""Sharded training (FSDP2 ``fully_shard``, ZeroRedundancyOptimizer) with the memory tier
(PYCKPT_SHM_MB), lazy capture and incremental chunks (both on by default), as a user runs it:
torchrun with 2 ranks, one rank SIGKILLed while the newest snapshot exists only in /dev/shm, the same
command relaunched: the final state is bitwise equal to a plain run's. Also a relaunch on one rank
from such a snapshot, and the tier's size limit counting every rank's part."""
import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import pyckpt
from pyckpt import sharded

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import _harness  # noqa: E402
from e2e_helpers import (Crash, Example, References, assert_resumed_exactly, run_to_end, tier_env,  # noqa: E402
                         tier_path, tier_steps)
from gloo_ranks import run_ranks  # noqa: E402
from sample_ranks import launch_samples  # noqa: E402

pytestmark = pytest.mark.dist

# FSDP2 with a frozen 2 MiB layer, whose chunks incremental checkpoints reference in earlier ones.
FSDP = Example(str(Path(__file__).with_name("sharded_frozen.py")), nproc=2, steps=18)  # 3 epochs x 6 steps


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """Future of the plain run's Reference (started now, in the background)."""
    refs = References(tmp_path_factory.mktemp("plain"))
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(refs.get, FSDP)


@pytest.fixture
def tier_ckpt(tmp_path):
    """``tmp_path/ckpt``; its memory tier and every process left behind are removed afterwards."""
    ckpt = tmp_path / "ckpt"
    yield ckpt
    _harness.cleanup_all()
    shutil.rmtree(tier_path(ckpt), ignore_errors=True)


def newest_only_in_memory(ckpt: Path, at_least: int):
    """Kill point: the memory tier's newest snapshot, of step ``at_least`` or later, is not in storage.
    (A lazy snapshot commits once the next optimizer step starts: a step line does not say it is there.)"""
    def holds(run) -> bool:
        mem = tier_steps(ckpt)
        return bool(mem) and mem[-1] >= at_least and mem[-1] not in _harness.committed_steps(ckpt)
    return holds


def kill_rank_and_relaunch(cmd: list[str], env: dict, ckpt: Path, out: Path, kill_when, rank: int) -> Crash:
    """Launch under torchrun, SIGKILL one rank's process once ``kill_when`` holds (the launcher then stops the
    others), relaunch the same command to the end."""
    run = _harness.launch(cmd, env)
    assert run.wait_until(lambda: kill_when(run), 120), f"no kill point (last step {run.last_step()}):\n" \
        + run.stderr[-3000:]
    os.kill(_harness.elastic_workers(run.popen.pid)[rank], signal.SIGKILL)
    assert run.finish(120) != 0 and not out.exists(), run.stderr[-3000:]
    stored, in_memory = _harness.committed_steps(ckpt), tier_steps(ckpt)
    resumed = run_to_end(cmd, env)
    return Crash(run, sorted(set(stored) | set(in_memory)), _harness.in_progress_steps(ckpt), resumed,
                 _harness.resume_line(resumed.stderr), in_memory, stored)


def pyckpt_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyckpt", *args], capture_output=True, text=True,
                          env=_harness.clean_env(), timeout=120)


@pytest.mark.e2e
@pytest.mark.slow
def test_fsdp2_resumes_exactly_from_a_snapshot_held_only_in_memory(tier_ckpt, tmp_path, plain):
    """Snapshots every step, every 3rd also in storage, 2 kept there: rank 1 killed while the newest exists only
    in /dev/shm (both ranks' shards), the relaunch resumes from it and ends bitwise equal to a plain run. At its
    normal end its last snapshot (18, memory only) is written to storage; every kept checkpoint verifies,
    references (the frozen layer's chunks) included."""
    out = tmp_path / "final.pt"
    env = tier_env(tier_ckpt, every_steps=1, storage_every=3, PYCKPT_KEEP="2")
    crash = kill_rank_and_relaunch(FSDP.command(out), env, tier_ckpt, out, newest_only_in_memory(tier_ckpt, 4), 1)
    assert crash.in_storage and max(crash.in_memory) > max(crash.in_storage), (crash.in_memory, crash.in_storage)
    assert_resumed_exactly(crash, plain.result(timeout=300), out)
    assert crash.resume["step"] == max(crash.in_memory)
    assert "pyckpt: resuming from the memory tier" in crash.resumed.stderr, crash.resumed.stderr[-3000:]
    # The end: the finished marker names step 18, which storage holds; both ranks' parts verify.
    assert json.loads((tier_ckpt / "FINISHED.json").read_text())["step"] == 18
    kept = _harness.committed_steps(tier_ckpt)
    assert kept[-1] == 18 and len(kept) == 2, kept
    for step in kept:
        v = pyckpt_cli("verify", str(tier_ckpt / f"step-{step:09d}"))
        assert v.returncode == 0 and "2 rank part(s)" in v.stdout, v.stdout + v.stderr
    listed = pyckpt_cli("ls", "--verify", "--json", str(tier_ckpt))
    assert listed.returncode == 0, listed.stdout + listed.stderr
    newest = json.loads((tier_ckpt / "step-000000018" / "rank-00000.json").read_text())
    assert any(f["path"].startswith("../") for f in newest["files"]), "nothing referenced: not incremental"
    assert not tier_path(tier_ckpt).exists(), "a run that ended normally left its memory copy behind"


# ----------------------------------------------------------------------------- another number of ranks
def _samples(tmp: Path, run: str, world: int, env: dict, **kw) -> str:
    """train_ddp_samples.py (27 samples, batch 3: 5 steps per epoch on 2 ranks) on ``world`` ranks of this
    machine: LOCAL_WORLD_SIZE tells the memory tier they share one /dev/shm."""
    return launch_samples(tmp, run, world, _harness.clean_env(dict(env, LOCAL_WORLD_SIZE=str(world))), **kw)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["fsdp", "zero"])
def test_resumes_on_one_rank_from_a_two_rank_snapshot_held_only_in_memory(parallel, tier_ckpt, tmp_path):
    """2 -> 1 ranks while the newest snapshot (step 8) exists only in /dev/shm (storage holds none yet):
    the relaunch resumes from it, re-cut for one rank, with exactly its parameters and optimizer state."""
    env = dict(PYCKPT_DIR=str(tier_ckpt), PYCKPT_EVERY_STEPS="2", PYCKPT_SHM_MB="64", PYCKPT_STORAGE_EVERY="5",
               PARALLEL=parallel)
    mem = tier_path(tier_ckpt)
    _samples(tmp_path, "a", 2, env, stop_at=9, stop_after=mem / "step-000000008" / "MANIFEST.json")
    # Stopped right after step 8's publish: the tier may still hold step 6 (its removal comes after).
    assert _harness.committed_steps(tier_ckpt) == [] and tier_steps(tier_ckpt) in ([8], [6, 8])
    shutil.copytree(mem, tmp_path / "mem", ignore=shutil.ignore_patterns(".spare"))  # the relaunch removes it
    err = _samples(tmp_path, "b", 1, env)
    assert "pyckpt: resuming from the memory tier" in err and "(written by 2 rank(s)) on 1 rank(s)" in err, err[-3000:]
    assert "pyckpt: resumed from step 8 (epoch 1, batch 3)" in err, err[-3000:]
    saved_path = str(tmp_path / "mem" / "step-000000008")
    saved = pyckpt.load(saved_path)  # without a process group: whole tensors
    first = torch.load(tmp_path / "b-first-0.pt", weights_only=True)  # the one rank's state at its first batch
    model = saved["modules"]["0"]
    assert first["model"].keys() == model.keys() and all(torch.equal(first["model"][k], model[k]) for k in model)
    if parallel == "zero":  # each saved rank held its own parameters' state; the one rank now holds all
        opt = {int(k): v for rs in sharded.rank_states(saved_path) for k, v in rs["zero"]["0"]["state"].items()}
    else:
        opt = {int(k): v for k, v in saved["optimizers"]["0"]["state"].items()}
    got = {int(k): v for k, v in first["opt"]["state"].items()}
    assert got.keys() == opt.keys() and opt
    assert all(torch.equal(v, opt[i][n]) for i, st in got.items() for n, v in st.items())
    # The interrupted epoch's samples, steps 1-8 on 2 ranks and the rest on 1, each trained once.
    logs = [(upto, (tmp_path / f"{run}-{r}.txt").read_text().splitlines())
            for run, world, upto in (("a", 2, 8), ("b", 1, 1 << 30)) for r in range(world)]
    epoch1 = Counter(i for upto, lines in logs for e, s, *idx in (map(int, line.split()) for line in lines)
                     if e == 1 and s <= upto for i in idx)
    assert epoch1 == Counter(range(27))
    # A normal end: the finished marker names a checkpoint storage holds, and it verifies.
    step = json.loads((tier_ckpt / "FINISHED.json").read_text())["step"]
    assert step in _harness.committed_steps(tier_ckpt) and not mem.exists()
    v = pyckpt_cli("verify", str(tier_ckpt / f"step-{step:09d}"))
    assert v.returncode == 0, v.stdout + v.stderr


# ----------------------------------------------------------------------------- the tier's size limit
def _zero_shares(rank, world, tmp):
    from pyckpt import knobs, shm_tier
    from pyckpt.checkpointer import Checkpointer
    from pyckpt.coord import StoreCoordinator

    model = torch.zeros(1 << 17)  # 0.5 MiB, replicated: written once
    kept = []
    with knobs.override(PYCKPT_SHM_MB=3):
        ck = Checkpointer(f"{tmp}/ck", coordinator=StoreCoordinator(timeout_s=120))
        tier = shm_tier.tier_for(ck, ck.coord)
        # Per rank, as a ZeroRedundancyOptimizer's share of the optimizer state is saved: 2 x 0.25 MiB
        # (1 MiB in all: two copies fit in 3 MiB, kept), then 2 x 1 MiB (2.5 MiB in all: two do not).
        for step, share in ((1, torch.zeros(1 << 16)), (2, torch.zeros(1 << 18))):
            f = tier.save(step, {"model": model}, {"zero": share})
            kept.append(f is not None)
            if f is not None:
                f.result(120)
        dist.barrier()
        if rank == 0:
            tier.remove()
        ck.close()
    return kept


def test_per_rank_state_counts_toward_the_memory_tier_limit(tmp_path):
    # /dev/shm holds every rank's part: a ZeRO job's optimizer state (most of its snapshot) is per rank.
    # Left out, the limit (and the room check, which keeps a full /dev/shm from failing the snapshot
    # and the storage checkpoint due from it) saw a fraction of the snapshot.
    assert run_ranks(_zero_shares, 2, tmp_path) == [[True, False], [True, False]]
