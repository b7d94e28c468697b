"""Disk full at every level of free space a save can meet: in the data file, the part file, the
manifest, the `latest` pointer. Training (the caller of `Checkpointer.save`) never gets an
exception, the previous checkpoint survives and loads, the failure is reported in one line, a
save that committed before the pointer failed is reported as committed, and the next save once
space is back leaves nothing behind.

Needs root (mounts a small tmpfs); CI runs as root, so a failing mount fails the test loudly.
"""
import contextlib
import errno
import logging
import os
import subprocess

import torch

import pyckpt

PAGE = 4096
BASE = {"t": torch.arange(4096, dtype=torch.float32)}  # 16 KiB
BIG = {"t": torch.arange(16384, dtype=torch.float32) + 1}  # 64 KiB: 16 pages of data


@contextlib.contextmanager
def mounted(mnt, *commands):
    """Runs ``commands`` (the last one mounts a file system at ``mnt``), yields ``mnt``, unmounts it."""
    for cmd in commands:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"{' '.join(cmd)} failed (these tests need root): {r.stderr.strip()}"
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", mnt], capture_output=True, timeout=30)


def small_tmpfs(path, size_kb):
    os.makedirs(path)
    return mounted(path, ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", path])


def fill_leaving(mount, free_bytes):
    """Fill the file system until exactly ``free_bytes`` are left; returns the filler's path."""
    st = os.statvfs(mount)
    filler = os.path.join(mount, "filler")
    with open(filler, "wb") as f:
        f.write(b"\0" * (st.f_bavail * st.f_frsize - free_bytes))
    assert os.statvfs(mount).f_bavail * PAGE == free_bytes
    return filler


def test_disk_full_at_every_level_keeps_the_previous_checkpoint(tmp_path, caplog):
    outcomes = {}
    with small_tmpfs(str(tmp_path / "mnt"), 1024) as mnt:
        for level in range(0, 22):  # free pages when the second save starts
            root = os.path.join(mnt, f"root{level}")
            with pyckpt.Checkpointer(root, keep=1, incremental=False) as ck:  # each save writes all its files
                ck.save(1, BASE).result(60)
                filler = fill_leaving(mnt, level * PAGE)
                caplog.clear()
                with caplog.at_level(logging.WARNING, logger="pyckpt"):
                    fut = ck.save(2, BIG)  # must not raise: training goes on
                    committed = fut.wait(60)
                lines = [r.getMessage() for r in caplog.records if r.name == "pyckpt"]
                assert len(lines) <= 1 and all("\n" not in ln for ln in lines), lines
                if committed:
                    assert fut.result(0).endswith("step-000000002")
                    assert ck.latest().step == 2 and torch.equal(ck.load()["t"], BIG["t"])
                    outcomes[level] = "committed, pointer failed" if lines else "committed"
                    if lines:
                        assert "committed, but the 'latest' pointer was not updated" in lines[0]
                else:
                    err = str(fut.exception())
                    assert "No space left on device" in err and len(lines) == 1 and err in lines[0], (err, lines)
                    assert ck.latest().step == 1 and torch.equal(ck.load()["t"], BASE["t"])
                    assert torch.equal(pyckpt.load(root)["t"], BASE["t"])
                    what = [w for w in ("data-000.bin", "rank-00000.json", "MANIFEST.json") if w in err]
                    assert len(what) == 1, err
                    outcomes[level] = f"failed in {what[0]}"
                os.remove(filler)
                ck.save(3, BASE).result(60)  # space is back: the next save works and cleans up
                assert sorted(os.listdir(root)) == [".pyckpt.lock", "latest", "metrics.jsonl", "step-000000003"]
            subprocess.run(["rm", "-rf", root], check=True)
    seen = set(outcomes.values())
    # Every file of a save met the full disk at some level, and enough space committed it.
    assert {"failed in data-000.bin", "failed in rank-00000.json", "failed in MANIFEST.json",
            "committed, pointer failed", "committed"} <= seen, outcomes
    assert outcomes[0] == "failed in data-000.bin" and outcomes[21] == "committed"


def test_disk_full_in_a_subprocess_never_kills_training(tmp_path):
    """A training loop that checkpoints every step on a full disk runs to its end (exit 0)."""
    script = (
        "import sys, torch, pyckpt\n"
        "ck = pyckpt.Checkpointer(sys.argv[1], keep=2)\n"
        "ck.save(0, {'w': torch.zeros(10)}).result(60)\n"
        "try:\n"
        "    open(sys.argv[1] + '/../filler', 'wb').write(b'\\0' * 10**7)\n"
        "except OSError:\n"
        "    pass  # the disk is full now\n"
        "w = torch.zeros(100_000)\n"
        "for step in range(1, 6):\n"
        "    w += 1\n"
        "    ck.save(step, {'w': w}).wait(60)\n"
        "print('TRAINED', int(w[0]))\n")
    with small_tmpfs(str(tmp_path / "mnt"), 256) as mnt:
        import sys

        r = subprocess.run([sys.executable, "-c", script, os.path.join(mnt, "root")], capture_output=True,
                           text=True, timeout=120,
                           env={k: v for k, v in os.environ.items() if not k.startswith("PYCKPT_")})
        assert r.returncode == 0 and "TRAINED 5" in r.stdout, r.stderr
        failures = [ln for ln in r.stderr.splitlines() if ln.startswith("pyckpt: checkpoint of step")]
        assert len(failures) == 5 and all("No space left on device" in ln for ln in failures), r.stderr
        assert torch.equal(pyckpt.load(os.path.join(mnt, "root"))["w"], torch.zeros(10))


def test_a_full_disk_makes_room_by_removing_all_but_the_newest_checkpoint(tmp_path, caplog):
    """With keep=3 and the disk full, every later save failed while the three oldest checkpoints held
    their room: checkpoints stopped advancing for the rest of the run, so a crash lost everything
    since. Now a save that failed for lack of space removes the committed checkpoints older than the
    newest (never the newest, nor a keep_best one), says so in its one line, and the next save fits."""
    def state(s):
        return {"t": BIG["t"] * s}

    with small_tmpfs(str(tmp_path / "mnt"), 1024) as mnt:
        root = os.path.join(mnt, "root")
        with pyckpt.Checkpointer(root, keep=3, incremental=False) as ck:
            for s in (1, 2, 3):
                ck.save(s, state(s)).result(60)
            fill_leaving(mnt, 4 * PAGE)  # BIG's data alone needs 16 pages
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="pyckpt"):
                fut = ck.save(4, state(4))
                assert not fut.wait(60)
            lines = [r.getMessage() for r in caplog.records if r.name == "pyckpt"]
            assert len(lines) == 1 and "No space left on device" in lines[0], lines
            assert "step-000000001" in lines[0] and "step-000000002" in lines[0] and "step-000000003 kept" in lines[0]
            assert sorted(n for n in os.listdir(root) if n.startswith("step-")) == ["step-000000003"]
            assert ck.latest().step == 3 and torch.equal(ck.load()["t"], state(3)["t"])
            ck.save(5, state(5)).result(60)  # the filler is still there: the room came from the removed ones
            assert [n for n in os.listdir(root) if n.startswith("step-")] and ck.latest().step == 5
            assert torch.equal(pyckpt.load(root)["t"], state(5)["t"])
            assert sorted(n for n in os.listdir(root) if n.startswith("step-")) == ["step-000000003", "step-000000005"]


