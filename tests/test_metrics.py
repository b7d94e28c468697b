"""Metrics lines, on_checkpoint, pyckpt.list, the finished marker, keep_best selection, `pyckpt stats`."""
from __future__ import annotations

import json
import os

import pytest
import torch

import pyckpt
import zygote
from pyckpt import catalog, metrics


def _pyckpt(*args: str):
    """``python -m pyckpt ARGS`` in a real process (forked by the session's zygote), finished."""
    return zygote.shared().run_module("pyckpt", list(args), env=dict(os.environ))


def _lines(root: str) -> list[dict]:
    with open(os.path.join(root, metrics.METRICS_FILE)) as f:
        return [json.loads(ln) for ln in f]


def _data_files_size(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files if f.startswith("data-"))
    return total


def test_one_line_per_save_consistent_with_the_files(ckpt_root):
    seen = []
    handle = pyckpt.on_checkpoint(seen.append)
    try:
        with pyckpt.Checkpointer(ckpt_root, keep=5, compress="zstd") as ck:
            fut = ck.save(10, {"z": torch.zeros(200_000), "r": torch.randn(1000)})
            fut.captured()
            p10 = fut.result(60)
            p20 = ck.save(20, {"z": torch.zeros(10)}).result(60)
    finally:
        handle.remove()
    lines = _lines(ckpt_root)
    assert [(r["event"], r["step"], r["ok"], r["path"]) for r in lines] == [
        ("save", 10, True, p10), ("save", 20, True, p20)]
    assert seen == lines  # the callback gets exactly the record that was written
    r = lines[0]
    assert r["bytes_written"] == _data_files_size(p10) > 0
    assert r["bytes_raw"] == (200_000 + 1000) * 4 and r["bytes_skipped"] == 0
    assert r["codec_ratio"] > 5 and r["bytes_stored"] < r["bytes_raw"]
    assert r["world_size"] == 1 and r["error"] is None
    assert 0 <= r["save_call_s"] <= r["stall_s"] and 0 <= r["capture_s"] <= r["durable_s"]
    assert r["throughput_mb_s"] == pytest.approx(r["bytes_raw"] / r["durable_s"] / 1e6, rel=1e-2)


_FAILING_SAVE = """
import json, resource, signal, sys, torch, pyckpt
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit, write() fails with EFBIG instead
seen = []
pyckpt.on_checkpoint(seen.append)
with pyckpt.Checkpointer(sys.argv[1]) as ck:
    ck.save(1, {"t": torch.ones(10)}).result(60)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.RLIM_INFINITY))  # a full disk, for files
    fut = ck.save(2, {"t": torch.ones(1 << 20)})
    assert not fut.wait(60)
print(json.dumps({"error": str(fut.exception()), "seen": seen}))
"""


