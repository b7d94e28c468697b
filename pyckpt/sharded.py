"""Sharded state: DTensors (FSDP2 ``fully_shard``, ``get_state_dict`` with sharded options) and
``ZeroRedundancyOptimizer`` state, saved by each rank from its own shards and restored on any
number of ranks (docs/FORMAT.md §12 "Sharded tensors").

Saving (``split`` + ``plan``/``add_to_part``, called by ``Checkpointer.save``): every DTensor of the
state is taken out of the replicated tree (a ``null`` stays at its place); each rank writes the
local shard it holds, straight from the live tensor (no gather, no full copy), and its part records
the tensor's key path, dtype, global shape and the box (offsets, shape) of each shard it wrote.
A ``Replicate`` mesh dimension is written by its coordinate-0 ranks only.

Loading (``restore``, called by ``Checkpointer.restore``): every part lists every rank's boxes, so
each rank computes, from the checkpoint alone (no metadata exchange between ranks), which saved
shards overlap the box it needs and reads only the bytes of those (chunk granularity: a chunk is
read and verified whole). Targets come from ``into``: a DTensor is filled in place with its local
box (the new world size decides it), a plain tensor with the whole tensor; without a target the
whole tensor comes back as a plain tensor. Put the result back with
``torch.distributed.checkpoint.state_dict.set_state_dict``.

ZeRO-1 (``zero_state_dict`` / ``load_zero_state_dict``): ``consolidate_state_dict`` gathers the
whole optimizer state to one rank, so pyckpt never calls it. Each rank saves, as its per-rank
state, the state of the parameters it owns under their *global* index, plus the (global)
hyper-parameters; any set of such dicts loads through ZeRO's own ``load_state_dict``, which keeps
the entries of the parameters the loading rank owns (same world size: exactly its own).
"""
from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from . import reader, shard_format, tree
from .dtypes import code_of, dtype_of
from .errors import CorruptCheckpointError, PyckptError, UnsupportedStateError
from .planner import Storage, _check_tensor, pack

log = logging.getLogger("pyckpt")


_DTENSOR: list = []  # [DTensor class or None], resolved once


def _dtensor_type() -> type | None:
    if not _DTENSOR:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # torch built without distributed
            DTensor = None
        _DTENSOR.append(DTensor)
    return _DTENSOR[0]


def _may_hold_dtensors() -> bool:
    """A DTensor needs a device mesh, which needs an initialized process group: without one the
    state walk is skipped (it would cost every save a pass over the state)."""
    import torch.distributed as dist

    # The process-group check first: importing torch.distributed.tensor costs ~0.6 s (sympy), which a
    # single-process job should never pay.
    return dist.is_available() and dist.is_initialized() and _dtensor_type() is not None


def _is_dtensor(v: Any) -> bool:
    dt = _dtensor_type()
    return dt is not None and isinstance(v, dt)


# -- saving ---------------------------------------------------------------------------------------
@dataclass
class ShardPlan:
    """This rank's sharded tensors of one save: the JSON entries and the storages it writes."""

    entries: list[dict] = field(default_factory=list)
    storages: list[Storage] = field(default_factory=list)
    keeps: list[torch.Tensor] = field(default_factory=list)  # the local shard of each storage
    bases: list[int] = field(default_factory=list)  # its address
    chunks: list = field(default_factory=list)  # the chunks add_chunks packed them into

    def addr(self, sid: int) -> int:
        return self.bases[sid] + self.storages[sid].start

    def keep_alive(self) -> list[torch.Tensor]:
        return list(self.keeps)

    def release(self) -> None:
        self.keeps = []


def _path(key: list) -> str:
    return "/".join(map(str, key))


