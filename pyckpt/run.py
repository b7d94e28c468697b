"""``pyckpt-run``: run a training script under torchrun's elastic agent with pyckpt on.

    pyckpt-run [--dir D] [--every-steps N] [--every-seconds S] [--keep K]
               [--max-restarts R] [torchrun options] script.py [script args]

The pyckpt flags become PYCKPT_* environment variables, which every worker
inherits; the installed start-up hook turns transparent mode on in each
worker. torchrun gets ``--nproc-per-node`` (default 1) and ``--standalone``
unless rendezvous or multi-node options were given (so concurrent jobs on one
machine do not fight over port 29500; ``--nnodes 2`` alone stays multi-node). When a worker dies the whole group is restarted
(``--max-restarts``, default 3) and resumes from the newest checkpoint. Also
``python -m pyckpt.run``.

Restarts are the elastic agent's (``torchrun --max-restarts``). In torch 2.13
the agent shares one TCP store across restart attempts by default, and a
restarted gloo group can then read the dead attempt's addresses and fail with
"Gloo connectFullMesh failed ... Connection refused" (reproducible without
pyckpt); the wrapper sets ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` so every
attempt rendezvouses afresh.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Sequence

from . import knobs, layout, metrics
from .errors import ConfigError

# our flag -> (environment variable, metavar, help)
FLAGS = {
    "--dir": ("PYCKPT_DIR", "D", "checkpoint directory (default: $PYCKPT_DIR, else ./pyckpt-checkpoints)"),
    "--every": ("PYCKPT_EVERY", "E", "auto (interval from the measured cost), N steps, or Ns seconds"),
    "--every-steps": ("PYCKPT_EVERY_STEPS", "N", "checkpoint every N optimizer steps"),
    "--every-seconds": ("PYCKPT_EVERY_SECONDS", "S", "checkpoint every S seconds (default 600 when neither is set)"),
    "--keep": ("PYCKPT_KEEP", "K", "keep the newest K checkpoints (default 3)"),
    "--compress": ("PYCKPT_COMPRESS", "C", "none or zstd"),
    "--resume": ("PYCKPT_RESUME", "R", "auto (default), never, or a checkpoint directory"),
    "--resume-edited": ("PYCKPT_RESUME_EDITED", "M", "refuse (default) or tracked: resume an edited script's "
                        "models, optimizers, data position, RNG and loop counters (by name), not its other variables, or go on "
                        "over training data of another length (not exact)"),
}
MAX_RESTARTS = ("--max-restarts", "--max_restarts")
DEFAULT_MAX_RESTARTS = 3
# Options that mean "not a single-node job on its own": with any of them --standalone (which replaces
# the rendezvous with a private one on localhost) is not added; --nnodes 2 alone must not become standalone.
_RDZV = ("rdzv_backend", "rdzv_endpoint", "rdzv_id", "master_addr", "master_port", "standalone", "nnodes",
         "node_rank")

USAGE = """usage: pyckpt-run [--dir D] [--every E] [--every-steps N] [--every-seconds S] [--keep K]
                  [--compress C] [--resume R] [--resume-edited M] [--max-restarts R]
                  [torchrun options] script.py [script args]

Run script.py under torchrun with transparent pyckpt checkpointing in every
worker. When a worker dies the whole group is restarted (up to
--max-restarts times) and resumes from the newest checkpoint; launching the
same command again after the wrapper itself died resumes too.

pyckpt options:
{flags}
  --max-restarts R      restarts of the worker group before giving up (default 3)

torchrun options (see `python -m torch.distributed.run --help`), e.g.
  --nproc-per-node N    workers on this machine (default 1)
  --nnodes, --node-rank, --rdzv-backend, --rdzv-endpoint, --rdzv-id,
  --master-addr, --master-port
                        multi-node rendezvous (one pyckpt-run per node, a shared
                        --dir); without them --standalone is used

example:
  pyckpt-run --dir ckpt --every-steps 100 --nproc-per-node 2 train.py --epochs 10
"""


def usage() -> str:
    """The --help text."""
    flags = "\n".join(f"  {f} {m:<{19 - len(f)}} {h}" for f, (_, m, h) in FLAGS.items())
    return USAGE.format(flags=flags)


class UsageError(Exception):
    """A command line pyckpt-run cannot act on."""


def split_args(argv: Sequence[str]) -> tuple[dict[str, str], int, list[str]]:
    """Separate pyckpt flags (as env settings) and --max-restarts from torchrun's argv."""
    from torch.distributed.run import get_args_parser

    actions = get_args_parser()._option_string_actions
    env: dict[str, str] = {}
    restarts = DEFAULT_MAX_RESTARTS
    rest: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        name, eq, inline = tok.partition("=")
        if name in FLAGS or name in MAX_RESTARTS:
            if not eq:
                if i + 1 >= len(argv):
                    raise UsageError(f"{name} needs a value")
                inline, i = argv[i + 1], i + 1
            if name in MAX_RESTARTS:
                restarts = _int_flag(name, inline)
            else:
                env[FLAGS[name][0]] = inline
        elif tok.startswith("-") and tok != "-":
            rest.append(tok)
            action = actions.get(name)
            if action is None:
                raise UsageError(f"unknown option {name} (see pyckpt-run --help)")
            if not eq and action.nargs != 0:
                if i + 1 >= len(argv):
                    raise UsageError(f"{name} needs a value")
                rest.append(argv[i + 1])
                i += 1
        else:
            rest.extend(argv[i:])
            break
        i += 1
    return env, restarts, rest


