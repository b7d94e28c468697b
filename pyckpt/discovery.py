"""Find the training state a script never names: optimizers, the modules that own
their parameters, their LR schedulers and GradScalers; turn it into a
checkpoint state and load it back.

Keys are creation-order indices (optimizer ``"0"``, its schedulers
``"0.0"``, ``"0.1"``, ...), so a relaunched script that builds the same
objects in the same order maps every saved entry onto its counterpart.
"""
from __future__ import annotations

import gc
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import sharded
from .errors import PyckptError
from .hooks import HookSet, Registry, WeakIdSet


@dataclass
class Tracked:
    """The objects one snapshot covers."""

    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)
    modules: list[nn.Module] = field(default_factory=list)
    schedulers: dict[str, Any] = field(default_factory=dict)
    scalers: dict[str, Any] = field(default_factory=dict)
    # Optimizer parameters no tracked module owns (a learned temperature made as a bare Parameter or leaf
    # tensor), by "optimizer.group.index": saved per rank and copied back in place (``load_loose``).
    loose: dict[str, torch.Tensor] = field(default_factory=dict)

    def replicated(self, world_size: int) -> bool:
        """Whether this state is identical on every rank (written once) or per rank."""
        # FSDP2 (DTensor parameters) counts as replicated: Checkpointer.save writes each rank's shards.
        return world_size == 1 or (bool(self.modules) and all(is_ddp(m) or sharded.is_fsdp(m) for m in self.modules))


