"""pyckpt-run: help, argument translation, and a killed worker restarted by the wrapper."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pyckpt import layout, shm_tier
from pyckpt.run import main, torchrun_argv
from transparent_helpers import clean_env, load, tree_equal

DDP = Path(__file__).parent / "train_ddp.py"


def test_help_names_every_flag(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--dir", "--every ", "--every-steps", "--every-seconds", "--keep", "--max-restarts",
                 "--nproc-per-node", "script.py"):
        assert flag in text


def test_translation_defaults_and_script_args_untouched():
    env, restarts, argv = torchrun_argv(["--every-steps", "7", "--dir=ck", "--nproc-per-node", "2",
                                         "train.py", "--dir", "data", "--every-steps", "1"])
    assert env == {"PYCKPT_EVERY_STEPS": "7", "PYCKPT_DIR": "ck"}
    assert restarts == 3
    assert argv[argv.index("--max-restarts") + 1] == "3"
    assert "--standalone" in argv
    assert argv[argv.index("train.py"):] == ["train.py", "--dir", "data", "--every-steps", "1"]
    assert argv[argv.index("--nproc-per-node") + 1] == "2"


def test_every_flag_sets_pyckpt_every():
    env, _, argv = torchrun_argv(["--every", "auto", "--nproc-per-node", "2", "train.py", "--every", "3"])
    assert env == {"PYCKPT_EVERY": "auto"}
    assert argv[argv.index("train.py"):] == ["train.py", "--every", "3"]


def test_resume_edited_flag_sets_pyckpt_resume_edited():
    env, _, argv = torchrun_argv(["--resume-edited=tracked", "--resume", "auto", "train.py", "--resume-edited", "x"])
    assert env == {"PYCKPT_RESUME_EDITED": "tracked", "PYCKPT_RESUME": "auto"}
    assert argv[argv.index("train.py"):] == ["train.py", "--resume-edited", "x"]


def test_rendezvous_options_replace_standalone():
    _, restarts, argv = torchrun_argv(["--max-restarts", "5", "--rdzv-endpoint", "host:1234", "t.py"])
    assert restarts == 5 and "--standalone" not in argv
    # the elastic agent does the restarting
    assert argv[argv.index("--max-restarts") + 1] == "5"


@pytest.mark.parametrize("args,needle", [
    (["--every-steps", "abc", "t.py"], "PYCKPT_EVERY_STEPS"),
    (["--bogus", "t.py"], "--bogus"),
    (["--every-steps", "3"], "no training script"),
])
def test_bad_command_lines_exit_2(tmp_path, monkeypatch, capsys, args, needle):
    monkeypatch.chdir(tmp_path)
    for k in ("PYCKPT_DIR", "PYCKPT_EVERY_STEPS"):
        monkeypatch.delenv(k, raising=False)
    assert main(args) == 2
    assert needle in capsys.readouterr().err


def _plain_ddp(d: Path, **env: str) -> Path:
    plain = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            DDP, d / "plain.pt"], env=clean_env(**env), capture_output=True, text=True,
                           timeout=300, cwd=d)
    assert plain.returncode == 0, plain.stderr[-3000:]
    return d / "plain.pt"


@pytest.fixture(scope="module")
def plain_ddp(tmp_path_factory) -> Path:
    """The final state of one uninterrupted 2-rank run without pyckpt, shared by the tests below."""
    return _plain_ddp(tmp_path_factory.mktemp("plain_ddp"))


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("persistent", ["", "1"], ids=["workers", "persistent_workers"])
def test_killed_worker_is_restarted_and_resumes_exactly(tmp_path, plain_ddp, persistent):
    """DDP on gloo, 2 workers, DistributedSampler + workers + BatchNorm; rank 1 SIGKILLs itself once, in epoch 1.
    Persistent workers: the resumed epoch used to take the DistributedSampler's epoch from the iter() that
    started the workers (epoch 0's order, silently)."""
    r = subprocess.run([sys.executable, "-m", "pyckpt.run", "--dir", tmp_path / "ck", "--every-steps", "5",
                        "--nproc-per-node", "2", DDP, tmp_path / "res.pt"], capture_output=True, text=True,
                       timeout=400, cwd=tmp_path,
                       env=clean_env(KILL_AT="17", KILL_MARK=tmp_path / "mark", PERSISTENT=persistent))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "mark").exists()
    # rank 1 died (mark), yet the job finished: the elastic agent restarted the group, which resumed
    # (15 unless its commit was still running when rank 1 died at step 17 on a loaded machine)
    assert re.search(r"pyckpt: resumed from step (10|15) ", r.stderr), r.stderr[-3000:]
    # (persistent workers draw their seed from the main generator once, not at every epoch: another dropout)
    plain = _plain_ddp(tmp_path, PERSISTENT="1") if persistent else plain_ddp
    assert tree_equal(load(tmp_path / "res.pt"), load(plain))