def test_a_failed_save_writes_a_record_with_the_error(ckpt_root):
    r = zygote.shared().run(_FAILING_SAVE, [ckpt_root], env=dict(os.environ, PYCKPT_DISABLE="1"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    lines = _lines(ckpt_root)
    assert [(x["step"], x["ok"]) for x in lines] == [(1, True), (2, False)]
    last = lines[-1]
    assert last["path"] is None and last["durable_s"] is None and "bytes_written" not in last
    assert "File too large" in last["error"] and out["error"] in last["error"]
    assert out["seen"] == lines


def test_a_raising_callback_does_not_fail_the_save(ckpt_root, caplog):
    def boom(rec):
        raise RuntimeError("logger down")

    handle = pyckpt.on_checkpoint(boom)
    try:
        with pyckpt.Checkpointer(ckpt_root) as ck:
            assert ck.save(3, {"t": torch.ones(2)}).result(60).endswith("step-000000003")
    finally:
        handle.remove()
    assert "on_checkpoint callback" in caplog.text and "logger down" in caplog.text


def test_restore_line(ckpt_root):
    with pyckpt.Checkpointer(ckpt_root) as ck:
        ck.save(4, {"t": torch.ones(2)}).result(60)
        ck.restore()
    last = _lines(ckpt_root)[-1]
    assert last["event"] == "restore" and last["step"] == 4 and last["restore_s"] >= 0


def test_list_reports_size_completeness_and_soundness(ckpt_root):
    with pyckpt.Checkpointer(ckpt_root, keep=5, incremental=False) as ck:  # step 2 holds its own data
        ck.save(1, {"t": torch.arange(1000)}).result(60)
        p2 = ck.save(2, {"t": torch.arange(1000)}).result(60)
    os.makedirs(os.path.join(ckpt_root, "step-000000003.tmp-1x1"))
    with open(os.path.join(p2, "rank-00000", "data-000.bin"), "r+b") as f:
        f.seek(8)
        f.write(b"\xff")
    infos = pyckpt.list(ckpt_root)
    assert [(i.step, i.complete, i.sound) for i in infos] == [(1, True, True), (2, True, False), (3, False, False)]
    assert infos[1].error and "damaged" in infos[1].error
    assert infos[0].size >= 8000 and infos[0].time > 0
    quick = pyckpt.list(ckpt_root, verify=False)
    assert [i.sound for i in quick] == [None, None, None]
    with pytest.raises(FileNotFoundError):
        pyckpt.list(os.path.join(ckpt_root, "missing"))


def test_finished_marker(ckpt_root):
    assert catalog.is_finished(ckpt_root) is None
    metrics.mark_finished(ckpt_root, step=99, epochs=3)
    assert catalog.is_finished(ckpt_root)["step"] == 99
    r = _pyckpt("ls", ckpt_root, "--json")
    assert json.loads(r.stdout)["finished"]["epochs"] == 3
    assert metrics.clear_finished(ckpt_root) and catalog.is_finished(ckpt_root) is None


def test_select_best():
    vals = {"step-1": 0.5, "step-2": 0.2, "step-3": None, "step-4": 0.2, "step-5": 0.9}
    assert catalog.select_best(vals, 2, "min") == {"step-2", "step-4"}
    assert catalog.select_best(vals, 1, "min") == {"step-4"}  # a tie goes to the newer
    assert catalog.select_best(vals, 2, "max") == {"step-5", "step-1"}
    assert catalog.select_best(vals, 0) == set()
    with pytest.raises(ValueError):
        catalog.select_best(vals, 1, "best")


def test_stats_summary_and_plot(ckpt_root):
    with pyckpt.Checkpointer(ckpt_root, keep=2) as ck:
        for step in (100, 200, 300):
            ck.save(step, {"t": torch.randn(50_000)}).result(60)
    with open(os.path.join(ckpt_root, metrics.METRICS_FILE), "a") as f:
        f.write('{"event": "save", "step": 400, "ok": fal')  # a line cut by a crash
    r = _pyckpt("stats", ckpt_root)
    assert r.returncode == 0, r.stderr
    assert "3 save(s) (3 committed, 0 failed), 0 restore(s), 1 unreadable line(s)" in r.stdout
    rows = [ln for ln in r.stdout.splitlines() if ln.strip().startswith(("100 ", "200 ", "300 "))]
    assert len(rows) == 3 and all("█" in ln or "▏" in ln or ln.count(".") >= 2 for ln in rows)
    r = _pyckpt("stats", ckpt_root, "--json")
    doc = json.loads(r.stdout)
    assert (doc["saves"], doc["committed"], doc["unreadable_lines"]) == (3, 3, 1)
    assert doc["bytes_written_last"] == 50_000 * 4 and doc["stall_s"]["max"] >= doc["stall_s"]["p50"]
    r = _pyckpt("stats", os.path.dirname(ckpt_root))
    assert r.returncode == 2 and "no metrics" in r.stderr


def test_stats_counts_records_with_fields_of_the_wrong_kind_as_unreadable(ckpt_root):
    """metrics.jsonl lies in the checkpoint directory and is read like the rest of it: a record whose
    fields are not what pyckpt writes (a string stall, an infinite time, a 10**30 byte count) crashed
    `pyckpt stats` ('>' not supported between float and str) or printed a 300-digit mean."""
    with pyckpt.Checkpointer(ckpt_root, keep=2) as ck:
        for step in (1, 2):
            ck.save(step, {"t": torch.randn(1000)}).result(60)
    bad = [{"event": "save", "step": 3, "ok": True, "stall_s": "x"},
           {"event": "save", "step": 4, "ok": True, "stall_s": 1e308, "durable_s": float("inf")},
           {"event": "save", "step": 5, "ok": True, "bytes_written": 10**30},
           {"event": "save", "step": "6", "ok": "yes"},
           {"event": "restore", "step": 2, "restore_s": True},
           {"event": 7}]
    with open(os.path.join(ckpt_root, metrics.METRICS_FILE), "a") as f:
        for rec in bad:
            f.write(json.dumps(rec) + "\n")
    r = _pyckpt("stats", ckpt_root)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert f"2 save(s) (2 committed, 0 failed), 0 restore(s), {len(bad)} unreadable line(s)" in r.stdout, r.stdout
    assert max(len(line) for line in r.stdout.splitlines()) < 200, r.stdout
    doc = json.loads(_pyckpt("stats", ckpt_root, "--json").stdout)
    assert (doc["saves"], doc["unreadable_lines"]) == (2, len(bad))
    with open(os.path.join(ckpt_root, metrics.METRICS_FILE), "w") as f:  # nothing but such lines
        f.write(json.dumps(bad[0]) + "\n")
    r = _pyckpt("stats", ckpt_root)
    assert r.returncode == 2 and "1 unreadable line(s) and no record in" in r.stderr, r.stderr


def _steps(root: str) -> list[str]:
    # Committed ones only: a retired step directory (no manifest) holds data newer ones reference.
    return sorted(n for n in os.listdir(root) if n.startswith("step-") and "." not in n
                  and os.path.exists(os.path.join(root, n, "MANIFEST.json")))


def test_keep_best_keeps_the_best_k_plus_the_newest(ckpt_root):
    losses = {1: 0.9, 2: 0.3, 3: 0.5, 4: 0.1, 5: 0.8, 6: 0.7}
    cur = {}
    with pyckpt.Checkpointer(ckpt_root, keep=1, keep_best=2, monitor=lambda: cur["loss"]) as ck:
        for step, loss in losses.items():
            cur["loss"] = loss
            ck.save(step, {"t": torch.ones(2)}).result(60)
    assert _steps(ckpt_root) == ["step-000000002", "step-000000004", "step-000000006"]
    assert [r.get("monitor") for r in _lines(ckpt_root)] == list(losses.values())
    # The values are stored with the checkpoints: a new Checkpointer (a relaunch) ranks them too.
    with pyckpt.Checkpointer(ckpt_root, keep=1, keep_best=2, monitor=lambda: torch.tensor(0.2)) as ck:
        ck.save(7, {"t": torch.ones(2)}).result(60)
    assert _steps(ckpt_root) == ["step-000000004", "step-000000007"]
    with pyckpt.Checkpointer(ckpt_root, keep=1, keep_best=1, monitor=lambda: 5.0, mode="max") as ck:
        ck.save(8, {"t": torch.ones(2)}).result(60)
    assert _steps(ckpt_root) == ["step-000000008"]  # the best (5.0) is also the newest


def test_keep_best_settings_are_checked(ckpt_root, caplog):
    with pytest.raises(TypeError, match="monitor="):
        pyckpt.Checkpointer(ckpt_root, keep_best=2)
    with pytest.raises(ValueError, match="mode"):
        pyckpt.Checkpointer(ckpt_root, keep_best=1, monitor=lambda: 1.0, mode="lowest")

    def broken():
        raise ZeroDivisionError("no val set")

    with pyckpt.Checkpointer(ckpt_root, keep=1, keep_best=1, monitor=broken) as ck:
        assert ck.save(1, {"t": torch.ones(2)}).result(60)
    assert "monitor() failed (ZeroDivisionError: no val set)" in caplog.text


def test_a_stored_monitor_value_out_of_float_range_reads_as_none(tmp_path):
    """pyckpt-monitor.json lies in the checkpoint: an integer too large for a float raised OverflowError
    from math.isfinite (in retention and `pyckpt ls`) instead of counting as no value."""
    from pyckpt import catalog

    for raw in ('{"value": 1' + "0" * 400 + "}", '{"value": 1e400}', '{"value": "1"}', '{"value": 2.5}'):
        (tmp_path / catalog.MONITOR_FILE).write_text(raw)
        assert catalog.read_monitor(str(tmp_path)) == (2.5 if raw.endswith("2.5}") else None), raw
