"""reader.open_checkpoint reuses an earlier validation only for byte-identical files.

A checkpoint is opened several times by one latest() + restore(); parsing and
validating its parts again each time dominated restores of many tensors. The
reuse must never let a file changed on disk through unchecked, whatever stayed
the same (size, CRC32C, modification time, inode)."""
from __future__ import annotations

import gc
import json
import logging
import os

import pytest
import torch

import pyckpt
from pyckpt import manifest, reader
from pyckpt._native import get_engine
from pyckpt.checkpointer import Checkpointer
from pyckpt.errors import CorruptCheckpointError

PART = "rank-00000.json"
PAD = "zz_pad"  # an unknown key (readers ignore it): bytes the tests may flip to steer the CRC


@pytest.fixture(autouse=True)
def _fresh_cache():
    reader.clear_cache()
    yield
    reader.clear_cache()


def state():
    return {"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(2, 3), "n": 3}


def count_part_parses(monkeypatch) -> list[str]:
    seen: list[str] = []
    real = manifest.parse_part

    def counting(raw, ckpt_dir, info):
        seen.append(ckpt_dir)
        return real(raw, ckpt_dir, info)

    monkeypatch.setattr(manifest, "parse_part", counting)
    return seen


def add_pad(ckpt_dir: str) -> None:
    """Give the part 64 padding characters, and re-seal the manifest for it (still a valid checkpoint)."""
    with open(os.path.join(ckpt_dir, PART)) as f:
        part = json.load(f)
    part[PAD] = "a" * 64
    raw = manifest.dumps(part)
    with open(os.path.join(ckpt_dir, PART), "wb") as f:
        f.write(raw)
    with open(os.path.join(ckpt_dir, "MANIFEST.json")) as f:
        m = json.load(f)
    m["parts"][0].update(nbytes=len(raw), crc32c=manifest.crc32c(raw))
    with open(os.path.join(ckpt_dir, "MANIFEST.json"), "wb") as f:
        f.write(manifest.seal(m))


def _subset_with_xor(vectors: list[int], target: int) -> list[int]:
    """Indices of ``vectors`` whose XOR is ``target`` (Gaussian elimination over GF(2))."""
    pivots: dict[int, tuple[int, int]] = {}
    for i, v in enumerate(vectors):
        mask = 1 << i
        while v:
            top = v.bit_length() - 1
            if top not in pivots:
                pivots[top] = (v, mask)
                break
            v, mask = v ^ pivots[top][0], mask ^ pivots[top][1]
    mask = 0
    while target:
        v, m = pivots[target.bit_length() - 1]
        target, mask = target ^ v, mask ^ m
    return [i for i in range(len(vectors)) if mask >> i & 1]


def same_crc(data: bytes, free: list[int], crc: int) -> bytes:
    """``data`` with bit 1 flipped ('a' <-> 'c') at some of the positions ``free``, so that its CRC32C is ``crc``.

    CRC32C is affine over GF(2) for messages of one length: flipping bits changes it by
    the XOR of each flipped bit's own effect."""
    zero = manifest.crc32c(bytes(len(data)))
    effects = []
    for p in free:
        one = bytearray(len(data))
        one[p] = 0x02
        effects.append(manifest.crc32c(bytes(one)) ^ zero)
    out = bytearray(data)
    for i in _subset_with_xor(effects, manifest.crc32c(data) ^ crc):
        out[free[i]] ^= 0x02
    return bytes(out)


def rewrite_part_keeping_size_crc_mtime_inode(ckpt_dir: str, edit) -> None:
    """Apply ``edit`` to the parsed part and write it back in place: same size, CRC32C, mtime and inode."""
    path = os.path.join(ckpt_dir, PART)
    st = os.stat(path)
    with open(path, "rb") as f:
        old = f.read()
    part = json.loads(old)
    edit(part)
    new = manifest.dumps(part)
    at = new.index(f'"{PAD}":"'.encode()) + len(PAD) + 4
    new = same_crc(new, list(range(at, at + 64)), manifest.crc32c(old))
    assert len(new) == len(old) and manifest.crc32c(new) == manifest.crc32c(old) and new != old
    with open(path, "r+b") as f:
        f.write(new)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)


def break_first_tensor(part: dict) -> None:
    part["replicated"]["tensors"][0]["nbytes"] += 1  # 24 -> 25: same length, prod(shape) * 4 no longer


