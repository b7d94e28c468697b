"""load(into=...): every target checked before any byte is written, no silent casts, strict keys,
and a damaged chunk's bytes never reach a caller's tensor."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

import pyckpt
from pyckpt.errors import CorruptCheckpointError, PyckptError
from pyckpt.reader import IntoMismatchError

SENTINEL = -7.0


@pytest.fixture
def saved(tmp_path):
    state = {"model": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3),
                       "steps": torch.tensor([4], dtype=torch.int64)}, "epoch": 2}
    return pyckpt.save(state, tmp_path / "c"), state


def targets():
    return {"model": {"w": torch.full((2, 3), SENTINEL), "b": torch.full((3,), SENTINEL),
                      "steps": torch.full((1,), 99, dtype=torch.int64)}}


def untouched(t):
    m = t["model"]
    return bool((m["w"] == SENTINEL).all() and (m["b"] == SENTINEL).all() and m["steps"].item() == 99)


def test_matching_targets_load_in_place(saved):
    path, state = saved
    t = targets()
    out = pyckpt.load(path, into=t)
    for k, v in state["model"].items():
        assert out["model"][k] is t["model"][k] and torch.equal(v, t["model"][k])
    assert out["epoch"] == 2  # non-tensor values need no target


def test_dtype_mismatch_is_an_error_not_a_cast(saved):
    path, _ = saved
    t = targets()
    t["model"]["w"] = torch.full((2, 3), 99, dtype=torch.int64)  # float32 saved
    with pytest.raises(IntoMismatchError, match="dtype") as ei:
        pyckpt.load(path, into=t)
    assert "model/w" in str(ei.value) and "torch.float32" in str(ei.value)
    assert (t["model"]["w"] == 99).all() and (t["model"]["b"] == SENTINEL).all()


def test_every_problem_is_listed_and_nothing_is_written(saved):
    path, _ = saved
    t = targets()
    t["model"]["w"] = torch.full((3, 2), SENTINEL)          # shape
    t["model"]["steps"] = torch.empty(1, dtype=torch.int64, device="meta")  # meta target: no memory
    del t["model"]["b"]                                     # a saved tensor without a target
    t["model"]["extra"] = torch.full((2,), SENTINEL)        # a target without a saved tensor
    keep = {k: v for k, v in t["model"].items()}
    with pytest.raises(IntoMismatchError) as ei:
        pyckpt.load(path, into=t)
    e = ei.value
    assert len(e.problems) == 4, e.problems
    msg = str(e)
    for needle in ("model/w", "shape", "model/steps", "meta", "model/b", "model/extra", "nothing was written"):
        assert needle in msg, needle
    assert e.unexpected == ["model/b"] and e.missing == ["model/extra"]
    assert (keep["w"] == SENTINEL).all() and (keep["extra"] == SENTINEL).all()


def test_errors_come_before_any_target_is_written(saved):
    """The first target is fine and the last is wrong: the first must still be untouched."""
    path, _ = saved
    t = targets()
    t["model"]["steps"] = torch.full((1,), 99, dtype=torch.int32)
    with pytest.raises(IntoMismatchError):
        pyckpt.load(path, into=t)
    assert (t["model"]["w"] == SENTINEL).all() and (t["model"]["b"] == SENTINEL).all()


def test_strict_false_loads_extras_and_leaves_missing_targets_and_says_so(saved, caplog):
    path, state = saved
    t = targets()
    del t["model"]["b"]
    t["model"]["extra"] = torch.full((2,), SENTINEL)
    with caplog.at_level(logging.WARNING, logger="pyckpt"):
        out = pyckpt.load(path, into=t, strict=False)
    assert torch.equal(out["model"]["b"], state["model"]["b"])  # loaded as a new tensor
    assert (t["model"]["extra"] == SENTINEL).all() and out["model"]["w"] is t["model"]["w"]
    line = [r.getMessage() for r in caplog.records if "into=" in r.getMessage()]
    assert len(line) == 1 and "model/b" in line[0] and "model/extra" in line[0] and line[0].startswith("pyckpt:")


def test_strict_false_still_refuses_wrong_dtypes_and_meta(saved):
    path, _ = saved
    t = targets()
    t["model"]["w"] = torch.empty((2, 3), device="meta")
    with pytest.raises(IntoMismatchError, match="meta"):
        pyckpt.load(path, into=t, strict=False)


def test_an_expanded_target_is_refused(saved):
    path, _ = saved
    t = targets()
    t["model"]["b"] = torch.zeros(1).expand(3)
    with pytest.raises(IntoMismatchError, match="expanded"):
        pyckpt.load(path, into=t)


@pytest.mark.parametrize("compress", ["none", "zstd"])
def test_a_damaged_chunk_never_reaches_the_callers_tensor(tmp_path, knob_env, compress):
    """Two chunks: the second is damaged. Its target keeps its old bytes (it used to receive the
    damaged bytes, read straight into it before the checksum was checked)."""
    knob_env(PYCKPT_CHUNK_MB=1)
    a = torch.arange(300_000, dtype=torch.float32)
    b = (torch.arange(300_000, dtype=torch.float32) % 7) if compress == "zstd" else torch.randn(300_000)
    path = pyckpt.save({"a": a, "b": b}, tmp_path / "c", compress=compress)
    part = json.loads(Path(path, "rank-00000.json").read_text())
    storages = {s["id"]: s for s in part["storages"]}
    tensors = part["replicated"]["tensors"]
    # A chunk holding only b's bytes (the case that used to be read straight into the target).
    piece = next(p for p in storages[tensors[1]["storage"]]["pieces"]
                 if part["chunks"][p["chunk"]]["raw_len"] == p["nbytes"])
    c = part["chunks"][piece["chunk"]]
    with open(os.path.join(path, c["file"]), "r+b") as f:
        f.seek(c["offset"] + c["stored_len"] // 2)
        byte = f.read(1)
        f.seek(c["offset"] + c["stored_len"] // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    dst = {"a": torch.full_like(a, SENTINEL), "b": torch.full_like(b, SENTINEL)}
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        pyckpt.load(path, into=dst)
    lo, n = piece["storage_offset"] // 4, piece["nbytes"] // 4  # b's elements held by the damaged chunk
    assert n > 0 and (dst["b"][lo:lo + n] == SENTINEL).all()


def test_map_location_garbage_is_a_pyckpt_error(saved):
    path, _ = saved
    with pytest.raises(PyckptError, match="map_location"):
        pyckpt.load(path, map_location="nonsense:3")


def test_tied_targets_from_two_saved_tensors_load_only_when_the_values_agree(tmp_path):
    """Two targets that are one tensor (tied weights) fed from two saved tensors: both were read straight
    into it in parallel, so with different values it ended up a chunk-by-chunk mix of both (seen with
    64 MiB tensors: one chunk of 16 from one, the rest from the other), without a word. Equal values
    still load."""
    n = 4 << 20  # 4 chunks each
    pyckpt.save({"emb": torch.zeros(n), "head": torch.ones(n)}, tmp_path / "untied")
    tied = torch.full((n,), SENTINEL)
    with pytest.raises(IntoMismatchError, match="'emb' and 'head' are the same target memory") as ei:
        pyckpt.load(tmp_path / "untied", into={"emb": tied, "head": tied})
    assert "nothing was written" in str(ei.value) and bool((tied == SENTINEL).all())
    pyckpt.save({"emb": torch.arange(n, dtype=torch.float32), "head": torch.arange(n, dtype=torch.float32)},
                tmp_path / "equal")  # e.g. exported to safetensors, which cannot share, and imported back
    pyckpt.load(tmp_path / "equal", into={"emb": tied, "head": tied})
    assert torch.equal(tied, torch.arange(n, dtype=torch.float32))
    shared = torch.randn(n)  # saved tied: one storage, no comparison needed
    pyckpt.save({"emb": shared, "head": shared}, tmp_path / "tied")
    pyckpt.load(tmp_path / "tied", into={"emb": tied, "head": tied})
    assert torch.equal(tied, shared)


def test_targets_that_overlap_in_part_are_refused_before_reading(tmp_path):
    pyckpt.save({"a": torch.zeros(6), "b": torch.ones(4)}, tmp_path / "c")
    base = torch.full((8,), SENTINEL)
    with pytest.raises(IntoMismatchError, match="'a' and 'b' overlap in memory"):
        pyckpt.load(tmp_path / "c", into={"a": base[:6], "b": base[4:]})
    assert bool((base == SENTINEL).all())


def test_targets_that_are_views_of_one_tensor_without_overlap_or_as_saved_load(tmp_path):
    """No false alarm: disjoint views of one target tensor, and views saved as views of one storage."""
    big = torch.arange(10, dtype=torch.float32)
    pyckpt.save({"lo": big[:4], "hi": big[4:], "t": big[2:8].view(2, 3).t()}, tmp_path / "c")
    base = torch.full((10,), SENTINEL)
    pyckpt.load(tmp_path / "c", into={"lo": base[:4], "hi": base[4:], "t": base[2:8].view(2, 3).t()})
    assert torch.equal(base, big)
    pyckpt.save({"a": torch.zeros(10), "b": torch.ones(2), "c": torch.full((2,), 2.0)}, tmp_path / "d")
    wide = torch.full((10,), SENTINEL)  # a wide target, then two disjoint ones inside another tensor
    other = torch.full((4,), SENTINEL)
    pyckpt.load(tmp_path / "d", into={"a": wide, "b": other[:2], "c": other[2:]})
    assert torch.equal(other, torch.tensor([1.0, 1.0, 2.0, 2.0])) and not wide.any()


def test_a_sparse_target_is_a_listed_problem(saved):
    """A sparse target has no strided memory: it is one of the listed problems, not a RuntimeError from
    reading its data pointer (the aliasing check reads every target's)."""
    path, _ = saved
    t = targets()
    t["model"]["w"] = torch.zeros(2, 3).to_sparse()
    with pytest.raises(IntoMismatchError, match="'model/w': the target is a torch.sparse_coo tensor"):
        pyckpt.load(path, into=t)
    assert bool((t["model"]["b"] == SENTINEL).all())
