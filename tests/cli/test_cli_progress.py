"""The progress bar: on a terminal only (stderr of a pseudo-terminal), never in captured output."""
from __future__ import annotations

import fcntl
import os
import pty
import select
import subprocess
import struct
import sys
import termios
import time

import pytest
import torch

import pyckpt

pytest.importorskip("tqdm")


def _many_tensors(tmp_path) -> str:
    return pyckpt.save({f"t{i}": torch.full((4,), float(i)) for i in range(40)}, str(tmp_path / "c"))


def test_no_bar_when_stderr_is_captured(cli, tmp_path):
    path = _many_tensors(tmp_path)
    r = cli("diff", path, path, "--progress-delay", "0")
    assert r.returncode == 0 and "identical" in r.stdout
    assert r.stderr == ""  # no bar, no carriage returns in logs
    r = cli("diff", path, path, "--progress-delay", "0", "--progress", "always")
    assert "diff:" in r.stderr and "/40 [" in r.stderr  # forcing it shows that the pipe alone hid it


def test_bar_on_a_terminal(tmp_path):
    path = _many_tensors(tmp_path)
    master, slave = pty.openpty()
    # A new pty is 0x0; a real terminal has a size, and tqdm draws nothing in 0 columns.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = subprocess.Popen([sys.executable, "-m", "pyckpt", "diff", path, path, "--progress-delay", "0"],
                                stdout=subprocess.PIPE, stderr=slave, text=True)
        os.close(slave)
        slave = -1
        seen, deadline = b"", time.monotonic() + 120
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
        out, _ = proc.communicate(timeout=60)
    finally:
        os.close(master)
        if slave != -1:
            os.close(slave)
    assert proc.returncode == 0 and "identical" in out
    assert b"diff:" in seen and b"/40 [" in seen, seen
