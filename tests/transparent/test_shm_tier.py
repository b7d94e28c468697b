"""The host-memory tier (pyckpt/shm_tier.py): a copy in /dev/shm survives SIGKILL and is resumed from.

Real processes, real SIGKILL, the real /dev/shm. Storage data is damaged on purpose where a test
must show that it was not read: had the relaunch read it, the checksums would have failed.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import torch

from pyckpt import knobs, layout, shm_tier
from pyckpt.checkpointer import Checkpointer, verify_share
from pyckpt.coord import LocalCoordinator

from transparent_helpers import TINY, clean_env, load, run_script, tree_equal

pytestmark = pytest.mark.skipif(not os.path.isdir(shm_tier.SHM_ROOT), reason="no /dev/shm on this machine")


@pytest.fixture
def shm(tmp_path):
    """The memory-tier path of ``tmp_path/ck``, removed afterwards whatever happened."""
    path = Path(shm_tier.shm_path(str(tmp_path / "ck")))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _env(tmp_path, **extra):
    return dict(dict(PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="4", PYCKPT_SHM_MB="64",
                     PYCKPT_STORAGE_EVERY="2", KILL_AT="15", KILL_MARK=tmp_path / "mark"), **extra)


def _steps(root: Path) -> list[int]:
    # Committed only: a killed commit can leave step-N.tmp-<token> holding its MANIFEST.json.
    steps = (layout.parse_step(p.name) for p in root.iterdir() if layout.is_checkpoint_dir(str(p)))
    return sorted(s for s in steps if s is not None)


def _damage(ckpt: Path) -> None:
    """Flip the first bytes of every data file (chunk bytes, covered by checksums)."""
    for f in ckpt.rglob("data-*.bin"):
        with open(f, "r+b") as fh:
            head = fh.read(16)
            fh.seek(0)
            fh.write(bytes(b ^ 0xFF for b in head))


def test_sigkill_then_relaunch_restores_from_memory_without_reading_storage(tmp_path, shm, plain_results):
    out = tmp_path / "out.pt"
    env = _env(tmp_path, KILL_AT="19")
    first = run_script([TINY, out], tmp_path, **env)
    assert first.returncode == -signal.SIGKILL
    # Snapshots at 4, 8, 12, 16: every one to memory (keep=1: an older one may await retention), every
    # 2nd to storage. Saving 16 waited for storage's 8 and memory's 12 to commit.
    mem, stored = max(_steps(shm)), _steps(tmp_path / "ck")
    assert mem >= 12 and 8 in stored and not {4, 12} & set(stored)
    for s in stored:
        if s > mem:  # storage's 16 committed before memory's: not the case under test
            shutil.rmtree(tmp_path / "ck" / layout.step_dir_name(s))
    stored = _steps(tmp_path / "ck")
    for s in stored:
        _damage(tmp_path / "ck" / layout.step_dir_name(s))
    second = run_script([TINY, out], tmp_path, **env)
    assert second.returncode == 0, second.stderr
    assert "resuming from the memory tier" in second.stderr
    assert f"pyckpt: resumed from step {mem} " in second.stderr
    assert "damaged" not in second.stderr  # the damaged storage data was never read
    assert tree_equal(load(out), plain_results("adamw"))
    assert not shm.exists()  # a normal exit removes the memory copy


def test_memory_copy_is_used_only_when_at_least_as_new_as_storage(tmp_path, shm, capfd):
    with knobs.override(PYCKPT_SHM_MB=16):
        ck, coord = Checkpointer(tmp_path / "ck"), LocalCoordinator()
        tier = shm_tier.tier_for(ck, coord)
        try:
            assert tier is not None and tier.path == str(shm)
            tier.save(10, {"w": torch.ones(4)}, {"n": 10}).result()
            ck.save(20, {"w": torch.zeros(4)}, {"n": 20}).result()
            assert shm_tier.choose(ck, coord) is None  # stale: storage is newer
            assert "memory-tier copy of step 10 is older than" in capfd.readouterr().err
            tier.save(30, {"w": torch.full((4,), 3.0)}, {"n": 30}).result()
            src = shm_tier.choose(ck, coord)
            assert src is not None and src.step == 30 and src.path.startswith(str(shm)) and src.rank_state == {"n": 30}
            assert "resuming from the memory tier" in capfd.readouterr().err
        finally:
            shm_tier._TIERS.pop(ck.directory, None)
            tier.remove()
            ck.close()


def test_storage_is_validated_only_when_it_holds_a_newer_step(tmp_path, shm, monkeypatch):
    """Choosing the memory copy reads no storage part while every storage commit is at most as new
    as the copy (validating a part of thousands of tensors cost as much as the tier's restore); a
    newer storage commit is still validated, and a damaged newer one does not hide the copy."""
    from pyckpt import reader

    opened = []
    real = reader.open_checkpoint
    monkeypatch.setattr(reader, "open_checkpoint", lambda path, *a, **k: opened.append(str(path)) or real(path, *a, **k))
    storage = str(tmp_path / "ck")
    with knobs.override(PYCKPT_SHM_MB=16):
        ck, coord = Checkpointer(storage), LocalCoordinator()
        tier = shm_tier.tier_for(ck, coord)
        try:
            ck.save(10, {"w": torch.zeros(4)}, {"n": 10}).result()
            tier.save(20, {"w": torch.ones(4)}, {"n": 20}).result()
            opened.clear()
            src = shm_tier.choose(ck, coord)
            assert src is not None and src.step == 20
            assert not [p for p in opened if p.startswith(storage)], opened
            ck.save(30, {"w": torch.zeros(4)}, {"n": 30}).result()
            (tmp_path / "ck" / layout.step_dir_name(30) / layout.part_name(0)).write_bytes(b"{}")  # damaged
            opened.clear()
            src = shm_tier.choose(ck, coord)
            assert any(p.startswith(storage) for p in opened)  # the newer commit was looked at
            assert src is not None and src.step == 20  # and, damaged, does not count
        finally:
            shm_tier._TIERS.pop(ck.directory, None)
            tier.remove()
            ck.close()


def test_damaged_memory_copy_falls_back_to_storage_with_one_line(tmp_path, shm, plain_results):
    out = tmp_path / "out.pt"
    env = _env(tmp_path, PYCKPT_STORAGE_EVERY="1")
    first = run_script([TINY, out], tmp_path, **env)
    assert first.returncode == -signal.SIGKILL
    mem = max(_steps(shm))
    for s in _steps(tmp_path / "ck"):
        if s > mem:  # keep storage no newer than memory, so only the damage decides
            shutil.rmtree(tmp_path / "ck" / layout.step_dir_name(s))
    expect = max(_steps(tmp_path / "ck"))
    _damage(shm)
    second = run_script([TINY, out], tmp_path, **env)
    assert second.returncode == 0, second.stderr
    lines = [x for x in second.stderr.splitlines() if "memory-tier" in x]
    assert len(lines) == 1 and "not used" in lines[0] and "resuming from" in lines[0], second.stderr
    assert "resuming from the memory tier" not in second.stderr
    assert f"pyckpt: resumed from step {expect} " in second.stderr
    assert tree_equal(load(out), plain_results("adamw"))


def _chunks(ckpt: Path) -> list[dict]:
    from pyckpt import manifest

    m = manifest.read_manifest(str(ckpt))
    return manifest.read_part(str(ckpt), m["parts"][0])["chunks"]


def _prechecked(tier) -> None:
    """Wait for the tier's background read-back of the chunks its next snapshot may reference. A chunk
    whose tensor was written in place (its version moved) gets a fingerprint, and so can be referenced,
    only once that read found its predecessor sound (incremental.Baseline.expectations); the read runs
    at the lowest priority, so on a loaded machine it may not have run before the next snapshot."""
    t = tier.ckpt._baseline._precheck
    if t is not None:
        t.join(60)


def test_storage_checkpoint_is_copied_from_the_memory_copy_not_captured_again(tmp_path, shm, monkeypatch):
    # One capture per snapshot: the engine is asked once (by the memory tier); storage's checkpoint is a
    # copy of the memory copy's files, references unchanged chunks of storage's previous checkpoint, and
    # loads bitwise equal to the state at the snapshot.
    from pyckpt import writer

    captures = []
    real_start = writer.start
    monkeypatch.setattr(writer, "start", lambda *a, **k: captures.append(a[2]) or real_start(*a, **k))
    big = torch.arange(3 << 20, dtype=torch.float32)  # 12 MiB: 3 chunks of 4 MiB
    with knobs.override(PYCKPT_SHM_MB=64):
        ck, coord = Checkpointer(tmp_path / "ck"), LocalCoordinator()
        tier = shm_tier.tier_for(ck, coord)
        try:
            state = {"big": big, "w": torch.ones(5)}
            first = tier.publish(tier.save(10, state, {"n": 10}), ck, 10)
            assert first.result(60).endswith(layout.step_dir_name(10))
            _prechecked(tier)
            big[-1] = -1.0  # only the last chunk changes
            second = tier.publish(tier.save(20, state, {"n": 20}), ck, 20)
            assert second.result(60).endswith(layout.step_dir_name(20))
            assert all(str(shm) in c for c in captures) and len(captures) == 2  # only the tier captured
            r = ck.restore(20)
            assert torch.equal(r.state["big"], big) and torch.equal(r.state["w"], torch.ones(5))
            assert r.rank_state == {"n": 20}
            assert torch.equal(ck.restore(10).state["big"][:-1], big[:-1])
            assert ck.restore(10).state["big"][-1] == (3 << 20) - 1  # step 10 kept its own value
            files = [c["file"] for c in _chunks(tmp_path / "ck" / layout.step_dir_name(20))]
            assert files.count("../step-000000010/rank-00000/data-000.bin") >= 2  # unchanged: referenced
            assert files.count("rank-00000/data-000.bin") >= 1  # changed: copied
        finally:
            shm_tier._TIERS.pop(ck.directory, None)
            tier.remove()
            ck.close()


@pytest.mark.parametrize("second", ["unchanged", "no tensor"])
def test_a_copy_to_storage_that_copies_no_chunk_is_committed(tmp_path, shm, second):
    """Storage's copy of a snapshot whose chunks all equal its previous checkpoint's (every one
    referenced), or that holds no tensor, created no data file, and so no directory to commit its
    part in: "checkpoint of step 20 not written to storage: No such file or directory", and storage
    never got it."""
    with knobs.override(PYCKPT_SHM_MB=64):
        ck, coord = Checkpointer(tmp_path / "ck"), LocalCoordinator()
        tier = shm_tier.tier_for(ck, coord)
        try:
            state = {"w": torch.arange(1 << 20, dtype=torch.float32), "n": 1}
            assert tier.publish(tier.save(10, state, {"n": 10}), ck, 10).result(60).endswith("step-000000010")
            _prechecked(tier)
            later = state if second == "unchanged" else {"n": 2, "s": "no tensor"}
            assert tier.publish(tier.save(20, later, {"n": 20}), ck, 20).result(60).endswith("step-000000020")
            r = ck.restore(20)
            assert r.rank_state == {"n": 20} and r.state.keys() == later.keys()
            if second == "unchanged":
                assert torch.equal(r.state["w"], state["w"])
                files = {c["file"] for c in _chunks(tmp_path / "ck" / layout.step_dir_name(20))}
                assert files == {"../step-000000010/rank-00000/data-000.bin"}  # every chunk referenced
            else:
                assert r.state == later
        finally:
            shm_tier._TIERS.pop(ck.directory, None)
            tier.remove()
            ck.close()


def test_storage_copies_from_memory_report_their_figures_without_parsing_parts(tmp_path, shm, monkeypatch):
    """A storage checkpoint published from the memory copy gets its metrics line's byte figures from
    the commit, like any save (nothing parsed back), and they equal what the files on disk hold."""
    from pyckpt import metrics

    real, calls = metrics.data_figures, []
    monkeypatch.setattr(metrics, "data_figures", lambda path: calls.append(path) or real(path))
    big = torch.arange(3 << 20, dtype=torch.float32)
    with knobs.override(PYCKPT_SHM_MB=64):
        ck, coord = Checkpointer(tmp_path / "ck"), LocalCoordinator()
        tier = shm_tier.tier_for(ck, coord)
        try:
            for step in (10, 20):
                big[-1] = step  # the last chunk changes: copied; the others referenced
                tier.publish(tier.save(step, {"big": big}, {"n": step}), ck, step).result(60)
                _prechecked(tier)
        finally:
            shm_tier._TIERS.pop(ck.directory, None)
            tier.remove()
            ck.close()
    assert calls == []
    records, _ = metrics.read(str(tmp_path / "ck"))
    saves = [r for r in records if r["event"] == "save" and str(tmp_path / "ck") in (r["path"] or "")]
    assert [r["step"] for r in saves] == [10, 20]
    for r in saves:
        fields = ("bytes_raw", "bytes_stored", "bytes_written", "bytes_skipped", "codec_ratio", "world_size")
        assert {k: r[k] for k in fields} == real(r["path"])
    assert saves[1]["bytes_skipped"] > 0  # the referenced chunks


def test_storage_copy_takes_the_committed_part_without_parsing_it_back(tmp_path, shm, monkeypatch):
    """Storage's copy of a snapshot takes the memory copy's part as this process committed it: the
    part file in /dev/shm is not parsed again, and the storage part written is the canonical JSON of
    what was committed there (same records, new chunk and file records), loading the same tensors."""
    from pyckpt import manifest

    real, parsed = manifest.read_part, []
    monkeypatch.setattr(manifest, "read_part", lambda path, *a: parsed.append(str(path)) or real(path, *a))
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(6)])
    with knobs.override(PYCKPT_SHM_MB=64):
        ck, coord = Checkpointer(tmp_path / "ck"), LocalCoordinator()
        tier = shm_tier.tier_for(ck, coord)
        try:
            for step in (10, 20, 30):
                with torch.no_grad():
                    model[step // 10].weight.add_(1.0)
                want = {k: v.clone() for k, v in model.state_dict().items()}
                path = tier.publish(tier.save(step, {"model": model.state_dict()}, {"n": step}), ck, step).result(60)
                assert not [p for p in parsed if p.startswith(str(shm))], parsed
                got = ck.restore(step)
                assert all(torch.equal(got.state["model"][k], v) for k, v in want.items()) and got.rank_state == {"n": step}
                raw = (Path(path) / layout.part_name(0)).read_bytes()
                assert raw == manifest.dumps(real(path, manifest.read_manifest(path)["parts"][0]))
            assert tier.ckpt.hand_over_parts and not ck.hand_over_parts
        finally:
            shm_tier._TIERS.pop(ck.directory, None)
            tier.remove()
            ck.close()


def test_copy_from_memory_catches_forced_fingerprint_collisions_by_crc(tmp_path, shm, caplog):
    # Every fingerprint is 0 (test build): a changed chunk looks unchanged to the fingerprint; the CRC32C
    # comparison of the two chunk records must catch it, so storage gets the new bytes, never the old.
    big = torch.zeros(2 << 20)  # 8 MiB: 2 chunks
    with knobs.override(PYCKPT_SHM_MB=64, PYCKPT_TEST_FINGERPRINT="constant"):
        ck, coord = Checkpointer(tmp_path / "ck"), LocalCoordinator()
        tier = shm_tier.tier_for(ck, coord)
        try:
            tier.publish(tier.save(10, {"big": big}, None), ck, 10).result(60)
            _prechecked(tier)
            big[0] = 1.0  # first chunk changes, second does not
            tier.publish(tier.save(20, {"big": big}, None), ck, 20).result(60)
            assert torch.equal(ck.restore(20).state["big"], big)
            files = [c["file"] for c in _chunks(tmp_path / "ck" / layout.step_dir_name(20))]
            assert files == ["rank-00000/data-000.bin", "../step-000000010/rank-00000/data-000.bin"]
            lines = [r.getMessage() for r in caplog.records if r.module == "tier_publish"]
            assert len(lines) == 1 and "step-000000020: 1 chunk(s)" in lines[0] and "collision" in lines[0]
        finally:
            shm_tier._TIERS.pop(ck.directory, None)
            tier.remove()
            ck.close()


def _tier_file(tier, step: int) -> Path:
    return Path(tier.path) / layout.step_dir_name(step) / layout.data_file_name(0)


def test_each_snapshot_is_written_over_the_pages_of_the_one_evicted_before(tmp_path, shm):
    # keep=1: snapshot N+2 writes into the data file snapshot N had (parked when N+1 committed), so a
    # snapshot neither allocates nor frees a snapshot's worth of tmpfs pages. Every snapshot still
    # restores bitwise and passes verification where it lies.
    big = torch.zeros(3 << 20)  # 12 MiB
    with knobs.override(PYCKPT_SHM_MB=64):
        ck, coord = Checkpointer(tmp_path / "ck"), LocalCoordinator()
        tier = shm_tier.tier_for(ck, coord)
        try:
            inodes = []
            for step in range(1, 6):
                big.fill_(float(step))
                assert tier.save(step, {"big": big, "n": torch.tensor(step)}, None).result(60)
                inodes.append(os.stat(_tier_file(tier, step)).st_ino)
                verify_share(str(Path(tier.path) / layout.step_dir_name(step)), 0, 1)
                r = tier.ckpt.restore(step)
                assert torch.equal(r.state["big"], big) and int(r.state["n"]) == step
            assert inodes[2] == inodes[0] and inodes[3] == inodes[1] and inodes[4] == inodes[2]
            assert inodes[0] != inodes[1]
            assert [p.name for p in (Path(tier.path) / shm_tier.SPARES).iterdir()] == ["rank-00000.bin"]
        finally:
            shm_tier._TIERS.pop(ck.directory, None)
            tier.remove()
            ck.close()
    assert not shm.exists()  # the parked file goes with the memory copy


def test_a_snapshot_that_storage_is_still_copying_is_not_written_over(tmp_path, shm, monkeypatch):
    # Storage's copy of step 1 reads the memory copy's file through its own descriptor. Snapshots 2 and 3
    # are taken meanwhile; step 1, evicted when 2 commits, must be deleted (the descriptor keeps its bytes),
    # never parked and written over by step 3, or storage's step 1 would hold step 3's bytes.
    import threading

    from pyckpt import tier_publish

    release = threading.Event()
    real = tier_publish._copy_part

    def held(*a, **k):
        assert release.wait(60)
        return real(*a, **k)

    monkeypatch.setattr(tier_publish, "_copy_part", held)
    big = torch.zeros(3 << 20)
    with knobs.override(PYCKPT_SHM_MB=64):
        ck, coord = Checkpointer(tmp_path / "ck"), LocalCoordinator()
        tier = shm_tier.tier_for(ck, coord)
        try:
            big.fill_(1.0)
            stored = tier.publish(tier.save(1, {"big": big}, None), ck, 1)
            tier.publication.source.result(60)  # the memory copy of step 1 is committed
            first = os.stat(_tier_file(tier, 1)).st_ino
            for step in (2, 3):
                big.fill_(float(step))
                assert tier.save(step, {"big": big}, None).result(60)
            release.set()
            assert stored.result(60).endswith(layout.step_dir_name(1))
            assert torch.equal(ck.restore(1).state["big"], torch.full((3 << 20,), 1.0))
            assert torch.equal(tier.ckpt.restore(3).state["big"], big)
            assert first != os.stat(_tier_file(tier, 3)).st_ino  # step 3 did not get step 1's file
        finally:
            release.set()
            shm_tier._TIERS.pop(ck.directory, None)
            tier.remove()
            ck.close()


# ----------------------------------------------------------------------------- trust and space

def _fresh(ck):
    """Forget this process's open tier of ``ck`` (as a relaunch starts without one)."""
    t = shm_tier._TIERS.pop(ck.directory, None)
    if t is not None:
        t.ckpt.close()


def _plant(tmp_path, shm, victim: Path) -> None:
    """A sound copy of another job (step 30, w=7) under ``victim``'s memory-tier path, with an origin
    marker naming ``victim`` (its path, device and inode are visible to anyone)."""
    other = tmp_path / "other"
    with knobs.override(PYCKPT_SHM_MB=16):
        ck = Checkpointer(other)
        tier = shm_tier.tier_for(ck, LocalCoordinator())
        tier.save(30, {"w": torch.full((4,), 7.0)}, {"n": 30}).result()
        _fresh(ck)
        ck.close()
    shutil.move(shm_tier.shm_path(str(other)), str(shm))
    st = os.stat(victim)
    name = getattr(shm_tier, "TOKEN", None)  # (absent before the marker held a token)
    token = (victim / name).read_text() if name and (victim / name).exists() else None
    origin = {"directory": os.path.realpath(victim), "dev": st.st_dev, "ino": st.st_ino}
    if token is not None:
        origin["token"] = token
    (shm / shm_tier.ORIGIN).write_text(json.dumps(origin))


@pytest.mark.parametrize("how", ["group_writable", "other_owner"])
def test_a_copy_that_is_not_this_users_private_directory_is_never_trusted(tmp_path, shm, capfd, how):
    if how == "other_owner" and os.geteuid() != 0:
        pytest.skip("planting a directory owned by another uid needs root")
    with knobs.override(PYCKPT_SHM_MB=16):
        ck, coord = Checkpointer(tmp_path / "ck"), LocalCoordinator()
        ck.save(10, {"w": torch.zeros(4)}, {"n": 10}).result()
        shm_tier.tier_for(ck, coord)
        _fresh(ck)
        shutil.rmtree(shm)
        _plant(tmp_path, shm, tmp_path / "ck")
        if how == "other_owner":
            for root, dirs, files in os.walk(shm):
                for n in [root] + [os.path.join(root, f) for f in dirs + files]:
                    os.chown(n, 65534, 65534)
        else:
            os.chmod(shm, 0o770)
        capfd.readouterr()
        try:
            assert shm_tier.choose(ck, coord) is None  # storage's step 10, not the planted step 30
            err = capfd.readouterr().err
            assert "not this user's private directory" in err, err
            st = os.lstat(shm)
            assert st.st_uid == os.geteuid() and not st.st_mode & 0o077  # replaced by our own
            assert not [p for p in os.listdir(shm) if p.startswith("step-")]
        finally:
            _fresh(ck)
            ck.close()


def test_a_copy_for_a_wiped_and_recreated_directory_is_removed_even_on_the_same_inode(tmp_path, shm, capfd):
    """Wiping PYCKPT_DIR to start over may give the new directory the old inode (ext4 reuses them):
    the marker also holds a token kept in PYCKPT_DIR, which the wipe took away."""
    storage = tmp_path / "ck"
    with knobs.override(PYCKPT_SHM_MB=16):
        ck, coord = Checkpointer(storage), LocalCoordinator()
        tier = shm_tier.tier_for(ck, coord)
        tier.save(10, {"w": torch.ones(4)}, {"n": 10}).result()
        _fresh(ck)
        ck.close()
        for p in storage.iterdir():  # wiped; the directory itself (same inode) stays
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        capfd.readouterr()
        ck = Checkpointer(storage)
        try:
            assert shm_tier.choose(ck, coord) is None
            assert "written for another run" in capfd.readouterr().err
        finally:
            _fresh(ck)
            shutil.rmtree(shm, ignore_errors=True)
            ck.close()


NO_ROOM = """
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0)
model = nn.Linear(256, 256)  # 0.26 MB of weights, 0.79 MB with Adam's moments
opt = torch.optim.Adam(model.parameters())
for i, (x, y) in enumerate(DataLoader(TensorDataset(torch.randn(48, 256), torch.randn(48, 256)), batch_size=4)):
    if i == 3:  # after the first snapshot another user of /dev/shm (a DataLoader worker's batches) takes 1.5 MiB
        with open("/dev/shm/other", "wb") as f:
            f.write(bytes(3 << 19))
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
"""


def _private_shm_works() -> bool:
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /dev/shm"], capture_output=True)
    return probe.returncode == 0


def test_a_snapshot_with_no_room_left_in_shm_goes_to_storage(tmp_path):
    """A real 3 MiB /dev/shm (a tmpfs in a private mount namespace) and PYCKPT_SHM_MB=2: after the
    first 0.79 MB snapshot another user takes 1.5 MiB, which leaves room for one copy, not two, and a
    new copy needs room next to the old one (which goes only once the new one is committed). Such a
    snapshot is written to storage instead, with one line: it used to fail in the tier, and with it
    the storage checkpoint due to be copied from it (every one, here)."""
    if shutil.which("unshare") is None or not _private_shm_works():
        pytest.skip("needs unshare and mount (root) for a private /dev/shm")
    script = tmp_path / "train.py"
    script.write_text(NO_ROOM)
    env = clean_env(PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="2", PYCKPT_SHM_MB="2", PYCKPT_STORAGE_EVERY="2")
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        f"mount -t tmpfs -o size=3m tmpfs /dev/shm && exec {sys.executable} {script}"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "failed" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.count("free in /dev/shm") == 1, r.stderr[-3000:]
    assert max(_steps(tmp_path / "ck")) == 12, r.stderr[-3000:]  # snapshots 4..12 went to storage


def test_a_copy_left_by_a_crash_is_named_when_the_tier_is_off_and_removed_at_a_normal_end(tmp_path, shm):
    out = tmp_path / "out.pt"
    first = run_script([TINY, out], tmp_path, **_env(tmp_path, KILL_AT="19"))
    assert first.returncode == -signal.SIGKILL and _steps(shm)  # the crashed run's copy is in /dev/shm
    second = run_script([TINY, out], tmp_path, **_env(tmp_path, PYCKPT_SHM_MB="0", PYCKPT_STORAGE_EVERY="1"))
    assert second.returncode == 0, second.stderr
    assert second.stderr.count(f"memory-tier copy {shm} is not used: PYCKPT_SHM_MB is 0") == 1, second.stderr
    assert not shm.exists()  # the run ended normally: nothing uses that copy any more


@contextlib.contextmanager
def _damaged_copy(tmp_path, shm):
    """(storage Checkpointer, coordinator) of a relaunch that finds the memory copy of step 10 damaged
    and nothing in storage; everything is closed and removed afterwards."""
    with knobs.override(PYCKPT_SHM_MB=16):
        ck, coord = Checkpointer(tmp_path / "ck"), LocalCoordinator()
        try:
            shm_tier.tier_for(ck, coord).save(10, {"w": torch.ones(1 << 16)}, {"n": 10}).result()
            _damage(shm)
            _fresh(ck)
            yield ck, coord
        finally:
            _fresh(ck)
            shm_tier._REFUSED.clear()
            shutil.rmtree(shm, ignore_errors=True)
            ck.close()


def test_a_damaged_copy_is_removed_so_later_copies_do_not_reference_it(tmp_path, shm, capfd):
    """Incremental copies reference unchanged chunks of the copy before: a copy found damaged at the
    relaunch is removed, or every later copy would carry the damage (and be refused in turn)."""
    with _damaged_copy(tmp_path, shm) as (ck, coord):
        assert shm_tier.choose(ck, coord) is None
        assert "not used" in capfd.readouterr().err
        assert not [p for p in os.listdir(shm) if p.startswith("step-")]
        tier = shm_tier.tier_for(ck, coord)
        tier.save(20, {"w": torch.ones(1 << 16)}, {"n": 20}).result()  # same bytes: nothing to reference now
        verify_share(next(iter(tier.ckpt._candidates())), 0, 1)  # sound: it references no damaged chunk


def test_storage_checkpoints_after_a_resume_from_memory_reference_no_unread_storage_data(tmp_path, shm):
    """A resume from the memory tier reads no storage data, so storage's older chunks were not verified:
    the next storage checkpoint must not reference them (a damaged one would be inherited silently)."""
    storage = tmp_path / "ck"
    w = torch.ones(1 << 16)
    with knobs.override(PYCKPT_SHM_MB=16):
        ck, coord = Checkpointer(storage), LocalCoordinator()
        tier = shm_tier.tier_for(ck, coord)
        ck.save(10, {"w": w}, {"n": 10}).result()
        tier.save(20, {"w": w}, {"n": 20}).result()
        _fresh(ck)
        ck.close()
        _damage(storage / layout.step_dir_name(10))  # storage's old data, never read by the resume below
        ck = Checkpointer(storage)  # a relaunch
        try:
            src = shm_tier.choose(ck, coord)
            assert src is not None and src.step == 20
            ck.save(30, {"w": w}, {"n": 30}).result()  # the same bytes as the damaged chunk's record
            verify_share(str(storage / layout.step_dir_name(30)), 0, 1)
        finally:
            _fresh(ck)
            shutil.rmtree(shm, ignore_errors=True)
            ck.close()


def test_a_damaged_memory_copy_with_nothing_in_storage_stops_the_resume(tmp_path, shm):
    """With PYCKPT_STORAGE_EVERY > 1 the memory copy may be the job's only checkpoint: damaged, the
    resume stops with the error every-checkpoint-damaged gets, instead of training from scratch."""
    from pyckpt import resume
    from pyckpt.errors import CorruptCheckpointError

    with _damaged_copy(tmp_path, shm) as (ck, coord):
        with pytest.raises(CorruptCheckpointError, match="every committed checkpoint is damaged"):
            resume.choose(ck, coord, "auto")


def _finished(root: Path) -> dict:
    return json.loads((root / "FINISHED.json").read_text())


def test_a_normal_end_writes_a_last_snapshot_held_only_in_memory_to_storage(tmp_path, shm, plain_results):
    """Snapshots every 4 of 30 steps: 4..28 in memory, every 3rd (12, 24) in storage too. The last one,
    28, was only in memory, which a normal end removes: it is written to storage first (it used to be
    lost), FINISHED.json names it, and it is storage's newest commit, one that continues the run
    exactly."""
    ck, out = tmp_path / "ck", tmp_path / "out.pt"
    env = _env(tmp_path, PYCKPT_STORAGE_EVERY="3", KILL_AT="")
    first = run_script([TINY, out], tmp_path, **env)
    assert first.returncode == 0, first.stderr
    assert not shm.exists()  # a normal end removes the memory copy
    assert "pyckpt: warning" not in first.stderr, first.stderr
    assert _finished(ck)["step"] == 28 and _finished(ck)["last_checkpoint_ok"] is True, _finished(ck)
    assert {12, 24, 28} <= set(_steps(ck)), _steps(ck)
    assert layout.committed(str(ck))[0].step == 28  # the newest commit: what a relaunch resumes from
    verify_share(str(ck / layout.step_dir_name(28)), 0, 1)
    again = run_script([TINY, out], tmp_path, **env, PYCKPT_RESUME=ck / layout.step_dir_name(28))
    assert again.returncode == 0, again.stderr
    assert "pyckpt: resumed from step 28 " in again.stderr, again.stderr
    assert tree_equal(load(out), plain_results("adamw"))


FULL_DISK_AT_END = """
import errno, os, runpy, sys
from pyckpt import layout, tier_publish

real = tier_publish._copy_part


def full(part, fds, tmp, final, *a, **k):  # storage fills up for the last snapshot only
    if os.path.basename(final) == layout.step_dir_name(28):
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(part, fds, tmp, final, *a, **k)


tier_publish._copy_part = full
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_last_snapshot_that_cannot_reach_storage_is_named_in_one_line(tmp_path, shm):
    """When storage refuses the memory-only last snapshot at the end (disk full), one line says so and
    FINISHED.json names storage's newest commit (24), never a step storage does not hold."""
    ck, out = tmp_path / "ck", tmp_path / "out.pt"
    wrapper = tmp_path / "full_disk.py"
    wrapper.write_text(FULL_DISK_AT_END)
    r = run_script([wrapper, TINY, out], tmp_path, **_env(tmp_path, PYCKPT_STORAGE_EVERY="3", KILL_AT=""))
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if "step 28" in x]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("pyckpt: warning: the snapshot of step 28, kept only in memory"), lines[0]
    assert "No space left" in lines[0] and lines[0].endswith("the newest checkpoint there is step 24"), lines[0]
    assert 28 not in _steps(ck) and not [p for p in ck.iterdir() if ".tmp-" in p.name]
    marker = _finished(ck)
    assert marker["step"] == 24 and marker["last_checkpoint_ok"] is False, marker
    assert not shm.exists()


