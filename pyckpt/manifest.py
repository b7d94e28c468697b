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
import re
from typing import Any

from . import __version__, layout, shard_format
from .dtypes import CODE_TO_DTYPE, dtype_of
from .errors import CorruptCheckpointError, FormatVersionError
from .safe_fs import CheckpointDir, full_path

FORMAT = "pyckpt"
# 1.1: MANIFEST.json carries "manifest_crc32c" (docs/FORMAT.md §3); 1.0 manifests (without it) still load.
# 1.2: parts may hold sharded tensors (a "sharded" section, storages of scope "shard"; docs/FORMAT.md §12).
#      Chunks may reference a sibling checkpoint's data file (../step-P/..., incremental chunks; §14).
FORMAT_VERSION = (1, 3)
MAX_MANIFEST_BYTES = 16 << 20
MAX_PART_BYTES = 1 << 30
CODECS = ("none", "zstd")
SCOPES = ("replicated", "rank", "shard")  # "shard": 1.2, storages of a part's sharded tensors (shard_format)
# Every integer of a manifest or part fits a signed 64-bit integer (torch and the engine take int64/uint64).
MAX_INT = (1 << 63) - 1
MAX_U32 = (1 << 32) - 1
# No chunk decodes to more than MAX_CHUNK_BYTES (the engine caps chunk_bytes there), and a zstd
# chunk to at most MAX_ZSTD_RATIO times its stored bytes (a zstd block holds <= 128 KiB and takes
# >= 4 bytes). Mirrors kMaxChunkBytes / kMaxZstdRatio in csrc/include/pyckpt/engine.h.
MAX_CHUNK_BYTES = 1 << 31
MAX_ZSTD_RATIO = 32768
CHECKSUM_KEY = "manifest_crc32c"
_TRAILER = b',"manifest_crc32c":'
_TRAILER_RE = re.compile(rb',"manifest_crc32c":(0|[1-9][0-9]{0,9})\}')


def crc32c(data: bytes) -> int:
    """CRC32C via the engine (the same function that checksums chunks)."""
    from ._native import native

    return native().crc32c(data)


def seal(m: dict) -> bytes:
    """The bytes of MANIFEST.json for manifest ``m``, with its checksum as the last member.

    The file is ``BODY,"manifest_crc32c":N}`` where BODY is the canonical
    JSON of ``m`` without its closing brace and N the CRC32C of BODY, so a
    change to any byte is detected (docs/FORMAT.md §3). Every writer of a
    manifest calls this on the final dict."""
    body = dumps({k: v for k, v in m.items() if k != CHECKSUM_KEY})
    if not (body.startswith(b"{") and body.endswith(b"}") and len(body) > 2):
        raise ValueError("a manifest is a non-empty JSON object")
    head = body[:-1]
    return head + _TRAILER + str(crc32c(head)).encode("ascii") + b"}"