def test_reopening_identical_files_does_not_parse_them_again(tmp_path, monkeypatch):
    path = pyckpt.save(state(), tmp_path / "c")
    parses = count_part_parses(monkeypatch)
    first = reader.open_checkpoint(path)
    again = reader.open_checkpoint(path)
    assert len(parses) == 1
    assert again.parts[0] is first.parts[0] and again.sections_checked
    assert reader.load_section(get_engine(), again, "replicated", 0)["a"].tolist() == [0, 1, 2, 3, 4, 5]


def test_a_part_rewritten_with_same_size_crc_mtime_and_inode_is_validated_again(tmp_path):
    path = pyckpt.save(state(), tmp_path / "c")
    add_pad(path)
    reader.open_checkpoint(path)
    rewrite_part_keeping_size_crc_mtime_inode(path, break_first_tensor)
    with pytest.raises(CorruptCheckpointError, match=r"nbytes 25 != prod\(shape\) \* itemsize = 24"):
        reader.open_checkpoint(path)


def test_a_part_changed_after_latest_is_read_again_by_restore(tmp_path, caplog):
    """latest() validated (and cached) the newest checkpoint; its part is then rewritten on
    disk so that only its bytes differ: restore() must see it and fall back to the older one."""
    with Checkpointer(tmp_path / "root", incremental=False) as ck:
        ck.save(1, state()).result()
        ck.save(2, state()).result()
        newest = os.path.join(ck.directory, "step-000000002")
        add_pad(newest)
        assert ck.latest(verify=True).step == 2
        assert reader._validated.get(newest) is not None  # the case under test: a cached validation
        rewrite_part_keeping_size_crc_mtime_inode(newest, break_first_tensor)
        with caplog.at_level(logging.WARNING, logger="pyckpt"):
            assert ck.restore().step == 1
    assert "nbytes 25 != prod(shape)" in caplog.text


def test_data_files_are_checked_at_every_open(tmp_path):
    path = pyckpt.save(state(), tmp_path / "c")
    reader.open_checkpoint(path)
    data = os.path.join(path, "rank-00000", "data-000.bin")
    os.truncate(data, os.path.getsize(data) - 1)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        reader.open_checkpoint(path)


def test_a_manifest_changed_on_disk_is_validated_again(tmp_path):
    path = pyckpt.save(state(), tmp_path / "c")
    reader.open_checkpoint(path)
    mpath = os.path.join(path, "MANIFEST.json")
    with open(mpath, "rb") as f:
        old = f.read()
    m = json.loads(old)
    torch_version = m["created_by"]["torch"]

    def candidates():
        # Another step, sealed to exactly the old size. The checksum's digits vary (8 of 10 checksums
        # have 10): shortening another field by 0-3 characters makes room for 0-3 more digits, so
        # whatever the old checksum's length, some step fits (a fixed field failed ~1 run in 70).
        for cut in range(4):
            for step in range(1, 100):
                m["step"], m["created_by"]["torch"] = step, torch_version[:len(torch_version) - cut]
                yield manifest.seal(m)

    new = next((c for c in candidates() if len(c) == len(old)), b"")
    assert len(new) == len(old)
    with open(mpath, "r+b") as f:
        f.write(new)
    assert reader.open_checkpoint(path).step == m["step"]


def test_the_cache_is_bounded_outside_reusing(tmp_path, monkeypatch):
    path = pyckpt.save(state(), tmp_path / "c")
    monkeypatch.setattr(reader._ValidatedCache, "_MAX_BYTES", 64)  # smaller than any checkpoint
    parses = count_part_parses(monkeypatch)
    reader.open_checkpoint(path)
    reader.open_checkpoint(path)
    assert len(parses) == 2  # over the budget: not kept
    with reader.reusing():
        reader.open_checkpoint(path)
        reader.open_checkpoint(path)
        assert len(parses) == 3  # kept while inside
    assert reader._validated.get(os.path.abspath(path)) is None  # and dropped on leaving


def test_parsing_runs_without_collector_passes_and_restores_the_collector(tmp_path, monkeypatch):
    path = pyckpt.save(state(), tmp_path / "c")
    during: list[bool] = []
    real = manifest.parse_part
    monkeypatch.setattr(manifest, "parse_part", lambda *a: during.append(gc.isenabled()) or real(*a))
    assert gc.isenabled()
    reader.open_checkpoint(path)
    assert during == [False] and gc.isenabled()
