"""The step count at each epoch start (``Stream.epoch_steps``), which maps a framework checkpoint's
optimizer steps to the epoch a script resumes in (pyckpt/integrations/accelerate.py)."""
from __future__ import annotations

import pytest

from pyckpt import loader_state
from pyckpt.own_resume import epoch_of as _epoch_of
from pyckpt.loader_state import Stream, epoch_steps_of


def _started(st: Stream, epoch: int, step: int) -> None:
    st.epochs = epoch
    st.note_epoch_start(step)


def test_kept_per_epoch_number_with_gaps_and_a_bounded_length(monkeypatch):
    st = Stream(["sig"], None)
    for epoch, step in [(1, 0), (2, 6), (3, 12)]:
        _started(st, epoch, step)
    assert (st.epoch_steps_from, st.epoch_steps) == (1, [0, 6, 12])
    _started(st, 5, 30)  # an integration moved the count (epoch 4 never iterated here)
    assert st.epoch_steps == [0, 6, 12, -1, 30]
    _started(st, 2, 7)  # counted again from an earlier epoch: later entries are gone
    assert st.epoch_steps == [0, 7]
    monkeypatch.setattr(loader_state, "EPOCH_STEPS_KEPT", 3)
    for epoch in range(3, 7):
        _started(st, epoch, epoch * 10)
    assert (st.epoch_steps_from, st.epoch_steps) == (4, [40, 50, 60])
    pos = st.position(others=False)
    assert epoch_steps_of(pos) == (4, [40, 50, 60])


@pytest.mark.parametrize("pos", [{}, {"epoch_steps": "x"}, {"epoch_steps": [1, True]}, {"epoch_steps": [1.5]},
                                 {"epoch_steps": [1], "epoch_steps_from": 0}, None])
def test_malformed_saved_values_are_not_used(pos):
    assert epoch_steps_of(pos) == (1, [])


def test_epoch_a_framework_checkpoint_resumes_in():
    assert _epoch_of(1, [5, 6], 5) == 1  # mid-epoch 1 (began at step 5)
    assert _epoch_of(1, [0, 6, 12], 12) == 3  # saved at epoch 2's end: the script starts epoch 3
    assert _epoch_of(1, [0, 6, 12], 20) == 3
    assert _epoch_of(3, [10, 20], 15) == 3
    assert _epoch_of(1, [5, 6], 4) is None  # older than any epoch kept
    assert _epoch_of(1, [-1, -1, 12], 13) == 3  # unknown starts before a known earlier one do not matter
    assert _epoch_of(1, [0, -1, 12], 7) is None  # epoch 2 may have begun by step 7
