"""Transparent sharded data parallelism: examples/train_fsdp.py (FSDP2: fully_shard of blocks and root)
and examples/train_zero.py (DDP + ZeroRedundancyOptimizer), both AdamW with a per-step cosine schedule
and a DistributedSampler, under torchrun with PYCKPT_DIR, SIGKILLed with their whole process tree
mid-epoch and relaunched, end with the gathered full state bitwise equal to a plain run's.

Both plain reference runs start together in the background when the first test starts, so they
overlap with the kill-and-relaunch runs (each is mostly process start-up and waiting)."""
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import _harness  # noqa: E402
from e2e_helpers import (Example, References, assert_resumed_exactly, at_step, kill_and_relaunch,  # noqa: E402
                         pyckpt_env)

pytestmark = [pytest.mark.dist, pytest.mark.e2e, pytest.mark.slow]

FSDP = Example("train_fsdp.py", nproc=2, steps=18)  # 3 epochs x 6 steps
ZERO = Example("train_zero.py", nproc=2, steps=18)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """Example -> future of its plain run's Reference (both started now, in the background)."""
    refs = References(tmp_path_factory.mktemp("plain"))
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {ex: pool.submit(refs.get, ex) for ex in (FSDP, ZERO)}


@pytest.fixture(autouse=True)
def _kill_leftovers(plain):
    yield
    for fut in plain.values():  # not killed by the clean-up below: the other test needs its run
        fut.exception(timeout=300)
    _harness.cleanup_all()


def test_transparent_fsdp2_killed_and_relaunched_equals_plain_run(tmp_path, plain):
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.pt"
    crash = kill_and_relaunch(FSDP.command(out), pyckpt_env(ckpt, every_steps=2), ckpt, out, at_step(9))
    assert_resumed_exactly(crash, plain[FSDP].result(timeout=300), out)
    # The checkpoint holds each rank's shards (no gathered copy): both ranks wrote model rows.
    newest = sorted(p for p in ckpt.iterdir() if p.name.startswith("step-") and "." not in p.name)[-1]
    parts = [json.loads((newest / f"rank-0000{r}.json").read_text()) for r in range(2)]
    rows = [[s["offsets"][0] for t in p["sharded"]["tensors"] if t["key"][:2] == ["modules", "0"]
             for s in t["shards"]] for p in parts]
    assert rows[0] and rows[1] and min(rows[1]) > 0 == min(rows[0])


def test_transparent_zero1_killed_and_relaunched_equals_plain_run(tmp_path, plain):
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.pt"
    crash = kill_and_relaunch(ZERO.command(out), pyckpt_env(ckpt, every_steps=2), ckpt, out, at_step(9))
    assert_resumed_exactly(crash, plain[ZERO].result(timeout=300), out)
    # Each rank saved the optimizer state of the parameters it owns, none of the other's.
    newest = sorted(p for p in ckpt.iterdir() if p.name.startswith("step-") and "." not in p.name)[-1]
    owned = []
    for r in range(2):
        tree = json.loads((newest / f"rank-0000{r}.json").read_text())["rank_state"]["tree"]
        owned.append({k for k, _ in tree["zero"]["0"]["state"]["items"]})
    assert owned[0] and owned[1] and not owned[0] & owned[1]
