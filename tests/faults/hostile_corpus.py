"""The hostile-checkpoint corpus: damaged or malicious checkpoints, each built from a sound one.

Every builder takes a fresh directory and returns the path to hand to
``pyckpt.load`` / ``pyckpt verify``. Where a case points outside the
checkpoint, the outside target is a byte-identical *valid* copy: a reader
that followed it would load successfully, so a refusal proves it was not read.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

import pyckpt
from pyckpt import manifest

PART = "rank-00000.json"
DATA = "rank-00000/data-000.bin"


def sound(d: Path, name: str = "c") -> Path:
    """A small sound checkpoint (one uncompressed chunk, two tensors)."""
    state = {"w": torch.arange(1024, dtype=torch.float32), "b": torch.ones(8, dtype=torch.bfloat16), "step": 3}
    return Path(pyckpt.save(state, d / name))


def read_part(ck: Path) -> dict:
    return json.loads((ck / PART).read_text())


def write_part_bytes(ck: Path, raw: bytes) -> None:
    """Replace the part and re-seal the manifest so that only the part's content is hostile."""
    (ck / PART).write_bytes(raw)
    m = json.loads((ck / "MANIFEST.json").read_text())
    m["parts"][0].update(nbytes=len(raw), crc32c=manifest.crc32c(raw))
    (ck / "MANIFEST.json").write_bytes(manifest.seal(m))


def write_part(ck: Path, part: dict) -> None:
    write_part_bytes(ck, json.dumps(part, separators=(",", ":")).encode())


def write_manifest(ck: Path, m: dict) -> None:
    (ck / "MANIFEST.json").write_bytes(manifest.seal(m))


def edit_part(fn):
    def build(d: Path) -> Path:
        ck = sound(d)
        p = read_part(ck)
        fn(p, ck)
        write_part(ck, p)
        return ck
    return build


def edit_manifest(fn):
    def build(d: Path) -> Path:
        ck = sound(d)
        m = json.loads((ck / "MANIFEST.json").read_text())
        fn(m)
        write_manifest(ck, m)
        return ck
    return build


# -- symbolic links -------------------------------------------------------------------------------
def _link_out(rel: str):
    """Move ``rel`` outside the checkpoint (a valid copy) and put a symlink in its place."""
    def build(d: Path) -> Path:
        ck = sound(d)
        outside = d / "outside"
        outside.mkdir()
        target = outside / Path(rel).name
        shutil.move(str(ck / rel), str(target))
        os.symlink(target, ck / rel)
        return ck
    return build


def symlink_stepdir(d: Path) -> Path:
    real = sound(d / "elsewhere", "real")
    root = d / "root"
    root.mkdir()
    os.symlink(real, root / "step-000000001")
    return root / "step-000000001"


# -- FIFOs ----------------------------------------------------------------------------------------
def _fifo(rel: str):
    def build(d: Path) -> Path:
        ck = sound(d)
        p = ck / rel
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
        os.mkfifo(p)
        return ck
    return build


# -- lengths --------------------------------------------------------------------------------------
def _tiny_zstd_chunk(raw_len: int):
    """The data file holds a 36-byte chunk that claims to decode to ``raw_len`` bytes."""
    def fn(p: dict, ck: Path) -> None:
        (ck / DATA).write_bytes(b"PKZ1" + bytes(32))
        p["files"] = [{"path": DATA, "nbytes": 36}]
        p["chunks"] = [{"file": DATA, "offset": 0, "stored_len": 36, "raw_len": raw_len, "elem_size": 1,
                        "codec": "zstd", "crc32c": manifest.crc32c(b"PKZ1" + bytes(32)), "raw_crc32c": 0}]
        p["storages"] = [{"scope": "replicated", "id": 0, "nbytes": raw_len, "elem_size": 1,
                          "pieces": [{"chunk": 0, "chunk_offset": 0, "storage_offset": 0, "nbytes": raw_len}]}]
        p["replicated"]["tensors"] = [{"dtype": "U8", "shape": [raw_len], "stride": [1], "storage_offset": 0,
                                       "storage": 0, "nbytes": raw_len, "device": "cpu", "requires_grad": False}]
        p["replicated"]["num_storages"] = 1
        p["replicated"]["tree"] = {"x": {"__pyckpt__": "tensor", "id": 0}}
    return edit_part(fn)


def _chunk(**kw):
    def fn(p: dict, ck: Path) -> None:
        p["chunks"][0].update(kw)
        end = p["chunks"][0]["offset"] + p["chunks"][0]["stored_len"]
        if end > p["files"][0]["nbytes"]:  # the claim is consistent inside the part: only the file disagrees
            p["files"][0]["nbytes"] = end
    return edit_part(fn)


def _shared_chunk(p: dict, ck: Path) -> None:
    """2000 storages all made of the same chunk bytes: memory would be 2000x the data."""
    n = p["chunks"][0]["raw_len"]
    p["storages"] = [{"scope": "replicated", "id": i, "nbytes": n, "elem_size": 1,
                      "pieces": [{"chunk": 0, "chunk_offset": 0, "storage_offset": 0, "nbytes": n}]}
                     for i in range(2000)]
    p["replicated"]["num_storages"] = 2000
    p["replicated"]["tensors"] = [{"dtype": "U8", "shape": [n], "stride": [1], "storage_offset": 0, "storage": i,
                                   "nbytes": n, "device": "cpu", "requires_grad": False} for i in range(2000)]
    p["replicated"]["tree"] = [{"__pyckpt__": "tensor", "id": i} for i in range(2000)]


