"""The ``sharded`` section of a part file (format 1.2): validation of what a checkpoint says about
sharded tensors, before any of it is used (docs/FORMAT.md §12).

A part's ``sharded`` object lists every sharded tensor of the state (its key path, dtype and
global shape, the same list in every part) and the shards *this* rank wrote: each a dense
row-major box ``offsets``/``shape`` of the global tensor held in a storage of scope ``"shard"``
of the same part. Pure JSON checks here (no torch.distributed), so ``manifest`` can call them.
"""
from __future__ import annotations

import os
from typing import Any

from .dtypes import dtype_of
from .errors import CorruptCheckpointError

SCOPE = "shard"
MAX_KEY_DEPTH = 200
_MAX_INT = (1 << 63) - 1


def section_storages(c: Any, part: dict) -> int:
    """Check ``part["sharded"]`` (``c``: manifest._Check of the part); the number of shard storages.

    -1 when the part has no sharded section (then no storage may have scope ``"shard"``)."""
    sec = part.get("sharded")
    if sec is None:
        return -1
    if not isinstance(sec, dict):
        raise c.fail("'sharded' must be an object")
    n = c.int(sec, "num_storages")
    used: set[int] = set()
    for i, t in enumerate(c.get(sec, "tensors", list, "sharded.")):
        _check_entry(c, t, n, used, f"sharded.tensors[{i}].")
    if len(used) != n:
        raise c.fail(f"sharded: {n} shard storages declared, {len(used)} used by shards")
    return n


def _ints(c: Any, v: Any, ctx: str, what: str, length: int | None = None) -> list[int]:
    if not (isinstance(v, list) and all(type(x) is int and 0 <= x <= _MAX_INT for x in v)):
        raise c.fail(f"{ctx}{what} must be a list of integers in [0, 2**63)")
    if length is not None and len(v) != length:
        raise c.fail(f"{ctx}{what} has {len(v)} dimensions, the tensor {length}")
    return v


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _check_entry(c: Any, t: Any, n: int, used: set[int], ctx: str) -> None:
    if not isinstance(t, dict):
        raise c.fail(f"{ctx[:-1]} must be an object")
    key = c.get(t, "key", list, ctx)
    if not (1 <= len(key) <= MAX_KEY_DEPTH and all(type(k) in (str, int) for k in key)):
        raise c.fail(f"{ctx}key must be a non-empty list of strings and integers")
    dt = dtype_of(c.get(t, "dtype", str, ctx), c.path)
    shape = _ints(c, t.get("shape"), ctx, "shape")
    if _numel(shape) * dt.itemsize > _MAX_INT:
        raise c.fail(f"{ctx}shape has more bytes than a tensor can hold")
    c.get(t, "requires_grad", bool, ctx)
    c.get(t, "device", str, ctx)
    for j, s in enumerate(c.get(t, "shards", list, ctx)):
        sctx = f"{ctx}shards[{j}]."
        off = _ints(c, s.get("offsets") if isinstance(s, dict) else None, sctx, "offsets", len(shape))
        sh = _ints(c, s.get("shape"), sctx, "shape", len(shape))
        if any(o + k > g for o, k, g in zip(off, sh, shape)):
            raise c.fail(f"{sctx}box offsets {off} shape {sh} lies outside the global shape {shape}")
        sid = c.int(s, "storage", ctx=sctx)
        if sid >= n or sid in used:
            raise c.fail(f"{sctx}storage {sid} is out of range or used twice")
        used.add(sid)


def check_storage_sizes(c: Any, part: dict) -> None:
    """Each shard's storage holds exactly its box's bytes (run after the storages were validated)."""
    sec = part.get("sharded")
    mine = [s for s in part["storages"] if s["scope"] == SCOPE]
    if sec is None:
        if mine:
            raise c.fail(f"storages of scope {SCOPE!r} without a 'sharded' section")
        return
    sizes = {s["id"]: s["nbytes"] for s in mine}
    if len(sizes) != len(mine):
        raise c.fail(f"a storage of scope {SCOPE!r} is listed twice")
    for i, t in enumerate(sec["tensors"]):
        isz = dtype_of(t["dtype"]).itemsize
        for j, s in enumerate(t["shards"]):
            want = _numel(s["shape"]) * isz
            if sizes.get(s["storage"]) != want:
                raise c.fail(f"sharded.tensors[{i}].shards[{j}]: storage {s['storage']} holds "
                             f"{sizes.get(s['storage'])} bytes, the box {want}")


def check_checkpoint(path: str, parts: list[dict]) -> None:
    """Cross-part checks: every part lists the same sharded tensors, and the shards of each tile it
    exactly (their element counts add up to its global size and no two overlap)."""
    secs = [p.get("sharded") for p in parts]
    if all(s is None for s in secs):
        return
    where = os.path.join(path, "rank-00000.json")
    if any(s is None for s in secs):
        r = next(i for i, s in enumerate(secs) if s is None)
        raise CorruptCheckpointError(f"invalid {path}: rank {r}'s part has no 'sharded' section, rank 0's has",
                                     path=where)
    ref = [(t["key"], t["dtype"], t["shape"]) for t in secs[0]["tensors"]]
    for r, sec in enumerate(secs[1:], 1):
        if [(t["key"], t["dtype"], t["shape"]) for t in sec["tensors"]] != ref:
            raise CorruptCheckpointError(f"invalid {path}: rank {r}'s part lists other sharded tensors "
                                         "than rank 0's", path=where)
    for i, (key, _, shape) in enumerate(ref):
        total = sum(_numel(s["shape"]) for sec in secs for s in sec["tensors"][i]["shards"])
        if total != _numel(shape):
            raise CorruptCheckpointError(f"invalid {path}: the shards of sharded tensor "
                                         f"{'/'.join(map(str, key))!r} hold {total} of its {_numel(shape)} "
                                         "elements", path=where)
        check_no_overlap([(s["offsets"], s["shape"]) for sec in secs for s in sec["tensors"][i]["shards"]],
                         repr("/".join(map(str, key))), path)


def check_no_overlap(boxes: list[tuple[list[int], list[int]]], what: str, path: str) -> None:
    """Raise when two of ``boxes`` (offsets, shape) share an element (sweep over dimension 0)."""
    live = sorted((b for b in boxes if _numel(b[1]) > 0), key=lambda b: b[0])
    if live and not live[0][1] and len(live) > 1:  # 0-d: every box is the one element
        raise CorruptCheckpointError(f"invalid {path}: two shards of {what} overlap", path=path)
    if live and not live[0][1]:
        return
    active: list[tuple[list[int], list[int]]] = []
    for off, sh in live:
        active = [a for a in active if a[0][0] + a[1][0] > off[0]]
        for aoff, ash in active:
            if all(max(x, y) < min(x + k, y + m) for x, k, y, m in zip(off, sh, aoff, ash)):
                raise CorruptCheckpointError(f"invalid {path}: two shards of {what} overlap", path=path)
        active.append((off, sh))
