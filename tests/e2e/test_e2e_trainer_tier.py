"""The Hugging Face Trainer with the memory tier: SIGKILL, relaunch the same command, get the exact plain result.

examples/train_trainer.py (see test_e2e_trainer.py: 6 optimizer steps per epoch over 11 micro-batches,
accumulation 2, 3 epochs, accelerate's look-ahead loader) with PYCKPT_SHM_MB on and every 2nd snapshot
written to storage, lazy capture and incremental chunks on (the defaults). Kills land where the newest
snapshot is in /dev/shm only and where storage holds it too; a relaunch with PYCKPT_SHM_MB=0 reads storage.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import _harness
from e2e_helpers import (Example, Reference, after_commit, assert_lines_match, assert_resumed_exactly,
                         assert_state_equal, kill_and_relaunch, launch_and_kill, plain_reference, pyckpt_env,
                         run_to_end, tier_env, tier_path, tier_steps)

pytest.importorskip("transformers", reason="transformers is a test-only dependency (requirements-dev.txt)")

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.usefixtures("pyckpt_installed")]

TRAINER = Example("train_trainer.py", steps=18)
# No worker processes, and a collator that draws random numbers: accelerate's loader collates the batch
# it fetches ahead of the loop in the main process, from the main process's generators.
RANDOM_COLLATE = ["--workers", "0", "--word-dropout", "0.2"]


@pytest.fixture
def tier_ckpt(tmp_path):
    """``tmp_path/ckpt``; its memory tier is removed afterwards whatever happened."""
    ckpt = tmp_path / "ckpt"
    yield ckpt
    shutil.rmtree(tier_path(ckpt), ignore_errors=True)


def _trainer_checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in out.with_suffix(".trainer").iterdir() if p.name.startswith("checkpoint-"))


def _finished_step(ckpt: Path) -> int | None:
    return json.loads((ckpt / "FINISHED.json").read_text())["step"]


def test_trainer_memory_tier_kills_and_a_relaunch_without_the_tier(references, tier_ckpt, tmp_path):
    # Snapshots every 3 steps, every 2nd one to storage too: 3 (memory), 6 (both), 9 (memory), 12 (both).
    reference = references.get(TRAINER)
    out = tmp_path / "final.pt"
    cmd = TRAINER.command(out)
    env = tier_env(tier_ckpt, every_steps=3)
    # Kill 1 right after storage's 12: the relaunch takes the memory copy, as new as storage's.
    launch_and_kill(cmd, env, out, after_commit(tier_ckpt, 12))
    assert tier_steps(tier_ckpt)[-1] == 12 == _harness.committed_steps(tier_ckpt)[-1]
    # Kill 2 once the relaunch's first snapshot, 15, is committed: in memory only.
    second = launch_and_kill(cmd, env, out, lambda run: 15 in tier_steps(tier_ckpt))
    assert "pyckpt: resuming from the memory tier" in second.stderr, second.stderr[-3000:]
    assert _harness.resume_line(second.stderr)["step"] == 12 and second.steps()[0][0] == 13, second.stderr[-3000:]
    assert 15 not in _harness.committed_steps(tier_ckpt)
    assert_lines_match(second, reference)
    # Relaunched with the tier off: storage's 12 is resumed, the copy it does not use is named, and removed
    # at the normal end, when FINISHED.json names the run's last snapshot, which storage holds.
    third = run_to_end(cmd, pyckpt_env(tier_ckpt, every_steps=3))
    assert "is not used: PYCKPT_SHM_MB is 0" in third.stderr, third.stderr[-3000:]
    assert _harness.resume_line(third.stderr)["step"] == 12, third.stderr[-3000:]
    assert [s for s, _, _ in third.steps()] == list(range(13, 19))
    assert_lines_match(third, reference)
    assert_state_equal(reference, out)
    assert not tier_path(tier_ckpt).exists(), "the unused memory copy outlived a normal end"
    assert _finished_step(tier_ckpt) == 15 and 15 in _harness.committed_steps(tier_ckpt)
    assert _trainer_checkpoints(out) == _trainer_checkpoints(references.root / "train_trainer.pt")


@pytest.fixture(scope="module")
def random_collate_reference(tmp_path_factory) -> Reference:
    return plain_reference(TRAINER, tmp_path_factory.mktemp("trainer_random_collate") / "plain.pt", RANDOM_COLLATE)


def test_trainer_random_collate_in_the_main_process_resumes_exactly(random_collate_reference, tier_ckpt, tmp_path):
    # Killed right after the memory commit of 9, which storage lacks (it has 6). Step 9's snapshot is taken
    # with one batch collated ahead (accelerate's look-ahead), which the relaunch collates again before the
    # restore point: its random draws must be the ones the killed run made for it.
    out = tmp_path / "final.pt"
    crash = kill_and_relaunch(TRAINER.command(out) + RANDOM_COLLATE, tier_env(tier_ckpt, every_steps=3),
                              tier_ckpt, out, lambda run: 9 in tier_steps(tier_ckpt))
    # The tier frees 6's copy only after 9's is committed, so a kill right then may find both there.
    assert crash.in_memory[-1] == 9 and max(crash.in_storage, default=0) < 9, (crash.in_memory, crash.in_storage)
    assert "pyckpt: resuming from the memory tier" in crash.resumed.stderr, crash.resumed.stderr[-3000:]
    assert_resumed_exactly(crash, random_collate_reference, out)
    assert not tier_path(tier_ckpt).exists()
    assert _finished_step(tier_ckpt) in _harness.committed_steps(tier_ckpt)
