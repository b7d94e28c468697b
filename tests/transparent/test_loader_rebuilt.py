"""The training loader rebuilt at each epoch with another batch size (progressive batching) or over a dataset
that grows (a curriculum): each epoch's loader has another signature, a new stream to pyckpt. A relaunch
trained the earlier epochs' loaders again before the checkpoint's and was refused ("cannot fast-forward
it"). The loaders of other signatures that fed the optimizer before the snapshot, and their iter() counts,
are kept in the position (``fed_before``); the relaunch passes their epochs without data, as it passes the
training loader's own earlier epochs. A validation loader (it feeds no step) still runs in those epochs."""
from __future__ import annotations

import re
import signal

import pytest
import torch
from torch.utils.data import DataLoader

from tracked_loop import Items, tracking
from transparent_helpers import killed_and_relaunched, load, run_script, tree_equal

SCRIPT = r'''
import os, signal, sys
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

SHAPE = os.environ["SHAPE"]
torch.manual_seed(0)
x, y = torch.randn(48, 6), torch.randn(48, 1)
train, val = TensorDataset(x, y), DataLoader(TensorDataset(torch.randn(12, 6), torch.randn(12, 1)), batch_size=4)
model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.2), nn.Linear(8, 1))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
step, seen, vals = 0, [], []
for epoch in range(4):
    if SHAPE == "batch_size":
        loader = DataLoader(train, batch_size=[4, 6, 6, 8][epoch], shuffle=True)
    else:
        loader = DataLoader(Subset(train, range([16, 24, 36, 48][epoch])), batch_size=4, shuffle=True)
    model.train()
    for xb, yb in loader:
        loss = ((model(xb) - yb) ** 2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        step += 1
        seen.append(xb.sum())
        if str(step) == os.environ.get("KILL_AT") and not os.path.exists(os.environ["KILL_MARK"]):
            open(os.environ["KILL_MARK"], "w").close(); os.kill(os.getpid(), signal.SIGKILL)
    model.eval()
    with torch.no_grad():  # a validation pass: another loader of the same dataset type, feeding no step
        vals.append(torch.stack([((model(xv) - yv) ** 2).mean() for xv, yv in val]).mean())
torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "batches": torch.stack(seen),
            "vals": torch.stack(vals[-2:]), "step": step}, sys.argv[1])
'''


# Killed after step 25: resumed from the snapshot of step 24 (or 20, when 24's commit was not done yet).
# batch_size: 12 + 8 + 8 + 6 steps, step 24 in epoch 2 (the second epoch of batch size 6), step 20 the last of
# epoch 1; curriculum: 4 + 6 + 9 + 12 steps, both in epoch 3.
@pytest.mark.parametrize("shape,epochs", [("batch_size", {24: 2, 20: 1}), ("curriculum", {24: 3, 20: 3})])
def test_a_loader_rebuilt_with_another_batch_size_or_length_each_epoch_resumes_exactly(tmp_path, shape, epochs):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    plain = run_script([script, tmp_path / "plain.pt"], tmp_path, SHAPE=shape, KILL_MARK=tmp_path / "unused")
    assert plain.returncode == 0, plain.stderr
    _, second = killed_and_relaunched(script, tmp_path / "out.pt", tmp_path, kill_at=25, every_steps=4, SHAPE=shape)
    # The epoch printed is the loop's (the earlier loaders' epochs counted), not the loader's own count.
    resumed = re.search(r"pyckpt: resumed from step (\d+) \(epoch (\d+), batch \d+\)", second.stderr)
    assert resumed and int(resumed[1]) in epochs, second.stderr
    epoch = epochs[int(resumed[1])]
    assert int(resumed[2]) == epoch, second.stderr
    skipped = f"epochs 0-{epoch - 1} run" if epoch > 1 else "epoch 0 runs"
    assert f"{skipped} again without data" in second.stderr, second.stderr
    assert "warning" not in second.stderr and "cannot resume" not in second.stderr, second.stderr
    assert tree_equal(load(tmp_path / "out.pt"), load(tmp_path / "plain.pt"))


def _train(sizes, plan=None, stop=None, seed=0):
    """Epoch e iterates a new DataLoader of batch size sizes[e] over the same 23 items, with a step after each
    batch; ``stop``/``plan`` as in tracked_loop.run_tracked."""
    out = []
    with tracking(plan) as (tracker, got):
        torch.manual_seed(seed)
        for e, bs in enumerate(sizes):
            for i, b in enumerate(DataLoader(Items(), batch_size=bs, shuffle=True)):
                out.append((e, b.tolist()))
                tracker._on_step()  # what the session's post-step hook calls
                if stop == (e, i + 1):
                    got["want"], tracker.armed = True, True
    return out, got