CRASH_AFTER_TRAINING = """
import os, runpy, sys

sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
if os.environ.get("CRASH"):
    raise RuntimeError("evaluation failed")
"""


def test_a_resumed_copy_that_no_snapshot_follows_is_written_to_storage_at_the_end(tmp_path, shm, plain_results):
    """A run that fails after training keeps its memory copy (28; storage has 12 and 24). Its relaunch
    resumes from it and ends before another snapshot is due: that copy is still the newest snapshot,
    held only in memory, so the normal end writes it to storage before removing it."""
    ck, out = tmp_path / "ck", tmp_path / "out.pt"
    wrapper = tmp_path / "crash.py"
    wrapper.write_text(CRASH_AFTER_TRAINING)
    env = _env(tmp_path, PYCKPT_STORAGE_EVERY="3", KILL_AT="")
    first = run_script([wrapper, TINY, out], tmp_path, **env, CRASH="1")
    assert first.returncode == 1 and "evaluation failed" in first.stderr, first.stderr
    assert max(_steps(shm)) == 28 and _steps(ck) == [12, 24] and not (ck / "FINISHED.json").exists(), first.stderr
    second = run_script([wrapper, TINY, out], tmp_path, **env)  # the same call stack (its frames are restored)
    assert second.returncode == 0, second.stderr
    assert "resuming from the memory tier" in second.stderr and "pyckpt: resumed from step 28 " in second.stderr
    assert tree_equal(load(out), plain_results("adamw"))
    assert _steps(ck) == [12, 24, 28] and layout.committed(str(ck))[0].step == 28
    verify_share(str(ck / layout.step_dir_name(28)), 0, 1)
    assert _finished(ck)["step"] == 28 and _finished(ck)["last_checkpoint_ok"] is True, _finished(ck)
    assert not shm.exists()


