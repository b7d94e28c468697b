"""Training with a validation DataLoader whose workers persist (``persistent_workers=True``), driven by
tests/transparent/test_persistent_eval.py. The model has dropout (training draws from the main process's
generator); the validation set adds noise in its workers (validation draws from theirs).

MODE: steps (validation every 3 optimizer steps) | epoch (also at each epoch's end: a relaunch runs the skipped
epochs' end-of-epoch validations, not the others, before the restore point) | remade (a new validation loader at each validation, kept in a
variable until the next) | early (each validation stops after 2 of its 6 batches).
KILL_AT=N[,M...]: SIGKILL itself right after optimizer step N, once each (KILL_MARK-N: the file that says it was
done).
STEP_SLEEP: seconds to sleep after each step (a snapshot is then committed before the next kill).
argv[1]: where to torch.save the final state and the validation losses.
"""
import os
import signal
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

MODE = os.environ.get("MODE", "steps")


class Noisy(Dataset):
    def __init__(self, n: int) -> None:
        self.x = torch.randn(n, 6, generator=torch.Generator().manual_seed(n))
        self.y = self.x.sum(1, keepdim=True)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i] + 0.1 * torch.randn(6), self.y[i]  # drawn in the worker that loads it


def maybe_die(step: int) -> None:
    mark = os.environ.get("KILL_MARK", "") + f"-{step}"
    if str(step) in os.environ.get("KILL_AT", "").split(",") and not os.path.exists(mark):
        open(mark, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


def make_val() -> DataLoader:
    return DataLoader(Noisy(24), batch_size=4, num_workers=2, persistent_workers=True)


torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
train = DataLoader(Noisy(64), batch_size=8, shuffle=True)
val = make_val()
losses = []


def validate() -> None:
    global val
    if MODE == "remade":
        val = make_val()
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i, (x, y) in enumerate(val):
            if MODE == "early" and i == 2:
                break
            total += nn.functional.mse_loss(model(x), y).item()
    losses.append(total)
    model.train()


step = 0
for epoch in range(3):
    for x, y in train:
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 3 == 0:
            validate()
        time.sleep(float(os.environ.get("STEP_SLEEP", "0")))
        maybe_die(step)
    if MODE == "epoch":
        validate()
torch.save({"model": model.state_dict(), "losses": torch.tensor(losses, dtype=torch.float64)}, sys.argv[1])