@pytest.mark.dist
@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_all_ranks_at_one_step(tmp_path, plain_ddp):
    """Preemption: the agent forwards SIGTERM to both ranks; they agree on a step, snapshot, exit."""
    def torchrun(out, **env):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                               "2", DDP, out], env=clean_env(**env), capture_output=True, text=True, timeout=300,
                              cwd=tmp_path)

    env = dict(PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="1000", TERM_AGENT_AT="10",
               KILL_MARK=tmp_path / "mark")
    first = torchrun(tmp_path / "res.pt", **env)
    assert first.returncode != 0 and first.stderr.count("pyckpt: SIGTERM: checkpointing") == 2, first.stderr[-6000:]
    committed = [p.name for p in (tmp_path / "ck").iterdir() if layout.is_checkpoint_dir(str(p))]
    assert len(committed) == 1, (sorted(os.listdir(tmp_path / "ck")), first.stderr[-6000:])
    second = torchrun(tmp_path / "res.pt", **env)
    assert second.returncode == 0 and "pyckpt: resumed from step" in second.stderr, second.stderr[-6000:]
    assert tree_equal(load(tmp_path / "res.pt"), load(plain_ddp))


@pytest.mark.dist
@pytest.mark.slow
def test_sigterm_sent_twice_to_the_wrapper_still_checkpoints_every_rank(tmp_path, plain_ddp):
    """SIGTERM to pyckpt-run, then again: the agent gets it once, so its workers finish their checkpoint.
    Before, both were passed on; torch's agent, stopping its workers after the first, aborted on the second
    and killed them: no checkpoint, and a line saying a relaunch would start from the beginning."""
    def wrapper(**env):
        return subprocess.run([sys.executable, "-m", "pyckpt.run", "--dir", tmp_path / "ck", "--every-steps", "1000",
                               "--nproc-per-node", "2", DDP, tmp_path / "res.pt"], capture_output=True, text=True,
                              timeout=400, cwd=tmp_path, env=clean_env(**env))

    first = wrapper(TERM_WRAPPER_AT="10", KILL_MARK=tmp_path / "mark")
    assert first.returncode != 0 and first.stderr.count("pyckpt: SIGTERM: checkpointing") == 2, first.stderr[-6000:]
    assert "pyckpt-run: SIGTERM again: not passed on" in first.stderr, first.stderr[-6000:]
    committed = [p for p in (tmp_path / "ck").iterdir() if layout.is_checkpoint_dir(str(p))]
    assert len(committed) == 1, (sorted(os.listdir(tmp_path / "ck")), first.stderr[-6000:])
    assert f"the same command resumes from {committed[0]}" in first.stderr, first.stderr[-3000:]
    second = wrapper(KILL_MARK=tmp_path / "mark")
    assert second.returncode == 0 and "pyckpt: resumed from step" in second.stderr, second.stderr[-6000:]
    assert tree_equal(load(tmp_path / "res.pt"), load(plain_ddp))


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("tier", [False, True], ids=["storage", "memory_tier"])
def test_sigterm_to_one_rank_checkpoints_every_rank_to_storage(tmp_path, plain_ddp, tier):
    """A preemption notice that reaches one rank only: every rank takes that snapshot and commits it to
    storage before the signalled rank exits (the other rank's lazy commit once waited for its next
    optimizer step, stuck in a collective with the exiting rank, until the 60 s grace timer killed the
    job and the checkpoint with it). With the memory tier and PYCKPT_STORAGE_EVERY, that snapshot goes
    to storage too: a preempted job may come back on another machine. The relaunch, without the
    memory copy, resumes from it exactly."""
    env = dict(PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="1000", TERM_RANK1_AT="10",
               KILL_MARK=tmp_path / "mark")
    if tier:
        env.update(PYCKPT_SHM_MB="64", PYCKPT_STORAGE_EVERY="5")
    run = lambda: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", DDP,
         tmp_path / "res.pt"], env=clean_env(**env), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    memory = Path(shm_tier.shm_path(str(tmp_path / "ck")))
    try:
        first = run()
        assert first.returncode != 0 and "pyckpt: SIGTERM: checkpointing" in first.stderr, first.stderr[-3000:]
        assert "no checkpoint committed within" not in first.stderr, first.stderr[-3000:]  # the grace timer's line
        stored = [layout.parse_step(p.name) for p in (tmp_path / "ck").iterdir() if layout.is_checkpoint_dir(str(p))]
        assert len(stored) == 1 and stored[0] >= 10, (stored, first.stderr[-3000:])
        shutil.rmtree(memory, ignore_errors=True)  # as on another machine
        second = run()
        assert second.returncode == 0, second.stderr[-3000:]
        assert f"pyckpt: resumed from step {stored[0]} " in second.stderr
        assert tree_equal(load(tmp_path / "res.pt"), load(plain_ddp))
    finally:
        shutil.rmtree(memory, ignore_errors=True)


