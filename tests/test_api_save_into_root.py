"""``pyckpt.save`` to a ``step-*`` directory of a Checkpointer root (pyckpt/api.py): it must not
replace a checkpoint whose data files newer checkpoints reference (docs/FORMAT.md §7 step 6), nor
write into a root whose directory lock another writer holds."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import pyckpt
from pyckpt.errors import PyckptError

N = 1 << 18  # 1 MiB of float32: one chunk each with PYCKPT_CHUNK_MB=1
FIRST = "step-000000001"


def _state(step: int) -> dict:
    """A frozen base (written by save 1, referenced by saves 2 and 3) and a tensor that trains."""
    return {"frozen": torch.randn(N, generator=torch.Generator().manual_seed(0)), "t": torch.full((N,), float(step))}


def _three_saves(root: str) -> None:
    with pyckpt.Checkpointer(root, keep=3) as ck:
        for s in (1, 2, 3):
            ck.save(s, _state(s)).result(60)
    assert {i.name: i.referenced_by for i in pyckpt.list(root)}[FIRST] == ("step-000000002", "step-000000003")


def _all_sound(root: str) -> list[str]:
    return sorted(i.name for i in pyckpt.list(root, verify=True) if i.complete and i.sound)


@pytest.fixture
def one_mib_chunks(knob_env):
    knob_env(PYCKPT_CHUNK_MB=1)


def test_save_over_a_checkpoint_newer_ones_reference_is_refused(ckpt_root, one_mib_chunks):
    _three_saves(ckpt_root)
    with pytest.raises(PyckptError, match="step-000000003, step-000000002") as e:
        pyckpt.save({"frozen": torch.zeros(N), "t": torch.zeros(N)}, os.path.join(ckpt_root, FIRST))
    assert "read chunks from its data files" in str(e.value)
    assert _all_sound(ckpt_root) == [FIRST, "step-000000002", "step-000000003"]
    assert torch.equal(pyckpt.load(os.path.join(ckpt_root, FIRST))["t"], _state(1)["t"])
    assert not [n for n in os.listdir(ckpt_root) if ".tmp-" in n]


def test_save_into_a_root_another_process_holds_is_refused(ckpt_root, one_mib_chunks):
    _three_saves(ckpt_root)
    with subprocess.Popen([sys.executable, "-c", "import sys, pyckpt; ck = pyckpt.Checkpointer(sys.argv[1]); "
                           "print('ready', flush=True); sys.stdin.read()", ckpt_root],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as job:  # the job
        assert job.stdout.readline().strip() == "ready"
        for name in ("step-000000004", "step-000000003"):  # a new step, and one nothing references
            with pytest.raises(PyckptError, match=f"is in use by pid {job.pid} "):
                pyckpt.save(_state(4), os.path.join(ckpt_root, name))
        job.stdin.close()  # the job ends
    assert sorted(n for n in os.listdir(ckpt_root) if n.startswith("step-")) == [FIRST, "step-000000002",
                                                                                "step-000000003"]
    assert _all_sound(ckpt_root) == [FIRST, "step-000000002", "step-000000003"]


def test_save_into_a_root_a_checkpointer_of_this_process_holds_is_refused(ckpt_root, one_mib_chunks):
    with pyckpt.Checkpointer(ckpt_root, keep=3) as ck:
        ck.save(1, _state(1)).result(60)
        with pytest.raises(PyckptError, match="already used by another Checkpointer in this process"):
            pyckpt.save(_state(2), os.path.join(ckpt_root, "step-000000002"))
        ck.save(2, _state(2)).result(60)  # the job's own saves go on
    assert _all_sound(ckpt_root) == [FIRST, "step-000000002"]
