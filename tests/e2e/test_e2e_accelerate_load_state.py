"""A script that resumes itself with accelerate's ``load_state`` while pyckpt has a checkpoint too.

The script positions its data itself after ``load_state`` (here: it trains one more epoch), which
pyckpt cannot follow, so pyckpt drops its pending restore (never both), says so in one line, and
the run ends exactly as the same script does without pyckpt.
"""
from __future__ import annotations

import re

import pytest

import _harness
from e2e_helpers import pyckpt_env, run_to_end

pytest.importorskip("accelerate", reason="accelerate is a test-only dependency (requirements-dev.txt)")

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("pyckpt_installed")]

SCRIPT = '''
import sys
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

mode, state_dir, out = sys.argv[1:4]
torch.manual_seed(0)
accelerator = Accelerator(cpu=True)
model = torch.nn.Linear(4, 1)
opt = torch.optim.Adam(model.parameters(), lr=0.1)
loader = DataLoader(TensorDataset(torch.randn(12, 4)), batch_size=3, shuffle=True)
model, opt, loader = accelerator.prepare(model, opt, loader)
if mode == "load":
    accelerator.load_state(state_dir)
for (x,) in loader:
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
torch.save({"model": accelerator.unwrap_model(model).state_dict()}, out)
if mode == "save":
    accelerator.save_state(state_dir)
    sys.exit(3)  # the job fails after its save; the relaunch resumes (a finished run would not be relaunched)
'''
LINE = re.compile(r"pyckpt: resume: the script resumes itself with accelerate's load_state\(.*\) \(optimizer "
                  r"step 4\); pyckpt's checkpoint \S+ \(step 3\) is not newer but is not used")


def test_load_state_and_pyckpt_compose(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    plain, ours = tmp_path / "plain", tmp_path / "ours"

    def two_runs(root, env):
        root.mkdir()
        first = _harness.launch(_harness.python_command(script, ["save", str(root / "acc"), str(root / "1.pt")]), env)
        assert first.finish(120) == 3, first.stderr[-3000:]
        return run_to_end(_harness.python_command(script, ["load", str(root / "acc"), str(root / "2.pt")]), env)

    two_runs(plain, _harness.clean_env())
    # Every step: pyckpt's newest checkpoint is step 3 (step 4's point, the next fetch, never comes).
    resumed = two_runs(ours, pyckpt_env(tmp_path / "ckpt", every_steps=1))
    assert _harness.committed_steps(tmp_path / "ckpt")[-1] >= 3
    assert len(LINE.findall(resumed.stderr)) == 1, resumed.stderr[-3000:]
    assert _harness.resume_line(resumed.stderr) is None, "pyckpt restored as well as load_state"
    problems = _harness.diff_states(_harness.load_state(plain / "2.pt"), _harness.load_state(ours / "2.pt"))
    assert not problems, problems
