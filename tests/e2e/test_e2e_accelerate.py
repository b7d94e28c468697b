"""SIGKILL/SIGTERM an unmodified accelerate training script under pyckpt, relaunch, get the exact plain result.

examples/train_accelerate.py: 11 micro-batches per epoch, accumulation over 2, so 6
optimizer steps per epoch (the 6th on the epoch's last, lone micro-batch, synced because
the loader ended), 3 epochs. accelerate's prepared loader fetches one batch ahead of the
loop, so every position below is one where "batches fetched" and "batches the loop has
trained on" differ.
"""
from __future__ import annotations

import pytest

import _harness
from e2e_helpers import (Example, Reference, References, after_commit, assert_resumed_exactly, kill_and_relaunch,
                         pyckpt_env, run_plain, run_to_end, sigterm_and_relaunch)

pytest.importorskip("accelerate", reason="accelerate is a test-only dependency (requirements-dev.txt)")

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("pyckpt_installed")]

ACCELERATE = Example("train_accelerate.py", steps=18)
# torchrun, 2 gloo ranks: each rank's shard has 6 micro-batches, so 3 optimizer steps per epoch.
ACCELERATE_DDP = Example("train_accelerate.py", nproc=2, steps=9)

# (every_steps, checkpoint step to kill right after). Snapshots are taken at the loader fetch
# after the step: step 5's when the loop asks for the epoch's last micro-batch (the real loader
# already raises StopIteration), step 6's at the first fetch of epoch 1, step 8's mid-epoch 1,
# step 15's mid-epoch 2 (the relaunch skips two finished epochs first).
KILLS = {
    "last_batch_of_epoch": (5, 5),
    "first_batch_of_epoch": (6, 6),
    "mid_epoch": (4, 8),
    "past_epoch_0": (5, 15),
}


@pytest.mark.parametrize("kill_point", list(KILLS))
def test_accelerate_loop_resumes_exactly(kill_point, references, tmp_path):
    every, step = KILLS[kill_point]
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.pt"
    crash = kill_and_relaunch(ACCELERATE.command(out), pyckpt_env(ckpt, every_steps=every), ckpt, out,
                              after_commit(ckpt, step))
    assert crash.committed[-1] >= step, crash.committed
    assert "no checkpoints will be taken" not in crash.killed.stderr + crash.resumed.stderr, crash.killed.stderr
    assert_resumed_exactly(crash, references.get(ACCELERATE), out)


def test_accelerate_checkpoints_every_step_across_epoch_ends(references, tmp_path):
    # One optimizer step per batch: at the epoch's end the prepared loader hands its last
    # batch after the real loader raised StopIteration, two steps with no batch fetched in
    # between. Checkpointing must go on through every epoch end.
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.pt"
    cmd = ACCELERATE.command(out, sleep=None) + ["--accumulate", "1", "--epochs", "2"]
    run = run_to_end(cmd, pyckpt_env(ckpt, every_steps=1, PYCKPT_KEEP="100"))
    assert "no checkpoints will be taken" not in run.stderr, run.stderr
    # 11 steps per epoch; the last step's snapshot would come at a fetch that never happens.
    assert _harness.committed_steps(ckpt) == list(range(1, 22)), run.stderr[-2000:]


def test_accelerate_accumulating_16_micro_batches_per_step_is_checkpointed(tmp_path):
    # 80 micro-batches an epoch, 16 per step: no step yet at the 16th batch, where pyckpt's check took the
    # gradients for weights updated without an optimizer and took no checkpoint for the whole run
    # ("no checkpoints will be taken"), so a relaunch started over.
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.pt"
    cmd = ACCELERATE.command(out, sleep=None) + ["--accumulate", "16", "--samples", "160", "--batch-size", "2",
                                                 "--epochs", "2", "--workers", "0"]
    run = run_to_end(cmd, pyckpt_env(ckpt, every_steps=1, PYCKPT_KEEP="100"))
    assert "warning" not in run.stderr, run.stderr
    # 5 steps an epoch; the last step's snapshot would come at a fetch that never happens.
    assert _harness.committed_steps(ckpt) == list(range(1, 10)), run.stderr[-2000:]


