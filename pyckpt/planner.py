"""Tensors -> storages -> pieces -> chunks.

Views of one storage are grouped so the storage is saved once (its used byte
extent only) and restored as one storage shared by the same views. Storages
are cut into pieces packed into chunks of at most ``chunk_bytes``: small
storages share a chunk, large ones span several. A chunk holds pieces of one
element size only, so the byte-plane codec can split it by significance.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .dtypes import code_of
from .errors import UnsupportedStateError

# Extent starts are aligned down to this so every view's offset inside the
# saved extent stays a whole number of its elements (all item sizes divide 16).
_EXTENT_ALIGN = 16


@dataclass
class Storage:
    """One saved byte extent of a torch storage."""

    id: int
    nbytes: int
    elem_size: int
    device: torch.device
    addr: int  # address of the extent's first byte (borrowed; see `keep`)
    keep: torch.Tensor | None  # keeps the memory at `addr` alive until the save is captured
    pieces: list["Piece"] = field(default_factory=list)


@dataclass
class Piece:
    storage: int
    storage_offset: int  # bytes from the extent start
    chunk: int
    chunk_offset: int
    nbytes: int
    src_addr: int = 0
    src_device: int = -1  # engine convention: -1 = host memory


@dataclass
class Chunk:
    elem_size: int
    pieces: list[Piece] = field(default_factory=list)
    raw_len: int = 0


@dataclass
class Described:
    """Output of ``describe``: JSON tensor entries plus the storages they view."""

    entries: list[dict]
    storages: list[Storage]


def _check_tensor(t: torch.Tensor, path: str) -> torch.Tensor:
    if type(t).__name__ == "DTensor":  # Checkpointer.save takes DTensors out (pyckpt/sharded.py)
        raise UnsupportedStateError(f"cannot save the DTensor at {path!r} here: sharded tensors are saved by "
                                    "pyckpt.Checkpointer.save as part of `state` (each rank writes its shards), "
                                    "not in rank_state or by pyckpt.save; or pass dtensor.full_tensor()", key=path)
    if t.layout != torch.strided or t.is_quantized or t.device.type == "meta" or t.is_nested:
        raise UnsupportedStateError(f"cannot save tensor at {path!r}: layout {t.layout}, device {t.device} "
                                    "(only dense strided tensors are supported; convert with .to_dense())", key=path)
    if code_of(t.dtype) is None:
        raise UnsupportedStateError(f"cannot save tensor at {path!r}: dtype {t.dtype} has no byte layout", key=path)
    t = t.detach()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()  # lazy bits are not in the bytes: materialize
    return t


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[start, end) bytes of ``t`` inside its storage (empty tensors: (start, start))."""
    isz = t.element_size()
    start = t.storage_offset() * isz
    if t.numel() == 0:
        return start, start
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return start, start + (last + 1) * isz


def describe(tensors: list[torch.Tensor], paths: list[str]) -> Described:
    """Group tensors by storage and describe each as a format tensor entry."""
    checked = [_check_tensor(t, p) for t, p in zip(tensors, paths)]
    grads = [t.requires_grad for t in tensors]  # before detach() drops it
    groups: dict[tuple, list[int]] = {}
    spans = []
    for i, t in enumerate(checked):
        st = t.untyped_storage()
        # Zero-byte storages all sit at address 0: never merge those.
        key = (t.device, st.data_ptr()) if st.nbytes() else ("empty", i)
        groups.setdefault(key, []).append(i)
        spans.append(_byte_span(t))
    entries: list[dict] = [{}] * len(checked)
    storages: list[Storage] = []
    for members in groups.values():
        storages.append(_storage_for(len(storages), members, checked, spans, entries))
    for e, g in zip(entries, grads):
        e["requires_grad"] = g
    return Described(entries, storages)


def _storage_for(sid: int, members: list[int], ts: list[torch.Tensor], spans: list, entries: list) -> Storage:
    used = [spans[i] for i in members if spans[i][1] > spans[i][0]]
    lo = (min(s for s, _ in used) // _EXTENT_ALIGN) * _EXTENT_ALIGN if used else 0
    hi = max((e for _, e in used), default=lo)
    # The codec splits by at most 8-byte words (complex128 = two float64 words).
    sizes = {min(ts[i].element_size(), 8) for i in members}
    first = ts[members[0]]
    for i in members:
        t = ts[i]
        entries[i] = {
            "dtype": code_of(t.dtype), "shape": list(t.shape), "stride": list(t.stride()),
            "storage_offset": (spans[i][0] - lo) // t.element_size() if used else 0,
            "storage": sid, "nbytes": t.numel() * t.element_size(), "device": str(t.device),
        }
    addr = first.untyped_storage().data_ptr() + lo
    return Storage(sid, hi - lo, sizes.pop() if len(sizes) == 1 else 1, first.device, addr, first)


def assign_owners(storages: list[Storage], world_size: int) -> list[int]:
    """Deterministic, byte-balanced owner rank per storage (greedy, largest first).

    Every rank computes the same answer from the same replicated state, so no
    communication is needed to agree who writes what."""
    load = [0] * world_size
    owners = [0] * len(storages)
    for s in sorted(storages, key=lambda s: (-s.nbytes, s.id)):
        r = min(range(world_size), key=lambda k: (load[k], k))
        owners[s.id] = r
        load[r] += max(s.nbytes, 1)
    return owners


def pack(storages: list[Storage], chunk_bytes: int, chunks: list[Chunk] | None = None) -> list[Chunk]:
    """Cut ``storages`` into pieces and pack them into chunks (appending to ``chunks``)."""
    chunks = [] if chunks is None else chunks
    open_chunk: dict[int, int] = {}  # elem_size -> index of the chunk being filled
    for s in sorted(storages, key=lambda s: (s.elem_size, s.id)):
        # A big storage's chunks hold nothing else, so a frozen weight's chunks stay unchanged
        # when a small neighbour changes (incremental saves write only changed chunks).
        big = s.nbytes >= chunk_bytes // 4
        if big:
            open_chunk.pop(s.elem_size, None)
        done = 0
        while done < s.nbytes:
            ci = open_chunk.get(s.elem_size)
            if ci is None or chunks[ci].raw_len >= chunk_bytes:
                chunks.append(Chunk(s.elem_size))
                ci = open_chunk[s.elem_size] = len(chunks) - 1
            c = chunks[ci]
            n = min(s.nbytes - done, chunk_bytes - c.raw_len)
            dev = s.device.index if s.device.type == "cuda" else -1
            p = Piece(s.id, done, ci, c.raw_len, n, s.addr + done, dev)
            c.pieces.append(p)
            s.pieces.append(p)
            c.raw_len += n
            done += n
        if big:
            open_chunk.pop(s.elem_size, None)
    return chunks