@pytest.mark.dist
@pytest.mark.slow
def test_a_two_rank_run_keeps_its_memory_only_last_snapshot_with_every_ranks_part(tmp_path):
    """torchrun, 2 ranks (train_ddp.py: 36 steps): snapshots every 5 steps, every 3rd (15, 30) to storage.
    At the end the other rank may be gone, so rank 0 writes the memory-only 35 to storage alone, both
    ranks' parts: checksums hold for each, and resuming both ranks from it ends exactly as the run did."""
    ck, out = tmp_path / "ck", tmp_path / "out.pt"
    shm = Path(shm_tier.shm_path(str(ck)))
    env = dict(PYCKPT_DIR=ck, PYCKPT_EVERY_STEPS="5", PYCKPT_SHM_MB="64", PYCKPT_STORAGE_EVERY="3")

    def torchrun(**extra):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                               "2", Path(__file__).parent / "train_ddp.py", out], env=clean_env(**env, **extra),
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)

    try:
        first = torchrun()
        assert first.returncode == 0, first.stderr[-3000:]
        assert "pyckpt: warning: the snapshot" not in first.stderr, first.stderr[-3000:]
        assert _finished(ck)["step"] == 35 and _finished(ck)["last_checkpoint_ok"] is True, _finished(ck)
        assert _steps(ck) == [15, 30, 35] and not shm.exists()
        last = ck / layout.step_dir_name(35)
        for rank in (0, 1):
            verify_share(str(last), rank, 2)
        shutil.copy(out, tmp_path / "first.pt")
        again = torchrun(PYCKPT_RESUME=last)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "pyckpt: resumed from step 35 " in again.stderr, again.stderr[-3000:]
        assert tree_equal(load(out), load(tmp_path / "first.pt"))
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def test_parked_files_of_ranks_a_resized_job_lacks_are_freed(tmp_path, shm):
    # A 2-rank job's memory copy, resumed by 1 rank: rank 1's parked file (left by the earlier job) and
    # rank 1's data file of an evicted 2-rank snapshot would never be written over, yet hold their tmpfs
    # pages and count as room for the next copy. Rank 0's are parked as before.
    spares = shm / shm_tier.SPARES
    with knobs.override(PYCKPT_SHM_MB=64):
        ck = Checkpointer(tmp_path / "ck")
        earlier = shm_tier.tier_for(ck, LocalCoordinator())  # the earlier job's tier, left by its crash
        for r in (0, 1, 12):
            (spares / f"rank-{r:05d}.bin").write_bytes(b"x" * 4096)
        shm_tier._TIERS.pop(ck.directory)
        earlier.ckpt.close()
        ck.close()
        ck = Checkpointer(tmp_path / "ck")
        tier = shm_tier.tier_for(ck, LocalCoordinator())  # the relaunch, on one rank
        try:
            assert sorted(p.name for p in spares.iterdir()) == ["rank-00000.bin"]
            victim = shm / "step-000000008.garbage"  # retention's victim of a 2-rank snapshot
            for r in (0, 1):
                (victim / f"rank-{r:05d}").mkdir(parents=True)
                (victim / layout.data_file_name(r)).write_bytes(b"y" * (1 << 20))
            tier.ckpt._salvage(str(victim))
            assert sorted(p.name for p in spares.iterdir()) == ["rank-00000.bin"]
            assert (spares / "rank-00000.bin").read_bytes() == b"y" * (1 << 20)
            assert (victim / layout.data_file_name(1)).exists()  # left to go with the victim
        finally:
            shm_tier._TIERS.pop(ck.directory, None)
            tier.remove()
            ck.close()


