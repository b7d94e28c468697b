"""The fast per-entry checks of part validation (manifest._tensors_ok / _storages_ok).

They only decide whether the detailed per-field checks can be skipped: a part
must be accepted or refused exactly as the detailed checks alone decide, with
the same message, for well-formed and hostile entries alike."""
import copy
import random

import pytest

from pyckpt import manifest
from pyckpt.errors import CorruptCheckpointError

BIG = 1 << 63  # one past the largest integer a part may hold


def many_tensor_part(n=50):
    """A well-formed part of ``n`` F32 tensors, each in its own storage, plus two views of one
    storage split over both chunks (pieces in storage order, as writers list them)."""
    tensors, storages, off = [], [], 0
    for i in range(n):
        tensors.append({"dtype": "F32", "shape": [2, 2], "stride": [2, 1], "storage_offset": 0, "storage": i,
                        "nbytes": 16, "device": "cpu", "requires_grad": False})
        storages.append({"scope": "replicated", "id": i, "nbytes": 16, "elem_size": 4,
                         "pieces": [{"chunk": 0, "chunk_offset": off, "storage_offset": 0, "nbytes": 16}]})
        off += 16
    tensors += [{"dtype": "F32", "shape": [4], "stride": [1], "storage_offset": 0, "storage": n, "nbytes": 16,
                 "device": "cpu", "requires_grad": True},
                {"dtype": "I8", "shape": [2, 3], "stride": [1, 2], "storage_offset": 10, "storage": n, "nbytes": 6,
                 "device": "cuda:0", "requires_grad": False}]
    storages.append({"scope": "replicated", "id": n, "nbytes": 32, "elem_size": 1, "pieces": [
        {"chunk": 0, "chunk_offset": off, "storage_offset": 0, "nbytes": 16},
        {"chunk": 1, "chunk_offset": 0, "storage_offset": 16, "nbytes": 16}]})
    storages.append({"scope": "rank", "id": 0, "nbytes": 8, "elem_size": 8,
                     "pieces": [{"chunk": 1, "chunk_offset": 16, "storage_offset": 0, "nbytes": 8}]})
    return {
        "rank": 0,
        "files": [{"path": "rank-00000/data-000.bin", "nbytes": 1 << 16}],
        "chunks": [
            {"file": "rank-00000/data-000.bin", "offset": 0, "stored_len": off + 16, "raw_len": off + 16,
             "elem_size": 4, "codec": "none", "crc32c": 1, "raw_crc32c": 1},
            {"file": "rank-00000/data-000.bin", "offset": 8192, "stored_len": 24, "raw_len": 24, "elem_size": 1,
             "codec": "none", "crc32c": 2, "raw_crc32c": 2},
        ],
        "storages": storages,
        "replicated": {"tree": {"t": {"__pyckpt__": "tensor", "id": 0}}, "tensors": tensors, "num_storages": n + 1},
        "rank_state": {"tree": {"x": {"__pyckpt__": "tensor", "id": 0}}, "num_storages": 1, "tensors": [
            {"dtype": "I64", "shape": [], "stride": [], "storage_offset": 0, "storage": 0, "nbytes": 8,
             "device": "cpu", "requires_grad": False}]},
    }


def outcome(part):
    """None when ``validate_part`` accepts a copy of ``part``, else its error message."""
    try:
        manifest.validate_part(copy.deepcopy(part), "d/rank-00000.json", 0)
    except CorruptCheckpointError as e:
        return str(e)
    return None


def detailed_outcome(part, monkeypatch):
    """``outcome`` with the fast checks switched off: the per-field checks decide everything."""
    with monkeypatch.context() as m:
        m.setattr(manifest, "_tensors_ok", lambda *a: False)
        m.setattr(manifest, "_storages_ok", lambda *a: False)
        return outcome(part)