def small_ext4(tmp_path, size_mb):
    """An ext4 file system of ``size_mb`` MiB in a file, mounted through a loop device."""
    img, mnt = str(tmp_path / "ext4.img"), str(tmp_path / "ext4")
    os.makedirs(mnt)
    with open(img, "wb") as f:
        f.truncate(size_mb << 20)
    return mounted(mnt, ["mkfs.ext4", "-q", "-F", "-b", str(PAGE), img], ["mount", "-o", "loop", img, mnt])


def fill_ext4_leaving(mount, pages):
    """Fill the file system, then free ``pages`` pages of a file written before the filler."""
    hole = os.path.join(mount, "hole")
    with open(hole, "wb") as f:
        f.write(b"\1" * pages * PAGE)
        os.fsync(f.fileno())
    filler = os.path.join(mount, "filler")
    with open(filler, "wb", buffering=0) as f:
        for piece in (64 * PAGE, PAGE):
            try:
                while True:
                    f.write(b"\0" * piece)
                    os.fsync(f.fileno())
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
    os.remove(hole)
    os.sync()
    return filler


def test_disk_full_on_ext4_where_data_files_are_allocated_before_the_writes(tmp_path, caplog):
    """On ext4 the engine allocates an uncompressed data file's room before writing it
    (File::preallocate). A save that does not fit still fails in one line naming the data file, the
    previous checkpoint loads, the failed save leaves nothing behind, and once space is back the
    next save commits."""
    with small_ext4(tmp_path, 8) as mnt:
        root = os.path.join(mnt, "root")
        with pyckpt.Checkpointer(root, keep=1, incremental=False) as ck:
            ck.save(1, BASE).result(60)
            filler = fill_ext4_leaving(mnt, 8)  # BIG's data alone needs 16 pages
            free = os.statvfs(mnt).f_bfree
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="pyckpt"):
                fut = ck.save(2, BIG)  # must not raise: training goes on
                assert not fut.wait(60)
            lines = [r.getMessage() for r in caplog.records if r.name == "pyckpt"]
            err = str(fut.exception())
            assert "No space left on device" in err and "data-000.bin" in err, err
            assert len(lines) == 1 and err in lines[0], lines
            assert ck.latest().step == 1 and torch.equal(ck.load()["t"], BASE["t"])
            assert not [n for n in os.listdir(root) if n.startswith("step-000000002")]
            assert os.statvfs(mnt).f_bfree >= free - 1  # (one block: metrics.jsonl's line for the failure)
            os.remove(filler)
            ck.save(3, BIG).result(60)
            assert torch.equal(pyckpt.load(root)["t"], BIG["t"])
            assert sorted(os.listdir(root)) == [".pyckpt.lock", "latest", "metrics.jsonl", "step-000000003"]
