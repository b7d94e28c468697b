"""The finished-run marker of transparent mode (pyckpt/finish.py): written at a normal exit only; a
relaunch of a finished run stops with one line; PYCKPT_RESUME=never trains again."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

import zygote

SCRIPT = """
import os, sys, torch
from torch.utils.data import DataLoader, TensorDataset
if os.environ.get("FULL_AT"):  # storage refuses the checkpoint of that step (a full disk)
    from pyckpt import checkpointer, layout
    real = checkpointer.Checkpointer._start
    def _start(self, engine, plan, tmp):
        if os.path.basename(tmp).startswith(layout.step_dir_name(int(os.environ["FULL_AT"]))):
            return None, OSError(28, "No space left on device")
        return real(self, engine, plan, tmp)
    checkpointer.Checkpointer._start = _start
torch.manual_seed(0)
model = torch.nn.Linear(3, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for x, y in DataLoader(TensorDataset(torch.randn(16, 3), torch.randn(16, 1)), batch_size=4):
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
print("TRAINED", flush=True)
if os.environ.get("END") == "exit3":
    sys.exit(3)
if os.environ.get("END") == "raise":
    raise RuntimeError("evaluation failed")
"""


def _run(tmp_path, root, name: str = "train.py", **env) -> subprocess.CompletedProcess:
    """SCRIPT as ``python train.py`` (or ``name``) runs it, in a process forked by the session's zygote (pyckpt's
    start-up line run first, as an interpreter's start-up runs it; its exit runs atexit as one does)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("PYCKPT_")}
    full.update({"PYCKPT_DIR": str(root), "PYCKPT_EVERY_STEPS": "3", **env})
    script = tmp_path / name
    script.write_text(SCRIPT)
    child = zygote.shared().run_path(script, env=full, cwd=tmp_path, timeout=120, startup=True)
    return subprocess.CompletedProcess([script], child.returncode, child.stdout, child.stderr)


def test_failed_runs_leave_no_marker(tmp_path):
    for end in ("exit3", "raise"):
        root = tmp_path / end
        r = _run(tmp_path, root, END=end)
        assert r.returncode in (1, 3) and "TRAINED" in r.stdout, r.stderr[-2000:]
        assert (root / "latest").exists() and not (root / "FINISHED.json").exists(), end


def test_finished_run_is_marked_and_its_relaunch_stops_with_one_line(tmp_path, capsys):
    from pyckpt import cli

    root = tmp_path / "ck"
    r = _run(tmp_path, root)
    assert r.returncode == 0 and "TRAINED" in r.stdout, r.stderr[-2000:]
    marker = json.loads((root / "FINISHED.json").read_text())
    assert marker["finished"] is True and marker["steps"] == 4 and marker["step"] == 3
    assert marker["last_checkpoint_ok"] is True
    assert cli.main(["ls", str(root)]) == 0 and "run finished at step 3" in capsys.readouterr().out

    again = _run(tmp_path, root)
    assert again.returncode == 0 and "TRAINED" not in again.stdout
    lines = again.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pyckpt: the run in {root} already finished (4 steps, last "
                                                   "checkpoint at step 3"), again.stderr
    assert "PYCKPT_RESUME=never trains from scratch" in lines[0]

    fresh = _run(tmp_path, root, PYCKPT_RESUME="never")  # trains from scratch, and is marked again
    assert fresh.returncode == 0 and "TRAINED" in fresh.stdout, fresh.stderr[-2000:]
    assert json.loads((root / "FINISHED.json").read_text())["time"] > marker["time"]


def test_a_resumed_run_that_takes_no_snapshot_names_the_checkpoint_it_resumed_from(tmp_path):
    """4 steps, a snapshot every 3: the relaunch from step 3 trains step 4 and ends with no snapshot of
    its own. Its marker names step 3, which the root holds (it named none: "finished with no checkpoint")."""
    from pyckpt import layout

    root = tmp_path / "ck"
    assert _run(tmp_path, root).returncode == 0
    again = _run(tmp_path, root, PYCKPT_RESUME=str(root / layout.step_dir_name(3)))
    assert again.returncode == 0 and "pyckpt: resumed from step 3" in again.stderr, again.stderr[-2000:]
    assert [e.step for e in layout.committed(str(root))] == [3]
    marker = json.loads((root / "FINISHED.json").read_text())
    assert marker["step"] == 3 and marker["steps"] == 4 and marker["last_checkpoint_ok"] is True, marker


def test_a_failed_last_checkpoint_is_not_named_by_the_marker(tmp_path, capsys):
    """Snapshots at steps 2 and 4; storage refuses step 4's. The marker names step 2, the newest
    checkpoint the root holds (it named the failed step 4), and says the last one failed."""
    from pyckpt import cli, layout

    root = tmp_path / "ck"
    r = _run(tmp_path, root, PYCKPT_EVERY_STEPS="2", FULL_AT="4")
    assert r.returncode == 0 and "TRAINED" in r.stdout, r.stderr[-2000:]
    assert "pyckpt: checkpoint of step 4 failed" in r.stderr, r.stderr
    assert [e.step for e in layout.committed(str(root))] == [2]
    marker = json.loads((root / "FINISHED.json").read_text())
    assert marker["step"] == 2 and marker["steps"] == 4 and marker["last_checkpoint_ok"] is False, marker
    assert cli.main(["ls", str(root)]) == 0 and "run finished at step 2" in capsys.readouterr().out

    shutil.rmtree(root)  # no checkpoint at all: the marker names none
    r = _run(tmp_path, root, PYCKPT_EVERY_STEPS="4", FULL_AT="4")
    assert r.returncode == 0 and layout.committed(str(root)) == [], r.stderr[-2000:]
    assert json.loads((root / "FINISHED.json").read_text())["step"] is None
    assert cli.main(["ls", str(root)]) == 0 and "run finished with no checkpoint" in capsys.readouterr().out


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm on this machine")
@pytest.mark.parametrize("resume", ["auto", "never"])
def test_marker_names_a_snapshot_storage_holds_when_the_last_was_only_in_memory(tmp_path, resume):
    """With the memory tier and PYCKPT_STORAGE_EVERY=2 the run's one snapshot (step 3) is kept only in
    /dev/shm, which a normal end removes. The marker must name a checkpoint in storage: the snapshot
    is written there first. ``auto`` opens the tier before the marker's exit handler is installed,
    ``never`` after it (exit handlers run last-registered first): both orders keep it."""
    from pyckpt import layout, shm_tier

    root = tmp_path / "ck"
    shm = shm_tier.shm_path(str(root))
    try:
        r = _run(tmp_path, root, PYCKPT_SHM_MB="16", PYCKPT_STORAGE_EVERY="2", PYCKPT_RESUME=resume)
        assert r.returncode == 0 and "TRAINED" in r.stdout, r.stderr[-2000:]
        marker = json.loads((root / "FINISHED.json").read_text())
        assert marker["step"] == 3 and marker["last_checkpoint_ok"] is True, marker
        assert [e.step for e in layout.committed(str(root))] == [3]
        assert not os.path.exists(shm)
    finally:
        shutil.rmtree(shm, ignore_errors=True)


@pytest.mark.parametrize("garbled", [{"time": 1e300}, {"time": "yesterday", "step": 1e400, "steps": "x"},
                                     {"step": -3, "steps": True, "last_checkpoint_ok": "no"}, {"time": None},
                                     {"script": "../other.py"}, {"script": 7}, {"script": "x\x1b[2J.py"}])
def test_a_marker_with_fields_of_the_wrong_kind_shows_them_unknown(tmp_path, capsys, garbled):
    """FINISHED.json lies in the checkpoint directory: its fields are checked like the rest. A time of
    1e300 made the relaunch's first iter() and `pyckpt ls` die with OverflowError (timestamp out of
    range); an infinite step printed "at step inf"."""
    from pyckpt import catalog, cli

    root = tmp_path / "ck"
    r = _run(tmp_path, root)
    assert r.returncode == 0, r.stderr[-2000:]
    marker = json.loads((root / "FINISHED.json").read_text())
    marker.update(garbled)
    (root / "FINISHED.json").write_text(json.dumps(marker))
    kept = {k: v for k, v in marker.items() if k not in garbled or v is None}  # (None: no value, kept)
    assert catalog.is_finished(root) == kept
    assert cli.main(["ls", str(root)]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("run finished")]
    expect_step = "at step ?" if "step" in garbled else f"at step {marker['step']}"
    assert len(line) == 1 and expect_step in line[0] and ("time unknown" in line[0]) == ("time" in garbled), line
    again = _run(tmp_path, root)  # the relaunch still stops, saying what it knows
    assert again.returncode == 0 and "TRAINED" not in again.stdout and "Traceback" not in again.stderr, \
        again.stderr[-2000:]
    assert "already finished" in again.stderr and ("earlier" in again.stderr) == ("time" in garbled)


def test_another_script_on_a_finished_runs_directory_is_refused_not_skipped(tmp_path):
    """A job script that runs pre-training and then fine-tuning with one PYCKPT_DIR exported: the second script
    met the first one's marker, printed "already finished; not training it again" and exited 0, so the job
    went on without a fine-tuned model. The marker records the script; another script is refused (exit 2)
    with one line naming both, and the marker and checkpoints are left as they were."""
    root = tmp_path / "ck"
    r = _run(tmp_path, root, name="pretrain.py")
    assert r.returncode == 0 and "TRAINED" in r.stdout, r.stderr[-2000:]
    marker = (root / "FINISHED.json").read_text()
    assert json.loads(marker)["script"] == "pretrain.py"
    other = _run(tmp_path, root, name="finetune.py")
    assert other.returncode == 2 and "TRAINED" not in other.stdout, other.stderr
    lines = other.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pyckpt: cannot resume: the run in {root} is pretrain.py's and "
                                                   "finished (4 steps"), lines
    assert "this is finetune.py" in lines[0] and "use another PYCKPT_DIR for finetune.py" in lines[0], lines
    assert (root / "FINISHED.json").read_text() == marker
    same = _run(tmp_path, root, name="pretrain.py")  # the same script's relaunch: stops as before
    assert same.returncode == 0 and "already finished" in same.stderr and "TRAINED" not in same.stdout
    fresh = _run(tmp_path, root, name="finetune.py", PYCKPT_RESUME="never")  # the way on it names
    assert fresh.returncode == 0 and "TRAINED" in fresh.stdout, fresh.stderr[-2000:]
    assert json.loads((root / "FINISHED.json").read_text())["script"] == "finetune.py"
