"""A word-level LSTM language model trained with hand-written SGD updates (the
PyTorch word_language_model example's style).

    python examples/loop_rnn.py --out final.pt

No optimizer: after ``backward()`` the gradients are clipped and applied with
``p.data.add_(p.grad, alpha=-lr)``. Batches are sliced from a batchified token
tensor in ``for batch, i in enumerate(range(0, n, bptt))``, the hidden state is
carried from batch to batch, and the module-global ``lr`` is divided by 4 after
an epoch whose validation loss did not improve.
"""
import argparse
import time

import torch
from torch import nn

parser = argparse.ArgumentParser(description="LSTM language model, hand-written updates")
parser.add_argument("--out", required=True, help="where to write the final state (torch.save)")
parser.add_argument("--epochs", type=int, default=4)
parser.add_argument("--lr", type=float, default=20.0)
parser.add_argument("--clip", type=float, default=0.25)
parser.add_argument("--bptt", type=int, default=6)
parser.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep after each step")
args = parser.parse_args()

torch.manual_seed(1111)
ntokens, batch_size, eval_batch_size = 40, 4, 2
corpus = torch.randint(ntokens, (260,))


def batchify(data, bsz):
    nbatch = data.size(0) // bsz
    return data.narrow(0, 0, nbatch * bsz).view(bsz, -1).t().contiguous()


train_data = batchify(corpus[:200], batch_size)
val_data = batchify(corpus[200:], eval_batch_size)


class RNNModel(nn.Module):
    def __init__(self, ntoken, ninp, nhid, dropout=0.2):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, 1)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nhid = nhid

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        decoded = self.decoder(self.drop(output)).view(-1, self.decoder.out_features)
        return torch.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        return (weight.new_zeros(1, bsz, self.nhid), weight.new_zeros(1, bsz, self.nhid))


model = RNNModel(ntokens, 16, 24)
criterion = nn.NLLLoss()


def repackage_hidden(h):
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


def get_batch(source, i):
    seq_len = min(args.bptt, len(source) - 1 - i)
    data = source[i:i + seq_len]
    target = source[i + 1:i + 1 + seq_len].view(-1)
    return data, target


def evaluate(data_source):
    model.eval()
    total_loss = 0.0
    hidden = model.init_hidden(eval_batch_size)
    with torch.no_grad():
        for i in range(0, data_source.size(0) - 1, args.bptt):
            data, targets = get_batch(data_source, i)
            output, hidden = model(data, hidden)
            hidden = repackage_hidden(hidden)
            total_loss += len(data) * criterion(output, targets).item()
    return total_loss / (len(data_source) - 1)


def train():
    model.train()
    total_loss = 0.0
    start_time = time.time()
    hidden = model.init_hidden(batch_size)
    nbatches = (train_data.size(0) - 1 + args.bptt - 1) // args.bptt
    for batch, i in enumerate(range(0, train_data.size(0) - 1, args.bptt)):
        data, targets = get_batch(train_data, i)
        model.zero_grad()
        hidden = repackage_hidden(hidden)
        output, hidden = model(data, hidden)
        loss = criterion(output, targets)
        loss.backward()

        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)

        total_loss += loss.item()
        step = (epoch - 1) * nbatches + batch + 1
        print(f"step {step} epoch {epoch} loss {loss.item():.9g} lr {lr:g}", flush=True)
        time.sleep(args.step_sleep)
    return total_loss, time.time() - start_time


lr = args.lr
best_val_loss = None
val_losses = []
for epoch in range(1, args.epochs + 1):
    train_loss, elapsed = train()
    val_loss = evaluate(val_data)
    val_losses.append(round(val_loss, 6))
    print(f"end of epoch {epoch} valid loss {val_loss:.9g}", flush=True)
    if not best_val_loss or val_loss < best_val_loss:
        best_val_loss = val_loss
    else:
        lr /= 4.0

print(f"FINAL lr {lr:g} best_val_loss {best_val_loss:.9g} val_losses {val_losses}", flush=True)
torch.save({"model": model.state_dict()}, args.out)
