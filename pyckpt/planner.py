"""Tensors -> storages -> pieces -> chunks.

Views of one storage are grouped so the storage is saved once (its used byte
extent only) and restored as one storage shared by the same views. Storages
are cut into pieces packed into chunks of at most ``chunk_bytes``: small
storages share a chunk, large ones span several. A chunk holds pieces of one
element size only, so the byte-plane codec can split it by significance.
"""
from __future__ import annotations

import hashlib
import operator
from dataclasses import dataclass, field
from typing import Any

import torch

from . import metaguard
from .dtypes import DTYPE_TO_CODE, code_of
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
    start: int  # bytes from the torch storage's first byte to the extent's
    pieces: list["Piece"] = field(default_factory=list)


@dataclass
class Piece:
    storage: int
    storage_offset: int  # bytes from the extent start
    chunk: int
    chunk_offset: int
    nbytes: int
    src_device: int = -1  # engine convention: -1 = host memory


@dataclass
class Chunk:
    elem_size: int
    pieces: list[Piece] = field(default_factory=list)
    raw_len: int = 0


@dataclass
class Described:
    """Output of ``describe``: JSON tensor entries plus the storages they view.

    Entries, storages and the pieces ``pack`` cuts them into hold no address: they describe the
    layout, which a later ``describe`` of tensors with the same ``signature`` (the same layout,
    wherever the memory now is) reuses. Addresses belong to one save: ``bases[i]`` is the address
    of the torch storage behind ``storages[i]`` now, and ``keeps[i]`` a tensor of it that keeps the
    memory alive until the save is captured."""

    entries: list[dict]
    storages: list[Storage]
    keeps: list[torch.Tensor]
    bases: list[int]
    signature: list[tuple] | None = None
    columns: Any = None  # ``signature`` by field (_same_layout), made at its first reuse and shared
    as_state_dict: bool = False  # entries record ``requires_grad`` false (describe's argument)

    def addr(self, sid: int) -> int:
        """Address of the first saved byte of storage ``sid`` in this save."""
        return self.bases[sid] + self.storages[sid].start


def _check_tensor(t: torch.Tensor, path: str) -> torch.Tensor:
    """``t`` as its bytes are saved, or ``UnsupportedStateError`` naming ``path``.

    Returns ``t`` itself unless it must change: a lazily conjugated/negated view is materialized, and
    a tensor in an autograd graph is detached so keeping it alive until capture keeps no graph alive."""
    if type(t).__name__ == "DTensor":  # Checkpointer.save takes DTensors out (pyckpt/sharded.py)
        raise UnsupportedStateError(f"cannot save the DTensor at {path!r} here: sharded tensors are saved by "
                                    "pyckpt.Checkpointer.save as part of `state` (each rank writes its shards), "
                                    "not in rank_state or by pyckpt.save; or pass dtensor.full_tensor()", key=path)
    if t.layout != torch.strided or t.is_quantized or t.device.type == "meta" or t.is_nested:
        raise UnsupportedStateError(f"cannot save tensor at {path!r}: {_unsupported_kind(t)}", key=path)
    if code_of(t.dtype) is None:
        raise UnsupportedStateError(f"cannot save tensor at {path!r}: dtype {t.dtype} has no byte layout", key=path)
    if t.is_conj() or t.is_neg():
        return t.detach().resolve_conj().resolve_neg()  # lazy bits are not in the bytes: materialize
    return t.detach() if t.grad_fn is not None else t


