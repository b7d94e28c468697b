"""Loader wrappers that fetch ahead of the training loop (issue 11, items 1-3), without accelerate.

``LookAhead`` (tracked_loop.py) does what accelerate's ``DataLoaderShard`` does: it takes batch k+1 from
the DataLoader before it hands batch k to the loop, and (as accelerate 1.4 did) hands the loop
``None`` when the DataLoader yields nothing.
"""
from __future__ import annotations

import re
import sys

import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import _BaseDataLoaderIter

from pyckpt.hooks import HookSet
from pyckpt.loader_state import FastForward, LoaderTracker
from tracked_loop import Items, LookAhead, resumes_exactly
from transparent_helpers import run_script


def _resume_equals_reference(stop, epochs=3):
    """The loop trains on what LookAhead hands it; after handing batch `stop[1]` of epoch `stop[0]`
    (1-based count) a step arms the tracker, as the session does after an optimizer step."""
    make = lambda: LookAhead(DataLoader(Items(), batch_size=4, shuffle=True))  # noqa: E731
    pos, ref_wrapped, wrapped = resumes_exactly(make, stop, epochs=epochs, resume_seed=777, handed_by=LookAhead)
    # The wrapper's own per-epoch bookkeeping ran for every epoch, skipped ones included.
    assert (wrapped.iteration, wrapped.ended) == (ref_wrapped.iteration, ref_wrapped.ended) == (epochs, epochs)
    return pos


def test_position_counts_batches_handed_to_the_loop_not_fetched():
    pos = _resume_equals_reference(stop=(0, 3))
    # The wrapper had already fetched the 4th batch, which the loop had not trained on.
    assert (pos["batch"], pos["fetched"]) == (3, 4)


def test_snapshot_while_the_last_batch_is_handed_after_the_loader_ended():
    pos = _resume_equals_reference(stop=(1, 5))  # 6 batches per epoch: the 6th is handed after StopIteration
    assert (pos["epoch"], pos["batch"], pos["fetched"]) == (2, 5, 6)


def test_relaunch_past_epoch_0_skips_finished_epochs_without_none_batches():
    pos = _resume_equals_reference(stop=(2, 2))
    assert (pos["epoch"], pos["batch"]) == (3, 2)


def _noisy(items):
    """A collate_fn that draws random numbers (as a masking collator does): item * 1000 + noise."""
    return torch.stack(items) * 1000 + torch.randint(0, 1000, (len(items),))


@pytest.mark.parametrize("stop", [(0, 3), (1, 5)], ids=["mid_epoch", "last_batch_handed_after_the_end"])
def test_batches_fetched_ahead_draw_what_they_drew_before(stop):
    # Loaded in this process, the batch fetched ahead of the snapshot point is collated again by the
    # relaunch before the restore point: from the random state it was collated from originally.
    make = lambda: LookAhead(DataLoader(Items(), batch_size=4, shuffle=True, collate_fn=_noisy))  # noqa: E731
    pos, _, _ = resumes_exactly(make, stop, resume_seed=777, handed_by=LookAhead)
    assert pos["fetched"] - pos["batch"] == len(pos["ahead_rng"]) == 1


def test_skipped_epoch_iterator_is_a_finished_real_dataloader_iterator():
    hooks = HookSet()
    tracker = LoaderTracker(lambda st: None, lambda: None, lambda: None)
    tracker.install(hooks)
    loader = DataLoader(Items(), batch_size=4, num_workers=2)
    tracker.plan = FastForward(sig=None, epoch=3, batch=0, epoch_rng=None, reused=False)
    try:
        tracker.plan.sig = tracker.stream_for(loader).sig
        it = iter(loader)
        assert isinstance(it, _BaseDataLoaderIter) and len(it) == 0
        fetches = tracker.fetches
        assert list(it) == []
        assert tracker.fetches == fetches + 1  # the end of an epoch counts as a fetch event
    finally:
        hooks.remove_all()


SCRIPT = """
import sys, torch
from torch.utils.data import DataLoader, TensorDataset
sys.path.insert(0, {here!r})
from tracked_loop import LookAhead

torch.manual_seed(0)
model = torch.nn.Linear(3, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
data = LookAhead(DataLoader(TensorDataset(torch.randn(12, 3), torch.randn(12, 1)), batch_size=4))
for epoch in range(3):
    for x, y in data:  # one optimizer step per batch
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
"""


def test_epoch_end_of_a_lookahead_wrapper_does_not_turn_checkpointing_off(tmp_path):
    # The wrapper hands the epoch's last batch after the DataLoader raised StopIteration, so two
    # optimizer steps follow one another with no batch fetched in between.
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(here=str(__import__("pathlib").Path(__file__).parent)))
    r = run_script([script], tmp_path, PYCKPT_DIR=str(tmp_path / "ckpt"), PYCKPT_EVERY_STEPS="1",
                   PYCKPT_KEEP="100")
    assert r.returncode == 0, r.stderr
    assert "no checkpoints will be taken" not in r.stderr, r.stderr
    steps = sorted(int(p.name[5:]) for p in (tmp_path / "ckpt").iterdir() if re.fullmatch(r"step-\d{9}", p.name))
    assert steps == list(range(1, 9)), (steps, r.stderr)  # 9 steps; the 9th's fetch never comes


IMPORT_ORDER = """
import sys, pyckpt
pyckpt.enable({ckpt!r})
print("BEFORE", "accelerate" in sys.modules, "transformers" in sys.modules)
import accelerate.data_loader as dl
print("PATCHED", dl.DataLoaderShard.__iter__.__module__)
pyckpt.disable()
print("UNPATCHED", dl.DataLoaderShard.__iter__.__module__)
"""


def test_accelerate_integration_patches_only_after_the_script_imports_it(tmp_path):
    pytest.importorskip("accelerate")
    script = tmp_path / "imp.py"
    script.write_text(IMPORT_ORDER.format(ckpt=str(tmp_path / "ck")))
    r = run_script([script], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["BEFORE", "False", "False", "PATCHED", "pyckpt.loader_state",
                                "UNPATCHED", "accelerate.data_loader"], r.stdout


if __name__ == "__main__":
    sys.exit("run with pytest")
