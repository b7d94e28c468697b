"""What a loader's epoch draws from at its ``iter()`` and first fetch (pyckpt/loader_state.py ``_epoch_rng``): a relaunch that
skips epochs must start the resumed epoch from the same state, including Python's and NumPy's random
streams and a sampler's own epoch counter, or its batches differ from the killed run's (silently)."""
from __future__ import annotations

import re

import pytest

from transparent_helpers import killed_and_relaunched, load, run_script, tree_equal

SCRIPT = r'''
import os, random, signal, sys
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Sampler, TensorDataset

SHAPE = os.environ["SHAPE"]


class PyShuffledBatches(Sampler):  # length bucketing style: Python's random shuffles the batches
    def __init__(self, n, bs): self.n, self.bs = n, bs
    def __iter__(self):
        idx = list(range(self.n)); random.shuffle(idx)
        batches = [idx[i:i + self.bs] for i in range(0, self.n, self.bs)]
        random.shuffle(batches)
        return iter(batches)
    def __len__(self): return (self.n + self.bs - 1) // self.bs


class OwnEpochSampler(Sampler):  # reshuffles from its own counter: no set_epoch() from the script
    def __init__(self, n): self.n, self.epoch = n, 0
    def __iter__(self):
        g = torch.Generator().manual_seed(self.epoch); self.epoch += 1
        return iter(torch.randperm(self.n, generator=g).tolist())
    def __len__(self): return self.n


class Stream(IterableDataset):  # shuffles with NumPy in the main process
    def __init__(self, x, y): self.x, self.y = x, y
    def __iter__(self):
        for i in np.random.permutation(len(self.x)).tolist():
            yield self.x[i], self.y[i]


random.seed(0); np.random.seed(0); torch.manual_seed(0)
x, y = torch.randn(40, 6), torch.randn(40, 1)
if SHAPE == "python_random":
    loader = DataLoader(TensorDataset(x, y), batch_sampler=PyShuffledBatches(40, 4))
elif SHAPE == "zip":  # two shuffling loaders, no workers: each draws its permutation at its first fetch
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    other = DataLoader(TensorDataset(torch.randn(60, 6), torch.randn(60, 1)), batch_size=5, shuffle=True)
elif SHAPE == "val_first":
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    val_loader = DataLoader(TensorDataset(torch.randn(24, 6), torch.randn(24, 1)), batch_size=8, shuffle=True)
elif SHAPE == "own_epoch":
    loader = DataLoader(TensorDataset(x, y), batch_size=4, sampler=OwnEpochSampler(40))
else:
    loader = DataLoader(Stream(x, y), batch_size=4)
model = nn.Linear(6, 1)
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
step, seen = 0, []
for epoch in range(3):
    batches = zip(loader, other) if SHAPE == "zip" else iter(loader)
    if SHAPE == "val_first":  # a validation pass between the epoch's iter() and its first fetch
        with torch.no_grad():
            val = sum(model(xv).sum() for xv, _ in val_loader)
    for item in batches:
        (xb, yb), (xo, _) = item if SHAPE == "zip" else (item, item)
        loss = ((model(xb + xo[:4]) - yb) ** 2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        step += 1
        seen.append(xb.sum())
        if str(step) == os.environ.get("KILL_AT") and not os.path.exists(os.environ["KILL_MARK"]):
            open(os.environ["KILL_MARK"], "w").close(); os.kill(os.getpid(), signal.SIGKILL)
torch.save({"model": model.state_dict(), "last_batches": torch.stack(seen[-5:])}, sys.argv[1])
'''


# numpy_iterable resumed exactly before this file's fixes too (coverage of that shape, not of a fix); the
# others drew another order after a resume.
@pytest.mark.parametrize("shape", ["python_random", "own_epoch", "numpy_iterable", "zip", "val_first"])
def test_a_resume_into_a_later_epoch_draws_that_epochs_batches(tmp_path, shape):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    plain = run_script([script, tmp_path / "plain.pt"], tmp_path, SHAPE=shape, KILL_MARK=tmp_path / "unused")
    assert plain.returncode == 0, plain.stderr
    _, second = killed_and_relaunched(script, tmp_path / "out.pt", tmp_path, kill_at=28, every_steps=4, SHAPE=shape)
    assert re.search(r"pyckpt: resumed from step (24|20) \(epoch [12], batch \d+\)", second.stderr), second.stderr
    assert tree_equal(load(tmp_path / "out.pt"), load(tmp_path / "plain.pt"))
