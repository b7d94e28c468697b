"""Loop state capture/restore in-process (pyckpt/loopstate.py, pyckpt/frames.py).

A loop function calls a hook at every inner iteration. The "original" run captures its frame's state
at iteration K and goes on; the "relaunch" runs the same code from the top and, at its first hook
call (the same instruction of the same code), restores that state. Both must then produce the same
trace as the original from iteration K on. The captured tree goes through pyckpt's own state format
(tree.flatten / unflatten), as in a checkpoint.
"""
from __future__ import annotations

import collections
import enum
import functools
import importlib
import itertools
import random
import sys
import types

import pytest
import torch

from pyckpt import frames, loopstate, tree
from pyckpt.errors import PyckptError
from transparent_helpers import harness_hook


class Stats:  # a plain script object: its attributes are followed
    def __init__(self):
        self.seen = 0
        self.best = float("inf")
        self.inner = Inner()


class Inner:
    def __init__(self):
        self.ticks = []


def through_format(t: dict) -> dict:
    """Encode and decode as a checkpoint would (no pickle; tensors by reference)."""
    enc, tensors, _ = tree.flatten(t)
    return tree.unflatten(enc, lambda i, into, path: tensors[i].clone())


def loop(hook, trace):
    stats = Stats()
    gen = torch.Generator().manual_seed(5)
    rnd = random.Random(7)
    counter = 0
    running = 0.0
    hist = collections.deque(maxlen=3)
    seen = set()
    hidden = torch.zeros(2)
    words = ["a", "b", "c", "d"]
    for epoch in range(3):
        for i, w in enumerate(words):
            for j, n in zip(range(2), itertools.count(10)):
                hook(sys._getframe())
                counter += 1
                running += 0.5 * i
                hidden = hidden + torch.rand(2, generator=gen)
                hist.append(rnd.random())
                seen.add((epoch, w))
                stats.seen += 1
                stats.best = min(stats.best, float(hidden.sum()))
                stats.inner.ticks.append(j + n)
                trace.append((epoch, i, w, j, n, counter, running, tuple(hist), len(seen), stats.seen,
                              stats.best, tuple(stats.inner.ticks[-2:]), hidden.tolist()))
    return trace


def _user(frame):
    return [frame]


def _capture_and_resume(run, when, frames_of=_user):
    """``run(hook)`` once, capturing the loop state (through the checkpoint's format) at the first hook call
    whose frame ``when(frame)`` accepts; then again, restoring it at the first hook call. Returns (the
    capture, the restore's plan, the second run's result)."""
    got = {}

    def cap(frame):
        if "cap" not in got and when(frame):
            got["cap"] = loopstate.capture(frames_of(frame), "step", 1 << 20, [])

    run(harness_hook(cap))
    tree = through_format(got["cap"].tree)

    def res(frame):
        if "plan" not in got:
            got["plan"] = loopstate.prepare(tree, frames_of(frame), "step")
            got["plan"].apply()

    out = run(res)
    return got["cap"], got["plan"], out


def _nth_call(n: int):
    """A ``when`` for the helpers below: true at its ``n``-th call."""
    calls = []
    return lambda frame: calls.append(1) or len(calls) == n


def _resumes_like_a_plain_run(run, when):
    """``run(hook, trace)`` captured at the first hook call ``when(frame)`` accepts and resumed (through the
    format) at the first: nothing is warned about and the trace is a plain run's. Returns the capture."""
    plain = run(lambda f: None, [])
    cap, _, out = _capture_and_resume(lambda hook: run(hook, []), when)
    assert not cap.warnings, cap.warnings
    assert out == plain, (out, plain)
    return cap


def _prepare_error(captured, relaunch, when=lambda frame: True) -> str | None:
    """Capture ``captured(hook)`` at the first hook call ``when(frame)`` accepts; prepare the restore at
    ``relaunch(hook)``'s first: the ``PyckptError`` it raised (before anything was written), or None."""
    saved, errors = {}, []

    def cap(frame):
        if "tree" not in saved and when(frame):
            saved["tree"] = through_format(loopstate.capture([frame], "step", 1 << 20, []).tree)

    def res(frame):
        if not errors:
            try:
                loopstate.prepare(saved["tree"], [frame], "step")
                errors.append(None)
            except PyckptError as e:
                errors.append(str(e))

    captured(harness_hook(cap))
    relaunch(res)
    return errors[0]


def test_capture_then_restore_in_a_fresh_run_continues_identically():
    plain = loop(lambda f: None, [])
    K = 13  # epoch 1, i = 2, j = 1: every loop iterator is away from where a fresh run starts
    saved = {}

    def capture(frame):
        if not saved and len(calls) == K:
            cap = loopstate.capture(_user(frame), "step", 1 << 20, [])
            assert not cap.warnings, cap.warnings
            saved["tree"] = through_format(cap.tree)
        calls.append(1)

    calls: list = []
    original = loop(capture, [])
    assert original == plain  # capturing changes nothing

    restored = {"done": False}

    def restore(frame):
        if not restored["done"]:
            restored["done"] = True
            loopstate.prepare(saved["tree"], _user(frame), "step").apply()

    relaunch = loop(restore, [])
    assert relaunch == plain  # the trace list itself is a restored local (refilled in place)


class Holder:  # a library object the script handed its tensor to (a WeightedRandomSampler's weights)
    __module__ = "somelib"

    def __init__(self, t):
        self.t = t


def shared_tensor_loop(hook, data):
    weights = torch.ones(3)
    holder = Holder(weights)
    window = data[0:2]  # a view of the script's data
    for k in range(4):
        hook(sys._getframe())
        weights[k % 3] += 1
        window = data[k:k + 2]
    return holder, weights, window


def test_a_tensor_is_restored_into_the_live_one_unless_it_is_a_view():
    # Bound to a new tensor, the script's variable was no longer the one the library object held: the loop's
    # updates after the restore went to the new tensor, the object kept the relaunch's. A view (a window into
    # the data) is bound anew: written in place, the data it views would change.
    shared_tensor_loop(lambda f: None, torch.arange(6.0))
    fresh = torch.arange(6.0)
    runs = iter([torch.arange(6.0), fresh])
    _, _, (holder, weights, window) = _capture_and_resume(lambda hook: shared_tensor_loop(hook, next(runs)),
                                                          lambda f: f.f_locals["k"] == 2)
    assert holder.t is weights and weights.tolist() == [3.0, 2.0, 2.0]
    assert torch.equal(fresh, torch.arange(6.0)) and window.tolist() == [3.0, 4.0]


def aliases_loop(hook):
    best = current = torch.zeros(2)  # one tensor until the loop rebinds ``current``
    a, b = torch.zeros(2), torch.zeros(2)  # two tensors until the loop makes ``b`` an alias of ``a``
    for k in range(4):
        hook(sys._getframe())
        current = current + 1
        if k == 0:
            best = current
        if k == 1:
            b = a
        a += 1
    return best, current, a, b


def test_tensors_shared_in_the_relaunch_or_in_the_checkpoint_are_restored_as_they_were_shared():
    plain = aliases_loop(lambda f: None)
    _, _, (best, current, a, b) = _capture_and_resume(aliases_loop, lambda f: f.f_locals["k"] == 3)
    assert best.tolist() == plain[0].tolist() == [1.0, 1.0] and current.tolist() == [4.0, 4.0]
    assert b is a and a.tolist() == plain[2].tolist() == [4.0, 4.0]


class Meter:  # the torchvision references' SmoothedValue
    def __init__(self):
        self.values, self.total, self.count = collections.deque(maxlen=3), 0.0, 0

    def update(self, v):
        self.values.append(v)
        self.total, self.count = self.total + v, self.count + 1


class MetricLogger:
    def __init__(self):
        self.meters = collections.defaultdict(Meter)  # an entry is made at its first update()


def logger_loop(hook, trace):
    for epoch in range(2):
        logger = MetricLogger()
        for k in range(4):
            hook(sys._getframe())
            logger.meters["loss"].update(float(k + epoch))
        trace.append((logger.meters["loss"].total, logger.meters["loss"].count, list(logger.meters["loss"].values)))
    return trace


def test_an_entry_of_a_defaultdict_of_a_script_class_is_made_as_the_script_makes_it():
    # At the restore point the relaunch's logger is new (its meters are made at their first update); the
    # checkpoint holds the meter: the whole logger was left out (the epoch's logged average came out wrong).
    plain = logger_loop(lambda f: None, [])
    _, plan, out = _capture_and_resume(lambda hook: logger_loop(hook, []),
                                       lambda f: f.f_locals["epoch"] == 1 and f.f_locals["k"] == 2)
    assert out == plain and not plan.warnings


def test_stack_of_edited_code_is_refused_before_anything_is_written():
    src = ("def f(hook):\n    x = 1\n    for k in range(3):\n        hook(__import__('sys')._getframe())\n"
           "        x += {inc}\n    return x\n")
    ns_a, ns_b = {}, {}
    exec(compile(src.format(inc=1), "train.py", "exec"), ns_a)
    exec(compile(src.format(inc=2), "train.py", "exec"), ns_b)
    saved = {}

    def cap(frame):
        saved.setdefault("tree", through_format(loopstate.capture([frame], "step", 1 << 20, []).tree))

    ns_a["f"](cap)
    errors = []

    def res(frame):
        try:
            loopstate.prepare(saved["tree"], [frame], "step")
        except PyckptError as e:
            errors.append(str(e))

    assert ns_b["f"](res) == 7  # nothing was written into the edited run
    assert len(errors) == 3 and "the code of f (train.py, defined at line 1) changed" in errors[0]
    with pytest.raises(PyckptError, match="taken at a step point"):
        ns_a["f"](lambda fr: loopstate.check_stack(saved["tree"]["stack"], [fr], "backward"))


