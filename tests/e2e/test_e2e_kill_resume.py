"""SIGKILL a training job under pyckpt (env-var mode), relaunch it, get the exact plain result.

The full matrix of kill points runs on the single-process example; the others
get the one or two points where their particular state is most at risk.
"""
from __future__ import annotations

import shutil

import pytest

from e2e_helpers import (DDP, GAN, GPT, INFINITE, LORA, SINGLE, after_commit, assert_resumed_exactly, at_step,
                         during_write, kill_and_relaunch, pyckpt_env, sigterm_and_relaunch, tier_env, tier_path)

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("pyckpt_installed")]

# train_single.py: 6 steps per epoch, 3 epochs; checkpoints every 3 steps, so
# 3, 9, 15 are mid-epoch and 6, 12 are taken at an epoch boundary.
SINGLE_KILLS = {
    "mid_epoch": lambda d: at_step(11),
    "first_step_of_epoch": lambda d: at_step(13),
    "last_step_of_epoch": lambda d: at_step(12),
    "right_after_commit": lambda d: after_commit(d, 9),
    "while_writing": lambda d: during_write(d),
}


@pytest.mark.parametrize("kill_point", list(SINGLE_KILLS))
def test_single_process_resumes_exactly(kill_point, references, tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.pt"
    cmd = SINGLE.command(out)
    env = pyckpt_env(ckpt, every_steps=3)
    killed_env = env
    if kill_point == "while_writing":
        # Slow every chunk write down so the kill lands inside one.
        killed_env = pyckpt_env(ckpt, every_steps=3, PYCKPT_TEST_WRITE_DELAY_MS="400")
    crash = kill_and_relaunch(cmd, killed_env, ckpt, out, SINGLE_KILLS[kill_point](ckpt),
                              relaunch_env=env)
    if kill_point == "while_writing":
        assert crash.in_progress and crash.in_progress[-1] > crash.committed[-1], (
            f"expected a half-written checkpoint after the kill: committed {crash.committed}, "
            f"in progress {crash.in_progress}")
    assert_resumed_exactly(crash, references.get(SINGLE), out)


# train_ddp.py: 4 optimizer steps per epoch; checkpoints every 2 steps, so 6 is
# mid-epoch and 8 is taken at the start of epoch 2, after StepLR.step() and
# sampler.set_epoch(2) ran.
@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("kill_step", [7, 9], ids=["mid_epoch", "after_epoch_end_scheduler_step"])
def test_torchrun_ddp_resumes_exactly(kill_step, references, tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.pt"
    crash = kill_and_relaunch(DDP.command(out), pyckpt_env(ckpt, every_steps=2), ckpt, out,
                              at_step(kill_step))
    assert_resumed_exactly(crash, references.get(DDP), out)


def test_gan_with_two_optimizers_resumes_exactly(references, tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.pt"
    crash = kill_and_relaunch(GAN.command(out), pyckpt_env(ckpt, every_steps=3), ckpt, out,
                              at_step(10))
    # pyckpt may count one step per batch or one per optimizer.step() call.
    assert_resumed_exactly(crash, references.get(GAN), out, optimizer_steps_per_line=(1, 2))


def test_lora_with_frozen_base_resumes_exactly(references, tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.pt"
    crash = kill_and_relaunch(LORA.command(out), pyckpt_env(ckpt, every_steps=3), ckpt, out,
                              at_step(11))
    assert_resumed_exactly(crash, references.get(LORA), out)


def test_nanogpt_style_loop_resumes_exactly(references, tmp_path):
    # The output head's weight is the token embedding's (one tensor, two state_dict names); batches and
    # the evaluation every 5 iterations are drawn from the global RNG with no DataLoader; the LR is set
    # by hand from the range loop's counter; micro-batches accumulate, gradients are clipped.
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.pt"
    crash = kill_and_relaunch(GPT.command(out), pyckpt_env(ckpt, every_steps=3), ckpt, out, at_step(11))
    assert_resumed_exactly(crash, references.get(GPT), out, no_loader=True)


def test_infinite_sampler_resumes_exactly_inside_its_one_epoch(references, tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.pt"
    crash = kill_and_relaunch(INFINITE.command(out), pyckpt_env(ckpt, every_steps=3), ckpt, out,
                              at_step(11))
    assert_resumed_exactly(crash, references.get(INFINITE), out)


def test_sigterm_checkpoints_exits_and_resumes_exactly(references, tmp_path):
    # A preemption notice: no periodic checkpoint is due in this run, so the only
    # checkpoint is the one SIGTERM asks for at the next consistent point.
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.pt"
    env = pyckpt_env(ckpt, every_steps=1000)
    crash = sigterm_and_relaunch(SINGLE.command(out), env, ckpt, out, at_step=8)
    assert_resumed_exactly(crash, references.get(SINGLE), out)


# ----------------------------------------------------------------------------- with the memory tier
# Kills with PYCKPT_SHM_MB on and storage written every 2nd snapshot: at the kill the newest snapshot
# exists only in /dev/shm, and the relaunch must resume from it exactly (issue 9: nothing lost with
# lazy, incremental and tiered snapshots on; lazy capture and incremental chunks are on by default).

@pytest.fixture
def tier_ckpt(tmp_path):
    """``tmp_path/ckpt``; its memory tier is removed afterwards whatever happened."""
    ckpt = tmp_path / "ckpt"
    yield ckpt
    shutil.rmtree(tier_path(ckpt), ignore_errors=True)


def _assert_resumed_from_memory(crash, ckpt) -> None:
    """The relaunch resumed from the memory tier's newest snapshot (at least as new as storage's),
    and, ending normally, removed the memory copy."""
    assert crash.in_memory, f"nothing in the memory tier after the kill (storage: {crash.in_storage})"
    assert crash.resume["step"] == max(crash.in_memory) >= max(crash.in_storage, default=0), (
        f"resumed from {crash.resume['step']}; memory {crash.in_memory}, storage {crash.in_storage}")
    assert "resuming from the memory tier" in crash.resumed.stderr, crash.resumed.stderr[-3000:]
    assert not tier_path(ckpt).exists(), "a run that ended normally left its memory copy behind"


TIER_CASES = {  # example, checkpoint every N steps, kill at step, optimizer steps per printed line
    "single_mid_epoch": (SINGLE, 3, 11, (1,)),  # snapshots 3, 6, 9: storage has 6, memory only 9
    "gan_two_optimizers": (GAN, 3, 10, (1, 2)),
    "lora_frozen_base": (LORA, 3, 11, (1,)),
    "gpt_tied_embeddings": (GPT, 3, 11, (1,)),  # snapshots 3, 6, 9 (an evaluation's draws before 11)
}


@pytest.mark.parametrize("case", list(TIER_CASES))
def test_resumes_exactly_from_the_memory_tier(case, references, tier_ckpt, tmp_path):
    example, every, kill_step, per_line = TIER_CASES[case]
    out = tmp_path / "final.pt"
    crash = kill_and_relaunch(example.command(out), tier_env(tier_ckpt, every_steps=every), tier_ckpt, out,
                              at_step(kill_step))
    assert_resumed_exactly(crash, references.get(example), out, optimizer_steps_per_line=per_line,
                           no_loader=example is GPT)
    _assert_resumed_from_memory(crash, tier_ckpt)


@pytest.mark.dist
@pytest.mark.slow
def test_torchrun_ddp_resumes_exactly_from_the_memory_tier(references, tier_ckpt, tmp_path):
    out = tmp_path / "final.pt"  # snapshots 2, 4, 6: storage has 4, memory only 6 (both ranks' shares)
    crash = kill_and_relaunch(DDP.command(out), tier_env(tier_ckpt, every_steps=2), tier_ckpt, out, at_step(7))
    assert_resumed_exactly(crash, references.get(DDP), out)
    _assert_resumed_from_memory(crash, tier_ckpt)


def test_sigterm_checkpoint_goes_to_storage_with_the_memory_tier(references, tier_ckpt, tmp_path):
    # A preempted job may come back on another machine, where this one's /dev/shm is not: the snapshot
    # SIGTERM asks for is written to storage even when PYCKPT_STORAGE_EVERY would skip it.
    out = tmp_path / "final.pt"
    env = tier_env(tier_ckpt, every_steps=1000, storage_every=5)
    crash = sigterm_and_relaunch(SINGLE.command(out), env, tier_ckpt, out, at_step=8,
                                 between=lambda: shutil.rmtree(tier_path(tier_ckpt)))  # as on another machine
    assert crash.in_memory == crash.committed, "the SIGTERM snapshot was not kept in memory as well"
    assert_resumed_exactly(crash, references.get(SINGLE), out)
