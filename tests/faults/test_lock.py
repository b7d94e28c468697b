"""The directory lock: a second Checkpointer or job on one directory gets a clear error instead of
silently deleting or taking over the first one's checkpoints; a crashed holder never blocks."""
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

import pyckpt
from pyckpt.errors import PyckptError

HOLDER = textwrap.dedent("""
    import os, sys, time, pyckpt
    ck = pyckpt.Checkpointer(sys.argv[1])
    if sys.argv[2] == "fork":
        child = os.fork()
        if child == 0:  # like a DataLoader worker: inherits everything, outlives the parent briefly
            time.sleep(60)
            os._exit(0)
        print("WORKER", child, flush=True)
    print("READY", os.getpid(), flush=True)
    time.sleep(60)
""")


def env():
    return {k: v for k, v in os.environ.items() if not k.startswith("PYCKPT_")}


def start_holder(root, mode="plain"):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, root, mode], stdout=subprocess.PIPE, text=True, env=env())
    worker = None
    line = p.stdout.readline().split()
    if line and line[0] == "WORKER":
        worker = int(line[1])
        line = p.stdout.readline().split()
    assert line and line[0] == "READY", line
    return p, worker


def kill(p):
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    p.stdout.close()


def test_second_checkpointer_in_one_process_is_refused(ckpt_root):
    ck = pyckpt.Checkpointer(ckpt_root)
    with pytest.raises(PyckptError, match=f"already used by another Checkpointer in this process \\(pid {os.getpid()}"):
        pyckpt.Checkpointer(ckpt_root)
    with pytest.raises(PyckptError, match="already used"):  # the same directory by another spelling
        pyckpt.Checkpointer(os.path.join(ckpt_root, ".", "..", os.path.basename(ckpt_root)))
    ck.save(1, {"t": torch.ones(3)}).result(60)
    ck.close()
    with pytest.raises(PyckptError, match="closed"):
        ck.save(2, {"t": torch.ones(3)})
    with pyckpt.Checkpointer(ckpt_root) as again:  # released by close()
        assert again.latest().step == 1


def test_in_flight_save_survives_a_second_checkpointer(ckpt_root, knob_env):
    knob_env(PYCKPT_CHUNK_MB=1, PYCKPT_TEST_WRITE_DELAY_MS=100)
    ck = pyckpt.Checkpointer(ckpt_root)
    t = torch.arange(2_000_000, dtype=torch.float32)  # 8 chunks x 100 ms of writing
    fut = ck.save(1, {"t": t})
    assert not fut.done()
    with pytest.raises(PyckptError, match="already used"):
        pyckpt.Checkpointer(ckpt_root)  # used to garbage-collect the first one's tmp directory
    assert fut.result(60).endswith("step-000000001")
    assert torch.equal(ck.load()["t"], t)
    ck.close()


def test_second_job_is_refused_naming_the_holder_and_a_killed_holder_never_blocks(ckpt_root):
    p, _ = start_holder(ckpt_root)
    try:
        with pytest.raises(PyckptError) as ei:
            pyckpt.Checkpointer(ckpt_root)
        msg = str(ei.value)
        assert f"in use by pid {p.pid} on host {socket.gethostname()} since " in msg and "\n" not in msg
    finally:
        kill(p)
    with pyckpt.Checkpointer(ckpt_root) as ck:  # the kernel dropped the dead holder's lock
        assert ck.save(1, {"t": torch.ones(2)}).wait(60)


def test_forked_children_of_a_killed_holder_do_not_keep_the_lock(ckpt_root):
    # DataLoader workers live on for a few seconds after their trainer is killed; a relaunch in
    # that window must still get the directory.
    p, worker = start_holder(ckpt_root, "fork")
    try:
        kill(p)
        os.kill(worker, 0)  # still alive
        with pyckpt.Checkpointer(ckpt_root) as ck:
            assert ck.save(1, {"t": torch.ones(2)}).wait(60)
    finally:
        try:
            os.kill(worker, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_second_transparent_job_on_one_pyckpt_dir_stops_with_one_clear_line(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "transparent"))
    from transparent_helpers import TINY, run_script

    ckpt = tmp_path / "ckpt"
    with pyckpt.Checkpointer(ckpt) as ck:  # the first job
        ck.save(1, {"t": torch.ones(2)}).result(60)
        r = run_script([TINY, tmp_path / "out.pt"], tmp_path, PYCKPT_DIR=ckpt, PYCKPT_EVERY_STEPS="2")
        assert r.returncode != 0 and "TRAINED" not in r.stdout
        assert f"pyckpt: checkpoint directory {ckpt} is in use by pid {os.getpid()} on host" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert sorted(os.listdir(ckpt)) == [".pyckpt.lock", "latest", "metrics.jsonl", "step-000000001"]  # untouched
