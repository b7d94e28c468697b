"""Incremental chunks (issue 9 item 3): the fingerprint, references to earlier checkpoints,
retention that keeps referenced data alive, forced fingerprint collisions, hostile references."""
from __future__ import annotations

import json
import logging
import os
import threading

import pytest
import torch

import pyckpt
from pyckpt import cli, inspection, knobs, layout, manifest, reader
from pyckpt._native import get_engine, native
from pyckpt.errors import CorruptCheckpointError

M64 = (1 << 64) - 1
KEY = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93)
STEP, SEED = 0xA0761D6478BD642F, 0x243F6A8885A308D3


def _mix(z: int) -> int:
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & M64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def ref_fingerprint(b: bytes) -> int:
    """pkfp1 as csrc/include/pyckpt/fingerprint.h defines it, in plain Python."""
    acc = [0, 0, 0, 0]
    padded = b + bytes(-len(b) % 32)
    for s in range(len(padded) // 32):
        for j in range(4):
            w = int.from_bytes(padded[32 * s + 8 * j:32 * s + 8 * j + 8], "little")
            x = w ^ ((KEY[j] + s * STEP) & M64)
            acc[j] = (acc[j] + (x & 0xFFFFFFFF) * (x >> 32) + w) & M64
    h = _mix(len(b) ^ SEED)
    for j in range(4):
        h = _mix(h ^ _mix((acc[j] + KEY[j]) & M64))
    return h


def test_fingerprint_matches_its_definition_on_every_path():
    C = native()
    g = torch.Generator().manual_seed(0)
    for n in (0, 1, 7, 31, 32, 33, 64, 65, 100, 257, 1000, 4099):
        data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
        b = data.numpy().tobytes()
        want = ref_fingerprint(b)
        assert C.fingerprint(b) == want, n  # AVX2 where the CPU has it
        assert C.fingerprint_portable(b) == want, n
        assert C.fingerprint_addr(data.data_ptr(), n) == want, n
    big = torch.randint(0, 256, (3 << 20,), dtype=torch.uint8, generator=g).numpy().tobytes()
    assert C.fingerprint(big) == C.fingerprint_portable(big)
    # Every single-bit flip and every swap of two 8-byte words changes it.
    base = bytes(range(64))
    fps = {C.fingerprint(base)}
    for bit in range(64 * 8):
        flipped = bytearray(base)
        flipped[bit // 8] ^= 1 << (bit % 8)
        fps.add(C.fingerprint(bytes(flipped)))
    assert len(fps) == 64 * 8 + 1
    swapped = base[8:16] + base[0:8] + base[16:]
    assert C.fingerprint(swapped) != C.fingerprint(base)
    assert C.fingerprint(bytes(40)) != C.fingerprint(bytes(41))  # zero padding is not ambiguous
    assert C.chunk_fold(C.chunk_fold(C.FP_SEED, 1), 2) != C.chunk_fold(C.chunk_fold(C.FP_SEED, 2), 1)


def _part(step_dir: str) -> dict:
    with open(os.path.join(step_dir, "rank-00000.json"), "rb") as f:
        return json.loads(f.read())


def _data_bytes(step_dir: str) -> int:
    """Bytes of the data files in one checkpoint directory (what this save wrote to disk)."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(step_dir) for f in fs if f.endswith(".bin"))


class Lora(torch.nn.Module):
    """A frozen base (sizes that are no multiple of the chunk size) and small trainable adapters."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.base = torch.nn.ModuleList(torch.nn.Linear(700, 700) for _ in range(4))  # 1.96 MB weights
        self.a = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(8, 700) * 0.01) for _ in range(4))
        self.b = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(700, 8)) for _ in range(4))
        for p in self.base.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        for lin, a, b in zip(self.base, self.a, self.b):
            x = torch.tanh(lin(x) + x @ a.t() @ b.t())
        return x


