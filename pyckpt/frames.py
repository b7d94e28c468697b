"""Low-level access to the training script's own frames: which frames are the script's, what
identifies their code, their locals, and the iterators of the ``for`` loops they are executing.

Everything interpreter-specific is here and guarded by the Python version:

* **Locals** are written with ``frame.f_locals`` then ``PyFrame_LocalsToFast`` (CPython <= 3.12,
  through ``ctypes.pythonapi``); on 3.13 ``f_locals`` writes through (PEP 667). Module-level frames
  write their globals dict. Checked on CPython 3.9-3.13 (tests/transparent/test_loopstate_versions.py).
* **Loop iterators** live on the frame's value stack, which Python does not expose
  (``gc.get_referents(frame)`` is empty for an executing frame). They are read with ``ctypes``: on
  CPython 3.11 to 3.13 (64-bit) from the ``_PyInterpreterFrame``, on 3.9 and 3.10 from the
  ``PyFrameObject`` itself (its ``f_valuestack`` pointer). The layout is checked against the
  frame's code object and known locals first; a mismatch reads nothing (then warned). The slot of
  each enclosing ``for`` loop's iterator comes from a stack-depth analysis of the bytecode
  (``dis``), so only live slots are read.
* ``enumerate``'s index is written with ``ctypes`` at the offset where its value is found
  (checked against ``__reduce__`` first).
"""
from __future__ import annotations

import ctypes
import dis
import hashlib
import inspect
import os
import sys
import sysconfig
import types
from functools import lru_cache
from typing import Any

PY = sys.version_info[:2]
_PTR = ctypes.sizeof(ctypes.c_void_p)


# ----------------------------------------------------------------------------- whose frame

def _library_roots() -> tuple[str, ...]:
    roots = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        p = sysconfig.get_paths().get(key)
        if p:
            roots.add(os.path.realpath(p))
    try:
        import site

        roots.update(os.path.realpath(p) for p in site.getsitepackages())
        roots.add(os.path.realpath(site.getusersitepackages()))
    except (AttributeError, OSError):
        pass
    here = os.path.dirname(os.path.realpath(__file__))
    roots.add(here)  # pyckpt itself, also when installed editable
    torch_mod = sys.modules.get("torch")
    if torch_mod is not None and getattr(torch_mod, "__file__", None):
        roots.add(os.path.dirname(os.path.realpath(torch_mod.__file__)))
    return tuple(r.rstrip(os.sep) + os.sep for r in roots)


@lru_cache(maxsize=4096)
def is_user_file(filename: str) -> bool:
    """Whether code in ``filename`` is the script's (not torch, pyckpt, the stdlib or an installed package)."""
    if filename.startswith("<"):
        return filename in ("<string>", "<stdin>")  # python -c / stdin scripts; not <frozen ...>
    path = os.path.realpath(filename)
    return not path.startswith(_library_roots())


def is_script_class(t: type) -> bool:
    """Whether class ``t`` is the script's own (defined in ``__main__`` or another script file)."""
    mod = sys.modules.get(getattr(t, "__module__", None) or "")
    f = getattr(mod, "__file__", None) if mod is not None else None
    return t.__module__ == "__main__" or (isinstance(f, str) and is_user_file(f))


@lru_cache(maxsize=1024)
def is_own_file(filename: str) -> bool:
    """Whether code in ``filename`` is pyckpt's own (its wrapper generators sit in the script's loops)."""
    here = os.path.dirname(os.path.realpath(__file__)) + os.sep
    return not filename.startswith("<") and os.path.realpath(filename).startswith(here)


def user_frames(start: types.FrameType | None) -> list[types.FrameType]:
    """The script's frames on the stack from ``start`` outward, outermost (the script's entry) first."""
    out = []
    f = start
    while f is not None:
        if is_user_file(f.f_code.co_filename):
            out.append(f)
        f = f.f_back
    out.reverse()
    return out


_DYNAMO_RESUME = "torch_dynamo_resume_in_"  # Dynamo's name for the rest of a function after a graph break


