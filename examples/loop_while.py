"""Train a tiny language model in a module-level ``while True:`` loop (the nanoGPT style).

    python examples/loop_while.py --out final.pt

No DataLoader: batches are drawn with ``torch.randint`` from a token tensor, the
next batch is fetched between forward and backward, gradients are accumulated
over micro-steps, the learning rate is computed from the module-global
``iter_num``, and every few iterations an evaluation draws random batches.
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

p = argparse.ArgumentParser(description="while-loop training without a DataLoader")
p.add_argument("--out", required=True, help="where to write the final state (torch.save)")
p.add_argument("--max-iters", type=int, default=24)
p.add_argument("--eval-interval", type=int, default=5)
p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep after each step")
args = p.parse_args()

block_size, batch_size, vocab = 8, 4, 32
gradient_accumulation_steps = 2
eval_iters = 3
learning_rate, min_lr, warmup_iters = 3e-3, 3e-4, 4
torch.manual_seed(1337)
tokens = torch.randint(vocab, (2000,))
train_data, val_data = tokens[:1800], tokens[1800:]


def get_batch(split):
    data = train_data if split == "train" else val_data
    ix = torch.randint(len(data) - block_size, (batch_size,))
    x = torch.stack([data[i:i + block_size] for i in ix])
    y = torch.stack([data[i + 1:i + 1 + block_size] for i in ix])
    return x, y


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(vocab, 24)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(24, vocab)

    def forward(self, idx, targets=None):
        logits = self.head(self.drop(self.emb(idx)))
        loss = None if targets is None else F.cross_entropy(logits.view(-1, vocab), targets.view(-1))
        return logits, loss


@torch.no_grad()
def estimate_loss():
    out = {}
    model.eval()
    for split in ["train", "val"]:
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            X, Y = get_batch(split)
            _, loss = model(X, Y)
            losses[k] = loss.item()
        out[split] = losses.mean()
    model.train()
    return out


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    ratio = (it - warmup_iters) / (args.max_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


model = TinyLM()
optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.1)

X, Y = get_batch("train")  # first batch
t0 = time.time()
iter_num = 0
local_iter_num = 0
best_val_loss = 1e9
evals = []
while True:
    lr = get_lr(iter_num)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    if iter_num % args.eval_interval == 0:
        losses = estimate_loss()
        evals.append(round(float(losses["val"]), 6))
        print(f"eval {iter_num} train {losses['train']:.9g} val {losses['val']:.9g}", flush=True)
        if losses["val"] < best_val_loss:
            best_val_loss = losses["val"]
    for micro_step in range(gradient_accumulation_steps):
        logits, loss = model(X, Y)
        loss = loss / gradient_accumulation_steps
        X, Y = get_batch("train")  # prefetch the next batch while this one is in flight
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t1 = time.time()
    dt, t0 = t1 - t0, t1
    lossf = loss.item() * gradient_accumulation_steps
    iter_num += 1
    local_iter_num += 1
    print(f"step {iter_num} epoch 0 loss {lossf:.9g} lr {lr:.9g}", flush=True)
    time.sleep(args.step_sleep)
    if iter_num >= args.max_iters:
        break

print(f"FINAL iter_num {iter_num} best_val_loss {float(best_val_loss):.9g} evals {evals}", flush=True)
torch.save({"model": model.state_dict(), "optim": optimizer.state_dict(), "X": X, "Y": Y,
            "rng": torch.get_rng_state()}, args.out)