def _snapshot(state):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else _snapshot(v) if isinstance(v, dict) else v)
            for k, v in state.items()}


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        flat_a, flat_b = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(flat_a, flat_b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_lora_saves_write_only_the_trainable_bytes_and_every_retained_checkpoint_loads(tmp_path):
    model = Lora()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    root = str(tmp_path / "root")
    saved = {}
    with pyckpt.Checkpointer(root, keep=2) as ck:
        for step in range(1, 6):
            model(torch.randn(4, 700)).sum().backward()
            opt.step()
            opt.zero_grad()
            state = {"model": model.state_dict(), "optim": opt.state_dict()}
            trainable_state = trainable * 3 + 4 * 2 * 4  # adapters + exp_avg + exp_avg_sq + step scalars
            path = ck.save(step, state).result(60)
            saved[step] = _snapshot(state)
            written = _data_bytes(path)
            if step == 1:
                assert written > 8_000_000  # the frozen base, written once
            else:
                assert written <= 1.2 * trainable_state, (step, written, trainable_state)
            # Every retained checkpoint loads bitwise and verifies (references followed).
            for e in layout.committed(root):
                assert _equal(pyckpt.load(e.path), saved[e.step]), e.name
                reader.verify(get_engine(), e.path)
        # keep=2 retired step 1 (its data is referenced by steps 4 and 5) but never deleted it.
        names = sorted(os.listdir(root))
        assert [e.name for e in layout.committed(root)] == ["step-000000005", "step-000000004"]
        assert "step-000000001" in names and not os.path.exists(os.path.join(root, "step-000000001", "MANIFEST.json"))
        assert "step-000000002" not in names and "step-000000003" not in names  # unreferenced: deleted
        part = _part(os.path.join(root, "step-000000005"))
        assert {f["path"] for f in part["files"]} == {"rank-00000/data-000.bin",
                                                      "../step-000000001/rank-00000/data-000.bin"}
        text = inspection.render(inspection.summarize(os.path.join(root, "step-000000005")))
        assert "referenced in step-000000001" in text, text[:600]  # pyckpt inspect names what it references
    # `pyckpt gc` (it takes the lock) keeps the referenced retired directory...
    assert cli.main(["gc", root]) == 0
    assert os.path.isdir(os.path.join(root, "step-000000001"))
    assert _equal(pyckpt.load(os.path.join(root, "step-000000005")), saved[5])
    # ...until no committed checkpoint references it: a fully changed state, saved twice.
    for p in model.base.parameters():
        p.data.add_(1.0)
    with pyckpt.Checkpointer(root, keep=2) as ck:
        for step in (6, 7):
            ck.save(step, {"model": model.state_dict()}).result(60)
    assert not os.path.exists(os.path.join(root, "step-000000001"))
    assert sorted(os.listdir(root)) == [".pyckpt.lock", "latest", "metrics.jsonl", "step-000000006",
                                        "step-000000007"]


def test_incremental_can_be_turned_off_by_argument_and_setting(tmp_path):
    state = {"w": torch.randn(300_000), "b": torch.zeros(10)}
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    for i, (arg, env) in enumerate(((False, None), (None, "0"), (None, None))):
        root = str(tmp_path / f"r{i}")
        with knobs.override(PYCKPT_INCREMENTAL=env), pyckpt.Checkpointer(root, incremental=arg) as ck:
            ck.save(1, state).result(60)
            second = ck.save(2, state).result(60)
        part = _part(second)
        if env is None and arg is None:  # the default: incremental
            assert _data_bytes(second) == 0 and all(c["file"].startswith("../") for c in part["chunks"])
        else:
            assert _data_bytes(second) >= nbytes and not any(c["file"].startswith("../") for c in part["chunks"])
        assert _equal(pyckpt.load(second), state)


def test_forced_fingerprint_collision_is_caught_by_the_chunk_crc(tmp_path, caplog):
    """A test build where every fingerprint is equal: a changed chunk looks unchanged, and the
    CRC32C check of its current bytes against the referenced chunk's stops the wrong reference."""
    root = str(tmp_path / "root")
    state = {"frozen": torch.randn(200_000), "moving": torch.randn(300_000)}
    with knobs.override(PYCKPT_TEST_FINGERPRINT="constant"), pyckpt.Checkpointer(root) as ck:
        ck.save(1, state).result(60)
        _precheck_done(ck)  # a moved chunk is expected unchanged only once its reference is checked on disk
        state["moving"].add_(1.0)
        with caplog.at_level(logging.WARNING, logger="pyckpt"):
            second = ck.save(2, state).result(60)
    assert any("fingerprint collision" in r.getMessage() for r in caplog.records)
    part = _part(second)
    refs = [c for c in part["chunks"] if c["file"].startswith("../")]
    assert refs and len(refs) < len(part["chunks"])  # the frozen chunk is referenced, the moved one written
    assert _equal(pyckpt.load(second), state)  # the new values, never the referenced old ones


def test_verify_off_skips_the_crc_check(tmp_path):
    """The honest other side: with PYCKPT_INCREMENTAL_VERIFY=off a (forced) collision is not caught
    at save time, and since the reference carries the old chunk's own CRC, load cannot catch it."""
    root = str(tmp_path / "root")
    state = {"moving": torch.randn(300_000)}
    with knobs.override(PYCKPT_TEST_FINGERPRINT="constant", PYCKPT_INCREMENTAL_VERIFY="off"), \
            pyckpt.Checkpointer(root) as ck:
        first = _snapshot(state)
        ck.save(1, state).result(60)
        _precheck_done(ck)
        state["moving"].add_(1.0)
        second = ck.save(2, state).result(60)
    assert _equal(pyckpt.load(second), first)  # docs/FORMAT.md §13 says why "off" is not the default


def _precheck_done(ck: pyckpt.Checkpointer) -> None:
    """Wait for the background on-disk check the last commit started (a job saving every few
    minutes finds it done)."""
    t = ck._baseline._precheck
    if t is not None:
        t.join(60)
        assert not t.is_alive()


def test_a_save_right_after_a_commit_reads_no_checkpoint_back_for_trained_tensors(tmp_path, monkeypatch):
    """Every tensor trained in place since the last save (a full fine-tune, a GPU job's
    checkpoints): save() reads none of the previous checkpoint back on the caller's thread when
    the background check of its files has not run (on an H200 that read was all of a 71 ms save()
    of a 4 GiB state); the chunks are written afresh and the checkpoint loads exactly. A frozen
    tensor next to them is referenced, its reference checked on the commit thread, not in save()."""
    trained, frozen = torch.randn(600_000), torch.randn(600_000)
    reads: list[str] = []
    real = os.preadv

    def counting_preadv(fd, buffers, offset, *args):
        reads.append(threading.current_thread().name)
        return real(fd, buffers, offset, *args)

    with pyckpt.Checkpointer(str(tmp_path / "root"), keep=5) as ck:
        ck.save(1, {"trained": trained}).result(60)
        ck._baseline.stop_precheck()  # the next save comes before the background check ran
        trained.add_(1.0)
        monkeypatch.setattr(os, "preadv", counting_preadv)
        fut = ck.save(2, {"trained": trained})
        on_caller = [n for n in reads if n == threading.current_thread().name]
        path = fut.result(60)
        monkeypatch.setattr(os, "preadv", real)
        assert on_caller == []
        assert _equal(pyckpt.load(path), {"trained": trained})
        assert not any(c["file"].startswith("../") for c in _part(path)["chunks"])
        ck.save(3, {"trained": trained, "frozen": frozen}).result(60)
        ck._baseline.stop_precheck()
        trained.add_(1.0)
        reads.clear()
        monkeypatch.setattr(os, "preadv", counting_preadv)
        fut = ck.save(4, {"trained": trained, "frozen": frozen})
        on_caller = [n for n in reads if n == threading.current_thread().name]
        path = fut.result(60)
        monkeypatch.setattr(os, "preadv", real)
        assert on_caller == [] and "pyckpt-commit-4" in reads  # the frozen chunk's reference, checked there
        refs = [c for c in _part(path)["chunks"] if c["file"].startswith("../")]
        assert len(refs) == 1 and _equal(pyckpt.load(path), {"trained": trained, "frozen": frozen})


def _two_step_root(tmp_path):
    root = str(tmp_path / "root")
    state = {"w": torch.randn(100_000)}
    with pyckpt.Checkpointer(root) as ck:
        ck.save(1, state).result(60)
        path = ck.save(2, state).result(60)
    return root, path


def _rewrite_part(path: str, edit) -> None:
    """Apply ``edit`` to rank 0's part and re-seal the manifest, as a forger with write access would."""
    part = _part(path)
    edit(part)
    raw = manifest.dumps(part)
    with open(os.path.join(path, "rank-00000.json"), "wb") as f:
        f.write(raw)
    with open(os.path.join(path, "MANIFEST.json"), "rb") as f:
        m = json.loads(f.read())
    m["parts"][0].update(nbytes=len(raw), crc32c=manifest.crc32c(raw))
    with open(os.path.join(path, "MANIFEST.json"), "wb") as f:
        f.write(manifest.seal(m))


def _retarget(new: str, nbytes: int | None = None, offset: int | None = None):
    def edit(part):
        old = part["chunks"][0]["file"]
        for f in part["files"]:
            if f["path"] == old:
                f["path"] = new
                f["nbytes"] = f["nbytes"] if nbytes is None else nbytes
        for c in part["chunks"]:
            if c["file"] == old:
                c["file"] = new
                c["offset"] = c["offset"] if offset is None else offset
    return edit


@pytest.mark.parametrize("target, why, named", [
    ("../../outside/data.bin", "not a relative path inside the checkpoint", "rank-00000.json"),
    ("/etc/passwd", "not a relative path inside the checkpoint", "rank-00000.json"),
    ("../elsewhere/data.bin", "leaves the checkpoint directory", "../elsewhere/data.bin"),
    ("../step-000000099/rank-00000/data-000.bin", "is missing", "root/step-000000099/rank-00000/data-000.bin"),
    ("../step-000000066/rank-00000/data-000.bin", "symbolic link", "root/step-000000066"),
    ("length", "truncated", "root/step-000000001/rank-00000/data-000.bin"),
    ("offset", "lie outside", "../step-000000001/rank-00000/data-000.bin"),
])
def test_hostile_reference_is_refused_naming_the_file(tmp_path, target, why, named):
    root, path = _two_step_root(tmp_path)
    outside = tmp_path / "outside"
    (outside / "rank-00000").mkdir(parents=True)
    (outside / "rank-00000" / "data-000.bin").write_bytes(os.urandom(1 << 20))
    os.symlink(outside, os.path.join(root, "step-000000066"))
    ref = "../step-000000001/rank-00000/data-000.bin"
    if target == "length":  # the part claims more bytes than the referenced file has
        held = os.path.join(root, "step-000000001", "rank-00000", "data-000.bin")
        edit = _retarget(ref, nbytes=os.path.getsize(held) + 4096)
    elif target == "offset":  # a chunk beyond the referenced file's recorded size
        edit = _retarget(ref, offset=1 << 30)
    else:
        edit = _retarget(target)
    _rewrite_part(path, edit)
    with pytest.raises(CorruptCheckpointError) as ei:
        pyckpt.load(path)
    assert why in str(ei.value) and named in str(ei.value), str(ei.value)


def test_only_lower_steps_are_referenced(tmp_path):
    """A run resumed from an older checkpoint saves the higher steps again (replacing them), so a
    save never references its own step or a higher one; it does reference lower ones."""
    state = {"w": torch.randn(300_000)}
    root = str(tmp_path / "root")
    with pyckpt.Checkpointer(root, keep=5) as ck:
        ck.save(5, state).result(60)
        path = ck.save(3, state).result(60)  # lower than the newest commit: nothing to reference
        assert _data_bytes(path) >= 1_200_000 and not any(c["file"].startswith("../") for c in _part(path)["chunks"])
        for step in (5, 6):  # step 5 again (replaced, so not referenced), then a new step
            path = ck.save(step, state).result(60)
            assert {c["file"] for c in _part(path)["chunks"]} == {"../step-000000003/rank-00000/data-000.bin"}
        for e in layout.committed(root):
            assert _equal(pyckpt.load(e.path), state)


def test_verify_follows_references_and_names_the_damaged_file(tmp_path, capsys):
    root, path = _two_step_root(tmp_path)
    assert cli.main(["verify", path]) == 0
    held = os.path.join(root, "step-000000001", "rank-00000", "data-000.bin")
    with open(held, "r+b") as f:  # damage the chunk step 2 references in step 1
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    capsys.readouterr()
    assert cli.main(["verify", path]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "step-000000001/rank-00000/data-000.bin" in err, err


def test_a_chunk_that_just_changed_is_copied_without_a_fingerprint_pass(tmp_path):
    """Trained weights change at every save: after one change the chunk is copied straight away
    (no extra read before the copy); once it stops changing it is referenced one save later."""
    moving = torch.zeros(300_000)
    refs = []
    with pyckpt.Checkpointer(str(tmp_path / "root"), keep=5) as ck:
        for step, change in ((1, 0), (2, 1), (3, 0), (4, 0)):
            if change:  # not touched at all when it stops changing (see the next tests for in-place no-ops)
                moving.add_(change)
            _precheck_done(ck)  # a moved chunk is compared only with a reference checked on disk
            path = ck.save(step, {"m": moving}).result(60)
            refs.append(any(c["file"].startswith("../") for c in _part(path)["chunks"]))
            if step == 2:
                assert len(ck._baseline.changed) == 1  # the next save will not fingerprint it first
            assert _equal(pyckpt.load(path), {"m": moving})
    assert refs == [False, False, False, True]


def test_tensors_updated_in_place_are_written_without_computing_a_fingerprint(tmp_path, knob_env):
    """A tensor whose version counter moved since the last save changed: its chunks are written
    without a fingerprint (one pass over the bytes less), except at a rotating 1 in 8 saves; an
    untouched tensor keeps its fingerprint and is referenced. Every checkpoint loads exactly."""
    moving, frozen = torch.zeros(1 << 18), torch.randn(1 << 18)  # 1 MiB each: one chunk each
    knob_env(PYCKPT_CHUNK_MB=1)  # the engine rebuilt with 1 MiB chunks, and again after the test
    with pyckpt.Checkpointer(str(tmp_path / "root"), keep=20) as ck:
        fps, refs = [], []
        for step in range(1, 11):
            moving.add_(1.0)
            path = ck.save(step, {"moving": moving, "frozen": frozen}).result(60)
            chunks = _part(path)["chunks"]
            fps.append(["fingerprint" in c for c in chunks])
            refs.append([c["file"].startswith("../") for c in chunks])
            assert _equal(pyckpt.load(path), {"moving": moving, "frozen": frozen})
    moving_chunk = next(i for i, r in enumerate(refs[-1]) if not r)
    frozen_chunk = 1 - moving_chunk
    assert all(r[frozen_chunk] for r in refs[1:]) and all(f[frozen_chunk] for f in fps)
    assert not any(r[moving_chunk] for r in refs)
    skipped = [not f[moving_chunk] for f in fps[2:]]  # saves 3..10
    assert sum(skipped) >= 6 and not all(skipped)  # sampled 1 in 8: at most 2 of these 8 fingerprinted


def test_a_tensor_that_changes_at_every_save_is_never_read_back_nor_fingerprinted_before_its_copy(
        tmp_path, monkeypatch, knob_env):
    """Trained weights change at every save. The save that samples their fingerprint (fused with the
    copy) has no earlier one to compare it with; that alone proves nothing, so the background check
    does not read the chunk back from disk, and the next save does not fingerprint it again before
    copying it (both were wasted on every trained chunk a sampled save had touched: 1/8 of the state
    read back, and fingerprinted in an extra pass, at every save). A frozen tensor is still checked
    once and referenced. Every checkpoint loads exactly."""
    from pyckpt import incremental

    moving, frozen = torch.zeros(1 << 18), torch.randn(1 << 18)  # 1 MiB each: one chunk each
    knob_env(PYCKPT_CHUNK_MB=1)  # the engine rebuilt with 1 MiB chunks, and again after the test
    read_back, expected = [], []
    real_sound = incremental._RefFile.sound
    monkeypatch.setattr(incremental._RefFile, "sound",
                        lambda self, rec, stop=None: (self.known_sound(rec) or read_back.append(rec["offset"])
                                                      or real_sound(self, rec, stop)))
    real_expect = incremental.Baseline.expectations

    def expectations(self, *a, **kw):
        expect, refs = real_expect(self, *a, **kw)
        expected.append({refs[i][0]["offset"] for i, *_ in expect})  # offsets in the referenced file
        return expect, refs

    monkeypatch.setattr(incremental.Baseline, "expectations", expectations)
    with pyckpt.Checkpointer(str(tmp_path / "root"), keep=20) as ck:
        saves = []  # (step, chunks read back before it, which of its chunks are references)
        for step in range(1, 20):
            moving.add_(1.0)
            _precheck_done(ck)  # saves minutes apart: the background check had all the time it wanted
            before = len(read_back)
            path = ck.save(step, {"frozen": frozen, "moving": moving}).result(60)
            assert _equal(pyckpt.load(path), {"frozen": frozen, "moving": moving})
            chunks = _part(path)["chunks"]
            saves.append((step, len(read_back) - before, [c["file"].startswith("../") for c in chunks]))
        _precheck_done(ck)
    # Save 1 wrote both chunks; the check after it read both back (no save had told them apart yet).
    # From then on only the frozen chunk is referenced, and nothing more is read: the frozen chunk's
    # reference stays known sound, and no sampled fingerprint of the trained one sends it to disk.
    assert len(read_back) == 2, read_back
    assert all(sum(refs) == 1 for _, _, refs in saves[1:]), saves
    assert all(len(e) <= 1 for e in expected[2:]), expected  # the frozen chunk only, from save 3 on


def test_a_tensor_updated_in_place_without_changing_is_referenced_again(tmp_path, knob_env):
    """A frozen parameter group with lr=0 is updated in place every step (its version moves) with no
    change: a sampled save fingerprints it, and from then on it is referenced, save after save."""
    still = torch.randn(1 << 18)
    refs = []
    knob_env(PYCKPT_CHUNK_MB=1)  # the engine rebuilt with 1 MiB chunks, and again after the test
    with pyckpt.Checkpointer(str(tmp_path / "root"), keep=20) as ck:
        for step in range(1, 13):
            still.add_(0.0)
            _precheck_done(ck)  # saves minutes apart: the reference was checked on disk meanwhile
            path = ck.save(step, {"still": still}).result(60)
            refs.append(any(c["file"].startswith("../") for c in _part(path)["chunks"]))
            assert _equal(pyckpt.load(path), {"still": still})
    first = refs.index(True)
    assert first <= 9 and all(refs[first:]), refs


def test_a_trained_tensor_that_stops_changing_but_is_still_updated_in_place_is_referenced_again(tmp_path, knob_env):
    """A group trained for a while, then frozen by setting its lr to 0 (still updated in place, its
    version moving at every step): once two sampled fingerprints in a row agree, its chunk is read
    back in the background and referenced from then on, save after save."""
    settling = torch.zeros(1 << 18)
    refs = []
    knob_env(PYCKPT_CHUNK_MB=1)  # the engine rebuilt with 1 MiB chunks, and again after the test
    with pyckpt.Checkpointer(str(tmp_path / "root"), keep=30) as ck:
        for step in range(1, 25):
            settling.add_(1.0 if step <= 4 else 0.0)
            _precheck_done(ck)  # saves minutes apart: the reference was checked on disk meanwhile
            path = ck.save(step, {"settling": settling}).result(60)
            refs.append(any(c["file"].startswith("../") for c in _part(path)["chunks"]))
            assert _equal(pyckpt.load(path), {"settling": settling})
    assert not any(refs[:5]), refs  # changed at each of saves 1-4 (save 5 is the first unchanged one)
    first = refs.index(True)
    # Fingerprinted at two saves in a row of every 8, then referenced from the next save on.
    assert first <= 4 + 8 + 2 and all(refs[first:]), refs


def test_inference_mode_tensors_without_a_version_counter_are_fingerprinted(tmp_path, caplog, knob_env):
    """A tensor made under torch.inference_mode has no version counter (reading it raises): such a
    state is saved incrementally like any other, with no warning, and loads exactly."""
    with torch.inference_mode():
        frozen = torch.randn(1 << 18)
    moving = torch.zeros(1 << 18)
    knob_env(PYCKPT_CHUNK_MB=1)  # the engine rebuilt with 1 MiB chunks, and again after the test
    with pyckpt.Checkpointer(str(tmp_path / "root"), keep=5) as ck, \
            caplog.at_level(logging.WARNING, logger="pyckpt"):
        for step in (1, 2, 3):
            moving.add_(1.0)
            path = ck.save(step, {"frozen": frozen, "moving": moving}).result(60)
            assert _equal(pyckpt.load(path), {"frozen": frozen.clone(), "moving": moving})
    assert not [r for r in caplog.records if r.name == "pyckpt"]
    assert any(c["file"].startswith("../") for c in _part(path)["chunks"])  # the frozen chunk referenced


def test_retention_parses_no_part_this_process_committed(tmp_path, monkeypatch):
    """Each commit asks what every kept checkpoint references; parsing their parts back cost the
    commit thread tens of milliseconds of the GIL per save for a state of many tensors. The answer
    for a part this process wrote is remembered at commit, and equals a fresh parse."""
    from pyckpt import incremental, manifest

    parsed = []
    real = manifest.read_part
    monkeypatch.setattr(manifest, "read_part", lambda path, *a: parsed.append(path) or real(path, *a))
    model = Lora()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    root = str(tmp_path / "root")
    with pyckpt.Checkpointer(root, keep=2) as ck:
        for step in range(1, 6):
            model(torch.randn(4, 700)).sum().backward()
            opt.step()
            ck.save(step, {"model": model.state_dict(), "optim": opt.state_dict()}).result(60)
    assert parsed == []
    remembered = incremental.referenced_dirs(root)
    monkeypatch.setattr(incremental, "_PART_REFS", {})
    assert incremental.referenced_dirs(root) == remembered == {"step-000000001"}
    assert len(parsed) == 2  # the two kept checkpoints, parsed now that nothing is remembered


def test_moved_versions_are_matched_by_address_when_the_layout_changes(tmp_path, knob_env):
    """The state's layout changes at every save (a small tensor comes and goes), so no plan is
    reused: a tensor updated in place is still recognized by its memory (device, address, bytes)
    and written without a fingerprint, and an untouched one is still referenced."""
    moving, frozen = torch.zeros(1 << 18), torch.randn(1 << 18)
    knob_env(PYCKPT_CHUNK_MB=1)  # the engine rebuilt with 1 MiB chunks, and again after the test
    with pyckpt.Checkpointer(str(tmp_path / "root"), keep=20) as ck:
        fps, refs = [], []
        for step in range(1, 11):
            moving.add_(1.0)
            state = {"moving": moving, "frozen": frozen}
            if step % 2:
                state["extra"] = torch.full((3,), float(step))
            path = ck.save(step, state).result(60)
            part = _part(path)
            entry = part["replicated"]["tensors"][part["replicated"]["tree"]["moving"]["id"]]
            sid = entry["storage"]
            rec = next(s for s in part["storages"] if s["scope"] == "replicated" and s["id"] == sid)
            chunk = part["chunks"][rec["pieces"][0]["chunk"]]
            fps.append("fingerprint" in chunk)
            refs.append(sum(c["file"].startswith("../") for c in part["chunks"]))
            assert _equal(pyckpt.load(path), state)
    skipped = [not f for f in fps[2:]]
    assert sum(skipped) >= 6, fps
    assert all(r >= 1 for r in refs[1:]), refs  # the frozen chunk


def test_moved_chunks_are_exactly_those_whose_every_storage_moved(tmp_path, knob_env, monkeypatch):
    """``Checkpointer._moved_chunks`` over a reused plan: every storage moved (full training), none
    (a frozen model), some (a fine-tune), and a chunk shared by a moved and an unmoved tensor."""
    from pyckpt.checkpointer import Checkpointer

    knob_env(PYCKPT_CHUNK_MB=1)  # the engine rebuilt with 1 MiB chunks, and again after the test
    big = {k: torch.randn(1 << 18) for k in ("a", "b")}  # 1 MiB each: a chunk of its own each
    small = {k: torch.randn(16) for k in ("c", "d")}  # both packed into one chunk
    seen: list[set[int]] = []
    real = Checkpointer._moved_chunks
    monkeypatch.setattr(Checkpointer, "_moved_chunks", lambda self, plan: seen.append(real(self, plan)) or seen[-1])
    with pyckpt.Checkpointer(str(tmp_path / "root"), keep=20) as ck:
        chunk_of = {}
        for step, touched in enumerate(((), ("a", "b", "c", "d"), (), ("a",), ("b", "c")), 1):
            for k in touched:
                {**big, **small}[k].add_(1.0)
            path = ck.save(step, {**big, **small}).result(60)
            part = _part(path)
            for k in "abcd":
                sid = part["replicated"]["tensors"][part["replicated"]["tree"][k]["id"]]["storage"]
                rec = next(s for s in part["storages"] if s["scope"] == "replicated" and s["id"] == sid)
                chunk_of[k] = rec["pieces"][0]["chunk"]
            assert _equal(pyckpt.load(path), {**big, **small})
    assert chunk_of["c"] == chunk_of["d"] and len({chunk_of["a"], chunk_of["b"], chunk_of["c"]}) == 3
    a, b, cd = chunk_of["a"], chunk_of["b"], chunk_of["c"]
    # the first save has nothing to compare with; then all, none, one, and a half-moved shared chunk
    assert seen == [set(), {a, b, cd}, set(), {a}, {b}]