def is_ddp(m: nn.Module) -> bool:
    """Whether ``m`` is a DistributedDataParallel wrapper (also under torch.compile)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return isinstance(m, DDP) or isinstance(getattr(m, "_orig_mod", None), DDP)


class Discovery:
    """Finds the tracked objects of every snapshot without scanning the heap each time.

    Optimizers, LR schedulers and GradScalers are registered by their patched
    constructors; modules by torch's global module/parameter registration hooks
    (every module that owns a parameter or a submodule registers one) and a
    patched ``nn.Module.__setstate__`` (``copy.deepcopy``, unpickling). One ``gc``
    scan (``scan_once``, at the first DataLoader ``iter()``) adds what was made
    before the hooks were installed. The root modules are cached and recomputed
    only when the optimizers, their parameters or the module structure changed;
    a parameter no known module owns costs one more scan per such change."""

    def __init__(self, optimizers: Registry, schedulers: Registry, scalers: Registry) -> None:
        self.optimizers, self.schedulers, self.scalers = optimizers, schedulers, scalers
        self.modules = WeakIdSet()
        self.generation = 0  # bumped whenever a module gains a parameter or a submodule, or is created by copy
        self.scans = 0  # full gc scans so far (for the tests and the benchmark)
        self._scanned = False
        self._key: tuple | None = None
        self._covered = True  # whether the roots own every optimizer parameter (else Tracked.loose)
        self._roots: list[weakref.ref] = []
        self._rescanned_key: tuple | None = None

    def install(self, hooks: HookSet) -> None:
        """Keep ``modules`` current (reversibly, through ``hooks``)."""
        from torch.nn.modules import module as module_mod

        def on_submodule(parent: nn.Module, name: str, sub: Any) -> None:
            self.generation += 1
            self.modules.add(parent)
            if isinstance(sub, nn.Module):
                self.modules.add(sub)

        def on_parameter(owner: nn.Module, name: str, param: Any) -> None:
            self.generation += 1
            self.modules.add(owner)

        hooks.add_handle(module_mod.register_module_module_registration_hook(on_submodule))
        hooks.add_handle(module_mod.register_module_parameter_registration_hook(on_parameter))
        original = nn.Module.__setstate__

        def __setstate__(module: nn.Module, state: Any) -> None:  # noqa: N807
            original(module, state)
            self.generation += 1
            self.modules.add(module)

        hooks.patch(nn.Module, "__setstate__", __setstate__)

    def scan_once(self) -> None:
        """Register the objects made before the hooks existed (one pass over the heap, once)."""
        if not self._scanned:
            self._scanned = True
            self._scan()

    def _scan(self) -> None:
        from torch.optim.lr_scheduler import LRScheduler

        self.scans += 1
        kinds = ((nn.Module, self.modules.add), (torch.optim.Optimizer, self.optimizers.add),
                 (LRScheduler, self.schedulers.add), (torch.amp.GradScaler, self.scalers.add))
        found: list[list[Any]] = [[] for _ in kinds]
        any_kind = tuple(cls for cls, _ in kinds)
        for obj in gc.get_objects():
            # type(), not isinstance(): that reads obj.__class__, which some proxies answer with a
            # warning. One C-level check with the tuple for the millions of other objects.
            t = type(obj)
            if issubclass(t, any_kind):
                for i, (cls, _) in enumerate(kinds):
                    if issubclass(t, cls):
                        found[i].append(obj)
        for obj in found[0]:
            self.modules.add(obj)
        # A registry the constructor hooks filled is complete and in creation order; an empty one
        # takes what the heap holds, in the heap's order (the same for the same script).
        for (_, add), objs, reg in zip(kinds[1:], found[1:], (self.optimizers, self.schedulers, self.scalers)):
            if len(reg) == 0:
                for obj in objs:
                    add(obj)
        self.generation += 1

    def discover(self) -> Tracked:
        """Everything to save, in a deterministic order."""
        self.scan_once()
        opts = sharded.drop_inner(list(self.optimizers))  # a ZeRO optimizer's local one is saved through it
        # No optimizer (weights updated by hand after backward()): the modules with trainable parameters.
        t = Tracked(optimizers=opts, modules=self._root_modules(opts) if opts else self.trainable_roots())
        if opts and not self._covered:
            t.loose = _loose(opts, t.modules)
        per_opt: dict[int, int] = {}
        for s in self.schedulers:
            idx = next((i for i, o in enumerate(opts) if o is getattr(s, "optimizer", None)), None)
            if idx is not None:
                j = per_opt.get(idx, 0)
                per_opt[idx] = j + 1
                t.schedulers[f"{idx}.{j}"] = s
        for i, sc in enumerate(self.scalers):
            if sc.is_enabled():
                t.scalers[str(i)] = sc
        return t

    def _root_modules(self, opts: list[torch.optim.Optimizer]) -> list[nn.Module]:
        params = [p for o in opts for p in _params(o)]
        key = (self.generation, tuple(id(o) for o in opts), tuple(id(p) for p in params))
        cached = [r() for r in self._roots]
        if key == self._key and all(m is not None for m in cached):
            return cached  # type: ignore[return-value]
        roots, covered = root_modules(opts, self.modules)
        if not covered and key[1:] != self._rescanned_key:
            # A parameter no known module owns: a module made another way (or a bare parameter).
            # Look once per set of optimizers and parameters (modules made later are hooked).
            self._scan()
            self._rescanned_key = key[1:]
            key = (self.generation, *key[1:])
            roots, covered = root_modules(opts, self.modules)
        if _share_parameters(roots):
            # Two outermost modules owning the same parameters: usually a dead wrapper still in a
            # reference cycle. Drop such garbage (only now, when the structure changed).
            gc.collect()
            roots, covered = root_modules(opts, self.modules)
        self._key, self._roots, self._covered = key, [weakref.ref(m) for m in roots], covered
        return roots

    def trainable_roots(self) -> list[nn.Module]:
        """The outermost live modules owning a parameter that requires grad, in registration order
        (for loops that update weights by hand: there is no optimizer to find them through)."""
        owners = [m for m in self.modules if any(p.requires_grad for p in m.parameters())]
        inner = {id(sub) for m in owners for sub in m.modules() if sub is not m}
        return _without_traced_copies([m for m in owners if id(m) not in inner])

    def grads_without_optimizer(self) -> bool:
        """True when some live module has gradients although no optimizer ever stepped."""
        self.scan_once()
        return any(p.grad is not None for m in self.modules for p in m.parameters(recurse=False))


def _loose(opts: list[torch.optim.Optimizer], modules: list[nn.Module]) -> dict[str, torch.Tensor]:
    owned = {id(p) for m in modules for p in m.parameters()}
    out: dict[str, torch.Tensor] = {}
    for i, o in enumerate(opts):
        for g, group in enumerate(o.param_groups):
            for j, p in enumerate(group["params"]):
                if id(p) not in owned:
                    owned.add(id(p))  # one optimizer's entry when two share it
                    out[f"{i}.{g}.{j}"] = p
    return out


def check_loose(t: Tracked, saved: Any) -> None:
    """Refuse, before anything is read, a checkpoint whose optimizer parameters outside every module
    (``Tracked.loose``) are not this run's: other keys, shapes or dtypes. A checkpoint written before
    they were saved has none: resuming it would leave them at their initial values."""
    saved = {} if saved is None else saved
    if not isinstance(saved, dict):
        raise PyckptError("the checkpoint's optimizer parameters outside modules are malformed")
    if set(saved) != set(t.loose):
        # Keys the checkpoint has and this run lacks: parameters given to an optimizer while training.
        why = ("; groups or parameters added while training (optimizer.add_param_group) are not re-created by "
               f"the fast-forward; {_WAY_OUT}" if set(saved) - set(t.loose) else
               "; set PYCKPT_RESUME=never (or use a new PYCKPT_DIR) to start over")
        raise PyckptError(
            f"this run's optimizers hold {len(t.loose)} parameter(s) no module owns ({', '.join(sorted(t.loose)) or 'none'}; "
            f"optimizer.group.index) and the checkpoint holds {len(saved)} ({', '.join(sorted(saved)) or 'none'}): "
            f"they would not be restored{why}")
    for k, p in t.loose.items():
        v = saved[k]
        if not isinstance(v, torch.Tensor) or v.shape != p.shape or v.dtype != p.dtype:
            raise PyckptError(f"the checkpoint's optimizer parameter {k} (outside modules) is "
                              f"{_describe(v)}, this run's is {_describe(p)}; set PYCKPT_RESUME=never (or use a new "
                              "PYCKPT_DIR) to start over")


def load_loose(t: Tracked, saved: Any) -> None:
    """Copy the saved optimizer parameters outside modules into the live ones, in place (the optimizer
    and the script hold these very tensors). Checked by ``check_loose`` first."""
    with torch.no_grad():
        for k, p in t.loose.items():
            p.copy_(saved[k])


def requires_grad_of(t: Tracked) -> dict[str, str]:
    """Each optimizer's parameters' ``requires_grad`` flags in ``param_groups`` order, as "1"/"0": a script
    that unfreezes (or freezes) optimizer parameters inside its loop changes them, state_dict() holds none,
    and the relaunch's fast-forward skips the step that flipped them."""
    return {str(i): "".join(["1" if p.requires_grad else "0" for p in _params(o)]) for i, o in enumerate(t.optimizers)}


