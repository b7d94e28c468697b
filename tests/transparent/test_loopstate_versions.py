"""pyckpt/frames.py (the interpreter-specific part of loop state) on every CPython 3.9-3.13 found
on this machine: frames.py needs no torch, so each interpreter runs ``frames_probe.py`` on it.

Loop iterator positions are read from the frame's value stack (``_PyInterpreterFrame`` on
3.11-3.13, ``PyFrameObject`` on 3.9 and 3.10) and put back by consuming the iterator and writing an
enumerate index; writing locals must work on all of them."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
FRAMES = HERE.parents[1] / "pyckpt" / "frames.py"


def _interpreter(minor: int) -> str | None:
    if sys.version_info[:2] == (3, minor):
        return sys.executable
    found = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/3.{minor}.*/bin/python3.{minor}")))
    return found[-1] if found else shutil.which(f"python3.{minor}")


@pytest.mark.parametrize("minor", [9, 10, 11, 12, 13])
def test_frames_on_each_python(minor):
    exe = _interpreter(minor)
    if exe is None:
        pytest.skip(f"no python3.{minor} on this machine")
    r = subprocess.run([exe, str(HERE / "frames_probe.py"), str(FRAMES)], capture_output=True, text=True,
                       timeout=60, env={k: v for k, v in os.environ.items() if k != "PYENV_VERSION"})
    if r.returncode != 0 and "pyenv" in r.stderr:
        pytest.skip(f"python3.{minor} is not runnable here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    checks = out["checks"]
    assert checks["write_locals"] and checks["enumerate index"] and checks["position/code_key"], out
    assert checks["active_loops"], out
    assert out["supported"] and checks["nested loops"] and checks["generator frame"], out
    assert checks["restore position"] and checks["cell argument"], out