EVAL_ONLY = """
import torch
from torch.utils.data import DataLoader, TensorDataset
model = torch.nn.Linear(6, 1)
with torch.no_grad():
    for x, y in DataLoader(TensorDataset(torch.randn(8, 6), torch.randn(8, 1)), batch_size=4):
        model(x)
print("EVALUATED", flush=True)
"""


@pytest.mark.parametrize("tier", ["off", "on"])
def test_a_process_that_does_not_train_keeps_a_crashed_runs_copy(tmp_path, shm, tier):
    # An evaluation script run with the job's exported settings ends normally without one optimizer
    # step: that is not the run's end. It used to remove the copy (tier off: the crashed run's only
    # newest snapshot, storage lagging behind; tier on: after writing it to storage).
    # Snapshots at 4, 8, ..., 20, the 3rd (12) to storage: saving 20 waited for both tiers' commits of
    # 16 and 12, so memory holds a newer step than storage whatever the timing. (Killed at 19, with
    # every 2nd to storage, storage's commit of 16 could win the race with the kill.)
    out = tmp_path / "out.pt"
    settings = dict(PYCKPT_STORAGE_EVERY="3")
    first = run_script([TINY, out], tmp_path, **_env(tmp_path, KILL_AT="23", **settings))
    assert first.returncode == -signal.SIGKILL
    held, stored = _steps(shm), _steps(tmp_path / "ck")
    assert held and max(held) > max(stored, default=0), (held, stored)
    (tmp_path / "evaluate.py").write_text(EVAL_ONLY)
    shm_mb = "0" if tier == "off" else "64"
    ev = run_script([tmp_path / "evaluate.py"], tmp_path,
                    **_env(tmp_path, PYCKPT_SHM_MB=shm_mb, KILL_AT="", **settings))
    assert ev.returncode == 0 and "EVALUATED" in ev.stdout, ev.stderr
    assert _steps(shm) == held and _steps(tmp_path / "ck") == stored


