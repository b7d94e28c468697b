"""``pyckpt inspect``: what a checkpoint holds, read from its manifest and parts only (no tensor data).

For every section (the replicated state, each rank's ``rank_state``) it lists
each leaf by key path: tensors with dtype, shape, bytes, the bytes stored
after the codec, the rank whose part holds them and the device they were
saved from; other values (the loop state, the run's settings) with their value.
"""
from __future__ import annotations

import base64
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from . import reader, tree


class TensorLeaf(dict):
    """A tensor leaf's description (a dict, so the decoded tree stays JSON-like)."""


@dataclass
class Section:
    name: str  # "replicated" or "rank_state[R]"
    leaves: list[tuple[str, Any]] = field(default_factory=list)  # (key path, TensorLeaf or value)
    structure: Any = None  # the decoded tree with TensorLeaf placeholders


@dataclass
class Summary:
    path: str
    manifest: dict
    parts: list[dict]  # per rank: bytes_raw, bytes_stored, chunks, codecs
    sections: list[Section]

    @property
    def bytes_raw(self) -> int:
        return sum(p["bytes_raw"] for p in self.parts)

    @property
    def bytes_stored(self) -> int:
        return sum(p["bytes_stored"] for p in self.parts)


def _storage_sizes(op: reader.Opened, scope: str, rank: int) -> dict[int, tuple[int, int, int]]:
    """storage id -> (rank holding it, raw bytes, stored bytes estimated from its chunks' ratio)."""
    out = {}
    ranks = range(len(op.parts)) if scope == "replicated" else [rank]
    for pi in ranks:
        chunks = op.parts[pi]["chunks"]
        for s in op.parts[pi]["storages"]:
            if s["scope"] != scope:
                continue
            stored = 0.0
            for p in s["pieces"]:
                ch = chunks[p["chunk"]]
                stored += p["nbytes"] * (ch["stored_len"] / ch["raw_len"] if ch["raw_len"] else 1.0)
            out[s["id"]] = (pi, s["nbytes"], int(round(stored)))
    return out


def _section(op: reader.Opened, scope: str, rank: int, name: str) -> Section:
    sec = op.parts[0]["replicated"] if scope == "replicated" else op.parts[rank]["rank_state"]
    sizes = _storage_sizes(op, scope, rank)
    entries = sec["tensors"]
    where = os.path.join(op.path, f"rank-{(0 if scope == 'replicated' else rank):05d}.json")

    def make(i: int, into: Any, _path: str) -> TensorLeaf:
        if not 0 <= i < len(entries):
            from .errors import CorruptCheckpointError

            raise CorruptCheckpointError(f"invalid {where}: a tree leaf names tensor {i} of {len(entries)}",
                                         path=where)
        e = entries[i]
        holder, raw, stored = sizes.get(e["storage"], (None, 0, 0))
        ratio = raw / stored if stored else 1.0
        leaf = TensorLeaf(dtype=e["dtype"], shape=list(e["shape"]), nbytes=e["nbytes"],
                          stored_bytes=int(round(e["nbytes"] / ratio)) if ratio else e["nbytes"],
                          codec_ratio=round(ratio, 3), rank=holder, device=e.get("device"),
                          requires_grad=bool(e.get("requires_grad")), storage=e["storage"])
        if type(into) is tree.NumpyLeaf:
            leaf["numpy"] = True  # loads as a NumPy array (or scalar), not as a tensor
        return leaf

    structure = tree.unflatten(sec["tree"], make, None, where)
    out = Section(name, structure=structure)
    walk(structure, "", out.leaves)
    return out


def walk(obj: Any, path: str, out: list[tuple[str, Any]]) -> None:
    """Flatten a decoded state into (key path, leaf) pairs; key paths join keys with "/"."""
    if isinstance(obj, dict) and not isinstance(obj, TensorLeaf):
        if not obj:
            out.append((path, {}))
        for k, v in obj.items():
            walk(v, f"{path}/{k}" if path else str(k), out)
    elif isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        if not obj or all(_scalar(x) for x in obj):
            out.append((path, obj))  # a list of plain values is one leaf, printed inline
            return
        for i, v in enumerate(obj):
            walk(v, f"{path}/{i}" if path else str(i), out)
    else:
        out.append((path, obj))


def _scalar(x: Any) -> bool:
    return x is None or isinstance(x, (bool, int, float, str))


