"""layout names/scan and commit helpers: atomic files, latest pointer, retention, tmp GC."""
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


def test_publish_renames_and_replaces_an_existing_step(tmp_path):
    root = str(tmp_path)
    old = make_ckpt(root, 1)
    open(os.path.join(old, "old-data"), "w").close()
    tmp = os.path.join(root, "step-000000001.tmp-1x1")
    os.makedirs(tmp)
    open(os.path.join(tmp, "new-data"), "w").close()
    commit.publish(tmp, old, b"{}")
    assert sorted(os.listdir(old)) == ["MANIFEST.json", "new-data"]
    assert os.listdir(root) == ["step-000000001"]