@pytest.mark.parametrize("setting", ["never", "path"])
def test_a_run_that_forks_from_the_copys_run_removes_the_copy(tmp_path, shm, capsys, setting):
    # PYCKPT_RESUME=never (or a chosen checkpoint) with the tier off: the earlier run's copy of step 10 stayed,
    # and an `auto` relaunch with the tier on took it for newer than this run's own commits of lower steps.
    from pyckpt import resume

    with knobs.override(PYCKPT_SHM_MB=16):
        ck, coord = Checkpointer(tmp_path / "ck"), LocalCoordinator()
        try:
            given = ck.save(2, {"w": torch.zeros(4)}).result(60)
            shm_tier.tier_for(ck, coord).save(10, {"w": torch.ones(4)}, {"n": 10}).result()
            assert _steps(shm) == [10]
        finally:
            _fresh(ck)
            ck.close()
    with knobs.override(PYCKPT_SHM_MB=0):
        ck = Checkpointer(tmp_path / "ck")
        try:
            src = resume.choose(ck, coord, "never" if setting == "never" else given)
            assert src is None if setting == "never" else src.path == given
        finally:
            _fresh(ck)
            ck.close()
    assert _steps(shm) == []
    assert f"memory-tier copy {shm} holds the run this one does not continue: removing it" in capsys.readouterr().err


