"""Process utilities shared by ``examples/demo.py`` and ``tests/e2e``.

Launch a training command, follow its output line by line, kill its whole
process tree at a chosen moment, and compare final states bitwise. Only the
standard library is needed to import this module (torch is imported by the
state helpers when they are called), and nothing here mentions pytest.

Why a process *tree*: torchrun starts every worker in its own session, so
killing the launcher's process group would leave the workers running. The tree
is found by walking ``/proc/*/stat`` parent links; as a second net every
launched command carries a unique token in its environment, and
``kill_by_token`` finds processes that were re-parented after their parent
died.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

TOKEN_VAR = "E2E_HARNESS_TOKEN"
STEP_RE = re.compile(r"^step (\d+) epoch (\d+) loss (\S+)")
# A loop no DataLoader drives (random-offset batches, nanoGPT-style) has no epoch or batch to name.
RESUME_RE = re.compile(
    r"pyckpt: resumed from step (\d+) \((?:epoch (\d+), batch (\d+)|after .+?, no DataLoader position)\) "
    r"in ([0-9.eE+-]+) s")
COMMITTED_RE = re.compile(r"^step-(\d{9})$")
IN_PROGRESS_RE = re.compile(r"^step-(\d{9})\.tmp-")

_live_runs: list["Run"] = []


# ----------------------------------------------------------------------------- processes

def _read_proc(pid: int, name: str) -> bytes | None:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:  # the process is gone, or is not ours to read
        return None


def parent_map() -> dict[int, int]:
    """Map every live pid to its parent pid, from ``/proc/*/stat``."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _read_proc(int(entry), "stat")
        if stat:
            # The command name may contain spaces and ')' : split after the last ')'.
            fields = stat[stat.rindex(b")") + 2:].split()
            parents[int(entry)] = int(fields[1])
    return parents


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parent_map().items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def kill_tree(root: int) -> list[int]:
    """SIGKILL ``root`` and all its descendants; returns the pids signalled.

    Everything is stopped first (SIGSTOP) so no process can start a new child
    or react to a sibling's death between the walk and the kill.
    """
    # The root first, before the /proc walk: a run must not get further than the moment
    # the caller decided to kill it (a commit it should not reach, the next step).
    _signal(root, signal.SIGSTOP)
    stopped: set[int] = {root}
    while True:
        new = {root, *descendants(root)} - stopped
        if not new:
            break
        for pid in new:
            _signal(pid, signal.SIGSTOP)
        stopped |= new
    for pid in stopped:
        _signal(pid, signal.SIGKILL)
    return sorted(stopped)


def environ_of(pid: int) -> dict[str, str]:
    """The environment a process was started with (empty if unreadable)."""
    raw = _read_proc(pid, "environ") or b""
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def kill_by_token(token: str) -> list[int]:
    """SIGKILL every process whose environment carries ``TOKEN_VAR=token``."""
    killed = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            if environ_of(int(entry)).get(TOKEN_VAR) == token:
                _signal(int(entry), signal.SIGKILL)
                killed.append(int(entry))
    return killed


def elastic_workers(root: int) -> dict[int, int]:
    """Map global rank -> pid of each torchelastic worker under ``root``.

    A worker has ``LOCAL_RANK`` in its environment and its parent (the agent)
    does not; DataLoader processes forked by a worker inherit the variable but
    their parent has it too, so they are excluded.
    """
    parents = parent_map()
    workers = {}
    for pid in descendants(root):
        env = environ_of(pid)
        if "LOCAL_RANK" in env and "LOCAL_RANK" not in environ_of(parents.get(pid, 0)):
            workers[int(env.get("RANK", env["LOCAL_RANK"]))] = pid
    return workers


# ----------------------------------------------------------------------------- one run

class Run:
    """A launched command whose stdout/stderr lines are collected as they arrive."""

    def __init__(self, cmd: Sequence[str], env: dict[str, str], cwd: str | None,
                 echo: Callable[[str, str], None] | None = None):
        self.cmd = list(cmd)
        self.token = env[TOKEN_VAR]
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._echo = echo
        self._changed = threading.Condition()
        self.popen, out, err = self._spawn(env, cwd)
        self._readers = [self._start_reader(out, self.stdout_lines, "out"),
                         self._start_reader(err, self.stderr_lines, "err")]
        _live_runs.append(self)

    def _spawn(self, env: dict[str, str], cwd: str | None) -> tuple[Any, Any, Any]:
        """Start the process: (its Popen, its stdout and stderr as iterables of lines with ``close``)."""
        popen = subprocess.Popen(self.cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, bufsize=1)
        return popen, popen.stdout, popen.stderr

    def _start_reader(self, stream, sink: list[str], name: str) -> threading.Thread:
        def pump() -> None:
            for line in stream:
                with self._changed:
                    sink.append(line.rstrip("\n"))
                    self._changed.notify_all()
                if self._echo:
                    self._echo(name, line.rstrip("\n"))
            stream.close()

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        return thread

    @property
    def stdout(self) -> str:
        return "\n".join(self.stdout_lines)

    @property
    def stderr(self) -> str:
        return "\n".join(self.stderr_lines)

    def steps(self) -> list[tuple[int, int, str]]:
        """``(step, epoch, rest-of-line)`` for every ``step N epoch E loss X`` line so far."""
        found = []
        for line in list(self.stdout_lines):
            m = STEP_RE.match(line)
            if m:
                found.append((int(m.group(1)), int(m.group(2)), line[m.start(3):]))
        return found

    def last_step(self) -> int:
        steps = self.steps()
        return steps[-1][0] if steps else 0

    def wait_until(self, condition: Callable[[], bool], timeout: float, poll: float = 0.01) -> bool:
        """Wait until ``condition()`` is true (True) or the process exits / time runs out (False).

        The condition is checked on every new output line and every ``poll`` seconds,
        so it may also look at files.
        """
        deadline = time.monotonic() + timeout
        while True:
            if condition():
                return True
            if self.popen.poll() is not None or time.monotonic() > deadline:
                return condition()
            with self._changed:
                self._changed.wait(poll)

    def kill(self) -> list[int]:
        """SIGKILL the whole process tree and reap the launcher."""
        pids = kill_tree(self.popen.pid)
        self.finish(timeout=30)
        kill_by_token(self.token)
        return pids

    def finish(self, timeout: float) -> int:
        """Wait for exit (killing the tree on timeout); return the exit status."""
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self._dump_stacks()
            kill_tree(self.popen.pid)
            self.popen.wait(30)
            self.stderr_lines.append(f"[harness] killed after {timeout} s timeout")
        for reader in self._readers:
            reader.join(10)
        return self.popen.returncode

    def _dump_stacks(self) -> None:
        """Make every process under the launcher print where its threads are (faulthandler, enabled
        by PYTHONFAULTHANDLER in ``clean_env``) before the tree is killed: a hang says where it hung."""
        for pid in descendants(self.popen.pid):
            _signal(pid, signal.SIGABRT)
        time.sleep(3)

    def cleanup(self) -> None:
        """Kill anything this run left behind (used by test fixtures and on exit)."""
        if self.popen.poll() is None:
            kill_tree(self.popen.pid)
            self.popen.wait(30)
        kill_by_token(self.token)
        for reader in self._readers:
            reader.join(10)


def clean_env(overrides: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any PYCKPT_* setting, plus ``overrides``.

    One intra-op thread keeps runs quick on a small shared machine; the value is
    the same for reference and checkpointed runs, so numerics are comparable.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYCKPT_")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"})
    env.update(overrides or {})
    return env


def launch(cmd: Sequence[str], env: dict[str, str] | None = None, cwd: str | Path | None = None,
           echo: Callable[[str, str], None] | None = None, run_class: Callable[..., Run] = Run) -> Run:
    """Start ``cmd`` with ``env`` (default: ``clean_env()``) tagged with a fresh token, as a ``run_class``
    (a ``Run`` that starts its process another way: the tests' forked runs)."""
    env = dict(clean_env() if env is None else env)
    env[TOKEN_VAR] = uuid.uuid4().hex
    return run_class(cmd, env, None if cwd is None else str(cwd), echo)


def cleanup_all() -> None:
    """Kill every process tree started by ``launch`` in this interpreter."""
    while _live_runs:
        _live_runs.pop().cleanup()


def python_command(script: str | Path, args: Sequence[str], nproc: int = 1) -> list[str]:
    """``python script args``, or ``torchrun --standalone --nproc-per-node N script args``."""
    if nproc == 1:
        return [sys.executable, str(script), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(nproc), str(script), *args]


def wrapper_command() -> list[str]:
    """The ``pyckpt-run`` console script next to this Python, else ``python -m pyckpt.run``."""
    exe = Path(sys.executable).with_name("pyckpt-run")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("pyckpt-run")
    return [found] if found else [sys.executable, "-m", "pyckpt.run"]


# ----------------------------------------------------------------------------- checkpoint dirs

def committed_steps(ckpt_dir: str | Path) -> list[int]:
    """Steps of committed checkpoints (``step-N/MANIFEST.json`` present), ascending."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    steps = []
    for entry in root.iterdir():
        m = COMMITTED_RE.match(entry.name)
        if m and (entry / "MANIFEST.json").is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def in_progress_steps(ckpt_dir: str | Path) -> list[int]:
    """Steps of checkpoints being written (``step-N.tmp-*`` directories)."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for e in root.iterdir() if (m := IN_PROGRESS_RE.match(e.name)))


def resume_line(stderr: str) -> dict[str, float] | None:
    """Parse ``pyckpt: resumed from step N (epoch E, batch B) in T s`` (None if absent); epoch and
    batch are None after ``(after optimizer.step(), no DataLoader position)``."""
    m = RESUME_RE.search(stderr)
    if not m:
        return None
    epoch, batch = (None, None) if m.group(2) is None else (int(m.group(2)), int(m.group(3)))
    return {"step": int(m.group(1)), "epoch": epoch, "batch": batch, "seconds": float(m.group(4))}


# ----------------------------------------------------------------------------- states

def load_state(path: str | Path) -> Any:
    """Load a ``torch.save``d final state safely (no code runs, CPU tensors)."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def _tensor_diff(path: str, ref, got) -> list[str]:
    import torch

    if not isinstance(got, torch.Tensor):
        return [f"{path}: expected a tensor, got {type(got).__name__}"]
    if ref.dtype != got.dtype or ref.shape != got.shape:
        return [f"{path}: {ref.dtype}{list(ref.shape)} vs {got.dtype}{list(got.shape)}"]
    # Bitwise: compare the raw bytes, so -0.0 vs 0.0 and NaN payloads count too.
    a = ref.detach().contiguous().reshape(-1).view(torch.uint8)
    b = got.detach().contiguous().reshape(-1).view(torch.uint8)
    if torch.equal(a, b):
        return []
    if ref.is_floating_point():
        gap = (ref.double() - got.double()).abs().max().item()
        return [f"{path}: values differ (max abs difference {gap:.3g})"]
    return [f"{path}: values differ"]


def diff_states(ref: Any, got: Any, path: str = "state") -> list[str]:
    """Every difference between two nested states; ``[]`` means bitwise equal.

    Tensors must match in dtype, shape and bytes; other values with ``==``.
    """
    import torch

    if isinstance(ref, torch.Tensor):
        return _tensor_diff(path, ref, got)
    if isinstance(ref, dict):
        if not isinstance(got, dict):
            return [f"{path}: expected a dict, got {type(got).__name__}"]
        problems = [f"{path}: keys differ: only in reference {sorted(map(str, ref.keys() - got.keys()))}, "
                    f"only in result {sorted(map(str, got.keys() - ref.keys()))}"] \
            if ref.keys() != got.keys() else []
        for key in ref.keys() & got.keys():
            problems += diff_states(ref[key], got[key], f"{path}[{key!r}]")
        return problems
    if isinstance(ref, (list, tuple)):
        if type(got) is not type(ref) or len(got) != len(ref):
            return [f"{path}: expected {type(ref).__name__} of {len(ref)}, got {got!r:.80}"]
        return [p for i, (r, g) in enumerate(zip(ref, got)) for p in diff_states(r, g, f"{path}[{i}]")]
    return [] if ref == got and type(ref) is type(got) else [f"{path}: {ref!r} vs {got!r}"]


def count_tensors(state: Any) -> int:
    """Number of tensors in a nested state (for reports)."""
    import torch

    if isinstance(state, torch.Tensor):
        return 1
    if isinstance(state, dict):
        return sum(count_tensors(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(count_tensors(v) for v in state)
    return 0
