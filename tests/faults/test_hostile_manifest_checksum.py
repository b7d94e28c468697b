"""The manifest checksum (format 1.1): any changed byte of MANIFEST.json is detected; 1.0 manifests still load."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import pyckpt
from pyckpt import manifest
from pyckpt.errors import CorruptCheckpointError

V1 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "format", "v1")


def test_writers_seal_the_manifest_as_its_last_member(tmp_path):
    path = pyckpt.save({"x": torch.ones(3)}, tmp_path / "c")
    raw = Path(path, "MANIFEST.json").read_bytes()
    m = json.loads(raw)
    assert m["format_version"] == [1, 3]
    at = raw.rindex(b',"manifest_crc32c":')
    assert raw[at:] == b',"manifest_crc32c":%d}' % m["manifest_crc32c"]
    assert manifest.crc32c(raw[:at]) == m["manifest_crc32c"]


def test_every_changed_byte_of_the_manifest_is_detected(tmp_path):
    path = pyckpt.save({"x": torch.ones(3)}, tmp_path / "c", step=120)
    mpath = os.path.join(path, "MANIFEST.json")
    raw = Path(mpath).read_bytes()
    for i in range(len(raw)):
        for bad in ({raw[i] ^ 0x01}, {raw[i] ^ 0x20}):
            with open(mpath, "wb") as f:
                f.write(raw[:i] + bytes(bad) + raw[i + 1:])
            with pytest.raises(CorruptCheckpointError):
                manifest.read_manifest(path)
    with open(mpath, "wb") as f:
        f.write(raw)
    assert manifest.read_manifest(path)["step"] == 120


def test_a_changed_step_digit_is_detected_by_load(tmp_path):
    path = pyckpt.save({"x": torch.ones(3)}, tmp_path / "c", step=120)
    mpath = os.path.join(path, "MANIFEST.json")
    raw = Path(mpath).read_bytes()
    with open(mpath, "wb") as f:
        f.write(raw.replace(b'"step":120', b'"step":720'))
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch") as ei:
        pyckpt.load(path)
    assert ei.value.path == mpath


def test_format_1_1_without_checksum_is_refused_but_1_0_loads(tmp_path):
    path = pyckpt.save({"x": torch.ones(3)}, tmp_path / "c")
    mpath = os.path.join(path, "MANIFEST.json")
    m = json.loads(Path(mpath).read_bytes())
    del m["manifest_crc32c"]
    with open(mpath, "w") as f:
        json.dump(m, f)
    with pytest.raises(CorruptCheckpointError, match="lacks"):
        pyckpt.load(path)
    m["format_version"] = [1, 0]  # what pyckpt 0.1.0 wrote
    with open(mpath, "w") as f:
        json.dump(m, f)
    assert torch.equal(pyckpt.load(path)["x"], torch.ones(3))


def test_golden_v1_checkpoints_have_no_checksum_and_still_load(tmp_path):
    root = tmp_path / "v1"
    shutil.copytree(V1, root)
    m = json.loads((root / "step-000000007" / "MANIFEST.json").read_text())
    assert m["format_version"] == [1, 0] and "manifest_crc32c" not in m
    assert pyckpt.load(root / "step-000000007")["meta"]["step"] == 7
    assert pyckpt.load(root / "zstd-example")["ramp"].tolist() == list(range(512))