@pytest.mark.parametrize("damage", [
    lambda t: t.update(version=99),
    lambda t: t["locals"].append({}),
    lambda t: t["locals"][0].update(x=["t", 7, "cpu", False]),
    lambda t: t["locals"][0].update(x=["zzz"]),
    lambda t: t["locals"][0].update(x=["d", [[["l", []], ["v", 1]]]]),
    lambda t: t["iters"][0].__setitem__(0, ["list_iterator", 0]),
    lambda t: t.update(tensors=["not a tensor"]),
    lambda t: t["locals"][0].update(x=["fr", 1, 0]),  # a zero denominator
    lambda t: t["locals"][0].update(x=["de", "1.1.1"]),
    lambda t: t["locals"][0].update(x=["aa", "f", b"\x00\x01\x02"]),  # not a whole float
    lambda t: t["locals"][0].update(x=["aa", "Q!", b""]),
    lambda t: t["locals"][0].update(x=["cx", 1, "2"]),
    lambda t: t["locals"][0].update(x=["ns", 0, "int64"]),  # names a tensor there is not
])
def test_malformed_loop_state_is_refused_with_pyckpt_error(damage):
    def f(hook):
        x = 1
        for _ in range(2):
            hook(sys._getframe())
        return x

    saved = {}
    f(lambda fr: saved.setdefault("t", through_format(loopstate.capture([fr], "step", 1 << 20, []).tree)))
    damage(saved["t"])
    with pytest.raises(PyckptError):
        f(lambda fr: loopstate.prepare(saved["t"], [fr], "step"))


def _gen():
    yield 1


def test_what_is_skipped_warned_or_kept():
    big = torch.zeros(1000)
    big.add_(1)  # changed in place: the relaunch would not recreate it
    fresh_big = torch.zeros(1000)  # made once, never changed: the relaunch makes it again
    param = torch.nn.Parameter(torch.ones(2))
    module = torch.nn.Linear(2, 2)
    alias = module.weight.data  # shares the module's memory: restored with the module
    stream = _gen()
    used_up = _gen()
    list(used_up)  # as model.parameters() given to an optimizer: nothing left to restore, nothing to warn about
    custom = iter(collections.OrderedDict(a=1).items())
    fh = open(__file__)
    try:
        def probe():
            return loopstate.capture([sys._getframe(1)], "step", 1000, [module])

        cap = probe()
    finally:
        fh.close()
    loc = cap.tree["locals"][0]
    keys = [k.split(" ")[0] for k in cap.warnings]
    assert sorted(keys) == ["big", "custom", "stream"], cap.warnings
    assert "generator" in cap.warnings[next(k for k in cap.warnings if k.startswith("stream"))]
    skipped = {k.split(" ")[0] for k in cap.skipped}
    assert {"fresh_big", "param", "module", "alias", "fh", "used_up"} <= skipped
    assert not set(loc) & {"big", "fresh_big", "param", "module", "alias", "fh", "stream", "custom", "used_up"}


def test_tensors_shared_with_any_submodule_are_left_to_the_module():
    """Parameters and buffers of nested submodules (a non-persistent buffer too, which no state_dict
    holds) are the module's: a loop variable viewing them is skipped, not saved as a copy; a tensor
    of its own is kept."""
    inner = torch.nn.Linear(3, 3)
    inner.register_buffer("mask", torch.ones(3), persistent=False)
    model = torch.nn.Sequential(torch.nn.Sequential(inner), torch.nn.ReLU())
    weight_row = inner.weight.data[0]  # a view into a submodule's parameter
    mask = inner.mask
    own = torch.arange(3.0)
    own.add_(1)

    def probe():
        return loopstate.capture([sys._getframe(1)], "step", 1 << 20, [model])

    cap = probe()
    skipped = {k.split(" ")[0]: v for k, v in cap.skipped.items()}
    assert "module" in skipped["weight_row"] and "module" in skipped["mask"], skipped
    assert "own" in cap.tree["locals"][0] and "weight_row" not in cap.tree["locals"][0]


def test_globals_of_script_modules_and_exclusion(tmp_path, monkeypatch):
    mod = types.ModuleType("__main__")
    mod.__file__ = str(tmp_path / "train.py")
    src = ("import sys\nstep = 0\nlr = 0.1\nnote = 'x'\n__pyckpt_exclude__ = ['note']\n"
           "def go(hook):\n    global step, lr\n    for _ in range(4):\n        hook(sys._getframe())\n"
           "        step += 1\n        lr /= 2\n")
    exec(compile(src, str(tmp_path / "train.py"), "exec"), mod.__dict__)
    monkeypatch.setitem(sys.modules, "__main__", mod)
    saved = {}

    def cap(frame):
        if mod.step == 2:
            saved["t"] = through_format(loopstate.capture([frame], "step", 1 << 20, []).tree)

    mod.go(cap)
    assert saved["t"]["globals"]["__main__"].keys() == {"step", "lr"}  # note excluded, modules/functions skipped
    mod.step, mod.lr, mod.note = 0, 0.1, "y"
    done = []

    def res(frame):
        if not done:
            done.append(1)
            loopstate.prepare(saved["t"], [frame], "step").apply()

    mod.go(res)
    assert (mod.step, mod.lr, mod.note) == (4, 0.1 / 2 ** 4, "y")


def test_enumerate_index_is_set_in_place():
    e = enumerate("abcdef")
    next(e)
    assert frames.set_enumerate_index(e, 4)
    assert next(e) == (4, "b")  # the wrapped iterator is positioned separately
    assert frames.loop_iterators(sys._getframe()) == []


def batches(n):
    """A script's batch generator: a loop over it is positioned through the generator's frame."""
    total = 0
    for k in range(n):
        total += k
        yield k, total


def gen_loop(hook, trace):
    for epoch in range(2):
        for k, total in batches(5):
            hook(sys._getframe())
            trace.append((epoch, k, total))
    return trace


def test_loop_over_a_generator_is_positioned_through_its_frame():
    plain = gen_loop(lambda f: None, [])
    saved, calls = {}, []

    def cap(frame):
        if len(calls) == 7:  # epoch 1, k = 2
            c = loopstate.capture([frame], "step", 1 << 20, [])
            assert not c.warnings, c.warnings
            saved["t"] = through_format(c.tree)
        calls.append(1)

    gen_loop(cap, [])
    done = []

    def res(frame):
        if not done:
            done.append(1)
            loopstate.prepare(saved["t"], [frame], "step").apply()

    assert gen_loop(res, []) == plain


def epochs_inside(hook, n):
    """timm's MultiEpochsDataLoader.__iter__, the ``for epoch in range(E): for b in loader: yield b``
    stream: the snapshot point (the fetch) is inside the generator, so its frame is on the stack *and*
    iterated by the loop outside."""
    for k in range(n):
        hook(sys._getframe())
        yield k


def outer_loop(hook, trace):
    for epoch in range(3):
        for k in epochs_inside(hook, 4):
            trace.append((epoch, k))
    return trace


def _two(frame):
    return [frame.f_back, frame]  # outer_loop, then the generator (outermost first, as frames.user_frames)


def test_a_generator_on_the_stack_and_iterated_outside_is_positioned_once():
    # Its range iterator was consumed twice over (once per place it was seen): the generator ended early
    # and the loop outside moved to the next epoch, silently.
    plain = outer_loop(lambda f: None, [])
    calls = []

    def sixth(frame):  # epoch 1, k = 2: one item left in the generator's range
        calls.append(1)
        return len(calls) == 7

    _, _, out = _capture_and_resume(lambda hook: outer_loop(hook, []), sixth, _two)
    assert out == plain  # (the trace is restored too)


def stream_of(hook, epochs):
    """The ``cycle(loader)`` stream: a generator in a variable, advanced with ``next()``."""
    for epoch in range(epochs):
        for k in range(3):
            hook(sys._getframe())
            yield epoch, k


def next_loop(hook, trace):
    batches = stream_of(hook, 4)
    for step in range(10):
        epoch, k = next(batches)
        trace.append((step, epoch, k))
    return trace


def test_a_generator_in_a_variable_running_on_the_stack_is_positioned_and_not_warned_about():
    # The snapshot point (the loader's fetch) is inside the generator: its frame is captured on the stack, so
    # the variable holding it needs nothing; it was said to make the resume inexact, which it did not.
    plain = next_loop(lambda f: None, [])
    cap, _, out = _capture_and_resume(lambda hook: next_loop(hook, []),
                                      lambda f: f.f_back.f_locals.get("step") == 5, _two)
    assert not cap.warnings, cap.warnings
    assert "running on the stack" in cap.skipped["batches (in next_loop)"]
    assert out == plain


def iterator_in_variables(hook, trace):
    pairs = zip(range(6), "abcdef")  # the loop's iterator, in a variable too
    for k, (n, ch) in enumerate(pairs):
        hook(sys._getframe())
        trace.append((k, n, ch, sum(x for x in range(n))))  # a generator expression: its .0 is its loop's
    return trace


def test_a_variable_holding_a_running_loops_iterator_is_positioned_with_the_loop_not_warned_about():
    # ``pairs`` (and the inner zip of ``enumerate(pairs)``) is the for loop's: it was also warned about as
    # a variable holding an iterator whose position cannot be restored, although the loop positions it.
    plain = iterator_in_variables(lambda f: None, [])
    cap, _, out = _capture_and_resume(lambda hook: iterator_in_variables(hook, []),
                                      lambda f: f.f_locals.get("k") == 3)
    assert not cap.warnings, cap.warnings
    assert "positioned with that loop" in cap.skipped["pairs (in iterator_in_variables)"]
    assert out == plain


def islice_loop(hook, trace, stop=8):
    for epoch in range(2):
        for k in itertools.islice(iter(range(10)), 2, stop):  # steps per epoch limited, a start skipped
            hook(sys._getframe())
            trace.append((epoch, k))
    return trace


def test_a_loop_over_an_islice_is_positioned_and_stops_where_it_would_have():
    # It was "a loop over itertools.islice, whose position cannot be restored": the relaunch's islice
    # counted its items from 0 again and ran past the saved run's stop.
    _resumes_like_a_plain_run(islice_loop, lambda f: f.f_locals.get("epoch") == 1 and f.f_locals.get("k") == 4)


