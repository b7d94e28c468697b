"""pyckpt.disable() with the memory tier: the newest snapshot, held only in /dev/shm, reaches storage
before disable() closes storage's Checkpointer (a closed one takes no copies, and the copy is removed
at the normal end)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import pyckpt
from pyckpt import layout, shm_tier

from transparent_helpers import load, run_script, tree_equal

pytestmark = pytest.mark.skipif(not os.path.isdir(shm_tier.SHM_ROOT), reason="no /dev/shm on this machine")

# 28 steps in one epoch; snapshots every 4 (4..28) to memory, every 3rd of them (12, 24) to storage.
DISABLING = r"""
import sys, torch, pyckpt
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0)
loader = DataLoader(TensorDataset(torch.randn(112, 6), torch.randn(112, 1)), batch_size=4)
model = nn.Linear(6, 1)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
for x, y in loader:
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
pyckpt.disable()
torch.save(model.state_dict(), sys.argv[1])
print("DONE")
"""


@pytest.fixture
def shm(tmp_path):
    path = Path(shm_tier.shm_path(str(tmp_path / "ck")))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_disable_writes_a_snapshot_held_only_in_memory_to_storage(tmp_path, shm):
    (tmp_path / "train.py").write_text(DISABLING)
    ck, out = tmp_path / "ck", tmp_path / "out.pt"
    r = run_script(["train.py", out], tmp_path, PYCKPT_DIR=ck, PYCKPT_EVERY_STEPS="4", PYCKPT_SHM_MB="64",
                   PYCKPT_STORAGE_EVERY="3")
    assert r.returncode == 0 and "DONE" in r.stdout, r.stderr[-3000:]
    assert "pyckpt: warning" not in r.stderr, r.stderr  # "... could not be written ... was closed" before
    assert not shm.exists()  # the normal end still removes the memory copy
    newest = layout.committed(str(ck))[0]
    assert newest.step == 28, [e.step for e in layout.committed(str(ck))]
    saved = pyckpt.load(newest.path)["modules"]["0"]  # the run's final weights, from storage
    assert tree_equal(dict(saved), dict(load(out)))
    assert isinstance(saved["weight"], torch.Tensor)
