"""One rank's share of a save: plan the bytes, start the engine, describe the result.

``prepare`` runs on the caller's thread (validation errors surface before
anything is written), ``start`` hands the chunks to the engine and returns at
once, ``describe_part`` runs after the engine finished and builds the part
JSON from the engine's per-chunk results.
"""
from __future__ import annotations

import logging
import marshal
import operator
import os
import zlib
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from . import incremental, knobs, layout, tree
from ._native import CODEC_NAMES, error_from_job, require_codec
from .errors import StagingTimeoutError
from .manifest import dumps
from .planner import Chunk, Described, Storage, assign_owners, describe, layout_digest, pack

log = logging.getLogger("pyckpt")


@dataclass
class _Encoded:
    """The canonical JSON of the items of list ``of`` (``n`` of them), comma-separated, no brackets."""

    of: list
    n: int
    raw: bytes

    def fits(self, items: list) -> bool:
        return items is self.of and len(items) == self.n


class _EncodedTree(NamedTuple):
    """A state tree's canonical JSON (``raw``) and the tree's ``marshal`` bytes (``key``)."""

    key: bytes
    raw: bytes


@dataclass
class Section:
    """The state tree of one scope and the storages its tensors view."""

    scope: str  # "replicated" | "rank"
    tree: Any
    described: Described
    mine: list[Storage]  # the storages this rank writes
    keeps: list[torch.Tensor]  # keeps[i] keeps the memory of mine[i] alive until the save is captured
    # Where this section's chunks sit in the rank's chunk list, and their storage records: computed
    # once, shared (read-only) by later saves whose plan reuses ``described`` (planner.describe).
    first_chunk: int = 0
    chunks: list[Chunk] = field(default_factory=list)
    json: list[dict] | None = None
    # The canonical JSON of ``json`` and of ``entries`` ("storages" / "entries" -> _Encoded) and of the
    # last tree ("tree" -> _EncodedTree), shared with later sections that reuse them: a layout saved
    # again is not encoded again, nor a tree that did not change (encode_part).
    encoded: dict[str, _Encoded | _EncodedTree] = field(default_factory=dict)
    # Per chunk, its pieces as (storage id, byte offset from the torch storage's start, bytes, device):
    # ``sources`` adds this save's storage addresses (made once per layout, shared like ``json``).
    reads: list[list[tuple[int, int, int, int]]] | None = None
    # Per chunk, the GPUs its pieces are read from (empty: host memory only); shared like ``reads``.
    gpus: list[frozenset[int]] | None = None
    paths: list[str] = field(default_factory=list)  # each tensor's key path (this save's)
    # ``layout_digest`` of ``described`` once computed; shared like ``reads``.
    digest: str | None = None
    # ``sources``' last answer for this layout and the storage addresses it was made for, shared like
    # ``reads``: a training job's tensors stay where they are, and thousands of pieces are not made again.
    addressed: dict = field(default_factory=dict)

    def layout_key(self) -> str:
        """What every rank's replicated state must agree on before a save writes anything: each
        tensor's key path, dtype, shape, strides, bytes in its storage, storage grouping and
        ``requires_grad``, and each storage's size; not devices (cuda:0 on one rank, cuda:1 on the
        next) or addresses. Ranks that differ would write storages the others' records do not
        describe: a checkpoint that commits and that no reader accepts, or reads wrong values."""
        if self.digest is None:
            self.digest = layout_digest(self.described)
        return f"{self.digest}-{zlib.crc32(chr(0).join(self.paths).encode()):08x}"

    def forget_tree(self) -> None:
        """Drop this save's state tree and key paths (the commit thread does, once the save is over): a
        later save reuses only the layout, and the training thread would otherwise free the thousands of
        objects they are at its next snapshot point (``prepare`` replacing the previous plan). The tensors
        and addresses of this save's description go too (a later save describes its own)."""
        self.tree, self.paths, self.keeps = None, [], []
        self.described.keeps, self.described.bases = [], []

    @property
    def entries(self) -> list[dict]:
        return self.described.entries

    @property
    def storages(self) -> list[Storage]:
        return self.described.storages


