"""StoreCoordinator across two real processes in a gloo process group."""
import fcntl
import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.dist


def _worker(rank, world, tmp):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        from pyckpt.coord import StoreCoordinator, default_coordinator

        c = StoreCoordinator(timeout_s=60)
        out = {"default_is_store": isinstance(default_coordinator(), StoreCoordinator)}
        out["gather"] = [c.all_gather_json({"rank": rank, "i": i}, "g") for i in range(3)]
        out["bcast"] = c.broadcast_json({"token": f"tok{rank}"}, "b")
        # Store traffic on a background thread while the main thread runs a real collective.
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("bg", c.all_gather_json(rank * 10, "bg")))
        t.start()
        import torch

        x = torch.tensor([rank + 1.0])
        dist.all_reduce(x)
        t.join(60)
        out["bg"], out["allreduce"] = box.get("bg"), x.item()
        c.barrier("end")
        with open(f"{tmp}/out{rank}.json", "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def test_store_coordinator_two_processes(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        out = json.loads((tmp_path / f"out{rank}.json").read_text())
        assert out["default_is_store"] is True
        assert out["gather"] == [[{"rank": 0, "i": i}, {"rank": 1, "i": i}] for i in range(3)]
        assert out["bcast"] == {"token": "tok0"}
        assert out["bg"] == [0, 10]
        assert out["allreduce"] == 3.0


def test_a_lost_rank_ends_the_wait_a_slow_one_does_not(monkeypatch):
    """In one process over a HashStore. A rank that is late but alive (its heartbeat moves) is waited
    for. A rank whose heartbeat stalls longer than dead_after_s is given up for, and when it arrives
    after all it fails that same operation too (the outcome is agreed), so the next operation pairs up
    again. A rank that is gone (its coordinator dropped, as when its node is lost) ends rank 0's wait
    with RankLostError naming it, not at the 1800 s timeout."""
    import gc
    import time

    from pyckpt import coord
    from pyckpt.coord import RankLostError, StoreCoordinator

    # Faster than the defaults (0.5 s beats and looks, 5 s), with a margin of 8 missed beats.
    monkeypatch.setattr(coord, "HEARTBEAT_S", 0.1)
    monkeypatch.setattr(coord, "_LOOK_AFTER_S", 0.1)
    store = dist.HashStore()
    c0 = StoreCoordinator(store, 0, 2, prefix="p")
    ranks = {1: StoreCoordinator(store, 1, 2, prefix="p")}  # dropped below: the only reference
    c0.dead_after_s = 0.8

    def later(delay, obj):
        box = {}

        def run():
            try:
                box["out"] = ranks[1].all_gather_json(obj, "g")
            except RankLostError as e:
                box["out"] = str(e)

        t = threading.Timer(delay, run)
        t.start()
        return t, box

    t, box = later(1.6, "late")
    assert c0.all_gather_json("on time", "g") == ["on time", "late"]  # 1.6 s > dead_after_s: its counter moved
    t.join()

    lost = "rank 1 is gone: its heartbeat stopped more than 0.8 s ago while rank 0 waited for it at p/g/1"
    monkeypatch.setattr(coord, "HEARTBEAT_S", 2.5)  # rank 1's heartbeat stalls (a long GIL hold)
    time.sleep(0.15)  # its thread is in its next, long sleep
    t, box = later(1.8, "stalled")
    with pytest.raises(RankLostError, match=re.escape(lost)):
        c0.all_gather_json("op 1", "g")
    t.join()
    assert box["out"] == lost  # it arrived after all: the same operation failed there too
    monkeypatch.setattr(coord, "HEARTBEAT_S", 0.1)
    t, box = later(0.05, "op 2")
    assert c0.all_gather_json("op 2", "g") == ["op 2", "op 2"]  # both on op 2 again
    t.join()

    ranks.clear()  # (its heartbeat thread ends when it next wakes; the counter stands still from now)
    gc.collect()
    with pytest.raises(RankLostError, match=re.escape(lost.replace("p/g/1", "p/g/3"))):
        c0.all_gather_json("alone", "g")


# A process whose heartbeat's store call is held (a file lock on its FileStore) until the interpreter
# is finalizing: SlowAtFinalization.__del__ runs then, as module globals are cleared.
_HELD_AT_EXIT = """
import sys, time
import torch.distributed as dist
from pyckpt.coord import HEARTBEAT_S, StoreCoordinator

store = dist.FileStore(sys.argv[1], 2)
coord = StoreCoordinator(store, rank=0, world_size=2)


class SlowAtFinalization:
    def __del__(self):
        time.sleep(1.5)


keep = SlowAtFinalization()
print("ready", flush=True)
time.sleep(HEARTBEAT_S + 0.3)  # the heartbeat's next store.add waits for the file lock now
print("exiting", flush=True)
"""


def _exit_with_store_call_held(tmp_path, hold_s: float) -> tuple[int, str]:
    """Run _HELD_AT_EXIT; hold its FileStore's lock from before its heartbeat's next call until
    ``hold_s`` after the child said it exits. Returns the child's exit status and stderr."""
    store_file = tmp_path / "store"
    child = subprocess.Popen([sys.executable, "-c", _HELD_AT_EXIT, str(store_file)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        fd = os.open(store_file, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)  # FileStore takes this lock around every operation
        try:
            assert child.stdout.readline().strip() == "exiting"
            time.sleep(hold_s)  # the child is exiting: its exit handlers, or already finalizing
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    return child.returncode, err


def test_a_heartbeat_call_in_flight_at_exit_does_not_abort_the_process(tmp_path):
    # The CI failure: a DDP job that trained to the end died with "terminate called without an
    # active exception" (exit -6) as it exited, because the heartbeat thread came back from a store
    # call (GIL released) while the interpreter was finalizing.
    code, err = _exit_with_store_call_held(tmp_path, 0.3)
    assert code == 0, err[-2000:]
    assert "terminate called" not in err
    assert "pyckpt:" not in err  # a call that returns within EXIT_JOIN_S is waited for quietly


def test_exit_waits_for_a_heartbeat_call_longer_than_the_quiet_wait_and_says_so(tmp_path):
    # A store call that outlasts the quiet wait (a lock holder descheduled on a loaded machine, a
    # slow store host) returned while the interpreter finalized and aborted the process.
    from pyckpt.coord import EXIT_JOIN_S

    code, err = _exit_with_store_call_held(tmp_path, EXIT_JOIN_S + 1.0)
    assert code == 0, err[-2000:]
    assert "terminate called" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("pyckpt:")]
    assert len(lines) == 1 and "exit waits" in lines[0] and "store" in lines[0], err[-2000:]