def split(state: Any) -> tuple[Any, list[tuple[list, Any]]]:
    """``state`` with every DTensor replaced by None (containers on the way copied, the caller's
    untouched), and the (key path, DTensor) pairs taken out. Raises ``UnsupportedStateError`` for a
    DTensor inside a tuple or under a key that is not a string or an integer."""
    if not _may_hold_dtensors():
        return state, []
    if type(state) is tree.Flat:  # encoded already (transparent lazy capture)
        dt = _dtensor_type()
        if not any(issubclass(tp, dt) for tp in set(map(type, state.tensors))):  # a few types, thousands of tensors
            return state, []
        # FSDP2 state under lazy capture: decoded back to containers, so the one walk below decides.
        tensors = state.tensors
        state = tree.unflatten(state.tree, lambda i, into, path: tensors[i])
    found: list[tuple[list, Any]] = []

    def walk(v: Any, key: list, depth: int) -> Any:
        if _is_dtensor(v):
            found.append((key, v))
            return None
        if depth > shard_format.MAX_KEY_DEPTH or isinstance(v, torch.Tensor):
            return v
        if isinstance(v, dict):
            for k, x in v.items():
                if type(k) not in (str, int) and _is_dtensor(x):
                    raise UnsupportedStateError(f"cannot save a DTensor under the key {k!r} of {_path(key)!r}: "
                                                "only string and integer keys", key=_path(key))
            return {k: walk(x, key + [k], depth + 1) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x, key + [i], depth + 1) for i, x in enumerate(v)]
        if type(v) is tuple and any(_is_dtensor(x) for x in v):
            raise UnsupportedStateError(f"cannot save a DTensor inside the tuple at {_path(key)!r}: "
                                        "put it in a list or dict", key=_path(key))
        return v

    rest = walk(state, [], 0)
    return (rest, found) if found else (state, [])


def _check_placements(dt: Any, path: str) -> None:
    from torch.distributed.tensor import Replicate, Shard

    for p in dt.placements:
        if type(p) is not Shard and type(p) is not Replicate:
            hint = "reduce it first (full_tensor() or redistribute)" if p.is_partial() else \
                "only Shard(d) and Replicate() placements are supported"
            raise UnsupportedStateError(f"cannot save the DTensor at {path!r}: placement {p} ({hint})", key=path)


def local_box(dt: Any) -> tuple[list[int], list[int]] | None:
    """(offsets, shape) of this rank's local piece of DTensor ``dt`` in the global tensor; None when
    this rank is not in its mesh."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if dt.device_mesh.get_coordinate() is None:
        return None
    shape, offsets = compute_local_shape_and_global_offset(dt.shape, dt.device_mesh, dt.placements)
    return list(offsets), list(shape)


def _writes(dt: Any) -> bool:
    """Whether this rank writes its piece: for each Replicate mesh dimension, coordinate 0 does."""
    from torch.distributed.tensor import Replicate

    coord = dt.device_mesh.get_coordinate()
    return coord is not None and all(c == 0 for c, p in zip(coord, dt.placements) if isinstance(p, Replicate))


def plan(found: list[tuple[list, Any]]) -> ShardPlan:
    """Entries and storages of this rank's shards (validated before anything is written)."""
    out = ShardPlan()
    for key, dt in found:
        path = _path(key)
        _check_placements(dt, path)
        local = _check_tensor(dt.to_local(), path)
        code = code_of(dt.dtype)
        entry = {"key": key, "dtype": code, "shape": list(dt.shape), "requires_grad": bool(dt.requires_grad),
                 "device": str(local.device), "placements": [str(p) for p in dt.placements],
                 "mesh_shape": list(dt.device_mesh.shape), "shards": []}
        box = local_box(dt)
        if box is not None and list(local.shape) != box[1]:
            raise UnsupportedStateError(f"cannot save the DTensor at {path!r}: its local tensor has shape "
                                        f"{tuple(local.shape)}, its placements say {tuple(box[1])} (padded?)",
                                        key=path)
        if box is not None and _writes(dt) and local.numel() > 0:
            if not local.is_contiguous():
                local = local.contiguous()  # kept alive by the plan until captured
            sid = len(out.storages)
            isz = local.element_size()
            out.storages.append(Storage(sid, local.numel() * isz, min(isz, 8), local.device, 0))
            out.keeps.append(local)
            out.bases.append(local.data_ptr())
            entry["shards"].append({"offsets": box[0], "shape": box[1], "storage": sid})
        out.entries.append(entry)
    return out


def check_alone(sp: ShardPlan) -> None:
    """A save by this rank alone (a Checkpointer whose coordinator has one rank: the default) must hold
    every element of each sharded tensor here. Otherwise its checkpoint would commit and then be
    refused by every reader, whose check is that the parts' shards tile each tensor (docs/FORMAT.md
    §12), while retention deleted the good checkpoints before it. Raises ``UnsupportedStateError``."""
    for e in sp.entries:
        held, total = sum(math.prod(s["shape"]) for s in e["shards"]), math.prod(e["shape"])
        if held != total:
            path = _path(e["key"])
            raise UnsupportedStateError(
                f"cannot save the DTensor at {path!r} from this rank alone: the shards here hold {held} of its "
                f"{total} elements (device mesh {tuple(e['mesh_shape'])}); create the Checkpointer on every rank "
                "with coordinator=pyckpt.StoreCoordinator() and call save() on every rank", key=path)


def keep_alive(rank_plan: Any) -> list[torch.Tensor]:
    """The shard tensors the engine reads until the save is captured (none without shards)."""
    sp = getattr(rank_plan, "shards", None)
    return sp.keep_alive() if sp is not None else []


def add_chunks(sp: ShardPlan, chunks: list, chunk_bytes: int) -> None:
    """Pack the shard storages into the rank's chunk list (after its other sections)."""
    first = len(chunks)
    pack(sp.storages, chunk_bytes, chunks)
    sp.chunks = chunks[first:]


def storages_json(rank_plan: Any) -> list[dict]:
    """The part's storage records of the shards (known before anything is written: incremental
    saves match chunks by them)."""
    sp = getattr(rank_plan, "shards", None)
    if sp is None:
        return []
    return [{"scope": shard_format.SCOPE, "id": s.id, "nbytes": s.nbytes, "elem_size": s.elem_size,
             "pieces": [{"chunk": p.chunk, "chunk_offset": p.chunk_offset, "storage_offset": p.storage_offset,
                         "nbytes": p.nbytes} for p in s.pieces]} for s in sp.storages]


def add_to_part(part: dict, rank_plan: Any) -> None:
    """Record the shards in this rank's part JSON (after the engine wrote them)."""
    sp = rank_plan.shards
    part["storages"] += storages_json(rank_plan)
    part["sharded"] = {"tensors": sp.entries, "num_storages": len(sp.storages)}


# -- loading --------------------------------------------------------------------------------------
def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _strides(shape: list[int]) -> list[int]:
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= s
    return out[::-1]


def _flat(idx: list[int], shape: list[int]) -> int:
    return sum(i * s for i, s in zip(idx, _strides(shape)))


def _is_run(box_shape: list[int], full: list[int]) -> bool:
    """Whether a box of ``box_shape`` is one contiguous run in a row-major array of shape ``full``:
    extent 1 in the leading dimensions, then any extent in one, then full extents."""
    k = 0
    while k < len(full) and box_shape[k] == 1:
        k += 1
    return all(b == f for b, f in zip(box_shape[k + 1:], full[k + 1:]))


def _locate(container: Any, key: list) -> Any:
    for k in key:
        if isinstance(container, dict):
            container = container.get(k)
        elif isinstance(container, list) and type(k) is int and 0 <= k < len(container):
            container = container[k]
        else:
            return None
    return container


@dataclass
class _Target:
    index: int
    entry: dict
    result: torch.Tensor  # what goes into the returned state (the caller's target, or a new tensor)
    dst: torch.Tensor  # contiguous CPU tensor the box is read into (the caller's, or a fresh one)
    box: tuple[list[int], list[int]]
    live: bool  # dst is the caller's tensor: read through the bounce buffer, after the fresh reads
    sink: torch.Tensor | None = None  # the caller's tensor dst is copied into once every read passed
    new: bool = False  # no target: result is a new tensor, placed by map_location


def has_sharded(op: reader.Opened) -> bool:
    return any(p.get("sharded") is not None for p in op.parts)


