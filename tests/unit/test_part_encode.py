"""writer.encode_part: a part's bytes assembled from the cached encoding of a reused plan's storage
records and tensor entries are exactly ``manifest.dumps(part)``, whatever was done to the part after
``describe_part``; a layout saved again is not encoded again; the checkpoints load."""
from __future__ import annotations

import json
import os

import pytest
import torch

import pyckpt
from pyckpt import commit, incremental, manifest, sharded, writer
from pyckpt._native import get_engine
from pyckpt.planner import Storage

CHUNK = 1 << 16


def _model_state(n: int = 12, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(n)])
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optim": opt.state_dict(), "lr": 1.0, "name": "x\u00e9\n"}


def _written(tmp_path, plan: writer.RankPlan, name: str, **describe) -> dict:
    """The part of ``plan`` after the engine wrote its chunks under ``tmp_path/name``."""
    d = str(tmp_path / name)
    os.makedirs(d)
    job = writer.start(get_engine(), plan, d, "none")
    job.wait(None)
    assert writer.job_error(job) is None
    return writer.describe_part(plan, job.results(), d, **describe)


def _encodes(monkeypatch) -> list:
    """Every list ``writer`` encodes from now on (writer.dumps is manifest.dumps)."""
    seen: list = []

    def spy(obj):
        seen.append(obj)
        return manifest.dumps(obj)

    monkeypatch.setattr(writer, "dumps", spy)
    return seen


def test_fresh_and_reused_plans_encode_to_the_canonical_bytes_once_per_layout(tmp_path, monkeypatch):
    last: dict = {}
    seen = _encodes(monkeypatch)
    plan1 = writer.prepare(_model_state(), None, 0, 1, CHUNK, last)
    part1 = _written(tmp_path, plan1, "a")
    assert writer.encode_part(plan1, part1) == manifest.dumps(part1)
    records, entries = plan1.replicated.json, plan1.replicated.entries
    assert any(o is records for o in seen) and any(o is entries for o in seen)  # encoded the first time

    seen.clear()
    plan2 = writer.prepare(_model_state(seed=1), None, 0, 1, CHUNK, last)  # new values, same layout
    assert plan2.replicated.entries is entries  # reused (planner.describe)
    part2 = _written(tmp_path, plan2, "b")
    assert part2["storages"] is not records and part2["storages"] == records
    raw2 = writer.encode_part(plan2, part2)
    assert raw2 == manifest.dumps(part2)
    assert not any(o is records or o is entries for o in seen)  # not encoded again
    assert plan2.replicated.encoded is plan1.replicated.encoded


def test_rank_state_section_and_a_replica_without_the_tree(tmp_path):
    state = _model_state()
    for rank in (0, 1):  # rank 1 of 2: some storages, no replicated tree, its own rank_state
        last: dict = {}
        for i in range(2):
            rs = {"rng": torch.arange(5 + rank), "step": 7, "t": (1, 2.5, None)}
            plan = writer.prepare(state, rs, rank, 2, CHUNK, last)
            part = _written(tmp_path, plan, f"r{rank}-{i}")
            assert (part["replicated"] is None) == (rank == 1) and part["rank_state"] is not None
            assert writer.encode_part(plan, part) == manifest.dumps(part)
        assert plan.rank_state.encoded["entries"].of is plan.rank_state.entries


def test_incremental_part_with_referenced_chunks(tmp_path):
    plan = writer.prepare(_model_state(), {"x": torch.ones(3)}, 0, 1, CHUNK, {})
    assert len(plan.chunks) >= 2
    d = str(tmp_path / "inc")
    os.makedirs(d)
    job = writer.start(get_engine(), plan, d, "none")
    job.wait(None)
    results = job.results()
    rec = {"file": "step-000000001/rank-00000/data-000.bin", "offset": 0, "stored_len": results[0][2],
           "raw_len": results[0][2], "elem_size": 4, "codec": "none", "crc32c": 5, "raw_crc32c": 6}
    inc = [(0x1234, incremental.STATUS_REFERENCED)] + [(i, incremental.STATUS_WRITTEN)
                                                       for i in range(1, len(plan.chunks))]
    part = writer.describe_part(plan, results, d, inc, {0: (rec, 4096)})
    assert part["chunks"][0]["file"].startswith("../") and part["files"][-1]["path"].startswith("../")
    assert writer.encode_part(plan, part) == manifest.dumps(part)