def load_requires_grad(t: Tracked, saved: Any) -> str | None:
    """Inverse of ``requires_grad_of`` (nothing saved: a checkpoint written before, nothing done). Returns
    why the flags were not put back (malformed, or another number of parameters), else None."""
    if saved is None:
        return None
    live = [_params(o) for o in t.optimizers]
    if not (isinstance(saved, dict) and len(saved) == len(live) and all(
            isinstance(f := saved.get(str(i)), str) and len(f) == len(ps) and set(f) <= {"0", "1"}
            for i, ps in enumerate(live))):
        return "the checkpoint's requires_grad flags do not match this run's optimizer parameters"
    for i, ps in enumerate(live):
        for p, f in zip(ps, saved[str(i)]):
            if p.requires_grad != (f == "1") and p.is_leaf:
                p.requires_grad_(f == "1")
    return None


def _describe(v: Any) -> str:
    return f"{v.dtype} {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__


def _params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def root_modules(opts: list[torch.optim.Optimizer], modules: Iterable[nn.Module]) -> tuple[list[nn.Module], bool]:
    """The outermost of ``modules`` owning optimizer parameters (a DDP wrapper, a compiled module),
    ordered by their first parameter's position in the optimizers; and whether they own every
    optimizer parameter."""
    order: dict[int, int] = {}
    for p in (p for o in opts for p in _params(o)):
        order.setdefault(id(p), len(order))
    if not order:
        return [], True
    owners = [m for m in modules if any(id(p) in order for p in m.parameters())]
    inner = {id(sub) for m in owners for sub in m.modules() if sub is not m}
    roots = _without_traced_copies([m for m in owners if id(m) not in inner])
    owned = {id(p) for m in roots for p in m.parameters()}
    roots.sort(key=lambda m: min(order[id(p)] for p in m.parameters() if id(p) in order))
    return roots, all(k in owned for k in order)


