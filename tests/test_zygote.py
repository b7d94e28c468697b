"""The zygote that forks the crash and CLI tests' child processes (tests/zygote.py): its children are
real, separate processes with their own argv, environment, directory and exit status, and transparent
mode is off in them as in a process that never imported pyckpt from its main script."""
from __future__ import annotations

import os
import signal

CODE = """
import os, sys, pyckpt
print(os.getpid(), os.getppid(), os.getcwd(), sys.argv[1:], os.environ.get("ZYGOTE_PROBE"), pyckpt.activation.active())
sys.exit(int(sys.argv[1]))
"""


def test_children_are_separate_processes_with_their_own_settings(zygote, tmp_path):
    child = zygote.run(CODE, ["7", "x y"], env=dict(zygote.env, ZYGOTE_PROBE="on"), timeout=60)
    assert child.returncode == 7, child.stderr
    pid, ppid, cwd, rest = child.stdout.split(" ", 3)
    assert int(pid) == child.pid and int(pid) != os.getpid() and int(ppid) == zygote.proc.pid
    assert cwd == os.getcwd()
    assert rest.strip() == "['7', 'x y'] on False"  # transparent mode off, as for the explicit API and the CLI
    assert zygote.run("raise ValueError('boom')", timeout=60).returncode == 1


def test_a_child_killed_by_a_signal_reports_it_and_a_hang_is_bounded(zygote):
    assert zygote.run("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", timeout=60).returncode \
        == -signal.SIGKILL
    hung = zygote.start("import time; print('UP', flush=True); time.sleep(600)")
    hung.wait_for_line("UP", 60)
    try:
        hung.wait(0.5)
    except TimeoutError:
        pass
    else:
        raise AssertionError("a hanging child was not reported")
    assert hung.returncode == -signal.SIGKILL and not zygote.alive(hung.pid)  # killed and reaped