def test_an_islice_with_another_stop_is_refused_before_anything_is_written():
    error = _prepare_error(lambda hook: islice_loop(hook, []), lambda hook: islice_loop(hook, [], stop=9))
    assert error and "islice that stops at 9 now, the checkpoint's stopped at 8" in error, error


def chain_loop(hook, trace, n_loaders=2):
    from torch.utils.data import DataLoader

    loaders = [DataLoader(list(range(4 * (i + 1))), batch_size=2) for i in range(n_loaders)]
    for b in itertools.chain(*loaders):
        hook(sys._getframe())
        trace.append(b.tolist())
    return trace


def test_a_chain_of_loaders_is_saved_by_the_loaders_it_has_left_and_checked_against_the_relaunchs():
    seen = {}

    def cap(frame):
        if "cap" not in seen and frame.f_locals["trace"] == [[0, 1]]:  # in the first loader
            seen["cap"] = loopstate.capture([frame], "step", 1 << 20, [])
    chain_loop(harness_hook(cap), [])
    assert not seen["cap"].warnings, seen["cap"].warnings
    # In the first of two loaders, one left in its source; a list among them is not a chain of loaders.
    assert loopstate._loaders_left(itertools.chain()) == 0
    from torch.utils.data import DataLoader
    a, b = DataLoader([1, 2]), DataLoader([3])
    c = itertools.chain(a, b)
    assert loopstate._loaders_left(c) == 2
    next(c)
    assert loopstate._loaders_left(c) == 1
    assert loopstate._loaders_left(itertools.chain(a, [1])) is None
    assert loopstate._loaders_left(itertools.chain.from_iterable([a, b])) is None
    # A relaunch chaining three loaders where the checkpoint's chained two: refused, nothing written.
    error = _prepare_error(lambda hook: chain_loop(hook, []), lambda hook: chain_loop(hook, [], n_loaders=3),
                           lambda f: f.f_locals["trace"] == [[0, 1]])
    assert error and "2 loader(s) left in it now, 1 in the checkpoint" in error, error


def delegating(n):
    """A generator that goes on through another iterator with ``yield from`` (tqdm's ``__iter__`` with
    ``disable=True`` is ``yield from iterable``)."""
    for part in range(2):
        yield from range(part * 10, part * 10 + n)


def delegating_loop(hook, trace):
    for k in delegating(5):
        hook(sys._getframe())
        trace.append(k)
    return trace


def tqdm_off_loop(hook, trace):
    from tqdm import trange

    for k in trange(12, disable=True):
        hook(sys._getframe())
        trace.append(k)
    return trace


@pytest.mark.parametrize("run", [delegating_loop, tqdm_off_loop])
def test_a_generator_delegating_with_yield_from_is_positioned_through_its_frame(run):
    # The iterator ``yield from`` goes through was not seen as a loop's: the relaunch's generator started over
    # from its first item, with no line (a 70-step ``for s in trange(70, disable=True)`` ran 70 more steps).
    plain = run(lambda f: None, [])
    cap, _, out = _capture_and_resume(lambda hook: run(hook, []), lambda f: f.f_locals.get("k") in (12, 8))
    assert not cap.warnings, cap.warnings
    assert out == plain


def dependent_range(hook, trace):
    for part in range(2):
        for k in range(part * 10, part * 10 + 5):  # the inner loop's items depend on the outer loop
            hook(sys._getframe())
            trace.append(k)
    return trace


def dependent_gen(n):
    for part in range(2):
        for k in range(part * 10, part * 10 + n):
            yield k


def dependent_gen_loop(hook, trace):
    for k in dependent_gen(5):
        hook(sys._getframe())
        trace.append(k)
    return trace


def list_in_variable(hook, trace):
    for part in range(2):
        names = ["a", "b", "c"] if part == 0 else ["x", "y", "z"]  # refilled in place at the restore
        for k in names:
            hook(sys._getframe())
            trace.append(k)
    return trace


@pytest.mark.parametrize("run,at", [(dependent_range, 12), (dependent_gen_loop, 12), (list_in_variable, "y")])
def test_an_inner_loop_whose_items_depend_on_the_outer_one_goes_on_with_the_checkpoints_items(run, at):
    # The relaunch's inner range was made in the outer loop's first pass (range(0, 5)) and was advanced to
    # the saved position: it went on with 3, 4 instead of 13, 14, and nothing was said.
    plain = run(lambda f: None, [])
    cap, _, out = _capture_and_resume(lambda hook: run(hook, []), lambda f: f.f_locals.get("k") == at)
    assert not cap.warnings, cap.warnings
    assert out == plain


def tuple_in_variable(hook, trace, enumerated=False):
    torch.manual_seed(0)
    for part in range(2):
        batches = torch.randperm(12).split(5)  # a tuple of views of a tensor no variable holds
        if enumerated:
            for k, b in enumerate(batches):
                hook(sys._getframe())
                trace.append((part, k, b.tolist()))
        else:
            for b in batches:
                hook(sys._getframe())
                trace.append((part, b.tolist()))
    return trace


def unnamed_tuple(hook, trace, enumerated=False):
    torch.manual_seed(0)
    for part in range(2):
        if enumerated:
            for k, b in enumerate(torch.randperm(12).split(5)):  # no variable holds the tuple
                hook(sys._getframe())
                trace.append((part, k, b.tolist()))
        else:
            for b in torch.randperm(12).split(5):
                hook(sys._getframe())
                trace.append((part, b.tolist()))
    return trace


@pytest.mark.parametrize("script", [tuple_in_variable, unnamed_tuple])
@pytest.mark.parametrize("enumerated", [False, True])
def test_a_loop_over_a_random_tuple_goes_on_through_the_checkpoints_items(script, enumerated):
    # tuple_in_variable: ``batches`` is restored as the checkpoint's tuple, but the loop went on through the
    # relaunch's, made in the outer loop's first pass from other random indices. unnamed_tuple: ``for idx in
    # torch.randperm(n).split(bs)``, no variable holds it. Other batches either way, and nothing was said; now
    # the restored tuple, or the items left saved with the loop state, take the loop's iterator's place.
    run = functools.partial(script, enumerated=enumerated)
    plain = run(lambda f: None, [])
    cap, _, out = _capture_and_resume(lambda hook: run(hook, []),
                                      lambda f: f.f_locals.get("part") == 1 and len(f.f_locals["trace"]) == 4)
    assert not cap.warnings, cap.warnings
    assert out == plain


def views_loop(hook, trace):
    xs, ys = torch.arange(12.0), torch.arange(12.0) * 2  # saved with the frame, put back in place
    for epoch in range(2):
        for xb, yb in zip(xs.split(5), ys.split(5)):  # views of them, inside a zip
            hook(sys._getframe())
            trace.append((epoch, xb.tolist(), yb.tolist()))
        xs.add_(1)
    return trace


def test_a_loop_over_views_of_saved_tensors_is_positioned_without_saving_its_items():
    plain = views_loop(lambda f: None, [])
    cap, _, out = _capture_and_resume(lambda hook: views_loop(hook, []),
                                      lambda f: f.f_locals.get("epoch") == 1 and len(f.f_locals["trace"]) == 4)
    assert not cap.warnings, cap.warnings
    assert "values" not in repr(cap.tree["iters"])  # the views see the tensors restored in place
    assert out == plain


def optimizers_loop(hook, trace, opts):
    for epoch in range(2):
        for opt in (opts[0], opts[1]):  # a GAN's alternation: the same objects in a relaunch
            hook(sys._getframe())
            trace.append((epoch, opts.index(opt)))
    return trace


def test_a_loop_over_optimizers_no_variable_holds_is_not_warned_about():
    # Objects pyckpt restores elsewhere, the same objects in a relaunch: not saved as the loop's items, and
    # not said to make the resume inexact.
    p = torch.nn.Parameter(torch.ones(2))
    opts = [torch.optim.SGD([p], lr=0.1), torch.optim.Adam([p], lr=0.1)]
    got = {}
    optimizers_loop(lambda f: f.f_locals.get("epoch") == 1 and got.setdefault(
        "cap", loopstate.capture([f], "step", 1 << 20, [])), [], opts)
    assert not got["cap"].warnings, got["cap"].warnings
    assert got["cap"].tree["iters"][0][1][:2] == ["tuple_iterator", 1] and len(got["cap"].tree["iters"][0][1]) == 2


def tuple_zipped(hook, trace):
    torch.manual_seed(0)
    for part in range(2):
        batches = torch.randperm(12).split(5)
        for k, b in zip(itertools.count(), batches):  # inside a zip: not replaced there
            hook(sys._getframe())
            trace.append((part, k, b.tolist()))
    return trace


def test_a_zipped_tuple_the_restore_rebinds_is_refused_not_resumed_through_the_relaunchs():
    error = _prepare_error(lambda hook: tuple_zipped(hook, []), lambda hook: tuple_zipped(hook, []),
                           lambda f: f.f_locals.get("part") == 1)
    assert error and "iterates a tuple that is restored as another object" in error, error


def reversed_loop(hook, trace):
    for part in range(2):
        for k in reversed(["a", "b", "c", "d"]):  # a list_reverseiterator: its index counts down
            hook(sys._getframe())
            trace.append((part, k))
    return trace


def test_a_loop_over_a_reversed_list_resumes_as_before():
    # What is left of it was taken as the list's tail from its index: the same items were said to differ.
    _resumes_like_a_plain_run(reversed_loop, lambda f: f.f_locals.get("part") == 1 and f.f_locals.get("k") == "c")


def dependent_items(hook, trace):
    for part in range(2):
        for k in (("a", "b", "c") if part == 0 else ("x", "y", "z")):  # held by the loop alone
            hook(sys._getframe())
            trace.append(k)
    return trace


def test_an_inner_loop_over_other_items_that_cannot_be_put_back_is_refused_not_resumed_wrongly():
    error = _prepare_error(lambda hook: dependent_items(hook, []), lambda hook: dependent_items(hook, []),
                           lambda f: f.f_locals.get("k") == "y")
    assert error and "iterates other items now than in the checkpoint" in error, error