@dataclass
class RankPlan:
    rank: int
    world_size: int
    replicated: Section
    rank_state: Section | None
    chunks: list[Chunk] = field(default_factory=list)
    # Incremental saves (incremental.Baseline.expectations): the engine's expect list and the
    # reference each skipped chunk becomes; refs is None when the save is not incremental.
    expect: list | None = None
    refs: dict | None = None
    # chunk -> (file, record, nbytes): references made without a check, checked before the commit
    # (incremental.Baseline.check_deferred).
    deferred: dict = field(default_factory=dict)
    # Chunks known to have changed (every tensor in them moved its version counter since the
    # previous save): written without a fingerprint (Checkpointer._plan_incremental).
    no_fp: set[int] = field(default_factory=set)
    # Chunks every tensor of which moved its version counter since the previous save, fingerprinted
    # or not (Baseline.update: such a chunk's first fingerprint is not read back).
    moved: set[int] = field(default_factory=set)
    # Per section, its ``keeps``' version counters when they were read at this save (_moved_chunks), so
    # the written-before-captured check (Checkpointer) does not read them again on the training thread.
    versions: list[list[int | None]] | None = None

    def keep_alive(self) -> list[torch.Tensor]:
        """Tensors whose memory the engine reads until the save is captured."""
        return [k for sec in self.sections() for k in sec.keeps]

    def sections(self) -> list[Section]:
        return [self.replicated] + ([self.rank_state] if self.rank_state else [])

    def release(self) -> None:
        """Drop every reference to the caller's tensors (call once the save is captured)."""
        for sec in self.sections():
            sec.keeps = []


def _section(scope: str, state: Any, rank: int, world_size: int, chunk_bytes: int, chunks: list[Chunk],
             last: Section | None, as_state_dict: bool = False) -> Section:
    """Describe one scope and pack the storages this rank writes onto ``chunks``. ``last``: this
    scope's section of the previous save (same rank, world size and chunk size): its storages,
    pieces and chunks are reused when the tensors have the same layout (planner.describe).
    ``as_state_dict``: planner.describe's."""
    tr, tensors, paths = state if type(state) is tree.Flat else tree.flatten(state)
    first = len(chunks)
    reusable = last is not None and last.first_chunk == first  # piece records name chunks by index
    d = describe(tensors, paths, last.described if reusable else None, as_state_dict)
    if reusable and d.storages is last.storages:
        chunks += last.chunks
        # ``mine`` keeps the storages' order (ids count from 0): when it has them all, keeps is d.keeps.
        keeps = d.keeps if len(last.mine) == len(d.keeps) else [d.keeps[s.id] for s in last.mine]
        return Section(scope, tr, d, last.mine, keeps, first, last.chunks, last.json, last.encoded, last.reads,
                       last.gpus, paths, last.digest, last.addressed)
    if scope == "replicated":
        owners = assign_owners(d.storages, world_size)
        mine = [s for s in d.storages if owners[s.id] == rank]
    else:
        mine = list(d.storages)
    pack(mine, chunk_bytes, chunks)
    return Section(scope, tr, d, mine, [d.keeps[s.id] for s in mine], first, chunks[first:], paths=paths)


def prepare(state: Any, rank_state: Any, rank: int, world_size: int, chunk_bytes: int,
            last: dict | None = None, as_state_dict: bool = False) -> RankPlan:
    """Flatten, validate and plan; raises ``UnsupportedStateError`` before any I/O. ``state`` and
    ``rank_state`` may come encoded already (``tree.Flat``).

    ``last``: a dict the caller keeps between saves (one per Checkpointer); the plan's sections are
    remembered there so the next save of the same tensors reuses their layout (``_section``).
    ``as_state_dict``: ``state``'s entries record ``requires_grad`` false (planner.describe)."""
    prev = (last or {}).get((rank, world_size, chunk_bytes), {})
    chunks: list[Chunk] = []
    rep = _section("replicated", state, rank, world_size, chunk_bytes, chunks, prev.get("replicated"),
                   as_state_dict)
    rs = None
    if rank_state is not None:
        rs = _section("rank", rank_state, rank, world_size, chunk_bytes, chunks, prev.get("rank"))
    if last is not None:
        last.clear()  # one entry: the previous plan's sections only
        last[(rank, world_size, chunk_bytes)] = {"replicated": rep, "rank": rs}
    return RankPlan(rank, world_size, rep, rs, chunks)