def _without_traced_copies(roots: list[nn.Module]) -> list[nn.Module]:
    """``roots`` less the torch.fx graph modules whose parameters other roots own: Dynamo's graph of a
    compiled function (a compiled ``opt.step()`` holds the optimizer's parameters as its own) exists
    only once that function has run, so a relaunch restoring before it runs would lack it. A graph
    module that is the model itself (``model = symbolic_trace(model)``) owns its parameters alone."""
    graphs = {id(m) for m in roots if isinstance(m, torch.fx.GraphModule)}
    if not graphs:
        return roots
    others = {id(p) for m in roots if id(m) not in graphs for p in m.parameters()}
    return [m for m in roots if id(m) not in graphs or not all(id(p) in others for p in m.parameters())]


def _share_parameters(roots: list[nn.Module]) -> bool:
    seen: set[int] = set()
    for m in roots:
        mine = {id(p) for p in m.parameters()}
        if mine & seen:
            return True
        seen |= mine
    return False


def class_names(opts: list[torch.optim.Optimizer]) -> list[str]:
    """The optimizers' class names, saved with every snapshot to detect a changed script."""
    return [type(o).__qualname__ for o in opts]


def check_classes(saved: Any, opts: list[torch.optim.Optimizer]) -> None:
    """Refuse to load optimizer state written by other optimizer classes (the state would load into
    them without complaint). ``saved`` comes from the checkpoint: checked before use; None (a
    checkpoint written before classes were saved) skips the check."""
    if saved is None:
        return
    if not isinstance(saved, list) or not all(isinstance(n, str) for n in saved):
        raise PyckptError("the checkpoint's optimizer class list is malformed")
    live = class_names(opts)
    if saved != live:
        raise PyckptError(f"the checkpoint holds the state of optimizer(s) {', '.join(saved) or 'none'} but "
                          f"this run uses {', '.join(live) or 'none'}: the script changed since it was written; "
                          "set PYCKPT_RESUME=never (or use a new PYCKPT_DIR) to start over")


def state_of(t: Tracked, parameters_as_is: bool = False) -> dict[str, Any]:
    """The checkpoint state of the tracked objects (live tensors: capture before mutating).
    ``parameters_as_is``: see ``module_state``."""
    return {
        "modules": {str(i): module_state(m, parameters_as_is) for i, m in enumerate(t.modules)},
        "optimizers": {str(i): sharded.optimizer_state_dict(o) for i, o in enumerate(t.optimizers)},  # ZeRO: no gather
        "schedulers": {k: s.state_dict() for k, s in t.schedulers.items()},
        "scalers": {k: s.state_dict() for k, s in t.scalers.items()},
    }


def module_state(m: nn.Module, parameters_as_is: bool = False) -> dict[str, Any]:
    """``m.state_dict()``, built here for the modules of its tree that leave state_dict as torch's.

    torch's recursive state_dict costs milliseconds for a model of hundreds of modules, at every
    snapshot. A module whose class keeps torch's ``state_dict`` and ``_save_to_state_dict``, with no
    state-dict hooks and no extra state, contributes exactly what torch's would: its parameters and
    persistent buffers, detached, then its children in order, with the same ``_metadata``. Any other
    module gets its own ``state_dict(destination=..., prefix=...)`` call, as its parent's would make.

    ``parameters_as_is``: such a module's plain ``nn.Parameter`` objects are given themselves, not
    detached (``keep_vars=True`` for them): a detach makes a new tensor per parameter at every
    snapshot, and the snapshot's later passes know the optimizer's own parameter objects by identity.
    The caller then records them as torch's state_dict would (``requires_grad`` false:
    ``Checkpointer.save(_as_state_dict=True)``)."""
    if not _plain_state(m):
        return m.state_dict()
    out: Any = OrderedDict()
    out._metadata = OrderedDict()
    _put_state(m, "", out, parameters_as_is)
    return out