def test_other_command_line_is_said_and_zero_cap_captures_no_variables(monkeypatch):
    def f(hook):
        x = 1
        for _ in range(2):
            hook(sys._getframe())
            x += 1
        return x

    saved = {}
    f(lambda fr: saved.setdefault("t", through_format(loopstate.capture([fr], "step", 1 << 20, []).tree)))
    monkeypatch.setattr(sys, "argv", [sys.argv[0], "--out", "elsewhere.pt"])
    plans = []
    f(lambda fr: plans.append(loopstate.prepare(saved["t"], [fr], "step")) if not plans else None)
    assert not plans[0].warnings  # the command line is the job's (the same on every rank): said by rank 0 only
    assert len(plans[0].job_warnings) == 1 and "the command line differs" in plans[0].job_warnings[0]
    off = {}
    f(lambda fr: off.setdefault("c", loopstate.capture([fr], "step", 0, [])))
    assert off["c"].tree["locals"] == [{}] and "PYCKPT_LOOP_STATE_MAX_BYTES=0" in off["c"].warnings["variables"]


def test_pyckpt_own_wrapper_generator_in_the_loop_is_not_warned_about():
    # A loop over a wrapper pyckpt counts (accelerate's DataLoaderShard, a prefetching iterator)
    # iterates pyckpt's own generator, LoaderTracker._count_handed; its locals (the wrapper's
    # generator) are pyckpt's business: positioned by the loader's fast-forward, never warned about.
    from pyckpt.loader_state import LoaderTracker

    tracker = LoaderTracker(lambda st: None, lambda: None, lambda: None)

    def wrapper_iter():  # the wrapper's own generator: unrestorable if it were the script's
        yield from range(4)

    def f(hook):
        for x in tracker._count_handed(object(), wrapper_iter(), None):
            hook(sys._getframe())
        return x

    caps = []
    f(lambda fr: caps.append(loopstate.capture([fr], "loader", 1 << 20, [])) if not caps else None)
    assert not caps[0].warnings, caps[0].warnings
    saved = through_format(caps[0].tree)
    assert saved["iters"] == [[["pyckpt", "LoaderTracker._count_handed"]]]
    plans = []
    assert f(lambda fr: plans.append(loopstate.prepare(saved, [fr], "loader")) if not plans else None) == 3
    plans[0].apply()  # accepted against the same kind of generator; nothing to write

    def g(hook):  # the same shape over the script's own generator: not what the checkpoint holds
        for x in batches(4):
            hook(sys._getframe())

    with pytest.raises(PyckptError, match="iterates a generator now, the checkpoint has pyckpt"):
        g(lambda fr: loopstate.prepare({**saved, "stack": loopstate.stack_signature([fr], "loader")}, [fr],
                                       "loader"))


LIBRARY_WRAPPER = '''
def wrap(iterable):
    helper = iter(lambda: 0, 1)  # the library's own iterator: not the script's to warn about
    n = 0
    for x in iterable:
        n += 1
        yield n, x
'''


def test_library_generator_locals_are_not_warned_but_its_loop_is_positioned():
    # A tqdm-style wrapper from an installed package: its frame is followed to position its loop
    # (and its restorable locals come back), but what it holds that cannot be stored is listed for
    # debug, not named in the "resume will not be exact" warning as if the script read it.
    import sysconfig

    ns: dict = {}
    exec(compile(LIBRARY_WRAPPER, f"{sysconfig.get_paths()['purelib']}/somelib/wrap.py", "exec"), ns)

    def f(hook, trace):
        for n, x in ns["wrap"]([10, 20, 30, 40, 50]):
            hook(sys._getframe())
            trace.append((n, x))
        return trace

    plain, caps = f(lambda fr: None, []), []
    f(lambda fr: caps.append(loopstate.capture([fr], "step", 1 << 20, [])) if len(caps) < 3 else None, [])
    cap = caps[2]
    assert not cap.warnings, cap.warnings
    assert any(k.startswith("helper (in generator wrap)") for k in cap.skipped), cap.skipped
    saved, done = through_format(cap.tree), []

    def res(fr):
        if not done:
            done.append(1)
            loopstate.prepare(saved, [fr], "step").apply()

    assert f(res, []) == plain  # the trace list is a restored local too


def test_many_small_objects_count_toward_the_cap_and_a_left_out_variable_leaves_no_tensor():
    # A list of 200k empty lists is ~0 bytes of payload but 200k nodes to encode, flatten and
    # write at every snapshot: slots count toward the cap, so it is left out with a warning.
    def f(hook):
        junk = [[] for _ in range(200_000)]
        mixed = [torch.ones(4), [[] for _ in range(200_000)]]  # its tensor was encoded before the skip
        kept = [1, 2, 3]
        hook(sys._getframe())
        return junk, mixed, kept

    got = {}
    f(lambda fr: got.setdefault("c", loopstate.capture([fr], "step", 1 << 20, [])))
    cap = got["c"]
    assert "PYCKPT_LOOP_STATE_MAX_BYTES" in cap.warnings["junk (in f)"], cap.warnings
    assert "PYCKPT_LOOP_STATE_MAX_BYTES" in cap.warnings["mixed (in f)"], cap.warnings
    assert set(cap.tree["locals"][0]) == {"kept"}
    assert cap.tree["tensors"] == []  # mixed's tensor was rolled back with it


def _ema_loop(hook, trace, changed=False):
    """A model trained by an optimizer (tracked) next to modules no optimizer owns: an EMA copy, a
    teacher held by a plain object, a loss module without state; all updated in place."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = torch.optim.swa_utils.AveragedModel(model)
    stats = Stats()
    stats.teacher = torch.nn.Linear(3, 2, bias=not changed).requires_grad_(False)
    crit = torch.nn.MSELoss()
    seen = 0
    for i in range(6):
        hook(sys._getframe(), model)
        seen += 1
        x = torch.full((4, 3), float(i))
        opt.zero_grad()
        crit(model(x), torch.ones(4, 2)).backward()
        opt.step()
        ema.update_parameters(model)
        with torch.no_grad():
            stats.teacher.weight.lerp_(model.weight, 0.5)
        trace.append((seen, [t.clone() for t in ema.state_dict().values()], stats.teacher.weight.clone(),
                      model.weight.clone()))
    return trace


def _same_trace(a, b):
    return len(a) == len(b) and all(
        x[0] == y[0] and all(torch.equal(p, q) for p, q in zip(x[1], y[1])) and torch.equal(x[2], y[2])
        and torch.equal(x[3], y[3]) for x, y in zip(a, b))


def test_modules_no_optimizer_owns_are_saved_and_loaded_into_the_live_objects():
    plain = _ema_loop(lambda f, m: None, [])
    saved = {}

    def capture(frame, model):
        if len(calls) == 3:
            cap = loopstate.capture([frame], "step", 1 << 20, [model])
            assert not cap.warnings, cap.warnings
            skipped = {k.split(" ")[0]: v for k, v in cap.skipped.items()}
            assert "model" in skipped, skipped  # tracked
            # no state_dict() entries: its flag and settings, in place (object_attrs.stateless_members)
            assert cap.tree["locals"][0]["crit"][:2] == ["ob", type(frame.f_locals["crit"]).__qualname__]
            saved["tree"], saved["states"] = through_format(cap.tree), through_format(cap.states)
            saved["model"] = {k: v.clone() for k, v in model.state_dict().items()}
        calls.append(1)

    calls: list = []
    assert _same_trace(_ema_loop(capture, []), plain)
    loc, objs = saved["tree"]["locals"][0], saved["tree"]["objects"]
    assert loc["ema"][0] == "M" and [o["attrs"]["teacher"][0] for o in objs if o["type"] == "Stats"] == ["M"]
    assert sorted(saved["states"]) == ["ema (in _ema_loop)", "stats.teacher"]
    held = {}

    def restore(frame, model):
        if not held:
            held.update(ema=frame.f_locals["ema"], teacher=frame.f_locals["stats"].teacher)
            model.load_state_dict(saved["model"])  # what pyckpt does for the tracked model
            loopstate.prepare(saved["tree"], [frame], "step", saved["states"]).apply()
            assert frame.f_locals["ema"] is held["ema"] and frame.f_locals["stats"].teacher is held["teacher"]

    assert _same_trace(_ema_loop(restore, []), plain)  # `trace` too is a restored local


def test_module_without_a_saved_entry_now_is_refused_before_anything_is_written():
    saved = {}
    _ema_loop(lambda f, m: saved.setdefault("t", loopstate.capture([f], "step", 1 << 20, [m])), [])
    errors = []

    def restore(frame, model):
        if not errors:
            try:
                loopstate.prepare(through_format(saved["t"].tree), [frame], "step", through_format(saved["t"].states))
            except PyckptError as e:
                errors.append(str(e))

    trace = _ema_loop(restore, [], changed=True)
    assert errors and "stats.teacher has no 'bias' now (the checkpoint has it)" in errors[0], errors
    assert trace[0][0] == 1  # `seen` was not written either


def test_modules_of_any_size_by_reference_in_a_container_said_registered_left_out():
    model = torch.nn.Linear(2, 2)
    teacher = torch.nn.Linear(2, 2)
    big_ema = torch.nn.Linear(64, 64)  # 16.6 kB, over this capture's cap: saved all the same
    registered = torch.nn.Linear(2, 2)
    pair = [model, teacher]  # a restore rebuilds a list around new objects: not restorable in place
    tracked_only = {"m": model}
    shares = torch.nn.Linear(2, 2)
    shares.weight = model.weight  # its own bias is saved; the weight is the model's

    def probe():
        return loopstate.capture([sys._getframe(1)], "step", 4096, [model], [registered])

    cap = probe()
    warned = {k.split(" ")[0]: v for k, v in cap.warnings.items()}
    assert set(warned) == {"pair"}, cap.warnings
    assert "in a container" in warned["pair"] and "pyckpt.register" in warned["pair"]
    loc = cap.tree["locals"][0]
    assert set(loc) & {"model", "teacher", "big_ema", "registered", "pair", "tracked_only", "shares"} == \
        {"teacher", "shares", "big_ema"}
    here = sys._getframe().f_code.co_name
    refs = {k: v[2] for k, v in loc.items() if v[0] == "M"}
    assert refs == {k: f"{k} (in {here})" for k in ("teacher", "big_ema", "shares")}
    assert list(cap.states[refs["shares"]]) == ["bias"]
    assert cap.states[refs["big_ema"]]["weight"].data_ptr() == big_ema.weight.data_ptr()  # not copied here
    assert not cap.tree["tensors"]


class LibraryEMA:  # made a library class below: its module is one of the standard library's
    def __init__(self, t):
        self.shadow, self.updates = t.clone(), 0

    def state_dict(self):
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state):
        self.shadow.copy_(state["shadow"])
        self.updates = state["updates"]


class LibrarySchedule(LibraryEMA):  # no tensor in its state: a library's own business, as before
    def state_dict(self):
        return {"updates": self.updates}


class LibraryLoader(LibraryEMA):  # iterable: a loader wrapper, positioned by pyckpt's fast-forward
    def __iter__(self):
        return iter(())


for _cls in (LibraryEMA, LibrarySchedule, LibraryLoader):
    _cls.__module__ = "json"  # sys.modules["json"].__file__ is under the standard library


def test_library_object_with_state_dict_is_loaded_into_the_live_object_or_refused():
    def run(hook, cls=LibraryEMA):
        helper = cls(torch.zeros(2))
        listed = [helper]  # a restore would rebuild the list around a new object: said, not saved
        schedule, loader = LibrarySchedule(torch.zeros(1)), LibraryLoader(torch.zeros(1))
        for i in range(4):
            hook(sys._getframe())
            helper.shadow.add_(1.0)
            helper.updates += 1
        return helper

    saved = {}

    def capture(frame):
        if not saved and frame.f_locals["i"] == 2:
            cap = loopstate.capture([frame], "step", 1 << 20, [])
            assert list(cap.warnings) == ["listed (in run)"] and "in a container" in cap.warnings["listed (in run)"]
            assert cap.tree["locals"][0]["helper"][0] == "O" and list(cap.states) == ["helper (in run)"]
            assert {"schedule (in run)", "loader (in run)"} <= set(cap.skipped), cap.skipped
            saved["tree"], saved["states"] = through_format(cap.tree), through_format(cap.states)

    run(capture)
    holder = {}

    def restore(frame):
        if not holder:
            holder["h"] = frame.f_locals["helper"]
            loopstate.prepare(saved["tree"], [frame], "step", saved["states"]).apply()

    out = run(restore)
    assert out is holder["h"] and out.updates == 4 and torch.equal(out.shadow, torch.full((2,), 4.0))

    class OtherEMA(LibraryEMA):
        pass

    with pytest.raises(PyckptError, match=r"helper \(in run\) is a .*OtherEMA now, the checkpoint holds LibraryEMA "
                                          "state there"):
        run(lambda f: loopstate.prepare(saved["tree"], [f], "step", saved["states"]), OtherEMA)

    def registered(frame):
        if not holder.get("r"):
            holder["r"] = loopstate.capture([frame], "step", 1 << 20, [], [frame.f_locals["helper"]])

    run(registered)
    assert "helper" not in holder["r"].tree["locals"][0]


def test_module_made_lazily_is_said_not_restored_instead_of_refusing_the_resume():
    """An EMA made at the first step (`if ema is None: ema = AveragedModel(model)`) is None at the
    restore point of a relaunch: nothing to load into. The resume goes on, and says the EMA's saved
    state was not restored; the variable is not bound to anything of pyckpt's."""
    def run(hook):
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 2)
        ema = None
        for i in range(4):
            hook(sys._getframe(), model)
            if ema is None:
                ema = torch.optim.swa_utils.AveragedModel(model)
            with torch.no_grad():
                model.weight.add_(1.0)
            ema.update_parameters(model)
        return ema

    saved = {}
    run(harness_hook(lambda f, m: saved.setdefault("c", loopstate.capture([f], "step", 1 << 20, [m]))
                    if f.f_locals["i"] == 2 else None))
    saved["t"], saved["s"] = through_format(saved["c"].tree), through_format(saved["c"].states)
    assert saved["t"]["locals"][0]["ema"][0] == "M"
    plans = []

    def restore(frame, model):
        if not plans:
            plans.append(loopstate.prepare(saved["t"], [frame], "step", saved["s"]))
            plans[0].apply()
            assert frame.f_locals["ema"] is None and frame.f_locals["i"] == 2

    assert isinstance(run(restore), torch.optim.swa_utils.AveragedModel)
    assert plans[0].warnings == ["ema (in run) is None at this point of the run, the checkpoint holds AveragedModel "
                                 "state there: not restored (exact only if the script makes it again from restored "
                                 "state)"]


