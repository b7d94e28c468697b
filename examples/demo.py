"""pyckpt end-to-end demonstration (``make demo``).

1. Train ``examples/train_ddp.py`` on 2 processes without pyckpt: the reference.
2. Train it again under ``pyckpt-run --every-steps N``, SIGKILL one worker part
   of the way through, and let the wrapper restart the workers, which resume
   from the newest checkpoint.
3. Compare the final weights, optimizer, scheduler and GradScaler state with the
   reference, bit for bit. Exit status 0 when equal, 1 otherwise.

The training script itself never mentions pyckpt. Everything is written under
``./demo-out/`` (recreated on every run).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402

SCRIPT = Path(__file__).resolve().parent / "train_ddp.py"
NPROC = 2


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="pyckpt end-to-end demonstration")
    p.add_argument("--out-dir", default="demo-out", help="working directory (recreated)")
    p.add_argument("--every-steps", type=int, default=3, help="checkpoint interval")
    p.add_argument("--kill-at-step", type=int, default=7, help="kill a worker after this step")
    p.add_argument("--kill-rank", type=int, default=1, help="which worker to kill")
    p.add_argument("--timeout", type=float, default=300, help="give up on a run after this long")
    return p.parse_args()


def say(text: str = "") -> None:
    print(text, flush=True)


def show_line(stream: str, line: str) -> None:
    """Echo the training progress and pyckpt's own messages, not launcher chatter."""
    if _harness.STEP_RE.match(line) or (stream == "err" and "pyckpt" in line):
        say(f"    | {line}")
    elif stream == "err" and "will restart worker group" in line:
        say(f"    | [elastic agent] {line.split('] ', 1)[-1].strip()}")


def reference_run(out_dir: Path, timeout: float) -> tuple[object, int] | None:
    out = out_dir / "reference.pt"
    cmd = _harness.python_command(SCRIPT, ["--out", str(out)], NPROC)
    say(f"[1/3] Reference: {NPROC} processes, no pyckpt, never interrupted")
    say(f"    $ torchrun --standalone --nproc-per-node {NPROC} {rel(SCRIPT)} --out {rel(out)}")
    start = time.monotonic()
    run = _harness.launch(cmd)
    if run.finish(timeout) != 0:
        say(f"    the reference run failed:\n{run.stderr[-3000:]}")
        return None
    say(f"    finished {run.last_step()} optimizer steps in {time.monotonic() - start:.1f} s")
    return _harness.load_state(out), run.last_step()


def interrupted_run(out_dir: Path, args: argparse.Namespace) -> int | None:
    """Run under pyckpt-run, kill one worker at ``--kill-at-step``; return the wrapper's status."""
    ckpt, out = out_dir / "checkpoints", out_dir / "resumed.pt"
    flags = ["--dir", str(ckpt), "--every-steps", str(args.every_steps), "--nproc-per-node", str(NPROC)]
    script_args = ["--out", str(out), "--step-sleep", "0.1"]
    say(f"\n[2/3] The same script under pyckpt-run; one worker will be killed with SIGKILL")
    say(f"    $ pyckpt-run {' '.join(flags).replace(str(ckpt), rel(ckpt))} {rel(SCRIPT)} "
        f"{' '.join(script_args).replace(str(out), rel(out))}")
    run = _harness.launch(_harness.wrapper_command() + flags + [str(SCRIPT)] + script_args,
                          echo=show_line)
    if not run.wait_until(lambda: run.last_step() >= args.kill_at_step, args.timeout):
        say(f"    the run ended before step {args.kill_at_step}:\n{run.stderr[-3000:]}")
        run.cleanup()
        return None
    kill_worker(run, ckpt, args.kill_rank)
    status = run.finish(args.timeout)
    say(f"    pyckpt-run exited with status {status}")
    if status != 0:
        say(f"    its stderr ended with:\n{run.stderr[-3000:]}")
    resumed = _harness.resume_line(run.stderr)
    if resumed is None:
        say("    no worker reported a resume: the restart trained from scratch")
        return None
    return status


def kill_worker(run: _harness.Run, ckpt: Path, rank: int) -> None:
    workers = _harness.elastic_workers(run.popen.pid)
    pid = workers.get(rank)
    committed = ", ".join(map(str, _harness.committed_steps(ckpt))) or "none"
    if pid is None:
        say(f"    !!! no worker with rank {rank} found (found {workers})")
        return
    os.kill(pid, signal.SIGKILL)
    say(f"    >>> SIGKILL worker rank {rank} (pid {pid}) after step {run.last_step()}; "
        f"committed checkpoints: step {committed}")
    say("    >>> pyckpt-run restarts the workers, which resume from the newest checkpoint")


def compare(reference: object, out_dir: Path) -> bool:
    say("\n[3/3] Final state of the interrupted run vs the reference")
    result = _harness.load_state(out_dir / "resumed.pt")
    all_equal = True
    for section in reference:
        problems = _harness.diff_states(reference[section], result.get(section), section)
        tensors = _harness.count_tensors(reference[section])
        what = f"{tensors:>3} tensors" if tensors else "  settings"
        verdict = ("bitwise equal" if tensors else "equal") if not problems \
            else f"DIFFERENT ({len(problems)} entries)"
        say(f"    {section:<7}{what}: {verdict}")
        for problem in problems[:5]:
            say(f"        {problem}")
        all_equal = all_equal and not problems
    return all_equal


def rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main() -> int:
    args = parse_args()
    out_dir = Path(args.out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    say("pyckpt demo: kill a data-parallel training job part-way, resume it, compare\n")
    try:
        ref = reference_run(out_dir, args.timeout)
        status = None if ref is None else interrupted_run(out_dir, args)
        equal = status == 0 and compare(ref[0], out_dir)
    finally:
        _harness.cleanup_all()
    if equal:
        say("\nRESULT: the run that lost a worker ended with exactly the weights, optimizer,"
            "\n        scheduler and loss-scaler state of the run that was never interrupted.")
        return 0
    say("\nRESULT: FAILED (see above)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
