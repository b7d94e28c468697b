"""Whether two call sites of one code object provably continue the same way.

A relaunch may reach its restore point at another call of the same method than the run that wrote
the checkpoint: the apex/YOLOX prefetcher pattern calls ``prefetcher.next()`` once before
``while input is not None:`` and once at the end of the loop body, and a resume fast-forwards to
the first of them. The loop state (locals, globals, loop positions) is restored there, so what
remains different is only the bytecode that runs after the call returns. ``same_after`` compares
it (docs/TRANSPARENCY.md, "Unregistered prefetching iterators"):

* instructions are read with ``dis`` (CACHE, EXTENDED_ARG and NOP skipped); two instructions are
  the same when their opcode name and argument are (one code object: the same argument is the same
  name, constant or local), and so is the exception handler covering each;
* jumps are compared by their resolved target (chains of unconditional jumps followed); a
  conditional jump is normalised to (test, target if the test holds, target if not), so the
  ``while`` test at the top of a loop and its copy at the bottom compare equal in any layout;
* both paths are walked in lock step; a pair of paths is the same when they reach the same offset
  or a pair of offsets already being compared, within ``WALK_MAX`` instructions;
* the value stack below the call's operands must hold only what the enclosing blocks put there
  (``for`` iterators, restored with the loop state, and ``with``/``try`` entries), the same at both
  sites: a temporary pushed before the call (``foo() + it.next()``) is not restored.

Anything else (another name, constant or opcode, a walk too long) is "not the same". Only the
standard library is used (``frames`` needs no torch), so it is checked on each CPython found.
"""
from __future__ import annotations

import bisect
import dis
import types
from functools import lru_cache
from typing import Any

from .frames import _depths

WALK_MAX = 200  # instruction pairs compared before giving up ("not the same")

_SKIP = frozenset({"CACHE", "EXTENDED_ARG", "NOP"})
_UNCONDITIONAL = frozenset({"JUMP_FORWARD", "JUMP_BACKWARD", "JUMP_BACKWARD_NO_INTERRUPT", "JUMP_ABSOLUTE",
                            "JUMP", "JUMP_NO_INTERRUPT"})
_EXACT_BOOL = "TO_BOOL" in dis.opmap  # 3.13+: conditional jumps test an exact bool (TO_BOOL converts)
_ENDS = frozenset({"RETURN_VALUE", "RETURN_CONST", "RAISE_VARARGS", "RERAISE"})
# Conditional jumps that pop their operand: (what is tested, whether the jump is taken when it holds).
_CONDITIONAL: dict[str, tuple[str, bool]] = {}
for _prefix in ("POP_JUMP_IF_", "POP_JUMP_FORWARD_IF_", "POP_JUMP_BACKWARD_IF_"):
    _CONDITIONAL.update({_prefix + "TRUE": ("truth", True), _prefix + "FALSE": ("truth", False),
                         _prefix + "NONE": ("none", True), _prefix + "NOT_NONE": ("none", False)})


class _Code:
    """One code object's instructions by offset, the next one after each, and its exception table."""

    def __init__(self, code: types.CodeType) -> None:
        ins = list(dis.get_instructions(code))
        self.at = {i.offset: i for i in ins}
        self.after = {a.offset: b.offset for a, b in zip(ins, ins[1:])}
        try:
            self.entries = list(dis.Bytecode(code).exception_entries)
        except AttributeError:  # before 3.11: no table (handlers are instructions, compared as such)
            self.entries = []
        self.depth, self.loops = _depths(code)
        self.offsets = [i.offset for i in ins]
        self.size = len(code.co_code)

    def owner(self, off: int) -> int | None:
        """The instruction ``off`` belongs to: a frame in a call may report the last of its CALL's
        inline cache entries (3.11's specialised calls), or its PRECALL (3.11), as the current one."""
        n = bisect.bisect_right(self.offsets, off) - 1
        if n < 0 or off >= self.size:
            return None
        i = self.at[self.offsets[n]]
        if i.opname == "PRECALL":
            return self.after.get(i.offset)
        return i.offset

    def handler(self, off: int) -> tuple | None:
        """The exception handler covering ``off`` (3.11+ tables do not overlap: the innermost one)."""
        for e in self.entries:
            if e.start <= off < e.end:
                return (e.target, e.depth, e.lasti)
        return None

    def resolve(self, off: int | None) -> int | None:
        """``off``, past skipped instructions and unconditional jumps; None off the end or in a cycle."""
        seen = set()
        while off is not None and off not in seen:
            seen.add(off)
            i = self.at.get(off)
            if i is None:
                return None
            if i.opname in _SKIP:
                off = self.after.get(off)
            elif i.opname in _UNCONDITIONAL:
                off = i.argval
            else:
                return off
        return None

    def base_ok(self, call: int) -> int | None:
        """The stack depth below the call at ``call`` if it holds only the enclosing blocks' entries
        (``for`` iterators, a ``with``'s exit, a handler's state), else None."""
        nxt = self.after.get(call)
        if nxt is None or nxt not in self.depth:
            return None
        base = self.depth[nxt] - 1  # the call's result is on top of it
        active = [o for o, end in self.loops if o <= call < end]
        h = next((e for e in self.entries if e.start <= call < e.end), None)
        if h is None:
            expected = len(active)
        else:  # the handler's depth holds what is below its block; loops started inside it are above
            start = min(e.start for e in self.entries if e.target == h.target)
            expected = h.depth + sum(1 for o in active if o >= start)
        return base if base == expected else None


