"""The main-process record of DataLoader workers' generator states (loader_workers.Record): an iterable
dataset's epoch-start states, from the first batch of each worker or torch's end-of-data marker."""
from __future__ import annotations

import pickle

from torch.utils.data._utils.worker import _IterableDatasetStopIteration

from pyckpt import loader_state, loader_workers
from pyckpt.loader_workers import Record, _Tagged


def _batch(worker: int, rng, start=None) -> _Tagged:
    return _Tagged(None, rng, worker, None, start)


def _ended(worker: int, rng, start=None):
    loader_workers._ENDED[:] = [(rng, start)]
    return loader_workers._Ended(worker)


def test_the_end_marker_carries_the_state_and_pickles_as_torchs_marker():
    m = pickle.loads(pickle.dumps(_ended(1, "after-tail", ("s",))))
    assert isinstance(m, _IterableDatasetStopIteration) and m.worker_id == 1
    assert (m.rng, m.start) == ("after-tail", ("s",))
    assert loader_workers._ENDED == []  # taken by the marker made


def test_an_epochs_start_is_the_first_batchs_or_else_the_workers_end_of_the_previous_epoch():
    r = Record(2, base_seed=7)
    r.take(0, _batch(0, "w0-b0", ("w0-e0",)))
    r.take(1, _batch(1, "w1-b0", ("w1-e0",)))
    assert r.epoch_starts(0) == (["w0-e0", "w1-e0"], True)
    r.take(0, _batch(0, "w0-b1"))
    r.take(1, _ended(1, "w1-tail"))  # worker 1 drew after its last item
    r.take(0, _ended(0, None))  # worker 0 did not
    r.new_epoch()
    r.take(0, _batch(0, "w0-b2", (None,)))  # started as it ended
    # Worker 1's first batch of the epoch has not come back: its state at its end marker.
    assert r.epoch_starts(0) == (["w0-b1", "w1-tail"], True)
    # One batch back (a look-ahead wrapper's): still the previous epoch, whose starts were kept.
    assert r.epoch_starts(1) == (["w0-e0", "w1-e0"], True)


def test_a_worker_drawing_between_its_end_marker_and_the_next_epoch_after_a_snapshot_took_it_is_said(
        capfd, monkeypatch):
    monkeypatch.setattr(loader_state, "_SAID", set())
    r = Record(2, base_seed=7)
    r.take(1, _ended(1, "w1-end"))
    r.new_epoch()
    assert r.epoch_starts(0)[0][1] == "w1-end"
    r.take(1, _batch(1, "w1-b0", (None,)))  # as it ended: nothing to say
    assert "drew random numbers between" not in capfd.readouterr().err
    r.new_epoch()
    assert r.epoch_starts(0)[0][1] == "w1-b0"
    r.take(1, _batch(1, "w1-b1", ("w1-other",)))
    lines = [ln for ln in capfd.readouterr().err.splitlines() if "drew random numbers between" in ln]
    assert len(lines) == 1 and "worker 1" in lines[0], lines
    assert r.epoch_starts(0)[0][1] == "w1-other"


def test_batches_unchanged_since_the_end_marker_of_the_previous_epoch_resolve_to_it():
    r = Record(1, base_seed=0, initial=["seeded"])
    r.take(0, _batch(0, None))
    assert r.states_before(0) == (["seeded"], True)
    r.take(0, _ended(0, "end"))
    r.new_epoch()
    r.take(0, _batch(0, None))
    assert r.states_before(0) == (["end"], True)


def test_an_end_marker_taken_before_its_workers_last_batches_are_handed_is_still_the_newest_state():
    """torch takes a worker's end marker when it arrives, which may be while the loop still waits for another
    worker's batch, so that worker's last batches are handed after it. The marker's state used to be
    overwritten by theirs (older): the next epoch's start, saved for a snapshot taken before that worker's
    first batch of it came back, missed what the worker drew after its last item (a rare wrong resume)."""
    r = Record(2, base_seed=0)
    r.take(0, _batch(0, "w0-b0", ("w0-e0",)))
    r.take(1, _ended(1, "w1-end"))  # worker 1's marker arrives while batch w0-b1 is awaited
    r.take(0, _batch(0, "w0-b1"))
    r.take(1, _batch(1, "w1-b0", ("w1-e0",)))  # worker 1's batches, waiting in torch's out-of-order buffer
    r.take(1, _batch(1, None))  # unchanged since w1-b0, not since the marker
    assert r.states_before(0) == (["w0-b1", "w1-b0"], True)
    assert r.latest() == ["w0-b1", "w1-end"]
    r.take(0, _ended(0, None))
    r.new_epoch()
    assert r.epoch_starts(0) == (["w0-b1", "w1-end"], True)
