"""A script that resumes itself with accelerate's ``load_state`` while pyckpt has a checkpoint too.

The newer checkpoint wins (never both) and one line says which; the run ends exactly as the same
script does without pyckpt. The script positions its data itself after ``load_state`` (its own
epoch counter, ``skip_first_batches``): when pyckpt's wins, pyckpt finds the epoch the script
starts in and does the skipping.
"""
from __future__ import annotations

import re

import pytest

import _harness
from e2e_helpers import pyckpt_env, run_plain, run_to_end

pytest.importorskip("accelerate", reason="accelerate is a test-only dependency (requirements-dev.txt)")

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("pyckpt_installed")]


# ----------------------------------------------------------------------------- the accelerate-example pattern
# As accelerate's example scripts do: resume from the newest step_N folder with load_state, then start at
# the epoch that N falls in and skip its first batches with skip_first_batches. 11 micro-batches of 4 per
# epoch, accumulation over 2 (6 optimizer steps per epoch, 3 epochs), 2 worker processes, dropout, a
# per-step LR schedule. The script saves its own state after steps 5 and 13 (named by micro-batches).
EXAMPLE_PATTERN = '''
import os, sys, time
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

out, root, exit_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
sleep = float(sys.argv[4])
torch.manual_seed(0)
accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
g = torch.Generator().manual_seed(1)
data = TensorDataset(torch.randn(44, 8, generator=g), torch.randn(44, 1, generator=g))
loader = DataLoader(data, batch_size=4, shuffle=True, num_workers=2)
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.1, total_iters=18)
model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
saved = sorted((int(n[5:]), n) for n in os.listdir(root) if n.startswith("step_")) if os.path.isdir(root) else []
starting_epoch, skip = 0, 0
if saved:
    accelerator.load_state(os.path.join(root, saved[-1][1]))
    starting_epoch, skip = divmod(saved[-1][0], len(loader))
seen = starting_epoch * len(loader) + skip
for epoch in range(starting_epoch, 3):
    active = accelerator.skip_first_batches(loader, skip) if epoch == starting_epoch and skip else loader
    for x, y in active:
        with accelerator.accumulate(model):
            loss = F.mse_loss(model(x), y)
            accelerator.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
        seen += 1
        if accelerator.sync_gradients:
            step = int(opt.optimizer.state[opt.optimizer.param_groups[0]["params"][0]]["step"])
            print(f"step {step} epoch {epoch} loss {loss.item():.9g}", flush=True)
            if step in (5, 13):
                accelerator.save_state(os.path.join(root, f"step_{seen}"))
                if step == exit_after:
                    sys.exit(3)  # the job fails right after its own save
            time.sleep(sleep)
torch.save({"model": accelerator.unwrap_model(model).state_dict(), "optim": opt.optimizer.state_dict(),
            "sched": sched.scheduler.state_dict()}, out)
'''
WON = re.compile(r"pyckpt: resume: (pyckpt's checkpoint \S+ \(step (\d+)\) is newer than or as new as "
                 r"accelerate's|accelerate's load_state\(.*\) \(optimizer step (\d+)\) is newer)")


def test_load_state_in_example_pattern_newer_checkpoint_wins(tmp_path):
    # Run 1 fails right after accelerate's save of step 5 (pyckpt's newest: 3): accelerate's wins.
    # Run 2 is killed right after pyckpt's step 9 (accelerate's newest still 5): pyckpt's wins, at a
    # position recorded after accelerate's resume (epoch 1, 6 micro-batches in; the script starts in
    # epoch 0 and skips 10 micro-batches itself). Each ends as the same chain without pyckpt.
    script = tmp_path / "train.py"
    script.write_text(EXAMPLE_PATTERN)

    def cmd(root, exit_after, sleep="0"):
        return _harness.python_command(script, [str(root / "final.pt"), str(root / "acc"), str(exit_after), sleep])

    plain, ours, ckpt = tmp_path / "plain", tmp_path / "ours", tmp_path / "ckpt"
    for root in (plain, ours):
        root.mkdir()
    first = _harness.launch(cmd(plain, 5), _harness.clean_env())
    assert first.finish(120) == 3, first.stderr[-3000:]
    reference = run_plain(cmd(plain, 0))  # accelerate's own resume at step 5
    ref_lines = {s: rest for s, _, rest in reference.steps()}
    assert sorted(ref_lines) == list(range(6, 19)), reference.stdout

    env = pyckpt_env(ckpt, every_steps=3)
    first = _harness.launch(cmd(ours, 5), env)
    assert first.finish(120) == 3, first.stderr[-3000:]
    assert _harness.committed_steps(ckpt)[-1] == 3
    second = _harness.launch(cmd(ours, 0, "0.5"), env)
    assert second.wait_until(lambda: 9 in _harness.committed_steps(ckpt), 120), second.stderr[-3000:]
    second.kill()
    assert not (ours / "final.pt").exists()
    saves = sorted(int(n.name[5:]) for n in (ours / "acc").iterdir())
    assert saves == [10], f"{saves}: killed after accelerate's save of step 13"
    won = WON.findall(second.stderr)
    assert [w[2] for w in won] == ["5"] and _harness.resume_line(second.stderr) is None, second.stderr[-3000:]
    third = run_to_end(cmd(ours, 0), env)
    won = WON.findall(third.stderr)
    assert [w[1] for w in won] == ["9"], third.stderr[-3000:]
    assert (_harness.resume_line(third.stderr) or {}).get("step") == 9, third.stderr[-3000:]
    assert "Traceback" not in third.stderr and "refusing to guess" not in third.stderr, third.stderr[-3000:]
    for run in (second, third):
        assert all(ref_lines.get(s) == rest for s, _, rest in run.steps()), (run.steps(), ref_lines)
    assert [s for s, _, _ in third.steps()] == list(range(10, 19)), third.stdout
    problems = _harness.diff_states(_harness.load_state(plain / "final.pt"), _harness.load_state(ours / "final.pt"))
    assert not problems, problems
