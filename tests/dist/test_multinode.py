"""Multi-node jobs: pyckpt-run hands torchrun's multi-node options through, and two elastic agents on
this machine (two "nodes" joined by a c10d rendezvous on 127.0.0.1) restart and resume after one
node's worker is SIGKILLed, ending bitwise equal to a plain run. Real processes, gloo."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pyckpt import layout, manifest
from pyckpt.run import torchrun_argv

SCRIPT = Path(__file__).parents[2] / "examples" / "train_ddp_samples.py"


def test_multinode_options_reach_torchrun():
    _, restarts, argv = torchrun_argv(["--nnodes", "2", "--node-rank", "1", "--rdzv-backend", "c10d",
                                       "--rdzv-endpoint", "10.0.0.1:29400", "--rdzv-id", "job7", "--max-restarts",
                                       "4", "--nproc-per-node", "2", "train.py", "--nnodes", "9"])
    assert restarts == 4 and "--standalone" not in argv
    opts = argv[:argv.index("train.py")]
    for flag, value in (("--nnodes", "2"), ("--node-rank", "1"), ("--rdzv-backend", "c10d"),
                        ("--rdzv-endpoint", "10.0.0.1:29400"), ("--rdzv-id", "job7"), ("--max-restarts", "4"),
                        ("--nproc-per-node", "2")):
        assert opts[opts.index(flag) + 1] == value
    assert argv[argv.index("train.py"):] == ["train.py", "--nnodes", "9"]  # the script's own, untouched
    # --nnodes alone is a multi-node job too: --standalone (a private localhost rendezvous) would split it
    for args in (["--nnodes", "2", "t.py"], ["--nnodes=2:4", "t.py"], ["--rdzv-id", "x", "t.py"]):
        assert "--standalone" not in torchrun_argv(args)[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYCKPT_")}
    env.update({k: str(v) for k, v in extra.items()}, OMP_NUM_THREADS="1")
    return env


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _wait_for(path: Path, procs: list, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), f"no {path}"
        time.sleep(0.05)


@pytest.mark.dist
@pytest.mark.slow
def test_two_nodes_one_node_killed_restart_and_resume_exactly(tmp_path):
    """2 nodes x 1 worker, a pyckpt-run agent each, joined by a c10d rendezvous on 127.0.0.1. After
    step 9 (checkpoint 8 committed) the node running rank 1 loses its worker to SIGKILL: its agent
    restarts it, the other agent restarts its own for the membership change (restart counts now
    differ between the nodes), both resume from step 8 and end bitwise equal to an uninterrupted run."""
    plain = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            SCRIPT], env=_env(SAMPLES_LOG=tmp_path, RUN="plain"), capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr[-3000:]
    port = _free_port()
    env = _env(SAMPLES_LOG=tmp_path, RUN="mn", STOP_AT="9", STOP_RANK="1",
               STOP_AFTER=tmp_path / "ck" / layout.step_dir_name(8) / layout.MANIFEST)
    agents = []
    try:
        for node in range(2):
            with open(tmp_path / f"node{node}.err", "w") as err:
                agents.append(subprocess.Popen(
                    [sys.executable, "-m", "pyckpt.run", "--dir", tmp_path / "ck", "--every-steps", "2", "--keep", "20",
                     "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                     "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "pyckpt-mn", "--max-restarts", "2",
                     SCRIPT], env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path, process_group=0))
        _wait_for(tmp_path / "mn-1.stopped", agents)
        os.kill(int((tmp_path / "mn-1.stopped").read_text()), signal.SIGKILL)  # rank 1's node: its only worker
        rcs = [a.wait(240) for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                for pid in [a.pid, *_descendants(a.pid)]:  # wrapper, agent, workers (own sessions)
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                a.wait()
    errs = [(tmp_path / f"node{n}.err").read_text() for n in range(2)]
    assert rcs == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    both = errs[0] + errs[1]
    assert both.count("pyckpt: resumed from step 8 (epoch 1, batch 3)") == 1  # printed by rank 0
    assert torch_equal(torch.load(tmp_path / "mn-final.pt", weights_only=True),
                       torch.load(tmp_path / "plain-final.pt", weights_only=True))
    # Every committed checkpoint holds both ranks' parts, one written on each node (the all-ranks
    # commit rule), and the one being written when rank 1 died (step 10, if started) was not committed
    # by the surviving node alone before the resume chose step 8.
    for e in layout.committed(str(tmp_path / "ck")):
        m = manifest.read_manifest(e.path)
        assert m["world_size"] == 2 and [p["rank"] for p in m["parts"]] == [0, 1]
        assert all((Path(e.path) / layout.part_name(r)).exists() for r in range(2))


def torch_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(torch_equal(x, y) for x, y in zip(a, b))
    return a == b
