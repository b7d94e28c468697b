"""What a multi-rank resume says: a line about the whole job comes once (rank 0), not once per rank."""
from __future__ import annotations

import subprocess
import sys

import pytest

from pyckpt import layout

from transparent_helpers import HERE, clean_env

DDP = HERE / "train_ddp.py"


def _torchrun(tmp_path, out, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           DDP, out], env=clean_env(**env), capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)


@pytest.mark.dist
@pytest.mark.slow
def test_a_changed_command_line_is_said_once_on_two_ranks(tmp_path):
    env = dict(PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="10")
    first = _torchrun(tmp_path, tmp_path / "a.pt", **env)
    assert first.returncode == 0, first.stderr[-3000:]
    # Another output path: the script's loop state (with its command line) is restored as it was then.
    second = _torchrun(tmp_path, tmp_path / "b.pt", PYCKPT_RESUME=tmp_path / "ck" / layout.step_dir_name(20), **env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stderr.count("pyckpt: resumed from step 20 ") == 1, second.stderr[-3000:]
    lines = [x for x in second.stderr.splitlines() if "the command line differs" in x]
    assert len(lines) == 1, second.stderr[-3000:]
    assert lines[0].startswith("pyckpt: warning: the command line differs") and "b.pt" in lines[0], lines[0]
