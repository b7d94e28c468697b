"""Every PYCKPT_* setting in one place.

Settings are read from the environment each time they are asked for, so tests
and the ``pyckpt-run`` wrapper can change them; ``override`` sets some for the
duration of a ``with`` block. A malformed value raises ``ConfigError`` naming
the variable and the values it accepts. Pure Python on purpose: the start-up
line imports this module in every process that has PYCKPT_DIR. Also here:
``unknown_names`` (misspelt PYCKPT_* variables, with the closest known name)
and ``check_local_path`` (a URL is refused where only local paths work, and checked for its
storage package where object storage works: ``pyckpt/remote.py``).
"""
from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator
from typing import Callable, NamedTuple

from .errors import ConfigError


class Knob(NamedTuple):  # not a dataclass: the start-up line imports this module in every process
    name: str
    default: str | None
    accepted: str  # human-readable list of accepted values, used in errors and docs
    help: str


def _int(raw: str) -> int:
    """int(), without Python's digit grouping ("1_0" is 10 there, a typo here)."""
    if "_" in raw:
        raise ValueError(raw)
    return int(raw)


def _float(raw: str) -> float:
    """float(), without digit grouping; only finite values (an infinite wait or interval never ends)."""
    value = float(raw)
    if "_" in raw or not math.isfinite(value):
        raise ValueError(raw)
    return value


def _int_at_least(lo: int, hi: int | None = None) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = _int(raw)
        except ValueError:
            value = None
        if value is None or value < lo or (hi is not None and value > hi):
            expected = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"
            raise ConfigError(f"{name}={raw!r} is not valid: expected {expected}")
        return value

    return parse


def _float_at_least(lo: float, hi: float | None = None) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        try:
            value = _float(raw)
        except ValueError:
            value = None
        if value is None or not value >= lo or (hi is not None and not value <= hi):
            expected = f"a finite number >= {lo}" if hi is None else f"a number from {lo:g} to {hi:g}"
            raise ConfigError(f"{name}={raw!r} is not valid: expected {expected}")
        return value

    return parse


def _float_above(lo: float, hi: float = math.inf) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        try:
            value = _float(raw)
        except ValueError:
            value = None
        if value is None or not (lo < value <= hi):
            upto = f" and <= {hi:g}" if hi < math.inf else ""
            raise ConfigError(f"{name}={raw!r} is not valid: expected a number > {lo:g}{upto}")
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
    if v in ("0", "false", "no", "off"):  # not "": set but empty is a mistake, not "off" (as PYCKPT_DIR=)
        return False
    raise ConfigError(f"{name}={raw!r} is not valid: expected 1/0, true/false, yes/no or on/off")


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def check_local_path(path: str | os.PathLike, what: str = "checkpoint directory", allow_url: bool = False) -> str:
    """``path`` as a string; ``ConfigError`` for a URL (``s3://...``) unless ``allow_url`` (Checkpointer
    roots, PYCKPT_DIR), which checks that the URL's storage package is installed (``remote.check_supported``).

    Without this check ``s3://bucket/x`` would silently become a local folder named ``s3:``."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text:  # os.path.abspath("") is the working directory: an unset variable would checkpoint there
        raise ConfigError(f"{what} is an empty string: give a directory path ('.' for the working directory)")
    if _URL.match(text):
        if allow_url:
            from .remote import check_supported

            return check_supported(text, what)
        raise ConfigError(f"{what} {text!r} is a URL: remote storage is not supported yet here (only by "
                          "Checkpointer and PYCKPT_DIR); give a local (or mounted) directory path")
    return text


def is_url(path: object) -> bool:
    """Whether ``path`` is a ``scheme://`` URL string (an object-storage root)."""
    return isinstance(path, str) and _URL.match(path) is not None