def compiled_function(user: list[types.FrameType]) -> str | None:
    """``"name (file:line)"`` of a script function torch.compile is running in ``user`` after a graph break
    (Dynamo's transformed frames: their code changes as Dynamo recompiles), else None."""
    for f in user:
        name = f.f_code.co_name
        if name.startswith(_DYNAMO_RESUME):
            original = name[len(_DYNAMO_RESUME):].rsplit("_at_", 1)[0]
            return f"{original} ({os.path.basename(f.f_code.co_filename)}:{f.f_lineno})"
    return None


@lru_cache(maxsize=1024)
def code_key(code: types.CodeType) -> tuple:
    """What identifies a code object across runs: file name, function, first line and a digest of
    its bytecode, names and constants (nested code objects included), so an edited line differs."""
    h = hashlib.blake2b(digest_size=12)
    _feed(h, code)
    return (os.path.basename(code.co_filename), code.co_qualname if PY >= (3, 11) else code.co_name,
            code.co_firstlineno, h.hexdigest())


def _feed(h: Any, code: types.CodeType) -> None:
    h.update(code.co_code)
    h.update(repr((code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars)).encode())
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            _feed(h, c)
        else:
            h.update(repr(c).encode())


@lru_cache(maxsize=1024)
def _next_call(code: types.CodeType) -> dict[int, int]:
    """PRECALL offset -> the offset of its CALL (3.11)."""
    ins = list(dis.get_instructions(code))
    return {a.offset: b.offset for a, b in zip(ins, ins[1:]) if a.opname == "PRECALL"}


def position(frame: types.FrameType) -> int:
    """The frame's current instruction, the same whether or not the interpreter specialised it:
    CPython 3.11 runs a call to a builtin inside its PRECALL once warmed up, inside CALL before."""
    lasti = frame.f_lasti
    if PY == (3, 11):
        return _next_call(frame.f_code).get(lasti, lasti)
    return lasti


@lru_cache(maxsize=1024)
def _opnames(code: types.CodeType) -> dict[int, str]:
    return {i.offset: i.opname for i in dis.get_instructions(code)}


def calls_explicitly(frame: types.FrameType) -> bool:
    """Whether ``frame`` is in a call (``next(it)``, ``it.__next__()``) rather than a ``for`` loop or a
    ``yield from`` asking an iterator for its next item."""
    return _opnames(frame.f_code).get(position(frame), "").startswith(("CALL", "PRECALL"))


# ----------------------------------------------------------------------------- locals

def is_module_frame(frame: types.FrameType) -> bool:
    return frame.f_code.co_name == "<module>" or frame.f_locals is frame.f_globals


def write_locals(frame: types.FrameType, values: dict[str, Any]) -> None:
    """Put ``values`` into ``frame``'s local variables (the frame keeps running with them)."""
    if not values:
        return
    if is_module_frame(frame):
        frame.f_globals.update(values)
        return
    if PY >= (3, 13):
        proxy = frame.f_locals  # PEP 667: a write-through proxy
        for k, v in values.items():
            proxy[k] = v
        return
    loc = frame.f_locals  # snapshot dict of the fast locals (PyFrame_FastToLocals)
    loc.update(values)
    ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))


# ----------------------------------------------------------------------------- loop iterators

class _Layout:
    """Byte offsets in CPython's frame structs (Include/internal/pycore_frame.h, frameobject.h).

    PyFrameObject: PyObject_HEAD (refcount, type), f_back, then f_frame (3.11 to 3.13).
    _PyInterpreterFrame: 3.11 has f_func, f_globals, f_builtins, f_locals, then f_code; 3.12 and 3.13
    start with the code object (f_code / f_executable). All three have 8 pointers, an int and 2-3
    bytes (padded to 8) before localsplus."""

    frame_f_frame = 3 * _PTR
    iframe_f_code = 4 * _PTR if PY == (3, 11) else 0
    iframe_localsplus = 8 * _PTR + 8
    # 3.9, 3.10: PyFrameObject is PyObject_VAR_HEAD (refcount, type, size), f_back, f_code,
    # f_builtins, f_globals, f_locals, then f_valuestack (points just past the locals and cells).
    frame_f_code = 4 * _PTR
    frame_f_valuestack = 8 * _PTR


def _nlocalsplus(code: types.CodeType) -> int:
    varnames = code.co_varnames
    if PY < (3, 11):  # locals, then one slot per cell (an argument that is a cell has two), then frees
        return len(varnames) + len(code.co_cellvars) + len(code.co_freevars)
    # An argument that is also a cell has one slot (it is in co_varnames and co_cellvars).
    return len(varnames) + len([c for c in code.co_cellvars if c not in varnames]) + len(code.co_freevars)