def dumps(obj: Any) -> bytes:
    """Canonical JSON bytes (no NaN: non-finite floats are tagged by ``tree``)."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")


def build_manifest(step: int, world_size: int, parts: list[dict], seq: int | None = None) -> dict:
    """The manifest; ``parts[r] = {"rank", "file", "nbytes", "crc32c"}``.

    ``seq``: the commit sequence number in a Checkpointer root (orders commits
    there; docs/FORMAT.md "Commit protocol"); omitted for ``pyckpt.save``."""
    import torch

    now = datetime.datetime.now(datetime.timezone.utc)
    m = {
        "format": FORMAT, "format_version": list(FORMAT_VERSION), "step": step, "world_size": world_size,
        "created_by": {"pyckpt": __version__, "torch": torch.__version__},
        "created_at": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "parts": parts,
    }
    if seq is not None:
        m["seq"] = seq
    return m


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {_short(dup)} in a JSON object")
    return d


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _short(v: Any) -> str:
    """``repr(v)`` cut short: messages name what is wrong without echoing file contents at length."""
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _parse(raw: bytes | bytearray, path: str, what: str) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptCheckpointError(f"{what} {path} is not valid UTF-8 (at byte {e.start})", path=path) from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
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

    def int(self, obj: dict, key: str, lo: int = 0, ctx: str = "", hi: int = MAX_INT) -> int:
        v = obj.get(key) if isinstance(obj, dict) else None
        if type(v) is not int or not lo <= v <= hi:
            raise self.fail(f"{ctx}{key!r} must be an integer in [{lo}, {hi}], got {_short(v)}")
        return v

    def get(self, obj: dict, key: str, typ: type | tuple, ctx: str = "") -> Any:
        v = obj.get(key) if isinstance(obj, dict) else None
        if not isinstance(v, typ) or isinstance(v, bool) and typ is not bool:
            raise self.fail(f"{ctx}{key!r} is missing or has the wrong type")
        return v


def read_manifest(ckpt_dir: str, cdir: CheckpointDir | None = None) -> dict:
    """Read and validate ``MANIFEST.json`` (not the parts): version, checksum, fields."""
    return parse_manifest(read_manifest_bytes(ckpt_dir, cdir), ckpt_dir)


def read_manifest_bytes(ckpt_dir: str, cdir: CheckpointDir | None = None) -> bytearray:
    """The bytes of ``MANIFEST.json`` (size-capped, opened inside the checkpoint), not yet checked."""
    if cdir is None:
        with CheckpointDir(ckpt_dir) as d:
            return d.read(layout.MANIFEST, MAX_MANIFEST_BYTES, "manifest")
    return cdir.read(layout.MANIFEST, MAX_MANIFEST_BYTES, "manifest")


def parse_manifest(raw: bytes | bytearray, ckpt_dir: str) -> dict:
    """Parse and validate the bytes of ``ckpt_dir``'s ``MANIFEST.json``: version, checksum, fields."""
    path = os.path.join(ckpt_dir, layout.MANIFEST)
    m = _parse(raw, path, "manifest")
    c = _Check(path)
    if m.get("format") != FORMAT:
        raise c.fail(f"'format' is {_short(m.get('format'))}, not {FORMAT!r}")
    ver = m.get("format_version")
    if not (isinstance(ver, list) and len(ver) >= 2 and all(type(v) is int and v >= 0 for v in ver[:2])):
        raise c.fail(f"'format_version' must be [major, minor], got {_short(ver)}")
    # The version decides how to read the rest, the checksum included: check it first.
    if ver[0] != FORMAT_VERSION[0]:
        raise FormatVersionError(
            f"{path} uses checkpoint format {ver[0]}.{ver[1]}; this pyckpt {__version__} reads "
            f"{FORMAT_VERSION[0]}.x only: upgrade pyckpt to load it", path=path)
    _check_seal(c, raw, m, (ver[0], ver[1]))
    c.int(m, "step")
    if "seq" in m:
        c.int(m, "seq")
    ws = c.int(m, "world_size", 1)
    parts = c.get(m, "parts", list)
    if len(parts) != ws:
        raise c.fail(f"{len(parts)} parts listed for world_size {ws}")
    for r, p in enumerate(parts):
        if c.int(p, "rank", ctx=f"parts[{r}].") != r:
            raise c.fail(f"parts[{r}] has rank {p['rank']}")
        p["file"] = _safe_rel(c, c.get(p, "file", str, f"parts[{r}]."))
        c.int(p, "nbytes", ctx=f"parts[{r}].", hi=MAX_PART_BYTES)
        c.int(p, "crc32c", ctx=f"parts[{r}].", hi=MAX_U32)
    return m


def _check_seal(c: _Check, raw: bytes | bytearray, m: dict, ver: tuple[int, int]) -> None:
    """The manifest checksum (format >= 1.1; optional in 1.0, checked when present)."""
    if CHECKSUM_KEY not in m:
        if ver >= (1, 1):
            raise c.fail(f"format {ver[0]}.{ver[1]} manifest lacks its {CHECKSUM_KEY!r}")
        return
    at = raw.rfind(_TRAILER)
    tail = _TRAILER_RE.fullmatch(bytes(raw[at:])) if at > 0 else None
    if tail is None or int(tail.group(1)) != m[CHECKSUM_KEY]:
        raise c.fail(f"{CHECKSUM_KEY!r} is not the last member, written as ,\"{CHECKSUM_KEY}\":N}}")
    if crc32c(raw[:at]) != m[CHECKSUM_KEY]:
        raise c.fail("checksum mismatch: the manifest was changed after it was written")


