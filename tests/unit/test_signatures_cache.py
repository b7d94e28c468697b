"""incremental.Baseline computes chunk signatures once per layout: the training thread's
``expectations`` and the commit thread's ``update`` of every save of a reused plan see the same
storage records; any other records (another layout, even of the same length) are computed afresh."""
from __future__ import annotations

import os

import torch

import pyckpt
from pyckpt import incremental
from pyckpt.manifest import crc32c


def _count(monkeypatch) -> list:
    calls: list = []
    real = incremental.signatures

    def counted(records, nchunks):
        calls.append(len(records))
        return real(records, nchunks)

    monkeypatch.setattr(incremental, "signatures", counted)
    return calls


def test_saves_of_a_reused_plan_compute_signatures_once(ckpt_root, monkeypatch, knob_env):
    calls = _count(monkeypatch)
    model = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(8)])
    frozen = torch.randn(1 << 18)
    knob_env(PYCKPT_CHUNK_MB=1)  # the engine rebuilt with 1 MiB chunks, and again after the test
    with pyckpt.Checkpointer(ckpt_root, keep=10, incremental=True) as ck:
        for step in range(1, 5):
            with torch.no_grad():
                model[step].weight.mul_(2.0)
            ck.save(step, {"model": model.state_dict(), "frozen": frozen}).result(60)
        assert len(calls) == 1  # the first save's expectations; its update and every later save reuse them
        baseline = ck._baseline
        (sections,) = ck._last_plan.values()
        records = list(sections["replicated"].json)
        nchunks = len(sections["replicated"].chunks)
        want = incremental.signatures(records, nchunks)
        assert baseline.signatures(records, nchunks) == want and len(calls) == 2  # a hit, and right
        assert sorted(k[1:] for k in baseline.chunks) == sorted(s for s in want if s)

        # Another layout misses, then is reused in turn.
        bigger = {"model": model.state_dict(), "frozen": frozen, "extra": torch.ones(10)}
        for step in (5, 6):
            ck.save(step, bigger).result(60)
        assert len(calls) == 3
        got = ck.restore(6).state
        assert torch.equal(got["frozen"], frozen) and torch.equal(got["extra"], torch.ones(10))


def _record(sid: int, chunk: int, nbytes: int, offset: int = 0) -> dict:
    return {"scope": "replicated", "id": sid, "nbytes": nbytes, "elem_size": 4,
            "pieces": [{"chunk": chunk, "chunk_offset": offset, "storage_offset": 0, "nbytes": nbytes}]}


def test_same_length_but_other_records_miss(tmp_path, monkeypatch):
    """A cache keyed only by the number of records and chunks would hand layout B the signatures of
    layout A, and the engine would skip B's chunks as unchanged: they must be told apart."""
    calls = _count(monkeypatch)
    root = tmp_path / "root"
    os.makedirs(root / "step-000000001" / "rank-00000")
    (root / "step-000000001" / "rank-00000" / "data-000.bin").write_bytes(b"\0" * 96)
    a = [_record(0, 0, 48), _record(1, 1, 48)]
    zeros = crc32c(bytes(48))  # a save checks the bytes on disk of each chunk it references
    chunks = [{"file": "rank-00000/data-000.bin", "offset": 48 * i, "stored_len": 48, "raw_len": 48, "elem_size": 4,
               "codec": "none", "crc32c": zeros, "raw_crc32c": zeros, "fingerprint": f"{i + 7:016x}"}
              for i in range(2)]
    b = incremental.Baseline()
    b.update({"files": [{"path": "rank-00000/data-000.bin", "nbytes": 96}], "chunks": chunks, "storages": a},
             "step-000000001")
    args = ([48, 48], [False, False], "step-000000002", str(root), "off")
    expect, refs = b.expectations(list(a), *args)  # the same records, in a new list: a hit
    assert [e[0] for e in expect] == [0, 1] and sorted(refs) == [0, 1] and len(calls) == 1

    assert [(e[0], e[1]) for e in expect] == [(0, 7), (1, 8)]
    swapped = [_record(0, 1, 48), _record(1, 0, 48)]  # same length, each storage in the other chunk
    expect, refs = b.expectations(swapped, *args)
    assert [(e[0], e[1]) for e in expect] == [(0, 8), (1, 7)] and len(calls) == 2  # the bytes moved with them
    assert refs[0][0]["offset"] == 48 and refs[1][0]["offset"] == 0
    moved = [_record(0, 0, 48), _record(1, 1, 40, offset=8)]  # one piece elsewhere in its chunk
    assert [e[0] for e in b.expectations(moved, *args)[0]] == [0] and len(calls) == 3
    assert b.signatures(moved, 1) == incremental.signatures(moved, 1)  # another chunk count: computed
    assert len(calls) == 5
    assert b.signatures(list(moved), 1) is b.signatures(moved, 1) and len(calls) == 5  # now a hit


def test_the_sample_phase_of_a_chunk_follows_its_signature():
    """The rotation of sampled CRC checks is phased by a chunk's signature (``_sig_crc``): remembered
    while ``signatures`` returns the same list, made anew for another list at the same index."""
    import zlib

    base = incremental.Baseline()
    one = [(("a", 1),), (("b", 2),)]
    other = [(("c", 3),), (("d", 4),)]
    assert base._sig_crc(one, 1) == zlib.crc32(repr(one[1]).encode())
    assert base._sig_crc(other, 1) == zlib.crc32(repr(other[1]).encode()) != base._sig_crc(one, 1)
