"""Helpers for the command-line tests: the CLI always runs as a real subprocess (forked by the
session's zygote, torch already imported; test_cli.py runs `python -m pyckpt` from a fresh interpreter)."""
from __future__ import annotations

import os

import pytest

import zygote


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> zygote.Child:
    """``python -m pyckpt ARGS`` with captured output (stderr is a file, not a terminal):
    ``returncode``, ``stdout``, ``stderr`` as from ``subprocess.run``."""
    full_env = dict(os.environ, **(env or {}))
    return zygote.shared().run_module("pyckpt", list(args), env=full_env, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli
