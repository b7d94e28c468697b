"""Read a committed checkpoint back into tensors (or verify it).

Nothing read from a checkpoint is trusted before it is checked: files are
opened inside the checkpoint directory only (``safe_fs``: no symbolic links,
regular files only, sizes from ``fstat``), every manifest and part is
validated (``manifest``) before a byte of tensor data is read, and every
chunk's checksum is verified by the engine.

With ``into=``, every target is checked first (names, shapes, dtypes,
devices; all problems reported in one error before anything is written).
Storages whose only tensor has a contiguous CPU target of the same dtype and
shape are read into that target, through the engine's bounce buffer, so a
chunk's bytes land in the caller's tensor only after its checksum passed.
Every other storage is read into a fresh byte buffer, from which views are
rebuilt (so views that shared a storage share one again) and then placed by
``map_location`` or copied into their target once every read succeeded.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

from . import gcpause, layout, manifest, shard_format, tree
from ._native import CODEC_IDS, cuda_available
from .dtypes import NUMPY_CODES, dtype_of
from .errors import CorruptCheckpointError, PyckptError
from .safe_fs import CheckpointDir, full_path

log = logging.getLogger("pyckpt")


class IntoMismatchError(PyckptError, ValueError):
    """``load(into=...)``: the targets do not fit the checkpoint. Nothing was written.

    ``problems`` lists every problem (one line each); ``unexpected`` the key
    paths of saved tensors without a target, ``missing`` those of targets the
    checkpoint has no tensor for (both only count as problems when strict)."""

    def __init__(self, message: str, problems: list[str], unexpected: list[str], missing: list[str]):
        super().__init__(message)
        self.problems = problems
        self.unexpected = unexpected
        self.missing = missing


@dataclass
class Opened:
    """A validated checkpoint: its manifest and every part.

    ``manifest`` and ``parts`` may be shared with other ``Opened`` of the same
    bytes (``open_checkpoint`` reuses them): treat them as read-only."""

    path: str
    manifest: dict
    parts: list[dict]
    # check_sections passed for these parts (extents, trees): loading need not repeat it.
    sections_checked: bool = field(default=False, repr=False)

    @property
    def step(self) -> int:
        return self.manifest["step"]


@dataclass
class _Validated:
    """The bytes of a checkpoint's manifest and parts, and what validating them gave."""

    raw_manifest: bytearray
    raw_parts: list[bytearray]
    manifest: dict
    parts: list[dict]

    @property
    def nbytes(self) -> int:
        return len(self.raw_manifest) + sum(map(len, self.raw_parts))


class _ValidatedCache:
    """Validated checkpoints by directory, reused only for byte-identical files.

    One ``latest(verify=True)`` + ``restore()`` opens the newest checkpoint
    four times, and parsing and validating its parts is most of a restore's
    cost for a state of many tensors. Validation is a pure function of the
    directory's path and the bytes of its manifest and parts, so a checkpoint
    opened again is re-read (through ``safe_fs``, with the size and CRC32C
    checks) and its cached result reused only when those bytes are equal:
    a file rewritten on disk, whatever its size or time stamps, is validated
    again. What does not come from those bytes (the data files on disk) is
    checked at every open. Bounded, since the parsed parts stay in memory:
    ``_ENTRIES`` checkpoints of at most ``_MAX_BYTES`` part bytes in all,
    more only inside ``reusing()``."""

    _ENTRIES = 4
    _MAX_BYTES = 32 << 20

    def __init__(self) -> None:
        self._entries: OrderedDict[str, _Validated] = OrderedDict()
        self._lock = threading.Lock()
        self._scopes = 0

    def get(self, key: str) -> _Validated | None:
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
            return hit

    def put(self, key: str, entry: _Validated) -> None:
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            self._trim()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        with self._lock:
            self._scopes += 1
        try:
            yield
        finally:
            with self._lock:
                self._scopes -= 1
                self._trim()

    def _trim(self) -> None:
        budget = None if self._scopes else self._MAX_BYTES
        total = sum(e.nbytes for e in self._entries.values())
        while self._entries and (len(self._entries) > self._ENTRIES or budget is not None and total > budget):
            total -= self._entries.popitem(last=False)[1].nbytes


_validated = _ValidatedCache()


def clear_cache() -> None:
    """Forget every validated checkpoint (the next open parses and validates again)."""
    _validated.clear()


def reusing() -> contextlib.AbstractContextManager[None]:
    """Within this block, checkpoints of any size stay cached once validated (a ``restore()``
    opens its checkpoint twice, a ``latest(verify=True)`` too); on leaving, the cache shrinks
    back to its usual budget."""
    return _validated.scope()


# What the reads on this thread found sound, while ``checked_reads`` collects it (else None).
_checked = threading.local()


@contextlib.contextmanager
def checked_reads() -> Iterator[dict[tuple[str, str], tuple[tuple, set[tuple[int, int, int]]]]]:
    """Collect what the reads inside (on this thread) checked: ``(checkpoint path, file as the part
    names it) -> (the file's identity when opened, {(offset, stored_len, crc32c) of each chunk whose
    checksum passed})``. An incremental save need not read those chunks again (incremental.Baseline).
    Nested: the outer collection gets everything."""
    out = getattr(_checked, "out", None)
    if out is not None:
        yield out
        return
    _checked.out = out = {}
    try:
        yield out
    finally:
        _checked.out = None


def open_checkpoint(path: str) -> Opened:
    """Read and validate the manifest and all parts of checkpoint directory ``path``.

    Every check short of reading tensor data runs here (manifest, parts,
    data file sizes, trees), so ``Checkpointer.latest()`` skips what ``load``
    would refuse. ``path``'s own last component must not be a symbolic link
    (see ``safe_fs``); the path above it is used as given. Files whose bytes
    equal those of an earlier successful open are not parsed again
    (``_ValidatedCache``)."""
    # Tens of thousands of parsed JSON containers, none in a cycle: no collector passes (gcpause.py).
    with gcpause.paused():
        return _open(path)


def _open(path: str) -> Opened:
    with CheckpointDir(path) as d:
        hit = _validated.get(d.path)
        raw_m = manifest.read_manifest_bytes(path, d)
        if hit is None or hit.raw_manifest != raw_m:
            hit = None
        m = manifest.parse_manifest(raw_m, path) if hit is None else hit.manifest
        raws, parts = [], []
        for r, info in enumerate(m["parts"]):  # read, check, then parse each in turn: errors name the first bad one
            raw = manifest.read_part_bytes(path, info, d)
            if hit is not None and hit.raw_parts[r] != raw:
                hit = None
            raws.append(raw)
            parts.append(hit.parts[r] if hit is not None else manifest.parse_part(raw, path, info))
        _check_files(d, parts)
    if hit is not None:
        return Opened(path, m, parts, sections_checked=True)
    if parts[0].get("replicated") is None:
        where = os.path.join(path, layout.part_name(0))
        raise CorruptCheckpointError(f"{where} lacks the replicated state section", path=where)
    op = Opened(path, m, parts)
    check_sections(op)
    shard_format.check_checkpoint(path, parts)  # 1.2: every part lists the same sharded tensors
    _validated.put(d.path, _Validated(raw_m, raws, m, parts))
    return op


def _check_files(d: CheckpointDir, parts: list[dict]) -> None:
    """Every data file is a regular file inside the checkpoint with at least its recorded size
    (truncation is caught here), and no two parts' chunks share bytes of one file."""
    spans: dict[str, list[tuple[int, int, int]]] = {}
    for pi, part in enumerate(parts):
        for f in part["files"]:
            size = d.size(f["path"], "data file")
            if size < f["nbytes"]:
                p = full_path(d.path, f["path"])
                raise CorruptCheckpointError(f"data file {p} is truncated: {size} of {f['nbytes']} bytes", path=p)
        for ch in part["chunks"]:
            spans.setdefault(ch["file"], []).append((ch["offset"], ch["offset"] + ch["stored_len"], pi))
    for rel, s in spans.items():
        s.sort()
        for (_, a1, pa), (b0, _, pb) in zip(s, s[1:]):
            if b0 < a1 and pa != pb:
                p = full_path(d.path, rel)
                raise CorruptCheckpointError(f"chunks of rank parts {pa} and {pb} overlap in {p}", path=p)


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


_MAP_LOCATION_FORMS = ("map_location takes a device (torch.device, 'cpu', 'cuda:1') or a dict {saved device: "
                       "device} as torch.load does ({'cuda:1': 'cuda:0'}; devices it does not name are kept)")


def check_map_location(map_location: Any) -> None:
    """A PyckptError unless ``map_location`` is None, a device, or a dict of devices (torch.load's forms
    less its storage function, which pyckpt has no storages to hand)."""
    pairs = (list(map_location.items()) if isinstance(map_location, dict)
             else [] if map_location is None else [("cpu", map_location)])
    for saved, dev in pairs:
        try:
            if not isinstance(saved, str) or not isinstance(dev, (str, torch.device)):
                raise TypeError(f"{saved!r}: {dev!r}" if isinstance(map_location, dict) else repr(dev))
            torch.device(saved), torch.device(dev)
        except (RuntimeError, TypeError, ValueError) as e:
            raise PyckptError(f"{_MAP_LOCATION_FORMS}; got {map_location!r} ({str(e).splitlines()[0]})") from None


def _map_device(saved: str, map_location: Any, key: str) -> torch.device:
    if isinstance(map_location, dict):
        map_location = map_location.get(saved)  # torch.load's dict: a device it does not name stays
    if map_location is not None:
        return torch.device(map_location)
    dev = torch.device(saved)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PyckptError(f"tensor {key!r} was saved on {saved} but CUDA is not available here: "
                          "pass map_location='cpu' to load it onto the CPU")
    return dev


# Device memory a restore leaves free when it stages ``into=`` targets on their GPU (the share of
# the card, or this many bytes, whichever is larger): the rest of the job still has to run.
_GPU_HEADROOM_SHARE = 0.1
_GPU_HEADROOM_BYTES = 512 << 20


def _gpu_storages(entries: list[dict], dests: dict, nbytes: dict[int, int],
                  map_location: Any) -> dict[int, torch.device]:
    """Storages the engine reads straight into device memory, by storage id (each chunk through its
    page-locked buffers, one DMA), instead of into a host buffer copied to the device afterwards.

    Storages loaded as new tensors on a GPU always: their memory is needed there anyway. Storages
    whose targets (``into=``) are on a GPU only while every such buffer fits beside what the card has
    free: the buffers are read and verified before any target is written (so a damaged chunk still
    leaves every target untouched), which holds a second copy of them on the device until then."""
    if not (cuda_available() and torch.cuda.is_available()):
        return {}
    found: dict[int, torch.device | None] = {}
    staged: set[int] = set()  # storages of into= targets
    for i, e in enumerate(entries):
        dst, dev = dests.get(i), None
        if dst is None:
            try:
                d = _map_device(e["device"], map_location, "")
            except (PyckptError, RuntimeError):
                d = None  # reported with the tensor's name when the tensor is made
            if d is not None and d.type == "cuda":
                dev = torch.device("cuda", torch.cuda.current_device() if d.index is None else d.index)
        elif dst.is_cuda:
            dev = dst.device
            staged.add(e["storage"])
        sid = e["storage"]
        found[sid] = dev if found.get(sid, dev) == dev else None  # every user of a storage must agree
    gpu = {sid: d for sid, d in found.items() if d is not None}
    for dev in set(gpu.values()):
        free, total = torch.cuda.mem_get_info(dev)
        need = sum(nbytes[sid] for sid, d in gpu.items() if d == dev)
        if need > free - max(_GPU_HEADROOM_BYTES, int(total * _GPU_HEADROOM_SHARE)):
            for sid in [sid for sid, d in gpu.items() if d == dev and sid in staged]:
                del gpu[sid]  # through host memory, as before
    return gpu


def _direct_target(entry: dict, dst: torch.Tensor | None, nbytes: int, users: int) -> bool:
    """Can this storage be read straight into ``dst`` with no second copy?"""
    return (dst is not None and _whole_storage(entry, nbytes, users) and dst.is_cpu and dst.is_contiguous()
            and dst.dtype == dtype_of(entry["dtype"]) and list(dst.shape) == entry["shape"])


def _whole_storage(entry: dict, nbytes: int, users: int) -> bool:
    """Is tensor ``entry`` its storage's only view, covering all of its ``nbytes`` densely?"""
    return (users == 1 and entry["storage_offset"] == 0 and entry["nbytes"] == nbytes and nbytes > 0
            and _is_contiguous(entry))


def _is_contiguous(e: dict) -> bool:
    expected = 1
    for s, st in reversed(list(zip(e["shape"], e["stride"]))):
        if s != 1 and st != expected:
            return False
        expected *= s
    return True


def _check_numpy_entry(e: dict, scalar: bool, key: str, where: str) -> None:
    """A tree's NumPy leaf must name an entry NumPy can hold: one of its dtypes, no dimensions for a scalar."""
    if e.get("dtype") not in NUMPY_CODES:
        why = f"dtype {e.get('dtype')!r}, which NumPy has not"
    elif scalar and e.get("shape") != []:
        why = f"shape {e.get('shape')!r} for a scalar"
    else:
        return
    raise CorruptCheckpointError(f"invalid {where}: NumPy leaf {key!r} names a tensor of {why}", path=where)


def _into_leaves(into: Any, path: str = "", depth: int = 0, out: list | None = None) -> list[tuple[str, torch.Tensor]]:
    """Every tensor in ``into`` with its key path (the paths ``tree`` gives saved tensors)."""
    out = [] if out is None else out
    if isinstance(into, torch.Tensor):
        out.append((path, into))
    elif depth <= tree.MAX_DEPTH:
        if isinstance(into, dict):
            items = into.items()
        elif isinstance(into, (list, tuple)):
            items = enumerate(into)
        else:
            return out
        for k, v in items:
            _into_leaves(v, f"{path}/{k}" if path else str(k), depth + 1, out)
    return out


def _target_problems(key: str, e: dict, dst: torch.Tensor) -> list[str]:
    """Why saved tensor entry ``e`` cannot be loaded into ``dst`` (empty when it can)."""
    out = []
    dt = dtype_of(e["dtype"])
    if dst.layout != torch.strided:
        return [f"{key!r}: the target is a {dst.layout} tensor; load into a dense one (or load as a new tensor "
                "and convert it)"]
    if dst.is_meta:
        out.append(f"{key!r}: the target is on the meta device and has no memory to load into "
                   "(materialize it first, e.g. module.to_empty(device='cpu'))")
    if list(dst.shape) != e["shape"]:
        out.append(f"{key!r}: checkpoint shape {tuple(e['shape'])}, target shape {tuple(dst.shape)}")
    if dst.dtype != dt:
        out.append(f"{key!r}: checkpoint dtype {dt}, target dtype {dst.dtype} (pyckpt does not cast: "
                   "convert after loading)")
    if dst.numel() > 1 and torch._debug_has_internal_overlap(dst) == 1:
        out.append(f"{key!r}: the target has elements sharing memory (an expanded view) and cannot be written")
    if dst.is_inference() and not torch.is_inference_mode_enabled():
        out.append(f"{key!r}: the target is an inference tensor, writable only inside torch.inference_mode()")
    return out


def _spans(dests: dict[int, torch.Tensor]) -> list[tuple[int, int, int, int]]:
    """(device index, first byte, end byte, target) of every target with memory, sorted: thousands of
    targets at a restore, so contiguous ones (nearly all) skip the extent sum."""
    out = []
    for i, d in dests.items():
        n = d.numel()
        if n == 0 or d.is_meta or d.layout != torch.strided:  # (refused by _target_problems: no memory to span)
            continue
        lo = d.data_ptr()
        extent = n if d.is_contiguous() else 1 + sum((k - 1) * abs(st) for k, st in zip(d.shape, d.stride()))
        out.append((d.get_device(), lo, lo + extent * d.element_size(), i))
    out.sort()
    return out


def _aliased_targets(entries: list[dict], dests: dict[int, torch.Tensor], paths: dict[int, str]
                     ) -> tuple[list[str], list[list[int]]]:
    """Targets that share memory: (problems, groups). Targets that are one tensor (tied weights) fed
    from different saved storages form a group, loaded only if those bytes agree (``_check_tied``);
    ones overlapping in part are a problem. (Both were read into the one memory: a chunk-by-chunk mix.)
    Views of one saved storage are left alone: the checkpoint holds them as consistent bytes."""
    problems: list[str] = []
    groups: dict[tuple, list[int]] = {}
    live: list[tuple[int, int]] = []  # (end byte, target) of earlier targets that may reach later ones
    device = None
    for dev, lo, hi, i in _spans(dests):
        if dev != device:
            live, device = [], dev
        live = [(end, j) for end, j in live if end > lo]  # sorted by start: these overlap target i
        for _, j in live:
            ea, eb = entries[j], entries[i]
            if ea["storage"] == eb["storage"]:
                continue
            a, b = dests[j], dests[i]
            if (a.data_ptr(), a.shape, a.stride(), a.dtype) != (b.data_ptr(), b.shape, b.stride(), b.dtype):
                problems.append(f"{paths[j]!r} and {paths[i]!r} overlap in memory in part: neither can be "
                                "loaded without changing the other")
                continue
            group = groups.setdefault((dev, a.data_ptr()), [j])
            if i not in group:
                group.append(i)
        live.append((hi, i))
    return problems, list(groups.values())


class _SectionReader:
    """Reads one scope ("replicated" or "rank") of an opened checkpoint."""

    def __init__(self, op: Opened, scope: str, rank: int) -> None:
        self.op = op
        self.sec = op.parts[0]["replicated"] if scope == "replicated" else op.parts[rank]["rank_state"]
        self.where = os.path.join(op.path, layout.part_name(0 if scope == "replicated" else rank))
        self.storages = _storages(op, scope, rank)
        self.nbytes = {sid: s["nbytes"] for sid, (_, s) in self.storages.items()}
        if not op.sections_checked:
            manifest.check_tensor_extents(self.sec["tensors"], self.nbytes, self.where)
        self.tied: list[list[int]] = []  # groups of tied targets fed from different saved bytes (match)
        self.paths: dict[int, str] = {}  # key path of each targeted tensor entry (match)

    def walk(self, visit, into: Any = None) -> None:
        """Visit every tensor leaf (checking its id) without building tensors."""
        n = len(self.sec["tensors"])
        seen: set[int] = set()

        def checked(i, d, p):
            if not 0 <= i < n:
                raise CorruptCheckpointError(f"invalid {self.where}: tree leaf {p!r} names tensor {i} of {n}",
                                             path=self.where)
            if i in seen:  # writers give every leaf its own entry (views share storages, not entries)
                raise CorruptCheckpointError(f"invalid {self.where}: tree leaf {p!r} names tensor {i} again",
                                             path=self.where)
            seen.add(i)
            if type(d) is tree.NumpyLeaf:
                _check_numpy_entry(self.sec["tensors"][i], d.scalar, p, self.where)
            visit(i, d, p)

        tree.unflatten(self.sec["tree"], checked, into, self.where)

    def match(self, into: Any, strict: bool | None) -> dict[int, torch.Tensor]:
        """Targets by tensor id; raises IntoMismatchError listing every problem before anything is read."""
        if strict is not None and strict != TARGETS:
            strict = bool(strict)  # (a caller's strict=1 is strict)
        entries = self.sec["tensors"]
        dests: dict[int, torch.Tensor] = {}
        matched: set[tuple[str, int]] = set()
        problems: list[str] = []
        unexpected: list[str] = []

        paths = self.paths = {}

        def visit(i, d, p):
            if type(d) is tree.NumpyLeaf:  # a NumPy array: a value, like an int, never a target
                return
            if d is None:
                unexpected.append(p)
                return
            matched.add((p, id(d)))
            problems.extend(_target_problems(p, entries[i], d))
            dests[i] = d
            paths[i] = p

        self.walk(visit, into)
        overlapping, self.tied = _aliased_targets(entries, dests, paths)
        problems += overlapping
        sharded = {"/".join(map(str, t["key"])) for t in (self.op.parts[0].get("sharded") or {}).get("tensors", [])
                   if isinstance(t, dict)} if self.sec is self.op.parts[0]["replicated"] else set()
        missing = [p for p, t in _into_leaves(into) if (p, id(t)) not in matched and p not in sharded]  # 1.2
        untargeted = unexpected if strict is True else []
        unloaded = missing if strict is True or strict == TARGETS else []
        problems += [f"{p!r}: saved tensor has no target tensor in into=" for p in untargeted]
        problems += [f"{p!r}: target in into= has no saved tensor in the checkpoint" for p in unloaded]
        if problems:
            hint = ""
            if untargeted or unloaded:
                hint = " (strict=False loads saved tensors without a target as new tensors and leaves targets " \
                       "without a saved tensor unchanged)"
            raise self._mismatch(problems, hint, unexpected, missing)
        if strict is False and (unexpected or missing):
            log.warning("pyckpt: load into=: %s", _mismatch_line(unexpected, missing))
        return dests

    def read(self, engine: Any, into: Any, map_location: Any, strict: bool | None) -> Any:
        check_map_location(map_location)
        entries = self.sec["tensors"]
        if into is not None:
            dests = self.match(into, strict)
        else:
            if not self.op.sections_checked:
                self.walk(lambda i, d, p: None)  # the whole tree is checked before anything is read
            dests = {}
        bufs = self._read_storages(engine, entries, dests, _gpu_storages(entries, dests, self.nbytes, map_location))
        if self.tied:
            self._check_tied(entries, bufs)
        return tree.unflatten(self.sec["tree"], lambda i, d, p: self._tensor(
            i, entries[i], dests.get(i), p, bufs, map_location), into, self.where)

    def _check_tied(self, entries: list[dict], bufs: _Buffers) -> None:
        """Each group of tied targets (``_aliased_targets``): their saved values, read and verified into
        fresh buffers, must agree, or nothing is written."""
        def saved_bytes(i: int) -> torch.Tensor:
            e = entries[i]
            return _view(bufs.by_sid[e["storage"]], dtype_of(e["dtype"], self.where), e).contiguous() \
                .reshape(-1).view(torch.uint8)

        problems = []
        for first, *others in self.tied:
            want = saved_bytes(first)
            for i in others:
                if not torch.equal(want, saved_bytes(i).to(want.device)):  # (one may be staged on the GPU)
                    problems.append(f"{self.paths[first]!r} and {self.paths[i]!r} are the same target memory "
                                    "(tied weights) but the checkpoint holds different values for them")
        if problems:
            raise self._mismatch(problems)

    def _mismatch(self, problems: list[str], hint: str = "", unexpected: list[str] | None = None,
                  missing: list[str] | None = None) -> IntoMismatchError:
        return IntoMismatchError(
            f"cannot load {self.op.path} into the given targets, nothing was written; "
            f"{len(problems)} problem(s){hint}:\n  " + "\n  ".join(problems), problems, unexpected or [],
            missing or [])

    def _read_storages(self, engine: Any, entries: list[dict], dests: dict,
                       gpu: dict[int, torch.device]) -> _Buffers:
        users: dict[int, int] = {}
        for e in entries:
            users[e["storage"]] = users.get(e["storage"], 0) + 1
        tied = {i for group in self.tied for i in group}  # read apart, compared, then copied
        out = _Buffers()
        bufs, direct = out.by_sid, out.direct
        for i, e in enumerate(entries):
            sid = e["storage"]
            if sid in bufs:
                continue
            nbytes, dst = self.storages[sid][1]["nbytes"], dests.get(i)
            if i not in tied and _direct_target(e, dst, nbytes, users[sid]):
                bufs[sid] = dst
                direct.add(sid)
            elif dst is None and e["dtype"] != "C32" and _whole_storage(e, nbytes, users[sid]):
                # A new tensor that is its storage's only view: read into the tensor itself (one
                # allocation, no view to build). Not complex32: torch warns at each allocation.
                bufs[sid] = torch.empty_strided(e["shape"], e["stride"], dtype=dtype_of(e["dtype"]),
                                                device=gpu.get(sid, "cpu"))
                out.shaped.add(sid)
            else:
                bufs[sid] = torch.empty(nbytes, dtype=torch.uint8, device=gpu.get(sid, "cpu"))
        for dev in set(gpu.values()):
            # The engine writes from its own stream: nothing queued on the allocating stream may
            # still use the memory these buffers were given.
            torch.cuda.synchronize(dev)
        # Fresh buffers first: if any of their chunks is damaged, no caller tensor was touched.
        read_into(engine, self.op, {sid: (self.storages[sid], b.data_ptr(), b.device.index if b.is_cuda else -1)
                                    for sid, b in bufs.items() if sid not in direct}, fresh=True)
        read_into(engine, self.op, {sid: (self.storages[sid], bufs[sid].data_ptr(), -1) for sid in direct},
                  fresh=False)
        return out

    def _tensor(self, i: int, e: dict, dst: torch.Tensor | None, key: str, bufs: _Buffers,
                map_location: Any) -> torch.Tensor:
        sid = e["storage"]
        if sid in bufs.direct:
            return dst
        dt = dtype_of(e["dtype"], self.where)
        read = bufs.by_sid[sid]
        buf = read if dst is not None else self._placed(sid, e, key, bufs, map_location)
        t = buf if buf is read and sid in bufs.shaped else _view(buf, dt, e)
        if dst is not None:
            return _copy_into(dst, t)
        if e.get("requires_grad") and (dt.is_floating_point or dt.is_complex):
            t.requires_grad_(True)
        return t

    @staticmethod
    def _placed(sid: int, e: dict, key: str, bufs: _Buffers, map_location: Any) -> torch.Tensor:
        """Storage ``sid``'s buffer on the device new tensor ``e`` goes to (``map_location`` or where it was saved)."""
        dev = bufs.devices.get(e["device"])
        if dev is None:
            dev = bufs.devices[e["device"]] = _map_device(e["device"], map_location, key)
        if dev.type == "cpu":
            return bufs.by_sid[sid]
        buf = bufs.moved.get((sid, dev))
        if buf is None:
            try:
                buf = bufs.moved[sid, dev] = bufs.by_sid[sid].to(dev)  # one copy per storage keeps views shared
            except (RuntimeError, ValueError, AssertionError) as exc:  # (torch built without CUDA asserts)
                raise PyckptError(f"cannot place tensor {key!r} on {dev}: {exc}; pass map_location "
                                  "(e.g. 'cpu') to load it elsewhere") from None
        return buf


@dataclass
class _Buffers:
    """Where a section's storages were read, by storage id."""

    by_sid: dict[int, torch.Tensor] = field(default_factory=dict)
    direct: set[int] = field(default_factory=set)  # read into the into= target itself
    shaped: set[int] = field(default_factory=set)  # the buffer is already the (new) tensor, as saved
    moved: dict[tuple[int, torch.device], torch.Tensor] = field(default_factory=dict)  # copies on other devices
    devices: dict[str, torch.device] = field(default_factory=dict)  # where each saved device's tensors go


def _mismatch_line(unexpected: list[str], missing: list[str]) -> str:
    parts = []
    if unexpected:
        parts.append(f"{len(unexpected)} saved tensor(s) without a target, loaded as new tensors: "
                     + ", ".join(unexpected))
    if missing:
        parts.append(f"{len(missing)} target(s) without a saved tensor, left unchanged: " + ", ".join(missing))
    return "; ".join(parts)


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


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Copy ``src`` into ``dst`` (same shape and dtype: checked by ``match``)."""
    with torch.no_grad():
        if src.element_size() in _SAME_SIZE_INT:
            it = _SAME_SIZE_INT[src.element_size()]
            dst.view(it).copy_(src.view(it))  # bitwise, and works for dtypes without copy kernels
        else:
            dst.copy_(src)
    return dst


def read_into(engine: Any, op: Opened, targets: dict[int, tuple[tuple[int, dict], int, int]], fresh: bool) -> None:
    """Read storages (``sid -> ((part, storage json), dst_addr, device)``; device -1: host memory,
    else the CUDA device index of ``dst_addr``) with verification.

    ``fresh``: the destinations are buffers the caller drops if this raises,
    so the engine may read into them directly; otherwise (a caller's
    tensors) each chunk goes through the engine's bounce buffer and reaches
    its destination only after its checksum passed."""
    if not targets:
        return
    chunks: dict[tuple[int, int], tuple] = {}
    with _FileTable(op) as files:
        for (pi, s), addr, device in targets.values():
            for p in s["pieces"]:
                key = (pi, p["chunk"])
                if key not in chunks:
                    chunks[key] = _chunk_spec(files, op.parts[pi]["chunks"][p["chunk"]], [])
                chunks[key][6].append((p["chunk_offset"], addr + p["storage_offset"], p["nbytes"], device))
        keys = list(chunks)
        errors = engine.read(files.paths, [chunks[k] for k in keys], True, fds=files.fds, direct=fresh)
        _raise_errors(errors, keys, op, files)


class _FileTable:
    """Data files of one read, opened inside the checkpoint (``safe_fs``); descriptors go to the engine."""

    def __init__(self, op: Opened) -> None:
        self.dir = CheckpointDir(op.path)
        self.paths: list[str] = []
        self.fds: list[int] = []
        self.index: dict[str, int] = {}
        self.checked = getattr(_checked, "out", None)  # checked_reads: where this read's sound chunks go
        self.idents: dict[str, tuple] = {}
        self.pending: list[tuple[str, tuple[int, int, int]]] = []

    def idx(self, rel: str) -> int:
        if rel not in self.index:
            fd, _ = self.dir.open(rel, "data file")
            self.index[rel] = len(self.paths)
            self.paths.append(full_path(self.dir.path, rel))
            self.fds.append(fd)
            if self.checked is not None:
                from .incremental import file_identity

                self.idents[rel] = file_identity(os.fstat(fd))  # before the read: a later write changes it
        return self.index[rel]

    def passed(self) -> None:
        """The engine read every chunk specified so far and each one's checksum passed."""
        if self.checked is None:
            return
        ckpt = os.path.abspath(self.dir.path)
        for rel, key in self.pending:
            ent = self.checked.get((ckpt, rel))
            if ent is None or ent[0] != self.idents[rel]:
                ent = self.checked[(ckpt, rel)] = (self.idents[rel], set())
            ent[1].add(key)
        self.pending = []

    def __enter__(self) -> "_FileTable":
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.dir.close()


def _chunk_spec(files: _FileTable, ch: dict, pieces: list) -> tuple:
    if files.checked is not None:
        files.pending.append((ch["file"], (ch["offset"], ch["stored_len"], ch["crc32c"])))
    return (files.idx(ch["file"]), ch["offset"], ch["stored_len"], ch["raw_len"], ch["crc32c"],
            CODEC_IDS[ch["codec"]], pieces)


def _raise_errors(errors: list, keys: list, op: Opened, files: _FileTable) -> None:
    if not errors:
        files.passed()
        return
    ci, msg = errors[0]
    pi, chunk = keys[ci]
    path = files.paths[files.index[op.parts[pi]["chunks"][chunk]["file"]]]
    more = f" (and {len(errors) - 1} more bad chunks)" if len(errors) > 1 else ""
    raise CorruptCheckpointError(f"{path}: chunk {chunk} of rank {pi} is damaged: {msg}{more}", path=path, chunk=chunk)


# ``load_section``'s strictness of Checkpointer.load/restore: every target needs a saved tensor.
TARGETS = "targets"


def load_section(engine: Any, op: Opened, scope: str, rank: int, into: Any = None, map_location: Any = None,
                 strict: bool | str | None = None) -> Any:
    """Rebuild the replicated state (scope "replicated") or ``rank``'s rank_state (scope "rank").

    ``into`` targets are always checked for shape, dtype and device before
    anything is read. ``strict=True``: saved tensors without a target and
    targets without a saved tensor are errors too; ``TARGETS``: only the
    latter (the former come back as new tensors); ``False``: both are
    reported in one ``pyckpt:`` log line; ``None`` (internal callers that
    pass partial targets on purpose, e.g. a resume into the live modules):
    allowed silently."""
    if scope == "rank" and (rank >= len(op.parts) or op.parts[rank].get("rank_state") is None):
        return None
    with gcpause.paused():  # the trees' containers: as in open_checkpoint
        out = _SectionReader(op, scope, rank).read(engine, into, map_location, strict)
    if scope == "replicated":  # 1.2: the sharded tensors' places (null in the tree), re-cut for this rank
        from . import sharded

        out = sharded.restore(engine, op, out, into, map_location)
    return out