def resolve_dir(path: str | os.PathLike) -> str:
    """A checkpoint root as given to transparent mode: a URL as is (no trailing ``/``), a local path absolute."""
    text = os.fspath(path)
    return text.rstrip("/") if is_url(text) else os.path.abspath(text)


def _dir(name: str, raw: str) -> str:
    if not raw.strip():
        raise ConfigError(f"{name} is set but empty: give a directory path, or unset it to turn "
                          "transparent checkpointing off")
    return check_local_path(raw, name, allow_url=True)


def _local_dir(name: str, raw: str) -> str:
    if not raw.strip():
        raise ConfigError(f"{name} is set but empty: give a directory path or unset it")
    return check_local_path(raw, name)


def _resume(name: str, raw: str) -> str:
    # auto | never | a checkpoint path, which must exist now: failing at start-up beats a traceback later
    if raw.lower() in ("auto", "never"):
        return raw.lower()
    if not raw.strip():
        raise ConfigError(f"{name} is set but empty: expected auto, never or a checkpoint directory path")
    check_local_path(raw, name)
    if not os.path.isdir(raw):
        why = "does not exist" if not os.path.lexists(raw) else "is not a directory"
        raise ConfigError(f"{name}={raw!r} is not valid: that path {why}; expected auto, never or a "
                          "checkpoint directory path")
    return raw


def _steps_or_auto(name: str, raw: str) -> int | str:
    if raw.strip().lower() == "auto":
        return "auto"
    try:
        return _int_at_least(1)(name, raw)
    except ConfigError:
        raise ConfigError(f"{name}={raw!r} is not valid: expected an integer >= 1 or auto") from None


def _every(name: str, raw: str) -> tuple[str, int | float | str]:
    """PYCKPT_EVERY: ("steps", N or "auto") or ("seconds", S)."""
    v = raw.strip().lower()
    if v == "auto":
        return "steps", "auto"
    try:
        if v.endswith("s"):
            seconds = _float(v[:-1])
            if seconds > 0:
                return "seconds", seconds
        else:
            steps = _int(v)
            if steps >= 1:
                return "steps", steps
    except ValueError:
        pass
    raise ConfigError(f"{name}={raw!r} is not valid: expected auto, an integer >= 1 (optimizer steps) "
                      "or a number of seconds followed by s (e.g. 300s)")


KNOBS: dict[str, tuple[Knob, Callable[[str, str], object]]] = {}


def _knob(name: str, default: str | None, accepted: str, help: str, parse) -> None:
    KNOBS[name] = (Knob(name, default, accepted, help), parse)


_knob("PYCKPT_DIR", None, "a local directory path, or an object-storage URL (s3://bucket/prefix)", "checkpoint directory; setting it turns transparent mode on", _dir)
_knob("PYCKPT_CACHE_DIR", None, "a local directory path", "staging and download space of object-storage roots (default ~/.cache/pyckpt)", _local_dir)
_knob("PYCKPT_DISABLE", "0", "1/0", "1 turns every activation mode off", _flag)
_knob("PYCKPT_EVERY", None, "auto, an integer >= 1, or seconds followed by s (300s)", "snapshot interval in one "
      "setting: auto (Young/Daly, as PYCKPT_EVERY_STEPS=auto), N optimizer steps, or S seconds", _every)
_knob("PYCKPT_EVERY_STEPS", None, "an integer >= 1, or auto", "snapshot every N optimizer steps (auto: Young/Daly "
      "interval from the measured cost and PYCKPT_MTBF_HOURS)", _steps_or_auto)
