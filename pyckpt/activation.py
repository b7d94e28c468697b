"""Turning transparent mode on and off: ``enable``, ``disable``, ``register``.

Ways in, remembered as ``how`` (it decides what the explicit API does, below):

* ``PYCKPT_DIR``: the ``.pth`` start-up line runs ``pyckpt._autostart`` when
  ``PYCKPT_DIR`` is set (even empty); ``pyckpt-run`` sets it for its workers.
* ``enable()``: an explicit ``pyckpt.enable()`` call.
* ``import``: a bare ``import pyckpt`` in the ``__main__`` script (never from
  a library or a test) without ``PYCKPT_DIR``.

``PYCKPT_DISABLE=1`` turns every way off.

Cheap first, torch later. Turning on only validates the settings (pure
Python). The hooks are installed when torch finishes importing (a
``sys.meta_path`` finder that fires once), so a Python process that never
imports torch (``pip``, ``pyckpt ls``) never pays for it and never fails
because of pyckpt. A bad setting read by the start-up line is reported then,
as one ``pyckpt:`` line and exit status 2 (not in the ``pyckpt`` command,
which never trains). The directory is created and
probed, and the start-up line printed, when the process really trains: at
the first ``iter()`` of a DataLoader.

Explicit API. A script that constructs ``pyckpt.Checkpointer`` or calls
``pyckpt.save``/``pyckpt.load`` checkpoints itself: transparent mode turned on
only by a bare import stands down (one line) before it can resume or
snapshot behind the script's back. Turned on by ``PYCKPT_DIR``, ``pyckpt-run``
or ``enable()`` it stays on and says once that both are in use.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

from . import knobs
from .errors import ConfigError, PyckptError

DEFAULT_DIR = "pyckpt-checkpoints"
EXPLICIT_API = ("Checkpointer", "save", "load")
# Modules whose Checkpointers are transparent mode's own (every other caller, pyckpt.export included, is explicit).
_TRANSPARENT_LAYER = frozenset({"pyckpt.transparent", "pyckpt.resume", "pyckpt.activation", "pyckpt.shm_tier"})

_how: str | None = None  # "PYCKPT_DIR" | "enable()" | "import" while transparent mode is on
_directory: str | None = None
_SESSION: Any = None  # the transparent Session, once torch is imported
_error: ConfigError | None = None  # a bad setting seen by the start-up line, reported when torch is imported
_watcher: Any = None  # the torch import finder while one is waiting
_nesting: Any = None  # with it, the finder counting pyckpt modules whose code is running (after_import.py)
_warned_both = False
_stood_down = False


# -- public API ---------------------------------------------------------------------------
def enable(directory: str | os.PathLike | None = None, **settings: Any) -> str | None:
    """Turn transparent checkpointing on in this process; returns the checkpoint directory.

    ``directory`` defaults to PYCKPT_DIR, then ``./pyckpt-checkpoints``.
    ``settings`` are the PYCKPT_* settings in lower case without the prefix,
    e.g. ``enable("ckpt", every_steps=100, keep=2)``; they are set in
    ``os.environ`` so worker processes see them too. Returns None when
    PYCKPT_DISABLE=1. Raises ``ConfigError`` for a bad setting or a directory
    that cannot be written. The hooks are installed now if torch is imported,
    else as soon as it is."""
    global _how
    for key in settings:
        name = "PYCKPT_" + key.upper()
        if name not in knobs.KNOBS:
            close = knobs.unknown_names({name: ""})[0][1]
            hint = f"; did you mean {close[7:].lower()}?" if close else ""
            raise ConfigError(f"unknown pyckpt setting {key!r}{hint} (known: "
                              f"{', '.join(k[7:].lower() for k in knobs.KNOBS)})")
    if directory is not None and settings.get("dir") is not None and os.fspath(directory) != str(settings["dir"]):
        raise ConfigError(f"enable() was given two directories, {os.fspath(directory)!r} and dir="
                          f"{str(settings['dir'])!r}: pass one")
    # Set in os.environ (workers inherit them), and put back as they were when the call is refused:
    # a bad value left there failed the corrected call and every worker process.
    before = {n: os.environ.get(n) for n in ("PYCKPT_" + k.upper() for k in settings)}
    try:
        for key, value in settings.items():
            os.environ["PYCKPT_" + key.upper()] = str(value)
        knobs.validate_all()
        if directory is not None:
            knobs.check_local_path(directory, allow_url=True)
        if knobs.get("PYCKPT_DISABLE"):
            return None
        path = knobs.resolve_dir(directory or knobs.get("PYCKPT_DIR") or DEFAULT_DIR)
        if _how is not None and path == _directory:
            _how = "enable()"  # asked for explicitly now: the explicit API no longer turns it off
            return path
        _check_writable(path)
    except BaseException:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        raise
    if _how is not None:
        disable()
    _turn_on(path, "enable()")
    return path


def disable() -> None:
    """Turn transparent mode off: wait for an in-flight checkpoint, remove every hook."""
    global _SESSION, _how, _directory, _error
    _stop_watching()
    session, _SESSION = _SESSION, None
    _how = _directory = _error = None
    if session is not None:
        session.uninstall()


def active() -> bool:
    """Whether transparent mode is on in this process (its hooks may still wait for ``import torch``)."""
    return _how is not None


def register(name: str, obj: Any = None, *, getter: Callable[[], Any] | None = None,
             setter: Callable[[Any], None] | None = None) -> Any:
    """Save state the hooks cannot see with every snapshot, per rank, and put it back on resume.

    Either ``obj`` has ``state_dict()``/``load_state_dict()``, or give
    ``getter()`` (returns tensors/JSON values/tuples) and ``setter(state)``.
    Returns ``obj`` so it can wrap a constructor call. Works whether or not
    transparent mode is on (registering costs nothing then)."""
    from .transparent import REGISTERED  # a registering script has torch anyway

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
    from .transparent import REGISTERED

    REGISTERED.pop(name, None)


def explicit_api_used(what: str) -> None:
    """Called at the top of ``Checkpointer.__init__``, ``pyckpt.save`` and ``pyckpt.load``.

    The script checkpoints itself. Transparent mode turned on only by a bare
    ``import pyckpt`` stands down, so it never resumes or snapshots behind the
    script's back; turned on explicitly it stays on, with one warning line.
    The transparent layer's own Checkpointers (``transparent``, ``resume``) do not count."""
    global _warned_both, _stood_down
    if _how is None:
        return
    if sys._getframe(2).f_globals.get("__name__", "") in _TRANSPARENT_LAYER:
        return
    if _how == "import":
        started = _SESSION is not None and getattr(_SESSION, "ckpt", None) is not None
        disable()
        _stood_down = True
        if _is_rank0() and started:  # only a helper module's late first call gets here
            _say(f"warning: {_stand_down_message(what)}; it is off only from here on: it had already started "
                 "for this run", "warning")
        elif _is_rank0():
            # Nothing was ever checkpointed or resumed: an explicit-API script need not hear about it.
            _say(_stand_down_message(what), "debug")
    elif not _warned_both:
        _warned_both = True
        if _is_rank0():
            _say(f"warning: this script uses pyckpt's explicit API ({what}) and transparent checkpointing "
                 f"(turned on by {_how}) at the same time; transparent mode stays on and resumes from and "
                 f"writes to {_directory} independently of the script's own checkpoints", "warning")


