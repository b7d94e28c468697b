"""Random SIGKILL fuzz of transparent mode: train, kill at random moments, relaunch, compare bitwise.

The fixed kill points of the other fault tests (``PYCKPT_TEST_CRASH_AT``, a kill after step N) cover
the places someone thought of. This one kills a training script at random times (during start-up,
a resume, a capture, a write, a commit, the memory tier's copy, retention), one to three times in a
row, under random settings (interval, retention, lazy capture, incremental saves, the memory tier and
how often it goes to storage; sometimes the tier is wiped between runs, as a reboot would), and then
lets the last relaunch finish. Its final state must equal, bit for bit, that of a plain run of the
same script without pyckpt; a failed relaunch, a traceback or any difference is a failure, and its
directory is kept.

    python tests/faults/kill_fuzz.py --minutes 30
    python tests/faults/kill_fuzz.py --script examples/train_ddp.py --nproc 2 --minutes 30
    python tests/faults/kill_fuzz.py --script examples/train_ddp.py --nproc 2 --wrapper   # pyckpt-run restarts
    python tests/faults/kill_fuzz.py --script examples/train_augment.py --script-args="--persistent-workers"

The script must take ``--out PATH`` (its final state, ``torch.save``), ``--step-sleep S`` and print
``step N epoch E loss X`` lines, as the examples do. ``tests/faults/test_kill_fuzz.py`` runs a few
sequences of it in the suite; the long runs are for before a release or after a change to the
commit protocol.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
import _harness as h  # noqa: E402 - examples/ is not a package

TIMEOUT_S = 300.0  # one run to its end; a run that hangs is a failure
TIER_WIPED = 0.15  # chance that /dev/shm loses the memory tier between a kill and the relaunch


@dataclasses.dataclass
class Outcome:
    """One sequence: its settings, what happened at each kill, and the verdict."""

    settings: dict[str, str]
    events: list[str]
    ok: bool
    resumed: bool  # the last run resumed from a checkpoint
    finished: bool = False  # the last run found the run finished before (killed after its end): nothing to do
    detail: str = ""

    def line(self) -> str:
        kv = " ".join(f"{k.removeprefix('PYCKPT_')}={v}" for k, v in sorted(self.settings.items()))
        end = "resumed" if self.resumed else "had finished before" if self.finished else "started afresh"
        return f"{'ok  ' if self.ok else 'FAIL'} {kv} | {'; '.join(self.events)} | {end}" + (
            f"\n{self.detail}" if self.detail else "")


def random_settings(rnd: random.Random) -> dict[str, str]:
    """A random combination of the settings that change how snapshots are taken, kept and committed."""
    s = {"PYCKPT_EVERY_STEPS": str(rnd.choice([1, 2, 3, 5])), "PYCKPT_KEEP": str(rnd.choice([1, 2, 3])),
         "PYCKPT_LAZY": rnd.choice(["1", "1", "0"]), "PYCKPT_INCREMENTAL": rnd.choice(["1", "1", "0"])}
    if rnd.random() < 0.5:  # the memory tier, and storage written every Nth of its snapshots
        s.update(PYCKPT_SHM_MB="64", PYCKPT_STORAGE_EVERY=str(rnd.choice([1, 2, 3])))
    return s


def reference(script: Path, args: list[str], nproc: int, out: Path) -> None:
    """The script's final state without pyckpt (no PYCKPT_* variable), at ``out``."""
    run = h.launch(h.python_command(script, ["--out", str(out), *args], nproc), env=h.clean_env())
    rc = run.finish(TIMEOUT_S)
    if rc != 0 or not out.exists():
        raise RuntimeError(f"the reference run of {script} failed (exit {rc}):\n{run.stderr[-3000:]}")


