"""Helpers for the command-line tests: the CLI always runs as a real subprocess."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m pyckpt ARGS`` with captured output (stderr is a pipe, not a terminal)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "pyckpt", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


@pytest.fixture
def cli():
    return run_cli
