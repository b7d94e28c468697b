"""Train a tiny GPT the way nanoGPT does: tied embeddings, random-offset batches.

    python examples/train_gpt.py --out final.pt

A decoder-only transformer on a synthetic token stream. What makes it a test of
transparent checkpointing is how such scripts are written, not the model's
size: the output head shares its weight with the token embedding (one tensor,
two names); batches are cut at random offsets drawn from the global RNG, with
no DataLoader; an evaluation every few iterations draws batches from that RNG
as well; AdamW has a weight-decay and a no-decay group; the learning rate is
set by hand each iteration (warmup, then cosine); gradients are accumulated
over micro-batches and clipped; dropout draws from the RNG during training.
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a tiny GPT (nanoGPT-style loop).")
    p.add_argument("--out", required=True, help="where to write the final state (torch.save)")
    p.add_argument("--iters", type=int, default=20, help="optimizer steps")
    p.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block", type=int, default=16, help="context length")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-sleep", type=float, default=0.0,
                   help="seconds to sleep after each step (stand-in for a bigger model)")
    return p.parse_args()


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))
        self.heads, self.dropout = heads, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, block: int, dim: int = 32, layers: int = 2, heads: int = 2,
                 dropout: float = 0.1):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(block, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight  # weight tying
        for name, p in self.named_parameters():  # small init, as GPT-2: tied logits start near zero
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.tok(idx) + self.pos(torch.arange(idx.shape[1])))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def make_corpus(n: int, vocab: int, seed: int) -> torch.Tensor:
    """A token stream with structure to learn: each token mostly follows from the one before."""
    g = torch.Generator().manual_seed(seed)
    nxt = torch.randint(vocab, (vocab,), generator=g)
    out = torch.empty(n, dtype=torch.long)
    out[0] = 0
    noise = torch.rand(n, generator=g) < 0.2
    rand = torch.randint(vocab, (n,), generator=g)
    for i in range(1, n):
        out[i] = rand[i] if noise[i] else nxt[out[i - 1]]
    return out


def get_batch(data: torch.Tensor, block: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    ix = torch.randint(len(data) - block - 1, (batch,))  # the global RNG, as nanoGPT does
    x = torch.stack([data[i:i + block] for i in ix])
    y = torch.stack([data[i + 1:i + 1 + block] for i in ix])
    return x, y


def lr_at(it: int, args: argparse.Namespace) -> float:
    warmup = max(1, args.iters // 10)
    if it < warmup:
        return args.lr * (it + 1) / warmup
    ratio = (it - warmup) / max(1, args.iters - warmup)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * ratio)))


@torch.no_grad()
def estimate_loss(model: nn.Module, data: torch.Tensor, args: argparse.Namespace) -> float:
    model.eval()
    losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
              for x, y in (get_batch(data, args.block, args.batch_size) for _ in range(2))]
    model.train()
    return sum(losses) / len(losses)


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    vocab = 32
    corpus = make_corpus(4096, vocab, args.seed + 1)
    train, val = corpus[:3600], corpus[3600:]
    model = GPT(vocab, args.block)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                               {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    val_loss = float("nan")
    for it in range(args.iters):
        for group in optim.param_groups:
            group["lr"] = lr_at(it, args)
        if it % args.eval_every == 0:
            val_loss = estimate_loss(model, val, args)
        for _ in range(args.accum):
            x, y = get_batch(train, args.block, args.batch_size)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()) / args.accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        print(f"step {it + 1} epoch 0 loss {loss.item() * args.accum:.9g} val {val_loss:.9g}", flush=True)
        time.sleep(args.step_sleep)

    torch.save({"model": model.state_dict(), "optim": optim.state_dict()}, args.out)


if __name__ == "__main__":
    main()
