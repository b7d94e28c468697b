"""tests/forked.py: ``python script.py`` runs forked from the zygote behave as new interpreters do."""
import signal
import sys
import time
from pathlib import Path

import forked
import zygote
from forked import _harness

SINGLE = Path(__file__).resolve().parents[1] / "examples" / "train_single.py"


def test_only_plain_script_commands_are_forked(tmp_path):
    importing, from_import = tmp_path / "importing.py", tmp_path / "from_import.py"
    importing.write_text("import os\nimport pyckpt\nprint('on')\n")
    from_import.write_text("import torch\nfrom pyckpt import register  # on\n")
    assert forked.forkable([sys.executable, str(SINGLE), "--out", "x"])
    assert not forked.forkable([sys.executable, "-m", "torch.distributed.run", str(SINGLE)])
    assert not forked.forkable([sys.executable, "-c", "print(1)"])
    assert not forked.forkable(["/bin/echo", str(SINGLE)])
    # `import pyckpt` turns transparent mode on in a new interpreter only (the zygote imported it already).
    assert not forked.forkable([sys.executable, str(importing)])
    assert not forked.forkable([sys.executable, str(from_import)])
    assert not forked.forkable([sys.executable, "examples/train_single.py"])  # relative: to which directory?


def _run(launch, out: Path, ckpt: Path) -> _harness.Run:
    env = _harness.clean_env({"PYCKPT_DIR": str(ckpt), "PYCKPT_EVERY_STEPS": "4"})
    run = launch(_harness.python_command(SINGLE, ["--out", str(out)]), env)
    assert run.finish(120) == 0, run.stderr[-3000:]
    return run


def test_a_forked_run_checkpoints_and_ends_as_a_new_interpreter_does(tmp_path):
    """PYCKPT_DIR turns transparent mode on in the forked child (pyckpt's start-up line), which prints
    the same lines, commits the same checkpoints and ends with bitwise the same state."""
    new = _run(forked._real_launch, tmp_path / "new.pt", tmp_path / "ckpt_new")
    child = _run(forked.launch, tmp_path / "forked.pt", tmp_path / "ckpt_forked")
    assert isinstance(child, forked.ForkedRun) and not isinstance(new, forked.ForkedRun)
    assert child.steps() == new.steps() and len(new.steps()) == 18
    assert _harness.committed_steps(tmp_path / "ckpt_forked") == _harness.committed_steps(tmp_path / "ckpt_new")
    assert "pyckpt: checkpointing to" in child.stderr
    assert not _harness.diff_states(_harness.load_state(tmp_path / "new.pt"),
                                    _harness.load_state(tmp_path / "forked.pt"))


def test_a_forked_runs_lines_arrive_as_printed_and_kill_ends_its_whole_tree(tmp_path):
    env = _harness.clean_env()
    run = forked.launch(_harness.python_command(SINGLE, ["--out", str(tmp_path / "o.pt"), "--step-sleep", "0.2"]),
                        env)
    # Step 2 is seen while the run goes on (its output is followed line by line, not read at its end).
    assert run.wait_until(lambda: run.last_step() >= 2, 60) and run.popen.poll() is None
    tree = [run.popen.pid, *_harness.descendants(run.popen.pid)]
    assert len(tree) >= 3  # the script and its two DataLoader workers
    killed = run.kill()
    assert run.popen.returncode == -signal.SIGKILL and set(tree) <= set(killed)
    time.sleep(0.2)
    assert not [pid for pid in tree if zygote.shared().alive(pid)]
    assert run.last_step() < 18 and not (tmp_path / "o.pt").exists()
