"""The one place that loads the native engine ``pyckpt._C``.

Importing this module never fails: a missing or broken extension, or a
missing zstd, is recorded and reported with a remedy when something actually
needs it (``native()``, ``get_engine()``, asking for the zstd codec).
"""
from __future__ import annotations

import ctypes.util
import glob
import logging
import os
import threading
from types import ModuleType
from typing import TYPE_CHECKING, Optional

from . import knobs
from .errors import NativeError, PyckptError, StagingTimeoutError

if TYPE_CHECKING:
    from . import _C as _CType

CODEC_IDS: dict[str, int] = {"none": 0, "zstd": 1}
CODEC_NAMES: dict[int, str] = {v: k for k, v in CODEC_IDS.items()}

_C: Optional[ModuleType]
try:
    from . import _C  # type: ignore[no-redef]

    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as e:  # not built, or built for another Python
    _C = None
    _IMPORT_ERROR = e


def name_os_thread() -> None:
    """Give the calling thread's Python name (``pyckpt-commit-12``) to the OS thread too, cut to 15
    characters on Linux, so that ``top -H``, ``ps -T`` and perf tell pyckpt's threads from training's
    (Python 3.11 leaves every thread named after the process)."""
    # Only a label: without the extension there is nothing to name. Never the main thread (work run on
    # it when no thread could start, pyckpt.threads): its OS name is the process's own in ps and top.
    if _C is not None and threading.current_thread() is not threading.main_thread():
        _C.name_this_thread(threading.current_thread().name)


def native() -> "ModuleType":
    """Return ``pyckpt._C``, or raise NativeError saying how to build it."""
    if _C is None:
        raise NativeError(
            "pyckpt._C is not built: run `pip install -e .` in the pyckpt source tree "
            f"(import failed: {_IMPORT_ERROR})"
        ) from _IMPORT_ERROR
    return _C


def _zstd_candidates() -> list[str]:
    """Shared objects that export the zstd C API: the zstandard wheel's cffi
    extension first, then a system libzstd if there is one."""
    found: list[str] = []
    try:
        import zstandard
    except ImportError:
        pass
    else:
        found += sorted(glob.glob(os.path.join(os.path.dirname(zstandard.__file__), "_cffi*.so")))
    system = ctypes.util.find_library("zstd")
    if system:
        found.append(system)
    return found


def _load_zstd() -> Optional[str]:
    """Load zstd into the engine; returns why it is unavailable, or None."""
    if _C is None:
        return "pyckpt._C is not built"
    errors = []
    for path in _zstd_candidates():
        try:
            _C.zstd_load(path)
            return None
        except (OSError, RuntimeError) as e:
            errors.append(str(e))
    if not errors:
        return "the `zstandard` package is not installed (pip install 'zstandard>=0.22')"
    return "; ".join(errors)


_ZSTD_ERROR = _load_zstd()


def cuda_available() -> bool:
    """True when the engine was built with CUDA and a GPU is visible."""
    return _C is not None and bool(_C.cuda_available())


def zstd_available() -> bool:
    """True when the zstd codec can be used."""
    return _C is not None and bool(_C.zstd_available())


def require_codec(name: str) -> int:
    """Codec id for ``name``; raises NativeError if it is unknown or unavailable."""
    if name not in CODEC_IDS:
        raise NativeError(f"unknown codec {name!r}: expected one of {', '.join(CODEC_IDS)}")
    if name == "zstd" and not zstd_available():
        raise NativeError(
            f"compression 'zstd' is not available ({_ZSTD_ERROR}); "
            "install `zstandard>=0.22` or use compression 'none'"
        )
    return CODEC_IDS[name]


def error_from_job(message: str) -> PyckptError:
    """The pyckpt exception for a failed SaveJob's ``error()`` text."""
    if message.startswith("staging timeout"):
        return StagingTimeoutError(message)
    return NativeError(message)


_engine: "Optional[_CType.Engine]" = None
_engine_lock = threading.Lock()


def _want_pinned() -> bool:
    """Pinned staging pays off only for GPU copies; torch is imported lazily
    because this module is imported by code paths that must stay cheap."""
    if not cuda_available():
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def get_engine() -> "_CType.Engine":
    """The process-wide engine, built on first use from the PYCKPT_* knobs."""
    global _engine
    with _engine_lock:
        if _engine is None:
            C = native()
            _engine = C.Engine(
                staging_bytes=knobs.get("PYCKPT_STAGING_MB") << 20,
                chunk_bytes=knobs.get("PYCKPT_CHUNK_MB") << 20,
                io_threads=knobs.get("PYCKPT_IO_THREADS"),
                copy_threads=knobs.get("PYCKPT_COPY_THREADS"),
                pinned=_want_pinned(),
                io_nice=knobs.get("PYCKPT_IO_NICE"),
            )
            short = _engine.thread_shortfall()
            if short:  # checkpoints go on with the threads that started: slower, so said once
                logging.getLogger("pyckpt").warning("pyckpt: the checkpoint engine runs with fewer threads than "
                                                    "asked: %s", short)
        return _engine


def reset_engine() -> None:
    """Drop the singleton (tests use it after changing knobs). Waits for the
    old engine's jobs only when nothing else references it."""
    global _engine
    with _engine_lock:
        _engine = None


def _after_fork_in_child() -> None:
    """A forked child (e.g. a fork-based DataLoader or test worker) inherits
    the engine object but none of its threads: using it would hang. The child
    drops it (the binding never destroys an engine outside the process that
    made it) and builds its own on first use."""
    global _engine, _engine_lock
    _engine = None
    _engine_lock = threading.Lock()  # the parent may have held it while forking


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
