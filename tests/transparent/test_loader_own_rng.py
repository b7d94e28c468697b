"""Random generators a loader's sampler or dataset keeps itself (pyckpt/loader_state.py ``generators``): a
length-bucketing batch sampler shuffling with its own ``random.Random`` / ``np.random.default_rng`` /
``torch.Generator`` (under an attribute not named ``generator``), a dataset augmenting from its own
``np.random.default_rng``. A relaunch runs no sampler in the epochs it skips and loads none of the skipped
batches, so those generators were behind: the resumed run drew other batches and other noise, silently.
Their states are kept at each epoch's ``iter()`` and at the snapshot and put back at the resumed epoch's
``iter()`` and at the restore point."""
from __future__ import annotations

import functools
import os
import random
import re
import weakref

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

import zygote
from pyckpt import loader_state, tree
from transparent_helpers import HERE, clean_env, killed_and_relaunched, load, tree_equal

SCRIPT = HERE / "own_rng_train.py"


@pytest.mark.parametrize("shape", ["sampler_random", "sampler_numpy", "sampler_torch", "dataset_numpy",
                                   "subset_numpy", "transform_numpy", "collate_torch", "collate_hf",
                                   "collate_partial", "collate_closure", "sampler_helper",
                                   "collate_lazy_closure", "sampler_helper_deep", "dataset_helper",
                                   "transform_helper", "dataset_class", "transform_bound",
                                   "iterable_persistent"])