def restore(engine: Any, op: reader.Opened, state: Any, into: Any = None, map_location: Any = None) -> Any:
    """Put the sharded tensors of checkpoint ``op`` into ``state`` (its replicated state, loaded
    already, holding None at their places); returns ``state``.

    With ``into``: a DTensor at a tensor's key path gets its local box in place (any world size,
    any even/uneven Shard(0) cut); a plain tensor gets the whole tensor; without a target (or
    without ``into``) the whole tensor comes back as a new plain tensor. Every target is checked
    (dtype, global shape) before anything is read; only the chunks overlapping the boxes this
    rank needs are read, each verified."""
    if not has_sharded(op):
        return state  # (op comes from reader.open_checkpoint, which ran shard_format.check_checkpoint)
    entries = op.parts[0]["sharded"]["tensors"]
    targets, problems = [], []
    for i, e in enumerate(entries):
        t = _target(i, e, _locate(into, e["key"]) if into is not None else None, problems)
        if t is not None:
            targets.append(t)
    if problems:
        raise reader.IntoMismatchError(f"cannot load the sharded tensors of {op.path} into the given targets, "
                                       f"nothing was written; {len(problems)} problem(s):\n  "
                                       + "\n  ".join(problems), problems, [], [])
    fresh_reads, live_reads, copies = [], [], []
    for t in targets:
        _plan_reads(op, t, fresh_reads, live_reads, copies)
    _read(engine, op, fresh_reads, fresh=True)
    _read(engine, op, live_reads, fresh=False)
    for src, dst in copies:
        _bitwise_copy(dst, src)
    for t in targets:
        if t.sink is not None:
            _bitwise_copy(t.sink, t.dst)
        _place(state, t, op.path, map_location)
    return state


def _target(i: int, e: dict, tgt: Any, problems: list[str]) -> _Target | None:
    dt = dtype_of(e["dtype"])
    name = _path(e["key"])
    if tgt is not None and not isinstance(tgt, torch.Tensor):
        tgt = None
    if tgt is not None:
        if list(tgt.shape) != e["shape"] or tgt.dtype != dt:
            problems.append(f"{name!r}: checkpoint {dt} {tuple(e['shape'])}, target {tgt.dtype} {tuple(tgt.shape)}")
            return None
    if _is_dtensor(tgt):
        try:
            _check_placements(tgt, name)
        except UnsupportedStateError as exc:
            problems.append(str(exc))
            return None
        box = local_box(tgt)
        if box is None:
            return None  # this rank holds no piece of it
        local = tgt.to_local()
        if list(local.shape) != box[1]:
            problems.append(f"{name!r}: the target's local tensor has shape {tuple(local.shape)}, not {tuple(box[1])}")
            return None
        return _into(i, e, tgt, local, box, dt)
    box = ([0] * len(e["shape"]), list(e["shape"]))
    if tgt is not None:
        return _into(i, e, tgt, tgt, box, dt)
    fresh = torch.empty(e["shape"], dtype=dt)
    return _Target(i, e, fresh, fresh, box, False, new=True)


def _into(i: int, e: dict, result: Any, local: torch.Tensor, box: tuple, dt: torch.dtype) -> _Target:
    """Read straight into ``local`` when it is a contiguous CPU tensor, else into a fresh buffer
    copied into it afterwards."""
    if local.is_contiguous() and local.device.type == "cpu":
        return _Target(i, e, result, local, box, True)
    return _Target(i, e, result, torch.empty(box[1], dtype=dt), box, False, sink=local)


