"""``_harness.launch`` for ``python script.py ...`` commands, forked from the session's zygote.

Most of an e2e run of a small example is its interpreter's start-up: ``import torch`` (and pyckpt) takes
2-3 s of CPU on this 2-core machine, against about a second of training, and the e2e tests launch a few
hundred such processes. A ``ForkedRun`` is the same ``_harness.Run`` (its lines followed as they are printed,
its process tree killed by ``kill_tree``, its exit status, SIGTERM to its pid) around a child forked from a
process that imported them once (tests/zygote.py): a real, separate process that runs the script as
``python script`` does, pyckpt's start-up line included (PYCKPT_DIR turns transparent mode on as in a new
interpreter). What it cannot be is a new interpreter, so these commands keep ``subprocess``: anything not
``python some.py`` (torchrun, ``pyckpt-run``, ``python -c``, ``-m``), and a script that turns pyckpt on by
``import pyckpt`` (already imported in the zygote, that statement would do nothing). ``kill_by_token``
does not see a forked child's own forks (their environment as /proc shows it is the zygote's): ``kill_tree``
kills them with it, as for any run.
Used by the e2e tests (tests/e2e/conftest.py) and the kill fuzz (tests/faults/test_kill_fuzz.py) through
``patched``; tests/test_forked.py checks that a forked run and a new interpreter give the same result.
"""
from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

import zygote

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import _harness  # noqa: E402 - examples/ is not a package


def _forkable_source(cmd: Sequence[str]) -> str | None:
    """The source of the script of ``python /abs/script.py args`` where the script does not turn pyckpt on by
    importing it (``import pyckpt``, ``from pyckpt import ...``); None for any other command."""
    if len(cmd) < 2 or cmd[0] != sys.executable or not str(cmd[1]).endswith(".py") or not os.path.isabs(cmd[1]):
        return None
    try:
        source = Path(cmd[1]).read_text()
    except OSError:
        return None
    return source if re.search(r"^\s*(import|from)\s+pyckpt\b", source, re.M) is None else None


def forkable(cmd: Sequence[str]) -> bool:
    """``cmd`` is run forked from the zygote (``_forkable_source``)."""
    return _forkable_source(cmd) is not None


# A script of the Hugging Face stack spends about 3.5 s more importing it (6.2 s against torch's 2.6 s here):
# forked from a zygote that imported it too. pyckpt's hooks into those libraries then go in as they do where
# the script imported them before pyckpt was turned on (``pyckpt.integrations``); torchrun's workers, new
# interpreters, keep the usual order.
HF_PRELOAD = ("transformers", "transformers.trainer", "accelerate")


class _ForkedPopen:
    """What ``_harness.Run`` uses of ``subprocess.Popen``: ``pid``, ``poll``, ``wait``, ``returncode``."""

    def __init__(self, child: zygote.Child, cmd: Sequence[str]) -> None:
        self._child, self._cmd = child, list(cmd)
        self.pid = child.pid
        self.returncode: int | None = None

    def exited(self) -> bool:
        # (Its return code first: once the zygote reaped it, its pid may be another process's.)
        return self.returncode is not None or not self._child.zygote.alive(self.pid)

    def poll(self) -> int | None:
        if self.returncode is None and self.exited():
            self.returncode = self._child.wait(30)  # exited: the zygote reaps it at once
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self._cmd, timeout)
            time.sleep(0.005)
        return self.returncode


class _Tail:
    """The lines of a child's output file as they are written, until the child has exited and the file
    holds no more (a line without its newline yet is held back until it has one, or the end)."""

    def __init__(self, path: Path, popen: _ForkedPopen) -> None:
        self._file, self._popen = open(path, errors="replace"), popen

    def __iter__(self) -> Iterator[str]:
        part = ""
        while True:
            exited = self._popen.exited()  # read after this: nothing is missed
            chunk = self._file.readline()
            while chunk:
                part += chunk
                if part.endswith("\n"):
                    yield part
                    part = ""
                chunk = self._file.readline()
            if exited:
                if part:
                    yield part
                return
            time.sleep(0.005)

    def close(self) -> None:
        self._file.close()


class ForkedRun(_harness.Run):
    """A ``_harness.Run`` whose process is forked from the session's zygote that has ``preload`` imported too
    (see the module docstring)."""

    def __init__(self, cmd: Sequence[str], env: dict[str, str], cwd: str | None,
                 echo: Callable[[str, str], None] | None = None, preload: tuple[str, ...] = ()) -> None:
        self._preload = preload
        super().__init__(cmd, env, cwd, echo)

    def _spawn(self, env: dict[str, str], cwd: str | None) -> tuple[_ForkedPopen, _Tail, _Tail]:
        child = zygote.shared(self._preload).start_path(
            self.cmd[1], self.cmd[2:], env=env, cwd=cwd or os.getcwd(), startup=True, line_buffered=True)
        popen = _ForkedPopen(child, self.cmd)
        return popen, _Tail(child.stdout_path, popen), _Tail(child.stderr_path, popen)


def launch(cmd: Sequence[str], env: dict[str, str] | None = None, cwd: str | Path | None = None,
           echo: Callable[[str, str], None] | None = None) -> _harness.Run:
    """``_harness.launch``, forking ``forkable`` commands from the session's zygote."""
    source = _forkable_source(cmd)
    if source is None:
        return _real_launch(cmd, env, cwd, echo)
    preload = HF_PRELOAD if ("transformers" in source or "accelerate" in source) else ()
    return _real_launch(cmd, env, cwd, echo, run_class=functools.partial(ForkedRun, preload=preload))


_real_launch = _harness.launch


@pytest.fixture(scope="module")
def patched():
    """``_harness.launch`` is ``launch`` for the tests of the module that uses this fixture."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_harness, "launch", launch)
        yield
