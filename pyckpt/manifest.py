"""MANIFEST.json and per-rank part files: building, reading, validating.

Readers follow docs/FORMAT.md: refuse an unknown major version, ignore
unknown keys, cap sizes, and check every offset and size before a byte of
tensor data is read, so a hostile or damaged checkpoint fails with
``CorruptCheckpointError`` naming the file instead of reading out of bounds.
"""
from __future__ import annotations

import datetime
import json
import os
import posixpath
from typing import Any

from . import __version__, layout
from .dtypes import dtype_of
from .errors import CorruptCheckpointError, FormatVersionError

FORMAT = "pyckpt"
FORMAT_VERSION = (1, 0)
MAX_MANIFEST_BYTES = 16 << 20
MAX_PART_BYTES = 1 << 30
CODECS = ("none", "zstd")
SCOPES = ("replicated", "rank")


def crc32c(data: bytes) -> int:
    """CRC32C via the engine (the same function that checksums chunks)."""
    from ._native import native

    return native().crc32c(data)


def dumps(obj: Any) -> bytes:
    """Canonical JSON bytes (no NaN: non-finite floats are tagged by ``tree``)."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")


def build_manifest(step: int, world_size: int, parts: list[dict]) -> dict:
    """The manifest; ``parts[r] = {"rank", "file", "nbytes", "crc32c"}``."""
    import torch

    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "format": FORMAT, "format_version": list(FORMAT_VERSION), "step": step, "world_size": world_size,
        "created_by": {"pyckpt": __version__, "torch": torch.__version__},
        "created_at": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "parts": parts,
    }


def _read_capped(path: str, cap: int, what: str) -> bytes:
    try:
        size = os.path.getsize(path)
        if size > cap:
            raise CorruptCheckpointError(f"{what} {path} is {size} bytes, over the {cap}-byte cap", path=path)
        with open(path, "rb") as f:
            return f.read(cap + 1)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{what} {path} is missing", path=path) from None
    except OSError as e:
        raise CorruptCheckpointError(f"cannot read {what} {path}: {e}", path=path) from e


def _parse(raw: bytes, path: str, what: str) -> dict:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"{what} {path} is not valid JSON: {e}", path=path) from None
    if not isinstance(obj, dict):
        raise CorruptCheckpointError(f"{what} {path} is not a JSON object", path=path)
    return obj


class _Check:
    """Field accessors that turn a wrong type/range into CorruptCheckpointError naming the file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"invalid {self.path}: {why}", path=self.path)

    def int(self, obj: dict, key: str, lo: int = 0, ctx: str = "") -> int:
        v = obj.get(key) if isinstance(obj, dict) else None
        if type(v) is not int or v < lo:
            raise self.fail(f"{ctx}{key!r} must be an integer >= {lo}, got {v!r}")
        return v

    def get(self, obj: dict, key: str, typ: type | tuple, ctx: str = "") -> Any:
        v = obj.get(key) if isinstance(obj, dict) else None
        if not isinstance(v, typ) or isinstance(v, bool) and typ is not bool:
            raise self.fail(f"{ctx}{key!r} is missing or has the wrong type")
        return v


def read_manifest(ckpt_dir: str) -> dict:
    """Read and validate ``MANIFEST.json`` (not the parts)."""
    path = os.path.join(ckpt_dir, layout.MANIFEST)
    m = _parse(_read_capped(path, MAX_MANIFEST_BYTES, "manifest"), path, "manifest")
    c = _Check(path)
    if m.get("format") != FORMAT:
        raise c.fail(f"'format' is {m.get('format')!r}, not {FORMAT!r}")
    ver = m.get("format_version")
    if not (isinstance(ver, list) and len(ver) >= 2 and all(type(v) is int for v in ver[:2])):
        raise c.fail(f"'format_version' must be [major, minor], got {ver!r}")
    if ver[0] != FORMAT_VERSION[0]:
        raise FormatVersionError(
            f"{path} uses checkpoint format {ver[0]}.{ver[1]}; this pyckpt {__version__} reads "
            f"{FORMAT_VERSION[0]}.x only: upgrade pyckpt to load it", path=path)
    c.int(m, "step")
    ws = c.int(m, "world_size", 1)
    parts = c.get(m, "parts", list)
    if len(parts) != ws:
        raise c.fail(f"{len(parts)} parts listed for world_size {ws}")
    for r, p in enumerate(parts):
        if c.int(p, "rank", ctx=f"parts[{r}].") != r:
            raise c.fail(f"parts[{r}] has rank {p['rank']}")
        _safe_rel(c, c.get(p, "file", str, f"parts[{r}]."))
        c.int(p, "nbytes", ctx=f"parts[{r}].")
        c.int(p, "crc32c", ctx=f"parts[{r}].")
    return m


