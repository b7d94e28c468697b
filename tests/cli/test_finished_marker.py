"""The finished-run marker of transparent mode (pyckpt/finish.py): written at a normal exit only; a
relaunch of a finished run stops with one line; PYCKPT_RESUME=never trains again."""
from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = """
import os, sys, torch
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0)
model = torch.nn.Linear(3, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for x, y in DataLoader(TensorDataset(torch.randn(16, 3), torch.randn(16, 1)), batch_size=4):
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
print("TRAINED", flush=True)
if os.environ.get("END") == "exit3":
    sys.exit(3)
if os.environ.get("END") == "raise":
    raise RuntimeError("evaluation failed")
"""


def _run(tmp_path, root, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("PYCKPT_")}
    full.update(PYCKPT_DIR=str(root), PYCKPT_EVERY_STEPS="3", **env)
    return subprocess.run([sys.executable, "-c", SCRIPT], env=full, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)


def test_failed_runs_leave_no_marker(tmp_path):
    for end in ("exit3", "raise"):
        root = tmp_path / end
        r = _run(tmp_path, root, END=end)
        assert r.returncode in (1, 3) and "TRAINED" in r.stdout, r.stderr[-2000:]
        assert (root / "latest").exists() and not (root / "FINISHED.json").exists(), end


def test_finished_run_is_marked_and_its_relaunch_stops_with_one_line(tmp_path, capsys):
    from pyckpt import cli

    root = tmp_path / "ck"
    r = _run(tmp_path, root)
    assert r.returncode == 0 and "TRAINED" in r.stdout, r.stderr[-2000:]
    marker = json.loads((root / "FINISHED.json").read_text())
    assert marker["finished"] is True and marker["steps"] == 4 and marker["step"] == 3
    assert marker["last_checkpoint_ok"] is True
    assert cli.main(["ls", str(root)]) == 0 and "run finished at step 3" in capsys.readouterr().out

    again = _run(tmp_path, root)
    assert again.returncode == 0 and "TRAINED" not in again.stdout
    lines = again.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pyckpt: the run in {root} already finished (4 steps, last "
                                                   "checkpoint at step 3"), again.stderr
    assert "PYCKPT_RESUME=never trains from scratch" in lines[0]

    fresh = _run(tmp_path, root, PYCKPT_RESUME="never")  # trains from scratch, and is marked again
    assert fresh.returncode == 0 and "TRAINED" in fresh.stdout, fresh.stderr[-2000:]
    assert json.loads((root / "FINISHED.json").read_text())["time"] > marker["time"]
