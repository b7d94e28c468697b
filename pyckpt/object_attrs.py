"""The modules' and optimizers' state outside ``state_dict()``, captured with the loop state (``loopstate``).

``state_dict()`` holds parameters and persistent buffers. A training script also changes, inside its
loop, state that it does not hold, and the relaunch's fast-forward skips the step that changed it:

* ``train()``/``eval()`` flags: BatchNorm frozen at step N (``m.eval()`` on its layers), dropout
  turned off after a warm-up, an evaluation every N steps that never calls ``model.train()`` again;
* attributes the code of the script's own module classes assigns or reads: a counter
  ``self.num_updates += 1`` in ``forward`` driving an annealed temperature, a rotary table cached as
  ``self.cos_cached`` with its ``self.seq_len_cached``, and the buffers registered with
  ``persistent=False`` that go with them;
* the hyper-parameters torch's own layers keep as public attributes (``Dropout.p``, ``BatchNorm``'s
  ``momentum``), set by a schedule at some step;
* attributes of an optimizer of the script's own class: a Lookahead's step counter and slow weights,
  a preconditioner's update count (``state_dict()`` holds ``state`` and ``param_groups`` only).

A resume restored the parameters and buffers but left all of these as the relaunch made them: a
silent wrong resume. Per tracked root module (``discovery``'s roots, in their order) the capture is
``{"train": the root's flag, "flip": [names of submodules whose flag differs], "attrs": {submodule
name: {"type": class qualname, "attrs": {name: encoded}, "buffers": {name: encoded}}}}``, values in the
loop state's encoding (tensors in its table). A submodule of a library class (Hugging Face, timm,
DDP's wrapper, FSDP2's classes) keeps its flag only: its private attributes are that library's
machinery (DDP's bucket state, a cache that pairs with state not saved). Restored at the restore
point with the rest of the loop state, after the modules' ``state_dict()``; a submodule of another
class there refuses the resume before anything is written, one the relaunch lacks is said in a line.
Optimizers (the tracked ones, in their order): ``{"type": class qualname, "attrs": {...}}`` for one of a
script class, None for the others.
"""
from __future__ import annotations

import dis
import functools
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import PyckptError

_PLAIN = frozenset((type(None), bool, int, float, str))
# What every nn.Module has in its __dict__ (its tensors' and submodules' dicts, hooks, flags): torch's,
# restored elsewhere or not state at all.
_BASE = frozenset(vars(nn.Module())) | {"training"}


@functools.lru_cache(maxsize=1024)
def _kind(t: type, script_class: Callable[[type], bool]) -> str:
    """"script" (the script's own class: the attributes its code assigns or reads, ``_own_names``),
    "torch" (``torch.nn.modules``: its public plain hyper-parameters) or "library" (the flag only)."""
    if script_class(t):
        return "script"
    return "torch" if (t.__module__ or "").startswith("torch.nn.modules.") else "library"


_ATTR_OPS = frozenset(("STORE_ATTR", "LOAD_ATTR", "DELETE_ATTR"))


@functools.lru_cache(maxsize=1024)
def _own_names(t: type, script_class: Callable[[type], bool]) -> frozenset[str]:
    """The names the code of ``t``'s script classes (itself and its script bases) assigns or reads as
    attributes (``self.calls = ...``; ``self.temperature`` that the training loop sets) or names as
    strings (``register_buffer("table", ...)``, ``getattr(self, "tau", 1.0)``). Only those of an object
    are its state: a script subclass of a library class (of ``DistributedDataParallel``, of a Hugging
    Face model) inherits that library's machinery, whose flags must match state no checkpoint holds
    (DDP's ``_lazy_init_ran``, its bucket state)."""
    names: set[str] = set()
    todo = []
    for c in t.__mro__:
        if c is object or not script_class(c):
            continue
        for v in vars(c).values():
            if isinstance(v, (staticmethod, classmethod)):
                v = v.__func__
            fns = [v.fget, v.fset, v.fdel] if isinstance(v, property) else [v]
            todo += [f.__code__ for f in fns if isinstance(getattr(f, "__code__", None), types.CodeType)]
    while todo:
        code = todo.pop()
        for c in code.co_consts:
            if isinstance(c, types.CodeType):
                todo.append(c)  # a nested function, a comprehension
            elif isinstance(c, str) and c.isidentifier():
                names.add(c)
        names.update(i.argval for i in dis.get_instructions(code) if i.opname in _ATTR_OPS)
    return frozenset(names)