def _safe_rel(c: _Check, rel: str) -> str:
    """A relative path that stays inside the checkpoint's root (no absolute paths, no escapes)."""
    norm = posixpath.normpath(rel)
    if rel.startswith("/") or "\\" in rel or norm.startswith("../..") or norm in (".", "..") or "\0" in rel:
        raise c.fail(f"path {rel!r} is not a relative path inside the checkpoint root")
    if norm.startswith("../") and layout.parse_step(norm.split("/")[1]) is None:
        raise c.fail(f"path {rel!r} leaves the checkpoint root")
    return norm


def read_part(ckpt_dir: str, info: dict) -> dict:
    """Read a part listed in the manifest, check its size and CRC32C, validate it."""
    path = os.path.join(ckpt_dir, info["file"])
    raw = _read_capped(path, MAX_PART_BYTES, "part")
    if len(raw) != info["nbytes"] or crc32c(raw) != info["crc32c"]:
        raise CorruptCheckpointError(
            f"part {path} does not match MANIFEST.json (size {len(raw)} vs {info['nbytes']}, or checksum)", path=path)
    part = _parse(raw, path, "part")
    validate_part(part, path, info["rank"])
    return part


def validate_part(part: dict, path: str, rank: int) -> None:
    """Structural checks of one part (docs/FORMAT.md "Reader requirements")."""
    c = _Check(path)
    if c.int(part, "rank") != rank:
        raise c.fail(f"part says rank {part['rank']}, manifest says {rank}")
    sizes = _validate_files(c, c.get(part, "files", list))
    chunks = c.get(part, "chunks", list)
    _validate_chunks(c, chunks, sizes)
    counts = _validate_sections(c, part)
    _validate_storages(c, c.get(part, "storages", list), chunks, counts)


def _validate_files(c: _Check, files: list) -> dict[str, int]:
    sizes = {}
    for i, f in enumerate(files):
        sizes[_safe_rel(c, c.get(f, "path", str, f"files[{i}]."))] = c.int(f, "nbytes", ctx=f"files[{i}].")
    return sizes


def _validate_chunks(c: _Check, chunks: list, sizes: dict[str, int]) -> None:
    spans: dict[str, list[tuple[int, int, int]]] = {}
    for i, ch in enumerate(chunks):
        ctx = f"chunks[{i}]."
        f = posixpath.normpath(c.get(ch, "file", str, ctx))
        if f not in sizes:
            raise c.fail(f"{ctx}file {f!r} is not listed in 'files'")
        off, n = c.int(ch, "offset", ctx=ctx), c.int(ch, "stored_len", ctx=ctx)
        raw = c.int(ch, "raw_len", ctx=ctx)
        c.int(ch, "crc32c", ctx=ctx), c.int(ch, "raw_crc32c", ctx=ctx), c.int(ch, "elem_size", 1, ctx)
        if ch.get("codec") not in CODECS:
            raise c.fail(f"{ctx}codec {ch.get('codec')!r} is unknown (known: {', '.join(CODECS)})")
        if ch["codec"] == "none" and n != raw:
            raise c.fail(f"{ctx}stored_len {n} != raw_len {raw} for codec 'none'")
        if off + n > sizes[f]:
            raise c.fail(f"{ctx}bytes [{off}, {off + n}) lie outside {f} ({sizes[f]} bytes)")
        spans.setdefault(f, []).append((off, off + n, i))
    for f, s in spans.items():
        s.sort()
        for (a0, a1, ia), (b0, _, ib) in zip(s, s[1:]):
            if b0 < a1:
                raise c.fail(f"chunks {ia} and {ib} overlap in {f}")