def _numpy_scalar_loop(hook, trace):
    """Running values kept as NumPy scalars: with Python floats in the arithmetic, an ``np.float32``
    stays float32 (NumPy 2's rules) where a Python float would compute in float64."""
    import numpy as np

    acc, count, half = np.float32(0.0), np.int64(0), np.float16(1.0)
    hist = {"c": np.complex64(1j), "flags": [np.bool_(False)], np.int32(7): np.uint8(200)}
    big_endian, frozen = np.arange(3, dtype=">i4"), np.frombuffer(b"\x01\x02", dtype=np.uint8)  # read-only
    for i in range(6):
        hook(sys._getframe())
        big_endian = (big_endian * 3 + i).astype(">i4")
        frozen = np.frombuffer(bytes(frozen * 2 + 1), dtype=np.uint8)
        acc = acc * 0.9 + 0.1 * (i + 1) / 3
        count += 1
        half = half * 1.1
        hist["c"] = hist["c"] * np.complex64(1 + 0.5j)
        hist["flags"].append(np.bool_(i % 2))
        hist[np.int32(7)] = hist[np.int32(7)] + np.uint8(1)
        trace.append([(type(v).__name__, repr(v)) for v in (acc, count, half, hist["c"], hist["flags"][-1],
                                                             hist[np.int32(7)])]
                     + [big_endian.dtype.str, big_endian.tolist(), frozen.tolist()])
    return trace


def test_numpy_scalars_come_back_with_their_dtype_not_as_python_numbers():
    """An ``np.float32`` accumulator came back as a Python float: the relaunch computed in float64 and
    ended with other values (and types), said by nothing. Arrays in another byte order or read-only
    ones are kept too (torch wraps neither as it is)."""
    _resumes_like_a_plain_run(_numpy_scalar_loop, _nth_call(4))


def _stdlib_numbers_loop(hook, trace):
    """Running values of the standard library's number and buffer kinds; ``alias`` shares the bytearray."""
    import array
    import decimal
    import fractions

    z, frac, dec = 1 + 2j, fractions.Fraction(1, 3), decimal.Decimal("1.1")
    buf, floats = bytearray(b"ab"), array.array("f", [1.5])
    alias = buf
    for i in range(6):
        hook(sys._getframe())
        z = z * (0.5 + 1j)
        frac += fractions.Fraction(1, 7)
        dec += decimal.Decimal("0.1")
        buf.append(65 + i)
        floats.append(i * 0.25)
        trace.append((repr(z), repr(frac), repr(dec), bytes(alias), floats.tobytes()))
    return trace


def test_complex_fraction_decimal_bytearray_and_array_values_are_put_back():
    """These were left out as "not a restorable kind" with no line but a debug one: the relaunch went on
    from its own first values. The bytearray is refilled in place (``alias`` sees it)."""
    cap = _resumes_like_a_plain_run(_stdlib_numbers_loop, _nth_call(4))
    assert not [k for k in cap.skipped if k.split(" ")[0] in ("z", "frac", "dec", "buf", "floats", "alias")], \
        cap.skipped


def _user_collections_loop(hook, trace):
    """The standard library's UserDict/UserList/UserString/ChainMap as running metrics and settings: as
    variables, inside a list, held by a script object, and a ChainMap layer a library object also holds."""
    from collections import ChainMap, UserDict, UserList, UserString

    metrics, history, tag = UserDict(loss=0.0, seen=0), UserList(), UserString("")
    overrides = {"lr": 1.0}
    cfg = ChainMap(overrides, {"lr": 0.5, "clip": 1.0})
    lib = Holder(overrides)
    runs = [UserDict(n=0)]
    log = _ArrayLogger(UserList([0]))
    for i in range(6):
        hook(sys._getframe())
        metrics["loss"] += 0.25 * i
        metrics["seen"] += 1
        history.append(i * i)
        tag += str(i)
        cfg["lr"] = cfg["lr"] * 0.5
        runs[0]["n"] += 2
        log.buf.append(i)
        trace.append((dict(metrics), list(history), str(tag), dict(cfg), lib.t["lr"], runs[0]["n"], list(log.buf)))
    return trace


def test_user_dict_list_string_and_chainmap_values_are_put_back():
    """UserDict/UserList/UserString/ChainMap were left out as "not a restorable kind" with a debug line
    only: a relaunch counted metrics and history from zero, and said nothing. Now they are followed in
    place like argparse namespaces (their ``data``/``maps``): the ChainMap's first layer, which a library
    object also holds, is refilled in place."""
    cap = _resumes_like_a_plain_run(_user_collections_loop, _nth_call(4))
    assert not [k for k in cap.skipped if k.split(" ")[0] in ("metrics", "history", "tag", "cfg", "runs", "log")], \
        cap.skipped


def _make_counter_step(warmup):
    """A train-step factory: its counters live in the closure's cells, not in any frame on the stack."""
    calls, hist = 0, []
    scale = {"lr": 0.0}

    def step(x):
        nonlocal calls
        calls += 1
        scale["lr"] = min(1.0, calls / warmup)
        hist.append(x * scale["lr"])
        return calls, list(hist)

    return step


class _StepHolder:  # a script object keeping a closure as an attribute
    def __init__(self):
        self.fn = _make_counter_step(4)


def _closure_loop(hook, trace):
    step_fn, holder = _make_counter_step(3), _StepHolder()
    for i in range(6):
        hook(sys._getframe())
        trace.append((step_fn(i), holder.fn(10 * i)))
    return trace