def test_well_formed_entries_skip_the_per_field_checks(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the per-field checks ran for a well-formed part")

    monkeypatch.setattr(manifest, "_validate_tensor", refuse)
    monkeypatch.setattr(manifest, "_check_storages", refuse)
    assert outcome(many_tensor_part()) is None


def test_pieces_listed_out_of_order_are_still_accepted(monkeypatch):
    part = many_tensor_part()
    sto = next(s for s in part["storages"] if len(s["pieces"]) == 2)
    sto["pieces"].reverse()  # valid (the spec sorts by storage_offset), not how writers list them
    assert not manifest._storages_ok(part["storages"], [c["raw_len"] for c in part["chunks"]],
                                     {"replicated": 51, "rank": 1, "shard": -1})
    assert outcome(part) is None


def _set(path, value):
    def edit(p):
        *head, last = path
        obj = p
        for k in head:
            obj = obj[k]
        if value is DELETE:
            obj.pop(last, None)
        else:
            obj[last] = value
    return edit


DELETE = object()
T0 = ("replicated", "tensors", 0)
TV = ("replicated", "tensors", 51)  # the I8 view at an offset, on cuda:0
S0 = ("storages", 0)
SV = ("storages", 50)  # two pieces over two chunks
P0 = ("storages", 0, "pieces", 0)

HOSTILE = {
    # tensor entries: types (bool-as-int, floats, strings), ranges, sizes, devices, missing keys
    "dtype unknown": _set(T0 + ("dtype",), "F128"),
    "dtype not a string": _set(T0 + ("dtype",), 5),
    "dtype a list": _set(T0 + ("dtype",), ["F32"]),
    "shape negative": _set(T0 + ("shape",), [-1, 2]),
    "shape float": _set(T0 + ("shape",), [2.0, 2]),
    "shape bool": _set(T0 + ("shape",), [True, 4]),
    "shape too long for stride": _set(T0 + ("shape",), [2, 2, 1]),
    "shape not a list": _set(T0 + ("shape",), "22"),
    "shape over 2**63 with a zero dim": lambda p: p["replicated"]["tensors"][0].update(shape=[BIG, 0], nbytes=0),
    "stride negative": _set(T0 + ("stride",), [2, -1]),
    "stride bool": _set(T0 + ("stride",), [2, True]),
    "stride over 2**63": _set(T0 + ("stride",), [BIG, 1]),
    "nbytes wrong": _set(T0 + ("nbytes",), 12),
    "nbytes float": _set(T0 + ("nbytes",), 16.0),
    "nbytes bool": _set(TV + ("nbytes",), True),
    "nbytes string": _set(T0 + ("nbytes",), "16"),
    "huge shape": lambda p: p["replicated"]["tensors"][0].update(shape=[1 << 62, 4], nbytes=1 << 66),
    "storage_offset negative": _set(T0 + ("storage_offset",), -1),
    "storage_offset bool": _set(T0 + ("storage_offset",), True),
    "storage_offset over 2**63": _set(T0 + ("storage_offset",), BIG),
    "storage out of range": _set(T0 + ("storage",), 51),
    "storage bool": _set(T0 + ("storage",), False),
    "storage negative": _set(T0 + ("storage",), -1),
    "device meta": _set(T0 + ("device",), "meta"),
    "device bogus": _set(TV + ("device",), "warp:9"),
    "device int": _set(T0 + ("device",), 0),
    "device list": _set(T0 + ("device",), ["cpu"]),
    "tensor entry not an object": _set(T0, ["F32"]),
    "tensor entry null": _set(TV, None),
    **{f"tensor lacks {k}": _set(T0 + (k,), DELETE)
       for k in ("dtype", "shape", "stride", "nbytes", "storage_offset", "storage", "device")},
    "rank_state tensor bool storage": _set(("rank_state", "tensors", 0, "storage"), True),
    # storage records
    "scope unknown": _set(S0 + ("scope",), "both"),
    "scope list": _set(S0 + ("scope",), ["replicated"]),
    "id out of range": _set(S0 + ("id",), 51),
    "id bool": _set(("storages", 1, "id"), True),
    "id negative": _set(S0 + ("id",), -1),
    "nbytes short of the pieces": _set(S0 + ("nbytes",), 40),
    "storage nbytes bool": _set(S0 + ("nbytes",), True),
    "pieces not a list": _set(S0 + ("pieces",), {}),
    "piece not an object": _set(P0, [0, 0, 0, 16]),
    "piece chunk out of range": _set(P0 + ("chunk",), 2),
    "piece chunk bool": _set(P0 + ("chunk",), False),
    "piece outside its chunk": _set(("storages", 51, "pieces", 0, "chunk_offset"), 20),
    "piece offset float": _set(P0 + ("chunk_offset",), 0.0),
    "piece nbytes negative": _set(P0 + ("nbytes",), -16),
    "piece storage_offset bool": _set(("storages", 1, "pieces", 0, "storage_offset"), False),
    "pieces with a gap": _set(SV + ("pieces", 1, "storage_offset"), 17),
    "pieces overlapping": _set(SV + ("pieces", 1, "storage_offset"), 15),
    "piece lacks storage_offset": _set(P0 + ("storage_offset",), DELETE),
    "chunk bytes used twice": lambda p: (p["storages"][51].update(nbytes=16),
                                         p["storages"][51]["pieces"][0].update(chunk_offset=8, nbytes=16)),
    "storage record a string": _set(S0, "x"),
    "shard scope without a section": _set(S0 + ("scope",), "shard"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_entries_get_the_detailed_checks_message(name, monkeypatch):
    part = many_tensor_part()
    HOSTILE[name](part)
    want = detailed_outcome(part, monkeypatch)
    assert want is not None, "each case must be refused by the detailed checks"
    assert outcome(part) == want


def test_random_edits_are_judged_as_the_detailed_checks_judge_them(monkeypatch):
    """Random single-field edits (any key, a pool of hostile and harmless values): the same
    verdict and message with and without the fast checks, and the fast checks never accept
    an entry list that the detailed checks refuse."""
    pool = [-1, 0, 1, 2, 3, 4, 6, 8, 16, 24, 32, 1 << 40, BIG - 1, BIG, True, False, None, 1.0, 16.0, "0", "F32",
            "I8", "cpu", "cuda:1", "meta", "replicated", "rank", "shard", [], [2], [2, 2], [1, 2], {}, DELETE]
    rng = random.Random(20240521)
    base = many_tensor_part(6)
    entries = ([("replicated", "tensors", i) for i in range(8)] + [("rank_state", "tensors", 0)]
               + [("storages", i) for i in range(8)]
               + [("storages", i, "pieces", j) for i in range(8) for j in range(len(base["storages"][i]["pieces"]))])
    refused = 0
    for _ in range(600):
        part = copy.deepcopy(base)
        where = rng.choice(entries)
        obj = part
        for k in where:
            obj = obj[k]
        key = rng.choice(sorted(obj) + ["id", "scope", "chunk"])
        _set(where + (key,), rng.choice(pool))(part)
        want = detailed_outcome(part, monkeypatch)
        refused += want is not None
        assert outcome(part) == want, (where, key)
        for sec in ("replicated", "rank_state"):
            s = part[sec]
            if manifest._tensors_ok(s["tensors"], s["num_storages"]):
                for t in s["tensors"]:
                    manifest._validate_tensor(manifest._Check("x"), t, s["num_storages"], "")
    assert refused > 300  # the pool mostly breaks things: the comparison covered refusals