def _optimizer_base(name: str) -> bool:
    """torch's own attributes of an optimizer (its state, groups, defaults, hook dicts, warning flags) and
    the ``step`` an LR scheduler wraps on the instance: saved by ``state_dict()``, or no state."""
    return name in ("defaults", "param_groups", "state", "step") or name.startswith(
        ("_optimizer_", "_warned_", "_zero_grad", "_opt_called", "_pyckpt", "__"))


def capture_optimizers(optimizers: list, keep: Callable[..., Any], script_class: Callable[[type], bool],
                       attrs_of: Callable[[Any], dict]) -> list[dict | None]:
    """The attributes of the optimizers of script classes (``capture``'s ``keep`` and ``attrs_of``)."""
    out: list[dict | None] = []
    for i, o in enumerate(optimizers):
        got = {}
        if script_class(type(o)):
            own = _own_names(type(o), script_class)
            for k, v in attrs_of(o).items():
                if k in own and not _optimizer_base(k):
                    e = keep(f"optimizer[{i}].{k}", v, ["o", i, k])
                    if e is not None:
                        got[k] = e
        out.append({"type": type(o).__qualname__, "attrs": got} if got else None)
    return out


def prepare_optimizers(saved: Any, optimizers: list, decode: Callable[[Any], Any],
                       check: Callable[[dict, dict, Callable[[str], str]], None], attrs_of: Callable[[Any], dict],
                       assign: Callable[[Any, Any], Any]) -> list[Callable[[], None]]:
    """``capture_optimizers``' values checked against ``optimizers`` (another class there, or another
    number of optimizers: PyckptError, nothing written); returns the writes."""
    if not (isinstance(saved, list) and all(e is None or isinstance(e, dict) for e in saved)):
        raise PyckptError("the checkpoint's loop state is malformed (optimizers)")
    if len(saved) != len(optimizers):
        raise PyckptError(f"the checkpoint holds the state of {len(saved)} optimizer(s), this run has "
                          f"{len(optimizers)}")
    writes: list[Callable[[], None]] = []
    for i, (e, o) in enumerate(zip(saved, optimizers)):
        if e is None:
            continue
        if not isinstance(e.get("attrs"), dict):
            raise PyckptError("the checkpoint's loop state is malformed (optimizer attributes)")
        if type(o).__qualname__ != e.get("type"):
            raise PyckptError(f"optimizer[{i}] is a {type(o).__qualname__} now, the checkpoint holds a {e.get('type')}")
        decoded = {k: decode(v) for k, v in e["attrs"].items() if isinstance(k, str) and not _optimizer_base(k)}
        check(decoded, attrs_of(o), lambda k, i=i: f"optimizer[{i}].{k}")

        def write(o: Any = o, decoded: dict = decoded) -> None:
            now = attrs_of(o)
            for k, v in decoded.items():
                setattr(o, k, assign(now.get(k), v))
        writes.append(write)
    return writes


def capture(roots: list[nn.Module], keep: Callable[..., Any], keep_tensor: Callable[..., Any],
            script_class: Callable[[type], bool], attrs_of: Callable[[Any], dict]) -> list[dict]:
    """The flags and attributes of every submodule of ``roots``. ``keep(label, value, path)``: the loop
    state's encoding of a value, or None (left out: said or listed there); ``keep_tensor(label, t)``
    the same for a buffer (which ``keep`` leaves to the module's state_dict); ``attrs_of``: an
    object's own attributes."""
    out = []
    for i, root in enumerate(roots):
        flag = root.training
        flip, attrs = [], {}
        for name, m in root.named_modules():
            if m.training is not flag:
                flip.append(name)
            t = type(m)
            if _kind(t, script_class) == "torch":  # most submodules (thousands): _module_entry's result inline
                d = m.__dict__
                got = {k: ["v", d[k]] for k in sorted(d.keys() - _BASE) if k[0] != "_" and type(d[k]) in _PLAIN}
                entry = {"type": t.__qualname__, "attrs": got} if got else None
            else:
                entry = _module_entry(i, name, m, keep, keep_tensor, script_class, attrs_of)
            if entry is not None:
                attrs[name] = entry
        out.append({"train": flag, "flip": flip, "attrs": attrs})
    return out


