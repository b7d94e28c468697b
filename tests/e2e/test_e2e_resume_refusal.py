"""An optimizer that steps before the training loader reached the checkpoint's position: the relaunch
does not replay the run that wrote it. One ``pyckpt:`` line and exit status 2, never a traceback."""
from __future__ import annotations

import pytest

import _harness
from e2e_helpers import RUN_TIMEOUT_S, pyckpt_env

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("pyckpt_installed")]

SCRIPT = '''
import sys
import torch
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
loader = DataLoader(TensorDataset(torch.randn(12, 4)), batch_size=3)
if sys.argv[1] == "step-first":
    next(iter(DataLoader(TensorDataset(torch.randn(5, 4)), batch_size=5)))  # another loader first
    model(torch.randn(2, 4)).sum().backward()
    opt.step()  # before the training loader reached the checkpoint's position
for epoch in range(2):
    for (x,) in loader:
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
sys.exit(3)  # a failed job: a run that ended normally would be marked finished and not resumed
'''


def test_step_before_restore_point_is_one_line_and_exit_2(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = pyckpt_env(tmp_path / "ckpt", every_steps=2)
    first = _harness.launch(_harness.python_command(script, ["plain"]), env)
    assert first.finish(RUN_TIMEOUT_S) == 3, first.stderr[-3000:]
    assert _harness.committed_steps(tmp_path / "ckpt"), "no checkpoint to resume from"
    run = _harness.launch(_harness.python_command(script, ["step-first"]), env)
    rc = run.finish(RUN_TIMEOUT_S)
    assert rc == 2, f"exit {rc}:\n{run.stderr[-3000:]}"
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    lines = [line for line in run.stderr_lines if "refusing to guess" in line]
    assert len(lines) == 1 and lines[0].startswith("pyckpt: cannot resume: "), run.stderr[-3000:]


CURRICULUM = '''
import sys
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
data = TensorDataset(torch.randn(24, 4))
first = 6 if sys.argv[1:] == ["edited"] else 8  # the relaunch's curriculum starts with another length
for epoch in range(3):
    for (x,) in DataLoader(Subset(data, range(first + 4 * epoch)), batch_size=4):  # grows every epoch
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
sys.exit(3)
'''


def test_a_curriculum_loader_of_other_lengths_is_refused_with_a_line_that_names_it(tmp_path):
    # A loader rebuilt every epoch over a growing dataset is a new stream at every epoch; the loaders that fed
    # training before the checkpoint are skipped on resume (tests/transparent/test_loader_rebuilt.py). A
    # relaunch whose first loader has a length none of them had trains on it before the restore point: the
    # refusal names the loader that came first and the likely cause.
    script = tmp_path / "train.py"
    script.write_text(CURRICULUM)
    env = pyckpt_env(tmp_path / "ckpt", every_steps=4)
    first = _harness.launch(_harness.python_command(script, []), env)
    assert first.finish(RUN_TIMEOUT_S) == 3, first.stderr[-3000:]
    run = _harness.launch(_harness.python_command(script, ["edited"]), env)
    assert run.finish(RUN_TIMEOUT_S) == 2, run.stderr[-3000:]
    lines = [line for line in run.stderr_lines if "refusing to guess" in line]
    assert len(lines) == 1 and "records no finished epoch of it that trained" in lines[0], run.stderr[-3000:]
    assert "['Subset', 6, 4," in lines[0] and "(a curriculum)" in lines[0] and "does not replay" in lines[0]
