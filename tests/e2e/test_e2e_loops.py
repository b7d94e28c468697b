"""Kill/relaunch the loop-shape examples (issue 6): scripts that keep their position in their own
variables. Each ends bitwise equal to a plain run, prints the same final counters, and its step
numbers continue from the resume point with no repeat and no gap.

Resume points: ``loop_trainer.py`` and ``loop_enumerate.py`` are DataLoader-driven (the snapshot is
at the next fetch, so the relaunch prints step N+1 first); ``loop_while.py`` and ``loop_rnn.py``
have no DataLoader (the snapshot is at the end of ``optimizer.step()`` / ``backward()`` inside
iteration N, so the relaunch finishes that iteration and prints step N first).
"""
from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import _harness
from e2e_helpers import EXAMPLES, KILL_TIMEOUT_S, RUN_TIMEOUT_S, Condition, Reference, after_commit, \
    assert_state_equal, at_step, pyckpt_env, run_plain, run_to_end

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("pyckpt_installed")]

SLEEP = ["--step-sleep", "0.05"]
RESUMED_RE = re.compile(r"pyckpt: resumed from step (\d+) ")
FINAL_RE = re.compile(r"^FINAL .*")


def _cmd(script: str, out: Path, sleep: bool = True, nproc: int = 1) -> list[str]:
    return _harness.python_command(EXAMPLES / script, ["--out", str(out), *(SLEEP if sleep else [])], nproc)


