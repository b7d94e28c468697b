"""A script with its own auto-resume (never mentions pyckpt): at start it loads LAST if it exists
(model, Adam, RNG, epoch, step) and starts at the next epoch; at each epoch's end it saves LAST.

env: LAST (its own checkpoint file), EPOCHS, KILL_AT=N (SIGKILL right after step N unless KILL_MARK exists),
KILL_AFTER_COMMIT=DIR (before that kill, wait up to 60 s for a committed checkpoint in DIR: a
snapshot taken a few steps before the kill is still being written on a slow machine)
argv[1]: where to torch.save the final state
"""
import os
import signal
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from commit_wait import wait_for_commit


def main():
    torch.manual_seed(0)
    x = torch.randn(100, 5)
    loader = DataLoader(TensorDataset(x, torch.sin(x.sum(1, keepdim=True))), batch_size=10, shuffle=True)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    last = os.environ["LAST"]
    start_epoch, step = 0, 0
    if os.path.exists(last):
        ck = torch.load(last)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        torch.set_rng_state(ck["rng"])
        start_epoch, step = ck["epoch"] + 1, ck["step"]
        print("RESUMED OWN", ck["epoch"], flush=True)
    for epoch in range(start_epoch, int(os.environ.get("EPOCHS", "6"))):
        for xb, yb in loader:
            loss = ((model(xb) - yb) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            mark = os.environ.get("KILL_MARK", "")
            if os.environ.get("KILL_AT") == str(step) and mark and not os.path.exists(mark):
                open(mark, "w").close()
                wait_for_commit(os.environ.get("KILL_AFTER_COMMIT"))
                os.kill(os.getpid(), signal.SIGKILL)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch, "step": step,
                    "rng": torch.get_rng_state()}, last)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, sys.argv[1])


main()
