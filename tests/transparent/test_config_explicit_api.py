"""Issue 7 item 3: a bare ``import pyckpt`` must never resume behind a script that checkpoints itself.

Every test runs the script as a real subprocess; the script SIGTERMs itself
in the middle of epoch 1 once, and is launched again. A script with its own
``Checkpointer`` resume must then train exactly its remaining epochs.
"""
from __future__ import annotations

import functools

import pytest

import transparent_helpers

# These scripts use pyckpt by `import pyckpt` (explicit API, late imports): a new interpreter each, where that import runs.
run_script = functools.partial(transparent_helpers.run_script, fresh=True)

BATCHES, EPOCHS = 4, 3
STAND_DOWN = "transparent checkpointing is off"

SCRIPT = '''\
import os, signal, sys
import pyckpt
import torch
from torch.utils.data import DataLoader, TensorDataset
{maker_import}
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
loader = DataLoader(TensorDataset(torch.randn(16, 4), torch.randn(16, 1)), batch_size=4, shuffle=True)
ckpt = {maker}(sys.argv[1])
start = 0
if ckpt.latest() is not None:
    restored = ckpt.restore()
    model.load_state_dict(restored.state["model"])
    start = restored.step + 1
for epoch in range(start, {epochs}):
    for i, (x, y) in enumerate(loader):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        print("STEP", epoch, i, flush=True)
        if (epoch, i) == (1, 1) and not os.path.exists(os.environ["MARK"]):
            open(os.environ["MARK"], "w").close()
            os.kill(os.getpid(), signal.SIGTERM)
    ckpt.save(epoch, {{"model": model.state_dict()}}).result()
ckpt.close()
print("DONE", flush=True)
'''

HELPER = "import pyckpt\n\ndef make(path):\n    return pyckpt.Checkpointer(path, keep=5)\n"


def _write(tmp_path, where: str) -> None:
    if where == "main":  # found by reading the main script's source, before anything runs
        text = SCRIPT.format(maker_import="", maker="pyckpt.Checkpointer", epochs=EPOCHS)
    else:  # the main script never names the explicit API: found when the Checkpointer is built
        (tmp_path / "mytrainer.py").write_text(HELPER)
        text = SCRIPT.format(maker_import="import mytrainer", maker="mytrainer.make", epochs=EPOCHS)
    (tmp_path / "train.py").write_text(text)


def _steps(stdout: str) -> list[tuple[int, int]]:
    return [tuple(map(int, line.split()[1:])) for line in stdout.splitlines() if line.startswith("STEP ")]


@pytest.mark.parametrize("where", ["main", "helper_module"])
def test_own_checkpointer_resume_trains_the_remaining_epochs_after_sigterm(tmp_path, where):
    _write(tmp_path, where)
    # The stand-down line is a debug line: an explicit-API script is not told about a mode it never used.
    env = dict(MARK=tmp_path / "mark", PYCKPT_LOG="debug")
    first = run_script(["train.py", tmp_path / "own"], tmp_path, **env)
    assert first.returncode == -15, first.stderr[-2000:]  # SIGTERM acted as without pyckpt: at once
    assert _steps(first.stdout) == [(0, i) for i in range(BATCHES)] + [(1, 0), (1, 1)]
    second = run_script(["train.py", tmp_path / "own"], tmp_path, **env)
    assert second.returncode == 0, second.stderr[-2000:]
    # The script's own resume (epoch 0 saved) decides: epochs 1 and 2 run in full.
    assert _steps(second.stdout) == [(e, i) for e in (1, 2) for i in range(BATCHES)], second.stderr
    assert second.stdout.rstrip().endswith("DONE")
    for run in (first, second):
        lines = [ln for ln in run.stderr.splitlines() if STAND_DOWN in ln]
        assert len(lines) == 1 and lines[0].startswith("pyckpt: this script uses pyckpt's explicit API "
                                                       "(Checkpointer)"), run.stderr
    assert not (tmp_path / "pyckpt-checkpoints").exists()


def test_explicit_activation_stays_on_with_one_warning(tmp_path):
    """PYCKPT_DIR is an explicit request: both run, and the user is told once."""
    _write(tmp_path, "helper_module")
    r = run_script(["train.py", tmp_path / "own"], tmp_path, MARK=tmp_path / "mark", PYCKPT_DIR=tmp_path / "tck",
                   PYCKPT_EVERY_STEPS="2")
    assert r.returncode != 0  # pyckpt's SIGTERM handler snapshots, then the process dies by SIGTERM
    assert STAND_DOWN not in r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if "explicit API (Checkpointer)" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("pyckpt: warning:") and "PYCKPT_DIR" in warnings[0]
    assert (tmp_path / "tck").is_dir() and any(p.name.startswith("step-") for p in (tmp_path / "tck").iterdir())


def test_main_script_source_scan_names_the_api(tmp_path, monkeypatch):
    import sys
    import types

    from pyckpt import activation

    cases = {
        "import pyckpt\npyckpt.save({}, 'x')\n": "save",
        "import pyckpt as pc\nck = pc.Checkpointer('d')\n": "Checkpointer",
        "from pyckpt import load\n": "load",
        "from pyckpt.checkpointer import Checkpointer\n": "Checkpointer",
        "import pyckpt\npyckpt.register('x', getter=int, setter=print)\n": None,
        "import pyckpt\nsave = 1\nother.load()\n": None,
    }
    for i, (src, want) in enumerate(cases.items()):
        path = tmp_path / f"m{i}.py"
        path.write_text(src)
        monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__file__=str(path)))
        assert activation.main_script_explicit_api() == want, src


def test_late_explicit_use_from_a_helper_module_turns_it_off_with_a_warning(tmp_path):
    (tmp_path / "mytrainer.py").write_text(HELPER)
    (tmp_path / "train.py").write_text(
        "import pyckpt, torch, mytrainer\n"
        "for _ in torch.utils.data.DataLoader(range(4)):\n    pass\n"
        "print('ACTIVE', pyckpt.activation.active())\n"
        "mytrainer.make('own').close()\n"
        "print('ACTIVE', pyckpt.activation.active())\n")
    r = run_script(["train.py"], tmp_path)
    assert r.returncode == 0 and r.stdout.split() == ["ACTIVE", "True", "ACTIVE", "False"], r.stderr
    lines = [ln for ln in r.stderr.splitlines() if STAND_DOWN in ln]
    assert len(lines) == 1 and lines[0].startswith("pyckpt: warning: this script uses pyckpt's explicit API") \
        and "already started" in lines[0], r.stderr
