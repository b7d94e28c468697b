"""Training loops whose first optimizer step comes late or never (driven by tests/transparent/test_unseen_steps.py).

MODE: accum (ACCUM micro-batches of one sample, default 20, per AdamW step: backward() at each, the first step
after ACCUM fetches) | prefetch (the same, each window's batches fetched before its backward() calls, as Hugging
Face's Trainer does) | autograd_grad (the model's weights updated by hand from torch.autograd.grad: no optimizer,
no backward()) | func (torch.func.grad over a dict of parameter tensors the loop holds; the module is a template
only) | eval (no training: a loss summed over the loader).
KILL_AT=N: SIGKILL itself right after optimizer step N, once (KILL_MARK: the file that says it was done).
argv[1]: where to torch.save the final state.
"""
import os
import signal
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

MODE = os.environ.get("MODE", "accum")
ACCUM = int(os.environ.get("ACCUM", "20"))

torch.manual_seed(0)
data = TensorDataset(torch.randn(160, 6), torch.randn(160, 1))
loader = DataLoader(data, batch_size=1, shuffle=True)
model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))


def maybe_die(step: int) -> None:
    mark = os.environ.get("KILL_MARK", "")
    if os.environ.get("KILL_AT") == str(step) and mark and not os.path.exists(mark):
        open(mark, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


out = {}
if MODE == "accum":
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step = 0
    for epoch in range(2):
        for i, (x, y) in enumerate(loader):
            (nn.functional.mse_loss(model(x), y) / ACCUM).backward()
            if (i + 1) % ACCUM == 0:
                opt.step()
                opt.zero_grad()
                step += 1
                maybe_die(step)
    out = {"model": model.state_dict(), "opt": opt.state_dict()["state"], "step": step}
elif MODE == "prefetch":
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step = 0
    for epoch in range(2):
        it = iter(loader)
        for _ in range(len(loader) // ACCUM):
            window = [next(it) for _ in range(ACCUM)]
            for x, y in window:
                (nn.functional.mse_loss(model(x), y) / ACCUM).backward()
            opt.step()
            opt.zero_grad()
            step += 1
            maybe_die(step)
    out = {"model": model.state_dict(), "opt": opt.state_dict()["state"], "step": step}
elif MODE == "autograd_grad":
    for epoch in range(2):
        for x, y in loader:
            grads = torch.autograd.grad(nn.functional.mse_loss(model(x), y), list(model.parameters()))
            with torch.no_grad():
                for p, g in zip(model.parameters(), grads):
                    p -= 0.05 * g
    out = {"model": model.state_dict()}
elif MODE == "func":
    from torch.func import functional_call, grad

    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    step_grad = grad(lambda p, x, y: nn.functional.mse_loss(functional_call(model, p, (x,)), y))
    for epoch in range(2):
        for x, y in loader:
            g = step_grad(params, x, y)
            params = {k: params[k] - 0.05 * g[k] for k in params}
    out = {"params": params}
elif MODE == "eval":
    with torch.no_grad():
        total = sum(nn.functional.mse_loss(model(x), y) for x, y in loader)
    out = {"total": total}
torch.save(out, sys.argv[1])
print("TRAINED")