@lru_cache(maxsize=256)
def _code(code: types.CodeType) -> _Code:
    return _Code(code)


def _conditional(c: _Code, i: Any) -> tuple | None:
    """(test, target if it holds, target if not) of a popping conditional jump, else None."""
    kind = _CONDITIONAL.get(i.opname)
    if kind is None:
        return None
    test, on_hold = kind
    jump, fall = c.resolve(i.argval), c.resolve(c.after.get(i.offset))
    return (test, jump, fall) if on_hold else (test, fall, jump)


def same_after(code: types.CodeType, a: int, b: int, limit: int = WALK_MAX) -> bool:
    """Whether what runs after the call at offset ``a`` of ``code`` is provably what runs after the
    call at offset ``b`` (see the module docstring): the same call instruction and handler, the same
    enclosing blocks below its operands, and the same instructions from there on until both paths
    meet. Offsets are as ``frames.position`` gives them (an offset inside a call's inline cache entries is
    that call's); anything not understood is False."""
    if a == b:
        return True
    try:
        c = _code(code)
        a, b = c.owner(a), c.owner(b)
        if a is None or b is None:
            return False
        if a == b:
            return True
        ia, ib = c.at[a], c.at[b]
        if (ia.opname, ia.arg) != (ib.opname, ib.arg) or not ia.opname.startswith("CALL"):
            return False
        if c.handler(a) != c.handler(b):
            return False
        base = c.base_ok(a)
        if base is None or base != c.base_ok(b):
            return False
        if {o for o, end in c.loops if o <= a < end} != {o for o, end in c.loops if o <= b < end}:
            return False
        return _walk(c, c.after.get(a), c.after.get(b), limit)
    except (ValueError, TypeError, KeyError, AttributeError):  # bytecode this analysis does not know
        return False


def _walk(c: _Code, x0: int | None, y0: int | None, limit: int) -> bool:
    todo = [(x0, y0)]
    seen: set[tuple[int, int]] = set()
    while todo:
        x, y = todo.pop()
        x, y = c.resolve(x), c.resolve(y)
        if x is None or y is None:
            return False
        if x == y or (x, y) in seen:
            continue
        seen.add((x, y))
        if len(seen) > limit:
            return False
        ix, iy = c.at[x], c.at[y]
        cx, cy = _conditional(c, ix), _conditional(c, iy)
        if cx is not None or cy is not None:
            if cx is None or cy is None or cx[0] != cy[0]:
                return False
            # A test that can raise (bool() before 3.13's TO_BOOL) must raise into the same handler; the
            # compiler leaves some jumps that cannot raise outside the exception table's ranges.
            if cx[0] == "truth" and not _EXACT_BOOL and c.handler(x) != c.handler(y):
                return False
            todo += [(cx[1], cy[1]), (cx[2], cy[2])]
            continue
        if c.handler(x) != c.handler(y):
            return False
        if ix.opname != iy.opname:
            return False
        if ix.opcode in dis.hasjrel or ix.opcode in dis.hasjabs:
            # FOR_ITER, SEND, JUMP_IF_*_OR_POP: the same kind, both ways compared (arguments are relative)
            todo += [(c.after.get(x), c.after.get(y)), (ix.argval, iy.argval)]
            continue
        if ix.arg != iy.arg:
            return False
        if ix.opname not in _ENDS:
            todo.append((c.after.get(x), c.after.get(y)))
    return True
