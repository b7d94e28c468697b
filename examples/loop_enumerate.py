"""Epoch loop over ``enumerate(loader)`` with a hand-kept global step (a common tutorial style).

    python examples/loop_enumerate.py --out final.pt

The learning rate warms up linearly with ``global_step`` (set by hand in the
param groups), an epoch ends early at ``i >= max_batches``, and every
``log_every`` batches the running loss is logged and reset.
"""
import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def main():
    p = argparse.ArgumentParser(description="enumerate(loader) training with a global step")
    p.add_argument("--out", required=True, help="where to write the final state (torch.save)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-batches", type=int, default=7)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--log-every", type=int, default=3)
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep after each step")
    args = p.parse_args()

    torch.manual_seed(0)
    x = torch.randn(96, 8)
    data = TensorDataset(x, (x[:, 0] > 0).long())
    loader = DataLoader(data, batch_size=8, shuffle=True)  # 12 batches, only max_batches used
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    global_step = 0
    logged = []
    for epoch in range(args.epochs):
        model.train()
        running_loss = 0.0
        for i, (inputs, labels) in enumerate(loader):
            if i >= args.max_batches:
                break
            lr = args.lr * min(1.0, (global_step + 1) / args.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad()
            loss = F.cross_entropy(model(inputs), labels)
            loss.backward()
            optimizer.step()
            global_step += 1
            running_loss += loss.item()
            if i % args.log_every == args.log_every - 1:
                logged.append(round(running_loss / args.log_every, 6))
                running_loss = 0.0
            print(f"step {global_step} epoch {epoch} loss {loss.item():.9g} i {i} lr {lr:.9g}", flush=True)
            time.sleep(args.step_sleep)

    print(f"FINAL global_step {global_step} logged {logged}", flush=True)
    torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, args.out)


if __name__ == "__main__":
    main()