@lru_cache(maxsize=1024)
def _depths(code: types.CodeType) -> tuple[dict[int, int], tuple[tuple[int, int], ...]]:
    """Stack depth before each instruction (by offset) and every ``for`` loop as (FOR_ITER offset,
    loop-exit offset), from a flow analysis of the bytecode."""
    ins = list(dis.get_instructions(code))
    by_off = {i.offset: n for n, i in enumerate(ins)}
    depth: dict[int, int] = {}
    # 3.10 starts a generator with GEN_START, which pops the value sent in (dis counts it as -1).
    todo = [(ins[0].offset, 1 if ins[0].opname == "GEN_START" else 0)] if ins else []
    try:
        for e in dis.Bytecode(code).exception_entries:
            todo.append((e.target, e.depth + (1 if e.lasti else 0) + 1))
    except AttributeError:  # pragma: no cover - before 3.11
        pass
    no_fall = {"RETURN_VALUE", "RAISE_VARARGS", "RERAISE", "JUMP_FORWARD", "JUMP_BACKWARD",
               "JUMP_BACKWARD_NO_INTERRUPT", "JUMP_ABSOLUTE", "RETURN_CONST", "JUMP", "JUMP_NO_INTERRUPT"}
    while todo:
        off, d = todo.pop()
        if off in depth or off not in by_off:
            continue
        n = by_off[off]
        while n < len(ins):
            i = ins[n]
            if i.offset in depth:
                break
            depth[i.offset] = d
            if i.opcode in dis.hasjrel or i.opcode in dis.hasjabs:
                todo.append((i.argval, d + dis.stack_effect(i.opcode, i.arg, jump=True)))
            if i.opname in no_fall:
                break
            if i.opname == "RETURN_GENERATOR":
                d += 1  # a generator's first instruction: the value its POP_TOP drops (dis says 0)
            else:
                d += dis.stack_effect(i.opcode, i.arg, jump=False) if i.opcode >= dis.HAVE_ARGUMENT \
                    else dis.stack_effect(i.opcode, jump=False)
            n += 1
    loops = tuple((i.offset, int(i.argval)) for i in ins if i.opname == "FOR_ITER")
    return depth, loops


_ASYNC = inspect.CO_COROUTINE | inspect.CO_ITERABLE_COROUTINE | inspect.CO_ASYNC_GENERATOR


@lru_cache(maxsize=1024)
def _delegations(code: types.CodeType) -> tuple[tuple[int, int], ...]:
    """Every ``yield from`` of a generator's code as (its SEND offset, the offset it exits to); 3.10's
    YIELD_FROM repeats itself, so its region is that instruction. The iterator it delegates to sits two
    slots below the top of the stack there, under the value sent. None in coroutines (``await`` sends
    too, to awaitables no loop position is kept for)."""
    if code.co_flags & _ASYNC:
        return ()
    out = []
    for i in dis.get_instructions(code):
        if i.opname == "SEND":
            out.append((i.offset, int(i.argval)))
        elif i.opname == "YIELD_FROM":
            out.append((i.offset, i.offset + 2))
    return tuple(out)


def _active(frame: types.FrameType) -> list[tuple[int, int, int]]:
    """The loops ``frame`` is executing, each (its instruction's offset, stack depth there, slots from the
    top down to its iterator): ``for`` loops (the iterator under FOR_ITER) and ``yield from`` delegations
    (a generator's ``yield from it`` goes on through ``it`` as a loop over it would)."""
    code, here = frame.f_code, frame.f_lasti
    depth, loops = _depths(code)
    active = [(off, depth.get(off), 1) for off, end in loops if off <= here < end]
    active += [(off, depth.get(off), 2) for off, end in _delegations(code) if off <= here < end]
    return active


def active_loops(frame: types.FrameType) -> int:
    """How many ``for`` loops and ``yield from`` delegations ``frame`` is executing (from the bytecode
    alone; any version)."""
    try:
        return len(_active(frame))
    except (ValueError, TypeError):
        return 0


def _supported() -> bool:
    return (3, 9) <= PY <= (3, 13) and sys.implementation.name == "cpython" and _PTR == 8