class DoneJob:
    """Stands in for an engine job when a rank has no bytes to write."""

    def num_chunks(self) -> int:
        return 0

    def wait_captured(self, timeout_s: float | None = None) -> bool:
        return True

    def wait(self, timeout_s: float | None = None) -> bool:
        return True

    def done(self) -> bool:
        return True

    def error(self) -> str | None:
        return None

    def results(self) -> list:
        return []

    def cancel(self) -> None:
        return None


def sources(plan: RankPlan) -> list[list[tuple[int, int, int]]]:
    """Where the engine reads each chunk's pieces in this save: ``[(address, nbytes, device), ...]``
    per chunk. Plans hold no addresses (a reused layout serves tensors that moved); the storages'
    addresses of this save complete them here."""
    out = []
    for sec in plan.sections():
        if sec.reads is None:
            st = sec.described.storages
            sec.reads = [[(p.storage, st[p.storage].start + p.storage_offset, p.nbytes, p.src_device) for p in c.pieces]
                         for c in sec.chunks]
        bases, memo = sec.described.bases, sec.addressed
        if memo.get("bases") != bases:
            memo["pieces"] = [[(bases[sid] + off, n, dev) for sid, off, n, dev in c] for c in sec.reads]
            memo["bases"] = list(bases)
        out += memo["pieces"]
    shards = getattr(plan, "shards", None)
    if shards is not None:
        out += [[(shards.addr(p.storage) + p.storage_offset, p.nbytes, p.src_device) for p in c.pieces]
                for c in shards.chunks]
    if len(out) != len(plan.chunks):
        raise AssertionError(f"pyckpt: plan has {len(plan.chunks)} chunks, its sections {len(out)}")
    return out


def chunk_gpus(plan: RankPlan) -> list[frozenset[int]]:
    """Per chunk of ``plan.chunks``, the GPUs its pieces are read from (empty: host memory only)."""
    def gpus(chunks: list[Chunk]) -> list[frozenset[int]]:
        return [frozenset(p.src_device for p in c.pieces if p.src_device >= 0) for c in chunks]

    out: list[frozenset[int]] = []
    for sec in plan.sections():
        if sec.gpus is None:
            sec.gpus = gpus(sec.chunks)
        out += sec.gpus
    shards = getattr(plan, "shards", None)
    return out + gpus(shards.chunks) if shards is not None else out


def storages_json(plan: RankPlan) -> list[dict]:
    """The part's ``storages`` list for this plan (known before anything is written). A new list;
    its records are shared with later plans that reuse the section, and must not be changed."""
    out: list[dict] = []
    for sec in plan.sections():
        if sec.json is None:
            sec.json = [_storage_json(sec.scope, s) for s in sec.mine]
        out += sec.json
    return out


def start(engine: Any, plan: RankPlan, ckpt_dir: str, codec: str, map_files: bool = False) -> Any:
    """Start writing this rank's chunks into ``ckpt_dir``; returns the engine job.

    Incremental saves (``plan.refs`` set): every chunk's fingerprint is computed, and the
    chunks of ``plan.expect`` (``(chunk, fingerprint, verify, raw_crc32c)``) are skipped
    by the engine when unchanged. ``map_files`` (the memory tier, codec none): a data file
    already there (a recycled one) keeps its pages and host chunks are copied straight
    into it, mapped, instead of through staging and a write."""
    if not plan.chunks:
        return DoneJob()
    rel = layout.data_file_name(plan.rank)
    os.makedirs(os.path.dirname(os.path.join(ckpt_dir, rel)), exist_ok=True)
    spec = [(0, c.elem_size, pieces) for c, pieces in zip(plan.chunks, sources(plan))]
    # Each GPU's copies wait for the work queued on that GPU's current stream before this call
    # (a model spread over several GPUs of one process has one per device).
    devices = sorted(frozenset().union(*chunk_gpus(plan)))
    streams = [(d, torch.cuda.current_stream(d).cuda_stream) for d in devices]
    return engine.save(
        [os.path.join(ckpt_dir, rel)], spec, codec=require_codec(codec), streams=streams,
        staging_timeout_ms=int(knobs.get("PYCKPT_STAGING_TIMEOUT_S") * 1000),
        write_delay_us=knobs.get("PYCKPT_TEST_WRITE_DELAY_MS") * 1000,
        expect=plan.expect or [], fingerprint=plan.refs is not None,
        constant_fp=knobs.get("PYCKPT_TEST_FINGERPRINT") == "constant", map_files=map_files,
        skip_fingerprint=sorted(plan.no_fp) if plan.refs is not None else [],
    )


