"""loader_kept.Kept: the checkpoint's persistent iterators of other loaders, read as untrusted input, handed out
per signature in the run's order, carried on while untaken."""
from __future__ import annotations

import types

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pyckpt import loader_kept, loader_state, loader_workers

SIG = ["TensorDataset", 8, 4, "SequentialSampler", "BatchSampler", False, 2]


@pytest.fixture(autouse=True)
def _fresh_lines():
    said = set(loader_state._SAID)
    loader_state._SAID.clear()
    yield
    loader_state._SAID.clear()
    loader_state._SAID.update(said)


def _state(seed: int) -> dict:
    """A worker's generator state as a snapshot saves it."""
    torch.manual_seed(seed)
    return loader_workers.to_saved(loader_workers.current_state())


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.arange(8.0)), batch_size=4, num_workers=2, persistent_workers=True)


def _stream() -> types.SimpleNamespace:
    return types.SimpleNamespace(sig=SIG)


def test_entries_are_taken_in_the_runs_order_and_untaken_ones_are_carried_on():
    a = {"sig": SIG, "base_seed": 11, "rng": [_state(1), _state(2)]}
    b = {"sig": SIG, "base_seed": 22, "rng": None}
    kept = loader_kept.Kept([a, b])
    loader = _loader()
    states, seed, first, drawn_from = kept.take(_stream(), loader)
    assert seed == 11 and first == 0 and drawn_from is torch.default_generator
    assert states == [loader_workers.from_saved(a["rng"][0]), loader_workers.from_saved(a["rng"][1])]
    assert kept.pending(tuple(SIG)) == [b]
    loader.generator = torch.Generator()
    assert kept.take(_stream(), loader)[1:] == (22, 0, loader.generator)  # the loader's own generator drew it
    assert kept.pending(tuple(SIG)) == [] and kept.take(types.SimpleNamespace(sig=["other"]), loader) is None


def test_malformed_entries_are_dropped_with_one_line_and_the_others_kept(capfd):
    good = {"sig": SIG, "base_seed": 5, "rng": [_state(3), _state(4)]}
    bad_rng = _state(5)
    bad_rng["python"] = (3, torch.zeros(10, dtype=torch.int64), None)  # not 625 words
    kept = loader_kept.Kept([{"sig": [[1]], "base_seed": 1, "rng": None}, {"sig": SIG, "base_seed": "x", "rng": None},
                             {"sig": SIG, "base_seed": 1, "rng": [bad_rng]}, {"base_seed": 1}, good, "junk"])
    assert kept.pending(tuple(SIG)) == [good]
    said = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("pyckpt:")]
    assert len(said) == 1 and "malformed" in said[0], said
    assert loader_kept.Kept(None).by_sig == {} and loader_kept.Kept({"sig": SIG}).by_sig == {}


def test_a_worker_count_other_than_the_loaders_starts_them_from_the_seed_and_says_so(capfd):
    kept = loader_kept.Kept([{"sig": SIG, "base_seed": 9, "rng": [_state(1)]}])  # one state, two workers
    states, seed, _, _ = kept.take(_stream(), _loader())
    assert states is None and seed == 9
    said = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("pyckpt:")]
    assert len(said) == 1 and "start again from the run's worker seed" in said[0], said


def test_one_more_new_loader_than_the_run_had_is_said_once(capfd):
    kept = loader_kept.Kept([{"sig": SIG, "base_seed": 9, "rng": [_state(1), _state(2)]}])
    assert kept.take(_stream(), _loader()) is not None
    assert capfd.readouterr().err == ""
    assert kept.take(_stream(), _loader()) is None and kept.take(_stream(), _loader()) is None
    said = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("pyckpt:")]
    assert len(said) == 1 and "makes new loaders of it" in said[0], said


def test_workers_states_are_converted_again_only_once_one_changed():
    """A validation loader sits idle between validations: each snapshot reuses its states' checkpoint form."""
    record = loader_workers.Record(2, base_seed=0, initial=[loader_workers.current_state()] * 2)
    first = loader_kept._saved_states(record)
    assert loader_kept._saved_states(record) is first
    torch.manual_seed(7)
    record.add(1, loader_workers.current_state())
    again = loader_kept._saved_states(record)
    assert again is not first and torch.equal(again[1]["torch"], torch.get_rng_state())
    assert torch.equal(again[0]["torch"], first[0]["torch"])
