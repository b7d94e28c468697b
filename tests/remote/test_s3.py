"""Object-storage roots (``s3://``) against a real S3-compatible server on localhost (moto, conftest.py).

Covered: save/load bitwise through a multipart upload, retention in the bucket, commit order from the
bucket (a fresh staging directory), damaged or truncated objects skipped, a SIGKILL during an upload,
the CLI on a URL, the error naming the extra when s3fs is missing, and transparent mode with
PYCKPT_DIR=s3://... (kill, resume, finished marker).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

import pyckpt
import zygote
from pyckpt import cli, knobs
from pyckpt.errors import ConfigError
from s3_helpers import child_env, keys, run_py, same

TINY = Path(__file__).parent.parent / "transparent" / "train_tiny.py"


def _state(step: int, big: torch.Tensor) -> dict:
    return {"w": big + step, "h": torch.arange(7, dtype=torch.bfloat16) * step,
            "nan": float("nan"), "neg0": torch.tensor([-0.0]), "step": step}


def test_roundtrip_multipart_retention_and_commit_order_from_the_bucket(bucket, tmp_path):
    name, fs = bucket
    url = f"s3://{name}/run"
    big = torch.randn(3 << 20)  # 12 MiB: uploaded in 5 MiB parts
    states = {s: _state(s, big) for s in (1, 2, 3)}
    with pyckpt.Checkpointer(url, keep=2) as ck:
        ck.remote.part_bytes = 5 << 20
        for s in (1, 2, 3):
            assert ck.save(s, states[s]).result(120) == f"{url}/step-00000000{s}"
        staging = ck.directory
    # Staging keeps only its newest; the bucket the newest `keep`, `latest` written after the manifest.
    assert sorted(n for n in os.listdir(staging) if n.startswith("step-")) == ["step-000000003"]
    files = ["MANIFEST.json", "rank-00000.json", "rank-00000/data-000.bin"]
    assert keys(fs, f"{name}/run") == ["latest"] + [f"step-00000000{s}/{f}" for s in (2, 3) for f in files]
    assert fs.cat_file(f"{name}/run/latest") == b"step-000000003\n"
    data = fs.info(f"{name}/run/step-000000003/rank-00000/data-000.bin")
    assert data["ETag"].strip('"').endswith("-3"), data  # S3 marks a multipart object's ETag with its part count
    with open(os.path.join(staging, "metrics.jsonl")) as f:  # metrics stay with the writer
        saves = [rec for rec in map(json.loads, f) if rec["event"] == "save"]
    assert [rec["url"] for rec in saves] == [f"{url}/step-00000000{s}" for s in (1, 2, 3)]
    assert saves[-1]["bytes_written"] == data["size"]

    # Another machine (an empty cache) reads it back bitwise, by ranged GETs into its own copy.
    with pyckpt.Checkpointer(url, keep=2, cache_dir=tmp_path / "other") as ck2:
        r = ck2.restore()
        assert r.step == 3 and same(r.state, states[3])
        assert same(ck2.load(2), states[2])
        assert ck2.latest(verify=True).step == 3
        # A new run that starts again at step 1: its staging directory is empty, but the commit
        # sequence number comes from the bucket, so step 1 is now the newest and step 2 retired.
        ck2.save(1, states[1]).result(120)
        assert ck2.restore().step == 1
    assert [k for k in keys(fs, f"{name}/run") if k.endswith("MANIFEST.json")] == \
        ["step-000000001/MANIFEST.json", "step-000000003/MANIFEST.json"]
    assert json.loads(fs.cat_file(f"{name}/run/step-000000001/MANIFEST.json"))["seq"] == 4


def test_keep_best_in_the_bucket(bucket):
    name, fs = bucket
    losses = iter([0.5, 0.1, 0.9, 0.7])
    current = {}
    with pyckpt.Checkpointer(f"s3://{name}/run", keep=1, keep_best=1, monitor=lambda: current["loss"]) as ck:
        for s in (1, 2, 3, 4):
            current["loss"] = next(losses)
            ck.save(s, {"w": torch.full((4,), float(s))}).result(60)
    # the newest (4) and the best by the stored metric (2, loss 0.1), read back from the bucket
    assert sorted({k.split("/")[0] for k in keys(fs, f"{name}/run") if k.startswith("step-")}) == \
        ["step-000000002", "step-000000004"]
    assert json.loads(fs.cat_file(f"{name}/run/step-000000002/pyckpt-monitor.json")) == {"value": 0.1}


def test_damaged_objects_are_skipped_and_named(bucket, tmp_path, caplog, capsys):
    name, fs = bucket
    url = f"s3://{name}/run"
    states = {s: {"w": torch.full((1000,), float(s))} for s in (1, 2)}
    with pyckpt.Checkpointer(url, keep=3) as ck:
        for s in (1, 2):
            ck.save(s, states[s]).result(60)
    key = f"{name}/run/step-000000002/rank-00000/data-000.bin"
    data = bytearray(fs.cat_file(key))
    data[100] ^= 0xFF  # same size: found by the chunk checksum while loading
    fs.pipe_file(key, bytes(data))
    with caplog.at_level(logging.WARNING, logger="pyckpt"):
        with pyckpt.Checkpointer(url, cache_dir=tmp_path / "c1") as ck:
            r = ck.restore()
    assert r.step == 1 and same(r.state, states[1])
    assert "skipping damaged checkpoint" in caplog.text and "step-000000002" in caplog.text
    assert cli.main(["verify", url]) == 1
    assert "FAILED" in capsys.readouterr().err
    assert cli.main(["verify", f"{url}/step-000000001"]) == 0
    assert f"{url}/step-000000001: OK" in capsys.readouterr().out

    fs.pipe_file(key, b"x")  # truncated: refused before download, naming the object
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pyckpt"):
        with pyckpt.Checkpointer(url, cache_dir=tmp_path / "c2") as ck:
            assert ck.restore().step == 1
    assert f"{url}/step-000000002/rank-00000/data-000.bin is truncated: 1 of 4000 bytes" in caplog.text


_WRITER = """
import sys, torch, pyckpt
with pyckpt.Checkpointer(sys.argv[1], keep=1) as ck:
    for s in (1, 2):
        ck.save(s, {"w": torch.full((5000,), float(s))}).result(60)
        print("committed", s, flush=True)
