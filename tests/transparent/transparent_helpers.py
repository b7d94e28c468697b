"""Helpers for the transparent-mode tests: run scripts as real processes (forked from the test zygote, or new interpreters)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import zygote

HERE = Path(__file__).parent
TINY = HERE / "train_tiny.py"


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without PYCKPT_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYCKPT_")}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_script(args: list[str], cwd: Path, timeout: float = 120, fresh: bool = False,
               **env: str) -> subprocess.CompletedProcess:
    """Run ``python args...`` with a clean PYCKPT_* environment plus ``env``: in a process forked by
    the session's zygote (torch and pyckpt imported; pyckpt's start-up line run in it, as an
    interpreter's start-up runs it), or, ``fresh``, in a new interpreter (tests of start-up itself,
    and scripts that turn pyckpt on by ``import pyckpt`` alone)."""
    if fresh:
        return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=clean_env(**env), capture_output=True,
                              text=True, timeout=timeout)
    child = zygote.shared().run_path(args[0], list(args[1:]), env=clean_env(**env), cwd=cwd, timeout=timeout,
                                     startup=True)
    return subprocess.CompletedProcess(args, child.returncode, child.stdout, child.stderr)


def killed_and_relaunched(script: Path, out: Path, cwd: Path, kill_at: int, every_steps: int,
                          **env: str) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """A training script that SIGKILLs itself once after step ``kill_at`` (its ``KILL_AT``/``KILL_MARK``), run
    under PYCKPT_DIR=cwd/ckpt with a snapshot every ``every_steps``, then relaunched to its end: (the killed
    run, the relaunch), each checked to have ended so."""
    env = dict(env, PYCKPT_DIR=cwd / "ckpt", PYCKPT_EVERY_STEPS=str(every_steps), KILL_AT=str(kill_at),
               KILL_MARK=cwd / "mark")
    first = run_script([script, out], cwd, **env)
    assert first.returncode == -signal.SIGKILL, first.stderr
    second = run_script([script, out], cwd, **env)
    assert second.returncode == 0, second.stderr
    return first, second


def plain_and_relaunched(text: str, tmp_path: Path, kill_at: int, every_steps: int,
                         **env: str) -> tuple[subprocess.CompletedProcess, Any, Any]:
    """Training script ``text`` (written as ``tmp_path/train.py``; its ``argv[1]`` is where it saves its final state)
    run to its end, then ``killed_and_relaunched``: (the relaunch, the plain run's final state, the relaunch's)."""
    script = tmp_path / "train.py"
    script.write_text(text)
    plain = run_script([script, tmp_path / "plain.pt"], tmp_path, **env)
    assert plain.returncode == 0, plain.stderr
    _, second = killed_and_relaunched(script, tmp_path / "out.pt", tmp_path, kill_at, every_steps, **env)
    return second, load(tmp_path / "plain.pt"), load(tmp_path / "out.pt")


def harness_hook(fn):
    """``fn`` as a capture hook the loop-state tests hand their loops: a function without closure cells
    (``fn`` is a default argument), so the loop state, which follows the script's own closures, leaves it
    out; a test's capture closure is no state of the loop under test (the restore hands it another one).
    A function, not a callable object: the frame's position at a call depends on the kind of callee."""
    def hook(*args, _fn=fn):
        return _fn(*args)

    return hook


def tree_equal(a, b) -> bool:
    """Bitwise equality of nested state (tensors with torch.equal)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tree_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tree_equal(x, y) for x, y in zip(a, b))
    return a == b


def load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