@pytest.mark.parametrize("stored", [False, True])
def test_after_a_resume_from_a_copy_storage_lacks_the_first_snapshot_goes_to_storage(tmp_path, shm, stored):
    # PYCKPT_STORAGE_EVERY counted snapshots per process: a job restarted before its N-th snapshot each
    # time (a flaky node) kept everything in /dev/shm only, and a reboot then lost it all.
    with knobs.override(PYCKPT_SHM_MB=16, PYCKPT_STORAGE_EVERY=3):
        ck, coord = Checkpointer(tmp_path / "ck"), LocalCoordinator()
        try:
            if stored:
                ck.save(10, {"w": torch.ones(4)}, {"n": 10}).result(60)
            shm_tier.tier_for(ck, coord).save(10, {"w": torch.ones(4)}, {"n": 10}).result()
        finally:
            _fresh(ck)
            ck.close()
        ck = Checkpointer(tmp_path / "ck")
        try:
            assert shm_tier.choose(ck, coord) is not None
            tier = shm_tier.tier_for(ck, coord)
            due = [n for n in range(1, 8) if tier.storage_due(n)]
        finally:
            _fresh(ck)
            ck.close()
    assert due == ([3, 6] if stored else [1, 4, 7])


def test_storage_copies_from_memory_record_the_training_stall_of_the_memory_save(tmp_path, shm):
    # The storage record's stall said 0 for every save with the tier on (its copy stalls nothing), so
    # `pyckpt stats` showed no stall at all; the stall is the memory save's, whose own record lives in
    # /dev/shm and goes with the copy.
    from pyckpt import metrics

    with knobs.override(PYCKPT_SHM_MB=64):
        ck, coord = Checkpointer(tmp_path / "ck"), LocalCoordinator()
        tier = shm_tier.tier_for(ck, coord)
        try:
            memory = {}
            for step in (10, 20):
                fut = tier.save(step, {"big": torch.full((1 << 20,), float(step))}, {"n": step})
                fut.captured()  # as the next optimizer step waits for the copy
                tier.publish(fut, ck, step).result(60)
                # The memory save's whole stall (its own record may be written before that wait ends).
                memory[step] = round(fut._timer.stall(), 6)
        finally:
            shm_tier._TIERS.pop(ck.directory, None)
            tier.remove()
            ck.close()
    stored = {r["step"]: r["stall_s"] for r in metrics.read(str(tmp_path / "ck"))[0] if r["event"] == "save"}
    assert stored == memory and all(v > 0 for v in stored.values()), (stored, memory)