def _safe_rel(c: _Check, rel: str) -> str:
    """A relative path that stays inside the checkpoint (or names a sibling step directory)."""
    norm = posixpath.normpath(rel)
    if rel.startswith("/") or "\\" in rel or "\0" in rel or norm in (".", "..") or norm.startswith("../.."):
        raise c.fail(f"path {_short(rel)} is not a relative path inside the checkpoint")
    if norm.startswith("../") and layout.parse_step(norm.split("/")[1]) is None:
        raise c.fail(f"path {_short(rel)} leaves the checkpoint directory")
    return norm


def read_part(ckpt_dir: str, info: dict, cdir: CheckpointDir | None = None) -> dict:
    """Read a part listed in the manifest, check its size and CRC32C, validate it."""
    return parse_part(read_part_bytes(ckpt_dir, info, cdir), ckpt_dir, info)


def read_part_bytes(ckpt_dir: str, info: dict, cdir: CheckpointDir | None = None) -> bytearray:
    """The bytes of the part ``info`` (a validated manifest entry) names, checked against its size and CRC32C."""
    if cdir is None:
        with CheckpointDir(ckpt_dir) as d:
            raw = d.read(info["file"], MAX_PART_BYTES, "part")
    else:
        raw = cdir.read(info["file"], MAX_PART_BYTES, "part")
    if len(raw) != info["nbytes"] or crc32c(raw) != info["crc32c"]:
        path = full_path(ckpt_dir, info["file"])
        raise CorruptCheckpointError(
            f"part {path} does not match MANIFEST.json (size {len(raw)} vs {info['nbytes']}, or checksum)", path=path)
    return raw


def parse_part(raw: bytes | bytearray, ckpt_dir: str, info: dict) -> dict:
    """Parse and validate the bytes of the part ``info`` names (``read_part_bytes`` checked them)."""
    path = full_path(ckpt_dir, info["file"])
    part = _parse(raw, path, "part")
    validate_part(part, path, info["rank"])
    return part


def validate_part(part: dict, path: str, rank: int) -> None:
    """Structural checks of one part (docs/FORMAT.md "Reader requirements").

    Paths are normalized in place, so later steps use the checked form."""
    c = _Check(path)
    if c.int(part, "rank") != rank:
        raise c.fail(f"part says rank {part['rank']}, manifest says {rank}")
    sizes = _validate_files(c, c.get(part, "files", list))
    chunks = c.get(part, "chunks", list)
    _validate_chunks(c, chunks, sizes)
    counts = _validate_sections(c, part)
    counts["shard"] = shard_format.section_storages(c, part)  # 1.2: shards of sharded tensors
    _validate_storages(c, c.get(part, "storages", list), chunks, counts)
    shard_format.check_storage_sizes(c, part)


def _validate_files(c: _Check, files: list) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for i, f in enumerate(files):
        rel = _safe_rel(c, c.get(f, "path", str, f"files[{i}]."))
        if rel in sizes:
            raise c.fail(f"files[{i}]: {_short(rel)} is listed twice")
        f["path"] = rel
        sizes[rel] = c.int(f, "nbytes", ctx=f"files[{i}].")
    return sizes


