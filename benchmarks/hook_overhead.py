"""Hook overhead of transparent mode on steps without a snapshot.

Trains a small MLP from an in-memory DataLoader with pyckpt off and on
(``pyckpt.enable``/``disable`` in the same process, snapshots so rare they
never happen), alternating rounds so drift affects both alike, and prints
the median step time of each and their paired ratio. The hooks' own cost per
step is measured on the same loop around a 4-wide model (where it is not lost in
the noise of the math) and printed as a share of the small model's step.
Target: under 1 %.

It also prints the cost of capturing the script's loop state (docs/TRANSPARENCY.md
"Loop state") for a script with 100 globals (numbers, strings, small tensors and
lists, a plain object) inside two nested ``for`` loops. Target: under 1 ms per snapshot. Then the same with
30 of the script's classes and 30 of its functions more (holding no values; then each class holding two
constants, which are kept), and with a list of a million file names and a dict of 200,000 entries (over the
16 MiB cap: left out).
And the part of the hooks' cost that the loader's sampler watch (pyckpt/sampler_draws.py)
takes, the watch on and off in adjacent rounds of the 4-wide loop; and what pyckpt adds to the start of
an epoch (``iter()`` and the first fetch: the random states kept there), which the 4-wide loop pays
once per 64 steps and a loop that makes an iterator per step pays at every step.

    python benchmarks/hook_overhead.py [--steps 200] [--rounds 15] [--width 512] [--loop-state-only]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pyckpt.activation as activation


def make_job(width: int, batch: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1000, 0.9)
    data = TensorDataset(torch.randn(batch * 64, width), torch.randint(0, 10, (batch * 64,)))
    return model, opt, sched, data


def time_steps(model, opt, sched, data, steps: int, batch: int, warmup: int = 10) -> float:
    """Seconds per training step over ``steps`` steps (loader fetch + forward/backward/step), after
    ``warmup`` untimed ones (pyckpt's one-time set-up at the first step is not a per-step cost)."""
    loader = DataLoader(data, batch_size=batch, shuffle=True)
    loss_fn = nn.CrossEntropyLoss()
    done = 0
    start = time.perf_counter()
    while done < steps + warmup:
        for x, y in loader:
            if done == warmup:
                start = time.perf_counter()
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            sched.step()
            done += 1
            if done == steps + warmup:
                break
    return (time.perf_counter() - start) / steps


def _script_code(constants: bool) -> str:
    """Source of 30 classes and 30 functions, run in ``__main__`` under this file's name (the script's own)."""
    body = "    A = {i}\n    B = 'x{i}'\n" if constants else ""
    return "".join(f"class _BenchC{i}:\n{body.format(i=i)}    def m(self):\n        return {i}\n\n"
                   f"def _bench_f{i}(x):\n    return x + {i}\n\n" for i in range(30))


def _script_value(i: int) -> Any:
    """The ``i``-th of the benchmark script's globals: numbers, strings, small tensors and lists in turn."""
    return (i, i * 0.5, f"name{i}", torch.full((16,), float(i)), [i, i + 1, i + 2])[i % 5]


class _Trainer:  # a plain script object: its attributes are captured too
    def __init__(self):
        self.iter_num, self.best_loss, self.history = 0, 1.5, [0.5] * 20


def _timed_capture(times: torch.Tensor, k: int) -> None:
    """Capture the loop state of the script frames calling this; its seconds go to ``times[k]`` (a tensor: the
    timings, a variable of the loop, add one small tensor to each capture, not a list growing with each)."""
    from pyckpt import frames, loopstate

    t0 = time.perf_counter()
    loopstate.capture(frames.user_frames(sys._getframe(1)), "step", 16 << 20, [])
    times[k] = time.perf_counter() - t0


def _timed_loops(repeats: int) -> float:
    """Median seconds of a capture at each step of two nested ``for`` loops (epochs, batches)."""
    times = torch.zeros(repeats, dtype=torch.float64)
    k = 0
    for _epoch in range(3):
        for _i, _x in enumerate(range(repeats // 3)):
            _timed_capture(times, k)
            k += 1
    return statistics.median(times[:k].tolist())


def loop_state_cost(repeats: int = 300, extra: str = "") -> float:
    """Median seconds to capture the loop state of a script with 100 globals, and the globals the source
    ``extra`` makes when run in ``__main__`` (names starting ``_bench``/``_Bench``). The benchmark's own
    bookkeeping is kept out of the frames captured (no list of names, no list of timings)."""
    exec(compile(extra, __file__, "exec"), vars(sys.modules["__main__"]))  # noqa: S102 - the benchmark's own source
    for i in range(99):
        vars(sys.modules["__main__"])[f"_bench_g{i}"] = _script_value(i)
    vars(sys.modules["__main__"])["_bench_trainer"] = _Trainer()
    try:
        return _timed_loops(repeats)
    finally:
        for name in [n for n in vars(sys.modules["__main__"]) if n.startswith(("_bench", "_Bench"))]:
            del vars(sys.modules["__main__"])[name]


def paired(width: int, batch: int, steps: int, rounds: int, tmp: str) -> tuple[list[float], list[float]]:
    """Seconds per step without and with pyckpt's hooks, one pair per round (adjacent in time, so
    drift affects both alike)."""
    off, on = [], []
    for _ in range(rounds):
        # Objects are built after enable() so the registries see them, as in a real script.
        off.append(time_steps(*make_job(width, batch), steps, batch))
        activation.enable(tmp, every_steps=10**9, every_seconds=10**9, resume="never")
        on.append(time_steps(*make_job(width, batch), steps, batch))
        activation.disable()
    return off, on


def watch_cost(steps: int, rounds: int, tmp: str) -> float:
    """Seconds per step the loader's sampler watch (pyckpt/sampler_draws.py) adds to the 4-wide loop (64
    batches per epoch): pyckpt on, the watch on and off in adjacent rounds."""
    from pyckpt import loader_state

    watched = loader_state._watched
    on, off = [], []
    activation.enable(tmp, every_steps=10**9, every_seconds=10**9, resume="never")
    try:
        for _ in range(rounds):
            on.append(time_steps(*make_job(4, 4), steps, 4))
            loader_state._watched = lambda loader: False
            off.append(time_steps(*make_job(4, 4), steps, 4))
            loader_state._watched = watched
    finally:
        loader_state._watched = watched
        activation.disable()
    return statistics.median(b - a for a, b in zip(off, on))


def epoch_start_cost(rounds: int, tmp: str, epochs: int = 40) -> tuple[float, float]:
    """Median seconds of ``iter(loader)`` plus its first fetch in the 4-wide loop, without and with pyckpt
    (alternating rounds; the epochs train between, as in a script)."""
    def one_round() -> float:
        model, opt, _sched, data = make_job(4, 4)
        loader = DataLoader(data, batch_size=4, shuffle=True)
        times = []
        for _ in range(epochs):
            t0 = time.perf_counter()
            it = iter(loader)
            next(it)
            times.append(time.perf_counter() - t0)
            for x, _y in it:
                opt.zero_grad()
                model(x).sum().backward()
                opt.step()
        return statistics.median(times)

    off, on = [], []
    for _ in range(rounds):
        off.append(one_round())
        activation.enable(tmp, every_steps=10**9, every_seconds=10**9, resume="never")
        on.append(one_round())
        activation.disable()
    return statistics.median(off), statistics.median(on)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--loop-state-only", action="store_true", help="only the loop-state capture figures")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.loop_state_only:
        print_loop_state_costs()
        return
    tmp = tempfile.mkdtemp(prefix="pyckpt-bench-")
    off, on = paired(args.width, args.batch, args.steps, args.rounds, tmp)
    t_off, t_on = statistics.median(off), statistics.median(on)
    ratio = statistics.median(b / a for a, b in zip(off, on))
    print(f"small model step ({args.width}-wide MLP, batch {args.batch}): {t_off * 1e3:.3f} ms without pyckpt, "
          f"{t_on * 1e3:.3f} ms with (median of {args.rounds} rounds of {args.steps} steps); "
          f"paired ratio {ratio:.4f}")
    # The hooks' own cost, measured where it is not lost in the noise of a real step: the same loop
    # around a 4-wide model (a loader fetch, an optimizer step and a scheduler step, nearly no math).
    t_off4, t_on4 = paired(4, 4, args.steps, args.rounds, tmp)
    hook = statistics.median(b - a for a, b in zip(t_off4, t_on4))
    print(f"per-step hook cost: {hook * 1e6:.1f} us = {100 * hook / t_off:.3f} % of the small model's step "
          f"(goal < 1 %)")
    watch = watch_cost(args.steps, args.rounds, tmp)
    print(f"of which the sampler watch: {watch * 1e6:.1f} us per step (4-wide loop, 64 batches per epoch)")
    start_off, start_on = epoch_start_cost(max(3, args.rounds // 3), tmp)
    print(f"epoch start (iter() + first fetch, 4-wide loop): {start_off * 1e6:.0f} us without pyckpt, "
          f"{start_on * 1e6:.0f} us with (+{(start_on - start_off) * 1e6:.0f} us per epoch)")
    print_loop_state_costs()


def print_loop_state_costs() -> None:
    cost = loop_state_cost()
    print(f"loop-state capture, script with 100 globals: {cost * 1e3:.3f} ms per snapshot (median of 300; "
          "goal < 1 ms)")
    for what, extra in (("+ 30 classes and 30 functions holding no values", _script_code(False)),
                        ("+ the same, each class holding two constants", _script_code(True)),
                        ("+ a list of 1,000,000 file names and a dict of 200,000 entries",
                         "_bench_names = [f'/data/{i:08d}.jpg' for i in range(1_000_000)]\n"
                         "_bench_index = {i: 2 * i for i in range(200_000)}\n")):
        print(f"loop-state capture, {what}: {loop_state_cost(30, extra) * 1e3:.3f} ms per snapshot (median of 30)")


if __name__ == "__main__":
    main()