def test_ls_names_a_memory_copy_newer_than_storage(tmp_path, shm):
    # After a crash with PYCKPT_STORAGE_EVERY > 1 the newest snapshot may be only in /dev/shm: `pyckpt ls`
    # listed storage alone, and an operator moving or rebooting the job could not know what it loses.
    with knobs.override(PYCKPT_SHM_MB=16):
        ck, coord = Checkpointer(tmp_path / "ck"), LocalCoordinator()
        try:
            ck.save(8, {"w": torch.ones(4)}).result(60)
            shm_tier.tier_for(ck, coord).save(12, {"w": torch.ones(4)}, {"n": 12}).result()
        finally:
            _fresh(ck)
            ck.close()
    cmd = [sys.executable, "-m", "pyckpt", "ls", str(tmp_path / "ck")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"memory tier: {shm} holds step 12, newer than any checkpoint listed: a relaunch on this machine " \
           "resumes from it" in r.stdout, r.stdout
    r = subprocess.run(cmd + ["--json"], capture_output=True, text=True, env=clean_env(), timeout=120)
    assert json.loads(r.stdout)["memory_tier"] == {"path": str(shm), "step": 12}


def _tier_saves(tier, saves, between=None):
    """(kept or not, the tier's bytes in /dev/shm afterwards) for each (step, state) of ``saves``."""
    kept, held = [], []
    for step, state in saves:
        fut = tier.save(step, state, None)
        kept.append(fut is not None)
        if fut is not None:
            fut.result(60)
        held.append(shm_tier._allocated(tier.path))
        if between is not None:
            between(step, fut)
    return kept, held


def _mib_and_a_half(steps):
    """A 1.5 MiB snapshot at each step."""
    return [(step, {"w": torch.full((3 << 17,), float(step))}) for step in steps]


def test_the_tier_never_holds_more_of_dev_shm_than_its_setting(tmp_path, shm, capfd):
    """PYCKPT_SHM_MB bounds the tier's whole footprint in /dev/shm. The copy before a snapshot stays
    until the snapshot is committed (then parked, to be written over), so a state of S MiB needs 2S:
    the tier used to keep any snapshot of up to the setting, holding up to twice what the user gave it."""
    mib = 1 << 20
    with knobs.override(PYCKPT_SHM_MB=4):
        ck, coord = Checkpointer(tmp_path / "ck"), LocalCoordinator()
        try:
            tier = shm_tier.tier_for(ck, coord)
            capfd.readouterr()
            sizes = ((1, mib), (2, mib), (3, mib), (4, 7 * mib // 2))
            kept, held = _tier_saves(tier, [(step, {"w": torch.full((n // 4,), float(step))}) for step, n in sizes])
            err = capfd.readouterr().err
        finally:
            _fresh(ck)
            ck.close()
    assert kept == [True, True, True, False], (kept, err)
    assert max(held) <= 4 * mib and held[2] >= 2 * mib, held  # two 1 MiB copies fit: the tier works
    # 3.5 MiB of data and 64.5 KiB counted for the copy's manifest and files (shm_tier.COPY_BYTES, ENTRY_BYTES);
    # two copies: 7.126 MiB, rounded up (never shown as within the setting when it is not)
    assert "pyckpt: warning: snapshot of 3.6 MiB is not kept in memory: it needs 7.2 MiB of /dev/shm" in err, err
    assert "PYCKPT_SHM_MB=8 or more keeps it" in err, err
    assert err.count("not kept in memory") == 1, err


STARVED_LOADER = """
import os, torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

class Samples(Dataset):  # 1 MiB a sample: DataLoader workers hand each batch over through /dev/shm
    def __len__(self):
        return 96

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.randn(256, 1024, generator=g), torch.randn(1, generator=g)

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(1024, 2048), nn.Linear(2048, 2048), nn.Linear(2048, 1))  # 88 MiB with Adam
opt = torch.optim.Adam(model.parameters(), lr=1e-4)
loader = DataLoader(Samples(), batch_size=16, num_workers=2, prefetch_factor=4, shuffle=True)
step = 0
for epoch in range(6):  # each epoch's workers fill their prefetch queues at once: 8 batches of 16 MiB
    for x, y in loader:
        loss = ((model(x[:, :4]).mean(1) - y) ** 2).mean()  # 4 rows of each sample: the data, not the math, is the load
        opt.zero_grad(); loss.backward(); opt.step(); step += 1
print("TRAINED", step, flush=True)
"""


def test_dataloader_workers_keep_the_dev_shm_the_tier_was_not_given(tmp_path):
    """A container's /dev/shm of 340 MiB (Docker's is 64 MiB unless --shm-size says more), PYCKPT_SHM_MB=120
    to leave the rest to the job's DataLoader workers. The tier used to keep the 88 MiB state twice (the
    copy before and the new one): 176 MiB, and the workers, which need up to ~165 MiB, failed with
    "unable to allocate shared memory" and took training down. Now no snapshot is kept that would take
    the tier past its 120 MiB, and training ends normally (its snapshots in storage)."""
    if shutil.which("unshare") is None or not _private_shm_works():
        pytest.skip("needs unshare and mount (root) for a private /dev/shm")
    (tmp_path / "train.py").write_text(STARVED_LOADER)
    inner = f"mount -t tmpfs -o size=340m tmpfs {shm_tier.SHM_ROOT} && exec {sys.executable} train.py"
    env = clean_env(PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="3", PYCKPT_SHM_MB="120", PYCKPT_STORAGE_EVERY="5")
    r = subprocess.run(["unshare", "-m", "sh", "-c", inner], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "TRAINED 36" in r.stdout, r.stderr[-3000:]
    assert "not kept in memory" in r.stderr, r.stderr[-3000:]
    assert _steps(tmp_path / "ck")[-1] == 36, r.stderr[-3000:]


CRASHED_SAVE = """
import sys, torch
from pyckpt import knobs, shm_tier
from pyckpt.checkpointer import Checkpointer
from pyckpt.coord import LocalCoordinator
with knobs.override(PYCKPT_SHM_MB=4):
    tier = shm_tier.tier_for(Checkpointer(sys.argv[1]), LocalCoordinator())
    tier.save(1, {"w": torch.full((3 << 17,), 1.0)}, None).result(60)  # 1.5 MiB, committed
    tier.save(2, {"w": torch.full((3 << 17,), 2.0)}, None).result(60)  # SIGKILLed before its commit
"""


def test_a_relaunch_clears_a_killed_copys_data_before_it_counts_toward_the_setting(tmp_path, shm, capfd):
    """A process SIGKILLed while its memory copy was being committed leaves that copy's data next to
    the committed one. Counted toward PYCKPT_SHM_MB (4 MiB: two 1.5 MiB copies), it would keep every
    snapshot of the relaunch out of memory, since only the tier's own commit cleared it; uncounted, the
    tier would hold three copies. The relaunch's tier clears it as it opens."""
    (tmp_path / "crash.py").write_text(CRASHED_SAVE)
    r = subprocess.run([sys.executable, "crash.py", str(tmp_path / "ck")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env=clean_env(PYCKPT_TEST_CRASH_AT="commit.part.before:2"))
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    mib = 1 << 20
    assert shm_tier._allocated(str(shm)) >= 3 * mib  # the committed copy and the killed one's data
    with knobs.override(PYCKPT_SHM_MB=4):
        ck = Checkpointer(tmp_path / "ck")
        try:
            tier = shm_tier.tier_for(ck, LocalCoordinator())
            capfd.readouterr()
            kept, held = _tier_saves(tier, _mib_and_a_half((3, 4, 5)))
            err = capfd.readouterr().err
        finally:
            _fresh(ck)
            ck.close()
    assert kept == [True, True, True], (kept, err)
    assert max(held) <= 4 * mib, held
    assert "not kept in memory" not in err, err


def test_a_snapshot_is_not_kept_while_a_storage_copy_pins_the_parked_files(tmp_path, shm, capfd):
    """A storage checkpoint being copied from the memory tier (PYCKPT_STORAGE_EVERY=1, a slow disk)
    still reads the evicted copy's files, so the next snapshot cannot write over them: with the copy
    before it the tier would hold three 1.5 MiB copies, over PYCKPT_SHM_MB=4. That snapshot goes to
    storage (one line); once the storage copy is done, snapshots are kept again."""
    mib = 1 << 20
    release = threading.Event()
    with knobs.override(PYCKPT_SHM_MB=4, PYCKPT_STORAGE_EVERY=1):
        ck = Checkpointer(tmp_path / "ck")
        try:
            tier = shm_tier.tier_for(ck, LocalCoordinator())
            # Storage's save of step 0 stays in flight (its commit waits): a slow disk, as the next
            # storage checkpoint (copied from the tier's step 1) waits for it.
            slow = ck.save(0, {"w": torch.zeros(4)}, _gate=lambda: release.wait(60) and None)
            capfd.readouterr()

            def between(step, fut):
                if step == 1:
                    tier.publish(fut, ck, step)  # reads step 1's files until storage's step 0 is done
                if step == 3:
                    release.set()
                    tier.publication.wait()

            kept, held = _tier_saves(tier, _mib_and_a_half((1, 2, 3, 4)), between)
            err = capfd.readouterr().err
            assert slow.result(60) and tier.publication.future.result(60)
        finally:
            release.set()
            _fresh(ck)
            ck.close()
    assert kept == [True, True, False, True], (kept, err)
    assert max(held) <= 4 * mib, held
    assert err.count("not kept in memory: next to what the tier holds now") == 1, err


def test_a_snapshot_whose_predecessor_is_still_committing_goes_to_storage(tmp_path, shm, capfd):
    """The memory copy before is still being committed after PYCKPT_STAGING_TIMEOUT_S. The tier used to
    start the copy anyway, which then waited the timeout again and failed, and with it the storage
    checkpoint due to be copied from it. Now it is not kept (one line) and storage captures it itself."""
    release = threading.Event()
    with knobs.override(PYCKPT_SHM_MB=16, PYCKPT_STAGING_TIMEOUT_S=0.5):
        ck = Checkpointer(tmp_path / "ck")
        try:
            tier = shm_tier.tier_for(ck, LocalCoordinator())
            capfd.readouterr()
            stuck = tier.save(1, {"w": torch.ones(8)}, None, _gate=lambda: release.wait(60) and None)
            second = tier.save(2, {"w": torch.full((8,), 2.0)}, None)
            newest_after_second = tier.newest
            release.set()
            assert stuck.result(60)
            third = tier.save(3, {"w": torch.full((8,), 3.0)}, None)
            assert third is not None and third.result(60)
            err = capfd.readouterr().err
        finally:
            release.set()
            _fresh(ck)
            ck.close()
    assert second is None and newest_after_second is None, (second, err)
    assert err.count("snapshot of step 2 not kept in memory: the copy before it is still being committed after "
                     "PYCKPT_STAGING_TIMEOUT_S=0.5 s") == 1, err
    assert "not kept in memory" not in err.replace("snapshot of step 2 not kept in memory", ""), err


def test_the_setting_the_line_advises_keeps_every_snapshot_of_a_many_tensor_state(tmp_path, shm, capfd):
    """A state of 4,000 small tensors (8 MiB) is over a 4 MiB setting; the line names the setting that
    keeps it. Set to that, every snapshot is kept and the tier stays within it, manifests included
    (~1.2 MB a copy here): an advice from the tensors' bytes alone would be too small to keep any
    snapshot after the first."""
    def saves(mb):
        with knobs.override(PYCKPT_SHM_MB=mb):
            ck, tier = Checkpointer(tmp_path / f"ck{mb}"), None
            try:
                tier = shm_tier.tier_for(ck, LocalCoordinator())
                capfd.readouterr()
                states = (({f"t{i}": torch.full((512,), float(step + i)) for i in range(4000)}) for step in range(1, 5))
                kept, held = _tier_saves(tier, enumerate(states, 1))
                return kept, held, capfd.readouterr().err
            finally:
                if tier is not None:
                    tier.remove()
                _fresh(ck)
                ck.close()

    kept, _, err = saves(4)
    advised = re.search(r"PYCKPT_SHM_MB=(\d+) or more keeps it", err)
    assert kept == [False] * 4 and advised, (kept, err)
    kept, held, err = saves(int(advised.group(1)))
    assert kept == [True] * 4, (kept, err)
    assert max(held) <= int(advised.group(1)) << 20, (held, advised.group(1))
    assert "not kept in memory" not in err, err