def job_error(job: Any) -> Exception | None:
    """The job's failure as a pyckpt exception (None when it succeeded)."""
    msg = job.error()
    if msg is None:
        return None
    if msg.startswith("staging timeout"):
        return StagingTimeoutError(f"checkpoint skipped: {msg} (raise PYCKPT_STAGING_MB or PYCKPT_STAGING_TIMEOUT_S)")
    return error_from_job(f"checkpoint write failed: {msg}")


def collect(job: Any, plan: RankPlan, ckpt_dir: str) -> tuple[dict | None, Exception | None]:
    """Wait for the job to end; returns (this rank's part JSON, None) or (None, the error).

    ``plan.refs``: chunk -> (root-relative chunk record, file nbytes) for chunks the engine
    may have skipped as unchanged (``incremental.Baseline.expectations``)."""
    refs = plan.refs
    try:
        job.wait(None)
        err = job_error(job)
        if err is not None:
            return None, err
        inc = job.incremental() if refs is not None and hasattr(job, "incremental") else None
        return describe_part(plan, job.results(), ckpt_dir, inc, refs), None
    except Exception as e:  # an unreadable file size, a bad result: reported, never raised here
        return None, e


def describe_part(plan: RankPlan, results: list, ckpt_dir: str, inc: list | None = None,
                  refs: dict | None = None) -> dict:
    """The part JSON of this rank, from the engine's per-chunk results.

    ``inc``: the engine's (fingerprint, status) per chunk; a chunk with status
    "referenced" becomes a copy of the earlier chunk record in ``refs`` whose
    file is ``../step-P/...`` (docs/FORMAT.md §14)."""
    rel = layout.data_file_name(plan.rank)
    chunks, ref_files, written = [], {}, False
    for i, (c, (off, stored, raw, crc, codec, raw_crc)) in enumerate(zip(plan.chunks, results)):
        fp, status = inc[i] if inc is not None else (None, incremental.STATUS_WRITTEN)
        if status == incremental.STATUS_REFERENCED:
            rec, nbytes = (refs or {})[i]
            ch = {"file": "../" + rec["file"]}
            ch.update((k, rec[k]) for k in ("offset", "stored_len", "raw_len", "elem_size", "codec", "crc32c",
                                            "raw_crc32c"))
            ref_files[ch["file"]] = nbytes
        else:
            written = True
            ch = {"file": rel, "offset": off, "stored_len": stored, "raw_len": raw, "elem_size": c.elem_size,
                  "codec": CODEC_NAMES[codec], "crc32c": crc, "raw_crc32c": raw_crc}
        if fp is not None and i not in plan.no_fp:
            ch["fingerprint"] = incremental.fp_hex(fp)
        chunks.append(ch)
    if inc is not None:
        line = incremental.collisions_line([st for _, st in inc], os.path.basename(ckpt_dir))
        if line:
            log.warning("%s", line)
    files = [{"path": rel, "nbytes": os.path.getsize(os.path.join(ckpt_dir, rel))}] if written else []
    files += [{"path": f, "nbytes": n} for f, n in sorted(ref_files.items())]
    return {
        "rank": plan.rank, "files": files, "chunks": chunks,
        "storages": storages_json(plan),
        "replicated": _section_json(plan.replicated) if plan.rank == 0 else None,
        "rank_state": _section_json(plan.rank_state) if plan.rank_state else None,
    }


