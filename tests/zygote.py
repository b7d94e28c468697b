"""Real child processes without paying for ``import torch`` in each one.

Crash tests start dozens of short Python processes that each SIGKILL themselves (or get killed)
in the middle of a save, and the CLI tests one process per command. Most of such a child's life
was its start-up: importing torch and pyckpt (1-2 s each on 2 cores).
A ``Zygote`` is one Python process that imports them once and then forks a child per job
(what multiprocessing's forkserver does): each child is a real, separate process with its own
argv, environment, working directory and stdout/stderr files, and it dies by a real SIGKILL.
A forked child has no start-up of its own: ``run_path(..., startup=True)`` runs the line of
pyckpt-autostart.pth an interpreter's start-up runs (PYCKPT_DIR turns transparent mode on), and
the transparent-mode tests run their training scripts so (tests/transparent/transparent_helpers.py).
Not for tests about interpreter start-up itself, nor for scripts that turn pyckpt on by
``import pyckpt`` alone (the package is already imported here): those take a new interpreter.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The zygote: imports what every child imports, then serves one request per line on stdin
# ("RUN <json>" -> "PID <pid>", "WAIT <pid>" -> "EXIT <returncode>").
_SERVER = r'''
import atexit, importlib, json, os, sys
# The point: imported once, before any fork. Through importlib, not `import pyckpt` in __main__:
# that statement would turn transparent mode on in this process and so in every child.
importlib.import_module("torch")
importlib.import_module("pyckpt")
importlib.import_module("torch._dynamo")  # what the first optimizer step imports (torch._disable_dynamo)
for name in sys.argv[1:]:  # more, for children that all import them (Zygote's ``preload``)
    importlib.import_module(name)

def child(job):
    fds = [os.open(os.devnull, os.O_RDONLY)] + [
        os.open(job[k], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) for k in ("stdout", "stderr")]
    for fd, target in zip(fds, (0, 1, 2)):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(job["env"])
    if job["cwd"]:
        os.chdir(job["cwd"])
    sys.argv = ["-c", *job["argv"]]
    # PYTHONPATH is read at an interpreter's start-up: its entries come right after the script's folder.
    sys.path[0:0] = [p for p in job["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    code = 0
    try:
        exec(compile(job["code"], "<child>", "exec"), {"__name__": "__main__"})
    except SystemExit as e:
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())  # as an interpreter reports an uncaught exception (hooks included)
        code = 1
    import threading
    threading._shutdown()  # what an interpreter's exit runs first: it waits for non-daemon threads
    atexit._run_exitfuncs()  # and then this
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

def serve():
    import site
    # Computed now, from PYTHONUSERBASE, and kept by every child (whose environment is its job's):
    # pyckpt's frames take code under it for installed code.
    user_site = os.path.realpath(site.getusersitepackages())
    assert os.path.realpath(__file__).startswith(user_site + os.sep), (__file__, user_site)
    if sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]  # what -m put first (the zygote's folder): no child's `python script` has it
    print("READY", flush=True)
    for line in sys.stdin:
        op, _, arg = line.strip().partition(" ")
        if op == "RUN":
            job = json.loads(arg)
            pid = os.fork()
            if pid == 0:
                try:
                    child(job)
                finally:
                    os._exit(70)  # never back into this loop
            print("PID", pid, flush=True)
        elif op == "WAIT":
            _, status = os.waitpid(int(arg), 0)
            print("EXIT", os.waitstatus_to_exitcode(status), flush=True)

serve()
'''


_PTH_LINE = (Path(__file__).resolve().parent.parent / "pyckpt-autostart.pth").read_text()  # as installed


class Child:
    """One forked child: its pid, its stdout/stderr files, ``wait`` for its return code."""

    def __init__(self, zygote: "Zygote", pid: int, stdout: Path, stderr: Path) -> None:
        self.zygote, self.pid, self.stdout_path, self.stderr_path = zygote, pid, stdout, stderr
        self.returncode: int | None = None

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_for_line(self, line: str, timeout: float) -> None:
        """Wait until the child printed ``line`` (it must flush it); fail if it dies or times out first."""
        deadline = time.monotonic() + timeout
        while line not in self.stdout.splitlines():
            if time.monotonic() > deadline or not self.zygote.alive(self.pid):
                self.kill()
                raise AssertionError(f"child never printed {line!r}:\n{self.stdout}\n{self.stderr}")
            time.sleep(0.005)

    def kill(self) -> None:
        """SIGKILL the child (no-op once it was waited for)."""
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> int:
        """The child's return code (-N: killed by signal N), like ``Popen.returncode``."""
        if self.returncode is None:
            self.returncode = self.zygote._wait(self, timeout)
        return self.returncode


