"""Read a committed checkpoint back into tensors (or verify it).

Every byte goes through ``engine.read`` with checksum verification. A
storage whose only tensor has a contiguous CPU ``into=`` destination of the
same dtype and shape is read straight into that tensor; every other storage
is read into a fresh byte buffer, from which views are rebuilt (so views
that shared a storage share one again) and then placed by ``map_location``
or copied into their ``into=`` destination.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from . import layout, manifest, tree
from .dtypes import dtype_of
from .errors import CorruptCheckpointError, PyckptError
from ._native import CODEC_IDS


@dataclass
class Opened:
    """A validated checkpoint: its manifest and every part."""

    path: str
    manifest: dict
    parts: list[dict]

    @property
    def step(self) -> int:
        return self.manifest["step"]


def open_checkpoint(path: str) -> Opened:
    """Read and validate the manifest and all parts of checkpoint directory ``path``."""
    m = manifest.read_manifest(path)
    parts = [manifest.read_part(path, info) for info in m["parts"]]
    for part in parts:
        _check_files(path, part["files"])
    if parts[0].get("replicated") is None:
        raise CorruptCheckpointError(f"{os.path.join(path, layout.part_name(0))} lacks the replicated state "
                                     "section", path=os.path.join(path, layout.part_name(0)))
    return Opened(path, m, parts)


def _check_files(ckpt: str, files: list[dict]) -> None:
    """Every data file exists with at least its recorded size (truncation is caught here)."""
    for f in files:
        p = os.path.normpath(os.path.join(ckpt, f["path"]))
        try:
            size = os.path.getsize(p)
        except OSError:
            raise CorruptCheckpointError(f"data file {p} is missing", path=p) from None
        if size < f["nbytes"]:
            raise CorruptCheckpointError(f"data file {p} is truncated: {size} of {f['nbytes']} bytes", path=p)


def _storages(op: Opened, scope: str, rank: int) -> dict[int, tuple[int, dict]]:
    """storage id -> (part index, storage JSON) for ``scope``."""
    found: dict[int, tuple[int, dict]] = {}
    parts = range(len(op.parts)) if scope == "replicated" else [rank]
    for pi in parts:
        for s in op.parts[pi]["storages"]:
            if s["scope"] == scope:
                if s["id"] in found:
                    where = os.path.join(op.path, layout.part_name(pi))
                    raise CorruptCheckpointError(f"storage {s['id']} is stored twice ({where})", path=where)
                found[s["id"]] = (pi, s)
    return found


def _map_device(saved: str, map_location: Any, key: str) -> torch.device:
    if map_location is not None:
        return torch.device(map_location)
    dev = torch.device(saved)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PyckptError(f"tensor {key!r} was saved on {saved} but CUDA is not available here: "
                          "pass map_location='cpu' to load it onto the CPU")
    return dev


def _direct_target(entry: dict, dst: torch.Tensor | None, nbytes: int, users: int) -> bool:
    """Can this storage be read straight into ``dst`` with no second copy?"""
    return (dst is not None and users == 1 and dst.device.type == "cpu" and dst.is_contiguous()
            and dst.dtype == dtype_of(entry["dtype"]) and list(dst.shape) == entry["shape"]
            and entry["storage_offset"] == 0 and entry["nbytes"] == nbytes and nbytes > 0
            and _is_contiguous(entry))


def _is_contiguous(e: dict) -> bool:
    expected = 1
    for s, st in reversed(list(zip(e["shape"], e["stride"]))):
        if s != 1 and st != expected:
            return False
        expected *= s
    return True


class _SectionReader:
    """Reads one scope ("replicated" or "rank") of an opened checkpoint."""

    def __init__(self, op: Opened, scope: str, rank: int) -> None:
        self.op = op
        self.sec = op.parts[0]["replicated"] if scope == "replicated" else op.parts[rank]["rank_state"]
        self.where = os.path.join(op.path, layout.part_name(0 if scope == "replicated" else rank))
        self.storages = _storages(op, scope, rank)
        nbytes = {sid: s["nbytes"] for sid, (_, s) in self.storages.items()}
        manifest.check_tensor_extents(self.sec["tensors"], nbytes, self.where)

    def walk(self, visit, into: Any = None) -> None:
        """Visit every tensor leaf (checking its id) without building tensors."""
        n = len(self.sec["tensors"])

        def checked(i, d, p):
            if not 0 <= i < n:
                raise CorruptCheckpointError(f"invalid {self.where}: tree leaf {p!r} names tensor {i} of {n}",
                                             path=self.where)
            visit(i, d, p)

        tree.unflatten(self.sec["tree"], checked, into, self.where)

    def read(self, engine: Any, into: Any, map_location: Any) -> Any:
        entries = self.sec["tensors"]
        dests: dict[int, torch.Tensor | None] = {}
        self.walk(lambda i, d, p: dests.__setitem__(i, d), into)
        bufs, direct = self._read_storages(engine, entries, dests)
        moved: dict[tuple[int, torch.device], torch.Tensor] = {}
        return tree.unflatten(self.sec["tree"], lambda i, d, p: self._tensor(
            i, entries[i], d, p, bufs, direct, moved, map_location), into, self.where)

    def _read_storages(self, engine: Any, entries: list[dict], dests: dict) -> tuple[dict, set]:
        users: dict[int, int] = {}
        for e in entries:
            users[e["storage"]] = users.get(e["storage"], 0) + 1
        bufs: dict[int, torch.Tensor] = {}
        direct: set[int] = set()
        for i, e in enumerate(entries):
            sid = e["storage"]
            if sid in bufs:
                continue
            nbytes = self.storages[sid][1]["nbytes"]
            if _direct_target(e, dests.get(i), nbytes, users[sid]):
                bufs[sid] = dests[i]
                direct.add(sid)
            else:
                bufs[sid] = torch.empty(nbytes, dtype=torch.uint8)
        read_into(engine, self.op, {sid: (self.storages[sid], b.data_ptr()) for sid, b in bufs.items()})
        return bufs, direct

    def _tensor(self, i, e, dst, key, bufs, direct, moved, map_location) -> torch.Tensor:
        sid = e["storage"]
        if sid in direct:
            return dst
        dt = dtype_of(e["dtype"], self.where)
        buf = bufs[sid]
        if dst is None:
            dev = _map_device(e["device"], map_location, key)
            if dev.type != "cpu":
                buf = moved.setdefault((sid, dev), buf.to(dev))  # one copy per storage keeps views shared
        t = _view(buf, dt, e)
        if dst is not None:
            return _copy_into(dst, t, key)
        if e.get("requires_grad") and (dt.is_floating_point or dt.is_complex):
            t.requires_grad_(True)
        return t


def _view(buf: torch.Tensor, dt: torch.dtype, e: dict) -> torch.Tensor:
    """A ``dt`` tensor viewing ``buf``'s storage as entry ``e`` describes."""
    if dt == torch.complex32:
        # torch warns on every complex32 allocation; the user already chose the dtype.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="ComplexHalf support is experimental")
            t = torch.empty((0,), dtype=dt, device=buf.device)
    else:
        t = torch.empty((0,), dtype=dt, device=buf.device)
    return t.set_(buf.untyped_storage(), e["storage_offset"], e["shape"], e["stride"])


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _copy_into(dst: torch.Tensor, src: torch.Tensor, key: str) -> torch.Tensor:
    if dst.shape != src.shape:
        raise PyckptError(f"cannot load {key!r} into the given tensor: checkpoint shape {tuple(src.shape)}, "
                          f"destination shape {tuple(dst.shape)}")
    with torch.no_grad():
        if dst.dtype == src.dtype and src.element_size() in _SAME_SIZE_INT:
            it = _SAME_SIZE_INT[src.element_size()]
            dst.view(it).copy_(src.view(it))  # bitwise, and works for dtypes without copy kernels
        else:
            dst.copy_(src)
    return dst


