"""Kill/relaunch scenarios on top of ``examples/_harness.py``, so tests stay short.

A scenario runs an example under pyckpt, SIGKILLs its whole process tree when a
condition holds (a step line was printed, a checkpoint was committed, a
checkpoint is being written), relaunches the same command, and then checks
that the relaunched run really resumed (from the newest committed checkpoint,
continuing at the next step) and finished with exactly the reference state.
"""
from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import _harness
from _harness import Run

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RUN_TIMEOUT_S = 120  # a whole run takes seconds; this only turns a hang into a failure
KILL_TIMEOUT_S = 120
# Checkpointed runs sleep this long after each step (an argument of the example
# scripts), so a kill triggered by a step line lands within that step.
STEP_SLEEP = "0.05"


@dataclass(frozen=True)
class Example:
    script: str
    nproc: int = 1
    steps: int = 0  # optimizer steps in a full run, for sanity checks

    @property
    def path(self) -> Path:
        return EXAMPLES / self.script

    def command(self, out: Path, sleep: str | None = STEP_SLEEP, script: Path | None = None) -> list[str]:
        args = ["--out", str(out)] + (["--step-sleep", sleep] if sleep else [])
        return _harness.python_command(script or self.path, args, self.nproc)


SINGLE = Example("train_single.py", steps=18)  # 3 epochs x 6 steps
DDP = Example("train_ddp.py", nproc=2, steps=16)  # 4 epochs x 4 steps (8 micro-batches, accum 2)
GAN = Example("train_gan.py", steps=18)  # 3 epochs x 6 steps
LORA = Example("train_lora.py", steps=24)  # 3 epochs x 8 steps
INFINITE = Example("train_infinite.py", steps=20)  # one endless epoch, stopped at step 20
GPT = Example("train_gpt.py", steps=20)  # 20 iterations of a range loop, no DataLoader


@dataclass
class Reference:
    state: object
    steps: list[tuple[int, int, str]]


