"""Train for a fixed number of steps from an endless stream of batches.

    python examples/train_infinite.py --out final.pt --max-steps 20

The style of large pre-training runs: the sampler draws with replacement
forever (one epoch that never ends), so training is counted in optimizer steps,
not epochs; the learning rate warms up and then decays with a LambdaLR
stepped every batch.
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train for a fixed number of steps from an endless stream.")
    p.add_argument("--out", required=True, help="where to write the final state (torch.save)")
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-sleep", type=float, default=0.0,
                   help="seconds to sleep after each step (stand-in for a bigger model)")
    return p.parse_args()


def make_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    return TensorDataset(x, torch.sin(x[:, :3].sum(dim=1, keepdim=True)))


def warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    data = make_data(256, args.seed + 1)
    sampler = RandomSampler(data, replacement=True, num_samples=10**10)
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler)
    model = nn.Sequential(nn.Linear(12, 48), nn.Tanh(), nn.Dropout(0.1), nn.Linear(48, 1))
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, warmup_cosine(args.warmup, args.max_steps))

    for x, y in loader:
        loss = F.mse_loss(model(x), y)
        optim.zero_grad()
        loss.backward()
        optim.step()
        sched.step()
        step = int(optim.state[optim.param_groups[0]["params"][0]]["step"])
        print(f"step {step} epoch 0 loss {loss.item():.9g}", flush=True)
        time.sleep(args.step_sleep)
        if step >= args.max_steps:
            break

    torch.save({"model": model.state_dict(), "optim": optim.state_dict(),
                "sched": sched.state_dict()}, args.out)


if __name__ == "__main__":
    main()