def summarize(path: str) -> Summary:
    """Read and validate ``path`` (a checkpoint directory) and describe it."""
    op = reader.open_checkpoint(path)
    parts = []
    for r, part in enumerate(op.parts):
        codecs: dict[str, int] = {}
        for ch in part["chunks"]:
            codecs[ch["codec"]] = codecs.get(ch["codec"], 0) + 1
        parts.append({"rank": r, "chunks": len(part["chunks"]), "codecs": codecs,
                      "bytes_raw": sum(c["raw_len"] for c in part["chunks"]),
                      "bytes_stored": sum(c["stored_len"] for c in part["chunks"]),
                      # incremental chunks held by earlier checkpoints (docs/FORMAT.md §14)
                      "chunks_referenced": sum(c["file"].startswith("../") for c in part["chunks"]),
                      "references": sorted({c["file"].split("/")[1] for c in part["chunks"]
                                            if c["file"].startswith("../")})})
    sections = [_section(op, "replicated", 0, "replicated")]
    from . import sharded  # 1.2: DTensors (null in the replicated tree), with every rank's shards

    if sharded.has_sharded(op):
        sections.append(Section("sharded", leaves=sharded.inspect_leaves(op, TensorLeaf)))
    for r, part in enumerate(op.parts):
        if part.get("rank_state") is not None:
            sections.append(_section(op, "rank", r, f"rank_state[{r}]"))
    return Summary(op.path, op.manifest, parts, sections)


def jsonable(v: Any) -> Any:
    """A JSON-friendly form of a decoded leaf value."""
    if isinstance(v, TensorLeaf):
        return {"tensor": dict(v)}
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, torch.Size):
        return {"size": list(v)}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, bytes):
        return {"bytes": base64.b64encode(v[:64]).decode(), "len": len(v)}
    return str(v)  # torch.dtype, torch.device


def to_json(s: Summary) -> dict[str, Any]:
    """The ``--json`` document of ``pyckpt inspect``."""
    m = s.manifest
    return {
        "path": s.path, "step": m["step"], "world_size": m["world_size"], "format_version": m["format_version"],
        "created_by": m.get("created_by"), "created_at": m.get("created_at"),
        "bytes_raw": s.bytes_raw, "bytes_stored": s.bytes_stored,
        "codec_ratio": round(s.bytes_raw / s.bytes_stored, 4) if s.bytes_stored else 1.0,
        "parts": s.parts,
        "sections": {sec.name: [{"key": k, **(({"type": "tensor", **v}) if isinstance(v, TensorLeaf)
                                              else {"type": "value", "value": jsonable(v)})}
                                for k, v in sec.leaves] for sec in s.sections},
    }