def sequence(rnd: random.Random, script: Path, args: list[str], nproc: int, ref: Path, work: Path,
             first_after_commit: bool = False, wrapper: bool = False) -> Outcome:
    """Kill the script one to three times at random moments, relaunch it to its end and compare its final
    state with ``ref``. ``first_after_commit``: the first kill waits for a committed checkpoint (so a
    short run has at least one resume from storage or the memory tier). ``wrapper``: run it under
    ``pyckpt-run``, and kill one of its workers (the wrapper restarts the group) or, sometimes, the whole
    tree (then relaunched)."""
    settings = random_settings(rnd)
    ckpt, out = work / "ckpt", work / "final.pt"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = h.clean_env({"PYCKPT_DIR": str(ckpt), **settings})
    if wrapper:  # at most 3 kills: within the wrapper's default --max-restarts
        cmd = h.wrapper_command() + ["--nproc-per-node", str(nproc), str(script), "--out", str(out), *args]
    else:
        cmd = h.python_command(script, ["--out", str(out), *args], nproc)
    events: list[str] = []
    kills = rnd.choice([1, 1, 2, 3])
    proc = None
    restarted = False  # a worker of ``proc`` was killed: its output holds the dying group's tracebacks
    for k in range(kills):
        if proc is None:
            proc, restarted = h.launch(cmd, env=env), False
        if k == 0 and first_after_commit:
            proc.wait_until(lambda: bool(h.committed_steps(ckpt)), TIMEOUT_S)
            time.sleep(rnd.uniform(0.0, 0.3))  # somewhere in the steps, captures and commits after it
            how = "after a commit"
        elif rnd.random() < 0.5:  # a moment: start-up, a resume, anything
            delay = rnd.uniform(0.2, 6.0)
            proc.wait_until(lambda: False, delay)
            how = f"at {delay:.2f} s"
        else:  # a step of the run, then some part of it
            target = proc.last_step() + rnd.randint(1, 12)
            proc.wait_until(lambda: proc.last_step() >= target, TIMEOUT_S)
            time.sleep(rnd.uniform(0.0, 0.1))
            how = f"after step {target}"
        workers = h.elastic_workers(proc.popen.pid) if wrapper and rnd.random() < 0.7 else {}
        if workers:  # one worker: the wrapper restarts the group, which resumes
            rank = rnd.choice(sorted(workers))
            with contextlib.suppress(ProcessLookupError):  # it may have ended by now
                os.kill(workers[rank], signal.SIGKILL)
            events.append(f"killed worker {rank} {how} (step {proc.last_step()}, "
                          f"committed {h.committed_steps(ckpt)[-3:]})")
            restarted = True
            continue
        proc.kill()
        proc.finish(30)
        events.append(f"killed {how} (step {proc.last_step()}, committed {h.committed_steps(ckpt)[-3:]})")
        proc = None
        if "PYCKPT_SHM_MB" in settings and rnd.random() < TIER_WIPED:
            shutil.rmtree(_tier_path(ckpt), ignore_errors=True)
            events.append("memory tier wiped")
    if proc is None:
        proc = h.launch(cmd, env=env)
    rc = proc.finish(TIMEOUT_S)
    resumed = h.resume_line(proc.stderr) is not None
    finished = "already finished" in proc.stderr
    # After a worker was killed, only the last attempt's output (from its start-up line on) must be clean.
    start = proc.stderr.rfind("pyckpt: checkpointing to") if restarted else -1
    last = proc.stderr[start:] if start >= 0 else proc.stderr
    if rc != 0 or not out.exists() or "Traceback" in last:
        return Outcome(settings, events, False, resumed, finished, f"last run: exit {rc}\n{proc.stderr[-4000:]}")
    diff = h.diff_states(h.load_state(ref), h.load_state(out))
    if diff:
        said = "\n".join(line for line in proc.stderr.splitlines() if "pyckpt" in line)
        return Outcome(settings, events, False, resumed, finished, "differs from the plain run: " + "; ".join(diff[:5])
                       + "\n" + said[-3000:])
    return Outcome(settings, events, True, resumed, finished)


def _tier_path(ckpt: Path) -> str:
    from pyckpt import shm_tier

    return shm_tier.shm_path(str(ckpt))


def run(script: Path, args: list[str], nproc: int, work: Path, seed: int, sequences: int | None = None,
        seconds: float | None = None, first_after_commit: bool = False, wrapper: bool = False,
        say: Callable[[str], None] = print) -> list[Outcome]:
    """Run sequences (``sequences`` of them, or until ``seconds`` pass) in ``work``; returns their outcomes.
    A failing sequence's directory is kept as ``work/failed-<n>``. ``wrapper``: see ``sequence``."""
    rnd = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    ref = work / "reference.pt"
    reference(script, args, nproc, ref)
    outcomes: list[Outcome] = []
    end = None if seconds is None else time.monotonic() + seconds
    try:
        while (sequences is None or len(outcomes) < sequences) and (end is None or time.monotonic() < end):
            o = sequence(rnd, script, args, nproc, ref, work / "run", first_after_commit and not outcomes, wrapper)
            outcomes.append(o)
            say(f"[{len(outcomes)}] {o.line()}")
            if not o.ok:
                shutil.move(str(work / "run"), str(work / f"failed-{len(outcomes)}"))
    finally:
        h.cleanup_all()
        shutil.rmtree(_tier_path(work / "run" / "ckpt"), ignore_errors=True)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Kill a transparent-mode training script at random moments, "
                                "relaunch it, and check its final state is bitwise that of a plain run.")
    p.add_argument("--script", default=str(ROOT / "examples" / "train_single.py"),
                   help="a training script taking --out and --step-sleep (default: examples/train_single.py: "
                   "dropout draws in every step, a shuffled loader with two workers, OneCycleLR)")
    p.add_argument("--script-args", default="--samples 96", help="more arguments for the script, one string "
                   "(default: --samples 96, 36 steps)")
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun) per run")
    p.add_argument("--wrapper", action="store_true", help="run the script under pyckpt-run and mostly kill one "
                   "of its workers (the wrapper restarts the group), sometimes the whole tree")
    p.add_argument("--step-sleep", type=float, default=0.05, help="the script's --step-sleep: a slower step "
                   "spreads the kills over more of a run")
    p.add_argument("--minutes", type=float, default=10.0, help="how long to go on (default 10)")
    p.add_argument("--sequences", type=int, default=None, help="stop after this many sequences")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: from the time; printed)")
    p.add_argument("--work", default="/tmp/pyckpt-kill-fuzz", help="working directory (emptied first)")
    a = p.parse_args(argv)
    seed = a.seed if a.seed is not None else int(time.time())
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    print(f"kill_fuzz: seed {seed}, {a.script}, {a.nproc} process(es), work in {work}", flush=True)
    args = ["--step-sleep", str(a.step_sleep), *a.script_args.split()]
    outcomes = run(Path(a.script), args, a.nproc, work, seed, a.sequences, a.minutes * 60, wrapper=a.wrapper,
                   say=lambda s: print(s, flush=True))
    failed = [i + 1 for i, o in enumerate(outcomes) if not o.ok]
    resumed = sum(o.resumed for o in outcomes)
    print(f"kill_fuzz: {len(outcomes)} sequences, {resumed} ended in a resume, {len(failed)} failed"
          + (f" ({', '.join(map(str, failed))}; kept in {work}/failed-N)" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