class Zygote:
    """A Python process with torch and pyckpt imported that forks real child processes on demand."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None, timeout: float = 120,
                 preload: tuple[str, ...] = ()) -> None:
        self.tmp, self.n, self.children = tmp, 0, []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PYCKPT_")} if env is None else env
        # The server is a module in a user site directory of its own (PYTHONUSERBASE), run with -m:
        # pyckpt counts installed code, and `python -c` code, as library or script by where it lies,
        # and a child must see on its stack only the frames of the script it runs as the script's.
        base = tmp / "zygote-userbase"
        site_dir = base / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
        site_dir.mkdir(parents=True, exist_ok=True)
        (site_dir / "_pyckpt_test_zygote.py").write_text(_SERVER)
        # Found through PYTHONPATH (a virtualenv turns user sites off; their path still counts).
        path = os.pathsep.join(p for p in (str(site_dir), self.env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen([sys.executable, "-m", "_pyckpt_test_zygote", *preload], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True,
                                     env={**self.env, "PYTHONUSERBASE": str(base), "PYTHONPATH": path})
        assert self._reply(timeout) == "READY"

    def _reply(self, timeout: float) -> str:
        # One request, one reply line: nothing else is ever buffered, so select() on the pipe is exact.
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise TimeoutError(f"the zygote did not answer within {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the zygote died (exit {self.proc.wait(10)})")
        return line.strip()

    def _send(self, line: str, timeout: float = 60) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._reply(timeout)

    def start(self, code: str, args: list = (), env: dict[str, str] | None = None,
              cwd: str | os.PathLike | None = None) -> Child:
        """Fork a child that runs ``code`` as ``python -c code *args`` would, in environment ``env``
        (default: the zygote's own) and directory ``cwd`` (default: the caller's current one)."""
        cwd = os.getcwd() if cwd is None else cwd
        self.n += 1
        out, err = self.tmp / f"child-{self.n}.out", self.tmp / f"child-{self.n}.err"
        out.touch()  # readable from the start, before the child opened it
        err.touch()
        job = {"code": code, "argv": [str(a) for a in args], "env": self.env if env is None else env,
               "cwd": str(cwd) if cwd else None, "stdout": str(out), "stderr": str(err)}
        reply = self._send("RUN " + json.dumps(job))
        assert reply.startswith("PID "), reply
        child = Child(self, int(reply[4:]), out, err)
        self.children.append(child)
        return child

    def run(self, code: str, args: list = (), env: dict[str, str] | None = None, timeout: float = 120) -> Child:
        """``start`` then ``wait``: the finished child (``returncode``, ``stdout``, ``stderr``)."""
        child = self.start(code, args, env)
        child.wait(timeout)
        return child

    def run_module(self, module: str, args: list = (), env: dict[str, str] | None = None,
                   timeout: float = 120) -> Child:
        """What ``python -m module *args`` does, in a forked child; finished, like ``subprocess.run``."""
        code = f"import runpy; runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
        return self.run(code, args, env, timeout)

    def run_path(self, script: str | os.PathLike, args: list = (), env: dict[str, str] | None = None,
                 cwd: str | os.PathLike | None = None, timeout: float = 120, startup: bool = False) -> Child:
        """What ``python script *args`` does, in a forked child; finished, like ``subprocess.run``.

        ``startup``: the child first runs the line of ``pyckpt-autostart.pth`` that an interpreter's
        start-up runs (so PYCKPT_DIR turns transparent mode on, as in a fresh interpreter). Without it,
        or for a script that turns pyckpt on by ``import pyckpt`` alone: nothing of pyckpt runs (the
        package is already imported here, so that statement does nothing)."""
        child = self.start_path(script, args, env, cwd, startup)
        child.wait(timeout)
        return child

    def start_path(self, script: str | os.PathLike, args: list = (), env: dict[str, str] | None = None,
                   cwd: str | os.PathLike | None = None, startup: bool = False,
                   line_buffered: bool = False) -> Child:
        """``run_path`` without waiting: the running child. ``line_buffered``: its stdout and stderr are
        written at every line, as ``python -u`` (or PYTHONUNBUFFERED, read only at an interpreter's
        start-up) writes them, so a caller following its output sees each line when it is printed."""
        path = os.path.abspath(os.path.join(os.getcwd() if cwd is None else cwd, script))
        code = f"import runpy, sys; sys.argv[0] = {str(script)!r}; sys.path.insert(0, {os.path.dirname(path)!r})\n"
        if line_buffered:
            code += ("sys.stdout = open(1, 'w', buffering=1, closefd=False)\n"
                     "sys.stderr = open(2, 'w', buffering=1, closefd=False)\n")
        if startup:
            code += _PTH_LINE
        code += f"\nrunpy.run_path({path!r}, run_name='__main__')"
        return self.start(code, args, env, cwd)

    def alive(self, pid: int) -> bool:
        """Still running (a zombie waiting for its WAIT counts as dead)."""
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError):
            return False

    def _wait(self, child: Child, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.alive(child.pid) and time.monotonic() < deadline:
            time.sleep(0.005)
        if self.alive(child.pid):  # a hang: turn it into a failure, not a stuck suite
            child.kill()
            child.returncode = int(self._send(f"WAIT {child.pid}")[5:])
            raise TimeoutError(f"child {child.pid} still running after {timeout} s:\n{child.stdout}\n{child.stderr}")
        reply = self._send(f"WAIT {child.pid}")
        assert reply.startswith("EXIT "), reply
        return int(reply[5:])

    def close(self) -> None:
        """Kill every child still running, then stop the zygote."""
        for child in self.children:
            if child.returncode is None:
                child.kill()
                try:
                    child.wait(30)
                except (TimeoutError, RuntimeError, OSError):
                    pass
        self.proc.kill()  # it holds nothing; a clean interpreter exit would only cost time
        self.proc.wait(30)
        self.proc.stdin.close()
        self.proc.stdout.close()


_shared: dict[tuple[str, ...], Zygote] = {}


def shared(preload: tuple[str, ...] = ()) -> Zygote:
    """The test session's zygote, started on first use (closed by ``close_shared``); ``preload``: one that
    has these modules imported too (each set its own zygote)."""
    if preload not in _shared:
        _shared[preload] = Zygote(Path(tempfile.mkdtemp(prefix="pyckpt-zygote-")), preload=preload)
    return _shared[preload]


def close_shared() -> None:
    """Stop the session's zygotes (those started) and remove their output files."""
    while _shared:
        z = _shared.popitem()[1]
        z.close()
        shutil.rmtree(z.tmp, ignore_errors=True)