def human(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _short(v: Any, width: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= width else text[: width - 5] + " ...]" if text[0] == "[" else text[: width - 3] + "..."


def render(s: Summary, max_leaves: int = 2000) -> str:
    """The text tree of ``pyckpt inspect``."""
    m = s.manifest
    by = m.get("created_by") or {}
    ratio = s.bytes_raw / s.bytes_stored if s.bytes_stored else 1.0
    codecs = sorted({c for p in s.parts for c in p["codecs"]})
    lines = [
        f"{s.path}",
        f"  step {m['step']}, world size {m['world_size']}, format {'.'.join(map(str, m['format_version']))}, "
        f"written {m.get('created_at', '?')} by pyckpt {by.get('pyckpt', '?')} / torch {by.get('torch', '?')}",
        f"  data: {human(s.bytes_raw)} raw, {human(s.bytes_stored)} stored (codec ratio {ratio:.2f}, "
        f"codecs {', '.join(codecs) or 'none'}), {len(s.parts)} rank part(s)",
    ]
    for p in s.parts:
        refs = (f", {p['chunks_referenced']} referenced in {', '.join(p['references'])}"
                if p.get("chunks_referenced") else "")
        lines.append(f"    rank {p['rank']}: {p['chunks']} chunk(s), {human(p['bytes_raw'])} raw, "
                     f"{human(p['bytes_stored'])} stored{refs}")
    shown = 0
    for sec in s.sections:
        ntensors = sum(isinstance(v, TensorLeaf) for _, v in sec.leaves)
        nbytes = sum(v["nbytes"] for _, v in sec.leaves if isinstance(v, TensorLeaf))
        lines.append(f"{sec.name}: {ntensors} tensor(s), {human(nbytes)}")
        prev: list[str] = []
        for key, v in sec.leaves:
            if shown >= max_leaves:
                lines.append(f"  ... ({sum(len(x.leaves) for x in s.sections) - shown} more leaves; use --json)")
                return "\n".join(lines)
            shown += 1
            parts = key.split("/") if key else ["(root)"]
            common = 0
            while common < min(len(prev), len(parts) - 1) and prev[common] == parts[common]:
                common += 1
            for d in range(common, len(parts) - 1):
                lines.append("  " + "  " * d + parts[d] + "/")
            prev = parts[:-1]
            pad = "  " + "  " * (len(parts) - 1)
            if isinstance(v, TensorLeaf):
                where = f"rank {v['rank']}" if v["rank"] is not None else "-"
                lines.append(f"{pad}{parts[-1]}  {v['dtype']} {v['shape']}  {human(v['nbytes'])}  "
                             f"ratio {v['codec_ratio']:.2f}  {where}  {'numpy' if v.get('numpy') else v['device']}")
            else:
                lines.append(f"{pad}{parts[-1]}: {_short(v)}")
    return "\n".join(lines)


# -- diff -------------------------------------------------------------------------------
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def leaves(state: Any) -> dict[str, Any]:
    """Key path -> leaf (a tensor, or a plain value / list of plain values) of a loaded state."""
    out: list[tuple[str, Any]] = []
    walk(state, "", out)
    return dict(out)


def _elementwise_differs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bool mask of elements whose bits differ (NaN equals the same NaN; -0.0 differs from 0.0)."""
    a, b = a.detach().contiguous(), b.detach().contiguous()
    size = a.element_size()
    if size in _SAME_SIZE_INT:
        return a.view(_SAME_SIZE_INT[size]) != b.view(_SAME_SIZE_INT[size])
    n = a.numel()  # complex128: compare 16-byte elements as pairs of int64
    pa, pb = a.reshape(-1).view(torch.int64).reshape(n, -1), b.reshape(-1).view(torch.int64).reshape(n, -1)
    return (pa != pb).any(dim=1).reshape(a.shape)


def compare_tensors(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    """How two tensors differ: dtype/shape, number of differing elements, max |a-b|."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return {"status": "changed", "why": f"{_code(a)} {list(a.shape)} -> {_code(b)} {list(b.shape)}",
                "differing": None, "numel": a.numel(), "max_abs_diff": None}
    if a.numel() == 0:
        return {"status": "same", "differing": 0, "numel": 0, "max_abs_diff": 0.0}
    mask = _elementwise_differs(a, b)
    ndiff = int(mask.sum())
    if ndiff == 0:
        return {"status": "same", "differing": 0, "numel": a.numel(), "max_abs_diff": 0.0}
    mad: float | None
    try:  # bits, sub-byte and float8/float4 dtypes lack indexing or arithmetic kernels: no max |a-b|
        x, y = a.detach()[mask], b.detach()[mask]
        if a.dtype == torch.bool:
            mad = 1.0
        elif a.dtype.is_complex:
            mad = float((x.to(torch.complex128) - y.to(torch.complex128)).abs().max())
        else:
            mad = float((x.to(torch.float64) - y.to(torch.float64)).abs().max())
    except (RuntimeError, TypeError, NotImplementedError):
        mad = None
    return {"status": "changed", "why": None, "differing": ndiff, "numel": a.numel(),
            "max_abs_diff": None if mad is None else (mad if math.isfinite(mad) else repr(mad))}


def _code(t: torch.Tensor) -> str:
    """The format dtype code of ``t`` (its torch name when it has none)."""
    from .dtypes import DTYPE_TO_CODE

    return DTYPE_TO_CODE.get(t.dtype, str(t.dtype))


def diff_states(a: Any, b: Any, progress: Any = None) -> dict[str, Any]:
    """Leaf-by-leaf comparison of two loaded states (the ``pyckpt diff`` document, less the paths)."""
    la, lb = leaves(a), leaves(b)
    keys = [k for k in la if k in lb]
    it = progress(keys, desc="diff", unit="leaf") if progress is not None else keys
    changed, values, same = [], [], 0
    for k in it:
        x, y = la[k], lb[k]
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            c = compare_tensors(x, y)
            if c["status"] == "same":
                same += 1
            else:
                changed.append({"key": k, "dtype": _code(x), "shape": list(x.shape), **c})
        elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor) or not _same_value(x, y):
            values.append({"key": k, "a": jsonable(x if not isinstance(x, torch.Tensor) else "<tensor>"),
                           "b": jsonable(y if not isinstance(y, torch.Tensor) else "<tensor>")})
        else:
            same += 1
    return {"changed": changed, "values_changed": values, "only_in_a": [k for k in la if k not in lb],
            "only_in_b": [k for k in lb if k not in la], "same": same,
            "identical": not changed and not values and all(k in lb for k in la) and all(k in la for k in lb)}


def _same_value(x: Any, y: Any) -> bool:
    if type(x) is not type(y):
        return False
    if isinstance(x, float) and math.isnan(x) and math.isnan(y):
        return True
    try:
        return bool(x == y)
    except Exception:  # noqa: BLE001 - exotic values: treat as different, never crash a diff
        return False
