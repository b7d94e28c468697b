"""pyckpt: transparent, fast checkpointing for PyTorch data-parallel training.

Explicit API::

    pyckpt.save({"model": model.state_dict()}, "ckpt/")
    state = pyckpt.load("ckpt/", into={"model": model.state_dict()})

    ckpt = pyckpt.Checkpointer("runs/ckpts", keep=3, compress="zstd")
    fut = ckpt.save(step, state)   # returns at once
    fut.captured()                 # tensors may be modified from here on

Transparent mode: ``PYCKPT_DIR=... python train.py``, ``pyckpt-run``, or a
bare ``import pyckpt`` at the top of a training script (see
docs/TRANSPARENCY.md).
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    FormatVersionError,
    NativeError,
    PyckptError,
    StagingTimeoutError,
    TornSaveError,
    UnsupportedStateError,
)
from .activation import disable, enable, register  # noqa: E402

# The rest loads on first use (PEP 562): importing pyckpt, which the start-up
# line does in every process that has PYCKPT_DIR, must not import torch.
_LAZY = {"save": "api", "load": "api", "Checkpointer": "checkpointer", "SaveFuture": "checkpointer",
         "cuda_available": "_native", "list": "catalog", "on_checkpoint": "metrics", "StoreCoordinator": "coord"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pyckpt' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "__version__",
    "save",
    "load",
    "Checkpointer",
    "SaveFuture",
    "StoreCoordinator",
    "cuda_available",
    "enable",
    "disable",
    "register",
    "list",
    "on_checkpoint",
    "PyckptError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "FormatVersionError",
    "UnsupportedStateError",
    "StagingTimeoutError",
    "TornSaveError",
    "NativeError",
    "ConfigError",
]

# A bare `import pyckpt` in a training script turns transparent mode on
# (unless PYCKPT_DISABLE=1 or the script uses the explicit API); importing it
# from a library or a test does not.
from .activation import _activate_on_import  # noqa: E402

_activate_on_import()