def _plan_reads(op: reader.Opened, t: _Target, fresh: list, live: list, copies: list) -> None:
    """Byte ranges of saved shards that overlap ``t.box``: straight into ``t.dst`` where the overlap
    is one contiguous run in both, else the covering span into a scratch buffer copied afterwards."""
    toff, tshape = t.box
    isz = dtype_of(t.entry["dtype"]).itemsize
    overlapping = []
    for pi, part in enumerate(op.parts):
        for s in part["sharded"]["tensors"][t.index]["shards"]:
            lo = [max(a, b) for a, b in zip(s["offsets"], toff)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(s["offsets"], s["shape"], toff, tshape)]
            if any(h <= l for l, h in zip(lo, hi)) or _numel(s["shape"]) == 0 or _numel(tshape) == 0:
                continue
            overlapping.append((pi, s, lo, hi))
    shard_format.check_no_overlap([(s["offsets"], s["shape"]) for _, s, _, _ in overlapping],
                                  repr(_path(t.entry["key"])), op.path)
    covered = sum(_numel([h - l for l, h in zip(lo, hi)]) for _, _, lo, hi in overlapping)
    if covered != _numel(tshape):
        raise CorruptCheckpointError(f"invalid {op.path}: the shards of {_path(t.entry['key'])!r} cover "
                                     f"{covered} of the {_numel(tshape)} elements this rank needs", path=op.path)
    out = live if t.live else fresh
    for pi, s, lo, hi in overlapping:
        storage = _shard_storage(op, pi, s["storage"])
        ishape = [h - l for l, h in zip(lo, hi)]
        src_lo = [a - o for a, o in zip(lo, s["offsets"])]
        dst_lo = [a - o for a, o in zip(lo, toff)]
        first = _flat(src_lo, s["shape"])
        last = _flat([h - 1 - o for h, o in zip(hi, s["offsets"])], s["shape"]) + 1
        if _is_run(ishape, s["shape"]) and _is_run(ishape, tshape):
            addr = t.dst.data_ptr() + _flat(dst_lo, tshape) * isz
            out.append((pi, storage, first * isz, last * isz, addr))
            continue
        scratch = torch.empty((last - first) * isz, dtype=torch.uint8)
        fresh.append((pi, storage, first * isz, last * isz, scratch.data_ptr()))
        # The span starts at src_lo; view it with the shard's strides and cut the overlap out.
        dt = t.dst.dtype
        src = torch.empty((0,), dtype=dt).set_(scratch.untyped_storage(), 0, ishape, _strides(s["shape"]))
        dst = t.dst.view(tshape)[tuple(slice(a, a + n) for a, n in zip(dst_lo, ishape))]
        copies.append((src, dst))


def _shard_storage(op: reader.Opened, pi: int, sid: int) -> dict:
    index = op.__dict__.setdefault("_shard_storages", {})  # per part: id -> storage, built once
    if pi not in index:
        index[pi] = {s["id"]: s for s in op.parts[pi]["storages"] if s["scope"] == shard_format.SCOPE}
    if sid in index[pi]:
        return index[pi][sid]
    raise CorruptCheckpointError(f"invalid {op.path}: rank {pi}'s shard storage {sid} is missing", path=op.path)


def _read(engine: Any, op: reader.Opened, reads: list, fresh: bool) -> None:
    """Read bytes [lo, hi) of each (part, storage) to its address: only the pieces (and so the
    chunks) that overlap the range, every chunk verified."""
    if not reads:
        return
    chunks: dict[tuple[int, int], tuple] = {}
    with reader._FileTable(op) as files:
        for pi, s, lo, hi, addr in reads:
            for p in s["pieces"]:
                a, b = max(lo, p["storage_offset"]), min(hi, p["storage_offset"] + p["nbytes"])
                if a >= b:
                    continue
                key = (pi, p["chunk"])
                if key not in chunks:
                    chunks[key] = reader._chunk_spec(files, op.parts[pi]["chunks"][p["chunk"]], [])
                chunks[key][6].append((p["chunk_offset"] + a - p["storage_offset"], addr + a - lo, b - a, -1))
        keys = list(chunks)
        errors = engine.read(files.paths, [chunks[k] for k in keys], True, fds=files.fds, direct=fresh)
        reader._raise_errors(errors, keys, op, files)


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bitwise_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    with torch.no_grad():
        it = _SAME_SIZE_INT.get(src.element_size())
        if it is not None and src.dtype == dst.dtype:
            dst.view(it).copy_(src.view(it))
        else:
            dst.copy_(src)