def _validate_chunks(c: _Check, chunks: list, sizes: dict[str, int]) -> None:
    spans: dict[str, list[tuple[int, int, int]]] = {}
    for i, ch in enumerate(chunks):
        ctx = f"chunks[{i}]."
        f = posixpath.normpath(c.get(ch, "file", str, ctx))
        if f not in sizes:
            raise c.fail(f"{ctx}file {_short(f)} is not listed in 'files'")
        ch["file"] = f
        off, n = c.int(ch, "offset", ctx=ctx), c.int(ch, "stored_len", ctx=ctx)
        raw = c.int(ch, "raw_len", ctx=ctx, hi=MAX_CHUNK_BYTES)
        c.int(ch, "crc32c", ctx=ctx, hi=MAX_U32), c.int(ch, "raw_crc32c", ctx=ctx, hi=MAX_U32)
        if ch.get("elem_size") not in (1, 2, 4, 8) or type(ch.get("elem_size")) is not int:
            raise c.fail(f"{ctx}elem_size must be 1, 2, 4 or 8")
        if ch.get("codec") not in CODECS:
            raise c.fail(f"{ctx}codec {_short(ch.get('codec'))} is unknown (known: {', '.join(CODECS)})")
        if ch["codec"] == "none" and n != raw:
            raise c.fail(f"{ctx}stored_len {n} != raw_len {raw} for codec 'none'")
        if ch["codec"] == "zstd" and raw > n * MAX_ZSTD_RATIO:
            raise c.fail(f"{ctx}raw_len {raw} is more than zstd can decode from {n} stored bytes")
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
        if not isinstance(sec, dict) or "tree" not in sec:
            raise c.fail(f"{key!r} must be null or an object with 'tree', 'tensors', 'num_storages'")
        n = c.int(sec, "num_storages", ctx=f"{key}.")
        counts[scope] = n
        tensors = c.get(sec, "tensors", list, f"{key}.")
        if not _tensors_ok(tensors, n):
            for i, t in enumerate(tensors):  # the first bad entry, with its precise message
                _validate_tensor(c, t, n, f"{key}.tensors[{i}].")
    return counts


# Item size by dtype code, for the per-entry fast checks (dtype_of keeps the error message).
_ITEMSIZE = {code: dt.itemsize for code, dt in CODE_TO_DTYPE.items()}


def _tensors_ok(tensors: list, num_storages: int) -> bool:
    """True when every entry passes ``_validate_tensor``; False when one may not.

    A checkpoint holds thousands of entries: one loop over locals keeps the
    well-formed case cheap. It is at least as strict as ``_validate_tensor``
    (True implies that accepts every entry); False sends the caller to it
    for the first bad entry's message."""
    sizes, devices = _ITEMSIZE, set()
    try:
        for t in tensors:
            if type(t) is not dict:
                return False
            isz, shape, stride = sizes.get(t.get("dtype")), t.get("shape"), t.get("stride")
            if isz is None or type(shape) is not list or type(stride) is not list or len(shape) != len(stride):
                return False
            numel = 1
            for v in shape:
                if type(v) is not int or not 0 <= v <= MAX_INT:
                    return False
                numel *= v
            for v in stride:
                if type(v) is not int or not 0 <= v <= MAX_INT:
                    return False
            nb, off, sid, dev = t.get("nbytes"), t.get("storage_offset"), t.get("storage"), t.get("device")
            if (type(nb) is not int or nb != numel * isz or nb > MAX_INT or type(off) is not int
                    or not 0 <= off <= MAX_INT or type(sid) is not int or not 0 <= sid < num_storages):
                return False
            if dev not in devices:
                if not _device_ok(dev):
                    return False
                devices.add(dev)
    except TypeError:  # an unhashable dtype or device
        return False
    return True


def _device_ok(dev: Any) -> bool:
    """``_check_device`` as a predicate."""
    if type(dev) is not str:
        return False
    try:
        _check_device(_Check(""), dev, "")
    except CorruptCheckpointError:
        return False
    return True


def _validate_tensor(c: _Check, t: dict, num_storages: int, ctx: str) -> None:
    dt = dtype_of(c.get(t, "dtype", str, ctx), c.path)
    shape, stride = c.get(t, "shape", list, ctx), c.get(t, "stride", list, ctx)
    if len(shape) != len(stride) or not all(type(v) is int and 0 <= v <= MAX_INT for v in shape + stride):
        raise c.fail(f"{ctx}shape/stride must be equal-length lists of integers in [0, 2**63)")
    numel = 1
    for s in shape:
        numel *= s
    if numel * dt.itemsize > MAX_INT:
        raise c.fail(f"{ctx}shape {_short(shape)} has more bytes than a tensor can hold")
    if c.int(t, "nbytes", ctx=ctx) != numel * dt.itemsize:
        raise c.fail(f"{ctx}nbytes {t['nbytes']} != prod(shape) * itemsize = {numel * dt.itemsize}")
    c.int(t, "storage_offset", ctx=ctx)
    if c.int(t, "storage", ctx=ctx) >= num_storages:
        raise c.fail(f"{ctx}storage {t['storage']} does not exist ({num_storages} storages)")
    _check_device(c, c.get(t, "device", str, ctx), ctx)