def test_a_loader_fed_by_turns_with_the_training_loader_is_not_recorded():
    """Steps drawing from two loaders by turns (tasks mixed): the other loader is in the middle of its epoch
    at the snapshot; skipping its epoch on resume would drop the rest of it, silently. Not recorded: such a
    relaunch is refused as before."""
    with tracking() as (tracker, got):
        a, b = DataLoader(Items(), batch_size=2), DataLoader(Items(), batch_size=3)
        ia, ib = iter(a), iter(b)
        for i in range(6):
            next(ib)
            tracker._on_step()
            next(ia)
            tracker._on_step()
            if i == 3:
                got["want"], tracker.armed = True, True
    pos = got["pos"]
    assert pos["sig"][2] == 3 and "fed_before" not in pos, pos.get("fed_before")  # (the snapshot at next(ib))


def test_a_validation_pass_between_backward_and_step_is_not_recorded():
    """A validation loader iterated whole between backward() and step() is the last fetch before that step,
    one step per pass: not a loader that trained (its epochs would be passed without data on resume)."""
    with tracking() as (tracker, got):
        train, val = DataLoader(Items(), batch_size=2), DataLoader(Items(9), batch_size=3)
        for epoch in range(2):
            for i, _ in enumerate(train):
                if i % 4 == 3:
                    for _ in val:
                        pass
                tracker._on_step()
                if (epoch, i) == (1, 5):
                    got["want"], tracker.armed = True, True
    pos = got["pos"]
    assert pos["sig"][2] == 2 and "fed_before" not in pos, pos.get("fed_before")


def test_the_position_records_the_loaders_that_fed_steps_before_and_the_relaunch_skips_them():
    sizes = (2, 3, 3, 5)
    ref, got = _train(sizes, stop=(2, 4))
    pos = got["pos"]
    assert (pos["sig"][2], pos["epoch"], pos["batch"]) == (3, 2, 4)  # the second epoch of batch size 3
    assert [[s[2], n] for s, n in pos["fed_before"]] == [[2, 1]]
    resumed, _ = _train(sizes, plan=(pos, got["rng"]), seed=99)
    n_before = sum(1 for e, _ in ref if e < 2) + 4
    assert resumed == ref[n_before:]
    # A checkpoint without the record (written before): the batch-size-2 epoch trains again.
    pos = {k: v for k, v in pos.items() if k != "fed_before"}
    resumed, _ = _train(sizes, plan=(pos, got["rng"]), seed=99)
    assert resumed[:12] == [(0, b) for _, b in resumed[:12]] and len(resumed) > len(ref) - n_before


GROWN = r'''
import os, signal, sys
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

n = int(os.environ["N"])  # the training data: more of it in the relaunch
g = torch.Generator().manual_seed(0)
x, y = torch.randn(n, 6, generator=g), torch.randn(n, 1, generator=g)
torch.manual_seed(0)
loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
model = nn.Linear(6, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
step, per_epoch = 0, []
val = DataLoader(TensorDataset(torch.randn(8, 6, generator=g), torch.randn(8, 1, generator=g)), batch_size=4,
                 shuffle=True)  # of the same kinds as the training loader, iterated elsewhere: never taken for it
for epoch in range(3):
    with torch.no_grad():
        vl = sum(((model(xv) - yv) ** 2).mean() for xv, yv in val)
    seen = 0
    for xb, yb in loader:
        loss = ((model(xb) - yb) ** 2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        step += 1
        seen += 1
        if str(step) == os.environ.get("KILL_AT") and not os.path.exists(os.environ["KILL_MARK"]):
            open(os.environ["KILL_MARK"], "w").close(); os.kill(os.getpid(), signal.SIGKILL)
    per_epoch.append(seen)
print("STEPS", step, per_epoch, flush=True)
'''


