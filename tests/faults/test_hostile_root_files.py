"""The files pyckpt keeps beside its checkpoints (``metrics.jsonl``, ``FINISHED.json``, the memory tier's
token, a checkpoint's ``pyckpt-monitor.json``): a FIFO, a device or a link planted there never hangs
training, a relaunch, retention or `pyckpt stats`, and what pyckpt cannot use is said in one line.

Each of them was opened with a plain ``open()``: a FIFO blocked it until a writer or reader came, which
never does (a relaunch stopped before its first step; a save's commit thread, and so every later
save, stopped at its metrics line), and a link to ``/dev/zero`` was read without end."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import pyckpt
import zygote
from pyckpt import metrics


def _plant(path: Path, kind: str) -> None:
    if path.exists() or path.is_symlink():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        os.symlink("/dev/zero", path)


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_a_save_and_a_restore_go_on_past_a_metrics_file_that_is_not_a_regular_file(tmp_path, kind):
    root = tmp_path / "root"
    root.mkdir()
    _plant(root / metrics.METRICS_FILE, kind)
    code = ("import sys, torch, pyckpt\n"
            "ck = pyckpt.Checkpointer(sys.argv[1], keep=2)\n"
            "for step in (1, 2):\n"
            "    print('committed', ck.save(step, {'x': torch.full((4,), float(step))}).result(60), flush=True)\n"
            "state = ck.restore().state\n"
            "print('restored', state['x'].tolist(), flush=True)\n")
    try:  # a real process (forked by the session's zygote), killed if it hangs
        r = zygote.shared().run(code, [root], env=dict(os.environ), timeout=60)
    except TimeoutError:
        pytest.fail(f"a {kind} as metrics.jsonl hung a save or a restore")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("committed ") == 2 and "restored [2.0, 2.0, 2.0, 2.0]" in r.stdout
    said = [line for line in r.stderr.splitlines() if "metrics.jsonl" in line]
    assert len(said) == 1 and "not a regular file" in said[0], r.stderr  # once, not at every save


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_pyckpt_stats_refuses_a_metrics_file_that_is_not_a_regular_file(tmp_path, kind):
    root = tmp_path / "root"
    root.mkdir()
    _plant(root / metrics.METRICS_FILE, kind)
    try:
        r = zygote.shared().run_module("pyckpt.cli", ["stats", root], env=dict(os.environ), timeout=60)
    except TimeoutError:
        pytest.fail(f"pyckpt stats hung on a {kind} as metrics.jsonl")
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyckpt stats: ") and "not a regular file" in lines[0], r.stderr


def test_a_metrics_line_longer_than_any_record_is_skipped_without_being_read_whole(tmp_path):
    """A line is read up to the longest record pyckpt writes; the rest of a longer one is skipped in
    pieces (a 32 MiB line without a newline was read into memory whole)."""
    import tracemalloc

    rec = b'{"event":"save","step":3,"ok":true,"time":1.5}\n'
    with open(tmp_path / metrics.METRICS_FILE, "wb") as f:
        f.write(rec + b"x" * (32 << 20) + b"\n" + rec)
    tracemalloc.start()
    try:
        records, bad = metrics.read(str(tmp_path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r["step"] for r in records] == [3, 3] and bad == 1
    assert peak < 4 * metrics._MAX_LINE, peak


def test_retention_by_a_monitored_value_goes_on_past_a_fifo_as_a_checkpoints_monitor_file(tmp_path):
    root = tmp_path / "root"
    code = ("import sys, torch, pyckpt, pathlib, os\n"
            "vals = iter([5.0, 1.0, 4.0, 3.0, 2.0])\n"
            "ck = pyckpt.Checkpointer(sys.argv[1], keep=1, keep_best=1, monitor=lambda: next(vals))\n"
            "ck.save(1, {'x': torch.full((2,), 1.0)}).result(60)\n"
            "ck.save(2, {'x': torch.full((2,), 2.0)}).result(60)\n"
            "m = pathlib.Path(sys.argv[1], 'step-000000002', 'pyckpt-monitor.json'); m.unlink(); os.mkfifo(m)\n"
            "for step in (3, 4, 5):\n"
            "    ck.save(step, {'x': torch.full((2,), float(step))}).result(60)\n"  # no chunk referenced
            "print(sorted(p.name for p in pathlib.Path(sys.argv[1]).glob('step-*')), flush=True)\n")
    try:
        r = zygote.shared().run(code, [root], env=dict(os.environ), timeout=60)
    except TimeoutError:
        pytest.fail("a FIFO as pyckpt-monitor.json hung retention")
    assert r.returncode == 0, r.stderr
    # Step 2's value cannot be read: it is ranked as having none; the best readable one (step 5's 2.0) and
    # the newest are kept.
    assert "['step-000000005']" in r.stdout, r.stdout


def test_a_regular_metrics_file_is_still_appended_and_read(tmp_path):
    ck = pyckpt.Checkpointer(tmp_path / "root", keep=2)
    for step in (1, 2):
        ck.save(step, {"x": torch.ones(3)}).result(60)
    ck.close()
    records, bad = metrics.read(str(tmp_path / "root"))
    assert [r["step"] for r in records if r["event"] == "save"] == [1, 2] and bad == 0
