"""`pyckpt inspect`, `pyckpt diff` and `pyckpt gc` on real checkpoints, run as subprocesses."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import torch
from torch.distributed import HashStore

import pyckpt
from pyckpt.coord import StoreCoordinator


def save_two_ranks(state: dict, path: str) -> str:
    """A real two-rank checkpoint: two threads, each a rank, coordinating through a c10d HashStore."""
    store, errors = HashStore(), []

    def rank(r: int) -> None:
        try:
            pyckpt.save(state, path, coordinator=StoreCoordinator(store, r, 2, timeout_s=60))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and not any(t.is_alive() for t in threads), errors
    return path


def test_inspect_tree_and_json(cli, tmp_path):
    state = {"model": {"fc.weight": torch.zeros(256, 64), "fc.bias": torch.randn(256)},
             "loop": {"epoch": 2, "batch": 17}, "lr": 0.5}
    path = save_two_ranks(state, str(tmp_path / "two"))
    r = cli("inspect", path, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["world_size"] == 2 and doc["step"] == 0 and len(doc["parts"]) == 2
    leaves = {e["key"]: e for e in doc["sections"]["replicated"]}
    w = leaves["model/fc.weight"]
    assert (w["type"], w["dtype"], w["shape"], w["nbytes"]) == ("tensor", "F32", [256, 64], 256 * 64 * 4)
    assert {leaves["model/fc.weight"]["rank"], leaves["model/fc.bias"]["rank"]} == {0, 1}  # spread over ranks
    assert leaves["loop/epoch"] == {"key": "loop/epoch", "type": "value", "value": 2}
    assert leaves["lr"]["value"] == 0.5
    assert doc["bytes_raw"] == (256 * 64 + 256) * 4
    r = cli("inspect", path)
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert "  step 0, world size 2" in lines[1]
    assert any(ln.strip().startswith("fc.weight  F32 [256, 64]  64.0 KiB") for ln in lines), r.stdout
    assert "    epoch: 2" in lines


def test_inspect_marks_numpy_leaves(cli, tmp_path):
    """A NumPy array in the state loads as NumPy, not as a tensor: inspect says so (text and JSON)."""
    import numpy as np

    path = pyckpt.save({"w": torch.ones(3), "hist": np.zeros(4, dtype=np.float32), "best": np.int64(2)},
                       str(tmp_path / "c"))
    r = cli("inspect", path, "--json")
    assert r.returncode == 0, r.stderr
    leaves = {e["key"]: e for e in json.loads(r.stdout)["sections"]["replicated"]}
    assert (leaves["hist"]["numpy"], leaves["hist"]["shape"], leaves["best"]["numpy"], leaves["best"]["shape"]) \
        == (True, [4], True, [])
    assert "numpy" not in leaves["w"]
    lines = cli("inspect", path).stdout.splitlines()
    assert any(ln.strip().startswith("hist  F32 [4]") and ln.endswith("  numpy") for ln in lines), lines
    assert any(ln.strip().startswith("w  F32 [3]") and ln.endswith("  cpu") for ln in lines), lines


def test_inspect_shows_codec_ratio_and_rank_state(cli, ckpt_root):
    with pyckpt.Checkpointer(ckpt_root, compress="zstd") as ck:
        ck.save(12, {"zeros": torch.zeros(100_000)}, rank_state={"pos": {"batch": 3}}).result(60)
    r = cli("inspect", ckpt_root, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    z = doc["sections"]["replicated"][0]
    assert z["key"] == "zeros" and z["codec_ratio"] > 10 and z["stored_bytes"] < z["nbytes"] / 10
    assert doc["sections"]["rank_state[0]"] == [{"key": "pos/batch", "type": "value", "value": 3}]
    assert cli("inspect", os.path.join(ckpt_root, "nope")).returncode == 2


def test_diff_reports_changed_tensors_and_values(cli, tmp_path):
    a = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(3), "n": 1,
         "gone": torch.zeros(1)}
    b = {"w": a["w"].clone(), "b": torch.ones(3), "n": 2, "new": 5}
    b["w"][1, 2] += 0.25
    b["w"][2, 0] -= 2.0
    pa, pb = pyckpt.save(a, str(tmp_path / "a")), pyckpt.save(b, str(tmp_path / "b"))
    r = cli("diff", pa, pb, "--json")
    assert r.returncode == 1, r.stderr
    d = json.loads(r.stdout)
    assert [(c["key"], c["differing"], c["max_abs_diff"]) for c in d["changed"]] == [("w", 2, 2.0)]
    assert d["values_changed"] == [{"key": "n", "a": 1, "b": 2}]
    assert (d["only_in_a"], d["only_in_b"], d["same"], d["identical"]) == (["gone"], ["new"], 1, False)
    r = cli("diff", pa, pb)
    assert "changed    w  F32 [3, 4]  2 of 12 element(s) differ, max |a-b| = 2" in r.stdout
    assert cli("diff", pa, pa).returncode == 0
    assert cli("diff", pa, str(tmp_path / "missing")).returncode == 2


def test_diff_counts_differing_elements_of_every_dtype(cli, tmp_path):
    """Every dtype the format holds, one element changed in each: the diff of a bits16 tensor died
    with torch's NotImplementedError traceback ("index_cpu" not implemented for 'Bits16'), the
    other exotic dtypes with it. Where torch has no arithmetic for a dtype, max |a-b| is left out."""
    from pyckpt import dtypes

    a, b = {}, {}
    for code, dt in sorted(dtypes.CODE_TO_DTYPE.items()):
        raw = torch.zeros(6 * dt.itemsize, dtype=torch.uint8)
        a[code] = raw.view(dt).reshape(2, 3) if dt.itemsize else raw.view(dt)
        changed = raw.clone()
        changed[dt.itemsize] = 1  # the second element's first byte (1 for bool)
        b[code] = changed.view(dt).reshape(2, 3)
    pa, pb = pyckpt.save(a, str(tmp_path / "a")), pyckpt.save(b, str(tmp_path / "b"))
    r = cli("diff", pa, pb, "--json")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    d = json.loads(r.stdout)
    assert {c["key"]: (c["differing"], c["numel"]) for c in d["changed"]} == {code: (1, 6) for code in a}
    assert {c["key"]: c["max_abs_diff"] for c in d["changed"]}["F32"] > 0


def _leftovers(root: str, pid: int) -> dict[str, str]:
    names = {"tmp": f"step-000000009.tmp-{pid}x0123456789", "del": f"step-000000001.del-{pid}xabcdef0123",
             "half": "step-000000002"}
    for n in names.values():
        os.makedirs(os.path.join(root, n, "rank-00000"))
        with open(os.path.join(root, n, "rank-00000", "data-000.bin"), "wb") as f:
            f.write(b"x" * 100)
    names["latest"] = f"latest.tmp-{pid}xfeedbeef00"
    with open(os.path.join(root, names["latest"]), "w") as f:
        f.write("step-000000009\n")
    return names


def test_gc_removes_leftovers_and_keeps_checkpoints(cli, ckpt_root, byte_equal):
    with pyckpt.Checkpointer(ckpt_root) as ck:
        ck.save(5, {"t": torch.arange(7)}).result(60)
    dead = 2 ** 22 + 12345  # above the kernel's pid limit: never a running process
    names = _leftovers(ckpt_root, dead)
    r = cli("gc", ckpt_root, "--json")
    assert r.returncode == 0, r.stderr
    removed = sorted(os.path.basename(p) for p in json.loads(r.stdout)["removed"])
    assert removed == sorted(names.values())
    assert sorted(n for n in os.listdir(ckpt_root) if n.startswith("step-")) == ["step-000000005"]
    assert byte_equal(pyckpt.load(ckpt_root)["t"], torch.arange(7))


def test_gc_while_a_job_holds_the_directory_removes_only_dead_writers_leftovers(cli, ckpt_root):
    with pyckpt.Checkpointer(ckpt_root) as ck:  # this process is the live job
        ck.save(5, {"t": torch.arange(7)}).result(60)
        dead = _leftovers(ckpt_root, 2 ** 22 + 12345)
        live = f"step-000000010.tmp-{os.getpid()}x0123456789"
        os.makedirs(os.path.join(ckpt_root, live))
        r = cli("gc", ckpt_root)
        assert r.returncode == 0, r.stderr
        assert "only leftovers of writers that are no longer running are removed" in r.stderr
        left = set(os.listdir(ckpt_root))
        assert live in left and dead["half"] in left  # may belong to the running job: kept
        assert not {dead["tmp"], dead["del"], dead["latest"]} & left
        assert "step-000000005" in left


def _job_in_progress(ck: pyckpt.Checkpointer, root: str) -> str:
    """A directory of the running job's own save in progress (its session token: the lock holder's pid)."""
    name = f"step-000000010.tmp-{ck._session}-99"
    os.makedirs(os.path.join(root, name, "rank-00000"))
    return name


def test_gc_in_another_pid_namespace_leaves_the_running_jobs_saves(ckpt_root):
    """gc from another container sharing the file system: the job's pid means nothing there, so
    its in-progress saves are not proven dead and must stay."""
    with pyckpt.Checkpointer(ckpt_root) as ck:  # this process is the live job
        ck.save(5, {"t": torch.arange(7)}).result(60)
        live = _job_in_progress(ck, ckpt_root)
        r = subprocess.run(["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc",
                            sys.executable, "-m", "pyckpt", "gc", ckpt_root], capture_output=True, text=True,
                           timeout=120)
        if r.returncode != 0 and r.stderr.startswith("unshare:"):
            pytest.skip(f"no unprivileged PID namespace here: {r.stderr.strip()}")
        assert r.returncode == 0, r.stderr
        assert live in os.listdir(ckpt_root), r.stderr
        assert "is in use by" in r.stderr and "another PID namespace or machine" in r.stderr, r.stderr
        ck.save(6, {"t": torch.arange(8)}).result(60)  # and the job goes on saving
    assert pyckpt.load(ckpt_root)["t"].tolist() == list(range(8))


def test_gc_leaves_leftovers_while_a_holder_on_another_machine_holds_the_lock(cli, ckpt_root):
    """The lock file names a holder on another machine: no pid on this one says whether a leftover's
    writer is alive (a dead-looking pid here may be the holder's own, there), so nothing is removed."""
    with pyckpt.Checkpointer(ckpt_root) as ck:  # holds the lock: gc cannot take it
        ck.save(5, {"t": torch.arange(7)}).result(60)
        dead_here = 2 ** 22 + 12345  # no such process on this machine
        # What a holder elsewhere wrote, written by another process: closing a descriptor of the
        # lock file in this one would drop this process's lock.
        holder = json.dumps({"pid": dead_here, "host": "node-7", "since": "2025-01-01T00:00:00Z",
                             "boot": "00000000-0000-0000-0000-000000000000", "pidns": "pid:[4026531836]"})
        subprocess.run([sys.executable, "-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2])",
                        os.path.join(ckpt_root, ".pyckpt.lock"), holder], check=True, timeout=60)
        names = _leftovers(ckpt_root, dead_here)
        r = cli("gc", ckpt_root, "--json")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["removed"] == [] and not out["locked"], out
        assert "another PID namespace or machine" in out["note"], out
        assert set(names.values()) <= set(os.listdir(ckpt_root))
