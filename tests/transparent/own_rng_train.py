"""Training script of test_loader_own_rng.py: a batch sampler or a dataset drawing from a random generator
it keeps itself (not a ``generator`` attribute, not a global stream). ``python own_rng_train.py OUT``.

SHAPE: ``sampler_random`` / ``sampler_numpy`` / ``sampler_torch`` (a length-bucketing batch sampler whose
``self.rng`` is a ``random.Random``, ``np.random.default_rng``, ``torch.Generator``), ``dataset_numpy``
(augmentation in ``__getitem__`` from the dataset's own ``np.random.default_rng``, no workers),
``subset_numpy`` (the same dataset under a ``Subset``). KILL_AT: SIGKILL after that step (once: KILL_MARK).
"""
import os
import random
import signal
import sys

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset

SHAPE = os.environ["SHAPE"]


class BucketBatches(Sampler):
    """Batches of similar length, in an order drawn from the sampler's own generator every epoch."""

    def __init__(self, lengths, bs, kind, seed=123):
        self.lengths, self.bs, self.kind = lengths, bs, kind
        self.rng = {"random": lambda: random.Random(seed), "numpy": lambda: np.random.default_rng(seed),
                    "torch": lambda: torch.Generator().manual_seed(seed)}[kind]()

    def _perm(self, n):
        if self.kind == "random":
            p = list(range(n))
            self.rng.shuffle(p)
            return p
        if self.kind == "numpy":
            return self.rng.permutation(n).tolist()
        return torch.randperm(n, generator=self.rng).tolist()

    def __iter__(self):
        order = sorted(range(len(self.lengths)), key=lambda i: self.lengths[i])
        batches = [order[i:i + self.bs] for i in range(0, len(order), self.bs)]
        for j in self._perm(len(batches)):
            yield batches[j]

    def __len__(self):
        return (len(self.lengths) + self.bs - 1) // self.bs


class Noisy(Dataset):
    """Augmentation from the dataset's own seeded generator (the reproducibility idiom)."""

    def __init__(self, x, y, seed=7):
        self.x, self.y, self.rng = x, y, np.random.default_rng(seed)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + torch.from_numpy(self.rng.normal(0, 0.1, self.x.shape[1])).float(), self.y[i]


torch.manual_seed(0)
x, y = torch.randn(40, 6), torch.randn(40, 1)
if SHAPE.startswith("sampler_"):
    lengths = torch.randint(1, 50, (40,)).tolist()
    loader = DataLoader(TensorDataset(x, y), batch_sampler=BucketBatches(lengths, 4, SHAPE.split("_")[1]))
elif SHAPE == "dataset_numpy":
    loader = DataLoader(Noisy(x, y), batch_size=4, shuffle=True)
else:
    loader = DataLoader(Subset(Noisy(x, y), list(range(40))), batch_size=4, shuffle=True)
model = nn.Linear(6, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
step, seen = 0, []
for epoch in range(3):
    for xb, yb in loader:
        loss = ((model(xb) - yb) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        seen.append(xb.sum())
        if str(step) == os.environ.get("KILL_AT") and not os.path.exists(os.environ["KILL_MARK"]):
            open(os.environ["KILL_MARK"], "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
torch.save({"model": model.state_dict(), "batches": torch.stack(seen)}, sys.argv[1])
