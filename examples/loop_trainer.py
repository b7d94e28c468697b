"""A trainer object that keeps its position in ``self.iter_num`` (the minGPT style).

    python examples/loop_trainer.py --out final.pt

The loader draws samples with replacement forever (``RandomSampler(replacement=True,
num_samples=10**10)``) in two worker processes; ``Trainer.run`` pulls batches with
``next()`` and stops when ``self.iter_num`` reaches ``max_iters``. The trainer also
keeps the last loss and the best loss seen. ``LOOP_HOLD_AFTER_STEP=N`` makes it wait 300 s
after step N (tests SIGKILL it there).
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset


class Config:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class Trainer:
    def __init__(self, config, model, train_dataset):
        self.config = config
        self.model = model
        self.train_dataset = train_dataset
        self.optimizer = None
        self.iter_num = 0
        self.iter_time = 0.0
        self.iter_dt = 0.0
        self.loss = None
        self.best_loss = float("inf")
        self.history = []

    def run(self):
        model, config = self.model, self.config
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.1)
        train_loader = DataLoader(
            self.train_dataset,
            sampler=RandomSampler(self.train_dataset, replacement=True, num_samples=int(1e10)),
            shuffle=False,
            batch_size=config.batch_size,
            num_workers=config.num_workers,
        )
        model.train()
        self.iter_num = 0
        self.iter_time = time.time()
        data_iter = iter(train_loader)
        while True:
            try:
                batch = next(data_iter)
            except StopIteration:
                data_iter = iter(train_loader)
                batch = next(data_iter)
            x, y = batch
            self.loss = F.mse_loss(model(x), y)
            model.zero_grad(set_to_none=True)
            self.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_norm_clip)
            self.optimizer.step()

            self.iter_num += 1
            tnow = time.time()
            self.iter_dt = tnow - self.iter_time
            self.iter_time = tnow
            self.best_loss = min(self.best_loss, self.loss.item())
            if self.iter_num % 5 == 0:
                self.history.append(round(self.loss.item(), 6))
            print(f"step {self.iter_num} epoch 0 loss {self.loss.item():.9g}", flush=True)
            time.sleep(config.step_sleep)
            if os.environ.get("LOOP_HOLD_AFTER_STEP") == str(self.iter_num):
                time.sleep(300)  # for tests: read here, not kept in the trainer, so a relaunch does not inherit it
            if config.max_iters is not None and self.iter_num >= config.max_iters:
                break


def main():
    p = argparse.ArgumentParser(description="trainer-object training from an endless sampler")
    p.add_argument("--out", required=True, help="where to write the final state (torch.save)")
    p.add_argument("--max-iters", type=int, default=20)
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep after each step")
    args = p.parse_args()
    torch.manual_seed(3407)
    x = torch.randn(512, 10)
    data = TensorDataset(x, torch.tanh(x[:, :2].sum(dim=1, keepdim=True)))
    model = nn.Sequential(nn.Linear(10, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 1))
    config = Config(learning_rate=3e-3, batch_size=16, num_workers=2, grad_norm_clip=1.0,
                    max_iters=args.max_iters, step_sleep=args.step_sleep)
    trainer = Trainer(config, model, data)
    trainer.run()
    print(f"FINAL iter_num {trainer.iter_num} best_loss {trainer.best_loss:.9g} history {trainer.history}",
          flush=True)
    torch.save({"model": model.state_dict(), "optim": trainer.optimizer.state_dict()}, args.out)


if __name__ == "__main__":
    main()