def _settings(m: nn.Module, script_class: Callable[[type], bool],
              attrs_of: Callable[[Any], dict]) -> tuple[dict, dict, frozenset[str]]:
    """The attributes kept of module ``m``: (those the code of its script classes uses, the public plain
    hyper-parameters of the torch layer it is or extends, ``_own_names`` of its class). The rest (a
    library base class's machinery, torch's own entries) is not the script's state."""
    t = type(m)
    kind = _kind(t, script_class)
    if kind == "library":
        return {}, {}, frozenset()
    # (torch's layers have no __slots__: their __dict__ as it is, no copy per layer per snapshot)
    d = attrs_of(m) if kind == "script" else m.__dict__
    names = _own_names(t, script_class) if kind == "script" else frozenset()
    layer = kind == "torch" or _torch_layer_base(t)
    own, plain = {}, {}
    for k in sorted(d.keys() - _BASE):  # (the set difference first: mostly torch's own entries)
        v = d[k]
        if k in names and not k.startswith("__"):
            own[k] = v
        elif layer and k[0] != "_" and type(v) in _PLAIN:
            plain[k] = v
    return own, plain, names


def _module_entry(i: int, name: str, m: nn.Module, keep: Callable[..., Any], keep_tensor: Callable[..., Any],
                  script_class: Callable[[type], bool], attrs_of: Callable[[Any], dict]) -> dict | None:
    own, plain, names = _settings(m, script_class, attrs_of)
    got: dict[str, Any] = {k: ["v", v] for k, v in plain.items()}  # no call per hyper-parameter
    for k, v in own.items():
        e = keep(label(i, name, k), v, ["m", i, name, k])
        if e is not None:
            got[k] = e
    buffers: dict[str, Any] = {}
    for k in sorted(m._non_persistent_buffers_set & names):  # not in state_dict(), so nowhere else
        if k not in m._buffers:
            continue
        b = m._buffers[k]
        e = ["v", None] if b is None else keep_tensor(label(i, name, k), b)
        if e is not None:
            buffers[k] = e
    if not got and not buffers:
        return None
    entry = {"type": type(m).__qualname__, "attrs": got}
    if buffers:
        entry["buffers"] = buffers
    return entry


def stateless_members(m: nn.Module, script_class: Callable[[type], bool], attrs_of: Callable[[Any], dict]) -> dict:
    """What to keep of a module the script holds that has no ``state_dict()`` entries of its own and is
    no part of the model (a loss function: ``label_smoothing`` or a focal loss's ``gamma`` set at some
    step): its flag and the attributes ``_settings`` picks, put back in place."""
    own, plain, _ = _settings(m, script_class, attrs_of)
    return {"training": m.training, **plain, **own}


@functools.lru_cache(maxsize=1024)
def _torch_layer_base(t: type) -> bool:
    return any((c.__module__ or "").startswith("torch.nn.modules.") and c is not nn.Module for c in t.__mro__)


def label(i: int, name: str, attr: str | None = None) -> str:
    """How a line names a submodule (or its attribute): ``model[0].encoder.3.num_updates``."""
    return ".".join(x for x in (f"model[{i}]", name, attr) if x)


def submodule(roots: list[nn.Module], i: Any, name: Any) -> nn.Module | None:
    """The live submodule ``name`` of root ``i`` (None: this run has none there)."""
    if not (type(i) is int and 0 <= i < len(roots) and isinstance(name, str)):
        return None
    try:
        return roots[i].get_submodule(name) if name else roots[i]
    except AttributeError:
        return None


