"""A run that hangs is killed at its timeout and first says where it hung.

CI once failed on a 2-rank run that hung with nothing in its output but the
last lines before the hang; the harness now makes every process under the
launcher print its threads' Python stacks (faulthandler) before the kill.
"""
from __future__ import annotations

import sys

import _harness

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