def _shard_plan(plan: writer.RankPlan) -> None:
    """A sharded section as sharded.plan would give it (one local shard), packed after the others."""
    local = torch.arange(40, dtype=torch.float32)
    sp = sharded.ShardPlan(entries=[{"key": ["w"], "dtype": "f32", "shape": [80], "requires_grad": False,
                                     "device": "cpu", "placements": ["Shard(dim=0)"], "mesh_shape": [2],
                                     "shards": [{"offsets": [0], "shape": [40], "storage": 0}]}],
                           storages=[Storage(0, local.numel() * 4, 4, local.device, 0)], keeps=[local],
                           bases=[local.data_ptr()])
    sharded.add_chunks(sp, plan.chunks, CHUNK)
    plan.shards = sp


def test_sharded_parts_and_changed_parts_are_encoded_afresh(tmp_path):
    last: dict = {}
    warm = writer.prepare(_model_state(), None, 0, 1, CHUNK, last)
    writer.encode_part(warm, _written(tmp_path, warm, "warm"))  # the cache holds this layout's fragments
    plan = writer.prepare(_model_state(), None, 0, 1, CHUNK, last)
    _shard_plan(plan)
    part = _written(tmp_path, plan, "s")
    n = len(part["storages"])
    sharded.add_to_part(part, plan)
    assert len(part["storages"]) == n + 1 and "sharded" in part
    assert writer.encode_part(plan, part) == manifest.dumps(part)

    # Whatever a caller changes after describe_part is in the bytes, never a stale fragment.
    rep = part["replicated"]
    changes = [
        lambda p: p["storages"].__setitem__(0, {**p["storages"][0], "nbytes": 1}),  # a record replaced
        lambda p: p["storages"].pop(),  # one fewer
        lambda p: p.__setitem__("storages", list(reversed(p["storages"]))),  # reordered
        lambda p: p["replicated"].__setitem__("tensors", rep["tensors"][:-1] + [{"dtype": "f32"}]),  # same length
        lambda p: p["replicated"].__setitem__("tensors", [dict(t) for t in rep["tensors"][:-1]]),
        lambda p: p["replicated"].__setitem__("tensors", rep["tensors"] + [{"dtype": "f32"}]),
        lambda p: p["replicated"].__setitem__("extra", [1.5]),
        lambda p: p.__setitem__("replicated", {"num_storages": 1, **p["replicated"]}),  # key order
        lambda p: p.__setitem__("rank", 3),
        lambda p: p.pop("rank_state"),
    ]
    for i, change in enumerate(changes):
        p = {**part, "storages": list(part["storages"]), "replicated": dict(rep)}
        change(p)
        assert writer.encode_part(plan, p) == manifest.dumps(p), i
    entries = plan.replicated.entries
    entries.append({"dtype": "f32"})  # the plan's own list grown in place (it is documented read-only)
    try:
        assert writer.encode_part(plan, part) == manifest.dumps(part)
    finally:
        entries.pop()
    assert writer.encode_part(plan, {}) == b"{}"
    with pytest.raises(ValueError):  # as manifest.dumps: no NaN in a part
        writer.encode_part(plan, {**part, "rank_state": {"tree": float("nan")}})