def _read_ptr(addr: int) -> int:
    return ctypes.c_void_p.from_address(addr).value or 0


def _locals_base(frame: types.FrameType) -> int | None:
    """Address of the frame's first local slot (the value stack follows the locals), after checking
    the assumed layout on this very frame; None when it does not fit."""
    if PY >= (3, 11):
        iframe = _read_ptr(id(frame) + _Layout.frame_f_frame)
        if not iframe or _read_ptr(iframe + _Layout.iframe_f_code) != id(frame.f_code):
            return None
        base = iframe + _Layout.iframe_localsplus
    else:
        if _read_ptr(id(frame) + _Layout.frame_f_code) != id(frame.f_code):
            return None
        base = _read_ptr(id(frame) + _Layout.frame_f_valuestack) - _nlocalsplus(frame.f_code) * _PTR
        if not id(frame) < base < id(frame) + sys.getsizeof(frame):  # localsplus is inside the frame
            return None
    return base if _layout_ok(frame, base) else None


def _layout_ok(frame: types.FrameType, base: int) -> bool:
    """The frame's known locals are where the layout puts them."""
    loc = frame.f_locals
    checked = 0
    for n, name in enumerate(frame.f_code.co_varnames):
        if name in loc and name not in frame.f_code.co_cellvars:
            if _read_ptr(base + n * _PTR) != id(loc[name]):
                return False
            checked += 1
    return True


def loop_iterators(frame: types.FrameType) -> list[Any] | None:
    """The iterators of the ``for`` loops ``frame`` is executing, outermost first; None when this
    interpreter is not supported (then nothing is read). ``frame`` must be suspended in a call."""
    if not _supported():
        return None
    code = frame.f_code
    active = _active(frame)
    if not active:
        return []
    depth = _depths(code)[0]
    if any(d is None or d < k for _, d, k in active) or min(depth.values(), default=0) < 0:
        return None  # the analysis does not fit this code: read nothing
    base = _locals_base(frame)
    if base is None:
        return None
    stack = base + _nlocalsplus(code) * _PTR
    out = []
    for _, d, k in sorted(active, key=lambda a: a[1]):
        ptr = _read_ptr(stack + (d - k) * _PTR)  # the iterator: below FOR_ITER, or under SEND's value
        if not ptr:
            return None
        out.append(ctypes.cast(ptr, ctypes.py_object).value)
    return out


def replace_loop_iterator(frame: types.FrameType, old: Any, new: Any) -> bool:
    """Make the loop of ``frame`` that iterates ``old`` (one of ``loop_iterators(frame)``) iterate ``new``
    from its next step on: the stack slot is written, with the references moved. False (nothing written)
    when this interpreter is not supported or ``old`` is not there."""
    if not _supported():
        return False
    active = _active(frame)
    base = _locals_base(frame)
    if base is None or not active or any(d is None or d < k for _, d, k in active):
        return False
    stack = base + _nlocalsplus(frame.f_code) * _PTR
    for _, d, k in active:
        addr = stack + (d - k) * _PTR
        if _read_ptr(addr) == id(old):
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(new))  # the slot's reference, taken from the caller's
            ctypes.c_void_p.from_address(addr).value = id(new)
            ctypes.pythonapi.Py_DecRef(ctypes.py_object(old))  # the slot's reference to the old one, given up
            return True
    return False


# ----------------------------------------------------------------------------- positions

def enumerate_index(e: enumerate) -> int:
    """The index ``e`` yields next."""
    return int(e.__reduce__()[1][1])


def set_enumerate_index(e: enumerate, n: int) -> bool:
    """Make ``e`` yield index ``n`` next (its wrapped iterator is positioned separately). False when
    the interpreter's ``enumobject`` layout is not the expected one (nothing written)."""
    if sys.implementation.name != "cpython" or not (3, 9) <= PY <= (3, 13):
        return False
    addr = id(e) + 2 * _PTR  # PyObject_HEAD, then Py_ssize_t en_index
    cell = ctypes.c_ssize_t.from_address(addr)
    if cell.value != enumerate_index(e) or n < 0:
        return False  # the index is kept elsewhere (beyond PY_SSIZE_T_MAX: en_longindex)
    cell.value = n
    return enumerate_index(e) == n
