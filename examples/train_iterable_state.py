"""Train on a streamed dataset that can save and restore its own position.

The style of training on a large sharded corpus: an ``IterableDataset`` reads records
shard by shard (here generated from a seed, no downloads), shuffles within a shard with
a per-epoch seed, and offers ``state_dict()``/``load_state_dict()`` as Hugging Face
``datasets`` iterable datasets and torchdata's stateful loaders do: the state is the
position in the current pass, and a loaded state makes the next ``iter()`` continue from
there. Reading a record is the expensive part of such pipelines, so the dataset counts
the records it reads and the script prints the count at the end.

    python examples/train_iterable_state.py --out final.pt
"""
import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train on a streamed dataset with a resumable position.")
    p.add_argument("--out", required=True, help="where to write the final state (torch.save)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--shard-size", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-sleep", type=float, default=0.0,
                   help="seconds to sleep after each step (stand-in for a bigger model)")
    return p.parse_args()


class ShardStream(IterableDataset):
    """Records read shard by shard, shuffled within each shard with a per-epoch seed."""

    def __init__(self, shards: int, shard_size: int, seed: int) -> None:
        self.shards, self.shard_size, self.seed = shards, shard_size, seed
        self.epoch, self.shard, self.offset = 0, 0, 0  # position of the current pass
        self.resume_from: dict | None = None
        self.records_read = 0

    def _read(self, shard: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.records_read += 1
        g = torch.Generator().manual_seed(self.seed * 1000 + shard * 100 + i)
        x = torch.randn(8, generator=g)
        return x, (x[:4].sum() > x[4:].sum()).long()

    def __iter__(self):
        if self.resume_from is not None:
            start, self.resume_from = self.resume_from, None
            self.epoch, first_shard, first_offset = start["epoch"], start["shard"], start["offset"]
        else:
            first_shard, first_offset = 0, 0
        for shard in range(first_shard, self.shards):
            order = torch.randperm(self.shard_size, generator=torch.Generator().manual_seed(self.epoch * 7 + shard))
            for offset in range(first_offset if shard == first_shard else 0, self.shard_size):
                self.shard, self.offset = shard, offset + 1
                yield self._read(shard, int(order[offset]))
        self.epoch += 1
        self.shard, self.offset = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "shard": self.shard, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.resume_from = dict(state)


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    data = ShardStream(args.shards, args.shard_size, args.seed + 1)
    loader = DataLoader(data, batch_size=args.batch_size)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 2))
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr)

    for epoch in range(args.epochs):
        for x, y in loader:
            x = x + 0.05 * torch.randn_like(x)  # augmentation in the main process
            loss = F.cross_entropy(model(x), y)
            optim.zero_grad()
            loss.backward()
            optim.step()
            step = int(optim.state[optim.param_groups[0]["params"][0]]["step"])
            print(f"step {step} epoch {epoch} loss {loss.item():.9g}", flush=True)
            time.sleep(args.step_sleep)

    print(f"records read {data.records_read}", flush=True)
    torch.save({"model": model.state_dict(), "optim": optim.state_dict()}, args.out)


if __name__ == "__main__":
    main()
