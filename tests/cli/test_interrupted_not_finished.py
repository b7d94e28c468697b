"""A run interrupted by SIGINT whose code catches the KeyboardInterrupt and ends normally is not finished
(pyckpt/finish.py). torch.multiprocessing.spawn's wrapper catches it in every child, and the kernel sends the
children SIGINT when their launcher dies: such a DDP job, its launcher killed (by the OOM killer, ``kill -9``) or
stopped with Ctrl-C, was marked finished, and its relaunch trained nothing ("already finished", exit status 0).
So was a script that stops early on Ctrl-C (``except KeyboardInterrupt: print("Exiting from training early")``, as
PyTorch's word_language_model example does)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

SPAWNED = r'''
import os, signal, sys, time
import torch, torch.distributed as dist, torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler


def worker(rank, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=rank)
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    model = nn.parallel.DistributedDataParallel(nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = 0
    sampler = DistributedSampler(data)
    for epoch in range(int(os.environ["EPOCHS"])):
        sampler.set_epoch(epoch)
        for x, y in DataLoader(data, batch_size=4, sampler=sampler):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            step += 1
            if rank == 0 and step == 10 and not os.path.exists("mark"):
                open("mark", "w").close()
                os.kill(os.getppid(), signal.SIGKILL)  # the launcher dies (the children get SIGINT)
                time.sleep(30)
    dist.destroy_process_group()


if __name__ == "__main__":
    import socket
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    mp.spawn(worker, args=(port,), nprocs=2)
    print("TRAINED", flush=True)
'''

CAUGHT = r'''
import os, signal
import torch
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(0)
model = torch.nn.Linear(3, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
step = 0
try:
    for epoch in range(4):
        for x, y in DataLoader(TensorDataset(torch.randn(16, 3), torch.randn(16, 1)), batch_size=4):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
            step += 1
            if step == 6 and not os.path.exists("mark"):
                open("mark", "w").close()
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
except KeyboardInterrupt:
    print("Exiting from training early", flush=True)
print("END", step, flush=True)
'''


def _run(tmp_path, text: str, **env: str) -> subprocess.CompletedProcess:
    """``python train.py`` in a new interpreter with SIGINT at its default (a background job of a shell, as the
    test suite may be, starts with SIGINT ignored, and Python keeps it so)."""
    (tmp_path / "train.py").write_text(text)
    full = {k: v for k, v in os.environ.items() if not k.startswith("PYCKPT_")}
    full.update(PYCKPT_DIR=str(tmp_path / "ck"), PYCKPT_EVERY_STEPS="2", **env)
    return subprocess.run([sys.executable, "train.py"], cwd=tmp_path, env=full, capture_output=True, text=True,
                          timeout=240, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _relaunched_resumes(tmp_path, text: str, **env: str) -> None:
    again = _run(tmp_path, text, **env)
    assert again.returncode == 0, again.stderr
    assert "already finished" not in again.stderr and "pyckpt: resumed from step" in again.stderr, again.stderr
    marker = json.loads((tmp_path / "ck" / "FINISHED.json").read_text())  # finished now, at its real end
    assert marker["finished"] is True and marker["steps"] == 16, marker


def test_a_spawned_ddp_job_whose_launcher_died_is_not_marked_finished(tmp_path):
    first = _run(tmp_path, SPAWNED, EPOCHS="4")
    assert first.returncode == -signal.SIGKILL, first.stderr
    said = [ln for ln in first.stderr.splitlines() if "is not marked finished" in ln]
    assert not (tmp_path / "ck" / "FINISHED.json").exists(), first.stderr
    assert len(said) == 1 and ("the process that started it is gone" in said[0] or "(SIGINT)" in said[0]), said
    _relaunched_resumes(tmp_path, SPAWNED, EPOCHS="4")


def test_a_script_that_stops_early_on_ctrl_c_is_not_marked_finished(tmp_path):
    first = _run(tmp_path, CAUGHT)
    assert first.returncode == 0 and "Exiting from training early" in first.stdout, first.stderr
    assert not (tmp_path / "ck" / "FINISHED.json").exists(), first.stderr
    said = [ln for ln in first.stderr.splitlines() if ln.startswith("pyckpt:") and "not marked finished" in ln]
    assert said == [f"pyckpt: warning: {tmp_path / 'ck'} is not marked finished: it was interrupted (SIGINT) at step 6; "
                     "a relaunch resumes from its newest checkpoint"], first.stderr
    _relaunched_resumes(tmp_path, CAUGHT)
