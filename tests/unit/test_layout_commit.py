"""layout names/scan and commit helpers: atomic files, latest pointer, retention, tmp GC."""
import json
import os
import subprocess
import sys

from pyckpt import commit, layout


def make_ckpt(root, step, complete=True):
    d = os.path.join(root, layout.step_dir_name(step))
    os.makedirs(d)
    if complete:
        open(os.path.join(d, "MANIFEST.json"), "w").close()
    return d


def test_names():
    assert layout.step_dir_name(1200) == "step-000001200"
    assert layout.step_dir_name(12345678901) == "step-12345678901"
    assert layout.parse_step("step-000001200") == 1200
    assert layout.parse_step("step-000001200.tmp-1x2") is None
    assert layout.tmp_token("step-000000001.tmp-123xab") == "123xab"
    assert layout.part_name(3) == "rank-00003.json"
    assert layout.data_file_name(3) == "rank-00003/data-000.bin"


def test_scan_orders_by_step_and_marks_incomplete(tmp_path):
    root = str(tmp_path)
    make_ckpt(root, 20)
    make_ckpt(root, 3)
    make_ckpt(root, 7, complete=False)
    os.makedirs(os.path.join(root, "step-000000030.tmp-1x2"))
    os.makedirs(os.path.join(root, "unrelated"))
    got = [(e.step, e.complete) for e in layout.scan(root)]
    assert got == [(3, True), (7, False), (20, True), (30, False)]


def test_write_atomic_replaces_and_leaves_no_temp(tmp_path):
    p = str(tmp_path / "f")
    commit.write_atomic(p, b"one")
    commit.write_atomic(p, b"two")
    assert (tmp_path / "f").read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["f"]


def test_latest_pointer_roundtrip_and_garbage(tmp_path):
    root = str(tmp_path)
    assert commit.read_latest(root) is None
    commit.write_latest(root, "step-000000005")
    assert commit.read_latest(root) == "step-000000005"
    for junk in (b"../../etc", b"\xff\xfe", b"", b"step-12"):
        (tmp_path / "latest").write_bytes(junk)
        assert commit.read_latest(root) is None


def test_retention_keeps_newest_committed_only(tmp_path):
    root = str(tmp_path)
    for s in (1, 2, 3, 4):
        make_ckpt(root, s)
    make_ckpt(root, 5, complete=False)
    deleted = commit.apply_retention(root, keep=2)
    assert sorted(os.path.basename(d) for d in deleted) == ["step-000000001", "step-000000002"]
    assert sorted(os.listdir(root)) == ["step-000000003", "step-000000004", "step-000000005"]


def test_gc_removes_dead_and_own_stale_tmp_dirs_only(tmp_path):
    root = str(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert dead.returncode == 0, dead.stderr
    dead_pid = int(dead.stdout)
    names = {
        "dead": f"step-000000001.tmp-{dead_pid}xaa",
        "mine_stale": f"step-000000002.tmp-{os.getpid()}xbb",
        "mine_live": f"step-000000003.tmp-{os.getpid()}xcc",
        "other_alive": f"step-000000004.tmp-{os.getppid()}xdd",
    }
    for n in names.values():
        os.makedirs(os.path.join(root, n))
    make_ckpt(root, 9)
    commit.gc_tmp(root, live_tokens={f"{os.getpid()}xcc"})
    assert sorted(os.listdir(root)) == sorted([names["mine_live"], names["other_alive"], "step-000000009"])


def test_publish_swaps_an_existing_step_atomically(tmp_path):
    root = str(tmp_path)
    old = make_ckpt(root, 1)
    open(os.path.join(old, "old-data"), "w").close()
    tmp = os.path.join(root, "step-000000001.tmp-1x1")
    os.makedirs(tmp)
    open(os.path.join(tmp, "new-data"), "w").close()
    aside = commit.publish(tmp, old, b"{}")
    assert sorted(os.listdir(old)) == ["MANIFEST.json", "new-data"]
    # The old checkpoint now lies under the tmp name (garbage) until the caller deletes it.
    assert aside == tmp and sorted(os.listdir(aside)) == ["MANIFEST.json", "old-data"]
    assert commit.remove_tree(aside)
    assert os.listdir(root) == ["step-000000001"]


def make_seq_ckpt(root, step, seq):
    d = make_ckpt(root, step, complete=False)
    with open(os.path.join(d, "MANIFEST.json"), "w") as f:
        json.dump({"seq": seq}, f)
    return d


def test_commit_order_is_by_sequence_not_step(tmp_path):
    root = str(tmp_path)
    make_seq_ckpt(root, 900, 1)  # an older run reached step 900
    make_seq_ckpt(root, 5, 2)  # a new run started over
    make_seq_ckpt(root, 10, 3)
    legacy = make_ckpt(root, 7)  # written before sequence numbers: older than every sequenced one
    os.utime(os.path.join(legacy, "MANIFEST.json"), (1, 1))
    assert [e.step for e in layout.committed(root)] == [10, 5, 900, 7]
    assert commit.next_seq(root) == 4
    deleted = commit.apply_retention(root, keep=2)
    assert sorted(os.path.basename(d) for d in deleted) == ["step-000000007", "step-000000900"]
    assert sorted(os.listdir(root)) == ["step-000000005", "step-000000010"]


def test_retention_spares_what_latest_names(tmp_path):
    root = str(tmp_path)
    for seq, step in enumerate((1, 2, 3, 4), start=1):
        make_seq_ckpt(root, step, seq)
    commit.write_latest(root, "step-000000001")  # e.g. the pointer update of a newer save failed
    commit.apply_retention(root, keep=1)
    assert sorted(os.listdir(root)) == ["latest", "step-000000001", "step-000000004"]


def test_symlinked_step_is_neither_loaded_nor_deleted_through(tmp_path):
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "sentinel").write_text("keep me")
    (outside / "MANIFEST.json").write_text('{"seq": 99}')
    root.mkdir()
    for seq, step in enumerate((1, 2, 3), start=1):
        make_seq_ckpt(str(root), step, seq)
    os.symlink(outside, root / "step-000000000")
    os.symlink(outside, root / "step-000000008.del-1x1")  # leftover-looking links: only the link goes
    assert [e.step for e in layout.committed(str(root))] == [3, 2, 1]
    assert layout.links(str(root)) == ["step-000000000"]
    commit.apply_retention(str(root), keep=1)
    commit.gc_tmp(str(root), set(), locked=True)
    assert (outside / "sentinel").read_text() == "keep me" and (outside / "MANIFEST.json").exists()
    assert sorted(os.listdir(root)) == ["step-000000000", "step-000000003"]