def read_into(engine: Any, op: Opened, targets: dict[int, tuple[tuple[int, dict], int]]) -> None:
    """Read storages (``sid -> ((part, storage json), dst_addr)``) with verification."""
    files, chunks, names = _FileTable(op), {}, {}
    for (pi, s), addr in targets.values():
        for p in s["pieces"]:
            key = (pi, p["chunk"])
            if key not in chunks:
                chunks[key] = _chunk_spec(files, op.parts[pi]["chunks"][p["chunk"]], [])
            chunks[key][6].append((p["chunk_offset"], addr + p["storage_offset"], p["nbytes"], -1))
    keys = list(chunks)
    _raise_errors(engine.read(files.paths, [chunks[k] for k in keys], True), keys, op, files)


class _FileTable:
    def __init__(self, op: Opened) -> None:
        self.root = op.path
        self.paths: list[str] = []
        self.index: dict[str, int] = {}

    def idx(self, rel: str) -> int:
        if rel not in self.index:
            self.index[rel] = len(self.paths)
            self.paths.append(os.path.normpath(os.path.join(self.root, rel)))
        return self.index[rel]


def _chunk_spec(files: _FileTable, ch: dict, pieces: list) -> tuple:
    return (files.idx(ch["file"]), ch["offset"], ch["stored_len"], ch["raw_len"], ch["crc32c"],
            CODEC_IDS[ch["codec"]], pieces)


