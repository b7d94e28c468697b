"""A learning-rate range test over the training loader before training (driven by tests/transparent/test_range_test.py).

The range test draws 6 batches of the loader's first epoch with next() (STYLE=next; STYLE=reiter: a new iter()
at StopIteration, as torch-lr-finder's iterator does; STYLE=for: a for loop with a break), stepping SGD at a rising
learning rate, then puts the weights back and leaves that epoch; training then runs 3 epochs of 10 batches with
AdamW at a tenth of the best rate, dropout drawing from the global generator. STYLE=sample: no range test, one batch
drawn with next(iter(loader)) first (to size a model, to log a sample), the rate fixed; STYLE=tutorial: the same
with the iterator kept in a variable (``dataiter = iter(loader)``, as PyTorch's tutorial does); STYLE=epoch_sample: no
range test, and at each epoch's end one batch drawn with next(iter(loader)), its loss logged.
KILL_AT=N: SIGKILL itself right after training step N (counted from the range test's first), once (KILL_MARK).
argv[1]: where to torch.save the final state.
"""
import copy
import os
import signal
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

STYLE = os.environ.get("STYLE", "next")

torch.manual_seed(0)
loader = DataLoader(TensorDataset(torch.randn(40, 6), torch.randn(40, 1)), batch_size=4, shuffle=True)
model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.2), nn.Linear(8, 1))
steps = 0


def maybe_die() -> None:
    mark = os.environ.get("KILL_MARK", "")
    if os.environ.get("KILL_AT") == str(steps) and mark and not os.path.exists(mark):
        open(mark, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


def batches(n: int):
    if STYLE == "for":
        for i, b in enumerate(loader):
            if i == n:
                break
            yield b
        return
    it = iter(loader)
    for _ in range(n):
        try:
            yield next(it)
        except StopIteration:
            if STYLE != "reiter":
                raise
            it = iter(loader)
            yield next(it)


def range_test(n: int = 6, lo: float = 1e-4, hi: float = 1.0) -> float:
    global steps
    start = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=lo)
    best, best_lr = float("inf"), lo
    for i, (x, y) in enumerate(batches(n)):
        for g in opt.param_groups:
            g["lr"] = lo * (hi / lo) ** (i / (n - 1))
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        if loss.item() < best:
            best, best_lr = loss.item(), opt.param_groups[0]["lr"]
    model.load_state_dict(start)
    return best_lr / 10


log = []
if STYLE == "epoch_sample":
    lr = 1e-2
elif STYLE == "sample":
    sample = next(iter(loader))[0]
    lr = 1e-2 + 1e-3 * float(sample.mean())
elif STYLE == "tutorial":  # PyTorch's CIFAR-10 tutorial: the iterator stays referenced while training runs
    dataiter = iter(loader)
    images, labels = next(dataiter)
    lr = 1e-2 + 1e-3 * float(images.mean())
else:
    lr = range_test()
opt = torch.optim.AdamW(model.parameters(), lr=lr)
for epoch in range(3):
    for x, y in loader:
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        maybe_die()
    if STYLE == "epoch_sample":
        xs, ys = next(iter(loader))
        with torch.no_grad():
            log.append(nn.functional.mse_loss(model(xs), ys))
torch.save({"model": model.state_dict(), "opt": opt.state_dict()["state"], "lr": lr, "steps": steps, "log": log},
           sys.argv[1])
print("TRAINED")