def prepare(saved: Any, roots: list[nn.Module], decode: Callable[[Any], Any],
            check: Callable[[dict, dict, Callable[[str], str]], None], attrs_of: Callable[[Any], dict],
            assign: Callable[[Any, Any], Any], warnings: list[str]) -> list[Callable[[], None]]:
    """Decode and check the saved flags and attributes against ``roots``; returns the writes (nothing
    written yet). ``decode``/``check``/``assign``: the loop state's, for one value, a dict of values
    against the live ones (raises PyckptError on another class there), and the value to bind.
    Raises PyckptError for a malformed tree or a submodule of another class."""
    if not (isinstance(saved, list) and all(isinstance(r, dict) for r in saved)):
        raise PyckptError("the checkpoint's loop state is malformed (modules)")
    if len(saved) != len(roots):
        raise PyckptError(f"the checkpoint holds the state of {len(saved)} model(s), this run has {len(roots)}")
    writes: list[Callable[[], None]] = []
    for i, (r, root) in enumerate(zip(saved, roots)):
        flag, flip, attrs = r.get("train"), r.get("flip"), r.get("attrs")
        if not (type(flag) is bool and isinstance(flip, list) and all(isinstance(n, str) for n in flip)
                and isinstance(attrs, dict)):
            raise PyckptError("the checkpoint's loop state is malformed (module flags)")
        live = dict(root.named_modules())
        missing = sorted({n for n in [*flip, *attrs] if n not in live}, key=lambda n: (n.count("."), n))
        if missing:  # one line: the layers under a missing one are missing too
            more = f" (and {len(missing) - 1} submodule(s) more)" if len(missing) > 1 else ""
            warnings.append(f"{label(i, missing[0])}{more} is not in this run's model: its train()/eval() flag "
                            "and attributes are not restored")
        flipped = set(flip)
        flags = [(m, (n in flipped) is not flag) for n, m in live.items()]
        writes.append(lambda flags=flags: _set_flags(flags))
        for name, e in attrs.items():
            if name in live:
                writes += _prepare_module(i, name, e, live[name], decode, check, attrs_of, assign)
    return writes


def _set_flags(flags: list[tuple[nn.Module, bool]]) -> None:
    for m, f in flags:
        if m.training is not f:
            try:
                object.__setattr__(m, "training", f)  # not train(), which a class may override
            except AttributeError:  # a read-only training property: nothing to restore there
                pass


def _prepare_module(i: int, name: str, e: Any, m: nn.Module, decode: Callable[[Any], Any],
                    check: Callable[..., None], attrs_of: Callable[[Any], dict],
                    assign: Callable[[Any, Any], Any]) -> list[Callable[[], None]]:
    if not (isinstance(e, dict) and isinstance(e.get("attrs"), dict) and isinstance(e.get("buffers", {}), dict)):
        raise PyckptError("the checkpoint's loop state is malformed (module attributes)")
    if type(m).__qualname__ != e.get("type"):
        raise PyckptError(f"{label(i, name)} is a {type(m).__qualname__} now, the checkpoint holds a {e.get('type')}")
    decoded = {k: decode(v) for k, v in e["attrs"].items() if isinstance(k, str)}
    check(decoded, attrs_of(m), lambda k: label(i, name, k))
    clash = sorted(k for k in decoded if k in m._parameters or k in m._buffers or k in m._modules)
    if clash:  # a plain attribute then, a parameter, buffer or submodule now: the model is not the same
        raise PyckptError(f"{label(i, name, clash[0])} is a parameter, buffer or submodule now, the checkpoint "
                          "holds a plain attribute there")
    buffers = {k: decode(v) for k, v in e.get("buffers", {}).items() if isinstance(k, str)}
    for k, b in buffers.items():
        if not (b is None or isinstance(b, torch.Tensor)) or k in m._parameters or k in m._modules:
            raise PyckptError(f"{label(i, name, k)}: the checkpoint's loop state is malformed (a buffer)")

    def write() -> None:
        # object.__setattr__ would shadow a buffer of the same name; setattr puts a value where the
        # module keeps it (a plain attribute here, checked above)
        now = attrs_of(m)
        for k, v in decoded.items():
            setattr(m, k, assign(now.get(k), v))
        for k, b in buffers.items():
            cur = m._buffers.get(k)
            if (isinstance(cur, torch.Tensor) and isinstance(b, torch.Tensor) and cur.shape == b.shape
                    and cur.dtype == b.dtype):
                with torch.no_grad():
                    cur.copy_(b)  # in place: other holders of the buffer see it
            elif k in m._buffers:
                m._buffers[k] = b if b is None or cur is None else b.to(cur.device)
            else:  # registered later in the run (a cache made at the first forward)
                m.register_buffer(k, b, persistent=False)
    return [write]