def test_gc_collects_every_leftover_kind(tmp_path):
    root = str(tmp_path)
    keep = make_seq_ckpt(root, 3, 1)
    leftovers = ["step-000000004.tmp-1x1", "step-000000001.del-2x2", "latest.tmp-3x3"]
    for n in leftovers[:2]:
        os.makedirs(os.path.join(root, n, "rank-00000"))
    open(os.path.join(root, leftovers[2]), "w").close()
    open(os.path.join(keep, "MANIFEST.json.tmp-4x4"), "w").close()
    os.makedirs(os.path.join(root, "notes.tmp-5x5"))  # not a name pyckpt makes: left alone
    os.makedirs(os.path.join(root, "step-000000005.tmp-6x6"))
    removed = commit.gc_tmp(root, live_tokens={"6x6"}, locked=True)
    assert len(removed) == 4
    assert sorted(os.listdir(root)) == ["notes.tmp-5x5", "step-000000003", "step-000000005.tmp-6x6"]
    assert os.listdir(keep) == ["MANIFEST.json"]


def test_crash_points_are_unique_and_paired():
    assert len(set(commit.CRASH_POINTS)) == len(commit.CRASH_POINTS)
    ops = {p.rsplit(".", 1)[0] for p in commit.CRASH_POINTS}
    assert all(f"{op}.before" in commit.CRASH_POINTS and f"{op}.after" in commit.CRASH_POINTS for op in ops)


def test_a_rank_lost_after_every_part_is_in_does_not_turn_the_commit_into_a_failure(tmp_path, monkeypatch, caplog):
    """Rank 1 writes its part and posts it, then is gone (a preempted rank that exits) before the
    commit's outcome is broadcast. Rank 0 has published the checkpoint by then: it reports it committed,
    with one line naming the lost rank, not "failed, previous checkpoints kept" over a committed one."""
    import logging
    import threading

    import torch.distributed as dist

    from pyckpt import coord, manifest
    from pyckpt.coord import StoreCoordinator

    monkeypatch.setattr(coord, "HEARTBEAT_S", 0.1)
    monkeypatch.setattr(coord, "_LOOK_AFTER_S", 0.1)
    store = dist.HashStore()
    c0 = StoreCoordinator(store, 0, 2, prefix="p")
    c0.dead_after_s = 0.8
    ranks = {1: StoreCoordinator(store, 1, 2, prefix="p")}  # dropped below: the only reference
    root = str(tmp_path)
    tmp, final = os.path.join(root, "step-000000005.tmp-x"), os.path.join(root, layout.step_dir_name(5))
    os.makedirs(tmp)
    part1 = {"rank": 1, "tensors": [], "files": []}
    # Rank 1's side of commit_parts up to the outcome: its part file and its vote; then it is gone
    # (its coordinator dropped, so its heartbeat stops) before the outcome is broadcast.
    info1 = commit._write_part(tmp, 1, manifest.dumps(part1))
    vote = {"info": info1, "error": None, "figures": None}
    t = threading.Thread(target=lambda: ranks.pop(1).all_gather_json(vote, "save/0/parts"))
    t.start()
    with caplog.at_level(logging.WARNING, logger="pyckpt"):
        commit.commit_parts(c0, "save/0", tmp, final, 5, {"rank": 0, "tensors": [], "files": []}, None, root)
    t.join()
    assert os.path.isfile(os.path.join(final, "MANIFEST.json")) and not os.path.exists(tmp)
    assert any("committed" in r.getMessage() and "rank 1 is gone" in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]