_knob("PYCKPT_EVERY_SECONDS", None, "a number > 0", "snapshot every S seconds (agreed across ranks)", _float_above(0.0))
_knob("PYCKPT_KEEP", "3", "an integer >= 1", "committed checkpoints to keep", _int_at_least(1))
_knob("PYCKPT_COMPRESS", "none", "none, zstd", "tensor encoding", _choice("none", "zstd"))
_knob("PYCKPT_RESUME", "auto", "auto, never, or an existing checkpoint directory", "what to resume from at start-up", _resume)
_knob("PYCKPT_RESUME_EDITED", "refuse", "refuse, tracked", "a relaunch whose script code or call stack differs "
      "from the checkpoint's (an edited script): refuse (exit 2), or tracked: restore models, optimizers, "
      "schedulers, scaler, registered state, data position, RNG and the variables the script's loops carry (by "
      "name), and leave its other variables and loop positions as this run makes them (not exact; said in one "
      "line); tracked also goes on over training data of another length (samples added or removed), or with "
      "another num_workers for the training loader, at the checkpoint's epoch and batch (not exact; said in one "
      "line)", _choice("refuse", "tracked"))
_knob("PYCKPT_LOG", "info", "info, debug, quiet", "how much pyckpt prints on stderr", _choice("info", "debug", "quiet"))
_knob("PYCKPT_LAZY", "1", "1/0", "copy snapshots during the next forward/backward (0: at the snapshot point)", _flag)
_knob("PYCKPT_SHM_MB", "0", "an integer >= 0", "keep the newest snapshot in /dev/shm too, holding at most this many MiB there: a state of S MiB needs 2S (0: off)", _int_at_least(0))
_knob("PYCKPT_INCREMENTAL", "1", "1/0", "write only chunks whose fingerprint changed; unchanged ones reference the earlier checkpoint", _flag)
_knob("PYCKPT_INCREMENTAL_VERIFY", "auto", "auto, all, sample, off", "CRC32C check of unchanged chunks against the chunk they reference (auto: all host chunks, a rotating 1 in 8 of GPU chunks)", _choice("auto", "all", "sample", "off"))
_knob("PYCKPT_STORAGE_EVERY", "1", "an integer >= 1", "with PYCKPT_SHM_MB: write every Nth snapshot to PYCKPT_DIR too (a SIGTERM snapshot always)", _int_at_least(1))
_knob("PYCKPT_LAUNCH_ID", None, "any text", "set by pyckpt-run, new at each of its invocations: one launch of the "
      "job, the same in every restart of its workers (PYCKPT_RESUME never/<dir> apply to a launch's first start)",
      lambda n, raw: raw)
_knob("PYCKPT_MTBF_HOURS", "24", "a number > 0 and <= 1e6", "expected hours between failures, for PYCKPT_EVERY=auto (PYCKPT_EVERY_STEPS=auto)", _float_above(0.0, 1e6))
# Upper bounds: a value past them was taken, then the engine refused every checkpoint (a chunk over its 2 GiB
# limit, a budget past 64 bits), a wait overflowed, or starting that many threads hit the limit on threads.
_knob("PYCKPT_STAGING_MB", "1024", "an integer from 1 to 16777216", "host staging pool budget in MiB", _int_at_least(1, 1 << 24))
_knob("PYCKPT_CHUNK_MB", "4", "an integer from 1 to 2048", "chunk size in MiB", _int_at_least(1, 2048))
_knob("PYCKPT_IO_THREADS", "4", "an integer from 1 to 256", "writer/reader threads per process", _int_at_least(1, 256))
_knob("PYCKPT_COPY_THREADS", "2", "an integer from 1 to 256", "threads for host-to-host capture copies", _int_at_least(1, 256))
_knob("PYCKPT_IO_NICE", "0", "an integer from 0 to 19", "nice value of the engine's I/O (write and read) threads "
      "(Linux; 0: the process's own priority)", _int_at_least(0, 19))