"""


@pytest.mark.parametrize("point", ["remote.data.after:2", "remote.manifest.after:2"])
def test_sigkill_during_upload_keeps_a_loadable_checkpoint(bucket, s3_env, tmp_path, capsys, point):
    """SIGKILL in the second upload: after its data and part are in the bucket but before its manifest
    (the partial one is invisible, the previous one loads), or right after its manifest (it is the
    newest although `latest` still names step 1, and retention has not yet deleted step 1)."""
    name, fs = bucket
    url = f"s3://{name}/run"
    r = zygote.shared().run(_WRITER, [url], env=dict(child_env(s3_env), PYCKPT_TEST_CRASH_AT=point))  # torch imported
    assert r.returncode == -9 and r.stdout == "committed 1\n", r.stderr[-2000:]
    assert "step-000000002/rank-00000/data-000.bin" in keys(fs, f"{name}/run")
    assert fs.cat_file(f"{name}/run/latest") == b"step-000000001\n"
    committed = point.startswith("remote.manifest")
    listed = {i.name: i.complete for i in pyckpt.list(url, verify=False)}
    assert listed == {"step-000000001": True, "step-000000002": committed}
    assert cli.main(["ls", url]) == 0
    assert ("complete    step-000000002" if committed else "incomplete  step-000000002") in capsys.readouterr().out
    newest = 2 if committed else 1
    with pyckpt.Checkpointer(url, keep=1) as ck:  # the killed job's staging directory, its lock released
        r = ck.restore()
        assert r.step == newest and torch.equal(r.state["w"], torch.full((5000,), float(newest)))
        ck.save(3, {"w": torch.zeros(3)}).result(60)  # removes the partial one; retention keeps only step 3
    assert keys(fs, f"{name}/run") == ["latest", "step-000000003/MANIFEST.json", "step-000000003/rank-00000.json",
                                       "step-000000003/rank-00000/data-000.bin"]


def test_without_s3fs_a_url_is_one_error_naming_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # find_spec("s3fs") -> None: as if not installed
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"needs the s3fs package for s3:// URLs: pip install 'pyckpt\[s3\]'"):
        pyckpt.Checkpointer("s3://bucket/run")
    monkeypatch.setenv("PYCKPT_DIR", "s3://bucket/run")
    with pytest.raises(ConfigError, match=r"PYCKPT_DIR 's3://bucket/run' needs the s3fs package"):
        knobs.validate_all()
    assert os.listdir(tmp_path) == []  # no local folder named "s3:"


def test_transparent_mode_resumes_from_s3_and_marks_the_run_finished(bucket, s3_env, tmp_path):
    name, fs = bucket
    url = f"s3://{name}/run"
    env = dict(child_env(s3_env), PYCKPT_DIR=url, PYCKPT_EVERY_STEPS="4", KILL_AT="14",
               KILL_MARK=str(tmp_path / "killed"))
    first = run_py(TINY, tmp_path / "out.pt", env=env, cwd=tmp_path)
    assert first.returncode == -9, first.stderr[-2000:]
    latest = fs.cat_file(f"{name}/run/latest").decode()  # step 12's upload may still have been running
    assert latest in ("step-000000008\n", "step-000000012\n")
    second = run_py(TINY, tmp_path / "out.pt", env=env, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    # (that the resumed run equals an uninterrupted one is shown for local roots in tests/transparent)
    assert f"pyckpt: resumed from step {int(latest[5:])} " in second.stderr and "TRAINED 30" in second.stdout
    marker = json.loads(fs.cat_file(f"{name}/run/FINISHED.json"))
    assert marker["finished"] is True and marker["steps"] == 30 and marker["step"] == 28
    third = run_py(TINY, tmp_path / "out3.pt", env=env, cwd=tmp_path)
    assert third.returncode == 0 and "TRAINED" not in third.stdout, third.stderr[-2000:]
    lines = [ln for ln in third.stderr.splitlines() if ln.startswith("pyckpt:")]
    assert len(lines) == 1 and f"the run in {url} already finished (30 steps" in lines[0], third.stderr