def _tensor(**kw):
    return edit_part(lambda p, ck: p["replicated"]["tensors"][0].update(kw))


# -- paths ----------------------------------------------------------------------------------------
def _data_path(path: str):
    def fn(p: dict, ck: Path) -> None:
        p["files"][0]["path"] = path
        for ch in p["chunks"]:
            ch["file"] = path
    return edit_part(fn)


def sibling_outside_root(d: Path) -> Path:
    """A plain directory ``c`` (not a root's step entry) naming ../step-000000001/...: refused."""
    sound(d, "step-000000001")
    ck = sound(d)
    p = read_part(ck)
    p["files"][0]["path"] = "../step-000000001/" + DATA
    for ch in p["chunks"]:
        ch["file"] = p["files"][0]["path"]
    write_part(ck, p)
    return ck


# -- JSON -----------------------------------------------------------------------------------------
def dup_key_manifest(d: Path) -> Path:
    ck = sound(d)
    raw = (ck / "MANIFEST.json").read_bytes()
    head = raw[:raw.rindex(b',"manifest_crc32c":')].replace(b'"step":0', b'"step":0,"step":9', 1)
    (ck / "MANIFEST.json").write_bytes(head + b',"manifest_crc32c":%d}' % manifest.crc32c(head))
    return ck


def dup_key_part(d: Path) -> Path:
    ck = sound(d)
    raw = (ck / PART).read_bytes().replace(b'"rank":0', b'"rank":0,"rank":0', 1)
    write_part_bytes(ck, raw)
    return ck


def nan_in_part(d: Path) -> Path:
    ck = sound(d)
    raw = (ck / PART).read_bytes().replace(b'"step":3', b'"step":NaN', 1)
    write_part_bytes(ck, raw)
    return ck


def step_digit(d: Path) -> Path:
    ck = sound(d)
    raw = (ck / "MANIFEST.json").read_bytes()
    (ck / "MANIFEST.json").write_bytes(raw.replace(b'"step":0', b'"step":5', 1))
    return ck


def _tree(t):
    return edit_part(lambda p, ck: p["replicated"].update(tree=t))


TEN = {"__pyckpt__": "tensor", "id": 0}

# name -> builder. Every case: load raises CorruptCheckpointError, verify exits 1 with a FAILED line.
CORPUS = {
    "symlink-data": _link_out(DATA),
    "symlink-rankdir": _link_out("rank-00000"),
    "symlink-part": _link_out(PART),
    "symlink-manifest": _link_out("MANIFEST.json"),
    "symlink-stepdir": symlink_stepdir,
    "fifo-part": _fifo(PART),
    "fifo-data": _fifo(DATA),
    "fifo-manifest": _fifo("MANIFEST.json"),
    "tiny-chunk-claims-3GiB": _tiny_zstd_chunk(3 << 30),
    "tiny-chunk-claims-1.9GiB": _tiny_zstd_chunk((2 << 30) - 4096),
    "offset-2**40": _chunk(offset=1 << 40),
    "stored-len-2**40": _chunk(stored_len=1 << 40, raw_len=1 << 40),
    "length-2**64": _chunk(stored_len=1 << 64, raw_len=1 << 64),
    "negative-offset": _chunk(offset=-4096),
    "crc-over-32-bits": _chunk(crc32c=1 << 40),
    "elem-size-3": _chunk(elem_size=3),
    "shared-chunk-2000x": edit_part(_shared_chunk),
    "shape-product-overflows": _tensor(shape=[1 << 40, 1 << 40], stride=[1 << 40, 1], nbytes=(1 << 80) * 4),
    "device-garbage": _tensor(device="nonsense:7"),
    "device-meta": _tensor(device="meta"),
    "traversal-part": edit_manifest(lambda m: m["parts"][0].update(file="../../../etc/passwd")),
    "traversal-absolute-data": _data_path("/etc/passwd"),
    "traversal-dotdot-data": _data_path("rank-00000/../../outside.bin"),
    "traversal-backslash": _data_path("rank-00000\\data-000.bin"),
    "traversal-sibling-of-non-step-dir": sibling_outside_root,
    "duplicate-key-manifest": dup_key_manifest,
    "duplicate-key-part": dup_key_part,
    "nan-in-part": nan_in_part,
    "manifest-step-digit": step_digit,
    "tree-unhashable-key": _tree({"__pyckpt__": "dict", "items": [[[1, 2], TEN]]}),
    "tree-duplicate-dict-key": _tree({"__pyckpt__": "dict", "items": [[1, TEN], [1, 2]]}),
    "tree-tensor-twice": _tree([TEN, TEN]),
    "tree-float-tensor-id": _tree({"__pyckpt__": "tensor", "id": 0.5}),
    "tree-ndarray-scalar-of-a-vector": _tree({"w": {"__pyckpt__": "ndarray", "id": 0, "scalar": True},
                                              "b": {"__pyckpt__": "tensor", "id": 1}}),
    "tree-ndarray-of-bfloat16": _tree({"w": TEN, "b": {"__pyckpt__": "ndarray", "id": 1}}),
}

# Cases whose load could block forever if a FIFO were opened: run them in a subprocess with a timeout.
BLOCKING = {n for n in CORPUS if n.startswith("fifo-")}
