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
    UnsupportedStateError,
)
from ._native import cuda_available  # noqa: E402
from .api import load, save  # noqa: E402
from .checkpointer import Checkpointer, SaveFuture  # noqa: E402
from .activation import disable, enable, register  # noqa: E402

__all__ = [
    "__version__",
    "save",
    "load",
    "Checkpointer",
    "SaveFuture",
    "cuda_available",
    "enable",
    "disable",
    "register",
    "PyckptError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "FormatVersionError",
    "UnsupportedStateError",
    "StagingTimeoutError",
    "NativeError",
    "ConfigError",
]

# A bare `import pyckpt` in a training script turns transparent mode on
# (unless PYCKPT_DISABLE=1); importing it from a library or a test does not.
from .activation import _activate_on_import  # noqa: E402

_activate_on_import()
