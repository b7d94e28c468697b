"""Converting checkpoints to and from the files other tools read: ``torch.save`` and safetensors.

Export loads the replicated state (or one rank's ``rank_state``) onto the CPU.
``torch``: ``torch.save`` of that state; it loads with
``torch.load(weights_only=True)`` because a pyckpt state holds only tensors,
containers and plain values. ``safetensors``: one tensor per leaf, named by
its key path (``model/fc.weight``; a flat state_dict keeps its own names).
What safetensors cannot hold (any non-tensor value, nesting, tuples, dtypes
outside its table, ``requires_grad``) goes to a JSON sidecar
``OUT.pyckpt.json`` holding the state tree; tensors of dtypes safetensors
lacks are stored as their raw bytes (U8) and re-typed from the sidecar.

Import never unpickles code: torch files are read with
``torch.load(weights_only=True)``, safetensors files and sidecars are parsed,
and every sidecar field is checked before it is used.
"""
from __future__ import annotations

import functools
import io
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import tree
from .dtypes import DTYPE_TO_CODE, dtype_of
from .errors import CorruptCheckpointError, PyckptError

SIDECAR_SUFFIX = ".pyckpt.json"
SIDECAR_FORMAT = "pyckpt-safetensors-sidecar"
# Dtypes every safetensors >= 0.4 reader knows; the others travel as raw bytes.
_SAFETENSORS_NATIVE = {torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                       torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2}
INSTALL_HINT = "the safetensors package is needed for this: pip install safetensors (or pip install 'pyckpt[cli]')"

Progress = Callable[[Iterable], Iterable]


def _no_progress(it: Iterable, **_: Any) -> Iterable:
    return it


def _safetensors() -> Any:
    try:
        import safetensors.torch as st
    except ImportError:
        raise PyckptError(INSTALL_HINT) from None
    return st


def load_state(path: str, rank: int | None = None) -> tuple[Any, int]:
    """(state on the CPU, step) of checkpoint ``path`` (a directory or a root: its latest).

    ``rank`` None: the replicated state; else that rank's ``rank_state``."""
    from ._native import get_engine
    from .api import resolve
    from .reader import load_section, open_checkpoint

    op = open_checkpoint(resolve(path))
    if rank is None:
        return load_section(get_engine(), op, "replicated", 0, None, "cpu"), op.step
    if not 0 <= rank < len(op.parts) or op.parts[rank].get("rank_state") is None:
        raise PyckptError(f"{op.path} has no rank_state for rank {rank} (world size {len(op.parts)})")
    return load_section(get_engine(), op, "rank", rank, None, "cpu"), op.step


@dataclass
class Exported:
    files: list[str]
    tensors: int
    step: int
    numpy_keys: list[str] = field(default_factory=list)  # --to torch: NumPy values weights_only=True refuses


def export(path: str, fmt: str, out: str, rank: int | None = None, progress: Progress = _no_progress) -> Exported:
    """Write checkpoint ``path`` to ``out`` as ``fmt`` ("torch" or "safetensors").

    Raises ``ValueError`` before anything is loaded for an unknown ``fmt`` or an ``out`` that
    names a directory or nothing (``check_out``)."""
    if fmt not in ("torch", "safetensors"):
        raise ValueError(f"format must be 'torch' or 'safetensors', got {fmt!r}")
    check_out(out, fmt)
    st = _safetensors() if fmt == "safetensors" else None
    state, step = load_state(path, rank)
    flat = tree.flatten(state)
    tensors = flat[1]
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    if fmt == "torch":
        _check_torch_can_store(tensors, flat[2])
        _atomic(out, lambda tmp: torch.save(state, tmp))
        return Exported([out], len(tensors), step, tree.numpy_keys(flat))
    files = _export_safetensors(st, state, flat, step, out, progress)
    return Exported(files, len(tensors), step)


