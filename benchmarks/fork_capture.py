"""What a live fork-based DataLoader costs a checkpoint's capture.

A ``DataLoader`` with ``num_workers > 0`` forks its workers each time an iterator is made (every
epoch unless ``persistent_workers``), and they live while it is used. Memory the parent writes
after a fork is copied page by page if the child still shares it. This times ``captured()`` of a
pyckpt ``Checkpointer.save`` of a changing state (every tensor changed before each save, as an
optimizer step would) with no workers alive, and right after a fresh iterator's two workers
(``multiprocessing_context="fork"``) started; rounds alternate the two. Prints the medians and
their ratio.

    python benchmarks/fork_capture.py [--mb 512] [--rounds 5] [--dir DIR]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import torch
from torch.utils.data import DataLoader, Dataset


class _Numbers(Dataset):
    def __len__(self) -> int:
        return 1 << 20

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([i], dtype=torch.float32)


def _timed_save(ck, step: int, state: dict) -> float:
    for t in state.values():
        t.add_(1e-3)  # every chunk changed: incremental saves would skip an unchanged one
    t0 = time.perf_counter()
    fut = ck.save(step, state)
    assert fut.captured(120)
    took = time.perf_counter() - t0
    assert fut.wait(300)
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=512, help="state size in MiB (4 MiB tensors)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    args = ap.parse_args()

    from pyckpt import Checkpointer  # after argparse: --help needs no engine

    root = tempfile.mkdtemp(prefix="pyckpt-fork-", dir=args.dir)
    state = {f"t{i}": torch.randn(1 << 20) for i in range(args.mb // 4)}
    loader = DataLoader(_Numbers(), batch_size=64, num_workers=2, multiprocessing_context="fork")
    alone, with_workers = [], []
    try:
        ck = Checkpointer(root, keep=2)
        for step in range(1, 3):  # staging allocated and touched
            _timed_save(ck, step, state)
        for _ in range(args.rounds):
            step += 1
            alone.append(_timed_save(ck, step, state))
            it = iter(loader)  # forks the workers, which live until the iterator goes
            next(it)
            step += 1
            with_workers.append(_timed_save(ck, step, state))
            del it
        ck.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    a, w = statistics.median(alone), statistics.median(with_workers)
    print(f"{args.mb} MiB state, {args.rounds} rounds, torch {torch.__version__}")
    print("| captured() | median | all |")
    print("|---|---:|---|")
    print(f"| no workers alive | {a:.3f} s | {' '.join(f'{x:.3f}' for x in alone)} |")
    print(f"| two forked DataLoader workers alive | {w:.3f} s | {' '.join(f'{x:.3f}' for x in with_workers)} |")
    print(f"ratio with workers / without: {w / a:.2f}")


if __name__ == "__main__":
    main()
