"""The variables a training loop carries from one step to the next, read from the script's source.

An edited script resumed with ``PYCKPT_RESUME_EDITED=tracked`` cannot have its loop state restored
as a whole (the code differs), but the loop's progress is still wanted: a step counter, a running
loss, a best-so-far value, a history. Those are the names the loops running at the restore point
assign or change in place (``history.append``, ``metrics["loss"] +=``), and the globals a function of
the script assigns through ``global`` (``step += 1`` in a ``train_step``) or changes in place. Names
set only before the loop (``max_steps``, a learning rate) are configuration: an edit of them is kept.
Nothing here imports or runs the script; its source is only parsed.
"""
from __future__ import annotations

import ast
import functools
import linecache
import types

# Nodes with their own scope: names they bind are not the loop's.
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda,
           ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
_LOOPS = (ast.For, ast.AsyncFor, ast.While)


def _module_ast(filename: str) -> ast.Module | None:
    """The source of ``filename`` as the relaunch runs it, parsed; None where it cannot be read."""
    lines = linecache.getlines(filename)
    return _parse("".join(lines), filename) if lines else None


@functools.lru_cache(maxsize=8)
def _parse(source: str, filename: str) -> ast.Module | None:
    # (keyed by the text: each frame of a file asks once more at a resume; an edited file is parsed anew)
    try:
        return ast.parse(source, filename)
    except (SyntaxError, ValueError):
        return None


def _children(node: ast.AST):
    """Child nodes in ``node``'s own scope."""
    return (c for c in ast.iter_child_nodes(node) if not isinstance(c, _SCOPES))


def _stores(node: ast.AST) -> set[str]:
    """Names ``node`` binds by assignment in its own scope (nested functions, classes, lambdas and
    comprehensions bind their own)."""
    out, todo = set(), [node]
    while todo:
        n = todo.pop()
        for c in _children(n):
            if isinstance(c, ast.Name) and isinstance(c.ctx, ast.Store):
                out.add(c.id)
            todo.append(c)
    return out


# Methods that change their receiver in place: ``history.append(x)``, ``meter.update(...)``, a tensor's
# ``acc.add_(x)``. (A call such as ``x.sum()`` reads only: the name is not the loop's to carry.)
_MUTATORS = frozenset({"append", "extend", "insert", "pop", "popleft", "appendleft", "extendleft", "remove",
                       "clear", "update", "add", "discard", "setdefault", "popitem", "sort", "reverse", "rotate"})


def _root(node: ast.AST) -> str | None:
    """The variable at the bottom of ``a.b[c].d``."""
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _mutated(node: ast.AST) -> set[str]:
    """Names whose values ``node`` changes in place in its own scope: item and attribute assignments
    (``metrics["loss"] += l``, ``state.best = b``) and mutating method calls (``history.append(l)``,
    ``acc.add_(x)``)."""
    out, todo = set(), [node]
    while todo:
        n = todo.pop()
        for c in _children(n):
            name = None
            if isinstance(c, (ast.Attribute, ast.Subscript)) and isinstance(c.ctx, (ast.Store, ast.Del)):
                name = _root(c.value)
            elif isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute):
                meth = c.func.attr
                if meth in _MUTATORS or (meth.endswith("_") and not meth.startswith("_")):
                    name = _root(c.func.value)
            if name is not None:
                out.add(name)
            todo.append(c)
    return out


def _target_names(loop: ast.AST) -> set[str]:
    """The names a ``for`` loop's header binds (a while loop binds none)."""
    if not isinstance(loop, (ast.For, ast.AsyncFor)):
        return set()
    return {n.id for n in ast.walk(loop.target) if isinstance(n, ast.Name)}


def _scope_of(module: ast.Module, code: types.CodeType) -> ast.AST | None:
    """The function (or the module) whose code ``code`` is."""
    if code.co_name == "<module>":
        return module
    for n in ast.walk(module):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == code.co_name:
            first = min([n.lineno] + [d.lineno for d in n.decorator_list])
            if code.co_firstlineno in (first, n.lineno):
                return n
    return None


def _loops_at(scope: ast.AST, line: int) -> list[ast.AST]:
    """The loops of ``scope`` (its own scope) whose lines hold ``line``, outermost first."""
    out, node = [], scope
    while node is not None:
        if isinstance(node, _LOOPS):
            out.append(node)
        node = next((c for c in _children(node) if isinstance(c, (ast.stmt, ast.excepthandler))
                     and c.lineno <= line <= (c.end_lineno or c.lineno)), None)
    return out


def loop_names(frame: types.FrameType) -> set[str]:
    """The names the loops running at ``frame``'s current line assign or change in place in their
    bodies, less the names the headers of those loops bind (the loop position is the relaunch's own). Empty where the source
    cannot be read or no loop runs there."""
    module = _module_ast(frame.f_code.co_filename)
    scope = _scope_of(module, frame.f_code) if module is not None else None
    if scope is None or frame.f_lineno is None:
        return set()
    loops = _loops_at(scope, frame.f_lineno)
    names: set[str] = set()
    for loop in loops:
        names |= _stores(loop) | _mutated(loop)
    for loop in loops:
        names -= _target_names(loop)
    return names


def global_names(filename: str) -> set[str]:
    """The globals that some function of ``filename`` declares ``global`` and assigns (a counter kept by a
    ``train_step`` the loop calls), or changes in place without binding them (``losses.append(l)``)."""
    module = _module_ast(filename)
    out: set[str] = set()
    for n in ast.walk(module) if module is not None else ():
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            declared: set[str] = set()
            todo = [n]
            while todo:
                x = todo.pop()
                for c in _children(x):
                    if isinstance(c, ast.Global):
                        declared.update(c.names)
                    todo.append(c)
            stores = _stores(n)
            params = {a.arg for a in ast.walk(n.args) if isinstance(a, ast.arg)}
            out |= (declared & stores) | (_mutated(n) - (stores - declared) - params)
    return out