def _plain_state(m: nn.Module) -> bool:
    cls = type(m)
    return (cls.state_dict is _MODULE_STATE_DICT and cls._save_to_state_dict is _MODULE_SAVE
            and getattr(cls, "get_extra_state", _MODULE_EXTRA) is _MODULE_EXTRA
            and not m._state_dict_pre_hooks and not m._state_dict_hooks
            and "state_dict" not in m.__dict__ and "_save_to_state_dict" not in m.__dict__)


def _put_state(m: nn.Module, prefix: str, out: Any, as_is: bool) -> None:
    out._metadata[prefix[:-1]] = {"version": m._version}
    for name, p in m._parameters.items():
        if p is not None:
            # (A subclass, a DTensor parameter of FSDP2 included, is detached as torch's would.)
            out[prefix + name] = p if as_is and type(p) is _PARAMETER else p.detach()
    if m._buffers:
        skip = m._non_persistent_buffers_set
        for name, b in m._buffers.items():
            if b is not None and name not in skip:
                out[prefix + name] = b.detach()
    for name, child in m._modules.items():
        if child is None:
            continue
        if _plain_state(child):
            _put_state(child, f"{prefix}{name}.", out, as_is)
        else:
            child.state_dict(destination=out, prefix=f"{prefix}{name}.", keep_vars=False)


_MODULE_STATE_DICT = nn.Module.state_dict
_MODULE_SAVE = nn.Module._save_to_state_dict
_MODULE_EXTRA = nn.Module.get_extra_state
_PARAMETER = nn.Parameter