def test_training_data_grown_between_runs_is_refused_unless_resume_edited_is_tracked(tmp_path):
    """More training data added while the job was down: the training loader has another length, so the
    relaunch cannot replay the run that wrote the checkpoint (refused, one line). With
    PYCKPT_RESUME_EDITED=tracked the loader of the same dataset type, batch size and kind, iterated at the
    same place of the unchanged script, is taken as the training loader: the resume goes on at the
    checkpoint's epoch and batch over the new data (not exact: one line says so). Before, it was refused
    either way, and PYCKPT_RESUME=never lost the weights."""
    script = tmp_path / "train.py"
    script.write_text(GROWN)
    env = dict(N="40", PYCKPT_DIR=tmp_path / "ckpt", PYCKPT_EVERY_STEPS="2", KILL_AT="15",
               KILL_MARK=tmp_path / "mark")
    first = run_script([script], tmp_path, **env)  # 10 steps an epoch; killed in epoch 1
    assert first.returncode == -signal.SIGKILL, first.stderr
    refused = run_script([script], tmp_path, **dict(env, N="48"))
    assert refused.returncode == 2 and "refusing to guess" in refused.stderr, refused.stderr
    assert "removed from) the training data since, PYCKPT_RESUME_EDITED=tracked goes on" in refused.stderr
    run = run_script([script], tmp_path, **dict(env, N="48", PYCKPT_RESUME_EDITED="tracked"))
    assert run.returncode == 0, run.stderr
    resumed = re.search(r"pyckpt: resumed from step (14|12) \(epoch 1, batch ([24])\)", run.stderr)
    assert resumed, run.stderr
    lines = [ln for ln in run.stderr.splitlines() if "the training data changed" in ln]
    assert len(lines) == 1 and "['TensorDataset', 40," in lines[0] and "['TensorDataset', 48," in lines[0], lines
    # The rest of epoch 1 and epoch 2 over 48 samples (12 batches each): the step counter, restored by the
    # tracked resume, ends at the checkpoint's step + the rest.
    done = int(resumed[1])
    assert f"STEPS {done + (12 - int(resumed[2])) + 12} " in run.stdout, run.stdout


WORKERS = r'''
import os, signal, sys
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

g = torch.Generator().manual_seed(0)
x, y = torch.randn(40, 6, generator=g), torch.randn(40, 1, generator=g)
torch.manual_seed(0)
loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, num_workers=int(os.environ["W"]))
model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.2), nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
step = 0
for epoch in range(3):
    for xb, yb in loader:
        loss = ((model(xb) - yb) ** 2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        step += 1
        if str(step) == os.environ.get("KILL_AT") and not os.path.exists(os.environ["KILL_MARK"]):
            open(os.environ["KILL_MARK"], "w").close(); os.kill(os.getpid(), signal.SIGKILL)
torch.save({"model": model.state_dict(), "step": step}, sys.argv[1])
'''


def test_a_relaunch_with_another_worker_count_is_told_so_and_goes_on_with_resume_edited_tracked(tmp_path):
    """The training loader's ``num_workers`` changed between the runs (a relaunch on a node with fewer cores).
    The refusal used to blame another length or batch size and offer only to start over; it now names the
    worker counts and the two ways on. With PYCKPT_RESUME_EDITED=tracked the loader that differs only in its
    worker count is taken as the training loader: the same batches in the same order (the sampler draws in this
    process), so over a dataset drawing nothing in its workers the result is the plain run's, bit for bit."""
    script = tmp_path / "train.py"
    script.write_text(WORKERS)
    plain = run_script([script, tmp_path / "plain.pt"], tmp_path, W="0")
    assert plain.returncode == 0, plain.stderr
    env = dict(W="2", PYCKPT_DIR=tmp_path / "ckpt", PYCKPT_EVERY_STEPS="2", KILL_AT="15", KILL_MARK=tmp_path / "mark")
    first = run_script([script, tmp_path / "out.pt"], tmp_path, **env)
    assert first.returncode == -signal.SIGKILL, first.stderr
    refused = run_script([script, tmp_path / "out.pt"], tmp_path, **dict(env, W="1"))
    assert refused.returncode == 2 and "refusing to guess" in refused.stderr, refused.stderr
    assert ("the training loader has num_workers=1 now, 2 in the run that wrote the checkpoint: relaunch with "
            "num_workers=2 to resume exactly, or set PYCKPT_RESUME_EDITED=tracked") in refused.stderr, refused.stderr
    assert "another length or batch size" not in refused.stderr
    run = run_script([script, tmp_path / "out.pt"], tmp_path, **dict(env, W="1", PYCKPT_RESUME_EDITED="tracked"))
    assert run.returncode == 0, run.stderr
    assert re.search(r"pyckpt: resumed from step 1[24] \(epoch 1, batch [24]\)", run.stderr), run.stderr
    lines = [ln for ln in run.stderr.splitlines() if "num_workers" in ln]
    assert len(lines) == 1 and "2 in the checkpoint's run, 1 now" in lines[0] and "not exact" in lines[0], lines
    assert tree_equal(load(tmp_path / "out.pt"), load(tmp_path / "plain.pt"))