def check_writable_or_exit(path: str) -> None:
    """Create ``path`` and probe it with a temporary file; a one-line error and exit status 2 if it fails."""
    try:
        _check_writable(path)
    except ConfigError as e:
        _fail(e)


# -- turning on ---------------------------------------------------------------------------
def _turn_on(path: str, how: str) -> None:
    """Remember the mode and directory; install the hooks now if torch is loaded, else when it is."""
    global _how, _directory
    _how, _directory = how, path
    if "torch" in sys.modules:
        _on_torch_imported()
    else:
        _watch_torch()


def start_from_environment() -> None:
    """What the ``.pth`` start-up line runs (through ``_autostart``): cheap, pure Python, never exits.

    A bad setting is kept and reported when torch is imported (or when the
    main script imports pyckpt): a process that never imports torch is not a
    training process and must keep working."""
    global _error, _how
    if "PYCKPT_DIR" not in os.environ:
        return
    try:
        if knobs.get("PYCKPT_DISABLE"):
            return
        knobs.validate_all()
    except ConfigError as e:
        _error, _how = e, "PYCKPT_DIR"
        _watch_torch()
        return
    _turn_on(knobs.resolve_dir(knobs.get("PYCKPT_DIR")), "PYCKPT_DIR")


def _on_torch_imported() -> None:
    """torch is loaded: report a bad setting (exit 2), or install the hooks."""
    global _SESSION
    _stop_watching()
    if _error is not None:
        if _is_pyckpt_cli():  # inspecting checkpoints is not training: a bad setting must not stop it
            disable()
            return
        _fail(_error)
    if _how is None or _directory is None or _SESSION is not None:
        return
    session = _new_session(_directory)
    try:
        session.install()
    except BaseException:
        session.hooks.remove_all()
        raise
    _SESSION = session