def test_checkpointer_writes_the_canonical_bytes_and_loads_them(ckpt_root, monkeypatch, knob_env):
    """Through Checkpointer.save: fresh, reused, rank_state, incremental (referenced chunks); each
    part file holds manifest.dumps(part) and every checkpoint restores its own values."""
    captured = []
    real = commit.commit_parts

    def spy(coord, tag, tmp, final, step, part, err, root, raw=None):
        captured.append((final, part, raw))
        return real(coord, tag, tmp, final, step, part, err, root, raw)

    monkeypatch.setattr(commit, "commit_parts", spy)
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(10)])
    frozen = torch.randn(1 << 18)  # 1 MiB, unchanged between saves: referenced by the incremental ones
    want, fragments = {}, []
    knob_env(PYCKPT_CHUNK_MB=1)  # the engine rebuilt with 1 MiB chunks, and again after the test
    with pyckpt.Checkpointer(ckpt_root, keep=10, incremental=True) as ck:
        for step in range(1, 5):
            with torch.no_grad():
                model[step].weight.add_(1.0)  # in place: the plan is reused
            state = {"model": model.state_dict(), "frozen": frozen}
            ck.save(step, state, rank_state={"step": torch.tensor(step)}).result(60)
            want[step] = {k: v.clone() for k, v in state["model"].items()}
            (sections,) = ck._last_plan.values()
            fragments.append(sections["replicated"].encoded["storages"])
        assert all(f is fragments[0] for f in fragments)  # encoded at the first save only
        for step in range(1, 5):
            got = ck.restore(step, into={"model": {k: torch.zeros_like(v) for k, v in want[step].items()},
                                         "frozen": torch.zeros_like(frozen)})
            assert all(torch.equal(got.state["model"][k], v) for k, v in want[step].items())
            assert torch.equal(got.state["frozen"], frozen) and got.rank_state["step"].item() == step
    assert len(captured) == 4 and all(raw is not None for _, _, raw in captured)
    assert any(ch["file"].startswith("../") for ch in captured[-1][1]["chunks"])  # chunks referenced
    for final, part, raw in captured:
        assert raw == manifest.dumps(part)
        with open(os.path.join(final, "rank-00000.json"), "rb") as f:
            assert f.read() == raw


def test_a_tree_saved_again_unchanged_is_not_encoded_again_and_any_change_of_value_or_type_is(tmp_path, monkeypatch):
    """The state tree's JSON is reused only for a tree equal in values *and* types: Python's ``==``
    holds between 1, 1.0 and True, and between 0.0 and -0.0, whose JSON differs."""
    last: dict = {}
    seen = _encodes(monkeypatch)

    def state(**scalars):
        return {**_model_state(), **scalars}

    base = {"lr": 1.0, "flag": True, "zero": 0.0, "n": 3}
    plan = writer.prepare(state(**base), None, 0, 1, CHUNK, last)
    part = _written(tmp_path, plan, "t0")
    assert writer.encode_part(plan, part) == manifest.dumps(part)

    seen.clear()
    plan = writer.prepare(state(**base), None, 0, 1, CHUNK, last)  # a new tree object, the same values
    part = _written(tmp_path, plan, "t1")
    assert part["replicated"]["tree"] is not None
    assert writer.encode_part(plan, part) == manifest.dumps(part)
    assert not any(type(o) is dict and "model" in o for o in seen)  # the tree was not encoded again

    changes = [{"lr": 1}, {"flag": 1}, {"n": True}, {"n": 3.0}, {"zero": -0.0}, {"lr": 1.5}, {"extra": None}]
    for i, change in enumerate(changes):
        plan = writer.prepare(state(**{**base, **change}), None, 0, 1, CHUNK, last)
        part = _written(tmp_path, plan, f"c{i}")
        raw = writer.encode_part(plan, part)
        assert raw == manifest.dumps(part), change
        tree = json.loads(raw)["replicated"]["tree"]
        key, want = next(iter(change.items()))
        assert type(tree[key]) is type(want) and repr(tree[key]) == repr(want), change  # the value as given
