"""Chunk fingerprint speed (issue 9 item 3) and the bytes a LoRA fine-tune writes per checkpoint.

Prints, on this machine: the engine's fingerprint (AVX2 and portable loop), CRC32C (the kernel
in use and the crc32 instruction alone), the capture kernels (copy + CRC32C, copy + CRC32C +
fingerprint, one pass) and memcpy throughput on one core over a buffer far larger than the caches; on a CUDA machine, the
fingerprint kernel on device memory against a device-to-host copy into pinned memory; then a
LoRA-like state (frozen base + small adapters with Adam) saved by Checkpointer with incremental
chunks on and off: bytes written and time per save after the first.

    python benchmarks/fingerprint.py [--mb 512] [--base-mb 400] [--saves 5]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import tempfile
import time

import torch

import pyckpt
from pyckpt import knobs
from pyckpt._native import native


def best(fn, reps: int = 5) -> float:
    out = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


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
        ("fingerprint (portable loop, 1 core)", best(lambda: C.fingerprint_portable(view))),
    ]
    print(f"host, {mb} MiB buffer:")
    for name, t in rows:
        print(f"  {name:<44} {n / t / 1e9:7.2f} GB/s")


def device(mb: int) -> None:
    C = native()
    if not (C.cuda_available() and torch.cuda.is_available()):
        print("device: no CUDA build or no GPU here: fingerprint kernel not measured")
        return
    n = mb << 20
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    torch.cuda.synchronize()
    cpu_fp = C.fingerprint(src.cpu().numpy().tobytes())
    assert C.fingerprint_addr(src.data_ptr(), n, 0) == cpu_fp, "GPU and CPU fingerprints differ"

    def d2h():
        pinned.copy_(src, non_blocking=True)
        torch.cuda.synchronize()

    rows = [("device-to-host copy into pinned memory", best(d2h)),
            ("fingerprint kernel (device memory)", best(lambda: C.fingerprint_addr(src.data_ptr(), n, 0)))]
    print(f"device ({torch.cuda.get_device_name(0)}), {mb} MiB buffer:")
    for name, t in rows:
        print(f"  {name:<44} {n / t / 1e9:7.2f} GB/s")


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
        written, times = [], []
        try:
            with knobs.override(PYCKPT_INCREMENTAL=None), pyckpt.Checkpointer(root, keep=2, incremental=inc) as ck:
                for step in range(saves):
                    model(torch.randn(8, 1024)).sum().backward()
                    opt.step()
                    opt.zero_grad()
                    os.sync()
                    t = time.perf_counter()
                    path = ck.save(step, {"model": model.state_dict(), "optim": opt.state_dict()}).result(300)
                    times.append(time.perf_counter() - t)
                    written.append(_written(path))
        finally:
            shutil.rmtree(root, ignore_errors=True)
        later = written[1:]
        print(f"  incremental={'on ' if inc else 'off'}: first save {written[0] / 1e6:8.1f} MB; later saves "
              f"{max(later) / 1e6:8.2f} MB max = {max(later) / trainable_state:6.2f}x the trainable state; "
              f"save to commit {sorted(times[1:])[len(later) // 2]:.3f} s median")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=512)
    ap.add_argument("--base-mb", type=int, default=400)
    ap.add_argument("--saves", type=int, default=5)
    args = ap.parse_args()
    host(args.mb)
    device(args.mb)
    lora(args.base_mb, args.saves)


if __name__ == "__main__":
    main()
