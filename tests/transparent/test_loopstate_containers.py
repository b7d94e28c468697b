"""Random generators held inside a script's containers (pyckpt/loopstate.py): a dict or list variable
of the script holding a ``torch.Generator``, ``random.Random`` or NumPy generator gets each one's state
put back into the live object at the same place, at any depth, and the resumed run draws what an
uninterrupted one draws."""
from __future__ import annotations

import random
import signal
import sys

import numpy as np
import torch

from pyckpt import loopstate, tree

import zygote
from transparent_helpers import clean_env, run_script


def through_format(t: dict) -> dict:
    """Encode and decode as a checkpoint would (no pickle; tensors by reference)."""
    enc, tensors, _ = tree.flatten(t)
    return tree.unflatten(enc, lambda i, into, path: tensors[i].clone())


def rng_loop(hook, trace: list) -> list:
    gens = {"noise": torch.Generator().manual_seed(5), "more": {"py": [random.Random(7)]}}
    pair = (torch.Generator().manual_seed(9), random.Random(3))  # a tuple: only its items can be set
    nps = [np.random.default_rng(1), np.random.RandomState(2)]
    lazy: dict = {}  # filled inside the loop: empty at a relaunch's restore point
    alias = gens["noise"]  # another reference to the same generator
    for step in range(6):
        hook(sys._getframe())
        lazy.setdefault("r", random.Random(11))
        trace.append((step, torch.rand(2, generator=alias).tolist(), gens["more"]["py"][0].random(),
                      torch.rand(1, generator=pair[0]).item(), pair[1].random(), float(nps[0].random()),
                      float(nps[1].random_sample()), lazy["r"].random()))
    return trace


def _held(loc: dict) -> list[int]:
    """The ids of the generator objects the loop's containers hold."""
    return [id(x) for x in (loc["gens"]["noise"], loc["gens"]["more"]["py"][0], *loc["pair"], *loc["nps"])]


def test_generators_in_containers_are_restored_in_place_at_any_depth():
    plain = rng_loop(lambda f: None, [])
    saved: dict = {}

    def capture(frame):
        if "tree" not in saved and len(calls) == 3:
            cap = loopstate.capture([frame], "step", 1 << 20, [])
            assert not cap.warnings, cap.warnings
            saved["tree"] = through_format(cap.tree)
        calls.append(1)

    calls: list = []
    assert rng_loop(capture, []) == plain

    seen: dict = {}

    def restore(frame):
        if not seen:
            before, pair = _held(frame.f_locals), frame.f_locals["pair"]
            loopstate.prepare(saved["tree"], [frame], "step").apply()
            loc = frame.f_locals
            seen.update(before=before, after=_held(loc), pair=loc["pair"] is pair,
                        alias=loc["alias"] is loc["gens"]["noise"])

    relaunch = rng_loop(restore, [])
    assert relaunch == plain  # every generator continues where the original run's was
    assert seen["after"] == seen["before"]  # the very objects the script held, not copies
    assert seen["alias"] and seen["pair"]  # a tuple whose generators were set in place is kept too


def made_in_loop(hook, trace: list) -> list:
    rng = None
    for step in range(6):
        hook(sys._getframe())
        if rng is None:  # made at the first iteration: None at a relaunch's restore point
            rng = torch.Generator().manual_seed(3)
        trace.append(torch.rand(2, generator=rng).tolist())
    return trace


def test_generator_variable_made_inside_the_loop_is_made_again_with_its_state():
    plain = made_in_loop(lambda f: None, [])
    saved: dict = {}
    calls: list = []

    def capture(frame):
        calls.append(1)
        if len(calls) == 4:
            saved["tree"] = through_format(loopstate.capture([frame], "step", 1 << 20, []).tree)

    made_in_loop(capture, [])
    done: list = []

    def restore(frame):
        if not done:
            done.append(1)
            loopstate.prepare(saved["tree"], [frame], "step").apply()

    assert made_in_loop(restore, []) == plain


SCRIPT = '''
import os, random, signal, sys
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(0)
loader = DataLoader(TensorDataset(torch.randn(24, 4), torch.randn(24, 1)), batch_size=4, shuffle=True)
gens = {"noise": torch.Generator().manual_seed(7)}
rngs = [random.Random(3)]
model = nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
step = 0
for epoch in range(2):
    for x, y in loader:
        x = x + 0.1 * torch.randn(x.shape, generator=gens["noise"]) + rngs[0].random()
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        step += 1
        mark = os.environ.get("KILL_MARK")
        if step == 8 and mark and not os.path.exists(mark):
            open(mark, "w").close(); os.kill(os.getpid(), signal.SIGKILL)
torch.save({"model": model.state_dict(), "draw": torch.rand(1, generator=gens["noise"]),
            "py": rngs[0].random()}, sys.argv[1])
'''


def test_sigkill_then_relaunch_with_generators_in_containers_equals_uninterrupted(tmp_path):
    (tmp_path / "main.py").write_text(SCRIPT)
    # Without pyckpt, forked from the session's zygote (torch already imported): the same as a plain run.
    plain = zygote.shared().run_path(tmp_path / "main.py", [tmp_path / "plain.pt"], env=clean_env(), cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    env = dict(PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="3", KILL_MARK=tmp_path / "mark")
    first = run_script(["main.py", tmp_path / "run.pt"], tmp_path, **env)
    assert first.returncode == -signal.SIGKILL, first.stderr
    second = run_script(["main.py", tmp_path / "run.pt"], tmp_path, **env)
    assert second.returncode == 0, second.stderr
    assert "pyckpt: resumed from step 6 " in second.stderr or "resumed from step 3 " in second.stderr, second.stderr
    a = torch.load(tmp_path / "plain.pt", weights_only=True)
    b = torch.load(tmp_path / "run.pt", weights_only=True)
    assert a["py"] == b["py"] and torch.equal(a["draw"], b["draw"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
