"""benchmarks/train_loop.py passes pyckpt's tuning settings to the processes it measures.

Until 2026-12-04 it dropped every PYCKPT_* variable from the modes' environment (so that PYCKPT_DIR
could not turn the transparent layer on in an explicit mode), and with them the settings a run was
meant to compare: runs "with PYCKPT_IO_THREADS=1" measured the defaults, and nothing said so."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import train_loop  # noqa: E402


def test_tuning_settings_reach_the_modes_and_activation_settings_do_not(monkeypatch):
    monkeypatch.setenv("PYCKPT_IO_NICE", "7")
    monkeypatch.setenv("PYCKPT_INCREMENTAL", "0")
    monkeypatch.setenv("PYCKPT_DIR", "/nonexistent/ckpt")
    monkeypatch.setenv("PYCKPT_EVERY_STEPS", "3")
    env = train_loop._child_env()
    assert env["PYCKPT_IO_NICE"] == "7" and env["PYCKPT_INCREMENTAL"] == "0"
    assert "PYCKPT_DIR" not in env and "PYCKPT_EVERY_STEPS" not in env
    assert env["PATH"] == os.environ["PATH"]
    line = train_loop.settings_line()
    assert "PYCKPT_IO_NICE=7" in line and "PYCKPT_INCREMENTAL=0" in line and "PYCKPT_DIR" not in line


def test_every_passed_setting_is_one_pyckpt_knows():
    from pyckpt import knobs

    assert set(train_loop.TUNING) <= set(knobs.KNOBS)