def _empty_slot(parent: Any, k: Any) -> bool:
    """Whether ``parent[k]`` exists and is None: where a sharded tensor goes (null in the tree, 1.2)."""
    ok = (isinstance(parent, dict) and k in parent) or (isinstance(parent, list) and type(k) is int
                                                        and 0 <= k < len(parent))
    return ok and parent[k] is None


def _place(state: Any, t: _Target, path: str, map_location: Any) -> None:
    key = t.entry["key"]
    parent = _locate(state, key[:-1])
    k = key[-1]
    if not _empty_slot(parent, k):
        raise CorruptCheckpointError(f"invalid {path}: the state has no empty place for the sharded tensor "
                                     f"{_path(key)!r}", path=path)
    value = t.result
    if t.new:  # placed like any loaded tensor
        value = value.to(reader._map_device(t.entry["device"], map_location, _path(key)))
        if t.entry["requires_grad"] and (value.dtype.is_floating_point or value.dtype.is_complex):
            value.requires_grad_(True)
    parent[k] = value


# -- ZeroRedundancyOptimizer ----------------------------------------------------------------------
def zero_state_dict(opt: Any) -> dict:
    """This rank's share of a ``ZeroRedundancyOptimizer``'s state, without any communication: the
    state of the parameters it owns, keyed by their global index, and the global hyper-parameters
    (what a scheduler changed). Save it as the rank's ``rank_state``."""
    groups = opt.param_groups
    index = {id(p): i for i, p in enumerate(p for g in groups for p in g["params"])}
    local = opt.optim.state_dict()
    local_params = [p for g in opt.optim.param_groups for p in g["params"]]
    state = {index[id(local_params[li])]: s for li, s in local["state"].items()}
    pgs = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(p)] for p in g["params"]]}
           for g in groups]
    return {"zero": 1, "world_size": opt.world_size, "state": state, "param_groups": pgs}


def load_zero_state_dict(opt: Any, saved: dict | list[dict]) -> None:
    """Load ``zero_state_dict`` output into a ``ZeroRedundancyOptimizer``.

    Pass this rank's own dict when the world size is unchanged; pass every saved rank's dict (in
    any order) to load on another number of ranks: ZeRO keeps the entries of the parameters each
    rank owns now. Raises ``PyckptError`` when the dicts do not cover the saved ranks' state."""
    many = saved if isinstance(saved, list) else [saved]
    for d in many:
        if not (isinstance(d, dict) and d.get("zero") == 1 and isinstance(d.get("state"), dict)
                and isinstance(d.get("param_groups"), list)):
            raise PyckptError("not a pyckpt ZeRO state (from pyckpt.sharded.zero_state_dict)")
    ws = {d["world_size"] for d in many}
    if len(ws) != 1:
        raise PyckptError(f"ZeRO states of different world sizes {sorted(ws)} cannot be merged")
    saved_ws = ws.pop()
    # A list is every saved rank's state (also a list of one: saved by one rank, loaded on more).
    if not isinstance(saved, list) and saved_ws != opt.world_size:
        raise PyckptError(f"this ZeRO state was saved by one of {saved_ws} ranks, this job has {opt.world_size}: "
                          "pass every saved rank's state to load it on another number of ranks")
    if isinstance(saved, list) and len(many) != saved_ws:
        raise PyckptError(f"{len(many)} ZeRO states given, the job that saved them had {saved_ws} ranks")
    state: dict = {}
    for d in many:
        state.update(d["state"])
    n = sum(len(g["params"]) for g in opt.param_groups)
    if any(type(k) is not int or not 0 <= k < n for k in state):
        raise PyckptError("the ZeRO state names parameters this optimizer does not have")
    opt.load_state_dict({"state": state, "param_groups": [dict(g) for g in many[0]["param_groups"]]})