@pytest.mark.slow
def test_a_restart_under_resume_never_resumes_the_launchs_own_checkpoint(tmp_path):
    """`pyckpt-run --resume never` (start over, e.g. next to an earlier run's checkpoints): the worker
    SIGKILLs itself once at step 13; the agent restarts it with the same environment, and it used to
    train from step 1 again, silently dropping the checkpoints of steps 4-12 this launch had made."""
    from transparent_helpers import TINY, run_script

    plain = run_script([TINY, tmp_path / "plain.pt"], tmp_path)
    assert plain.returncode == 0, plain.stderr[-3000:]
    earlier = run_script([TINY, tmp_path / "earlier.pt"], tmp_path, PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="3",
                         EPOCHS="2")  # an earlier run's checkpoints in the same directory (steps 3-18, kept 12-18)
    assert earlier.returncode == 0, earlier.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "pyckpt.run", "--dir", tmp_path / "ck", "--every-steps", "4",
                        "--resume", "never", "--max-restarts", "1", "--nproc-per-node", "1", TINY, tmp_path / "res.pt"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=clean_env(KILL_AT="13", KILL_MARK=tmp_path / "mark"))
    assert r.returncode == 0 and (tmp_path / "mark").exists(), r.stderr[-3000:]
    # The first start trained from scratch (never); the restart resumed this launch's newest commit.
    assert "pyckpt: restart of this launch: resuming from its own newest checkpoint" in r.stderr, r.stderr[-3000:]
    assert re.search(r"pyckpt: resumed from step (8|12) ", r.stderr), r.stderr[-3000:]
    assert tree_equal(load(tmp_path / "res.pt"), load(tmp_path / "plain.pt"))


FAILS_AT_12 = """
import torch
model = torch.nn.Linear(4, 4)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(1, 30):
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    opt.zero_grad()
    if step == 12:
        raise ZeroDivisionError("the script's own bug, at step 12")
"""


def _wrapper_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("pyckpt-run:")]


@pytest.mark.slow
def test_a_failure_that_repeats_after_every_restart_is_named_with_the_checkpoint_a_relaunch_uses(tmp_path):
    """A worker that fails at the same step after each resume (a bug, not a machine): the agent's
    restarts only repeat it, and the wrapper used to end with torchrun's traceback and nothing else;
    it now says, in one line, that the launch's resumes (from step 10) each failed again before another
    checkpoint, and which checkpoint the same command would resume from."""
    script = tmp_path / "fails.py"
    script.write_text(FAILS_AT_12)
    r = subprocess.run([sys.executable, "-m", "pyckpt.run", "--dir", tmp_path / "ck", "--every-steps", "5",
                        "--max-restarts", "2", "--nproc-per-node", "1", script],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=clean_env())
    assert r.returncode != 0 and r.stderr.count("ZeroDivisionError: the script's own bug") == 3, r.stderr[-3000:]
    lines = _wrapper_lines(r.stderr)
    assert len(lines) == 1, r.stderr[-3000:]
    assert "; 2 resumes of this launch (from step 10) failed again before another checkpoint" in lines[0], lines
    assert f"the same command resumes from {tmp_path / 'ck' / 'step-000000010'} (step 10)" in lines[0], lines