def _final(run) -> str:
    lines = [line for line in run.stdout_lines if FINAL_RE.match(line)]
    assert len(lines) == 1, run.stdout[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """(script, ranks) -> (Reference, FINAL line) of a run without pyckpt, made once per module."""
    root = tmp_path_factory.mktemp("loops_plain")
    cache: dict[tuple[str, int], tuple[Reference, str]] = {}

    def get(script: str, nproc: int = 1) -> tuple[Reference, str]:
        if (script, nproc) not in cache:
            out = root / f"{Path(script).stem}-{nproc}.pt"
            run = run_plain(_cmd(script, out, sleep=False, nproc=nproc))
            cache[script, nproc] = (Reference(_harness.load_state(out), run.steps()), _final(run))
        return cache[script, nproc]

    return get


@dataclass(frozen=True)
class Shape:
    """One loop shape, how it is launched, and the kill points of its chain (in order)."""

    script: str
    every: int  # PYCKPT_EVERY_STEPS
    kills: tuple[Callable[[Path], Condition], ...]  # ckpt dir -> when to SIGKILL the current run
    first_offset: int  # the relaunch prints resume step + this first (1: loader fetch, 0: step point)
    mode: str = "env"  # env: PYCKPT_DIR; import: `import pyckpt` as the script's first line; wrapper: pyckpt-run
    nproc: int = 1
    # Per kill point, the step after which the script waits (LOOP_HOLD_AFTER_STEP) until it is killed, or None.
    holds: tuple[int | None, ...] = ()


def _eval_printed(n: int) -> Callable[[Path], Condition]:
    return lambda ckpt: lambda run: any(line.startswith(f"eval {n} ") for line in run.stdout_lines)


def _mid(n: int) -> Callable[[Path], Condition]:
    """Once step ``n`` was printed and a checkpoint is committed (the kill lands between commits)."""
    return lambda ckpt: lambda run: at_step(n)(run) and bool(_harness.committed_steps(ckpt))


def _after_commit(n: int) -> Callable[[Path], Condition]:
    return lambda ckpt: after_commit(ckpt, n)


SHAPES = {
    # Trainer.run keeps self.iter_num; endless RandomSampler, 2 loader workers. Killed mid-run at step
    # 6, then right after the commit of step 12. Each of those runs waits after a step until killed:
    # the commit of step 12 is made at step 13's optimizer step (lazy capture), and with only 7 steps
    # left a late commit was seen only as the run ended (in 3 of ~10 full-suite runs).
    "trainer": Shape("loop_trainer.py", 4, (_mid(6), _after_commit(12)), first_offset=1, holds=(6, 13)),
    # enumerate(loader), `if i >= max_batches: break`, global_step warm-up LR; 7 steps per epoch.
    # Killed mid-epoch 1 (resumes at the fetch of step 7 that ends epoch 0 by the break: i = 7 is
    # restored and breaks at once), then right after the commit of step 14 (the same in epoch 1).
    "enumerate": Shape("loop_enumerate.py", 7, (_mid(10), _after_commit(14)), first_offset=1, mode="import"),
    # No DataLoader: snapshots at the end of optimizer.step(). Killed mid-run, then right after the
    # evaluation at iteration 15 printed (random eval batches, prefetched X, Y, accumulation).
    "while": Shape("loop_while.py", 4, (_mid(6), _eval_printed(15)), first_offset=0),
    # No optimizer: snapshots at the end of backward(). Killed in epoch 2, then right after the commit
    # of step 30 (epoch 4, 9 steps per epoch, after the global lr was divided by 4). pyckpt-run.
    "rnn": Shape("loop_rnn.py", 5, (_mid(12), _after_commit(30)), first_offset=0, mode="wrapper"),
    # The enumerate shape on 2 ranks (DDP, gloo, DistributedSampler); the whole tree is killed.
    "enumerate-ddp": Shape("loop_enumerate.py", 5, (_mid(12),), first_offset=1, nproc=2),
}


def _launch_spec(shape: Shape, tmp: Path, out: Path) -> tuple[list[str], dict[str, str], Path | None, Path]:
    """(command, environment, working directory, checkpoint directory) for the shape's mode."""
    args = ["--out", str(out), *SLEEP]
    if shape.mode == "import":  # the script with one added first line, run from its own directory
        script = tmp / shape.script
        script.write_text("import pyckpt\n" + (EXAMPLES / shape.script).read_text())
        return (_harness.python_command(script, args, shape.nproc), pyckpt_env(None, every_steps=shape.every), tmp,
                tmp / "pyckpt-checkpoints")
    ckpt = tmp / "ckpt"
    if shape.mode == "wrapper":
        cmd = [*_harness.wrapper_command(), "--dir", str(ckpt), "--every-steps", str(shape.every),
               "--max-restarts", "0", "--nproc-per-node", str(shape.nproc), str(EXAMPLES / shape.script), *args]
        return cmd, _harness.clean_env(), None, ckpt
    return (_harness.python_command(EXAMPLES / shape.script, args, shape.nproc),
            pyckpt_env(ckpt, every_steps=shape.every), None, ckpt)


def _chain(shape: Shape, ref: Reference, final: str, tmp: Path) -> list[tuple[int, list[int]]]:
    """Kill at each of the shape's points in turn, relaunching after each, then run to the end.
    After every relaunch: resumed from the newest commit, printed steps continue with no repeat or
    gap, every step line equals the plain run's; at the end the same FINAL line and a bitwise
    equal state. Returns (resumed-at, printed steps) of each relaunch."""
    out = tmp / "final.pt"
    cmd, env, cwd, ckpt = _launch_spec(shape, tmp, out)
    by_step = {s: (e, rest) for s, e, rest in ref.steps}
    last = ref.steps[-1][0]
    resumes, newest = [], 0
    for n in range(len(shape.kills) + 1):
        if n < len(shape.kills):
            hold = shape.holds[n] if n < len(shape.holds) else None
            run = _harness.launch(cmd, env if hold is None else {**env, "LOOP_HOLD_AFTER_STEP": str(hold)}, cwd)
            when = shape.kills[n](ckpt)
            reached = run.wait_until(lambda: when(run), KILL_TIMEOUT_S)
            assert reached and run.popen.poll() is None, (
                f"kill point {n} was never reached while the run was alive (exit {run.popen.poll()}, "
                f"last step {run.last_step()}); stderr tail:\n{run.stderr[-3000:]}")
            run.kill()
            assert not out.exists(), "the killed run finished before the kill landed"
        else:
            run = run_to_end(cmd, env, cwd)
        printed = [s for s, _, _ in run.steps()]
        for step, epoch, rest in run.steps():
            assert by_step[step] == (epoch, rest), f"run {n}: step {step} differs from the plain run: {rest}"
        assert "warning" not in run.stderr, run.stderr[-3000:]
        if n == 0:
            assert "resumed from" not in run.stderr and printed == list(range(1, len(printed) + 1)), printed
        else:
            m = RESUMED_RE.search(run.stderr)
            assert m, f"run {n}: no resume line:\n{run.stderr[-3000:]}"
            resumed_at = int(m.group(1))
            assert resumed_at == newest, f"run {n} resumed at {resumed_at}, the newest commit was {newest}"
            first = resumed_at + shape.first_offset
            assert printed == list(range(first, first + len(printed))) and printed, (
                f"run {n}: resumed at {resumed_at}, printed steps {printed}")
            resumes.append((resumed_at, printed))
        if n < len(shape.kills):
            committed = _harness.committed_steps(ckpt)
            assert committed and committed[-1] > newest, f"run {n} committed nothing new: {committed}"
            newest = committed[-1]
    assert resumes[-1][1][-1] == last
    assert _final(run) == final
    assert_state_equal(ref, out)
    return resumes


@pytest.mark.parametrize("name", ["trainer", "enumerate", "while", "rnn"])
def test_loop_shape_killed_at_several_points_resumes_exactly(name, plain, tmp_path):
    shape = SHAPES[name]
    ref, final = plain(shape.script)
    resumes = _chain(shape, ref, final, tmp_path)
    if name == "enumerate":
        assert [r for r, _ in resumes] == [7, 14]  # both at the fetch that ends an epoch by the break
    if name == "rnn":
        assert resumes[-1][0] == 30 and all(" lr 5" in line for line in _step_lines(resumes[-1][1], ref))


def _step_lines(steps: list[int], ref: Reference) -> list[str]:
    by_step = {s: rest for s, _, rest in ref.steps}
    return [by_step[s] for s in steps]


@pytest.mark.dist
@pytest.mark.slow
def test_enumerate_shape_under_ddp_on_gloo_resumes_exactly(plain, tmp_path):
    # torchrun, 2 ranks: DDP and a DistributedSampler; the whole process tree is SIGKILLed mid-epoch.
    shape = SHAPES["enumerate-ddp"]
    ref, final = plain(shape.script, nproc=2)
    assert [s for s, _, _ in ref.steps] == list(range(1, 22)) and "global_step 21" in final
    resumes = _chain(shape, ref, final, tmp_path)
    assert resumes[0][0] == 10  # epoch 1, i = 3: mid-epoch


def test_never_killed_while_loop_equals_plain_and_an_edited_script_is_refused(plain, tmp_path):
    ref, final = plain("loop_while.py")
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.pt"
    script = tmp_path / "loop_while.py"
    shutil.copy(EXAMPLES / "loop_while.py", script)
    env = pyckpt_env(ckpt, every_steps=4)
    run = run_to_end(_harness.python_command(script, ["--out", str(out)]), env)
    assert _final(run) == final and _harness.committed_steps(ckpt)
    assert_state_equal(ref, out)
    # The same command with one edited line: refused at the first step, with one line, exit 2.
    script.write_text(script.read_text().replace("learning_rate, min_lr, warmup_iters = 3e-3, 3e-4, 4",
                                                 "learning_rate, min_lr, warmup_iters = 2e-3, 3e-4, 4"))
    newest = ckpt / f"step-{_harness.committed_steps(ckpt)[-1]:09d}"
    edited = _harness.launch(_harness.python_command(script, ["--out", str(tmp_path / "edited.pt")]),
                             {**env, "PYCKPT_RESUME": str(newest)})
    assert edited.finish(RUN_TIMEOUT_S) == 2, edited.stderr[-3000:]
    lines = [line for line in edited.stderr_lines if line.startswith("pyckpt: cannot resume")]
    assert len(lines) == 1 and "changed since the checkpoint was written" in lines[0], edited.stderr
    assert "PYCKPT_RESUME=never" in lines[0]
    assert not (tmp_path / "edited.pt").exists() and "resumed from" not in edited.stderr


UNRESTORABLE = '''
import sys, torch
import pyckpt  # import mode: checkpoints in ./pyckpt-checkpoints
from torch import nn

def batches():
    g = torch.Generator().manual_seed(0)
    while True:
        yield torch.randn(4, 3, generator=g)

stream = batches()
model = nn.Linear(3, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(6):
    x = next(stream)
    opt.zero_grad(); model(x).sum().backward(); opt.step()
print("DONE", step)
'''


def test_unrestorable_variable_the_loop_reads_is_warned_at_the_first_snapshot(tmp_path):
    (tmp_path / "gen.py").write_text(UNRESTORABLE)
    run = _harness.launch(_harness.python_command(tmp_path / "gen.py", []), pyckpt_env(None, every_steps=2),
                          cwd=tmp_path)
    assert run.finish(KILL_TIMEOUT_S) == 0, run.stderr
    warnings = [line for line in run.stderr_lines if line.startswith("pyckpt: warning")]
    assert len(warnings) == 1, run.stderr  # once, at the first snapshot, not at every one
    assert "stream" in warnings[0] and "generator" in warnings[0] and "pyckpt.register" in warnings[0]
    assert _harness.committed_steps(tmp_path / "pyckpt-checkpoints") == [2, 4, 6]
