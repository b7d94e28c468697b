"""Helpers of the object-storage tests."""
from __future__ import annotations

import os
import subprocess
import sys

import torch


def keys(fs, prefix: str) -> list[str]:
    """Every object key under ``prefix`` (relative to it), sorted."""
    try:
        found = fs.find(prefix)
    except FileNotFoundError:
        return []
    return sorted(k[len(prefix.rstrip("/")) + 1:] for k in found)


def child_env(s3_env: dict) -> dict:
    """The current environment without PYCKPT_* settings, plus the S3 settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYCKPT_")}
    env.update(s3_env)
    return env


def run_py(code_or_path, *args, env: dict, timeout: float = 120, cwd=None) -> subprocess.CompletedProcess:
    """``python -c CODE ARGS`` (or ``python PATH ARGS``) with ``env``; output captured."""
    cmd = [sys.executable, *(["-c", code_or_path] if "\n" in str(code_or_path) else [str(code_or_path)]), *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def same(a, b) -> bool:
    """Bitwise equality of nested state: tensors byte for byte (NaN payloads included), floats by repr."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and bytes(a.reshape(-1).contiguous().view(torch.uint8).numpy())
                == bytes(b.reshape(-1).contiguous().view(torch.uint8).numpy()))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return isinstance(b, float) and repr(a) == repr(b)
    return a == b
