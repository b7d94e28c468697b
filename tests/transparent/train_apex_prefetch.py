"""The NVIDIA apex ImageNet example's prefetcher (YOLOX's DataPrefetcher is the same): a class with a
plain ``next()`` that fetches its first batch in ``__init__``, one batch ahead of the loop, called once
before ``while input is not None:`` and once at the end of the loop body.

    python train_apex_prefetch.py OUT.pt
env: KILL_AT (step after which the process SIGKILLs itself, once: KILL_MARK is created) and
EVERY (PYCKPT_EVERY_STEPS): before the kill it waits (bounded) for the newest snapshot before it to be
committed. Saves the model and the batches trained on. MODE=reiter: one prefetcher for the whole run,
whose ``preload()`` re-iterates the DataLoader when an epoch ends, and 30 steps counted by the script."""
import os
import signal
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from commit_wait import wait_for_commit


class data_prefetcher:  # noqa: N801 - apex's name
    def __init__(self, loader):
        self.loader = iter(loader)
        self.preload()

    def preload(self):
        try:
            self.next_input, self.next_target = next(self.loader)
        except StopIteration:
            self.next_input = None
            self.next_target = None

    def next(self):
        input, target = self.next_input, self.next_target
        self.preload()
        return input, target


class reiterating_prefetcher(data_prefetcher):  # noqa: N801 - an "infinite loader" made once
    def preload(self):
        try:
            self.next_input, self.next_target = next(self.loader)
        except StopIteration:
            self.loader = iter(self.source)
            self.next_input, self.next_target = next(self.loader)

    def __init__(self, loader):
        self.source = loader
        super().__init__(loader)


torch.manual_seed(0)
x = torch.randn(40, 6)
loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4, shuffle=True)
model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.2), nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
kill_at, every = int(os.environ.get("KILL_AT", "0")), int(os.environ.get("EVERY", "1"))
step, seen = 0, []


def kill_here(step):
    if step == kill_at and not os.path.exists(os.environ["KILL_MARK"]):
        wait_for_commit(os.environ.get("PYCKPT_DIR"), (step - 1) // every * every)
        open(os.environ["KILL_MARK"], "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


if os.environ.get("MODE") == "reiter":
    prefetcher = reiterating_prefetcher(loader)
    for _ in range(30):
        input, target = prefetcher.next()
        loss = ((model(input) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        seen.append(input.clone())
        kill_here(step)
for epoch in range(0 if os.environ.get("MODE") == "reiter" else 3):
    prefetcher = data_prefetcher(loader)
    input, target = prefetcher.next()
    while input is not None:
        loss = ((model(input) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        seen.append(input.clone())
        kill_here(step)
        input, target = prefetcher.next()
torch.save({"model": model.state_dict(), "batches": torch.stack(seen)}, sys.argv[1])
