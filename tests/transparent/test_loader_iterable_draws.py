"""An IterableDataset in the main process is positioned on resume by loading and dropping its batches
back to back. If it draws from the global generators while it yields and the training step draws from
them too between its batches (dropout), the batches after a mid-epoch resume differ from the original
run's (the attacker's repro: losses differ from the first step after the resume), and nothing said so:
now one warning line does (loader_state.LoaderTracker._probe_draws)."""
from __future__ import annotations

import pytest

from transparent_helpers import HERE, run_script

SCRIPT = HERE / "iterable_draws_script.py"
SAID = "its IterableDataset draws random numbers in this process while it yields"


@pytest.mark.parametrize("dataset,dropout,warned", [
    ("draws", "1", True),   # both draw from the global torch generator: a resume replays other noise
    ("plain", "1", False),  # the dataset draws from its own generator only
    ("draws", "0", False),  # nothing draws between its fetches: the replay draws the same numbers
])
def test_a_dataset_and_steps_drawing_from_the_same_generators_are_said_once(tmp_path, dataset, dropout, warned):
    r = run_script([SCRIPT], tmp_path, DS=dataset, DROP=dropout, PYCKPT_DIR=tmp_path / "ckpt")
    assert r.returncode == 0 and "DONE" in r.stdout, r.stderr
    assert r.stderr.count(SAID) == (1 if warned else 0), r.stderr
