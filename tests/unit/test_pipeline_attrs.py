"""Plain settings of the data pipeline's objects of the script's classes (pyckpt/pipeline_attrs.py)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import (BatchSampler, ConcatDataset, DataLoader, RandomSampler, Subset, TensorDataset,
                              WeightedRandomSampler)

from pyckpt import pipeline_attrs


class Curriculum(torch.utils.data.Dataset):
    def __init__(self):
        self.level, self.name, self.files, self.__secret = 1, "easy", ["a", "b"], 3

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.tensor(float(i * self.level))


class Growing(BatchSampler):  # a batch sampler whose batch size the loop grows
    pass


class Collator:
    def __init__(self):
        self.mask_prob = 0.15

    def __call__(self, batch):
        return torch.stack(batch)


def _loader(ds=None, collate=None):
    ds = ds if ds is not None else Curriculum()
    bs = Growing(RandomSampler(ds), batch_size=2, drop_last=False)
    return DataLoader(ds, batch_sampler=bs, collate_fn=collate or Collator())


def _chain(loader):
    return [loader.batch_sampler, loader.batch_sampler.sampler]


class Resumable(Curriculum):  # positioned through its own state_dict(), not its attributes
    def state_dict(self):
        return {"level": self.level}

    def load_state_dict(self, state):
        self.level = state["level"]


def test_the_script_s_objects_are_found_through_wrapping_datasets_and_library_ones_are_not():
    # torch's datasets are not parts (their data is no setting); torch's samplers are (the RandomSampler).
    inner = Curriculum()
    ds = ConcatDataset([Subset(inner, [0, 1]), TensorDataset(torch.zeros(2)), Resumable()])
    loader = _loader(ds)
    keys = [k for k, _ in pipeline_attrs.parts(loader, _chain(loader))]
    assert keys == ["dataset.datasets.0.dataset", "sampler.0", "sampler.1", "collate_fn"]


def test_a_sampler_s_tensors_are_kept_and_copied_back_into_the_live_tensor(monkeypatch):
    weights = torch.ones(4, dtype=torch.double)
    loader = DataLoader(Curriculum(), batch_size=2, sampler=WeightedRandomSampler(weights, 4))
    chain = [loader.sampler, loader.batch_sampler]
    weights[1] = 5.0  # the loop updates the script's tensor, which is the sampler's
    loader.dataset.table = torch.zeros(3)  # a dataset's tensors are its data: not kept
    saved = pipeline_attrs.capture(loader, chain)
    weights[1] = 7.0  # a copy was kept, not the live tensor
    assert saved["sampler.0"]["attrs"]["weights"].tolist() == [1.0, 5.0, 1.0, 1.0]
    assert "table" not in saved["dataset"]["attrs"] and saved["dataset"]["attrs"]["level"] == 1
    fresh_weights = torch.ones(4, dtype=torch.double)
    fresh = DataLoader(Curriculum(), batch_size=2, sampler=WeightedRandomSampler(fresh_weights, 4))
    assert pipeline_attrs.restore(fresh, [fresh.sampler, fresh.batch_sampler], saved) is None
    assert fresh.sampler.weights is fresh_weights and fresh_weights.tolist() == [1.0, 5.0, 1.0, 1.0]
    # Over the size limit: not kept, and named to the caller (one warning line in loader_state).
    monkeypatch.setattr(pipeline_attrs, "MAX_TENSOR_BYTES", 16)
    over = []
    saved = pipeline_attrs.capture(loader, chain, over.append)
    assert "weights" not in saved["sampler.0"]["attrs"] and over == ["sampler.0.weights"]


def test_plain_values_are_kept_and_put_back_containers_are_not():
    loader = _loader()
    ds, bs, coll = loader.dataset, loader.batch_sampler, loader.collate_fn
    ds.level, ds.name, bs.batch_size, coll.mask_prob = 3, "hard", 8, 0.3
    saved = pipeline_attrs.capture(loader, _chain(loader))
    assert saved["dataset"] == {"type": "Curriculum", "attrs": {"level": 3, "name": "hard",
                                                                "_Curriculum__secret": 3}}
    assert saved["sampler.0"]["attrs"]["batch_size"] == 8 and saved["collate_fn"]["attrs"] == {"mask_prob": 0.3}
    fresh = _loader()
    fresh.dataset.files = ["c"]
    assert pipeline_attrs.restore(fresh, _chain(fresh), saved) is None
    assert (fresh.dataset.level, fresh.dataset.name, fresh.batch_sampler.batch_size) == (3, "hard", 8)
    assert fresh.collate_fn.mask_prob == 0.3 and fresh.dataset.files == ["c"]


def test_another_class_or_a_malformed_entry_writes_nothing_and_says_why():
    loader = _loader()
    loader.dataset.level = 5
    saved = pipeline_attrs.capture(loader, _chain(loader))
    other = _loader(collate=lambda b: torch.stack(b))  # a function: no collate_fn entry now
    why = pipeline_attrs.restore(other, _chain(other), saved)
    assert why == "collate_fn is not there now, the checkpoint holds a Collator" and other.dataset.level == 1
    bad = {"dataset": {"type": "Curriculum", "attrs": {"level": [5]}}}
    assert pipeline_attrs.restore(loader, _chain(loader), bad) == "malformed"
    assert pipeline_attrs.restore(loader, _chain(loader), ["x"]) == "malformed"


def test_a_library_collator_and_the_one_a_wrapper_calls_are_kept_and_put_back():
    # transformers' DataCollatorForLanguageModeling (a library class) whose mlm_probability a callback anneals,
    # under the Trainer's RemoveColumnsCollator (its ``data_collator``): before, library collators were no parts.
    transformers = pytest.importorskip("transformers")
    from transformers.trainer_utils import RemoveColumnsCollator

    tok = transformers.BertTokenizerFast(vocab_file=_vocab())
    inner = transformers.DataCollatorForLanguageModeling(tok, mlm_probability=0.3)
    wrapper = RemoveColumnsCollator(inner, signature_columns=["input_ids"])
    loader = _loader(collate=wrapper)
    assert [k for k, _ in pipeline_attrs.parts(loader, [])] == ["dataset", "collate_fn", "collate_fn.data_collator"]
    inner.mlm_probability = 0.21
    saved = pipeline_attrs.capture(loader, [])
    assert saved["collate_fn.data_collator"]["attrs"]["mlm_probability"] == 0.21
    fresh_inner = transformers.DataCollatorForLanguageModeling(tok, mlm_probability=0.3)
    fresh = _loader(collate=RemoveColumnsCollator(fresh_inner, signature_columns=["input_ids"]))
    assert pipeline_attrs.restore(fresh, [], saved) is None and fresh_inner.mlm_probability == 0.21
    # A function (torch's default_collate) is no part.
    assert [k for k, _ in pipeline_attrs.parts(DataLoader(Curriculum()), [])] == ["dataset"]


def _vocab() -> str:
    import tempfile

    path = tempfile.mktemp(suffix=".txt")
    with open(path, "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]) + "\n")
    return path