def _unsupported_kind(t: torch.Tensor) -> str:
    """What ``t`` is and what to save instead: a quantized or nested tensor's layout is strided too."""
    if t.is_nested:
        return "a nested tensor (only dense tensors are saved; save its components, t.unbind())"
    if t.is_quantized:
        return (f"a quantized tensor ({t.dtype}; only plain dtypes are saved: save t.dequantize(), or "
                "t.int_repr() with its scale and zero point)")
    if t.device.type == "meta":
        return "a meta tensor (it has no data to save; materialize it with .to_empty() and initialize it)"
    return f"a {t.layout} tensor (only dense strided tensors are saved; convert with .to_dense())"


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[start, end) bytes of ``t`` inside its storage (empty tensors: (start, start))."""
    isz = t.element_size()
    start = t.storage_offset() * isz
    if t.numel() == 0:
        return start, start
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return start, start + (last + 1) * isz


# Per-tensor work here runs on the training thread at every snapshot, for every tensor of the state
# (thousands in a transformer with its optimizer): the common case (a dense, contiguous tensor with
# a storage of its own) takes the short path, the general rules above handle the rest.
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def describe(tensors: list[torch.Tensor], paths: list[str], reuse: Described | None = None,
             as_state_dict: bool = False) -> Described:
    """Group tensors by storage and describe each as a format tensor entry.

    ``reuse``: an earlier result. When these tensors have its signature (the same grouping into
    storages, dtypes, shapes, strides, offsets, devices and ``requires_grad``), its entries and
    storages are returned again, with this call's addresses and tensors: a training job saves the
    same tensors at every checkpoint, and rebuilding thousands of entries each time cost the
    training thread time and left the garbage collector tens of thousands of new objects.

    ``as_state_dict``: every entry records ``requires_grad`` false, as torch's ``state_dict()``
    (detached tensors) would give it, while the tensors passed are the parameters themselves."""
    if reuse is not None and reuse.as_state_dict != as_state_dict:
        reuse = None  # its entries record other flags
    if reuse is not None and reuse.signature is not None and len(tensors) == len(reuse.signature):
        same = _same_layout(tensors, reuse)
        if same is not None:
            return Described(reuse.entries, reuse.storages, same[0], same[1], reuse.signature, reuse.columns,
                             as_state_dict)
    groups: dict[tuple, int] = {}  # (device, storage address) -> index of its storage
    members: list[list[int]] = []
    saved: list[torch.Tensor] = []
    spans: list[tuple[int, int]] = []
    signature: list[tuple] = []
    bases: list[int] = []
    strided, codes, plain = torch.strided, DTYPE_TO_CODE, _PLAIN_TYPES
    for i, t in enumerate(tensors):
        grad = t.requires_grad  # as given: a detached copy would lose it
        dtype, dev = t.dtype, t.device
        if (type(t) in plain and t.layout is strided and dtype in codes and not t.is_nested and not t.is_meta
                and not t.is_conj() and not t.is_neg()):
            if t.grad_fn is not None:
                t = t.detach()
        else:
            t = _check_tensor(t, paths[i])
            dtype, dev = t.dtype, t.device
        saved.append(t)
        st = t.untyped_storage()
        ptr = st.data_ptr()
        isz = dtype.itemsize
        lo = t.storage_offset() * isz
        span = (lo, lo + t.numel() * isz) if t.is_contiguous() else _byte_span(t)
        spans.append(span)
        # Zero-byte storages all sit at address 0: never merge those.
        key = (dev, ptr) if st.nbytes() else ("empty", i)
        gid = groups.get(key)
        if gid is None:
            gid = groups[key] = len(members)
            members.append([i])
            bases.append(ptr)
        else:
            members[gid].append(i)
        signature.append((gid, span, dtype, t.shape, t.stride(), dev, grad))
    keeps = [saved[m[0]] for m in members]
    if reuse is not None and reuse.signature == signature:
        return Described(reuse.entries, reuse.storages, keeps, bases, reuse.signature, reuse.columns, as_state_dict)
    devices: dict[torch.device, str] = {}
    entries: list[dict] = [{}] * len(saved)
    storages = [_storage_for(sid, m, saved, spans, entries, devices) for sid, m in enumerate(members)]
    for e, sig in zip(entries, signature):
        e["requires_grad"] = False if as_state_dict else sig[-1]
    return Described(entries, storages, keeps, bases, signature, as_state_dict=as_state_dict)


def layout_digest(d: Described) -> str:
    """A digest of ``d``'s layout that does not depend on devices or addresses: per tensor its storage
    group, byte span, dtype, shape, strides and ``requires_grad``; per storage its size and element
    size (identical on every rank of a data-parallel job; writer.Section.layout_key)."""
    sig = [(g, span, str(dt), tuple(shape), tuple(stride), grad) for g, span, dt, shape, stride, _, grad in d.signature]
    sizes = [(s.nbytes, s.elem_size) for s in d.storages]
    return hashlib.blake2b(repr((sig, sizes)).encode(), digest_size=12).hexdigest()


class _Columns:
    """A signature by field, one list per field (``_same_layout`` compares whole lists)."""

    def __init__(self, signature: list[tuple]) -> None:
        columns = [list(c) for c in zip(*signature)] or [[] for _ in range(7)]  # (no tensors: seven empty lists)
        self.gids, spans, self.dtypes, self.shapes, self.strides, self.devices, self.grads = columns
        self.offsets = [lo // dt.itemsize for (lo, _), dt in zip(spans, self.dtypes)]  # in elements
        self.los = [lo for lo, _ in spans]
        # Zero-byte tensors are grouped by storage object, not address, by describe: never reused here.
        self.empty = any(lo == hi for lo, hi in spans)
        self.complex = any(dt.is_complex for dt in self.dtypes)
        firsts: dict[int, int] = {}
        for i, g in enumerate(self.gids):
            firsts.setdefault(g, i)
        self.firsts = [firsts[g] for g in range(len(firsts))]  # each group's first member
        self.grad_firsts = [j for j, i in enumerate(self.firsts) if self.grads[i]]  # those requiring grad
        self.group_devices = [self.devices[i] for i in self.firsts]
        self.one_device = len(set(self.group_devices)) <= 1  # then distinct groups need distinct bases only
        self.guard: metaguard.MetaGuard | None | bool = None  # None: not made yet; False: not used


def _same_layout(tensors: list[torch.Tensor], reuse: Described) -> tuple[list, list] | None:
    """(keeps, bases) when ``tensors`` have ``reuse.signature``; None when anything differs or is not
    plainly checkable here (``describe`` then decides the long way, with its own checks and errors).

    At every snapshot of a training job the same tensors come back, so this reads only what the
    signature holds and what could make it wrong: each tensor's start address (its storage's address
    follows from the saved offset) and the flags the long path rejects or materializes. The storage
    grouping is proved from addresses: the members of a previous group share a base, and distinct
    groups have distinct (device, base). Types, dtypes, shapes, strides, devices, ``requires_grad``
    and lazy negation are compared in one C++ pass where this torch allows (metaguard.py), else one
    field at a time over all tensors: thousands of tensors at every snapshot."""
    c = reuse.columns
    if c is None:
        c = reuse.columns = _Columns(reuse.signature)
    if c.empty or len(c.gids) != len(tensors):
        return None
    guard = c.guard
    if not (guard and guard.same(tensors)):
        if not _same_attributes(tensors, c):
            return None
        # Made at the first reuse, from tensors just shown to match; one that refuses matching
        # tensors (a tensor object listed twice) is not asked again.
        c.guard = metaguard.make(tensors) if guard is None else False
    try:
        if [t.storage_offset() for t in tensors] != c.offsets:
            return None
    except (RuntimeError, TypeError, AttributeError):
        return None
    bases = list(map(operator.sub, [t.data_ptr() for t in tensors], c.los))
    group = [bases[i] for i in c.firsts]
    # (Hashing device objects costs more than comparing addresses: the common one-device case skips it.)
    distinct = set(group) if c.one_device else set(zip(c.group_devices, group))
    if [group[g] for g in c.gids] != bases or len(distinct) != len(group):
        return None  # a group split, or two merged
    keeps = [tensors[i] for i in c.firsts]
    for j in c.grad_firsts:  # a tensor in an autograd graph: its keep holds no graph (_check_tensor)
        if keeps[j].grad_fn is not None:
            keeps[j] = keeps[j].detach()
    return keeps, group


def _same_attributes(tensors: list[torch.Tensor], c: _Columns) -> bool:
    """``_same_layout``'s metadata comparison read from Python, one field at a time."""
    if not set(map(type, tensors)) <= _PLAIN_SET:
        return False
    strided = torch.strided
    try:
        return not (any([t.layout is not strided for t in tensors]) or [t.dtype for t in tensors] != c.dtypes
                    or [t.shape for t in tensors] != c.shapes or [t.stride() for t in tensors] != c.strides
                    or [t.requires_grad for t in tensors] != c.grads or [t.device for t in tensors] != c.devices
                    or any([t.is_neg() for t in tensors]) or (c.complex and any([t.is_conj() for t in tensors])))
    except (RuntimeError, TypeError, AttributeError):  # strides of a nested or sparse tensor: the long way
        return False


