"""SIGKILL a training job under pyckpt (env-var mode), relaunch it, get the exact plain result.

The full matrix of kill points runs on the single-process example; the others
get the one or two points where their particular state is most at risk.
"""
from __future__ import annotations

import pytest

from e2e_helpers import (DDP, GAN, INFINITE, LORA, SINGLE, after_commit, assert_resumed_exactly, at_step,
                         during_write, kill_and_relaunch, pyckpt_env, sigterm_and_relaunch)

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
