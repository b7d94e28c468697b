"""The process exits promptly, with the status it would have without pyckpt, while DataLoader workers live.

Transparent mode makes loader workers ignore SIGTERM (a preemption signal to the whole process group
must not kill them before the snapshot). At interpreter exit multiprocessing terminates daemonic
children with SIGTERM and joins them; workers that ignore it would make every exit with live workers
(an uncaught exception in the loop, a pyckpt refusal at the restore point, a finished script whose
persistent workers are still up) hang forever. Every run here is a real subprocess in its own session,
killed with its whole group if it does not end within the bound.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from transparent_helpers import clean_env

BOUND_S = 90  # far above a normal run (a few seconds); a hang is caught, never waited out

SCRIPT = """
import os, signal, sys, torch
from torch.utils.data import DataLoader, Dataset

class DS(Dataset):
    def __len__(self): return 40
    def __getitem__(self, i):
        if os.environ.get("RAISE_AT") and i >= 4 * int(os.environ["RAISE_AT"]):
            raise ValueError("dataset bug at sample %d" % i)
        return torch.tensor([float(i)])

torch.manual_seed(0)
model = torch.nn.Linear(1, 1)
opt = (torch.optim.SGD(model.parameters(), lr=0.1) if os.environ.get("OPT") == "sgd"
       else torch.optim.Adam(model.parameters(), lr=0.1))
loader = DataLoader(DS(), batch_size=4, num_workers=2, persistent_workers=bool(os.environ.get("PERSIST")))
step = 0
for epoch in range(2):
    for x in loader:
        opt.zero_grad(); model(x).sum().backward(); opt.step(); step += 1
        if str(step) == os.environ.get("KILL_AT") and not os.path.exists("mark"):
            open("mark", "w").close(); os.kill(os.getpid(), signal.SIGKILL)
held = iter(loader)  # workers alive at exit
next(held)
print("TRAINED", step, flush=True)
"""


def _run(tmp_path, **env: str) -> subprocess.CompletedProcess:
    """Run SCRIPT in a new session; on a hang kill the whole group and fail."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    p = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=clean_env(**env), text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = p.communicate(timeout=BOUND_S)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"still running after {BOUND_S} s (hang at exit?):\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def test_dataset_error_with_live_workers_exits_with_status_1(tmp_path):
    plain = _run(tmp_path, RAISE_AT="3")
    assert plain.returncode == 1 and "ValueError: dataset bug" in plain.stderr, plain.stderr[-2000:]
    under = _run(tmp_path, RAISE_AT="3", PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="1")
    assert under.returncode == plain.returncode, under.stderr[-3000:]
    assert "ValueError: dataset bug" in under.stderr
    assert "pyckpt: checkpointing to" in under.stderr  # transparent mode really was on


def test_normal_exit_with_live_persistent_workers_exits_0(tmp_path):
    r = _run(tmp_path, PERSIST="1", PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "TRAINED 20" in r.stdout


def test_changed_optimizer_class_is_one_line_at_the_restore_point_and_exits(tmp_path):
    """A pyckpt refusal raised at the restore point (workers of the fast-forwarded loader alive) ends
    the process promptly with one line naming both classes, not a KeyError traceback."""
    env = dict(PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="3", KILL_AT="7")
    first = _run(tmp_path, **env)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    second = _run(tmp_path, OPT="sgd", **env)
    assert second.returncode == 2, second.stderr[-3000:]
    lines = [ln for ln in second.stderr.splitlines() if "Adam" in ln and "SGD" in ln]
    assert len(lines) == 1 and lines[0].startswith("pyckpt: ") and "PYCKPT_RESUME=never" in lines[0], second.stderr
    assert "Traceback" not in second.stderr and "KeyError" not in second.stderr
    assert "TRAINED" not in second.stdout


PREEMPTED = """
import os, time, torch
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0)
model = torch.nn.Linear(2, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
loader = DataLoader(TensorDataset(torch.randn(64, 2)), batch_size=2, num_workers=2)
step = 0
for epoch in range(1000):
    for (x,) in loader:
        opt.zero_grad(); model(x).sum().backward(); opt.step(); step += 1
        if step == 5:
            open("ready", "w").close()
        time.sleep(0.01)
"""


def test_sigterm_to_the_process_group_still_snapshots_then_exits_by_the_signal(tmp_path):
    """The reason workers ignore SIGTERM still holds: a preemption signal to the whole group (workers
    included) leads to a checkpoint and an exit by SIGTERM, not a crash at the next fetch."""
    from pyckpt import layout

    (tmp_path / "train.py").write_text(PREEMPTED)
    env = clean_env(PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="100000")
    p = subprocess.Popen([sys.executable, "train.py"], cwd=tmp_path, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        for _ in range(BOUND_S * 10):
            if (tmp_path / "ready").exists() or p.poll() is not None:
                break
            time.sleep(0.1)
        assert (tmp_path / "ready").exists(), p.communicate()[1][-3000:]
        os.killpg(p.pid, signal.SIGTERM)
        _, err = p.communicate(timeout=BOUND_S)
    except BaseException:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    assert p.returncode == -signal.SIGTERM, err[-3000:]
    assert "DataLoader worker" not in err, err[-3000:]
    assert [d.name for d in (tmp_path / "ck").iterdir() if layout.is_checkpoint_dir(str(d))], err[-3000:]
