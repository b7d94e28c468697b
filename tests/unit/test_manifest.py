"""Manifest and part validation: version refusal, unknown keys, bounds, overlap, sizes."""
import copy
import json
import os

import pytest

from pyckpt import manifest
from pyckpt.errors import CorruptCheckpointError, FormatVersionError


def good_part():
    # Written by hand from docs/FORMAT.md: two F32 tensors in one storage + one I8 tensor.
    return {
        "rank": 0,
        "files": [{"path": "rank-00000/data-000.bin", "nbytes": 8192}],
        "chunks": [
            {"file": "rank-00000/data-000.bin", "offset": 0, "stored_len": 32, "raw_len": 32, "elem_size": 4,
             "codec": "none", "crc32c": 1, "raw_crc32c": 1},
            {"file": "rank-00000/data-000.bin", "offset": 4096, "stored_len": 3, "raw_len": 3, "elem_size": 1,
             "codec": "none", "crc32c": 2, "raw_crc32c": 2},
        ],
        "storages": [
            {"scope": "replicated", "id": 0, "nbytes": 32, "elem_size": 4,
             "pieces": [{"chunk": 0, "chunk_offset": 0, "storage_offset": 0, "nbytes": 32}]},
            {"scope": "replicated", "id": 1, "nbytes": 3, "elem_size": 1,
             "pieces": [{"chunk": 1, "chunk_offset": 0, "storage_offset": 0, "nbytes": 3}]},
        ],
        "replicated": {
            "tree": {"a": {"__pyckpt__": "tensor", "id": 0}},
            "tensors": [
                {"dtype": "F32", "shape": [2, 2], "stride": [2, 1], "storage_offset": 0, "storage": 0,
                 "nbytes": 16, "device": "cpu", "requires_grad": False},
                {"dtype": "F32", "shape": [4], "stride": [1], "storage_offset": 4, "storage": 0,
                 "nbytes": 16, "device": "cpu", "requires_grad": False},
                {"dtype": "I8", "shape": [3], "stride": [1], "storage_offset": 0, "storage": 1,
                 "nbytes": 3, "device": "cpu", "requires_grad": False},
            ],
            "num_storages": 2,
        },
        "rank_state": None,
    }


def test_good_part_validates_and_unknown_keys_are_ignored():
    p = good_part()
    manifest.validate_part(p, "p.json", 0)
    p["future_field"] = {"x": 1}
    p["chunks"][0]["future"] = 1
    p["replicated"]["tensors"][0]["layout_v2"] = "x"
    manifest.validate_part(p, "p.json", 0)


def mutate(fn):
    p = good_part()
    fn(p)
    return p


BAD = {
    "chunk outside file": lambda p: p["chunks"][1].update(offset=8190),
    "overlapping chunks": lambda p: p["chunks"][1].update(offset=16),
    "unknown codec": lambda p: p["chunks"][0].update(codec="lz4"),
    "stored != raw for none": lambda p: p["chunks"][0].update(stored_len=31),
    "file not listed": lambda p: p["chunks"][0].update(file="rank-00001/data-000.bin"),
    "absolute file": lambda p: p["files"][0].update(path="/etc/passwd"),
    "escaping file": lambda p: p["files"][0].update(path="../../x"),
    "nbytes != prod(shape)*itemsize": lambda p: p["replicated"]["tensors"][0].update(nbytes=12),
    "unknown dtype": lambda p: p["replicated"]["tensors"][0].update(dtype="F128"),
    "negative dim": lambda p: p["replicated"]["tensors"][0].update(shape=[-1, 2]),
    "missing storage": lambda p: p["replicated"]["tensors"][0].update(storage=5),
    "piece outside chunk": lambda p: p["storages"][0]["pieces"][0].update(chunk_offset=4),
    "pieces short": lambda p: p["storages"][0].update(nbytes=40),
    "bad piece chunk": lambda p: p["storages"][1]["pieces"][0].update(chunk=9),
    "bad scope": lambda p: p["storages"][0].update(scope="both"),
    "wrong rank": lambda p: p.update(rank=1),
    "string offset": lambda p: p["chunks"][0].update(offset="0"),
}


@pytest.mark.parametrize("name", BAD)
def test_invalid_parts_are_rejected_naming_the_file(name):
    with pytest.raises(CorruptCheckpointError) as ei:
        manifest.validate_part(mutate(BAD[name]), "dir/rank-00000.json", 0)
    assert ei.value.path == "dir/rank-00000.json"


def test_tensor_extent_must_fit_its_storage():
    p = good_part()
    t = p["replicated"]["tensors"][1]
    manifest.check_tensor_extents(p["replicated"]["tensors"], {0: 32, 1: 3}, "x")
    t["storage_offset"] = 5
    with pytest.raises(CorruptCheckpointError, match="reaches byte 36"):
        manifest.check_tensor_extents(p["replicated"]["tensors"], {0: 32, 1: 3}, "x")


def write_manifest(d, obj):
    with open(os.path.join(d, "MANIFEST.json"), "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))


GOOD_MANIFEST = {"format": "pyckpt", "format_version": [1, 0], "step": 3, "world_size": 1,
                 "created_by": {"pyckpt": "x"}, "created_at": "2026-01-01T00:00:00Z",
                 "parts": [{"rank": 0, "file": "rank-00000.json", "nbytes": 10, "crc32c": 5}]}


def test_manifest_minor_versions_and_unknown_keys_are_accepted(tmp_path):
    m = copy.deepcopy(GOOD_MANIFEST)
    m["format_version"] = [1, 7]
    m["something_new"] = [1, 2]
    with open(tmp_path / "MANIFEST.json", "wb") as f:
        f.write(manifest.seal(m))  # manifests of format >= 1.1 carry their checksum
    assert manifest.read_manifest(str(tmp_path))["step"] == 3


def test_unknown_major_version_is_refused(tmp_path):
    m = copy.deepcopy(GOOD_MANIFEST)
    m["format_version"] = [2, 0]
    write_manifest(tmp_path, m)
    with pytest.raises(FormatVersionError, match="format 2.0"):
        manifest.read_manifest(str(tmp_path))


@pytest.mark.parametrize("edit", [
    lambda m: m.update(format="safetensors"),
    lambda m: m.update(world_size=2),
    lambda m: m["parts"][0].update(rank=1),
    lambda m: m["parts"][0].update(file="/abs"),
    lambda m: m.pop("step"),
])
def test_bad_manifests_are_rejected(tmp_path, edit):
    m = copy.deepcopy(GOOD_MANIFEST)
    edit(m)
    write_manifest(tmp_path, m)
    with pytest.raises(CorruptCheckpointError) as ei:
        manifest.read_manifest(str(tmp_path))
    assert ei.value.path.endswith("MANIFEST.json")


def test_not_json_and_oversized_manifests(tmp_path):
    write_manifest(tmp_path, "{not json")
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        manifest.read_manifest(str(tmp_path))
    with open(tmp_path / "MANIFEST.json", "wb") as f:
        f.truncate(manifest.MAX_MANIFEST_BYTES + 1)
    with pytest.raises(CorruptCheckpointError, match="cap"):
        manifest.read_manifest(str(tmp_path))


def test_deeply_nested_json_is_rejected_cleanly(tmp_path):
    write_manifest(tmp_path, "[" * 100_000 + "]" * 100_000)
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        manifest.read_manifest(str(tmp_path))