def _raise_errors(errors: list, keys: list, op: Opened, files: _FileTable) -> None:
    if not errors:
        return
    ci, msg = errors[0]
    pi, chunk = keys[ci]
    path = files.paths[files.idx(op.parts[pi]["chunks"][chunk]["file"])]
    more = f" (and {len(errors) - 1} more bad chunks)" if len(errors) > 1 else ""
    raise CorruptCheckpointError(f"{path}: chunk {chunk} of rank {pi} is damaged: {msg}{more}", path=path, chunk=chunk)


def load_section(engine: Any, op: Opened, scope: str, rank: int, into: Any = None, map_location: Any = None) -> Any:
    """Rebuild the replicated state (scope "replicated") or ``rank``'s rank_state (scope "rank")."""
    if scope == "rank" and (rank >= len(op.parts) or op.parts[rank].get("rank_state") is None):
        return None
    return _SectionReader(op, scope, rank).read(engine, into, map_location)


def verify(engine: Any, path: str) -> Opened:
    """Validate ``path`` fully: manifest, parts, trees, and every chunk's checksum."""
    op = open_checkpoint(path)
    _SectionReader(op, "replicated", 0).walk(lambda i, d, p: None)
    for r, part in enumerate(op.parts):
        if part.get("rank_state") is not None:
            _SectionReader(op, "rank", r).walk(lambda i, d, p: None)
    keys = [(pi, ci) for pi, part in enumerate(op.parts) for ci in range(len(part["chunks"]))]
    batch: list[tuple[int, int]] = []
    for key in keys:
        batch.append(key)
        if sum(op.parts[p]["chunks"][c]["raw_len"] for p, c in batch) >= _VERIFY_BATCH_BYTES:
            _verify_batch(engine, op, batch)
            batch = []
    _verify_batch(engine, op, batch)
    return op


_VERIFY_BATCH_BYTES = 256 << 20


def _verify_batch(engine: Any, op: Opened, keys: list[tuple[int, int]]) -> None:
    """Decode ``keys`` chunks into scratch memory: checks the stored CRC, the
    codec frame, and the CRC of the decoded bytes (``raw_crc32c``)."""
    from ._native import native

    files = _FileTable(op)
    chunks = [op.parts[pi]["chunks"][ci] for pi, ci in keys]
    scratch = torch.empty(sum(c["raw_len"] for c in chunks), dtype=torch.uint8)
    addrs, base = [], scratch.data_ptr()
    for c in chunks:
        addrs.append(base)
        base += c["raw_len"]
    specs = [_chunk_spec(files, c, [(0, a, c["raw_len"], -1)] if c["raw_len"] else []) for c, a in zip(chunks, addrs)]
    _raise_errors(engine.read(files.paths, specs, True), keys, op, files)
    for i, (c, a) in enumerate(zip(chunks, addrs)):
        if native().crc32c_addr(a, c["raw_len"]) != c["raw_crc32c"]:
            _raise_errors([(i, "decoded bytes do not match raw_crc32c")], keys, op, files)