def test_accelerate_sigterm_checkpoints_exits_and_resumes_exactly(references, tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.pt"
    crash = sigterm_and_relaunch(ACCELERATE.command(out), pyckpt_env(ckpt, every_steps=1000), ckpt, out, 8)
    assert_resumed_exactly(crash, references.get(ACCELERATE), out)


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory):
    # The shared References cache is keyed by script name; the 2-rank run has its own.
    return References(tmp_path_factory.mktemp("accelerate_ddp")).get(ACCELERATE_DDP)


@pytest.mark.dist
@pytest.mark.slow
def test_accelerate_torchrun_two_ranks_resumes_exactly_past_epoch_0(ddp_reference, tmp_path):
    # Step 8's snapshot is taken mid-epoch 2 on both ranks, each one batch ahead in its own shard.
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.pt"
    crash = kill_and_relaunch(ACCELERATE_DDP.command(out), pyckpt_env(ckpt, every_steps=4), ckpt, out,
                              after_commit(ckpt, 8))
    assert_resumed_exactly(crash, ddp_reference, out)


DISPATCH = '''
import argparse, time
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch.utils.data import DataLoader, TensorDataset

p = argparse.ArgumentParser()
p.add_argument("--out")
p.add_argument("--step-sleep", type=float, default=0.0)
args = p.parse_args()
torch.manual_seed(0)
accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(dispatch_batches=True))
model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))
opt = torch.optim.Adam(model.parameters(), lr=0.01)
g = torch.Generator().manual_seed(1)
data = TensorDataset(torch.randn(40, 4, generator=g), torch.randn(40, 1, generator=g))
loader = DataLoader(data, batch_size=4, shuffle=True, num_workers=2)
model, opt, loader = accelerator.prepare(model, opt, loader)
step = 0
for epoch in range(3):
    for x, y in loader:
        loss = F.mse_loss(model(x), y)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        step += 1
        if accelerator.is_main_process:
            print(f"step {step} epoch {epoch} loss {loss.item():.9g}", flush=True)
        time.sleep(args.step_sleep)
accelerator.wait_for_everyone()
if accelerator.is_main_process:
    torch.save({"model": accelerator.unwrap_model(model).state_dict(), "optim": opt.optimizer.state_dict()}, args.out)
'''


@pytest.mark.dist
def test_dispatch_batches_on_two_ranks_resumes_exactly(tmp_path):
    # dispatch_batches=True: process 0 reads two DataLoader batches per step (one per process) and
    # broadcasts; process 1 never reads its loader and follows (each dispatcher fetch is its point).
    # 10 batches per epoch, so 5 steps per epoch and 15 in all. Killed right after step 7's checkpoint
    # (epoch 1, 2 steps in, taken at process 0's fetch for step 9: one item ahead), so the relaunch
    # also skips epoch 0 (the dispatcher fails on an empty DataLoader: it is ended at once instead).
    script, ckpt, out = tmp_path / "dispatch.py", tmp_path / "ckpt", tmp_path / "final.pt"
    script.write_text(DISPATCH)
    example = Example("dispatch.py", nproc=2, steps=15)
    plain = run_plain(example.command(tmp_path / "plain.pt", sleep=None, script=script))
    reference = Reference(_harness.load_state(tmp_path / "plain.pt"), plain.steps())
    assert [s for s, _, _ in reference.steps] == list(range(1, 16)), plain.stdout
    crash = kill_and_relaunch(example.command(out, script=script), pyckpt_env(ckpt, every_steps=7), ckpt, out,
                              after_commit(ckpt, 7))
    assert crash.committed and crash.committed[-1] >= 7, crash.committed
    for run in (crash.killed, crash.resumed):
        assert "warning" not in run.stderr and "no checkpoints will be taken" not in run.stderr, run.stderr[-3000:]
    assert_resumed_exactly(crash, reference, out)
