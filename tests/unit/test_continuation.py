"""pyckpt/continuation.py: whether two calls of one code object continue the same way (the restore
of a prefetcher's ``next()`` at its call before the loop, for a snapshot at its call at the end of
the loop body). The cases (continuation_cases.py) run here and on each CPython 3.11-3.13 found, whose
opcodes differ (POP_JUMP_FORWARD/BACKWARD_IF_* on 3.11, POP_JUMP_IF_* and JUMP_BACKWARD after, TO_BOOL
on 3.13)."""
from __future__ import annotations

import dis
import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from continuation_cases import APEX, CASES, run, sites
from pyckpt import continuation

HERE = Path(__file__).parent
PACKAGE = HERE.parents[1] / "pyckpt"


def _expected() -> dict[str, bool]:
    out = {}
    for name, (_, same) in CASES.items():
        out[name] = out[name + " (reversed)"] = same
    out["walk limit"] = False
    out["cache entries"] = True
    return out


def test_accepted_and_refused_call_sites():
    assert run(continuation) == _expected()


def test_a_call_site_is_the_same_as_itself():
    code, a, _ = sites(APEX)
    assert continuation.same_after(code, a, a)


def test_offsets_that_are_not_calls_are_refused():
    code, a, b = sites(APEX)
    after_b = min(i.offset for i in dis.get_instructions(code) if i.offset > b)  # UNPACK_SEQUENCE
    assert not continuation.same_after(code, a, after_b)
    assert not continuation.same_after(code, a, len(code.co_code))


def _interpreter(minor: int) -> str | None:
    if sys.version_info[:2] == (3, minor):
        return sys.executable
    found = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/3.{minor}.*/bin/python3.{minor}")))
    return found[-1] if found else shutil.which(f"python3.{minor}")


@pytest.mark.parametrize("minor", [11, 12, 13])
def test_cases_on_each_python(minor):
    exe = _interpreter(minor)
    if exe is None:
        pytest.skip(f"no python3.{minor} on this machine")
    r = subprocess.run([exe, str(HERE / "continuation_cases.py"), str(PACKAGE)], capture_output=True, text=True,
                       timeout=60, env={k: v for k, v in os.environ.items() if k != "PYENV_VERSION"})
    if r.returncode != 0 and "pyenv" in r.stderr:
        pytest.skip(f"python3.{minor} is not runnable here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == _expected()
