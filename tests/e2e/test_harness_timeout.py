"""A run that hangs is killed at its timeout and first says where it hung; a reference run
(no pyckpt) that crashes in native code is retried once.

CI once failed on a 2-rank run that hung with nothing in its output but the
last lines before the hang; the harness now makes every process under the
launcher print its threads' Python stacks (faulthandler) before the kill.
"""
from __future__ import annotations

import sys

import _harness
import pytest
from e2e_helpers import run_plain

HANGS = """
import subprocess, sys

child = subprocess.Popen([sys.executable, "-c", "import time\\ndef stuck_in_child():\\n    time.sleep(600)\\nstuck_in_child()"])
print("ready", flush=True)
child.wait()
"""


def test_a_timed_out_run_prints_every_process_stack_before_it_is_killed():
    run = _harness.launch([sys.executable, "-c", HANGS])
    assert run.wait_until(lambda: "ready" in run.stdout, 60), run.stderr
    run.finish(timeout=2)
    err = run.stderr
    assert err.splitlines()[-1] == "[harness] killed after 2 s timeout", err
    # Every process below the launcher names the function it is stuck in.
    assert "in stuck_in_child" in err, err
    assert "Fatal Python error: Aborted" in err, err


CRASHES_ONCE = """
import os, signal, sys
marker = sys.argv[1]
if not os.path.exists(marker):
    open(marker, "w").close()
    os.kill(os.getpid(), signal.SIGABRT)  # a native crash, as gloo's abort is
print("done", flush=True)
"""

RAISES_ONCE = """
import os, sys
marker = sys.argv[1]
if not os.path.exists(marker):
    open(marker, "w").close()
    raise RuntimeError("a bug in the script")
print("done", flush=True)
"""


def test_a_reference_run_that_crashes_natively_is_retried_once_and_an_exception_is_not(tmp_path, capsys):
    run = run_plain([sys.executable, "-c", CRASHES_ONCE, str(tmp_path / "a")])
    assert run.stdout.strip() == "done"
    assert "retrying once" in capsys.readouterr().err
    with pytest.raises(AssertionError, match="a bug in the script"):
        run_plain([sys.executable, "-c", RAISES_ONCE, str(tmp_path / "b")])
    assert "retrying once" not in capsys.readouterr().err