def test_a_resume_in_a_later_epoch_gets_the_samplers_and_datasets_own_generators_back(tmp_path, shape):
    # Without pyckpt, forked from the session's zygote (torch already imported): the same as a plain run.
    plain = zygote.shared().run_path(SCRIPT, [tmp_path / "plain.pt"], env=clean_env(SHAPE=shape), cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    # 10 steps an epoch; a snapshot every 4 steps; killed after step 17: resumed at step 16 or 12, in epoch 1
    _, second = killed_and_relaunched(SCRIPT, tmp_path / "out.pt", tmp_path, kill_at=17, every_steps=4, SHAPE=shape)
    assert re.search(r"pyckpt: resumed from step (16|12) \(epoch 1, batch [26]\)", second.stderr), second.stderr
    assert "warning" not in second.stderr, second.stderr
    assert tree_equal(load(tmp_path / "out.pt"), load(tmp_path / "plain.pt"))


class _Bucket(Sampler):
    def __init__(self):
        self.rng = random.Random(1)
        self.more = [np.random.default_rng(2), np.random.Generator(np.random.Philox(3))]
        self.by_name = {"t": torch.Generator().manual_seed(4), "rs": np.random.RandomState(5),
                        "mt": np.random.Generator(np.random.MT19937(6)), "sfc": np.random.Generator(np.random.SFC64(7))}

    def all(self):
        return [self.rng, *self.more, *self.by_name.values()]

    def __iter__(self):
        return iter([[0, 1]])

    def __len__(self):
        return 1


def _stream():
    """A tracked stream of a loader whose batch sampler keeps a generator of every kind."""
    loader = DataLoader(TensorDataset(torch.randn(4, 2)), batch_sampler=_Bucket())
    tracker = loader_state.LoaderTracker(lambda st: None, lambda: None, lambda: None)
    st = tracker.stream_for(loader)
    st.loader = weakref.ref(loader)
    return loader, st


def _draws(loader):
    return [torch.rand(2, generator=g).tolist() if isinstance(g, torch.Generator) else float(g.random())
            for g in loader.batch_sampler.all()]


def _through_the_tree(value):
    encoded, tensors, _ = tree.flatten(value)
    return tree.unflatten(encoded, lambda i, into, path: tensors[i].clone())


def test_every_kind_round_trips_through_the_checkpoint_by_key():
    """The epoch-start states and the snapshot's go through the state tree without pickle (PCG64's 128-bit
    integers as strings) and come back into the generator of the same key."""
    loader, st = _stream()
    st.epoch_rng = loader_state._epoch_rng(loader)  # the epoch's iter()
    at_epoch_start = _draws(loader)
    pos = _through_the_tree(st.position(others=False))  # the snapshot
    at_snapshot = _draws(loader)
    assert [e[0] for e in pos["rngs"]] == [
        "sampler.1.rng", "sampler.1.more.0", "sampler.1.more.1", "sampler.1.by_name.t", "sampler.1.by_name.rs",
        "sampler.1.by_name.mt", "sampler.1.by_name.sfc"]
    _draws(loader)
    loader_state._set_epoch_rng(loader, pos["epoch_rng"])
    assert _draws(loader) == at_epoch_start
    st.restore_sampler_state(pos)
    assert _draws(loader) == at_snapshot


class _Collator:
    def __init__(self, inner=None, tokenizer=None):
        self.rng, self.data_collator, self.tokenizer = random.Random(1), inner, tokenizer

    def __call__(self, items):
        return items

    def collate(self, items):
        return items


class _NotCalled:
    """An object a collator or sampler holds that is not called (a tokenizer, a sampler's shuffler): not one of
    ``generators``' named shapes for a collator (found further on, ``held_rngs``), one for a sampler."""

    def __init__(self):
        self.rng = random.Random(3)


def test_the_generators_of_collate_fn_and_transform_objects_are_found_by_key():
    inner = _Collator()
    inner.__dict__["made_at"] = os.getpid()
    ds = TensorDataset(torch.randn(4, 2))

    def keys(fn, pids=None):
        return [k for k, _, _ in loader_state.generators(DataLoader(ds, collate_fn=fn), pids=pids)]
    pids = []
    assert keys(_Collator(inner), pids) == ["collate.rng", "collate.data_collator.rng"]
    assert pids == ["collate.data_collator.made_at"]  # beside a generator, holding this process's id
    assert keys(inner.collate) == ["collate.rng", "collate.data_collator.rng"][:1]  # a bound method's object
    # Objects held that are not called (a tokenizer), and the object a partial binds: after the named shapes,
    # by the walk further down (held_rngs); the process id beside one is named once.
    pids = []
    assert keys(_Collator(inner, _NotCalled()), pids) == ["collate.rng", "collate.data_collator.rng",
                                                          "collate.tokenizer.rng"]
    assert pids == ["collate.data_collator.made_at"]
    assert keys(functools.partial(_Collator.collate, inner)) == ["collate.args.0.rng"] and keys(None) == []
    g = torch.Generator()
    assert keys(functools.partial(_Collator.collate, g, rng=random.Random(2))) == ["collate.args.0",
                                                                                  "collate.keywords.rng"]

    def made(rng):
        return lambda items: (rng, items)[1]
    assert keys(made(g)) == ["collate.closure.rng"]
    ds.transform = made(np.random.default_rng(1))  # a transform a function made: its closure
    assert keys(None) == ["dataset.transform.closure.rng"]
    # A dataset's transform objects and those they hold, two levels (a Subset's dataset's too).
    ds.transform = _Collator(_Collator())
    assert keys(None) == ["dataset.transform.rng", "dataset.transform.data_collator.rng"]
    sub = torch.utils.data.Subset(ds, [0, 1])
    assert [k for k, _, _ in loader_state.generators(DataLoader(sub))] == [
        "dataset.dataset.transform.rng", "dataset.dataset.transform.data_collator.rng"]
    ds.transform = _Collator()
    ds.transform.steps = [_Collator(), _Collator()]  # a Compose's list of transforms
    assert keys(None) == ["dataset.transform.rng", "dataset.transform.steps.0.rng", "dataset.transform.steps.1.rng"]
    del ds.transform
    # A collator's generator made at its first call: put back by key where the relaunch's holds None.
    fresh = _Collator(_Collator())
    fresh.data_collator.rng = None
    slot = loader_state.lazy_slot(DataLoader(ds, collate_fn=fresh), "collate.data_collator.rng", "random")
    assert slot[0] is fresh.data_collator and slot[1] == "rng" and isinstance(slot[2], random.Random)


class _HelperOrder(Sampler):
    """Draws its order through a helper object it holds (not callable), beside its data source."""

    def __init__(self, data_source):
        self.data_source, self.shuffler = data_source, _NotCalled()

    def __iter__(self):
        return iter([0, 1])

    def __len__(self):
        return 2


def test_the_generators_of_a_samplers_helper_objects_are_found_by_key():
    ds = TensorDataset(torch.randn(4, 2))
    ds.rng = random.Random(4)
    sampler = _HelperOrder(ds)
    loader = DataLoader(ds, sampler=sampler, batch_size=2)
    # The helper's under the sampler's key; the data source's under the dataset's, as before (not twice).
    assert [k for k, _, _ in loader_state.generators(loader)] == ["sampler.0.shuffler.rng", "dataset.rng"]
    sampler.shuffler.rng = None  # made at the first __iter__, none yet in a relaunch: put back by key
    slot = loader_state.lazy_slot(loader, "sampler.0.shuffler.rng", "random")
    assert slot[0] is sampler.shuffler and slot[1] == "rng" and isinstance(slot[2], random.Random)


def _states(loader):
    return [repr(g.get_state() if isinstance(g, torch.Generator) else
                 g.bit_generator.state if isinstance(g, np.random.Generator) else g.get_state()
                 if isinstance(g, np.random.RandomState) else g.getstate()) for g in loader.batch_sampler.all()]


def test_a_malformed_or_mismatching_entry_is_said_and_never_written(capsys):
    loader, st = _stream()
    pos = _through_the_tree(st.position(others=False))
    _draws(loader)
    before = _states(loader)
    bad = [list(e) for e in pos["rngs"]]
    bad[0][2] = (3, torch.zeros(5, dtype=torch.int64), None)  # a random.Random state of 5 words
    bad[1][1] = "torch"  # another kind under that key
    bad[2][0] = "sampler.1.other"  # a key this run has no generator for
    st.restore_sampler_state(dict(pos, rngs=bad + [7]))
    err = capsys.readouterr().err
    assert err.count("pyckpt: warning:") == 1, err
    assert "sampler.1.rng" in err and "sampler.1.more.0" in err and "sampler.1.other" in err, err
    assert "no state of sampler.1.more.1" in err, err
    assert _states(loader)[:3] == before[:3]  # the generators whose entries did not fit: untouched
    st.restore_sampler_state(dict(pos, rngs="not a list"))
    assert capsys.readouterr().err.count("pyckpt: warning:") == 1


def test_a_checkpoint_without_them_sets_the_generator_attributes_as_before_and_says_what_it_lacks(capsys):
    """A checkpoint written before these were kept has only ``"gens"``: the loader's ``generator``
    attributes are set from it as then; the generators it holds nothing for are named in one line."""
    g = torch.Generator().manual_seed(3)
    loader = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=2, shuffle=True, generator=g)
    tracker = loader_state.LoaderTracker(lambda st: None, lambda: None, lambda: None)
    st = tracker.stream_for(loader)
    st.loader = weakref.ref(loader)
    state = g.get_state()
    expected = torch.rand(3, generator=g)
    st.restore_sampler_state({"gens": [state], "samplers": []})
    assert torch.equal(torch.rand(3, generator=g), expected)
    assert capsys.readouterr().err == ""
    loader.batch_sampler.rng = random.Random(0)  # a generator the old checkpoint holds nothing for
    st.restore_sampler_state({"gens": [state], "samplers": []})
    err = capsys.readouterr().err
    assert err.count("pyckpt: warning:") == 1 and "sampler.1.rng" in err, err
