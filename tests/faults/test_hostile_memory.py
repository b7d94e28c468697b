"""Lengths claimed by a checkpoint never size an allocation beyond what its files justify.

Peak RSS is measured in a fresh process that loads and verifies chunks
claiming gigabytes while the data files hold a few dozen bytes. It is read
from /proc/self/status (VmHWM, the peak of this process's own memory map):
Linux carries getrusage's ru_maxrss over execve from the forking parent, so
under a large pytest process ru_maxrss would report the parent's size."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from pyckpt import manifest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hostile_corpus import CORPUS  # noqa: E402

CLAIMS = ["tiny-chunk-claims-3GiB", "tiny-chunk-claims-1.9GiB", "stored-len-2**40", "shared-chunk-2000x"]

_PROBE = r"""
import json, resource, sys
import pyckpt
from pyckpt import reader
from pyckpt._native import get_engine
out = {}
for p in json.loads(sys.argv[1]):
    for what, fn in (("load", lambda: pyckpt.load(p)), ("verify", lambda: reader.verify(get_engine(), p))):
        try:
            fn()
            out[p + what] = "accepted"
        except pyckpt.CorruptCheckpointError:
            out[p + what] = "refused"
        except BaseException as e:
            out[p + what] = type(e).__name__
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"results": out, "peak_kib": hwm, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def test_claimed_gigabytes_are_refused_with_bounded_memory(tmp_path):
    paths = []
    for name in CLAIMS:
        d = tmp_path / name.replace("*", "x")
        d.mkdir()
        paths.append(str(CORPUS[name](d)))
    r = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(paths)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(got["results"].values()) == {"refused"}, got["results"]
    # The claims add up to > 5 GiB; the interpreter with torch needs a few hundred MiB.
    assert got["peak_kib"] < (1 << 20), f"peak RSS {got['peak_kib'] // 1024} MiB"


def test_documented_limits_match_the_engine():
    from pyckpt._native import native

    assert manifest.MAX_CHUNK_BYTES == native().MAX_CHUNK_BYTES
    assert manifest.MAX_ZSTD_RATIO == native().MAX_ZSTD_RATIO


def test_engine_checks_lengths_against_the_file_before_allocating(tmp_path):
    """The engine's own guard (independent of the Python validation): a 36-byte file, a chunk
    claiming 1 GiB stored / decoded, is refused as truncated without a 1 GiB buffer."""
    from pyckpt._native import get_engine

    f = tmp_path / "d.bin"
    f.write_bytes(bytes(36))
    before = _hwm_kib()
    (idx, msg), = get_engine().read([str(f)], [(0, 0, 1 << 30, 1 << 30, 0, 0, [])])
    assert idx == 0 and msg.startswith("truncated") and "file has 36" in msg
    (idx, msg), = get_engine().read([str(f)], [(0, 0, 36, 1 << 31, 0, 1, [])])
    assert idx == 0 and "more than zstd can decode" in msg
    (idx, msg), = get_engine().read([str(f)], [(0, 0, 36, (1 << 31) + 1, 0, 1, [])])
    assert idx == 0 and "chunk limit" in msg
    assert _hwm_kib() - before < (256 << 10)


def _hwm_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
