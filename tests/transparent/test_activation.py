"""How transparent mode turns on, and how bad settings stop a job before training."""
from __future__ import annotations

import functools

import transparent_helpers

# Start-up itself is what these tests are about: every script runs in a new interpreter.
run_script = functools.partial(transparent_helpers.run_script, fresh=True)

PROBE = "import pyckpt\nprint('ACTIVE', pyckpt.activation.active())\n"
# Training starts at the first DataLoader iter(): the directory is created (and announced) only then.
TRAIN = "import torch\nfor _ in torch.utils.data.DataLoader(range(4)):\n    pass\n"


def test_bare_import_in_main_script_activates_with_default_directory(tmp_path):
    (tmp_path / "main.py").write_text(PROBE)
    r = run_script(["main.py"], tmp_path)
    assert "ACTIVE True" in r.stdout, r.stderr
    assert not (tmp_path / "pyckpt-checkpoints").exists()  # nothing trained: nothing created
    (tmp_path / "main.py").write_text(PROBE + TRAIN)
    r = run_script(["main.py"], tmp_path)
    assert "ACTIVE True" in r.stdout, r.stderr
    assert (tmp_path / "pyckpt-checkpoints").is_dir()
    assert f"pyckpt: checkpointing to {tmp_path / 'pyckpt-checkpoints'} every 600 s" in r.stderr


def test_import_from_a_library_module_does_not_activate(tmp_path):
    (tmp_path / "mylib.py").write_text("import pyckpt\n")
    (tmp_path / "main.py").write_text("import mylib\nimport pyckpt.activation as a\nprint('ACTIVE', a.active())\n")
    r = run_script(["main.py"], tmp_path)
    assert "ACTIVE False" in r.stdout, r.stderr
    assert not (tmp_path / "pyckpt-checkpoints").exists()


def test_disable_turns_import_mode_off(tmp_path):
    (tmp_path / "main.py").write_text(PROBE)
    r = run_script(["main.py"], tmp_path, PYCKPT_DISABLE="1")
    assert "ACTIVE False" in r.stdout, r.stderr


def test_environment_variable_activates_without_any_import(tmp_path):
    (tmp_path / "main.py").write_text("import sys\nprint('ACTIVE', 'pyckpt.activation' in sys.modules and "
                                      "sys.modules['pyckpt.activation'].active())\n")
    r = run_script(["main.py"], tmp_path, PYCKPT_DIR=tmp_path / "ck")
    assert "ACTIVE True" in r.stdout, r.stderr
    off = run_script(["main.py"], tmp_path)
    assert "ACTIVE False" in off.stdout


def _stops_before_training(tmp_path, script: str, **env):
    (tmp_path / "main.py").write_text(script + "print('TRAINING STARTED')\n")
    r = run_script(["main.py"], tmp_path, **env)
    assert r.returncode == 2
    assert "TRAINING STARTED" not in r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyckpt: ")
    return lines[0]


def test_malformed_setting_via_environment(tmp_path):
    # Reported when the process imports torch (a process that never does is not training: issue 7 item 14).
    line = _stops_before_training(tmp_path, "import torch\n", PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="abc")
    assert "PYCKPT_EVERY_STEPS" in line and "'abc'" in line and "integer" in line


def test_malformed_setting_via_import(tmp_path):
    line = _stops_before_training(tmp_path, "import pyckpt\n", PYCKPT_LOG="loud")
    assert "PYCKPT_LOG" in line and "info" in line and "quiet" in line


def test_unwritable_directory(tmp_path):
    (tmp_path / "afile").write_text("")
    line = _stops_before_training(tmp_path, TRAIN, PYCKPT_DIR=tmp_path / "afile" / "ck")
    assert "not writable" in line and "afile" in line


def test_environment_variable_activates_when_a_pyckpt_module_imports_torch_first(tmp_path):
    """PYCKPT_DIR waits for torch; when the script's first import is a pyckpt module that itself imports
    torch, the hooks are installed once that module has finished (its names are defined), not in the
    middle of it (before: ImportError of a partially initialized module, transparent mode off)."""
    for first in ("import pyckpt.dtypes", "import pyckpt.manifest", "from pyckpt import resume"):
        (tmp_path / "main.py").write_text(f"{first}\nimport pyckpt.activation as a\nprint('ACTIVE', a.active())\n"
                                          + TRAIN)
        r = run_script(["main.py"], tmp_path, PYCKPT_DIR=tmp_path / "ck")
        assert r.returncode == 0 and "ACTIVE True" in r.stdout, (first, r.stderr)
        assert "warning" not in r.stderr, (first, r.stderr)
        assert f"pyckpt: checkpointing to {tmp_path / 'ck'}" in r.stderr, (first, r.stderr)


BACKWARD_WRAPPER = """
import torch
torch.manual_seed(0)
def who():
    return torch.autograd.backward.__module__
print("BEFORE", who())
if LIBRARY_WRAPS:
    inner = torch.autograd.backward
    torch.autograd.backward = lambda *a, **k: inner(*a, **k)  # a library's wrapper over pyckpt's
m = torch.nn.Linear(2, 1)
opt = torch.optim.SGD(m.parameters(), lr=0.1)
for x in torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=2):
    opt.zero_grad()
    m(x).sum().backward()
    opt.step()
    print("STEP", who())
print("WEIGHT", m.weight.sum().item())
"""


def test_the_backward_wrapper_is_taken_away_once_an_optimizer_counts_the_steps(tmp_path):
    # It counts steps only while no optimizer has stepped (weights updated by hand) and costs microseconds at
    # every step after: torch's own backward() is put back, not a library's wrapper made over pyckpt's.
    weights = set()
    for wraps in (False, True):
        (tmp_path / "main.py").write_text(f"LIBRARY_WRAPS = {wraps}\n" + BACKWARD_WRAPPER)
        r = run_script(["main.py"], tmp_path, PYCKPT_DIR=str(tmp_path / f"ck{wraps}"), PYCKPT_EVERY="2")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.split("\n")
        assert lines[0] == "BEFORE pyckpt.transparent", r.stdout
        assert lines[1:5] == [f"STEP {'__main__' if wraps else 'torch.autograd'}"] * 4, r.stdout
        weights.add(lines[5])
        assert len(list((tmp_path / f"ck{wraps}").glob("step-*"))) >= 1, r.stderr  # the steps were counted
    assert len(weights) == 1


SPAWNED = r'''
import os, sys
import torch, torch.distributed as dist, torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler


def worker(rank, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=rank)
    data = TensorDataset(torch.randn(16, 4), torch.randn(16, 1))
    model = nn.parallel.DistributedDataParallel(nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in DataLoader(data, batch_size=4, sampler=DistributedSampler(data)):
        opt.zero_grad(); ((model(x) - y) ** 2).mean().backward(); opt.step()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(int(sys.argv[1]),), nprocs=2)
'''


def test_ranks_started_by_mp_spawn_print_the_start_up_line_once(tmp_path):
    """``torch.multiprocessing.spawn`` sets no RANK: each rank learns its rank from init_process_group. Every
    rank used to print the start-up line (eight lines on an eight-GPU node), and the finished run's relaunch
    line too; rank 0 of the process group prints them now."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "main.py").write_text(SPAWNED)
    env = dict(PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="1")
    r = run_script(["main.py", str(port)], tmp_path, timeout=240, **env)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("pyckpt: checkpointing to") == 1, r.stderr
    again = run_script(["main.py", str(port)], tmp_path, timeout=240, **env)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("already finished") == 1, again.stderr
