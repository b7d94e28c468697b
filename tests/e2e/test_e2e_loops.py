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
from pathlib import Path

import pytest

import _harness
from e2e_helpers import EXAMPLES, KILL_TIMEOUT_S, RUN_TIMEOUT_S, after_commit, assert_state_equal, at_step, \
    kill_and_relaunch, pyckpt_env, run_to_end, Reference

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("pyckpt_installed")]

SLEEP = ["--step-sleep", "0.05"]
RESUMED_RE = re.compile(r"pyckpt: resumed from step (\d+) ")
FINAL_RE = re.compile(r"^FINAL .*")


def _cmd(script: str, out: Path, sleep: bool = True) -> list[str]:
    return _harness.python_command(EXAMPLES / script, ["--out", str(out), *(SLEEP if sleep else [])])


def _final(run) -> str:
    lines = [line for line in run.stdout_lines if FINAL_RE.match(line)]
    assert len(lines) == 1, run.stdout[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """script -> (Reference, FINAL line) of a run without pyckpt, made once per module."""
    root = tmp_path_factory.mktemp("loops_plain")
    cache: dict[str, tuple[Reference, str]] = {}

    def get(script: str) -> tuple[Reference, str]:
        if script not in cache:
            out = root / (Path(script).stem + ".pt")
            run = run_to_end(_cmd(script, out, sleep=False), _harness.clean_env())
            cache[script] = (Reference(_harness.load_state(out), run.steps()), _final(run))
        return cache[script]

    return get


def _check(crash, ref: Reference, final: str, out: Path, first_offset: int) -> None:
    """Resumed from the newest commit; printed steps continue with no repeat or gap; equal state."""
    assert crash.committed, "nothing was committed before the kill"
    m = RESUMED_RE.search(crash.resumed.stderr)
    assert m, f"no resume line:\n{crash.resumed.stderr[-3000:]}"
    resumed_at = int(m.group(1))
    assert resumed_at == crash.committed[-1], (resumed_at, crash.committed)
    printed = [s for s, _, _ in crash.resumed.steps()]
    last = ref.steps[-1][0]
    assert printed == list(range(resumed_at + first_offset, last + 1)), (
        f"resumed at {resumed_at}, the relaunch printed steps {printed}")
    by_step = {s: (e, rest) for s, e, rest in ref.steps}
    for run in (crash.killed, crash.resumed):
        for step, epoch, rest in run.steps():
            assert by_step[step] == (epoch, rest), f"step {step} differs from the plain run: {rest}"
    assert _final(crash.resumed) == final
    assert_state_equal(ref, out)
    assert "warning" not in crash.resumed.stderr + crash.killed.stderr, crash.killed.stderr + crash.resumed.stderr


def test_trainer_object_with_infinite_sampler_and_workers(plain, tmp_path):
    # Trainer.run keeps self.iter_num; 2 loader workers; killed mid-run, after the commit of step 12.
    ref, final = plain("loop_trainer.py")
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.pt"
    crash = kill_and_relaunch(_cmd("loop_trainer.py", out), pyckpt_env(ckpt, every_steps=4), ckpt, out,
                              after_commit(ckpt, 12))
    _check(crash, ref, final, out, first_offset=1)


def test_enumerate_index_and_global_step(plain, tmp_path):
    # enumerate(loader) with `if i >= max_batches: break` and a global_step warm-up LR. The checkpoint
    # of step 7 is taken at the fetch that ends epoch 0 by the break (7 steps per epoch); killed right
    # after its commit, so the relaunch restores i = 7 and breaks at once.
    ref, final = plain("loop_enumerate.py")
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.pt"
    crash = kill_and_relaunch(_cmd("loop_enumerate.py", out), pyckpt_env(ckpt, every_steps=7), ckpt, out,
                              after_commit(ckpt, 7))
    _check(crash, ref, final, out, first_offset=1)


def test_module_level_while_loop_killed_during_evaluation(plain, tmp_path):
    # No DataLoader: snapshots at the end of optimizer.step(); killed right after the evaluation
    # at iteration 15 printed (random eval batches, prefetched X, Y, accumulation, global iter_num).
    ref, final = plain("loop_while.py")
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.pt"
    crash = kill_and_relaunch(_cmd("loop_while.py", out), pyckpt_env(ckpt, every_steps=4), ckpt, out,
                              lambda run: any(line.startswith("eval 15 ") for line in run.stdout_lines))
    _check(crash, ref, final, out, first_offset=0)


def test_hand_written_updates_with_carried_hidden_state_via_pyckpt_run(plain, tmp_path):
    # No optimizer: snapshots at the end of backward(); killed in the last epoch, after the global
    # lr was divided by 4, so lr, hidden state, enumerate(range(...)) and epoch all come back.
    # Launched by the pyckpt-run wrapper (torchrun, one worker).
    ref, final = plain("loop_rnn.py")
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.pt"
    cmd = [*_harness.wrapper_command(), "--dir", str(ckpt), "--every-steps", "5", "--max-restarts", "0",
           str(EXAMPLES / "loop_rnn.py"), "--out", str(out), *SLEEP]
    crash = kill_and_relaunch(cmd, _harness.clean_env(), ckpt, out, after_commit(ckpt, 30))
    assert crash.committed[-1] == 30  # epoch 4 (9 steps per epoch), after lr /= 4
    assert any(" lr 5" in line for line in crash.resumed.stdout_lines)
    _check(crash, ref, final, out, first_offset=0)


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