def _new_session(directory: str) -> Any:
    """A transparent Session whose first DataLoader ``iter()`` also checks the directory and announces itself."""
    from . import finish
    from .transparent import Session

    class _Session(Session):
        def _first_iter(self) -> None:
            check_writable_or_exit(self.directory)
            finish.at_first_iter(self)  # a finished run's relaunch stops here (pyckpt/finish.py)
            try:
                super()._first_iter()
            except PyckptError as e:  # e.g. nothing loadable to resume from: one line, not a traceback
                _fail(e)
            if _is_rank0():
                _announce(self.directory)
            finish.install(self)  # marks the run finished at a normal exit

    return _Session(directory)


def _announce(directory: str) -> None:
    """The start-up line, and a warning for unknown PYCKPT_* names."""
    from .policy import DEFAULT_EVERY_SECONDS

    _warn_unknown_names()
    _say(startup_line(directory, *knobs.interval(), knobs.get("PYCKPT_KEEP"), DEFAULT_EVERY_SECONDS))


def startup_line(directory: str, every_steps: int | None, every_seconds: float | None, keep: int,
                 default_seconds: float) -> str:
    """``checkpointing to DIR every N steps / S s, keep K`` (the default interval says it is the default)."""
    if every_steps == "auto":  # PYCKPT_EVERY=auto or PYCKPT_EVERY_STEPS=auto (pyckpt/policy.py)
        from .policy import describe_auto
        when = describe_auto(knobs.get("PYCKPT_MTBF_HOURS"), every_seconds)
        return f"checkpointing to {directory} {when}, keep {keep}"
    if every_steps is None and every_seconds is None:
        minutes = f"{default_seconds / 60:g} minutes"
        when = (f"every {default_seconds:g} s (the default: nothing is saved in the first {minutes}; set "
                "PYCKPT_EVERY, PYCKPT_EVERY_STEPS or PYCKPT_EVERY_SECONDS to change it)")
    else:
        parts = ([f"{every_steps} steps"] if every_steps is not None else []) + \
                ([f"{every_seconds:g} s"] if every_seconds is not None else [])
        when = "every " + " or ".join(parts)
    return f"checkpointing to {directory} {when}, keep {keep}"


def _warn_unknown_names() -> None:
    msg = knobs.unknown_names_message()
    if msg:
        _say(msg, "warning")
    for msg in knobs.ignored_messages():  # validated by now: set, known, and without effect
        _say(msg, "warning")


# -- waiting for torch --------------------------------------------------------------------
def _torch_loaded(module: Any) -> None:
    """torch finished importing (an ``AfterImport`` callback): install the hooks."""
    try:
        _on_torch_imported()
    except Exception as e:  # never break `import torch`; but never fail silently either
        disable()
        _say(f"warning: transparent checkpointing is off: installing its hooks failed: "
             f"{type(e).__name__}: {e}", "warning")


def _watch_torch() -> None:
    global _watcher, _nesting
    if _watcher is None:
        if "torch" in sys.modules:
            _on_torch_imported()
            return
        from .after_import import AfterImport, ImportNesting  # torch-free, like this module

        # A pyckpt module imported before torch (``import pyckpt.manifest`` first in a script) imports torch
        # itself: the hooks then wait until that module has run to its end, since they import it.
        nesting = _nesting = ImportNesting(f"{__package__}.").install()
        _watcher = AfterImport({"torch": lambda module: nesting.when_done(lambda: _torch_loaded(module))}).install()