def run_to_end(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> Run:
    """Run a command to completion and insist that it succeeded."""
    run = _harness.launch(cmd, env, cwd)
    rc = run.finish(RUN_TIMEOUT_S)
    assert rc == 0, f"{cmd} exited with {rc}; stderr tail:\n{run.stderr[-8000:]}"
    return run


def _crashed_in_native_code(run: Run) -> bool:
    """The run died by a signal or hung until the harness killed it, not by a Python exception."""
    rc = run.popen.returncode
    text = run.stderr
    return rc < 0 or "[harness] killed after" in text or "Fatal Python error" in text or "(SIGABRT)" in text


def run_plain(cmd: list[str], cwd: Path | None = None) -> Run:
    """Run a command without pyckpt (a reference run) to completion.

    Reference runs only produce the expected values; pyckpt is not loaded in them. On a loaded
    2-core machine a plain accelerate + torchrun (gloo) job once hung while its DataLoader started
    a worker, until the harness's timeout killed it: a run that hung or died by a signal (never
    one that raised a Python exception) is retried once, saying so on stderr. Runs with pyckpt on
    are never retried: a hang or crash there is a failure."""
    run = _harness.launch(cmd, _harness.clean_env(), cwd)
    if run.finish(RUN_TIMEOUT_S) != 0 and _crashed_in_native_code(run):
        print(f"reference run crashed outside Python (exit {run.popen.returncode}), retrying once; "
              f"stderr tail:\n{run.stderr[-12000:]}", file=sys.stderr)
        return run_to_end(cmd, _harness.clean_env(), cwd)
    rc = run.popen.returncode
    assert rc == 0, f"{cmd} exited with {rc}; stderr tail:\n{run.stderr[-8000:]}"
    return run


def plain_reference(example: "Example", out: Path, extra: list[str]) -> Reference:
    """A plain run of ``example`` with the options ``extra`` (writing ``out``), every step printed: the
    reference of a variant the cached ``References`` do not hold."""
    run = run_plain(example.command(out, sleep=None) + extra)
    assert [s for s, _, _ in run.steps()] == list(range(1, example.steps + 1)), run.stdout
    return Reference(_harness.load_state(out), run.steps())


class References:
    """Plain (no pyckpt) runs of each example, computed once and cached."""

    def __init__(self, root: Path):
        self.root = root
        self._cache: dict[str, Reference] = {}

    def plain_run(self, example: Example, out: Path) -> Reference:
        run = run_plain(example.command(out, sleep=None))
        steps = run.steps()
        assert [s for s, _, _ in steps] == list(range(1, example.steps + 1)), run.stdout
        return Reference(_harness.load_state(out), steps)

    def get(self, example: Example) -> Reference:
        if example.script not in self._cache:
            out = self.root / (Path(example.script).stem + ".pt")
            self._cache[example.script] = self.plain_run(example, out)
        return self._cache[example.script]


def pyckpt_env(ckpt_dir: Path | None, every_steps: int, **extra: str) -> dict[str, str]:
    """Environment that turns pyckpt on (env-var mode when ``ckpt_dir`` is given)."""
    settings = {"PYCKPT_EVERY_STEPS": str(every_steps), **extra}
    if ckpt_dir is not None:
        settings["PYCKPT_DIR"] = str(ckpt_dir)
    return _harness.clean_env(settings)


def tier_env(ckpt_dir: Path, every_steps: int, storage_every: int = 2, **extra: str) -> dict[str, str]:
    """``pyckpt_env`` with the host-memory tier on: every snapshot kept in /dev/shm, every
    ``storage_every``-th one also written to ``ckpt_dir``."""
    return pyckpt_env(ckpt_dir, every_steps, PYCKPT_SHM_MB="64", PYCKPT_STORAGE_EVERY=str(storage_every), **extra)


def tier_path(ckpt_dir: Path) -> Path:
    """Where the memory tier of ``ckpt_dir`` lives (/dev/shm/pyckpt-<hash>)."""
    from pyckpt import shm_tier

    return Path(shm_tier.shm_path(str(ckpt_dir)))


def tier_steps(ckpt_dir: Path) -> list[int]:
    """Committed snapshots in the memory tier of ``ckpt_dir`` (none when it is off)."""
    return _harness.committed_steps(tier_path(ckpt_dir))


# ----------------------------------------------------------------------------- kill points

Condition = Callable[[Run], bool]


def at_step(n: int) -> Condition:
    return lambda run: run.last_step() >= n


def after_commit(ckpt_dir: Path, step: int) -> Condition:
    """Right after the checkpoint of ``step`` (or a later one) has its MANIFEST.json."""
    return lambda run: any(s >= step for s in _harness.committed_steps(ckpt_dir))


def during_write(ckpt_dir: Path) -> Condition:
    """While a checkpoint newer than the newest committed one is still a ``.tmp-*`` dir."""
    def writing(run: Run) -> bool:
        committed = _harness.committed_steps(ckpt_dir)
        return bool(committed) and any(t > committed[-1] for t in _harness.in_progress_steps(ckpt_dir))
    return writing


# ----------------------------------------------------------------------------- scenarios

@dataclass
class Crash:
    killed: Run
    committed: list[int]  # committed checkpoint steps once everything was dead (storage and memory tier)
    in_progress: list[int]  # .tmp-* checkpoint steps left behind by the kill
    resumed: Run
    resume: dict | None = field(default=None)
    in_memory: list[int] = field(default_factory=list)  # of ``committed``: those in the memory tier
    in_storage: list[int] = field(default_factory=list)  # of ``committed``: those in PYCKPT_DIR


def launch_and_kill(cmd: list[str], env: dict[str, str], out: Path, kill_when: Condition,
                    cwd: Path | None = None) -> Run:
    """Launch and SIGKILL the process tree once ``kill_when`` holds (one link of a kill chain)."""
    run = _harness.launch(cmd, env, cwd)
    reached = run.wait_until(lambda: kill_when(run), KILL_TIMEOUT_S)
    assert reached and run.popen.poll() is None, (
        f"the kill point was never reached while the run was alive (exit {run.popen.poll()}, "
        f"last step {run.last_step()}); stderr tail:\n{run.stderr[-3000:]}")
    run.kill()
    assert not out.exists(), "the killed run finished before the kill landed"
    return run


def kill_and_relaunch(cmd: list[str], env: dict[str, str], ckpt_dir: Path, out: Path,
                      kill_when: Condition, relaunch_env: dict[str, str] | None = None,
                      cwd: Path | None = None) -> Crash:
    """Launch, SIGKILL the process tree once ``kill_when`` holds, relaunch to the end."""
    run = launch_and_kill(cmd, env, out, kill_when, cwd)
    stored, in_memory = _harness.committed_steps(ckpt_dir), tier_steps(ckpt_dir)
    in_progress = _harness.in_progress_steps(ckpt_dir)
    resumed = run_to_end(cmd, relaunch_env or env, cwd)
    return Crash(run, sorted(set(stored) | set(in_memory)), in_progress, resumed,
                 _harness.resume_line(resumed.stderr), in_memory, stored)


def sigterm_and_relaunch(cmd: list[str], env: dict[str, str], ckpt_dir: Path, out: Path, at_step: int,
                         between: Callable[[], None] | None = None) -> Crash:
    """SIGTERM the run once it printed step ``at_step``; it must take one checkpoint *in storage* (a
    preempted job may come back on another machine, without this one's memory tier) and exit by the
    signal before the end. Then call ``between`` (if given) and relaunch to the end."""
    run = _harness.launch(cmd, env)
    assert run.wait_until(lambda: run.last_step() >= at_step, KILL_TIMEOUT_S), run.stderr[-3000:]
    os.kill(run.popen.pid, signal.SIGTERM)
    rc = run.finish(RUN_TIMEOUT_S)
    assert rc in (-signal.SIGTERM, 128 + signal.SIGTERM), f"exit status {rc}:\n{run.stderr[-3000:]}"
    assert not out.exists(), "the job trained to the end instead of stopping"
    committed = _harness.committed_steps(ckpt_dir)
    assert len(committed) == 1 and at_step <= committed[0] <= run.last_step(), (committed, run.last_step())
    in_memory = tier_steps(ckpt_dir)
    if between is not None:
        between()
    resumed = run_to_end(cmd, env)
    return Crash(run, committed, [], resumed, _harness.resume_line(resumed.stderr), in_memory, committed)


def assert_lines_match(run: Run, reference: Reference) -> None:
    """Every ``step N ...`` line equals the reference run's line for step N."""
    by_step = {s: (e, rest) for s, e, rest in reference.steps}
    for step, epoch, rest in run.steps():
        assert by_step.get(step) == (epoch, rest), (
            f"step {step}: got 'epoch {epoch} loss {rest}', reference "
            f"{by_step.get(step)}; the numerics diverged")


def assert_state_equal(reference: Reference, out: Path) -> None:
    problems = _harness.diff_states(reference.state, _harness.load_state(out))
    assert not problems, "final state differs from the plain run:\n" + "\n".join(problems[:40])


def assert_resumed_exactly(crash: Crash, reference: Reference, out: Path,
                           optimizer_steps_per_line: tuple[int, ...] = (1,), no_loader: bool = False) -> None:
    """The relaunch resumed from the newest checkpoint, continued at the next step, ended equal.

    ``optimizer_steps_per_line``: how many optimizer steps pyckpt may count per
    printed step (a GAN steps two optimizers per batch). ``no_loader``: no DataLoader drives the
    loop, so the resume line names no epoch and the snapshot's own step is printed again.
    """
    assert crash.committed, "no checkpoint had been committed before the kill"
    assert crash.resume, ("the relaunched run did not print 'pyckpt: resumed from step ...'; "
                          f"stderr tail:\n{crash.resumed.stderr[-3000:]}")
    assert crash.resume["step"] == crash.committed[-1], (
        f"resumed from step {crash.resume['step']}, newest committed was {crash.committed}")
    printed = crash.resumed.steps()
    # Without a DataLoader the snapshot lies inside iteration N, after optimizer.step(): the relaunch
    # finishes that iteration, so a script printing after the step prints N again.
    redone = 1 if no_loader else 0
    first = printed[0][0] - 1 + redone  # steps already done when training continued
    assert first > 0, "the relaunch started training from scratch"
    assert any(crash.resume["step"] == k * first for k in optimizer_steps_per_line), (
        f"resumed from checkpoint step {crash.resume['step']} but training continued at "
        f"printed step {first + 1}")
    # The resume line names the epoch the script itself was in: that of the last step
    # before the snapshot, or of the next one when the snapshot fell on an epoch boundary.
    epoch_of = {step: epoch for step, epoch, _ in reference.steps}
    if no_loader:  # it says so instead: "(after optimizer.step(), no DataLoader position)"
        assert crash.resume["epoch"] is None, crash.resume
    else:
        assert crash.resume["epoch"] in (epoch_of.get(first), epoch_of.get(first + 1)), (
            f"resume line says epoch {crash.resume['epoch']}, the script was in epoch "
            f"{epoch_of.get(first)} at step {first}")
    expected = list(range(first + 1 - redone, reference.steps[-1][0] + 1))
    assert [s for s, _, _ in printed] == expected, "the resumed run skipped or repeated steps"
    assert_lines_match(crash.killed, reference)
    assert_lines_match(crash.resumed, reference)
    assert_state_equal(reference, out)
