"""Every PYCKPT_* setting in one place.

Settings are read from the environment each time they are asked for, so tests
and the ``pyckpt-run`` wrapper can change them; ``override`` sets some for the
duration of a ``with`` block. A malformed value raises ``ConfigError`` naming
the variable and the values it accepts.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable

from .errors import ConfigError


@dataclass(frozen=True)
class Knob:
    name: str
    default: str | None
    accepted: str  # human-readable list of accepted values, used in errors and docs
    help: str


def _int_at_least(lo: int) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            value = None
        if value is None or value < lo:
            raise ConfigError(f"{name}={raw!r} is not valid: expected an integer >= {lo}")
        return value

    return parse


def _float_at_least(lo: float) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            value = None
        if value is None or not value >= lo:
            raise ConfigError(f"{name}={raw!r} is not valid: expected a number >= {lo}")
        return value

    return parse


def _choice(*choices: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        if raw.lower() not in choices:
            raise ConfigError(f"{name}={raw!r} is not valid: expected one of {', '.join(choices)}")
        return raw.lower()

    return parse


def _flag(name: str, raw: str) -> bool:
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not valid: expected 1/0, true/false, yes/no or on/off")


def _text(name: str, raw: str) -> str:
    if not raw:
        raise ConfigError(f"{name} is set but empty: give a path")
    return raw


def _resume(name: str, raw: str) -> str:
    # auto | never | a checkpoint path
    if raw.lower() in ("auto", "never"):
        return raw.lower()
    if not raw:
        raise ConfigError(f"{name} is empty: expected auto, never or a checkpoint path")
    return raw


KNOBS: dict[str, tuple[Knob, Callable[[str, str], object]]] = {}


def _knob(name: str, default: str | None, accepted: str, help: str, parse) -> None:
    KNOBS[name] = (Knob(name, default, accepted, help), parse)


_knob("PYCKPT_DIR", None, "a directory path", "checkpoint directory; setting it turns transparent mode on", _text)
_knob("PYCKPT_DISABLE", "0", "1/0", "1 turns every activation mode off", _flag)
_knob("PYCKPT_EVERY_STEPS", None, "an integer >= 1", "snapshot every N optimizer steps", _int_at_least(1))
_knob("PYCKPT_EVERY_SECONDS", None, "a number >= 0", "snapshot every S seconds (agreed across ranks)", _float_at_least(0.0))
_knob("PYCKPT_KEEP", "3", "an integer >= 1", "committed checkpoints to keep", _int_at_least(1))
_knob("PYCKPT_COMPRESS", "none", "none, zstd", "tensor encoding", _choice("none", "zstd"))
_knob("PYCKPT_RESUME", "auto", "auto, never, or a checkpoint path", "what to resume from at start-up", _resume)
_knob("PYCKPT_LOG", "info", "info, debug, quiet", "how much pyckpt prints on stderr", _choice("info", "debug", "quiet"))
_knob("PYCKPT_STAGING_MB", "1024", "an integer >= 1", "host staging pool budget in MiB", _int_at_least(1))
_knob("PYCKPT_CHUNK_MB", "4", "an integer >= 1", "chunk size in MiB", _int_at_least(1))
_knob("PYCKPT_IO_THREADS", "4", "an integer >= 1", "writer/reader threads per process", _int_at_least(1))
_knob("PYCKPT_COPY_THREADS", "2", "an integer >= 1", "threads for host-to-host capture copies", _int_at_least(1))
_knob("PYCKPT_STAGING_TIMEOUT_S", "60", "a number >= 0", "how long capture waits for staging memory before skipping", _float_at_least(0.0))
# Test/diagnostic only: sleep this many ms after writing each chunk (simulates a slow disk).
_knob("PYCKPT_TEST_WRITE_DELAY_MS", "0", "an integer >= 0", "testing: slow every chunk write down", _int_at_least(0))


def get(name: str):
    """Return the parsed value of setting ``name`` (None when unset and no default)."""
    knob, parse = KNOBS[name]
    raw = os.environ.get(name)
    if raw is None:
        raw = knob.default
    if raw is None:
        return None
    return parse(name, raw)


def validate_all() -> None:
    """Parse every set PYCKPT_* variable now so a typo stops the job before training."""
    for name in KNOBS:
        get(name)


@contextlib.contextmanager
def override(**values: object) -> Iterator[None]:
    """Temporarily set settings, e.g. ``override(PYCKPT_CHUNK_MB=1)``; None unsets one."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if k not in KNOBS:
                raise KeyError(f"unknown pyckpt setting {k}")
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(v)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
