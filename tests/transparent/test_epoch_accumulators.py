"""Per-epoch code that reads what the loader loop accumulated (``total / seen``, ``running_corrects.double()``
of PyTorch's transfer-learning tutorial, ``sum(losses) / len(losses)``) in the epochs a relaunch runs again
without data. Those accumulators are set before the loop, so they still held their start there (0, an int, an
empty list): every relaunch past the first epoch died of ZeroDivisionError or AttributeError. A snapshot now
records which variables the loop changed in its epoch (pyckpt/loopstate.py ``changed_since``), and the relaunch
binds them to the checkpoint's values at the end of such an epoch (``bind_unset``), as it binds those only the
loop sets; the restore point then writes everything as before."""
from __future__ import annotations

import re
import sys

import pytest

from pyckpt import frames, loopstate

from transparent_helpers import plain_and_relaunched, tree_equal

SCRIPT = r'''
import os, signal, sys
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(0)
loader = DataLoader(TensorDataset(torch.randn(40, 6), torch.randint(0, 2, (40,))), batch_size=4, shuffle=True)
model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.2), nn.Linear(8, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
step, hist = 0, []


def train_epoch():
    global step
    running_corrects, losses = 0, []
    for xb, yb in loader:
        out = model(xb)
        loss = nn.functional.cross_entropy(out, yb)
        opt.zero_grad(); loss.backward(); opt.step()
        step += 1
        running_corrects += torch.sum(out.argmax(1) == yb)
        losses.append(loss.item())
        if str(step) == os.environ.get("KILL_AT") and not os.path.exists(os.environ["KILL_MARK"]):
            open(os.environ["KILL_MARK"], "w").close(); os.kill(os.getpid(), signal.SIGKILL)
    return running_corrects.double() / 40, sum(losses) / len(losses)


for epoch in range(4):
    if os.environ.get("WHERE") == "function":
        acc, mean = train_epoch()
    else:
        total, seen = 0.0, 0
        for xb, yb in loader:
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad(); loss.backward(); opt.step()
            step += 1
            total += loss.item() * len(xb); seen += len(xb)
            if str(step) == os.environ.get("KILL_AT") and not os.path.exists(os.environ["KILL_MARK"]):
                open(os.environ["KILL_MARK"], "w").close(); os.kill(os.getpid(), signal.SIGKILL)
        acc, mean = 0.0, total / seen
    hist.append((epoch, float(acc), mean))
torch.save({"model": model.state_dict(), "hist": hist, "step": step}, sys.argv[1])
'''


@pytest.mark.parametrize("where", ["module", "function"])
def test_per_epoch_code_reading_the_loops_accumulators_survives_the_epochs_run_without_data(tmp_path, where):
    second, plain, out = plain_and_relaunched(SCRIPT, tmp_path, kill_at=30, every_steps=4, WHERE=where)
    assert "pyckpt: epochs 0-1 run again without data" in second.stderr, second.stderr
    assert re.search(r"resumed from step (24|28) \(epoch 2, ", second.stderr), second.stderr
    assert tree_equal(out, plain)


def _loop(record):
    epoch_count, config = 0, {"lr": 0.1}
    for epoch in range(2):
        total, seen, losses = 0.0, 0, []
        record.append(loopstate.marks(frames.user_frames(sys._getframe())))
        for x in [1.0, 2.0]:
            total += x
            seen += 1
            losses.append(x)
        record.append(loopstate.changed_since(record[-1], frames.user_frames(sys._getframe())))
        epoch_count += 1
    return config


def test_the_variables_the_loop_changed_since_its_epoch_began_are_named_and_no_others():
    record: list = []
    _loop(record)
    for changed in (record[1], record[3]):  # each epoch's, in _loop's frame (the innermost)
        names = set(changed["locals"][-1]) - {"record"}  # (the test's own list, appended to in the loop)
        # The accumulators, not the epoch, the epoch counter the loop leaves alone or the settings; the loop's
        # own variable is unbound at the first epoch's start (bound where unbound anyway) and ends each epoch at
        # the same value.
        assert names == {"losses", "seen", "total"}, changed
    assert loopstate.changed_since(None, []) is None


FLUSH = r'''
import os, signal, sys, time
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(0)
loader = DataLoader(TensorDataset(torch.randn(44, 6), torch.randn(44, 1)), batch_size=4, shuffle=True)
model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.2), nn.Linear(8, 1))
opt = torch.optim.AdamW(model.parameters(), lr=0.05)
accum, step = 4, 0
for epoch in range(4):
    for i, (xb, yb) in enumerate(loader):
        (((model(xb) - yb) ** 2).mean() / accum).backward()
        if (i + 1) % accum == 0:
            opt.step(); opt.zero_grad(); step += 1
            if str(step) == os.environ.get("KILL_AT") and not os.path.exists(os.environ["KILL_MARK"]):
                time.sleep(1.5)  # the snapshot taken at this epoch's first fetch commits first
                open(os.environ["KILL_MARK"], "w").close(); os.kill(os.getpid(), signal.SIGKILL)
    if (i + 1) % accum != 0:  # the epoch's leftover micro-batches (11 a epoch: 3 left)
        opt.step(); opt.zero_grad(); step += 1
torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, sys.argv[1])
'''


@pytest.mark.parametrize("kill_at", [7, 8])
def test_an_accumulation_flush_after_the_loop_in_an_epoch_run_without_data_is_not_taken_for_training(tmp_path,
                                                                                                   kill_at):
    """Gradient accumulation whose leftover micro-batches are stepped after the loader loop: in an epoch the
    relaunch runs without data that step came before the restore point, and the relaunch was refused ("the
    optimizer stepped before the training loader reached the checkpoint's position"). A step right after such
    an epoch's end, with no fetch since, is the run's per-epoch code: passed, the restore point overwrites it."""
    second, plain, out = plain_and_relaunched(FLUSH, tmp_path, kill_at=kill_at, every_steps=1)
    # kill_at 7: the checkpoint right after epoch 1's leftover step (6), taken at epoch 2's first fetch; 8: step 7's
    assert f"resumed from step {kill_at - 1} (epoch 2, batch {0 if kill_at == 7 else 4})" in second.stderr, \
        second.stderr
    assert tree_equal(out, plain)