def _int_flag(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise UsageError(f"{name}={raw!r}: expected an integer >= 0")
    return value


def torchrun_argv(argv: Sequence[str]) -> tuple[dict[str, str], int, list[str]]:
    """The PYCKPT_* settings, the number of restarts and the torchrun argv of one attempt."""
    from torch.distributed.run import get_args_parser

    env, restarts, rest = split_args(argv)
    if not rest or rest[-1].startswith("-") and not any(not t.startswith("-") for t in rest):
        raise UsageError("no training script given (see pyckpt-run --help)")
    parser = get_args_parser()
    try:
        given = parser.parse_args(rest)
    except SystemExit:
        raise UsageError("torchrun rejected the options above (see pyckpt-run --help)") from None
    if not getattr(given, "training_script", None):
        raise UsageError("no training script given")
    defaults = parser.parse_args([given.training_script])
    script_at = len(rest) - len(given.training_script_args) - 1
    extra = ["--max-restarts", str(restarts)]
    if not any(getattr(given, k) != getattr(defaults, k) for k in _RDZV):
        extra.append("--standalone")
    return env, restarts, extra + rest[:script_at] + rest[script_at:]


def apply_env(env: dict[str, str]) -> str:
    """Set the PYCKPT_* variables, validate every setting and the directory; returns the directory."""
    from .activation import DEFAULT_DIR, _check_writable

    os.environ.update(env)
    knobs.validate_all()  # first: an exported empty or remote PYCKPT_DIR is an error, not the default
    directory = knobs.resolve_dir(knobs.get("PYCKPT_DIR") or DEFAULT_DIR)
    os.environ["PYCKPT_DIR"] = directory  # workers must see a directory to turn on
    _check_writable(directory)
    return directory


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pyckpt-run``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        return 0 if argv else 2
    try:
        env, restarts, targv = torchrun_argv(argv)
        apply_env(env)
    except (UsageError, ConfigError) as e:
        sys.stderr.write(f"pyckpt-run: {e}\n")
        return 2
    # Without this the agent's restarted gloo group can dial the dead attempt's peers.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # One launch: its workers' restarts resume its own checkpoints whatever PYCKPT_RESUME says (resume.py).
    os.environ["PYCKPT_LAUNCH_ID"] = os.urandom(8).hex()
    started = time.time()
    rc = supervise([sys.executable, "-m", "torch.distributed.run", *targv])
    if rc != 0:
        line = after_failure(os.environ["PYCKPT_DIR"], started, rc, knobs.get("PYCKPT_RESUME"))
        if line:
            sys.stderr.write(line + "\n")
    return rc


def after_failure(directory: str, since: float, rc: int, resume: str) -> str | None:
    """One ``pyckpt-run:`` line after a launch that gave up: what the same command would resume from,
    and whether this launch's restarts got past the checkpoint they resumed from.

    torchrun's own summary names the failed worker but not the checkpoints; an operator deciding
    whether to relaunch needs both, and a failure that repeats after every resume is a bug to fix
    first, not a machine to replace. Read from ``metrics.jsonl`` (rank 0 records every save and
    restore) and the committed checkpoints; never raises."""
    if knobs.is_url(directory):
        return None  # an object-storage root: its listing is a network call, not for an exit path
    try:
        # (metrics.read keeps only records whose figures are numbers or null)
        records = [r for r in metrics.read(directory)[0] if (r.get("time") or 0.0) >= since]
        newest = layout.committed(directory)
    except OSError:
        return None
    restores = [r for r in records if r.get("event") == "restore"]
    head = f"pyckpt-run: the workers failed (exit status {rc})"
    if restores:
        first = restores[0]["time"]
        progressed = any(r.get("event") == "save" and r.get("ok") and r["time"] > first for r in records)
        steps = sorted({r.get("step") for r in restores}, key=str)
        if not progressed:
            n = len(restores)
            where = f"step {steps[0]}" if len(steps) == 1 else "steps " + ", ".join(map(str, steps))
            head += (f"; {n} resume{'s' if n > 1 else ''} of this launch (from {where}) failed again before "
                     "another checkpoint (a failure that repeats after a resume is more likely the script's or its "
                     "data's than the machine's: restarting again repeats it)")
    if not newest:
        return f"{head}; {directory} holds no committed checkpoint: the same command starts from the beginning"
    at = f"{newest[0].path} (step {newest[0].step})"
    if resume == "never":
        return f"{head}; the same command starts over (--resume never); --resume auto resumes from {at}"
    if resume != "auto":
        return f"{head}; the same command resumes from {resume} again; --resume auto resumes from {at}"
    return f"{head}; the same command resumes from {at}, or an older one if that one fails its checks"


def supervise(cmd: list[str]) -> int:
    """Run torchrun's agent (which restarts failed workers) and return its exit status.

    The agent runs as a child so that SIGTERM/SIGINT/SIGHUP sent to the
    wrapper reach it (and through it the workers) exactly once. Only the
    first is passed on: the agent stops its workers on it (they take their
    checkpoint first), and a second signal while it does made torch's agent
    abort and kill them, checkpoint and all (an operator's second kill, a
    supervisor that repeats its signal). SIGKILL still stops everything."""
    child = subprocess.Popen(cmd)
    passed: list[int] = []

    def forward(signum: int, frame: object) -> None:
        if child.poll() is not None:
            return
        if passed:
            sys.stderr.write(f"pyckpt-run: {signal.Signals(signum).name} again: not passed on; the workers are "
                             f"stopping after {signal.Signals(passed[0]).name} (under SIGTERM they checkpoint "
                             "first); SIGKILL stops them at once\n")
            return
        passed.append(signum)
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    rc = child.wait()
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main())
