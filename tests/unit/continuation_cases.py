"""Call sites compared by pyckpt/continuation.py, torch-free, so every CPython found can run them
(test_continuation.py). In each source the two calls compared are the ``.next()`` calls on the
lines marked ``# A`` and ``# B``; ``expected``: whether what runs after them is the same.

    python continuation_cases.py path/to/pyckpt   -> one JSON line {case: result}
"""
from __future__ import annotations

import dis
import importlib
import json
import sys
import types

APEX = """
for epoch in range(3):
    prefetcher = P(loader)
    input, target = prefetcher.next()  # A
    while input is not None:
        step(input, target)
        input, target = prefetcher.next()  # B
"""

CASES: dict[str, tuple[str, bool]] = {
    # accepted: the while test at the top and its copy at the bottom of the loop
    "apex at module level": (APEX, True),
    "apex in a function": ("""
def f(loader, model, P, step):
    losses = []
    for epoch in range(3):
        prefetcher = P(loader)
        i = 0
        input, target = prefetcher.next()  # A
        while input is not None:
            i += 1
            losses.append(step(model, input, target))
            input, target = prefetcher.next()  # B
    return losses
""", True),
    "truth test": ("""
def f(it, step):
    x = it.next()  # A
    while x:
        step(x)
        x = it.next()  # B
""", True),
    "inside try and with": ("""
def f(it, step, ctx):
    try:
        with ctx():
            for e in range(2):
                x = it.next()  # A
                while x is not None:
                    step(x)
                    x = it.next()  # B
    except KeyboardInterrupt:
        pass
""", True),
    "attribute target": ("""
def f(self, step):
    self.x = self.it.next()  # A
    while self.x is not None:
        step(self.x)
        self.x = self.it.next()  # B
""", True),
    # refused
    "other variable": ("""
def f(it, step):
    a = it.next()  # A
    while a is not None:
        step(a)
        b = it.next()  # B
""", False),
    "other code after": ("""
def f(it, step, log):
    x = it.next()  # A
    while x is not None:
        step(x)
        x = it.next()  # B
        log(x)
""", False),
    "other test": ("""
def f(it, step):
    x = it.next()  # A
    while x is not None:
        step(x)
        x = it.next()  # B
        if x is None:
            continue
""", False),
    "truth test against None test": ("""
def f(it, step):
    x = it.next()  # A
    if x:
        step(x)
    x = it.next()  # B
    if x is not None:
        step(x)
""", False),
    "other constant": ("""
def f(it, step):
    x = it.next()  # A
    n = 1
    while x is not None:
        step(x)
        x = it.next()  # B
        n = 2
""", False),
    "temporary below the call": ("""
def f(it, foo, bar, step):
    x = foo() + it.next()  # A
    while x is not None:
        step(x)
        x = bar() + it.next()  # B
""", False),
    "same temporary below the call": ("""
def f(it, foo, step):
    for e in range(2):
        x = foo() + it.next()  # A
        while x:
            step(x)
            x = foo() + it.next()  # B
""", False),
    "one call inside a try": ("""
def f(it, step):
    x = it.next()  # A
    while x is not None:
        step(x)
        try:
            x = it.next()  # B
        except StopIteration:
            x = None
""", False),
    "other arguments": ("""
def f(it, step):
    x = it.next()  # A
    while x is not None:
        step(x)
        x = it.next(1)  # B
""", False),
    "other loops": ("""
def f(it, step):
    for e in range(2):
        x = it.next()  # A
        for k in range(2):
            step(x)
            x = it.next()  # B
""", False),
}


def _code(source: str) -> types.CodeType:
    code = compile(source, "<case>", "exec")
    funcs = [c for c in code.co_consts if isinstance(c, types.CodeType)]
    return funcs[0] if funcs else code


def call_at(code: types.CodeType, line: int) -> int:
    """The offset of the first call after a load of ``next`` on ``line``."""
    seen_next = False
    for i in dis.get_instructions(code):
        if i.positions is None or i.positions.lineno != line:
            continue
        if i.argval == "next" and i.opname in ("LOAD_METHOD", "LOAD_ATTR"):
            seen_next = True
        elif seen_next and i.opname.startswith("CALL"):
            return i.offset
    raise LookupError(f"no .next() call on line {line}")


def sites(source: str) -> tuple[types.CodeType, int, int]:
    """The code object and the offsets of its calls marked A and B."""
    lines = source.splitlines()
    a = next(n for n, t in enumerate(lines, 1) if t.endswith("# A"))
    b = next(n for n, t in enumerate(lines, 1) if t.endswith("# B"))
    code = _code(source)
    return code, call_at(code, a), call_at(code, b)


def run(continuation: types.ModuleType) -> dict[str, bool]:
    """Each case's result, both ways round."""
    out = {}
    for name, (source, _) in CASES.items():
        code, a, b = sites(source)
        out[name] = continuation.same_after(code, a, b)
        out[name + " (reversed)"] = continuation.same_after(code, b, a)
    code, a, b = sites(APEX)
    out["walk limit"] = continuation.same_after(code, a, b, limit=1)
    # A frame in a specialised call (3.11) reports the last of the CALL's inline cache entries.
    nxt = {x.offset: y.offset for x, y in zip(*[list(dis.get_instructions(code))[k:] for k in (0, 1)])}
    out["cache entries"] = continuation.same_after(code, nxt[a] - 2, nxt[b] - 2)
    return out


if __name__ == "__main__":
    # Load pyckpt.frames and pyckpt.continuation without pyckpt/__init__.py (which needs torch).
    pkg = types.ModuleType("pyckpt")
    pkg.__path__ = [sys.argv[1]]
    sys.modules["pyckpt"] = pkg
    print(json.dumps(run(importlib.import_module("pyckpt.continuation"))))