_PLAIN_SET = frozenset(_PLAIN_TYPES)


def _storage_for(sid: int, members: list[int], ts: list[torch.Tensor], spans: list, entries: list,
                 devices: dict[torch.device, str]) -> Storage:
    if len(members) == 1:
        start, end = spans[members[0]]
        used = end > start
        lo = (start // _EXTENT_ALIGN) * _EXTENT_ALIGN if used else 0
        hi = end if used else lo
        elem_size = min(ts[members[0]].element_size(), 8)
    else:
        live = [spans[i] for i in members if spans[i][1] > spans[i][0]]
        used = bool(live)
        lo = (min(s for s, _ in live) // _EXTENT_ALIGN) * _EXTENT_ALIGN if used else 0
        hi = max((e for _, e in live), default=lo)
        # The codec splits by at most 8-byte words (complex128 = two float64 words).
        sizes = {min(ts[i].element_size(), 8) for i in members}
        elem_size = sizes.pop() if len(sizes) == 1 else 1
    for i in members:
        t = ts[i]
        isz = t.element_size()
        dev = t.device
        name = devices.get(dev)
        if name is None:
            name = devices[dev] = str(dev)
        entries[i] = {
            "dtype": DTYPE_TO_CODE[t.dtype], "shape": list(t.shape), "stride": list(t.stride()),
            "storage_offset": (spans[i][0] - lo) // isz if used else 0,
            "storage": sid, "nbytes": t.numel() * isz, "device": name,
        }
    return Storage(sid, hi - lo, elem_size, ts[members[0]].device, lo)


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
            p = Piece(s.id, done, ci, c.raw_len, n, dev)
            c.pieces.append(p)
            s.pieces.append(p)
            c.raw_len += n
            done += n
        if big:
            open_chunk.pop(s.elem_size, None)
    return chunks
