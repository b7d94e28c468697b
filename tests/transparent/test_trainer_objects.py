"""The Hugging Face Trainer's objects of the script's classes (pyckpt/integrations/object_state.py) and a
library collator's settings before each batch fetched ahead of the loop (pipeline_attrs, loader_state)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from pyckpt.integrations import object_state
from transparent_helpers import HERE, clean_env, killed_and_relaunched, load, tree_equal

import zygote

pytest.importorskip("transformers", reason="transformers is a test-only dependency (requirements-dev.txt)")

SCRIPT = HERE / "trainer_objects_train.py"


def test_a_stateful_callback_and_a_trainer_subclass_no_variable_holds_resume_exactly(tmp_path):
    # 8 steps an epoch; a snapshot every 3 steps; killed after step 13: resumed at step 12 or 9, in epoch 1.
    # Before, the relaunch's callback counted from 0 with a fresh generator and the relaunch's trainer drew
    # its loss noise from the start (the loop state reaches neither: only the Trainer's frames hold them),
    # and the batch fetched ahead was masked with the collator's first mlm_probability: other weights, with
    # no pyckpt: line saying so.
    plain = zygote.shared().run_path(SCRIPT, [tmp_path / "plain.pt"], env=clean_env(), cwd=tmp_path, timeout=300)
    assert plain.returncode == 0, plain.stderr
    _, second = killed_and_relaunched(SCRIPT, tmp_path / "out.pt", tmp_path, kill_at=13, every_steps=3)
    assert re.search(r"pyckpt: resumed from step (12|9) \(epoch 1, batch [14]\)", second.stderr), second.stderr
    assert "warning" not in second.stderr, second.stderr
    assert tree_equal(load(tmp_path / "out.pt"), load(tmp_path / "plain.pt"))


class Holder:
    def __init__(self):
        self.calls, self.name, self.losses = 3, "a", [1.0, {"k": (2, None)}]
        self.t = torch.arange(3.0)
        self.rng, self.lazy = np.random.default_rng(1), None
        self.seen, self.collator = {1, 2}, object()


def test_capture_copies_what_it_takes_names_what_it_cannot_and_restore_checks_generators_first():
    h = Holder()
    saved, left = object_state.capture(h)
    assert left == ["seen"]  # a set holds data: named; a reference to another object (the collator) is not
    assert set(saved["values"]) == {"calls", "name", "losses", "t", "lazy"}
    h.t += 1  # copied, not the live tensor
    h.losses[1]["k"] = 0
    draws = h.rng.random(3)
    fresh = Holder()
    fresh.calls, fresh.rng = 0, np.random.default_rng(9)
    live_t = fresh.t
    assert object_state.restore(fresh, saved) == []
    assert fresh.calls == 3 and fresh.losses == [1.0, {"k": (2, None)}]
    assert fresh.t is live_t and fresh.t.tolist() == [0.0, 1.0, 2.0]  # into the live tensor
    assert fresh.rng.random(3).tolist() == draws.tolist()
    # A generator made at first use (None in the relaunch) is made of the saved kind.
    saved["rngs"].append(["lazy", "torch", torch.Generator().manual_seed(4).get_state()])
    fresh.lazy = None
    assert object_state.restore(fresh, saved) == [] and isinstance(fresh.lazy, torch.Generator)
    expected = torch.rand(2, generator=torch.Generator().manual_seed(4))
    assert torch.rand(2, generator=fresh.lazy).tolist() == expected.tolist()
    # A state that does not fit is named and nothing is written.
    other = Holder()
    other.calls = 7
    bad = dict(saved, rngs=[["rng", "torch", torch.zeros(3, dtype=torch.uint8)]])
    assert object_state.restore(other, bad) == ["rng"] and other.calls == 7
    assert object_state.restore(other, {"values": 1}) == ["malformed"]


class Tracker:
    """A plain object of the script's classes a callback keeps its metrics in (not called)."""

    def __init__(self):
        self.best = 1.0


def test_only_data_left_out_is_named_not_the_objects_a_callback_works_with():
    h = Holder()
    h.model, h.tokenizer, h.tracker = torch.nn.Linear(1, 1), lambda s: s, Tracker()
    h.loader = torch.utils.data.DataLoader([1, 2])
    _, left = object_state.capture(h)
    assert left == ["seen", "tracker"]  # the model, a callable and the loader are restored elsewhere or wired
    h.losses = [0.5] * object_state.MAX_ITEMS  # a log over the limit (the list itself counts too): named
    saved, left = object_state.capture(h)
    assert "losses" in left and "losses" not in saved["values"]