def test_counters_in_a_closures_cells_are_put_back():
    """A train step made by a factory keeps its warmup counter and history in the closure's cells
    (``nonlocal calls``): functions were skipped, so a relaunch started its warmup over, said by nothing.
    Now the cells of the script's functions held by variables and attributes are saved and written back
    into the live function's cells."""
    cap = _resumes_like_a_plain_run(_closure_loop, _nth_call(4))
    assert not [k for k in cap.skipped if k.split(" ")[0] in ("step_fn", "holder")], cap.skipped


def _make_other_step(warmup):
    calls = 0

    def other(x):
        nonlocal calls
        calls += 1
        return calls, [x]

    return other


def test_a_closure_where_the_relaunch_holds_another_function_is_said_not_restored():
    """The variable holds another function at the relaunch's restore point (a phase picked its own step):
    the checkpoint's cells cannot go into it; one line says so instead of writing them anywhere."""
    factories = iter([_make_counter_step, _make_other_step])

    def run(hook):
        step_fn = next(factories)(3)
        out = []
        for i in range(4):
            hook(sys._getframe())
            out.append(step_fn(i))
        return out

    _, plan, out = _capture_and_resume(run, _nth_call(3))
    assert plan.warnings == ["step_fn is the function _make_other_step.<locals>.other now, the checkpoint holds "
                             "'_make_counter_step.<locals>.step' there: its closure's values are not restored"]
    assert out[-2:] == [(1, [2]), (2, [3])]  # the live function's own count from the restore point, untouched


def _make_ema_step(seed):
    torch.manual_seed(seed)
    ema = torch.nn.Linear(2, 2)  # a module no optimizer owns, held only by the closure

    def step():
        with torch.no_grad():
            ema.weight.mul_(0.5)

    return step


def _tracked_relaunch(run, first_args, second_args, capture_when=lambda frame: True,
                      on_restore=lambda frame: None):
    """``run(hook, *first_args)`` captured at its first hook call where ``capture_when``; then the relaunch
    ``run(hook, *second_args)`` restored at its first hook call as ``PYCKPT_RESUME_EDITED=tracked`` does
    (``prepare_references``). Returns (the first run's result, the relaunch's, the plan)."""
    saved, after = {}, {}

    def cap(frame):
        if "c" not in saved and capture_when(frame):
            c = loopstate.capture([frame], "step", 1 << 20, [])
            saved["c"], saved["s"] = c, through_format(c.states)  # (states refer to the live tensors)

    first = run(harness_hook(cap), *first_args)
    tree_, states = through_format(saved["c"].tree), saved["s"]

    def res(frame):
        if not after:
            after["plan"] = loopstate.prepare_references(tree_, [frame], states)
            after["plan"].apply()
            on_restore(frame)

    second = run(harness_hook(res), *second_args)
    return first, second, after["plan"]


def test_an_edited_scripts_tracked_resume_finds_an_ema_held_by_a_closure():
    """PYCKPT_RESUME_EDITED=tracked loads modules no optimizer owns into the module held at the same place;
    one held by a closure's cell (``step_fn.<cell>ema``) was looked for among the function's attributes,
    and said not restored."""
    def run(hook, seed):
        step_fn = _make_ema_step(seed)
        for i in range(3):
            step_fn()
            hook(sys._getframe())
        return step_fn

    at_restore = {}
    first, _, plan = _tracked_relaunch(run, (0,), (1,), on_restore=lambda frame: at_restore.update(
        w=frame.f_locals["step_fn"].__closure__[0].cell_contents.weight.clone()))
    assert plan.warnings == []
    assert torch.equal(at_restore["w"], first.__closure__[0].cell_contents.weight * 4)  # the weights after step 1


def test_an_edited_scripts_tracked_resume_finds_an_ema_held_by_a_local_of_a_nested_function():
    """The frames of an edited script are matched by function: the checkpoint names each by its qualified
    name (``...<locals>.run``, ``Trainer.fit``), and the comparison took the bare name, so an EMA copy held by
    a local of a method or a nested function was said "not there" and not restored."""
    def run(hook, seed):
        torch.manual_seed(seed)
        ema = torch.nn.Linear(2, 2)
        for i in range(3):
            with torch.no_grad():
                ema.weight.mul_(0.5)
            hook(sys._getframe())
        return ema

    first, second, plan = _tracked_relaunch(run, (0,), (1,))
    assert plan.warnings == []
    assert torch.equal(second.weight, first.weight)  # the checkpoint's (after 1), then two more halvings each


class _EditedTrainer:
    def fit(self, hook, seed, best):
        step, history = 0, []
        stats, metrics = Stats(), collections.UserDict(loss=0.0)  # objects the loop changes in place
        for epoch in range(2):
            for b in range(3):
                step += 1
                history.append(step * seed)
                stats.seen += 1
                metrics["loss"] += 0.5
                if step == 2:
                    best = float(step)
                hook(sys._getframe())
        return step, history, best, stats.seen, metrics["loss"]


def test_an_edited_scripts_tracked_resume_puts_back_the_variables_its_loop_carries_by_name():
    """PYCKPT_RESUME_EDITED=tracked put back none of the script's variables: the step counter, history and
    metrics of a loop (here in a method, its frame matched by qualified name) started over. The variables
    the running loops assign or change in place are put back by name now (the attributes of the objects
    they hold too); one the relaunch holds as another kind is named and keeps its value."""
    first, second, plan = _tracked_relaunch(_EditedTrainer().fit, (1, None), (1, "none yet"),
                                            capture_when=lambda frame: frame.f_locals["step"] == 4)
    assert first == (6, [1, 2, 3, 4, 5, 6], 2.0, 6, 3.0)
    # restored at the relaunch's first step (its 1 overwritten by the checkpoint's 4), the loop's position its own
    # (5 iterations left): 9 steps, the history the checkpoint's and then the relaunch's steps 5 to 9
    assert second == (9, list(range(1, 10)), "none yet", 9, 4.5)
    assert sorted(plan.carried) == ["history (in fit)", "metrics", "stats", "step (in fit)"]
    assert len(plan.warnings) == 1
    assert "best (in fit) (a str now, the checkpoint holds a float)" in plan.warnings[0]


def _epoch_loop(hook, batches):
    seen = ["start"]
    for epoch in range(2):
        for b in range(batches):
            last = b * 10
            seen.append(b)
            hook(sys._getframe(), "batch")
        hook(sys._getframe(), "end")
        seen.append(("end", epoch, last))
    return seen


def test_a_variable_only_the_loop_body_sets_is_bound_for_an_epoch_run_without_data():
    """The per-epoch code of an epoch a resume runs again without data read ``last``, which only the loop
    body sets: UnboundLocalError before the restore point. ``bind_unset`` binds it to the checkpoint's value
    and leaves bound variables (``seen``) alone."""
    saved = {}

    def cap(frame, where):
        if where == "batch" and frame.f_locals["epoch"] == 1 and frame.f_locals["b"] == 1 and not saved:
            saved["t"] = through_format(loopstate.capture([frame], "step", 1 << 20, []).tree)

    _epoch_loop(harness_hook(cap), 3)
    names = []

    def at_end(frame, where):
        if where == "end" and not names:
            names.extend(loopstate.bind_unset(saved["t"], [frame]))

    assert _epoch_loop(at_end, 0) == ["start", ("end", 0, 10), ("end", 1, 10)]  # the checkpoint's last = 10
    assert sorted(names) == ["b (in _epoch_loop)", "last (in _epoch_loop)"]  # (the loop variable is one too)


class _ArrayLogger:  # a script object holding the loop's array
    def __init__(self, buf):
        self.buf = buf


def _shared_array_loop(hook, trace):
    import numpy as np

    hist = np.zeros(6)
    log, lib = _ArrayLogger(hist), Holder(hist)  # Holder: a library object the script handed it to
    for i in range(6):
        hook(sys._getframe())
        hist[i] = i * 1.5
        trace.append((hist.tolist(), log.buf.tolist(), lib.t.tolist(), log.buf is hist))
    return trace


def test_a_numpy_array_is_written_back_into_the_live_one_so_what_shares_it_sees_it():
    """Arrays were bound anew: the script object's reference got a copy of its own and the library
    object's kept the relaunch's zeros, while the loop wrote into the variable's; both went on
    silently apart from an uninterrupted run. Now a whole array is written into the live one in place
    (as a tensor is), and references to one array in the checkpoint stay one array."""
    _resumes_like_a_plain_run(_shared_array_loop, _nth_call(3))


def _shared_items_loop(hook, trace):
    import numpy as np

    bufs = {"t": torch.zeros(4), "a": np.zeros(4), "nested": {"rows": [torch.zeros(2)]}}
    rows = [torch.zeros(4)]
    held = [Holder(bufs["t"]), Holder(bufs["a"]), Holder(rows[0]), Holder(bufs["nested"]["rows"]),
            Holder(bufs["nested"]["rows"][0])]
    for i in range(4):
        hook(sys._getframe())
        bufs["t"][i] = i + 1.0
        bufs["a"][i] = i + 2.0
        rows[0][i] = i + 3.0
        bufs["nested"]["rows"][0][i % 2] += 1.0
        trace.append([h.t.tolist() if hasattr(h.t, "tolist") else [r.tolist() for r in h.t] for h in held])
    return trace


def test_tensors_and_arrays_inside_a_restored_container_are_written_into_the_live_ones():
    """A dict or list the script refills is refilled item by item: a tensor or array in it that a library
    object also holds got the checkpoint's value only in the container (a new object there), and the
    library object kept the relaunch's zeros, silently."""
    _resumes_like_a_plain_run(_shared_items_loop, _nth_call(3))


def _phases_loop(hook, trace, phases=None):
    phases = phases if phases is not None else {"warmup": 0.5, "main": 2.0, "anneal": 0.25}
    acc = 0.0
    for phase, scale in phases.items():
        for k in range(3):
            hook(sys._getframe())
            acc = acc * scale + k
            trace.append((phase, k, acc))
    return trace


