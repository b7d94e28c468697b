"""Damaged checkpoints are detected, named, and reported by `pyckpt verify`."""
import json
import logging
import os

import pytest
from pathlib import Path
import torch

import pyckpt
import zygote
from pyckpt.errors import CorruptCheckpointError


def cli(*args):
    """``python -m pyckpt.cli ARGS`` in a real process forked by the session's zygote, finished."""
    return zygote.shared().run_module("pyckpt.cli", list(args), env=dict(os.environ), timeout=120)


@pytest.fixture
def ckpt(tmp_path, knob_env):
    """A checkpoint with several 1 MiB chunks: compressible ones (zstd) and random ones."""
    knob_env(PYCKPT_CHUNK_MB=1)
    g = torch.Generator().manual_seed(0)
    state = {
        "smooth": torch.arange(600_000, dtype=torch.float32) / 7,  # ~2.4 MB, compresses
        "noise": torch.randint(0, 2**31 - 1, (300_000,), generator=g, dtype=torch.int32),
        "small": torch.ones(10, dtype=torch.bfloat16),
    }
    path = pyckpt.save(state, tmp_path / "c", compress="zstd")
    return path, state


def verify_in_process(path, capsys):
    """`pyckpt verify` through its entry function (the subprocess form is covered by the other tests)."""
    from pyckpt.cli import main

    capsys.readouterr()
    rc = main(["verify", path])
    return rc, capsys.readouterr().err


def chunks(path):
    part = json.loads(Path(os.path.join(path, "rank-00000.json")).read_text())
    return part["chunks"]


def flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def test_sound_checkpoint_verifies(ckpt):
    path, state = ckpt
    codecs = {c["codec"] for c in chunks(path)}
    assert codecs == {"none", "zstd"}  # both kinds are exercised below
    r = cli("verify", path)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout


@pytest.mark.parametrize("which, where", [
    ("zstd", "first"), ("zstd", "middle"), ("zstd", "last"), ("none", "first"), ("none", "middle"), ("none", "last"),
])
def test_flipped_byte_in_a_data_file_is_detected(ckpt, which, where, capsys):
    path, _ = ckpt
    cs = [(i, c) for i, c in enumerate(chunks(path)) if c["codec"] == which]
    i, c = cs[len(cs) // 2]
    off = {"first": c["offset"], "middle": c["offset"] + c["stored_len"] // 2,
           "last": c["offset"] + c["stored_len"] - 1}[where]
    data = os.path.join(path, c["file"])
    flip(data, off)
    with pytest.raises(CorruptCheckpointError) as ei:
        pyckpt.load(path)
    assert ei.value.path == data and ei.value.chunk == i
    rc, err = verify_in_process(path, capsys) if where != "middle" else (lambda r: (r.returncode, r.stderr))(
        cli("verify", path))
    assert rc == 1
    assert data in err and f"chunk {i}" in err


def test_truncated_data_file(ckpt):
    path, _ = ckpt
    data = os.path.join(path, "rank-00000", "data-000.bin")
    os.truncate(data, os.path.getsize(data) - 100)
    with pytest.raises(CorruptCheckpointError, match="truncated") as ei:
        pyckpt.load(path)
    assert ei.value.path == data
    r = cli("verify", path)
    assert r.returncode == 1 and data in r.stderr


@pytest.mark.parametrize("victim", ["rank-00000/data-000.bin", "rank-00000.json"])
def test_missing_file(ckpt, victim):
    path, _ = ckpt
    os.remove(os.path.join(path, victim))
    with pytest.raises(CorruptCheckpointError, match="missing") as ei:
        pyckpt.load(path)
    assert ei.value.path == os.path.join(path, victim)
    r = cli("verify", path)
    assert r.returncode == 1 and os.path.join(path, victim) in r.stderr


def test_part_edited_by_hand(ckpt):
    path, _ = ckpt
    p = os.path.join(path, "rank-00000.json")
    text = Path(p).read_text().replace('"shape":[10]', '"shape":[11]')
    with open(p, "w") as f:
        f.write(text)
    with pytest.raises(CorruptCheckpointError) as ei:
        pyckpt.load(path)
    assert ei.value.path == p
    assert cli("verify", path).returncode == 1


def test_manifest_edited_by_hand(ckpt):
    path, _ = ckpt
    m = os.path.join(path, "MANIFEST.json")
    obj = json.loads(Path(m).read_text())
    obj["parts"][0]["nbytes"] += 1
    with open(m, "w") as f:
        json.dump(obj, f)
    with pytest.raises(CorruptCheckpointError):
        pyckpt.load(path)
    with open(m, "w") as f:
        f.write('{"format": "pyckpt", "format_version": [1, 0], "step": ')
    with pytest.raises(CorruptCheckpointError) as ei:
        pyckpt.load(path)
    assert ei.value.path == m
    r = cli("verify", path)
    assert r.returncode == 1 and m in r.stderr


def test_corrupt_latest_is_skipped_with_a_warning(tmp_path, caplog):
    root = tmp_path / "root"
    ck = pyckpt.Checkpointer(root, keep=5)
    ck.save(1, {"x": torch.full((1000,), 1.0)}).result(60)
    newest = ck.save(2, {"x": torch.full((1000,), 2.0)}).result(60)
    os.remove(os.path.join(newest, "rank-00000.json"))
    with caplog.at_level(logging.WARNING, logger="pyckpt"):
        info = ck.latest()
    assert info.step == 1
    assert os.path.join(newest, "rank-00000.json") in caplog.text
    assert torch.equal(pyckpt.load(root)["x"], torch.full((1000,), 1.0))
    r = cli("verify", str(root))  # verify of a root checks its newest committed checkpoint
    assert r.returncode == 1 and newest in r.stderr


def test_format_version_refused(ckpt):
    path, _ = ckpt
    m = os.path.join(path, "MANIFEST.json")
    obj = json.loads(Path(m).read_text())
    obj["format_version"] = [2, 0]
    with open(m, "w") as f:
        json.dump(obj, f)
    with pytest.raises(pyckpt.FormatVersionError, match="upgrade"):
        pyckpt.load(path)
