"""Loop state held in values of the script's own classes other than plain ``__dict__`` objects
(pyckpt/loopstate.py, ``_Encoder.struct``): a slots dataclass, a frozen dataclass and a NamedTuple
rebound at every step, a ``__slots__`` class, an ``AttrDict(dict)``, plain objects, an enum and a
namedtuple inside a dict. Each is put back through the live value at the same place (nothing is
made from a class name in the checkpoint): a SIGKILLed and relaunched run ends bitwise equal to an
uninterrupted one. A kind that still cannot be restored is named in a warning line."""
from __future__ import annotations

import signal
import sys
import typing
from pathlib import Path

import pytest
import torch

from pyckpt import loopstate, tree
from pyckpt.errors import PyckptError

import zygote
from transparent_helpers import harness_hook, clean_env, load, run_script, tree_equal

SCRIPT = Path(__file__).parent / "loopstate_kinds_script.py"


@pytest.mark.parametrize("kind", ["slots_dc", "frozen", "nt", "slots", "attrdict", "containers"])
def test_sigkill_then_relaunch_restores_the_kind_exactly(tmp_path, kind):
    plain = zygote.shared().run_path(SCRIPT, [tmp_path / "plain.pt"], env=clean_env(KIND=kind), cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    env = dict(KIND=kind, PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="4", KILL_AT="14",
               KILL_MARK=tmp_path / "mark")
    first = run_script([SCRIPT, tmp_path / "run.pt"], tmp_path, **env)
    assert first.returncode == -signal.SIGKILL, first.stderr
    second = run_script([SCRIPT, tmp_path / "run.pt"], tmp_path, **env)
    assert second.returncode == 0, second.stderr
    assert "pyckpt: resumed from step 12 " in second.stderr or "resumed from step 8 " in second.stderr, second.stderr
    # Captured and put back without a word: nothing about these kinds is inexact.
    assert "warning" not in first.stderr + second.stderr, first.stderr + second.stderr
    a, b = load(tmp_path / "plain.pt"), load(tmp_path / "run.pt")
    assert a["state"] == b["state"], (a["state"], b["state"])
    assert tree_equal(a["model"], b["model"])


def test_unrestorable_script_kind_is_named_in_a_warning_line(tmp_path):
    """A script subclass of list (its items are loop state pyckpt cannot put back) is said, by name."""
    r = run_script([SCRIPT, tmp_path / "run.pt"], tmp_path, KIND="listsub", PYCKPT_DIR=tmp_path / "ck",
                   PYCKPT_EVERY_STEPS="4")
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("pyckpt: warning:")]
    assert any("st (in main)" in x and "History" in x for x in lines), r.stderr


# ----------------------------------------------------------------------------- in-process: restore checks

class Rec(typing.NamedTuple):
    step: int = 0
    best: float = 0.0


class Other(typing.NamedTuple):
    step: int = 0
    best: float = 0.0


def through_format(t: dict) -> dict:
    enc, tensors, _ = tree.flatten(t)
    return tree.unflatten(enc, lambda i, into, path: tensors[i].clone())


def rec_loop(hook, start):
    rec = start
    for step in range(4):
        hook(sys._getframe())
        rec = rec._replace(step=rec.step + 1, best=float(step))
    return rec


def _saved_at(k: int) -> dict:
    saved: dict = {}

    def cap(frame):
        saved.setdefault("n", 0)
        saved["n"] += 1
        if saved["n"] == k:
            saved["tree"] = through_format(loopstate.capture([frame], "step", 1 << 20, []).tree)

    rec_loop(harness_hook(cap), Rec())
    return saved["tree"]


def test_namedtuple_is_rebuilt_from_the_live_value_of_its_class():
    saved = _saved_at(3)
    done: list = []

    def res(frame):
        if not done:
            done.append(loopstate.prepare(saved, [frame], "step"))
            done[0].apply()

    assert rec_loop(res, Rec()) == rec_loop(lambda f: None, Rec())
    assert not done[0].warnings


def test_namedtuple_with_nothing_live_there_is_said_not_restored():
    saved = _saved_at(3)
    plans: list = []

    def res(frame):
        plans.append(loopstate.prepare(saved, [frame], "step"))
        raise StopIteration

    with pytest.raises(StopIteration):
        rec_loop(res, None)  # not made yet at the restore point: nothing to rebuild it from
    assert any(w.startswith("rec (in rec_loop) is None") and "Rec" in w and "not restored" in w
               for w in plans[0].warnings), plans[0].warnings


def test_namedtuple_of_another_class_there_now_is_refused():
    saved = _saved_at(3)

    def res(frame):
        with pytest.raises(PyckptError, match=r"\(in rec_loop\) is a Other now, the checkpoint holds a Rec there"):
            loopstate.prepare(saved, [frame], "step")
        raise StopIteration

    with pytest.raises(StopIteration):
        rec_loop(res, Other())