@pytest.mark.slow
@pytest.mark.parametrize("resume", ["auto", "never"])
def test_a_launch_that_gives_up_names_what_the_same_command_would_do(tmp_path, resume):
    """No restarts left (--max-restarts 0): the one line names the newest checkpoint and whether the
    same command resumes from it (PYCKPT_RESUME=auto) or starts over (never)."""
    script = tmp_path / "fails.py"
    script.write_text(FAILS_AT_12)
    r = subprocess.run([sys.executable, "-m", "pyckpt.run", "--dir", tmp_path / "ck", "--every-steps", "5",
                        "--resume", resume, "--max-restarts", "0", "--nproc-per-node", "1", script],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=clean_env())
    assert r.returncode != 0, r.stderr[-3000:]
    lines = _wrapper_lines(r.stderr)
    assert len(lines) == 1 and "resume of this launch" not in lines[0], r.stderr[-3000:]
    newest = tmp_path / "ck" / "step-000000010"
    if resume == "auto":
        assert f"the same command resumes from {newest} (step 10)" in lines[0], lines
    else:
        assert f"the same command starts over (--resume never); --resume auto resumes from {newest} (step 10)" \
            in lines[0], lines


def test_a_launch_that_fails_before_any_checkpoint_says_a_relaunch_starts_from_the_beginning(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text("raise SystemExit(3)\n")
    r = subprocess.run([sys.executable, "-m", "pyckpt.run", "--dir", tmp_path / "ck", "--max-restarts", "0",
                        "--nproc-per-node", "1", script],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=clean_env())
    assert r.returncode != 0
    lines = _wrapper_lines(r.stderr)
    assert len(lines) == 1 and "holds no committed checkpoint: the same command starts from the beginning" \
        in lines[0], r.stderr[-3000:]


def test_a_launch_that_succeeds_adds_no_line(tmp_path):
    script = tmp_path / "ok.py"
    script.write_text("print('fine')\n")
    r = subprocess.run([sys.executable, "-m", "pyckpt.run", "--dir", tmp_path / "ck", "--nproc-per-node", "1", script],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=clean_env())
    assert r.returncode == 0 and "fine" in r.stdout and _wrapper_lines(r.stderr) == [], r.stderr[-3000:]


@pytest.mark.slow
def test_a_restart_that_got_past_its_checkpoint_is_not_called_a_repeat(tmp_path):
    """First attempt fails at step 12 (once), the restart resumes from 10, commits 15 and 20 and fails at 22:
    the launch made progress, so the line names step 20 and no repeating failure."""
    script = tmp_path / "fails.py"
    script.write_text(FAILS_AT_12.replace("if step == 12:", f"if step == 22 or (step == 12 and not os.path.exists("
                                          f"{str(tmp_path / 'mark')!r}) and not open({str(tmp_path / 'mark')!r}, "
                                          "'w').close()):").replace("import torch", "import os, torch"))
    r = subprocess.run([sys.executable, "-m", "pyckpt.run", "--dir", tmp_path / "ck", "--every-steps", "5",
                        "--max-restarts", "1", "--nproc-per-node", "1", script],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=clean_env())
    assert r.returncode != 0 and r.stderr.count("ZeroDivisionError: the script's own bug") == 2, r.stderr[-3000:]
    lines = _wrapper_lines(r.stderr)
    assert len(lines) == 1 and "failed again" not in lines[0], r.stderr[-3000:]
    assert f"the same command resumes from {tmp_path / 'ck' / 'step-000000020'} (step 20)" in lines[0], lines