def grads_of(t: Tracked) -> dict[str, dict[str, Any]]:
    """The modules' parameter gradients (a snapshot taken right after backward() needs them)."""
    return {str(i): {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
            for i, m in enumerate(t.modules)}


def load_grads(t: Tracked, saved: Any) -> None:
    """Inverse of ``grads_of``: gradients are put back (copied into existing ones), others set to None."""
    if not isinstance(saved, dict):
        raise PyckptError("the checkpoint's gradients are malformed")
    for i, m in enumerate(t.modules):
        grads = saved.get(str(i)) or {}
        for n, p in m.named_parameters():
            g = grads.get(n)
            if g is None:
                p.grad = None
            elif not isinstance(g, torch.Tensor) or g.shape != p.shape:
                raise PyckptError(f"the checkpoint's gradient of {n!r} does not match the parameter")
            elif p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == g.dtype:
                p.grad.copy_(g)
            else:
                p.grad = g.to(device=p.device, dtype=p.dtype).clone()


def split_buffers(t: Tracked, state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Move module buffers out of ``state`` (returned, to be stored per rank).

    Under DDP the parameters are identical on every rank but buffers such as
    BatchNorm statistics are not: each rank updated them in its own forward,
    and DDP broadcasts rank 0's at the start of the next one. Keeping every
    rank's own buffers makes the restored processes exactly the saved ones."""
    out: dict[str, dict[str, Any]] = {}
    for i, m in enumerate(t.modules):
        sd = state["modules"][str(i)]
        names = {n for n, _ in m.named_buffers()}
        out[str(i)] = {k: sd.pop(k) for k in list(sd) if k in names}
    return out


def merge_buffers(state: dict[str, Any], buffers: dict[str, dict[str, Any]]) -> None:
    """Inverse of ``split_buffers``."""
    for i, bufs in buffers.items():
        state["modules"][i].update(bufs)


def into_of(t: Tracked) -> dict[str, Any]:
    """Existing tensors to restore module state into, in place. Not extra state: what
    ``get_extra_state`` returned goes to ``set_extra_state`` as it was saved (``_free_keys``)."""
    return {"modules": {str(i): {k: v for k, v in m.state_dict().items() if not k.endswith(_EXTRA)}
                        for i, m in enumerate(t.modules)}}


def load(t: Tracked, state: dict[str, Any]) -> None:
    """Load ``state`` (from ``state_of``) into the tracked objects; raises when they do not match."""
    _check_keys("modules", state["modules"], len(t.modules))
    _check_keys("optimizers", state["optimizers"], len(t.optimizers))
    # Before anything is loaded: a refusal leaves the objects as they were. Modules first: their keys
    # name what changed (a submodule added with add_param_group also changes the groups).
    for i, m in enumerate(t.modules):
        _check_module(i, m, state["modules"][str(i)])
    for i, o in enumerate(t.optimizers):
        _check_groups(i, o, state["optimizers"][str(i)])
    for i, m in enumerate(t.modules):
        _load_module(i, m, state["modules"][str(i)])
    for i, o in enumerate(t.optimizers):
        sharded.load_optimizer(o, state["optimizers"][str(i)])
    _load_named("LR scheduler", t.schedulers, state["schedulers"])
    _load_named("GradScaler", t.scalers, state["scalers"])


def _check_keys(what: str, saved: dict, n: int) -> None:
    if len(saved) != n:
        raise PyckptError(f"the checkpoint holds {len(saved)} {what} but this run has {n}: the script builds "
                          "different objects than the one that wrote it; set PYCKPT_RESUME=never to start over")


def _check_groups(i: int, o: Any, saved: Any) -> None:
    """Refuse (one clear error) an optimizer whose parameter groups differ from the saved ones, which
    torch's load_state_dict would raise as a bare ValueError after the modules were already loaded."""
    groups = saved.get("param_groups") if isinstance(saved, dict) and not sharded.is_zero(o) else None
    if not isinstance(groups, list):
        return  # ZeRO's or another format: its own load checks it
    have = [len(g["params"]) for g in o.param_groups]
    want = [len(g["params"]) if isinstance(g, dict) and isinstance(g.get("params"), list) else -1 for g in groups]
    if have != want:
        raise PyckptError(
            f"the checkpoint's optimizer {i} ({type(o).__name__}) has {len(want)} parameter group(s) of {want} "
            f"parameters, this run's has {len(have)} of {have} at the restore point: groups or parameters "
            "added while training (optimizer.add_param_group, e.g. gradual unfreezing) are not re-created "
            f"by the fast-forward; {_WAY_OUT}")


_WAY_OUT = ("checkpoint such a job with the explicit API (pyckpt.Checkpointer, which loads into the objects "
            "as the script has built them by then), or set PYCKPT_RESUME=never (or use a new PYCKPT_DIR) to "
            "start over")


def _check_module(i: int, m: nn.Module, saved: Any) -> None:
    """Refuse (one line) a module whose state_dict() entries, tensor shapes or dtypes differ from the saved
    ones: torch's strict load_state_dict would raise the first two as a multi-line RuntimeError, after
    the modules before it were loaded, and would cast the third silently (not the state that was saved).
    ``saved`` was made by the same state_dict() call, so a module built the same way has the same keys
    (non-persistent buffers are in neither)."""
    if not isinstance(saved, dict):
        raise PyckptError(f"the checkpoint's state of module {i} is malformed")
    live = m.state_dict()
    extra = [k for k in saved if k not in live]
    lacking = [k for k in live if k not in saved]
    free = _free_keys(m, live)
    resized = [f"{k!r}: checkpoint {tuple(v.shape)}, this run {tuple(live[k].shape)}"
               for k, v in saved.items() if k in live and k not in free and _resized(v, live[k])]
    recast = [f"{k!r}: checkpoint {v.dtype}, this run {live[k].dtype}"
              for k, v in saved.items() if k in live and k not in free and _recast(v, live[k])]
    if not (extra or lacking or resized or recast):
        return
    parts = []
    if extra:
        parts.append(f"the checkpoint has {_few(extra)} that this run's module lacks")
    if lacking:
        parts.append(f"this run's module has {_few(lacking)} that the checkpoint lacks")
    if resized:
        parts.append(f"shapes differ: {_few(resized, quote=False)}")
    if recast:
        parts.append(f"dtypes differ: {_few(recast, quote=False)}")
    raise PyckptError(
        f"module {i} ({type(m).__name__}) does not match the checkpoint: {'; '.join(parts)}. Parameters, "
        "buffers or submodules added, removed or cast while training (add_module, register_buffer, "
        "register_parameter, del, .to(dtype)) are not re-created by the fast-forward, which skips the "
        f"script's steps up to the checkpoint, and an edited script builds other ones; {_WAY_OUT}")


def _resized(saved: Any, live: Any) -> bool:
    """Whether torch's load_state_dict would refuse ``saved`` for ``live`` as a size mismatch."""
    if not (isinstance(saved, torch.Tensor) and isinstance(live, torch.Tensor)):
        return False  # not a tensor on one side (extra state, a sharded placeholder): its load decides
    if nn.parameter.is_lazy(live):
        return False  # an uninitialised lazy parameter takes the saved shape
    if live.dim() == 0 and tuple(saved.shape) == (1,):
        return False  # torch loads a 1-element tensor into a 0-dim parameter (older checkpoints)
    return saved.shape != live.shape


def _recast(saved: Any, live: Any) -> bool:
    """Whether ``saved`` has another dtype than ``live`` (load_state_dict would cast it on the way in)."""
    if not (isinstance(saved, torch.Tensor) and isinstance(live, torch.Tensor)):
        return False
    if nn.parameter.is_lazy(live):
        return False  # an uninitialised lazy parameter takes what it is given
    return saved.dtype != live.dtype


_EXTRA = "_extra_state"  # torch's state_dict() key suffix for get_extra_state()


def _free_keys(m: nn.Module, live: dict[str, Any]) -> set[str]:
    """``state_dict()`` keys whose saved value is put back as it was, whatever its dtype or shape:
    buffers (a script may assign a new tensor to one while training: a counter that becomes a float,
    a mask that becomes bool, an observer's statistics that grow per channel; the module then held
    the saved tensor, so it gets it back, ``_put_buffers``) and extra state."""
    buffers = {n for n, _ in m.named_buffers()}
    return {k for k in live if k in buffers or k.endswith(_EXTRA)}


def _put_buffers(m: nn.Module, saved: dict) -> None:
    """Replace each buffer whose saved tensor has another dtype or shape than the live one by a copy of
    the saved tensor (on the live one's device); load_state_dict would cast it or refuse it."""
    live = m.state_dict()
    for k in _free_keys(m, live):
        v, now = saved.get(k), live[k]
        if not k.endswith(_EXTRA) and (_resized(v, now) or _recast(v, now)):  # (both tensors)
            path, _, name = k.rpartition(".")
            owner = m.get_submodule(path)
            owner._buffers[name] = v.detach().to(device=now.device, copy=True)


def _few(items: list[str], n: int = 3, quote: bool = True) -> str:
    shown = ", ".join(repr(x) if quote else x for x in items[:n])
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return f"{len(items)} entr{'y' if len(items) == 1 else 'ies'} ({shown}{more})"


def _load_module(i: int, m: nn.Module, saved: dict) -> None:
    _put_buffers(m, saved)
    try:
        m.load_state_dict(saved)
    except RuntimeError as e:
        # What _check_module cannot foresee (a module's own _load_from_state_dict refusing a value):
        # still one line, not a traceback; earlier modules are loaded by now, but the job stops here.
        if not str(e).startswith("Error(s) in loading state_dict"):
            raise
        msg = " ".join(str(e).split())
        raise PyckptError(f"module {i} ({type(m).__name__}) does not take the checkpoint's state: "
                          f"{msg[:400]}{'...' if len(msg) > 400 else ''}; {_WAY_OUT}") from None


def _load_named(what: str, live: dict[str, Any], saved: dict[str, Any]) -> None:
    if set(live) != set(saved):
        raise PyckptError(f"the checkpoint holds {what}s {sorted(saved)} but this run has {sorted(live)}; "
                          "set PYCKPT_RESUME=never to start over")
    for k, obj in live.items():
        obj.load_state_dict(saved[k])