# -- transparent mode (hooks in discovery.py / transparent.py) -------------------------------------
def storage_ptr(t: torch.Tensor) -> int:
    """``t.untyped_storage().data_ptr()``, for a DTensor that of its local tensor (a DTensor's own
    storage has no data pointer)."""
    if type(t) not in _PLAIN_TENSORS and _is_dtensor(t):  # called per tensor per snapshot: plain ones first
        t = t.to_local()
    return t.untyped_storage().data_ptr()


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def storage_bytes(t: torch.Tensor) -> tuple[Any, int]:
    """(key, bytes) of the storage ``t`` views, for the memory tier's size check (``shm_tier._nbytes``).
    A DTensor's own storage has no data pointer; it counts its global bytes: what all ranks' shards
    take in /dev/shm together, and the same on every rank (the check's verdict must agree)."""
    if type(t) not in _PLAIN_TENSORS and _is_dtensor(t):
        return ("dtensor", id(t)), t.numel() * t.element_size()
    st = t.untyped_storage()
    return (t.device, st.data_ptr()), st.nbytes()


def is_fsdp(m: torch.nn.Module) -> bool:
    """Whether ``m`` holds sharded (DTensor) parameters: ``fully_shard``, tensor parallel."""
    return any(_is_dtensor(p) for p in m.parameters())


def is_zero(o: Any) -> bool:
    """Whether ``o`` is a ZeroRedundancyOptimizer."""
    # Only a script that imported torch.distributed.optim can have one; importing it here would cost
    # the first snapshot ~0.25 s of TorchScript compilation.
    mod = sys.modules.get("torch.distributed.optim")
    zero = getattr(mod, "ZeroRedundancyOptimizer", None)
    return zero is not None and isinstance(o, zero)


def drop_inner(optimizers: list) -> list:
    """The optimizers without the local optimizers ZeroRedundancyOptimizers made (saved through them)."""
    inner = {id(o.optim) for o in optimizers if is_zero(o)}
    return [o for o in optimizers if id(o) not in inner]


def optimizer_state_dict(o: Any) -> Any:
    """``o.state_dict()``; for ZeRO its per-rank share (``zero_state_dict``: no gather). FSDP2
    optimizers' state dicts hold DTensors, saved shard by shard."""
    return zero_state_dict(o) if is_zero(o) else o.state_dict()


def load_optimizer(o: Any, saved: Any) -> None:
    """Inverse of ``optimizer_state_dict``."""
    if is_zero(o):
        load_zero_state_dict(o, saved)
    else:
        o.load_state_dict(saved)


def split_per_rank(optimizers: list, objects: dict, rank_state: dict) -> None:
    """Move ZeRO optimizers' per-rank state out of the replicated ``objects`` into ``rank_state["zero"]``."""
    for i, o in enumerate(optimizers):
        if is_zero(o):
            rank_state.setdefault("zero", {})[str(i)] = objects["optimizers"][str(i)]
            objects["optimizers"][str(i)] = None


def merge_per_rank(state: dict, rank_state: dict, resized_from: str | None = None) -> None:
    """Inverse of ``split_per_rank``. ``resized_from``: the checkpoint's path when it was written by
    another number of ranks; each ZeRO optimizer then gets every saved rank's share (read here, all
    of them: ZeRO's ``load_state_dict`` keeps what this rank owns now)."""
    zero = rank_state.get("zero") or {}
    if not isinstance(zero, dict):
        raise PyckptError("the checkpoint's ZeRO optimizer state is malformed")
    every = [(rs or {}).get("zero") or {} for rs in rank_states(resized_from)] if zero and resized_from else None
    for i, saved in zero.items():
        if i not in state["optimizers"]:
            raise PyckptError(f"the checkpoint holds ZeRO state for optimizer {i!r}, which it does not list")
        if every is not None:
            if not all(isinstance(z, dict) and i in z for z in every):
                raise PyckptError(f"a saved rank of {resized_from} holds no ZeRO state for optimizer {i!r}")
            saved = [z[i] for z in every]
        state["optimizers"][i] = saved


