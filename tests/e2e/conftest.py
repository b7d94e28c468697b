"""Fixtures for the end-to-end kill/resume tests.

The process utilities live in ``examples/_harness.py`` (the demo uses them
too); this file puts ``examples/`` on ``sys.path``, kills whatever a test left
running, checks once that the installed pyckpt is importable by a fresh
interpreter, and caches the plain (never checkpointed) reference run of each
example script for the session.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import _harness  # noqa: E402
import e2e_helpers  # noqa: E402
from forked import patched  # noqa: E402,F401 - the fixture


@pytest.fixture(scope="module", autouse=True)
def _forked_launches(patched):
    """``python script.py`` commands forked from the session's zygote (tests/forked.py): the same
    processes without each one's start-up (``import torch``), which was most of these tests' time."""
    yield


@pytest.fixture(autouse=True)
def _kill_leftovers():
    """Whatever happens in a test, no training process outlives it."""
    yield
    _harness.cleanup_all()


def _require_importable(statement: str) -> None:
    probe = subprocess.run([sys.executable, "-c", statement], capture_output=True, text=True,
                           timeout=120, env=_harness.clean_env())
    if probe.returncode != 0:
        pytest.fail(f"`{statement}` fails in a fresh interpreter; is pyckpt installed "
                    f"(`pip install -e .`)?\n{probe.stderr[-2000:]}")


@pytest.fixture(scope="session")
def pyckpt_installed() -> None:
    """Transparent mode needs pyckpt installed (its .pth start-up hook)."""
    _require_importable("import pyckpt.activation")


@pytest.fixture(scope="session")
def pyckpt_run_installed(pyckpt_installed) -> None:
    """The wrapper tests also need ``pyckpt.run`` (the ``pyckpt-run`` command)."""
    _require_importable("import pyckpt.run")


@pytest.fixture(scope="session")
def references(tmp_path_factory) -> e2e_helpers.References:
    """Plain runs of each example, made once per session on first use."""
    return e2e_helpers.References(tmp_path_factory.mktemp("references"))