def _check_device(c: _Check, dev: str, ctx: str) -> None:
    import torch

    try:
        d = torch.device(dev)
    except (RuntimeError, ValueError, TypeError):
        raise c.fail(f"{ctx}device {_short(dev)} is not a torch device") from None
    if d.type == "meta":
        raise c.fail(f"{ctx}device 'meta' holds no data: no checkpoint stores a meta tensor")


def tensor_end(t: dict) -> int:
    """Byte just past the last element of tensor entry ``t`` inside its storage extent."""
    isz = dtype_of(t["dtype"]).itemsize
    if t["nbytes"] == 0:
        return 0
    last = sum((s - 1) * st for s, st in zip(t["shape"], t["stride"]))
    return (t["storage_offset"] + last + 1) * isz


def _validate_storages(c: _Check, storages: list, chunks: list, counts: dict[str, int]) -> None:
    if not _storages_ok(storages, [ch["raw_len"] for ch in chunks], counts):
        _check_storages(c, storages, chunks, counts)


def _storages_ok(storages: list, raw_lens: list[int], counts: dict[str, int]) -> bool:
    """True when every storage record passes ``_check_storages``; False when one may not.

    The fast case, as for tensors (``_tensors_ok``): at least as strict as
    the detailed checks, and pieces must already be listed in storage order
    (writers list them so; others go to the detailed checks, which sort)."""
    used = [0] * len(raw_lens)
    nchunks = len(raw_lens)
    for s in storages:
        if type(s) is not dict:
            return False
        scope, sid, nbytes, pieces = s.get("scope"), s.get("id"), s.get("nbytes"), s.get("pieces")
        if (scope not in SCOPES or type(sid) is not int or not 0 <= sid <= MAX_INT or type(nbytes) is not int
                or not 0 <= nbytes <= MAX_INT or type(pieces) is not list or 0 <= counts[scope] <= sid):
            return False
        covered = 0
        for p in pieces:
            if type(p) is not dict:
                return False
            ch, off, n, at = p.get("chunk"), p.get("chunk_offset"), p.get("nbytes"), p.get("storage_offset")
            if (type(ch) is not int or not 0 <= ch < nchunks or type(off) is not int or not 0 <= off <= MAX_INT
                    or type(n) is not int or not 0 <= n <= MAX_INT or type(at) is not int or at != covered):
                return False
            raw, u = raw_lens[ch], used[ch] + n
            if off + n > raw or u > raw:
                return False
            used[ch] = u
            covered += n
        if covered != nbytes:
            return False
    return True


def _check_storages(c: _Check, storages: list, chunks: list, counts: dict[str, int]) -> None:
    """Every check of the storage records, one field at a time: raises naming the first bad one."""
    used = [0] * len(chunks)  # piece bytes taken from each chunk: memory stays bounded by the data files
    for i, s in enumerate(storages):
        ctx = f"storages[{i}]."
        scope = s.get("scope") if isinstance(s, dict) else None
        if scope not in SCOPES:
            raise c.fail(f"{ctx}scope {_short(scope)} is not one of {SCOPES}")
        sid, nbytes = c.int(s, "id", ctx=ctx), c.int(s, "nbytes", ctx=ctx)
        if 0 <= counts[scope] <= sid:
            raise c.fail(f"{ctx}id {sid} out of range")
        pieces = c.get(s, "pieces", list, ctx)
        for j, p in enumerate(pieces):
            c.int(p, "storage_offset", ctx=f"{ctx}pieces[{j}].")
        covered = 0
        for j, p in enumerate(sorted(pieces, key=lambda p: p["storage_offset"])):
            pctx = f"{ctx}pieces[{j}]."
            ch = c.int(p, "chunk", ctx=pctx)
            off, n = c.int(p, "chunk_offset", ctx=pctx), c.int(p, "nbytes", ctx=pctx)
            if ch >= len(chunks) or off + n > chunks[ch]["raw_len"]:
                raise c.fail(f"{pctx}bytes lie outside chunk {ch}")
            used[ch] += n
            if used[ch] > chunks[ch]["raw_len"]:
                raise c.fail(f"{pctx}the pieces of chunk {ch} add up to more than its {chunks[ch]['raw_len']} bytes")
            if p["storage_offset"] != covered:
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