def shapes(op: Opened) -> Any:
    """The replicated state ``load_section`` would rebuild, with a ``meta`` tensor of each saved tensor's
    shape and dtype in its place (a sharded tensor's at its global shape), from the validated trees
    alone: no tensor data is read (a resume checks the live objects against it before reading)."""
    sec = _SectionReader(op, "replicated", 0)
    entries = sec.sec["tensors"]

    def meta(i: int, d: Any, p: str) -> torch.Tensor:
        if not 0 <= i < len(entries):
            raise CorruptCheckpointError(f"invalid {sec.where}: tree leaf {p!r} names tensor {i} of "
                                         f"{len(entries)}", path=sec.where)
        return torch.empty(entries[i]["shape"], dtype=dtype_of(entries[i]["dtype"], sec.where), device="meta")

    with gcpause.paused():  # the trees' containers: as in open_checkpoint
        out = tree.unflatten(sec.sec["tree"], meta, None, sec.where)
    from .sharded import _empty_slot, _locate  # (sharded imports this module)

    for e in (op.parts[0].get("sharded") or {}).get("tensors", []):  # 1.2: null in the tree, placed by key
        parent, k = _locate(out, e["key"][:-1]), e["key"][-1]
        if _empty_slot(parent, k):
            parent[k] = torch.empty(e["shape"], dtype=dtype_of(e["dtype"]), device="meta")
    return out


def check_sections(op: Opened) -> None:
    """Everything ``load_section`` checks before reading, for every section of ``op``."""
    if op.sections_checked:
        return
    _SectionReader(op, "replicated", 0).walk(lambda i, d, p: None)
    for r, part in enumerate(op.parts):
        if part.get("rank_state") is not None:
            _SectionReader(op, "rank", r).walk(lambda i, d, p: None)
    op.sections_checked = True


def verify(engine: Any, path: str) -> Opened:
    """Validate ``path`` fully: manifest, parts, trees, and every chunk's checksum.

    Runs every check ``load`` runs (``open_checkpoint`` includes the trees),
    then decodes every chunk and checks its ``raw_crc32c`` too."""
    op = open_checkpoint(path)
    verify_chunks(engine, op)
    return op


def verify_chunks(engine: Any, op: Opened, parts: Iterable[int] | None = None) -> None:
    """Decode every chunk of parts ``parts`` of ``op`` (all of them by default) and check its
    checksums, in batches of about ``_VERIFY_BATCH_BYTES`` of scratch memory."""
    batch: list[tuple[int, int]] = []
    size = 0
    for pi in range(len(op.parts)) if parts is None else parts:
        for ci, ch in enumerate(op.parts[pi]["chunks"]):
            batch.append((pi, ci))
            size += ch["raw_len"]
            if size >= _VERIFY_BATCH_BYTES:
                _verify_batch(engine, op, batch)
                batch, size = [], 0
    _verify_batch(engine, op, batch)


_VERIFY_BATCH_BYTES = 256 << 20


def _verify_batch(engine: Any, op: Opened, keys: list[tuple[int, int]]) -> None:
    """Decode ``keys`` chunks into scratch memory: checks the stored CRC, the
    codec frame, and the CRC of the decoded bytes (``raw_crc32c``). A chunk
    stored as it is, whose two CRCs are one, is only checksummed: where it
    lies for a file in memory (the memory tier), with no scratch copy."""
    from ._native import native

    if not keys:
        return
    chunks = [op.parts[pi]["chunks"][ci] for pi, ci in keys]
    decode = [c["codec"] != "none" or c["crc32c"] != c["raw_crc32c"] for c in chunks]
    scratch = torch.empty(sum(c["raw_len"] for c, d in zip(chunks, decode) if d), dtype=torch.uint8)
    addrs, base = [], scratch.data_ptr()
    for c, d in zip(chunks, decode):
        addrs.append(base if d else None)
        base += c["raw_len"] if d else 0
    with _FileTable(op) as files:
        specs = [_chunk_spec(files, c, [(0, a, c["raw_len"], -1)] if a is not None and c["raw_len"] else [])
                 for c, a in zip(chunks, addrs)]
        _raise_errors(engine.read(files.paths, specs, True, fds=files.fds, direct=True), keys, op, files)
        for i, (c, a) in enumerate(zip(chunks, addrs)):
            if a is not None and native().crc32c_addr(a, c["raw_len"]) != c["raw_crc32c"]:
                _raise_errors([(i, "decoded bytes do not match raw_crc32c")], keys, op, files)