def optimizer_targets(optimizers: list, path: str, into: dict) -> dict:
    """``into`` plus, for every sharded optimizer state tensor of checkpoint ``path`` (key
    ``optimizers/<i>/state/<param index>/<name>``), an empty DTensor shaped like its parameter, so
    the restore reads only this rank's box of it (a fresh optimizer has no state to read into)."""
    op = reader.open_checkpoint(path)
    if not has_sharded(op):
        return into
    params = [[p for g in o.param_groups for p in g["params"]] for o in optimizers]
    opt_into: dict = {}
    for e in op.parts[0]["sharded"]["tensors"]:
        key = e["key"]
        if len(key) != 5 or key[0] != "optimizers" or key[2] != "state" or type(key[3]) is not int:
            continue
        i = int(key[1]) if isinstance(key[1], str) and key[1].isdigit() else -1
        if not (0 <= i < len(params) and 0 <= key[3] < len(params[i])):
            continue
        p = params[i][key[3]]
        if _is_dtensor(p) and list(p.shape) == e["shape"] and code_of(p.dtype) == e["dtype"]:
            with torch.no_grad():
                t = torch.empty_like(p)
            opt_into.setdefault(key[1], {}).setdefault("state", {}).setdefault(key[3], {})[key[4]] = t
    if opt_into:
        into = dict(into, optimizers=opt_into)
    return into


def resize_problem(rank_state: Any) -> str | None:
    """Why a transparent checkpoint's sharded state cannot resume on another number of ranks (for
    ``resume.check_resizable``), or None. Neither kind needs anything: FSDP2 (DTensor) state is
    re-cut for the live DTensors by ``reader.load_section``; a ZeroRedundancyOptimizer's per-rank
    shares are all read by every rank (``merge_per_rank``) and ZeRO keeps what each rank owns now."""
    zero = rank_state.get("zero") if isinstance(rank_state, dict) else None
    if zero is not None and not isinstance(zero, dict):
        return "its ZeroRedundancyOptimizer state is malformed"
    return None


def rank_states(path: str) -> list[Any]:
    """Every saved rank's ``rank_state`` of checkpoint ``path`` (validated, on the CPU), e.g. to pass
    every rank's ``zero_state_dict`` to ``load_zero_state_dict`` on another number of ranks."""
    from ._native import get_engine

    op = reader.open_checkpoint(path)
    return [reader.load_section(get_engine(), op, "rank", r, None, "cpu") for r in range(len(op.parts))]


def first_values(params: list) -> torch.Tensor:
    """The first element of each parameter's local data (a DTensor's local shard; empty shards
    skipped), as one float tensor: a cheap fingerprint that needs no collective."""
    vals = []
    for p in params:
        t = p.to_local() if _is_dtensor(p) else p
        if t.numel():
            vals.append(t.detach().reshape(-1)[0].float())
    return torch.stack(vals) if vals else torch.zeros(0)


def inspect_leaves(op: reader.Opened, leaf: type) -> list[tuple[str, Any]]:
    """``pyckpt inspect``'s leaves for the sharded tensors: (key path, ``leaf``(...)) with the global
    dtype and shape, the bytes of all shards, and the ranks whose parts hold them."""
    if not has_sharded(op):
        return []
    out = []
    for i, e in enumerate(op.parts[0]["sharded"]["tensors"]):
        isz = dtype_of(e["dtype"]).itemsize
        raw = stored = 0.0
        holders = []
        for pi, part in enumerate(op.parts):
            shards = part["sharded"]["tensors"][i]["shards"]
            if shards:
                holders.append(str(pi))
            for s in shards:
                for p in _shard_storage(op, pi, s["storage"])["pieces"]:
                    ch = part["chunks"][p["chunk"]]
                    raw += p["nbytes"]
                    stored += p["nbytes"] * (ch["stored_len"] / ch["raw_len"] if ch["raw_len"] else 1.0)
        ratio = raw / stored if stored else 1.0
        out.append((_path(e["key"]), leaf(dtype=e["dtype"], shape=list(e["shape"]), nbytes=_numel(e["shape"]) * isz,
                                          stored_bytes=int(round(stored)), codec_ratio=round(ratio, 3),
                                          rank=",".join(holders) or None, device=e["device"],
                                          requires_grad=e["requires_grad"], storage=None,
                                          shards=sum(len(p["sharded"]["tensors"][i]["shards"]) for p in op.parts))))
    return out
