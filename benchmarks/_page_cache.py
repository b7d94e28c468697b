"""Page-cache helpers shared by the benchmarks: start a read cold (``drop``) or warm (``warm``)."""
from __future__ import annotations

import os
import subprocess


def drop(root: str) -> None:
    """Write back, then drop the page cache of every file under ``root`` (posix_fadvise DONTNEED
    drops a file's clean cached pages), so a following read starts cold, as after a restart."""
    subprocess.run(["sync"], check=False)
    for d, _, names in os.walk(root):
        for n in names:
            fd = os.open(os.path.join(d, n), os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def warm(root: str) -> None:
    """Read every file under ``root`` once, so a following read comes from the page cache (pyckpt
    writes uncompressed chunks with O_DIRECT, which leaves nothing of them cached)."""
    for d, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                while f.read(1 << 24):
                    pass
