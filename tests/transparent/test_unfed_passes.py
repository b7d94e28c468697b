"""Passes over the training loader that feed no optimizer step: an evaluation of the training data in per-epoch code
(``check_accuracy(train_loader, model)`` after each epoch, as many tutorials write it), the same check before
training, one that stops after a few batches, in a loop that updates the weights by hand too. Such a pass is an ``iter()`` of the training loader's signature, so a
relaunch passed it without data like the epochs around it, its function's counters stayed at zero, and
``num_correct / num_samples`` killed every relaunch past epoch 0 (or at once, for a check before training). The
position now records those passes (``unfed``) and the relaunch runs them with their data (pyckpt/loader_state.py
``_run_unfed``); the resume line's epoch leaves them out."""
from __future__ import annotations

import re
import signal

import pytest

from pyckpt import loader_state

from transparent_helpers import load, plain_and_relaunched, run_script, tree_equal

SCRIPT = r'''
import os, signal, sys
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

SHAPE = os.environ["SHAPE"]


class Noisy(TensorDataset):
    def __getitem__(self, i):  # augmentation drawn where the batch is loaded (a worker, with SHAPE=workers)
        x, y = super().__getitem__(i)
        return x + 0.01 * torch.randn_like(x), y


torch.manual_seed(0)
workers = 2 if SHAPE == "workers" else 0
n = int(os.environ.get("SAMPLES", 40))
train_loader = DataLoader(Noisy(torch.randn(n, 6), torch.randint(0, 2, (n,))), batch_size=4, shuffle=True,
                          num_workers=workers, persistent_workers=bool(workers))
model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.2), nn.Linear(8, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
step, hist = 0, []


def check_accuracy(loader, model):
    num_correct, num_samples = 0, 0
    model.eval()
    with torch.no_grad():
        for i, (x, y) in enumerate(loader):
            if SHAPE == "break" and i == 3:
                break
            num_correct += (model(x).argmax(1) == y).sum()
            num_samples += x.size(0)
    model.train()
    return float(num_correct / num_samples)


if SHAPE == "before":
    hist.append(check_accuracy(train_loader, model))
for epoch in range(4):
    for x, y in train_loader:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward()
        if SHAPE == "by hand":  # no optimizer step: pyckpt counts the steps at backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.05 * p.grad
        else:
            opt.step()
        step += 1
        if str(step) == os.environ.get("KILL_AT") and not os.path.exists(os.environ["KILL_MARK"]):
            open(os.environ["KILL_MARK"], "w").close(); os.kill(os.getpid(), signal.SIGKILL)
    hist.append(check_accuracy(train_loader, model))
torch.save({"model": model.state_dict(), "hist": hist, "step": step}, sys.argv[1])
'''


# "by hand": the epochs of a loop with no optimizer step fed steps too (counted at backward()): none of them is run
# with its data, which the relaunch would refuse (the weights updated before the restore point).
@pytest.mark.parametrize("shape", ["after", "before", "break", "workers", "by hand"])
def test_an_evaluation_pass_over_the_training_loader_runs_with_its_data_on_the_relaunch(tmp_path, shape):
    second, plain, out = plain_and_relaunched(SCRIPT, tmp_path, kill_at=30, every_steps=4, SHAPE=shape)
    # The loop's epoch: the passes in between are not counted as epochs (the position's iter() count is 5 or 6).
    assert re.search(r"resumed from step (24|28) \(epoch 2, ", second.stderr), second.stderr
    assert "pyckpt: epochs 0-1 run again without data" in second.stderr, second.stderr
    said = re.findall(r"pyckpt: the passes over loader .* that fed no optimizer step in the run", second.stderr)
    assert len(said) == 1, second.stderr
    assert tree_equal(out, plain)


def test_the_training_data_changed_goes_on_at_the_loops_epoch(tmp_path):
    """PYCKPT_RESUME_EDITED=tracked over data of another length: the line names the loop's epoch (2), not the
    training loader's iter() count (5: its evaluation passes counted), and the passes run with the new data."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = dict(SHAPE="after", PYCKPT_DIR=tmp_path / "ckpt", PYCKPT_EVERY_STEPS="4", KILL_AT="30",
               KILL_MARK=tmp_path / "mark", PYCKPT_RESUME_EDITED="tracked")
    assert run_script([script, tmp_path / "out.pt"], tmp_path, **env).returncode == -signal.SIGKILL
    second = run_script([script, tmp_path / "out.pt"], tmp_path, SAMPLES="44", **env)
    assert second.returncode == 0, second.stderr
    assert re.search(r"warning: the training data changed since the checkpoint: .* goes on at its epoch 2, batch "
                     r"(4|8) over the new data", second.stderr), second.stderr
    assert re.search(r"resumed from step (24|28) \(epoch 2, ", second.stderr), second.stderr
    assert len(load(tmp_path / "out.pt")["hist"]) == 4


def test_the_record_of_passes_that_fed_no_step_is_checked_before_it_is_used(capfd):
    said = set(loader_state._SAID)
    loader_state._SAID.clear()
    try:
        good = {"epoch": 6, "unfed": [[2, 10, 1], [4, 3, 0]], "unfed_count": 3}
        assert loader_state._unfed(good) == ({2: (10, 1), 4: (3, 0)}, 3)
        assert loader_state.loop_epoch(good) == 2  # iter() number 6, less the 3 passes that fed nothing
        assert capfd.readouterr().err == ""
        for bad in ([[6, 10, 1]], [[0, 10, 1]], [[2, 0, 1]], [[2, 10, 2]], [[2, 10, True]], [["2", 10, 1]],
                    [[2, 10]], "x", [[2, 10, 1], [3, 1, 1]]):
            loader_state._SAID.clear()
            assert loader_state._unfed({"epoch": 6, "unfed": bad, "unfed_count": 1}) == ({}, 0), bad
            lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("pyckpt:")]
            assert len(lines) == 1 and "malformed" in lines[0] and "no optimizer step" in lines[0], (bad, lines)
        assert loader_state._unfed({"epoch": 6, "unfed": [[2, 10, 1]], "unfed_count": 6}) == ({}, 0)
    finally:
        loader_state._SAID.clear()
        loader_state._SAID.update(said)