def check_out(out: str, fmt: str) -> None:
    """Raise ``ValueError`` when ``out`` cannot name the file an export writes: checked before the
    checkpoint is loaded (which may take minutes), not when the file is renamed into place."""
    example = "model.safetensors" if fmt == "safetensors" else "model.pt"
    if not out:
        raise ValueError(f"OUT is an empty string: name the file to write (e.g. {example})")
    if os.path.isdir(out):
        raise ValueError(f"{out} is a directory: name the file to write, e.g. {os.path.join(out, example)}")
    if out.endswith(("/", os.sep)):
        raise ValueError(f"{out} names a directory (it ends with a slash): name the file to write, "
                         f"e.g. {out}{example}")


@functools.lru_cache(maxsize=None)
def _torch_saves(dtype: torch.dtype) -> bool:
    """Whether torch.save can write a tensor of ``dtype`` (it has no storage type for the sub-byte
    integers, torch.uint1..7 and int1..7, which pyckpt stores)."""
    try:
        torch.save(torch.empty(0, dtype=dtype), io.BytesIO())
    except (KeyError, RuntimeError, TypeError):
        return False
    return True


def _check_torch_can_store(tensors: list[torch.Tensor], paths: list[str]) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="ComplexHalf support is experimental")
        bad = next(((p, t.dtype) for t, p in zip(tensors, paths) if not _torch_saves(t.dtype)), None)
    if bad is not None:
        raise PyckptError(f"torch.save cannot store {bad[0]!r} ({bad[1]}): export with --to safetensors, "
                          "which carries it as raw bytes described in the sidecar")