@pytest.mark.parametrize("view", ["items", "keys", "values"])
def test_a_loop_over_a_dict_is_positioned_not_warned_about(view):
    """``for phase, lr in phases.items()`` (training phases): the dict iterator's position was "cannot be
    restored" (a warning on every snapshot) though the relaunch, replaying to the restore point, was often
    at it anyway; now it is saved (the items left) and put back, the keys left checked."""
    def run(hook, trace):
        phases = {"warmup": 0.5, "main": 2.0, "anneal": 0.25}
        acc = 0.0
        it = {"items": phases.items, "keys": phases.keys, "values": phases.values}[view]
        for entry in it():
            for k in range(3):
                hook(sys._getframe())
                acc = acc * (phases[entry[0]] if view == "items" else phases[entry] if view == "keys" else entry) + k
                trace.append((entry, k, acc))
        return trace

    _resumes_like_a_plain_run(run, _nth_call(5))


def test_a_loop_over_a_dict_with_other_keys_now_is_refused_before_anything_is_written():
    error = _prepare_error(lambda hook: _phases_loop(hook, []),  # the phase after the saved one differs below
                           lambda hook: _phases_loop(hook, [], {"warmup": 0.5, "main": 2.0, "cooldown": 0.25}),
                           _nth_call(5))
    assert error and "iterates a dict with other keys left" in error, error


def test_a_dict_loop_that_would_skip_to_an_item_holding_objects_is_refused():
    """``for name, (net, opt) in models.items()`` reached its restore point at an earlier item than the
    checkpoint's: going on from the checkpoint's item would keep this run's ``net`` (modules are not put
    back through the variable), so the resume is refused rather than training the wrong model."""
    class Box:  # a value the loop state does not put back through the variable
        __module__ = "somelib"

    def run(hook, trace):
        models = {"a": Box(), "b": Box(), "c": Box()}
        for name, box in models.items():
            for k in range(2):
                hook(sys._getframe())
                trace.append((name, k))
        return trace

    error = _prepare_error(lambda hook: run(hook, []), lambda hook: run(hook, []), _nth_call(3))  # in item "b"
    assert error and "is not one pyckpt puts back" in error, error


@pytest.mark.parametrize("kind", ["map", "filter", "starmap"])
def test_a_loop_over_map_filter_or_starmap_is_positioned_through_what_it_wraps(kind):
    """``for x, y in map(to_device, loader)`` and the like: stateless wrappers around the iterators they
    were given; they were said to be inexact at every snapshot (the DataLoader inside was positioned
    anyway). Now the iterators inside are positioned, a list iterator's too."""
    def run(hook, trace):
        data = [3, 1, 4, 1, 5, 9, 2, 6]
        it = {"map": lambda: map(lambda a, b: a * b, data, range(100, 108)),
              "filter": lambda: filter(lambda a: a != 1, data),
              "starmap": lambda: itertools.starmap(lambda a, b: a - b, zip(data, reversed(data)))}[kind]()
        total = 0
        for v in it:
            hook(sys._getframe())
            total += v
            trace.append((v, total))
        return trace

    _resumes_like_a_plain_run(run, _nth_call(4))