def _validate_sections(c: _Check, part: dict) -> dict[str, int]:
    """Checks 'replicated' / 'rank_state' sections; returns storage count per scope."""
    counts = {}
    for scope, key in (("replicated", "replicated"), ("rank", "rank_state")):
        sec = part.get(key)
        if sec is None:
            counts[scope] = -1  # unknown here: another rank's part holds the tree
            continue
        n = c.int(sec, "num_storages", ctx=f"{key}.")
        counts[scope] = n
        for i, t in enumerate(c.get(sec, "tensors", list, f"{key}.")):
            _validate_tensor(c, t, n, f"{key}.tensors[{i}].")
    return counts


def _validate_tensor(c: _Check, t: dict, num_storages: int, ctx: str) -> None:
    dt = dtype_of(c.get(t, "dtype", str, ctx), c.path)
    shape, stride = c.get(t, "shape", list, ctx), c.get(t, "stride", list, ctx)
    if len(shape) != len(stride) or not all(type(v) is int and v >= 0 for v in shape + stride):
        raise c.fail(f"{ctx}shape/stride must be equal-length lists of integers >= 0")
    numel = 1
    for s in shape:
        numel *= s
    if c.int(t, "nbytes", ctx=ctx) != numel * dt.itemsize:
        raise c.fail(f"{ctx}nbytes {t['nbytes']} != prod(shape) * itemsize = {numel * dt.itemsize}")
    c.int(t, "storage_offset", ctx=ctx)
    if c.int(t, "storage", ctx=ctx) >= num_storages:
        raise c.fail(f"{ctx}storage {t['storage']} does not exist ({num_storages} storages)")
    c.get(t, "device", str, ctx)


def tensor_end(t: dict) -> int:
    """Byte just past the last element of tensor entry ``t`` inside its storage extent."""
    isz = dtype_of(t["dtype"]).itemsize
    if t["nbytes"] == 0:
        return 0
    last = sum((s - 1) * st for s, st in zip(t["shape"], t["stride"]))
    return (t["storage_offset"] + last + 1) * isz


def _validate_storages(c: _Check, storages: list, chunks: list, counts: dict[str, int]) -> None:
    for i, s in enumerate(storages):
        ctx = f"storages[{i}]."
        scope = s.get("scope") if isinstance(s, dict) else None
        if scope not in SCOPES:
            raise c.fail(f"{ctx}scope {scope!r} is not one of {SCOPES}")
        sid, nbytes = c.int(s, "id", ctx=ctx), c.int(s, "nbytes", ctx=ctx)
        if 0 <= counts[scope] <= sid:
            raise c.fail(f"{ctx}id {sid} out of range")
        covered = 0
        for j, p in enumerate(sorted(c.get(s, "pieces", list, ctx), key=lambda p: p.get("storage_offset", 0))):
            pctx = f"{ctx}pieces[{j}]."
            ch = c.int(p, "chunk", ctx=pctx)
            off, n = c.int(p, "chunk_offset", ctx=pctx), c.int(p, "nbytes", ctx=pctx)
            if ch >= len(chunks) or off + n > chunks[ch]["raw_len"]:
                raise c.fail(f"{pctx}bytes lie outside chunk {ch}")
            if c.int(p, "storage_offset", ctx=pctx) != covered:
                raise c.fail(f"{pctx}pieces do not tile the storage (gap or overlap at byte {covered})")
            covered += n
        if covered != nbytes:
            raise c.fail(f"{ctx}pieces cover {covered} of {nbytes} bytes")


def check_tensor_extents(tensors: list[dict], storage_nbytes: dict[int, int], where: str) -> None:
    """Every tensor's elements must lie inside its storage extent."""
    for i, t in enumerate(tensors):
        n = storage_nbytes.get(t["storage"])
        if n is None:
            raise CorruptCheckpointError(f"invalid {where}: tensor {i} views storage {t['storage']}, "
                                         "which no part holds", path=where)
        if tensor_end(t) > n:
            raise CorruptCheckpointError(f"invalid {where}: tensor {i} reaches byte {tensor_end(t)} of a "
                                         f"{n}-byte storage", path=where)
