"""Save/load benchmark: pyckpt against torch.save, torch.distributed.checkpoint and the raw disk.

All contenders write the same ~1.5 GB state (a 125M-parameter fp32 model plus
its Adam state) to the same directory in one run, with fsync, and the script
prints every figure and the ratios the project's goals are stated in.

    python benchmarks/save_load.py [--params 125e6] [--dir /tmp/pyckpt-bench] [--repeat 3]

Each figure is the best of ``--repeat`` runs. Loads are timed on a warm page
cache (every file is read once before timing) so they measure CPU work, not
the disk.
"""
from __future__ import annotations

import argparse
import mmap
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

os.environ.setdefault("PYCKPT_DISABLE", "1")  # the explicit API only; no transparent hooks

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

import pyckpt
from pyckpt import _native

import _page_cache  # benchmarks/_page_cache.py (the script's folder is on sys.path)


def build_state(n_params: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A stack of square Linear layers with ~n_params parameters and one Adam step taken."""
    width = 2048
    layers = max(1, round(n_params / (width * width + width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    return model, opt


def state_of(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    return {"model": model.state_dict(), "optim": opt.state_dict()}


def tensor_bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in _flat(state))


def fsync_tree(path: str) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def best_of(repeat: int, fn: Callable[[], dict]) -> dict:
    """Run fn ``repeat`` times; keep the run with the smallest 'total'."""
    runs = [fn() for _ in range(repeat)]
    return min(runs, key=lambda r: r["total"])


class Bench:
    def __init__(self, root: str, state: dict, nbytes: int, repeat: int):
        self.root, self.state, self.nbytes, self.repeat = root, state, nbytes, repeat
        self.rows: dict[str, dict] = {}

    def path(self, name: str) -> str:
        """A fresh output path; called before each timed run starts."""
        p = os.path.join(self.root, name)
        shutil.rmtree(p, ignore_errors=True)
        os.sync()  # no dirty pages or pending frees of earlier runs leak into this one
        return p

    def record(self, name: str, fn: Callable[[], dict]) -> None:
        row = best_of(self.repeat, fn)
        self.rows[name] = row
        extra = "".join(f"  {k}={v:.3f}s" for k, v in row.items() if k != "total")
        print(f"  {name:<44} total={row['total']:.3f}s  {self.nbytes / row['total'] / 1e9:5.2f} GB/s{extra}",
              flush=True)

    # ---- writes -------------------------------------------------------
    def raw_write(self, direct: bool) -> dict:
        """The same bytes written sequentially by one thread, then fsync: the disk's floor.

        ``direct``: O_DIRECT through one 16 MiB aligned buffer (no page cache)."""
        p = self.path("raw")
        os.makedirs(p)
        tensors = list(_flat(self.state))
        t0 = time.perf_counter()
        fd = os.open(os.path.join(p, "blob"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0),
                     0o644)
        sink = _DirectSink(fd) if direct else None
        for t in tensors:
            buf = memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())
            if sink:
                sink.write(buf)
            else:
                while buf:
                    buf = buf[os.write(fd, buf):]
        if sink:
            sink.close()
        os.fsync(fd)
        os.close(fd)
        return {"total": time.perf_counter() - t0}

    def torch_save(self, crc: bool) -> dict:
        p = self.path("torch_save")
        os.makedirs(p)
        torch.serialization.set_crc32_options(crc)
        try:
            t0 = time.perf_counter()
            torch.save(self.state, os.path.join(p, "ckpt.pt"))
            fsync_tree(p)
            return {"total": time.perf_counter() - t0}
        finally:
            torch.serialization.set_crc32_options(True)

    def dcp_save(self, threads: int) -> dict:
        p = self.path("dcp")
        t0 = time.perf_counter()
        dcp.save(self.state, storage_writer=dcp.FileSystemWriter(p, thread_count=threads, sync_files=True))
        return {"total": time.perf_counter() - t0}

    def dcp_async_save(self, threads: int, options: StagingOptions | None) -> dict:
        p = self.path("dcp_async")
        writer = dcp.FileSystemWriter(p, thread_count=threads, sync_files=True)
        stager = DefaultStager(options) if options is not None else None
        t0 = time.perf_counter()
        resp = dcp.async_save(self.state, storage_writer=writer, async_stager=stager)
        blocked = time.perf_counter() - t0
        if hasattr(resp, "staging_completion"):
            resp.staging_completion.result()
            staged = time.perf_counter() - t0
            resp.upload_completion.result()
        else:
            staged = blocked
            resp.result()
        if stager is not None:
            stager.close()
        return {"total": time.perf_counter() - t0, "blocked": blocked, "captured": staged}

    def pyckpt_save(self, compress: str) -> dict:
        p = self.path("pyckpt_save")
        t0 = time.perf_counter()
        pyckpt.save(self.state, p, compress=compress)
        return {"total": time.perf_counter() - t0}

    def pyckpt_checkpointer(self) -> dict:
        p = self.path("pyckpt_ckpt")
        ck = pyckpt.Checkpointer(p, keep=1)
        t0 = time.perf_counter()
        fut = ck.save(1, self.state)
        blocked = time.perf_counter() - t0
        fut.captured()
        captured = time.perf_counter() - t0
        fut.result()
        return {"total": time.perf_counter() - t0, "blocked": blocked, "captured": captured}

    # ---- loads --------------------------------------------------------
    def torch_load(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
        f = os.path.join(self.root, "torch_save", "ckpt.pt")
        _page_cache.warm(os.path.dirname(f))
        t0 = time.perf_counter()
        sd = torch.load(f, map_location="cpu", weights_only=True)
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optim"])
        return {"total": time.perf_counter() - t0}

    def dcp_load(self) -> dict:
        p = os.path.join(self.root, "dcp")
        _page_cache.warm(p)
        t0 = time.perf_counter()
        dcp.load(self.state, storage_reader=dcp.FileSystemReader(p))
        return {"total": time.perf_counter() - t0}

    def pyckpt_load(self) -> dict:
        p = os.path.join(self.root, "pyckpt_save")
        _page_cache.warm(p)
        t0 = time.perf_counter()
        pyckpt.load(p, into=self.state)
        return {"total": time.perf_counter() - t0}


class _DirectSink:
    """Sequential O_DIRECT writer: fills a page-aligned buffer, writes it whole."""

    SIZE = 16 << 20

    def __init__(self, fd: int):
        self.fd, self.written, self.fill = fd, 0, 0
        self.buf = mmap.mmap(-1, self.SIZE)  # anonymous mmap: page-aligned, as O_DIRECT needs
        self.view = memoryview(self.buf)

    def write(self, data: memoryview) -> None:
        while data:
            n = min(len(data), self.SIZE - self.fill)
            self.view[self.fill:self.fill + n] = data[:n]
            self.fill, data = self.fill + n, data[n:]
            if self.fill == self.SIZE:
                self._flush(self.SIZE)

    def _flush(self, nbytes: int) -> None:
        done = 0
        while done < nbytes:
            done += os.write(self.fd, self.view[done:nbytes])
        self.written += self.fill
        self.fill = 0

    def close(self) -> None:
        size = self.written + self.fill
        if self.fill:
            self._flush((self.fill + 4095) // 4096 * 4096)  # O_DIRECT writes whole blocks
        os.ftruncate(self.fd, size)
        self.view.release()
        self.buf.close()


def _flat(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _flat(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _flat(v)


def compression_table(mib: int) -> None:
    """Ratio and single-core encode speed of the engine's zstd codec, per dtype."""
    C = _native.native()
    n = mib << 20
    print(f"\nCompression (one {mib} MiB chunk of N(0, 0.02) weights, one core):")
    for name, dtype in [("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)]:
        t = (torch.randn(n // torch.finfo(dtype).bits * 8) * 0.02).to(dtype)
        raw = t.view(torch.uint8).numpy().tobytes()
        C.encode(raw, t.element_size())  # warm the codec's per-thread state
        t0 = time.perf_counter()
        codec, stored = C.encode(raw, t.element_size())
        dt = time.perf_counter() - t0
        assert C.decode(stored, codec, len(raw)) == raw
        print(f"  {name:<9} stored/raw={len(stored) / len(raw):.3f}  saving={1 - len(stored) / len(raw):6.1%}"
              f"  encode={len(raw) / dt / 1e9:5.2f} GB/s")
    rnd = os.urandom(n)
    codec, stored = C.encode(rnd, 4)
    print(f"  random    stored/raw={len(stored) / len(rnd):.5f} (incompressible; codec={codec})")


def print_ratios(b: Bench) -> None:
    r = b.rows
    fastest_dcp = min((v["total"] for k, v in r.items() if k.startswith("dcp.save")), default=float("nan"))
    fastest_stage = min((v["captured"] for k, v in r.items() if k.startswith("dcp.async_save")),
                        default=float("nan"))
    ck = r["pyckpt Checkpointer.save"]
    ts = r["torch.save+fsync (crc32 on, default)"]["total"]
    print("\nRatios (goal in brackets):")
    print(f"  Checkpointer.save blocked / torch.save          {ck['blocked'] / ts:7.4f}   [<= 0.1]")
    print(f"  Checkpointer capture / fastest DCP staging      {ck['captured'] / fastest_stage:7.3f}   [<= 1]")
    print(f"  Checkpointer total / fastest dcp.save           {ck['total'] / fastest_dcp:7.3f}   [<= 1]")
    raw = min(r["raw write+fsync, buffered"]["total"], r["raw write+fsync, O_DIRECT"]["total"])
    print(f"  Checkpointer total / faster raw fsync'd write   {ck['total'] / raw:7.3f}   [<= 1.1]")
    print(f"  pyckpt.save total / faster raw fsync'd write    {r['pyckpt.save']['total'] / raw:7.3f}")
    tl = r["torch.load(weights_only)+load_state_dict"]["total"]
    print(f"  pyckpt.load(into=) / torch.load+load_state_dict {r['pyckpt.load(into=), verified']['total'] / tl:7.3f}   [<= 1]")
    print(f"  pyckpt.load(into=) / dcp.load                   "
          f"{r['pyckpt.load(into=), verified']['total'] / r['dcp.load']['total']:7.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=125e6, help="model parameters (default 125e6 → ~1.5 GB with Adam)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir under /tmp)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per contender; the best is reported")
    ap.add_argument("--compress-mib", type=int, default=64, help="chunk size for the compression table")
    args = ap.parse_args()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29000 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)  # DCP's async_save wants a group
    root = args.dir or tempfile.mkdtemp(prefix="pyckpt-bench-")
    os.makedirs(root, exist_ok=True)
    os.environ.setdefault("PYCKPT_STAGING_MB", "2048")

    model, opt = build_state(args.params)
    state = state_of(model, opt)
    nbytes = tensor_bytes(state)
    print(f"pyckpt {pyckpt.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, dir {root}")
    print(f"State: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params + Adam = {nbytes / 1e9:.2f} GB\n")
    print("Saves (fsync'd):")
    b = Bench(root, state, nbytes, args.repeat)
    b.record("raw write+fsync, buffered", lambda: b.raw_write(False))
    b.record("raw write+fsync, O_DIRECT", lambda: b.raw_write(True))
    b.record("torch.save+fsync (crc32 on, default)", lambda: b.torch_save(True))
    b.record("torch.save+fsync (crc32 off)", lambda: b.torch_save(False))
    for th in (1, 4):
        b.record(f"dcp.save thread_count={th}", lambda th=th: b.dcp_save(th))
    b.record("dcp.async_save default stager", lambda: b.dcp_async_save(4, None))
    b.record("dcp.async_save stager sync, no shm/pinned",
             lambda: b.dcp_async_save(4, StagingOptions(False, False, False, False)))
    b.record("pyckpt.save", lambda: b.pyckpt_save("none"))
    b.record("pyckpt Checkpointer.save", b.pyckpt_checkpointer)
    b.record("pyckpt.save compress=zstd", lambda: b.pyckpt_save("zstd"))
    b.pyckpt_save("none")  # leave an uncompressed checkpoint for the load test
    print("\nLoads (warm page cache):")
    b.record("torch.load(weights_only)+load_state_dict", lambda: b.torch_load(model, opt))
    b.record("dcp.load", b.dcp_load)
    b.record("pyckpt.load(into=), verified", b.pyckpt_load)
    print_ratios(b)
    compression_table(args.compress_mib)
    dist.destroy_process_group()
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
