"""Chunk fingerprint speed (issue 9 item 3) and the bytes a LoRA fine-tune writes per checkpoint.

Prints, on this machine: the engine's fingerprint (AVX2 and portable loop), CRC32C (the kernel in use
and the crc32 instruction alone), the capture kernels (copy + CRC32C, copy + CRC32C + fingerprint, one
pass), the check of a chunk expected unchanged (fingerprint and CRC32C, in two reads and in one) and
memcpy throughput on one core over a buffer far larger than the caches; on a CUDA machine, the
fingerprint kernel on device memory against a device-to-host copy into pinned memory (best and median;
goal of issue 9: >= 1 TB/s on H100/H200-class memory); then a LoRA-like state (frozen base + small
adapters with Adam) saved by Checkpointer with incremental chunks on and off: bytes written, time to
``captured()`` and to the commit per save after the first. ``--only`` runs some parts alone: the
device part wants a buffer of a few GiB (``--mb 4096``), which takes ~1 ms at 4 TB/s, so that the
call's fixed cost does not count.

    python benchmarks/fingerprint.py [--mb 512] [--base-mb 400] [--saves 5] [--only host,device,lora]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import tempfile
import time
from typing import Callable

import torch

import pyckpt
from pyckpt import knobs
from pyckpt._native import native


def times(fn: Callable[[], object], reps: int) -> list[float]:
    """Seconds of each of ``reps`` calls (the device part reports best and median)."""
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def best(fn: Callable[[], object], reps: int = 5) -> float:
    return min(times(fn, reps))


def host(mb: int) -> None:
    C = native()
    n = mb << 20
    src = torch.randint(0, 256, (n,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.fill_(0)
    a, b = src.data_ptr(), dst.data_ptr()
    view = memoryview(src.numpy())
    rows = [
        ("memcpy (ctypes.memmove, 1 core)", best(lambda: ctypes.memmove(b, a, n))),
        (f"CRC32C (engine, {C.crc32c_kernel()}, 1 core)", best(lambda: C.crc32c_addr(a, n))),
        ("CRC32C (crc32 instruction only, 1 core)", best(lambda: C.crc32c_unfolded(view))),
        ("copy + CRC32C (capture kernel, 1 core)", best(lambda: C.copy_crc32c(b, a, n))),
        ("copy + CRC32C + fingerprint (capture, 1 core)", best(lambda: C.copy_crc32c_fingerprint(b, a, n))),
        (f"fingerprint (engine, {'AVX2' if C.fingerprint_simd() else 'portable'}, 1 core)",
         best(lambda: C.fingerprint_addr(a, n))),
        # What an incremental save reads to find a host chunk unchanged (PYCKPT_INCREMENTAL_VERIFY=auto).
        ("fingerprint, then CRC32C (two reads, 1 core)", best(lambda: (C.fingerprint_addr(a, n), C.crc32c_addr(a, n)))),
        ("fingerprint + CRC32C in one read (1 core)", best(lambda: C.crc32c_fingerprint(a, n))),
        ("fingerprint (portable loop, 1 core)", best(lambda: C.fingerprint_portable(view))),
    ]
    print(f"host, {mb} MiB buffer:")
    for name, t in rows:
        print(f"  {name:<44} {n / t / 1e9:7.2f} GB/s")


def device(mb: int, reps: int = 20) -> None:
    C = native()
    if not (C.cuda_available() and torch.cuda.is_available()):
        print("device: no CUDA build or no GPU here: fingerprint kernel not measured")
        return
    n = mb << 20
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    torch.cuda.synchronize()
    # Checked against the CPU definition on a 64 MiB prefix: the whole buffer would take seconds on
    # one core (tests/unit/test_incremental_gpu.py checks every size and alignment).
    k = min(n, 64 << 20)
    head = src[:k].cpu()
    assert C.fingerprint_addr(src.data_ptr(), k, 0) == C.fingerprint_addr(head.data_ptr(), k), \
        "GPU and CPU fingerprints differ"

    def d2h() -> None:
        pinned.copy_(src, non_blocking=True)
        torch.cuda.synchronize()

    def kernel() -> None:
        C.fingerprint_addr(src.data_ptr(), n, 0)

    # Timed per call with perf_counter, not CUDA events: the kernel runs on the engine's own stream
    # and the call returns only once its sums are on the host, so an event pair on torch's stream
    # would time the same thing. The call's fixed cost (descriptor copy, launch, 32-byte readback,
    # stream sync: tens of microseconds) is why the buffer must be large.
    kernel()  # first call allocates the kernel's scratch on the device
    rows = [("device-to-host copy into pinned memory", times(d2h, max(3, reps // 4))),
            ("fingerprint kernel (device memory)", times(kernel, reps))]
    print(f"device ({torch.cuda.get_device_name(0)}), {mb} MiB buffer, best / median:")
    for name, t in rows:
        print(f"  {name:<44} {n / min(t) / 1e9:8.1f} GB/s {n / statistics.median(t) / 1e9:8.1f} GB/s")
    tbps = n / statistics.median(rows[1][1]) / 1e12
    print(f"  goal (issue 9): fingerprint kernel >= 1 TB/s: {tbps:.3f} TB/s (median of {reps}): "
          f"{'PASS' if tbps >= 1.0 else 'FAIL'}")


class Lora(torch.nn.Module):
    def __init__(self, base_mb: int, rank: int = 8) -> None:
        super().__init__()
        d = 1024
        layers = max(1, (base_mb << 20) // (d * d * 4))
        self.base = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(layers))
        self.a = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(rank, d) * 0.01) for _ in range(layers))
        self.b = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(d, rank)) for _ in range(layers))
        for p in self.base.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        for lin, a, b in zip(self.base, self.a, self.b):
            x = torch.tanh(lin(x) + x @ a.t() @ b.t())
        return x


def _written(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs if f.endswith(".bin"))


def lora(base_mb: int, saves: int) -> None:
    torch.manual_seed(0)
    model = Lora(base_mb)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    trainable = sum(p.numel() * p.element_size() for p in params)
    trainable_state = 3 * trainable  # parameters + Adam exp_avg + exp_avg_sq
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values()) + 2 * trainable
    print(f"LoRA state: {total / 1e6:.1f} MB, trainable {trainable / 1e6:.2f} MB "
          f"(with Adam moments {trainable_state / 1e6:.2f} MB); {saves} saves each:")
    for inc in (True, False):
        root = tempfile.mkdtemp(prefix="pyckpt-fp-bench-")
        written, times, captured = [], [], []
        try:
            with knobs.override(PYCKPT_INCREMENTAL=None), pyckpt.Checkpointer(root, keep=2, incremental=inc) as ck:
                for step in range(saves):
                    model(torch.randn(8, 1024)).sum().backward()
                    opt.step()
                    opt.zero_grad()
                    os.sync()
                    t = time.perf_counter()
                    fut = ck.save(step, {"model": model.state_dict(), "optim": opt.state_dict()})
                    fut.captured()  # what the next optimizer step waits for: the unchanged base checked
                    captured.append(time.perf_counter() - t)
                    path = fut.result(300)
                    times.append(time.perf_counter() - t)
                    written.append(_written(path))
        finally:
            shutil.rmtree(root, ignore_errors=True)
        later = written[1:]
        print(f"  incremental={'on ' if inc else 'off'}: first save {written[0] / 1e6:8.1f} MB; later saves "
              f"{max(later) / 1e6:8.2f} MB max = {max(later) / trainable_state:6.2f}x the trainable state; "
              f"captured {statistics.median(captured[1:]):.3f} s, save to commit {statistics.median(times[1:]):.3f} s "
              "median")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=512)
    ap.add_argument("--base-mb", type=int, default=400)
    ap.add_argument("--saves", type=int, default=5)
    ap.add_argument("--only", default="host,device,lora",
                    help="comma-separated parts to run: host, device, lora (default: all)")
    ap.add_argument("--reps", type=int, default=20, help="device part: timed kernel calls")
    args = ap.parse_args()
    parts = set(args.only.split(","))
    if parts - {"host", "device", "lora"}:
        ap.error(f"--only: unknown part(s) {', '.join(sorted(parts - {'host', 'device', 'lora'}))}")
    if "host" in parts:
        host(args.mb)
    if "device" in parts:
        device(args.mb, args.reps)
    if "lora" in parts:
        lora(args.base_mb, args.saves)


if __name__ == "__main__":
    main()