def _atomic(out: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` then rename to ``out``: a failed export leaves no half file under ``out``'s name."""
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _names(paths: list[str]) -> list[str]:
    names, seen = [], set()
    for i, p in enumerate(paths):
        name = p or "tensor"
        if name in seen:
            name = f"{name}#{i}"  # two keys that print alike (1 and "1")
        seen.add(name)
        names.append(name)
    return names


def _export_safetensors(st: Any, state: Any, flat: tuple[Any, list[torch.Tensor], list[str]],
                       step: int, out: str, progress: Progress) -> list[str]:
    json_tree, tensors, paths = flat  # tree.flatten(state)
    names = _names(paths)
    flat_plain = (isinstance(state, dict) and json_tree == {k: {tree.TAG: "tensor", "id": i}
                                                          for i, k in enumerate(state)}
                  and names == list(state))
    records, data, storages = [], {}, set()
    for name, t in progress(list(zip(names, tensors)), desc="export", unit="tensor"):
        t = t.detach()
        raw = t.dtype not in _SAFETENSORS_NATIVE
        records.append({"name": name, "dtype": DTYPE_TO_CODE[t.dtype], "shape": list(t.shape),
                        "requires_grad": bool(t.requires_grad), "raw_bytes": raw})
        if raw:
            t = t.contiguous().reshape(-1).view(torch.uint8)
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if not t.is_contiguous() or key in storages or t.untyped_storage().nbytes() != t.nbytes:
            t = t.contiguous().clone()  # safetensors refuses views and tensors sharing memory
        storages.add(key)
        data[name] = t
    needs_sidecar = not flat_plain or any(r["raw_bytes"] or r["requires_grad"] for r in records)
    sidecar = out + SIDECAR_SUFFIX
    meta = {"format": "pt", "pyckpt_step": str(step)}
    if needs_sidecar:
        meta["pyckpt_sidecar"] = os.path.basename(sidecar)
    _atomic(out, lambda tmp: st.save_file(data, tmp, metadata=meta))
    if not needs_sidecar:
        if os.path.exists(sidecar):
            os.unlink(sidecar)  # a stale sidecar of an earlier export would be applied on import
        return [out]
    body = {"format": SIDECAR_FORMAT, "version": 1, "step": step, "tree": json_tree, "tensors": records}
    _atomic(sidecar, lambda tmp: _write_text(tmp, json.dumps(body, allow_nan=False)))
    return [out, sidecar]


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# -- import -----------------------------------------------------------------------------
def sniff(path: str) -> str:
    """"torch" or "safetensors" from the file's first bytes; raises PyckptError otherwise."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"  # zip container (torch >= 1.6) or a legacy pickle stream
    if len(head) == 9 and int.from_bytes(head[:8], "little") < (1 << 30) and head[8:9] == b"{":
        return "safetensors"
    raise PyckptError(f"{path} is neither a torch.save file nor a safetensors file")


def read_file(path: str) -> tuple[Any, int | None]:
    """The state held by a torch.save or safetensors file (a sidecar next to it is applied), and its step."""
    kind = sniff(path)
    if kind == "torch":
        import pickle

        try:
            with warnings.catch_warnings():
                # Rebuilding a complex32 tensor warns; the dtype is the file's, not a choice made here.
                warnings.filterwarnings("ignore", message="ComplexHalf support is experimental")
                return torch.load(path, map_location="cpu", weights_only=True), None
        except (pickle.UnpicklingError, RuntimeError, AttributeError, ValueError, EOFError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PyckptError(f"cannot import {path}: torch.load(weights_only=True) refused it ({first}). "
                              "pyckpt imports only tensors and plain containers and never runs code from a "
                              "file; load it yourself in trusted code and pass the state to pyckpt.save") from None
    st = _safetensors()
    try:
        flat = st.load_file(path, device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError
        raise PyckptError(f"cannot read safetensors file {path}: {e}") from None
    sidecar = path + SIDECAR_SUFFIX
    if not os.path.exists(sidecar):
        return flat, None
    return _apply_sidecar(flat, sidecar)


def _apply_sidecar(flat: dict[str, torch.Tensor], sidecar: str) -> tuple[Any, int | None]:
    def bad(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"invalid sidecar {sidecar}: {why}", path=sidecar)

    try:
        with open(sidecar, "rb") as f:
            body = json.loads(f.read(1 << 30))
    except (OSError, ValueError, RecursionError) as e:
        raise bad(str(e)) from None
    if not isinstance(body, dict) or body.get("format") != SIDECAR_FORMAT or body.get("version") != 1:
        raise bad("not a version-1 pyckpt sidecar")
    records = body.get("tensors")
    if not isinstance(records, list):
        raise bad("'tensors' is not a list")
    tensors = [_typed(flat, r, bad) for r in records]

    def make(i: int, _into: Any, key: str) -> torch.Tensor:
        if not 0 <= i < len(tensors):
            raise bad(f"leaf {key!r} names tensor {i} of {len(tensors)}")
        return tensors[i]

    state = tree.unflatten(body.get("tree"), make, None, sidecar)
    step = body.get("step")
    return state, step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None


def _typed(flat: dict[str, torch.Tensor], r: Any, bad: Callable[[str], Exception]) -> torch.Tensor:
    if not isinstance(r, dict) or not isinstance(r.get("name"), str) or r["name"] not in flat:
        raise bad(f"tensor record {r!r} names no tensor of the safetensors file")
    shape = r.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise bad(f"tensor {r['name']!r}: bad shape {shape!r}")
    dt = dtype_of(r.get("dtype"), "sidecar")
    t = flat[r["name"]]
    if r.get("raw_bytes"):
        want = dt.itemsize * math.prod(shape)
        if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() != want:
            raise bad(f"tensor {r['name']!r}: {t.numel()} raw bytes, {want} expected for {r['dtype']} {shape}")
        t = t.view(dt).reshape(shape) if want else torch.empty(shape, dtype=dt)
    elif t.dtype != dt or list(t.shape) != shape:
        raise bad(f"tensor {r['name']!r} is {t.dtype} {list(t.shape)} in the file, {dt} {shape} in the sidecar")
    if r.get("requires_grad") and (dt.is_floating_point or dt.is_complex):
        t.requires_grad_(True)
    return t


def import_file(src: str, out: str, step: int | None = None, compress: str = "none") -> str:
    """Make a pyckpt checkpoint from a torch.save or safetensors file; returns its directory.

    ``step`` None: ``out`` is the checkpoint directory (``pyckpt.save``).
    Otherwise ``out`` is a checkpoint root and the checkpoint becomes its
    ``step-N`` directory and ``latest`` (other checkpoints there are kept)."""
    from .api import save

    state, _ = read_file(src)
    if step is None:
        return save(state, out, compress=compress)
    from .checkpointer import Checkpointer

    # keep: never let an import delete checkpoints already in the root.
    ck = Checkpointer(out, keep=1 << 30, compress=compress)
    try:
        return ck.save(step, state).result()
    finally:
        ck.close()  # drop the directory lock