class RunningCount:
    """A forward pre-hook of the script's class keeping a count (only the layer's hook dict holds it)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, module, args):
        self.calls += 1


def hooked_loop(hook, model):
    for _ in range(3):
        model(torch.ones(1, 2))
        hook(sys._getframe())


def test_a_hook_only_torch_holds_is_restored_and_one_the_relaunch_lacks_is_said_not_refused():
    model = torch.nn.Linear(2, 2)
    model.register_forward_pre_hook(RunningCount())
    saved = {}

    def cap(frame):
        if "tree" not in saved and next(iter(model._forward_pre_hooks.values())).calls == 2:
            c = loopstate.capture([frame], "step", 1 << 20, [model])
            saved["tree"], saved["states"] = through_format(c.tree), c.states
    hooked_loop(harness_hook(cap), model)
    # (this module's test functions carrying pytest's marks are followed too: ["g", ...] paths)
    assert [o["at"] for o in saved["tree"]["objects"] if o["at"][0] != "g"] == [["mh", 0, "", "_forward_pre_hooks", 0]]
    plans = []

    def res(frame):
        if not plans:
            model_now = frame.f_locals["model"]
            plans.append(loopstate.prepare(saved["tree"], [frame], "step", saved["states"], modules=[model_now]))
    fresh = torch.nn.Linear(2, 2)
    live = RunningCount()
    fresh.register_forward_pre_hook(live)
    hooked_loop(harness_hook(res), fresh)
    plans[0].apply()
    assert live.calls == 2 and not plans[0].warnings  # (the relaunch's count was 1 at its first hook call)
    # A relaunch that has not registered that hook (yet): one line says so; the rest is restored.
    plans.clear()
    hooked_loop(harness_hook(res), torch.nn.Linear(2, 2))
    assert any("the hook model[0] _forward_pre_hooks[0] does not exist" in w for w in plans[0].warnings)


def counting_schedule(halve_every):
    """A LambdaLR factor counting its calls in a ``nonlocal`` (its state_dict() keeps no closure's cells)."""
    calls = 0

    def factor(_epoch):
        nonlocal calls
        calls += 1
        return 0.5 ** (calls // halve_every)
    return factor


def scheduled_loop(hook, sched):
    for _ in range(3):
        sched.optimizer.step()
        sched.step()
        hook(sys._getframe())


def test_a_lambda_schedulers_closure_is_restored():
    def make():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return torch.optim.lr_scheduler.LambdaLR(opt, counting_schedule(2))
    sched, saved = make(), {}

    def cap(frame):
        if "tree" not in saved and frame.f_locals["sched"].last_epoch == 2:
            c = loopstate.capture([frame], "step", 1 << 20, [], optimizers=[sched.optimizer], schedulers=[sched])
            saved["tree"], saved["states"] = through_format(c.tree), c.states
    scheduled_loop(harness_hook(cap), sched)
    assert [o["at"] for o in saved["tree"]["objects"] if o["at"][0] != "g"] == [["sh", 0, "lr_lambdas", 0]]
    fresh, plans = make(), []

    def res(frame):
        if not plans:
            plans.append(loopstate.prepare(saved["tree"], [frame], "step", saved["states"], modules=[],
                                           optimizers=[fresh.optimizer], schedulers=[fresh]))
    scheduled_loop(harness_hook(res), fresh)
    plans[0].apply()
    cells = dict(zip(fresh.lr_lambdas[0].__code__.co_freevars, fresh.lr_lambdas[0].__closure__))
    assert cells["calls"].cell_contents == 3 and not plans[0].warnings  # (the relaunch's was 2 at its first step)


def test_a_malformed_object_path_is_a_clear_error_not_a_crash():
    saved = {}

    def cap(frame):
        if "tree" not in saved:
            saved["tree"] = through_format(loopstate.capture([frame], "step", 1 << 20, []).tree)
    hooked_loop(harness_hook(cap), torch.nn.Linear(2, 2))
    for bad in ([], None, 7, ["mh"]):
        tree = dict(saved["tree"], objects=[{"at": bad, "type": "RunningCount", "attrs": {}}])
        errors = []

        def res(frame, tree=tree):
            if not errors:
                try:
                    loopstate.prepare(tree, [frame], "step", None, modules=[])
                    errors.append(None)
                except PyckptError as e:
                    errors.append(str(e))
        hooked_loop(harness_hook(res), torch.nn.Linear(2, 2))
        assert errors[0] and "malformed" in errors[0], (bad, errors)


def test_an_itertools_cycle_is_kept_by_its_items_and_place_and_rebuilt_to_go_on_identically():
    from torch.utils.data import DataLoader

    loader = DataLoader(list(range(6)), batch_size=2)
    c = itertools.cycle(loader)
    first = [next(c).tolist() for _ in range(2)]  # its first pass, over the loader
    items, phase, index = loopstate._cycle_state(c)
    assert (phase, index, [x.tolist() for x in items]) == (1, 0, first)
    for _ in range(3):
        next(c)  # the loader's last batch, then replaying the first two: the next is its third kept batch
    items, phase, index = loopstate._cycle_state(c)
    assert (phase, index) == (2, 2)
    rebuilt = loopstate._Cycle(phase, items, index).bind(None)
    assert [next(rebuilt).tolist() for _ in range(7)] == [next(c).tolist() for _ in range(7)]
    # A cycle over a list (as a rebuilt one is, in its first pass) is kept as its whole list and place.
    again = loopstate._cycle_state(itertools.cycle([1, 2, 3]))
    assert again == ([1, 2, 3], 2, 0)
    assert loopstate._cycle_state(itertools.cycle(x for x in range(3))) is None  # a generator's: not kept
    # Malformed entries are refused as such.
    dec = loopstate._Decoder([], {})
    for bad in (["cy", 3, [], 0], ["cy", 2, [["v", 1]], 1], ["cy", 2, [["v", 1]], -1], ["cy", 1, "x", 0]):
        with pytest.raises(PyckptError, match="malformed"):
            dec.value(bad)


def _reached_script_modules(tmp_path, monkeypatch) -> tuple[types.ModuleType, types.ModuleType]:
    """Two modules of a script (files outside any installed package): ``reached_settings`` holds settings, and
    ``reached_helper`` imports it and changes them when its ``bump()`` is called."""
    (tmp_path / "reached_settings.py").write_text("import threading\nSCALE = 1.0\nLOG = []\nLOCK = threading.Lock()\n")
    (tmp_path / "reached_helper.py").write_text(
        "import reached_settings\ncalls = 0\n\n\ndef bump():\n    global calls\n    calls += 1\n"
        "    reached_settings.SCALE *= 0.5\n    reached_settings.LOG.append(calls)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("reached_settings", "reached_helper"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    helper = importlib.import_module("reached_helper")
    return helper, sys.modules["reached_settings"]


def _stepping_code(helper: types.ModuleType) -> dict:
    """The running script's module: it reaches ``reached_helper`` only through ``from reached_helper import
    bump``, and ``reached_settings`` only through ``reached_helper``."""
    ns = {"__name__": "reach_script", "bump": helper.bump}
    exec("import sys\n\ndef step(hook):\n    bump()\n    hook(sys._getframe())\n", ns)
    return ns


def test_settings_in_script_modules_reached_from_the_stack_are_kept_and_put_back(tmp_path, monkeypatch):
    helper, settings = _reached_script_modules(tmp_path, monkeypatch)
    ns, saved = _stepping_code(helper), {}

    def capture(frame):
        cap = loopstate.capture([frame], "step", 1 << 20, [])
        saved["tree"], saved["warnings"], saved["skipped"] = through_format(cap.tree), cap.warnings, cap.skipped

    for _ in range(3):
        ns["step"](lambda f: None)
    ns["step"](capture)
    # (not sys, torch or pyckpt)
    assert sorted(name for name, _ in saved["tree"]["reached"]) == ["reached_helper", "reached_settings"]
    # The lock cannot be stored: left out as before these modules were kept, without a warning line.
    assert not saved["warnings"] and "reached_settings.LOCK" in saved["skipped"], saved
    helper.calls, settings.SCALE, settings.LOG = 0, 1.0, []  # a relaunch: the modules as imported
    ns["step"](lambda f: loopstate.prepare(saved["tree"], [f], "step").apply())
    assert (helper.calls, settings.SCALE, settings.LOG) == (4, 1 / 16, [1, 2, 3, 4])


def _checkpoint_after(ns: dict, helper: types.ModuleType, n: int) -> dict:
    """``step`` run n times; the loop state captured at the n-th (``calls == n``), through the format."""
    saved = {}

    def capture(frame):
        if helper.calls == n:
            saved["tree"] = through_format(loopstate.capture([frame], "step", 1 << 20, []).tree)

    for _ in range(n):
        ns["step"](capture)
    return saved["tree"]


def test_a_reached_module_the_relaunch_has_not_imported_is_said_not_refused(tmp_path, monkeypatch):
    helper, settings = _reached_script_modules(tmp_path, monkeypatch)
    ns, saved, got = _stepping_code(helper), {}, {}
    saved["tree"] = _checkpoint_after(ns, helper, 3)
    helper.calls = 0
    monkeypatch.delitem(sys.modules, "reached_settings")  # imported later in the relaunch (a lazy import)

    def restore(frame):
        got["plan"] = plan = loopstate.prepare(saved["tree"], [frame], "step")
        plan.apply()

    ns["step"](restore)
    said = [w for w in got["plan"].warnings if "reached_settings" in w]
    assert len(said) == 1 and "has not imported by the restore point" in said[0], got["plan"].warnings
    assert helper.calls == 3  # the module it has is put back


def test_a_reached_module_edited_before_the_relaunch_keeps_its_new_values_and_is_said(tmp_path, monkeypatch):
    helper, settings = _reached_script_modules(tmp_path, monkeypatch)
    ns, got = _stepping_code(helper), {}
    saved = _checkpoint_after(ns, helper, 3)
    path = tmp_path / "reached_settings.py"
    path.write_text(path.read_text().replace("SCALE = 1.0", "SCALE = 2.0  # was 1.0"))  # the user changes it
    helper.calls, settings.SCALE, settings.LOG = 0, 2.0, []  # the relaunch imports the edited module

    def restore(frame):
        got["plan"] = plan = loopstate.prepare(saved, [frame], "step")
        plan.apply()

    ns["step"](restore)
    said = [w for w in got["plan"].warnings if "reached_settings" in w]
    assert len(said) == 1 and "not the text the checkpoint was written with" in said[0], got["plan"].warnings
    assert (settings.SCALE, settings.LOG) == (1.0, [1])  # the relaunch's own (its bump() ran once)
    assert helper.calls == 3  # the module not edited is put back


def test_a_container_over_the_cap_by_its_length_alone_is_left_out_before_its_elements_are_walked():
    """Each element counts 16 bytes at least: 100 elements are over a 1,000-byte cap before the first (a lock,
    which cannot be stored) is looked at, so the reason given is the size."""
    import threading

    items = [threading.Lock()] + [None] * 99
    few = [None] * 10

    def probe():
        return loopstate.capture([sys._getframe(1)], "step", 1000, [])

    cap = probe()
    reasons = {**cap.skipped, **cap.warnings}
    why = reasons[next(k for k in reasons if k.startswith("items "))]
    assert why.startswith("over PYCKPT_LOOP_STATE_MAX_BYTES=1000"), why
    assert cap.tree["locals"][0]["few"] == ["l", [["v", None]] * 10]


class Annealed:
    """Values a script keeps on a class: a data attribute the loop changes; its method, property, static
    method and nested class are code."""

    temperature = 1.0
    seen: list = []

    def method(self):
        return 1

    @property
    def prop(self):
        return 2

    @staticmethod
    def helper():
        return 3

    class Nested:
        pass


class Color(enum.Enum):  # an enum's members are class attributes, never written
    RED = 1


def counted():
    counted.calls = getattr(counted, "calls", 0) + 1
    return counted.calls


def remembered(x, recent=[], table={}, scale=2):  # noqa: B006 - mutable defaults keeping state, on purpose
    recent.append(x)
    table[x] = len(recent)
    return x * scale


def code_state_loop(hook, trace):
    for i in range(6):
        counted()
        remembered(i)
        Annealed.temperature *= 0.5
        Annealed.seen.append(i)
        hook(sys._getframe())
        trace.append((counted.calls, list(remembered.__defaults__[0]), Annealed.temperature, Color.RED.value))
    return trace


def _reset_code_state():
    counted.calls = 0
    remembered.__defaults__[0].clear()
    remembered.__defaults__[1].clear()
    Annealed.temperature, Annealed.seen = 1.0, []


def test_values_kept_on_the_scripts_classes_and_functions_are_restored():
    _reset_code_state()
    plain = code_state_loop(lambda f: None, [])
    _reset_code_state()
    saved = {}

    def capture(frame):
        if counted.calls == 3:
            cap = loopstate.capture([frame], "step", 1 << 20, [])
            saved["tree"], saved["warnings"] = through_format(cap.tree), cap.warnings
    code_state_loop(capture, [])
    objects = {o["at"][2]: sorted(o["attrs"]) for o in saved["tree"]["objects"] if o["at"][:1] == ["g"]}
    assert objects["Annealed"] == ["seen", "temperature"]  # not its method, property, static method, class
    assert objects["counted"] == ["calls"] and objects["remembered"] == ["<default>0", "<default>1"]
    assert "Color" not in objects and not saved["warnings"], saved["warnings"]
    _reset_code_state()
    done = []

    def restore(frame):
        if not done:
            done.append(1)
            loopstate.prepare(saved["tree"], [frame], "step").apply()
    resumed = code_state_loop(restore, [])
    assert resumed == plain and (Annealed.seen, remembered.__defaults__[1]) == (
        [0, 1, 2, 3, 4, 5], {k: k + 1 for k in range(6)})


class LaterAnnealed:  # gains its first data attribute after a capture looked at it
    def method(self):
        return 1


def later_counted():
    return 1


def test_a_class_or_function_that_gains_values_after_a_capture_is_followed_at_the_next():
    """What was worked out about a class or function (``_stateful_code``) is worked out again when its number of
    attributes changes: one that had no values at the first snapshot and has one later is followed then."""
    def probe():
        tree = loopstate.capture([sys._getframe(1)], "step", 1 << 20, []).tree
        return {o["at"][2] for o in tree["objects"] if o["at"][:1] == ["g"]}

    assert not {"LaterAnnealed", "later_counted"} & probe()
    LaterAnnealed.temperature, later_counted.calls = 0.5, 3
    try:
        assert {"LaterAnnealed", "later_counted"} <= probe()
    finally:
        del LaterAnnealed.temperature, later_counted.calls


def test_a_module_bound_after_a_capture_is_reached_at_the_next(tmp_path, monkeypatch):
    helper, _ = _reached_script_modules(tmp_path, monkeypatch)
    ns = {"__name__": "reach_later"}
    exec("import sys\n\ndef step(hook):\n    hook(sys._getframe())\n", ns)
    got = []
    ns["step"](lambda f: got.append(loopstate.capture([f], "step", 1 << 20, []).tree.get("reached")))
    ns["bump"] = helper.bump  # a lazy import binds a name in the running module
    ns["step"](lambda f: got.append(loopstate.capture([f], "step", 1 << 20, []).tree.get("reached")))
    assert got[0] is None and sorted(n for n, _ in got[1]) == ["reached_helper", "reached_settings"]


def test_strings_in_a_list_or_dict_count_toward_the_cap_and_depth_is_bounded():
    """The scalars of a container count their size (20 strings of ~150 bytes: over a 1,000-byte cap, though not by
    their number alone), in a list and in a dict; a value nested 33 deep is left out as nested too deeply, 32 deep is kept."""
    names = [f"{i:0100d}" for i in range(20)]
    table = {i: f"{i:0100d}" for i in range(20)}
    small = ["a", "b"]
    deep: list = [1]  # 33 lists, one in another: the number in the innermost is 33 deep
    for _ in range(32):
        deep = [deep]
    shallow: list = [1]  # 32: kept
    for _ in range(31):
        shallow = [shallow]

    def probe(max_bytes):
        cap = loopstate.capture([sys._getframe(1)], "step", max_bytes, [])
        return cap, {**cap.skipped, **cap.warnings}, cap.tree["locals"][0]

    cap, reasons, kept = probe(1000)
    for name in ("names", "table"):
        why = reasons[next(k for k in reasons if k.startswith(f"{name} "))]
        assert why.startswith("over PYCKPT_LOOP_STATE_MAX_BYTES=1000"), why
    assert kept["small"] == ["l", [["v", "a"], ["v", "b"]]]
    assert not any(k.startswith(("names", "table")) for k in kept)
    cap, reasons, kept = probe(1 << 20)
    assert "nested too deeply" in reasons[next(k for k in reasons if k.startswith("deep "))]
    assert {"names", "table", "shallow"} <= set(kept) and "deep" not in kept
    assert kept["table"][1][3] == [["v", 3], ["v", f"{3:0100d}"]]