_knob("PYCKPT_STAGING_TIMEOUT_S", "60", "a number from 0 to 86400", "how long capture waits for staging memory before skipping", _float_at_least(0.0, 86400.0))
_knob("PYCKPT_LOOP_STATE_MAX_BYTES", "16777216", "an integer >= 0", "transparent mode: a script variable larger than this is not captured (0: no variables, only the stack)", _int_at_least(0))
# Test/diagnostic only: sleep this many ms after writing each chunk (simulates a slow disk).
_knob("PYCKPT_TEST_WRITE_DELAY_MS", "0", "an integer from 0 to 3600000", "testing: slow every chunk write down", _int_at_least(0, 3_600_000))
_knob("PYCKPT_TEST_FINGERPRINT", None, "constant", "testing: every chunk fingerprint is 0 (forced collisions)", _choice("constant"))
_knob("PYCKPT_TEST_CRASH_AT", None, "a name of pyckpt.commit.CRASH_POINTS[:n]", "testing: SIGKILL at that point", lambda n, raw: raw)


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
    interval()


def interval() -> tuple[int | str | None, float | None]:
    """The snapshot triggers ``(every_steps, every_seconds)``: ``every_steps`` an integer, ``"auto"``
    or None. ``PYCKPT_EVERY`` stands for ``PYCKPT_EVERY_STEPS`` (auto, N) or ``PYCKPT_EVERY_SECONDS``
    (``Ns``); naming one of those twice is an error rather than a guess at which was meant."""
    steps, seconds = get("PYCKPT_EVERY_STEPS"), get("PYCKPT_EVERY_SECONDS")
    every = get("PYCKPT_EVERY")
    if every is None:
        return steps, seconds
    kind, value = every
    other = "PYCKPT_EVERY_STEPS" if kind == "steps" else "PYCKPT_EVERY_SECONDS"
    if (steps if kind == "steps" else seconds) is not None:
        raise ConfigError(f"PYCKPT_EVERY={os.environ.get('PYCKPT_EVERY')!r} and {other}="
                          f"{os.environ.get(other)!r} both set the {kind} interval: unset one of them")
    return (value, seconds) if kind == "steps" else (steps, value)


# PYCKPT_* names that are not runtime settings but are legitimately set (no "unknown" warning).
OTHER_NAMES = {
    "PYCKPT_CUDA": "build time only (setup.py): 1 requires the CUDA copy path, 0 disables it",
}


def unknown_names(environ: dict[str, str] | None = None) -> list[tuple[str, str | None]]:
    """Every PYCKPT_* variable in the environment pyckpt does not know, with the closest known name (or None)."""
    import difflib  # only when a PYCKPT_* name is unknown: keeps the start-up line cheap

    env = os.environ if environ is None else environ
    known = set(KNOBS) | set(OTHER_NAMES)
    out = []
    for name in sorted(k for k in env if k.startswith("PYCKPT_") and k not in known):
        # Compare without the shared prefix, which would make every name look close.
        close = difflib.get_close_matches(name[7:], sorted(k[7:] for k in known), n=1, cutoff=0.6)
        out.append((name, "PYCKPT_" + close[0] if close else None))
    return out


def unknown_names_message(environ: dict[str, str] | None = None) -> str | None:
    """One line naming the unknown PYCKPT_* variables and the closest known names, or None when all are known."""
    bad = unknown_names(environ)
    if not bad:
        return None
    parts = [f"{n} (did you mean {c}?)" if c else n for n, c in bad]
    return f"warning: unknown setting{'s' if len(bad) > 1 else ''} ignored: {', '.join(parts)}"


def ignored_messages() -> list[str]:
    """One warning per setting that is set but has no effect with the others (validated first)."""
    out = []
    if os.environ.get("PYCKPT_MTBF_HOURS") is not None and interval()[0] != "auto":
        out.append("warning: PYCKPT_MTBF_HOURS is ignored: it sets the automatic interval only (PYCKPT_EVERY=auto)")
    if os.environ.get("PYCKPT_INCREMENTAL_VERIFY") is not None and not get("PYCKPT_INCREMENTAL"):
        out.append("warning: PYCKPT_INCREMENTAL_VERIFY is ignored: PYCKPT_INCREMENTAL is off")
    return out


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