def encode_part(plan: RankPlan, part: dict) -> bytes:
    """``manifest.dumps(part)``, byte for byte, with the plan's storage records and tensor entries
    taken from their cached encoding (``Section.encoded``): a reused layout is encoded once, not at
    every save (4,000 tensors: some 25 ms of the commit thread, holding the GIL against training).

    Only values that are the plan's own lists, unchanged in length, come from the cache; everything
    else (files, chunks, trees, what ``sharded.add_to_part`` added, anything a caller replaced) is
    encoded here, so the bytes are right whatever was done to ``part`` after ``describe_part``."""
    if type(part) is not dict or not part or any(type(k) is not str for k in part):
        return dumps(part)
    sections = {"replicated": plan.replicated, "rank_state": plan.rank_state}
    out: list[bytes] = []  # joined once: the fragments are most of a megabyte-sized part
    sep = b"{"
    for k, v in part.items():
        out += (sep, dumps(k), b":")
        if k == "storages":
            _storages_into(out, plan, v)
        elif k in sections:
            _section_into(out, sections[k], v)
        else:
            out.append(dumps(v))
        sep = b","
    out.append(b"}")
    return b"".join(out)


def _items_bytes(sec: Section, name: str, items: list) -> bytes:
    """The encoded items of ``items``, one of ``sec``'s own lists (its records or entries), cached on ``sec``."""
    enc = sec.encoded.get(name)
    if enc is None or not enc.fits(items):
        enc = sec.encoded[name] = _Encoded(items, len(items), dumps(items)[1:-1])
    return enc.raw


def _storages_into(out: list[bytes], plan: RankPlan, records: Any) -> None:
    """The part's ``storages``: each section's records (storages_json) from the cache while ``records``
    holds exactly them, in order; the rest (sharded storages, or after any change) encoded here."""
    if type(records) is not list:
        out.append(dumps(records))
        return
    out.append(b"[")
    at = 0  # records written so far
    for sec in plan.sections():
        mine = sec.json
        if mine is None or len(records) - at < len(mine) or not all(
                map(operator.is_, records[at:at + len(mine)], mine)):
            break
        if mine:
            out += (b",", _items_bytes(sec, "storages", mine)) if at else (_items_bytes(sec, "storages", mine),)
        at += len(mine)
    if at < len(records):
        out += (b",", dumps(records[at:])[1:-1]) if at else (dumps(records[at:])[1:-1],)
    out.append(b"]")


def _section_into(out: list[bytes], sec: Section | None, value: Any) -> None:
    """A part's section object (``_section_json``), its tensor entries from the cache when they are ``sec``'s."""
    if (sec is None or type(value) is not dict or value.get("tensors") is not sec.entries
            or any(type(k) is not str for k in value)):
        out.append(dumps(value))
        return
    sep = b"{"
    for k, v in value.items():
        out += (sep, dumps(k), b":")
        if k == "tensors":
            out += (b"[", _items_bytes(sec, "entries", v), b"]")
        else:
            out.append(_tree_bytes(sec, v) if k == "tree" else dumps(v))
        sep = b","
    out.append(b"}")


def _tree_bytes(sec: Section, value: Any) -> bytes:
    """``dumps(value)`` for a section's state tree; the last save's bytes when the tree is the same.

    The tree (a module's keys, an optimizer's entries per parameter) is most of a part, built anew
    at every save and mostly unchanged. It is compared by its ``marshal`` bytes (format 2: no
    references, so they do not depend on which objects are shared), made in about a third of the
    JSON's time. Python's ``==`` would not do: ``1``, ``1.0`` and ``True`` are equal, as are ``0.0``
    and ``-0.0``, and their JSON is not. The same marshal bytes decode to the same values of the
    same types in the same order, so they have the same JSON."""
    try:
        key = marshal.dumps(value, 2)
    except ValueError:  # a type marshal does not take (a str subclass): encoded as it is
        return dumps(value)
    hit = sec.encoded.get("tree")
    if type(hit) is _EncodedTree and hit.key == key:
        return hit.raw
    raw = dumps(value)
    sec.encoded["tree"] = _EncodedTree(key, raw)
    return raw


def _storage_json(scope: str, s: Storage) -> dict:
    return {"scope": scope, "id": s.id, "nbytes": s.nbytes, "elem_size": s.elem_size,
            "pieces": [{"chunk": p.chunk, "chunk_offset": p.chunk_offset, "storage_offset": p.storage_offset,
                        "nbytes": p.nbytes} for p in s.pieces]}


def _section_json(sec: Section) -> dict:
    return {"tree": sec.tree, "tensors": sec.entries, "num_storages": len(sec.storages)}