def _stop_watching() -> None:
    global _watcher, _nesting
    w, _watcher = _watcher, None
    n, _nesting = _nesting, None
    if w is not None:
        w.remove()
    if n is not None:
        n.remove()


# -- helpers ------------------------------------------------------------------------------
def _check_writable(path: str) -> None:
    import tempfile

    if knobs.is_url(path):
        return  # object storage: the Checkpointer probes it with a write when training starts
    if os.path.exists(path) and not os.path.isdir(path):  # makedirs would say "File exists"
        raise ConfigError(f"checkpoint directory {path!r} (PYCKPT_DIR) is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".pyckpt-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"checkpoint directory {path!r} (PYCKPT_DIR) is not writable: "
                          f"{e.strerror or e}") from e


def _fail(e: BaseException) -> None:
    """One ``pyckpt:`` line, then exit status 2 (no traceback)."""
    sys.stderr.write(f"pyckpt: {e}\n")
    sys.stderr.flush()
    raise SystemExit(2)


def _say(msg: str, level: str = "info") -> None:
    """One ``pyckpt: ...`` line on stderr; PYCKPT_LOG=quiet silences info lines (warnings always print)."""
    try:
        setting = knobs.get("PYCKPT_LOG")
    except ConfigError:
        setting = "info"
    if level == "warning" or (level == "debug" and setting == "debug") or (level == "info" and setting != "quiet"):
        sys.stderr.write(f"pyckpt: {msg}\n")
        sys.stderr.flush()


def _is_rank0() -> bool:
    """Rank 0 of the job: of its process group once there is one (``torch.multiprocessing.spawn`` sets no
    RANK), else as torchrun's RANK says (a plain process is rank 0). Never imports torch."""
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except Exception:  # a half-torn-down group: the environment below still answers
        pass
    rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or "0"
    return rank.strip() == "0"


def _is_pyckpt_cli() -> bool:
    """Whether this process is the ``pyckpt`` command (console script or ``python -m pyckpt``)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if getattr(spec, "name", None) in ("pyckpt.__main__", "pyckpt.cli"):
        return True
    return os.path.basename(str(getattr(main, "__file__", ""))) == "pyckpt"


def _stand_down_message(what: str) -> str:
    return (f"this script uses pyckpt's explicit API ({what}); transparent checkpointing is off (a bare "
            "`import pyckpt` turns it on only for scripts that do not checkpoint themselves; set PYCKPT_DIR "
            "or call pyckpt.enable() to use both)")


# -- import mode --------------------------------------------------------------------------
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


def main_script_explicit_api() -> str | None:
    """The explicit-API name (``Checkpointer``, ``save``, ``load``) the ``__main__`` script's source uses, if any.

    Read from the source (``ast``, nothing executed) so that a script which
    checkpoints itself only later, after its first DataLoader ``iter()``, is
    never resumed by transparent mode first."""
    import ast

    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if not path or not str(path).endswith(".py"):
        return None
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return None
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update(a.asname or "pyckpt" for a in node.names if a.name == "pyckpt")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                (node.module == "pyckpt" or node.module.startswith("pyckpt.")):
            for a in node.names:
                if a.name in EXPLICIT_API:
                    return a.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in EXPLICIT_API and \
                isinstance(node.value, ast.Name) and node.value.id in aliases:
            return node.attr
    return None


def _activate_on_import() -> None:
    """Called by ``pyckpt/__init__``: a bare ``import pyckpt`` in the main script turns transparent mode on."""
    global _stood_down
    if _stood_down or not _imported_from_main():
        return
    if _error is not None:  # a bad setting the start-up line kept: this script means to use pyckpt
        _fail(_error)
    if _how is not None:
        return
    try:
        knobs.validate_all()
        if knobs.get("PYCKPT_DISABLE"):
            return
    except ConfigError as e:
        _fail(e)
    used = None if knobs.get("PYCKPT_DIR") else main_script_explicit_api()
    if used is not None:
        _stood_down = True
        if _is_rank0():
            _say(_stand_down_message(used), "debug")
        return
    if knobs.get("PYCKPT_DIR"):  # the start-up line did not run (python -S, not installed): still explicit
        _turn_on(knobs.resolve_dir(knobs.get("PYCKPT_DIR")), "PYCKPT_DIR")
        return
    _turn_on(os.path.abspath(DEFAULT_DIR), "import")
