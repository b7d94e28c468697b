"""Turning transparent mode on and off: ``enable``, ``disable``, ``register``.

Three ways in: the ``.pth`` start-up line runs ``pyckpt._autostart`` when
``PYCKPT_DIR`` is set; a bare ``import pyckpt`` in the ``__main__`` script
(never from a library or a test) calls ``_activate_on_import``; and
``pyckpt-run`` sets the environment for both. ``PYCKPT_DISABLE=1`` turns
every way off. Activation validates every setting and the directory first,
so a typo stops the job before training starts, then installs the hooks.
"""
from __future__ import annotations

import os
import sys
import tempfile
from typing import Any, Callable

from . import knobs
from .errors import ConfigError
from .transparent import REGISTERED, Session

DEFAULT_DIR = "pyckpt-checkpoints"
_SESSION: Session | None = None


def enable(directory: str | os.PathLike | None = None, **settings: Any) -> str | None:
    """Turn transparent checkpointing on in this process; returns the checkpoint directory.

    ``directory`` defaults to PYCKPT_DIR, then ``./pyckpt-checkpoints``.
    ``settings`` are the PYCKPT_* settings in lower case without the prefix,
    e.g. ``enable("ckpt", every_steps=100, keep=2)``; they are set in
    ``os.environ`` so worker processes see them too. Returns None when
    PYCKPT_DISABLE=1. Raises ``ConfigError`` for a bad setting or directory."""
    global _SESSION
    for key, value in settings.items():
        name = "PYCKPT_" + key.upper()
        if name not in knobs.KNOBS:
            raise ConfigError(f"unknown pyckpt setting {key!r}; known: "
                              f"{', '.join(k[7:].lower() for k in knobs.KNOBS)}")
        os.environ[name] = str(value)
    knobs.validate_all()
    if knobs.get("PYCKPT_DISABLE"):
        return None
    if _SESSION is not None:
        return _SESSION.directory
    path = os.path.abspath(os.fspath(directory or knobs.get("PYCKPT_DIR") or DEFAULT_DIR))
    _check_writable(path)
    session = Session(path)
    try:
        session.install()
    except BaseException:
        session.hooks.remove_all()
        raise
    _SESSION = session
    return path


def disable() -> None:
    """Turn transparent mode off: wait for an in-flight checkpoint, remove every hook."""
    global _SESSION
    session, _SESSION = _SESSION, None
    if session is not None:
        session.uninstall()


def active() -> bool:
    """Whether transparent mode is on in this process."""
    return _SESSION is not None


def register(name: str, obj: Any = None, *, getter: Callable[[], Any] | None = None,
             setter: Callable[[Any], None] | None = None) -> Any:
    """Save state the hooks cannot see with every snapshot, per rank, and put it back on resume.

    Either ``obj`` has ``state_dict()``/``load_state_dict()``, or give
    ``getter()`` (returns tensors/JSON values/tuples) and ``setter(state)``.
    Returns ``obj`` so it can wrap a constructor call. Works whether or not
    transparent mode is on (registering costs nothing then)."""
    if not isinstance(name, str) or not name:
        raise TypeError("pyckpt.register: name must be a non-empty string")
    if obj is not None:
        if getter is not None or setter is not None:
            raise TypeError("pyckpt.register: give either obj or getter/setter, not both")
        if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
            raise TypeError(f"pyckpt.register({name!r}): {type(obj).__name__} has no state_dict()/"
                            "load_state_dict(); pass getter= and setter= instead")
        getter, setter = obj.state_dict, obj.load_state_dict
    elif getter is None or setter is None:
        raise TypeError(f"pyckpt.register({name!r}): give an object with state_dict(), or getter= and setter=")
    REGISTERED[name] = (getter, setter)
    return obj


def unregister(name: str) -> None:
    """Stop saving ``name``."""
    REGISTERED.pop(name, None)


def _check_writable(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".pyckpt-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"checkpoint directory {path!r} (PYCKPT_DIR) is not writable: "
                          f"{e.strerror or e}") from e


def enable_or_exit(hard: bool) -> None:
    """``enable()`` from the environment; on a bad setting print one line and exit with status 2.

    ``hard`` uses ``os._exit``: from a ``.pth`` file a raised exception would be printed and ignored."""
    try:
        enable()
    except ConfigError as e:
        sys.stderr.write(f"pyckpt: {e}\n")
        sys.stderr.flush()
        if hard:
            os._exit(2)
        raise SystemExit(2) from None


def _imported_from_main() -> bool:
    """Whether ``__main__`` itself is executing ``import pyckpt`` / ``from pyckpt import ...``.

    Importing a submodule (``from pyckpt.run import main`` in the
    ``pyckpt-run`` console script) or importing from any other module does
    not count."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (name == "pyckpt" or name.startswith(("pyckpt.", "importlib", "_frozen_importlib"))):
            return name == "__main__" and _importing(frame) == "pyckpt"
        frame = frame.f_back
    return False


def _importing(frame: Any) -> str | None:
    """The module name of the IMPORT_NAME instruction ``frame`` is executing, if any."""
    import dis

    for ins in dis.get_instructions(frame.f_code):
        if ins.offset == frame.f_lasti:
            return ins.argval if ins.opname == "IMPORT_NAME" else None
    return None


def _activate_on_import() -> None:
    """Called by ``pyckpt/__init__``: a bare ``import pyckpt`` in the main script turns transparent mode on."""
    if _SESSION is None and _imported_from_main():
        enable_or_exit(hard=False)
