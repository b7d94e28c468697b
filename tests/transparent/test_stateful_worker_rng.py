"""Random augmentation in worker processes under torchdata's ``StatefulDataLoader`` (issue 6 item 5).

``StatefulDataLoader.state_dict()`` carries the sampler position, its base seed and which worker
loads next, but not the workers' generators: resumed alone, it restarts every worker from
``base_seed + worker_id``, so a dataset that draws in ``__getitem__`` returns the right samples with
other random values. pyckpt adds its own per-batch worker capture (``loader_workers.py``) to this
class's iterators too, so the draws come out the same.
"""
from __future__ import annotations

import random

import pytest
import torch
from torch.utils.data import Dataset

from tracked_loop import resumes_exactly

sdl = pytest.importorskip("torchdata.stateful_dataloader")


class Augmenting(Dataset):
    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([i, torch.rand(()).item(), random.random()], dtype=torch.float64)


@pytest.mark.parametrize("persistent", [False, True])
def test_random_draws_in_stateful_dataloader_workers_come_out_the_same(persistent):
    make = lambda: sdl.StatefulDataLoader(Augmenting(), batch_size=4, shuffle=True, num_workers=2,  # noqa: E731
                                          persistent_workers=persistent)
    # The resumed run must see the same samples and the same random draws as the reference's rest.
    resumes_exactly(make, stop=(1, 3), per_epoch=6)
