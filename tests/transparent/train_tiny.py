"""A tiny training script that never mentions pyckpt (driven by the tests in this folder).

MODE: adamw (default) | gan | lbfgs | patched | compiled | while | lbfgs_while | manual | ema | phases | peek
| reiter | fixed_next | epoch_log | unfreeze | subset | flags | attrs | attrs_while | zipgen | islice | tqdm_off | split | split_direct
| chain | hooks | cycle (and the others below)
(loose: the optimizer also updates a bare Parameter and a leaf tensor no module owns;
phases: AdamW in epoch 0, then a new SGD over every parameter; peek: every 5 steps, a nanoGPT-style
loss estimate on 2 batches of the training loader itself and a sample from a second loader of the same kind; ema: an AveragedModel, a teacher copy and a 1.4 MB target module updated in place, none owning an
optimizer parameter; the target is over lazy capture's eager-copy size, so its copy is guarded;
manual_while: weights updated by hand (an optimizer exists, never steps) on one batch, no loader in the loop;
manual_reentrant: manual_while with the last layer under a reentrant activation checkpoint (its backward()
runs inside the script's backward());
compiled_step: the optimizer step under torch.compile (the compiled-optimizer recipe; its hooks run inside
the compiled region); compiled_step_while: the same on one batch, no DataLoader at all;
sam_while: SAM's two-step use (backward, weights moved by hand, backward, moved back, AdamW step) on one batch,
no loader in the loop;
lbfgs_while: LBFGS (its closure calls backward() inside step()) on one batch, no loader in the loop;
reiter: 30 steps counted by the script, `next(it)` and a new `iter(loader)` at StopIteration, the
scheduler stepped there (reiter_stream: the same over an IterableDataset,
whose loader has no len()); fixed_next: per epoch `it = iter(loader)` and 7 steps of `next(it)`;
lookahead: an optimizer of the script's class (Lookahead over AdamW) with a step counter and slow weights;
flags: the dropout layer put in eval mode at steps 6 and 13, until the epoch loop's model.train();
attrs: the last layer keeps state outside state_dict() (Annealed: a counter, a plain tensor attribute, a
non-persistent buffer made in forward), dropout's p is set to 0.5 and the SmoothL1Loss's beta to 0.25 at
step 6; attrs_while: the same on
one batch, no loader in the loop;
knobs: a dataset of the script's class whose crop length, and a collate_fn object whose scale, the loop
sets after each step (WORKERS: the loader's num_workers); reshuffle: the dataset's order is a list shuffled
in place with NumPy at each epoch's start, batches augmented in the main process from NumPy's generator;
epoch_log: the
per-epoch code prints a value of the epoch's last batch (a variable set only inside the loader loop);
unfreeze: the first layer frozen until step 6, unfrozen in the training loop; subset: each epoch trains on a
new loader over 32 of the 40 samples drawn with torch.randperm before its iter(); multiepoch: timm's
MultiEpochsDataLoader, one iterator for the whole run over a shuffled batch sampler repeated forever, each pass
drawing its order from torch's global generator in the middle of that iterator; ohem: a WeightedRandomSampler
whose weights tensor the loop updates in place from per-sample losses before each step; metriclogger: the
torchvision references' MetricLogger, its meters in a defaultdict made at their first update, each epoch's
mean loss saved; chain: each epoch over itertools.chain of the loader and a second one; hooks: a forward
pre-hook object keeping a running mean, a gradient hook closure drawing noise, an optimizer step pre-hook
object counting steps for a weight-decay warm-up, none held by a variable, and a LambdaLR whose factor
function counts its calls in a closure; modglobals: settings in modules of the script's own that the loop
changes, tiny_settings.py (``import tiny_settings``: a scale decayed after each step, a log of the losses) and
tiny_counter.py (reached only through ``from tiny_counter import jitter``: a call counter); codestate: values
the script keeps on its classes and functions: a class attribute annealed after each step, a function attribute
counting calls for a warm-up, a mutable default argument keeping recent values)
KILL_AT=N: SIGKILL itself right after optimizer step N (only when KILL_MARK does not exist yet)
TERM_AT=N: SIGTERM itself right after optimizer step N (same marker rule)
argv[1]: where to torch.save the final state
"""
import copy
import itertools
import os
import random
import signal
import sys
import types

import torch
import torch.utils.checkpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

MODE = os.environ.get("MODE", "adamw")
EPOCHS = int(os.environ.get("EPOCHS", "3"))


def maybe_die(step):
    mark = os.environ.get("KILL_MARK", "")
    for var, sig in (("KILL_AT", signal.SIGKILL), ("TERM_AT", signal.SIGTERM)):
        if os.environ.get(var) == str(step) and mark and not os.path.exists(mark):
            open(mark, "w").close()
            os.kill(os.getpid(), sig)


torch.manual_seed(0)
data = TensorDataset(torch.randn(40, 6), torch.randn(40, 1))
loader = DataLoader(data, batch_size=4, shuffle=True)
if MODE == "reiter_stream":  # reiter over an IterableDataset: its loader has no len()
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(data)

    loader = DataLoader(Stream(), batch_size=4)
if MODE == "lazy_gen":  # a sampler making its generator at its first __iter__ (as accelerate's
    # SeedableRandomSampler does), then drawing each epoch's order from it
    class LazySampler(torch.utils.data.Sampler):
        def __init__(self, n):
            self.n, self.generator = n, None

        def __len__(self):
            return self.n

        def __iter__(self):
            if self.generator is None:
                self.generator = torch.Generator()
                self.generator.manual_seed(7)
            return iter(torch.randperm(self.n, generator=self.generator).tolist())

    loader = DataLoader(data, batch_size=4, sampler=LazySampler(len(data)))
if MODE == "lazy_aug":  # a dataset making its augmentation generator at its first __getitem__
    class LazyAug(TensorDataset):
        def __init__(self, *tensors):
            super().__init__(*tensors)
            self.rng = None

        def __getitem__(self, i):
            if self.rng is None:
                self.rng = random.Random(5)
            x, y = super().__getitem__(i)
            return x * (1 + 0.1 * self.rng.random()), y

    loader = DataLoader(LazyAug(*data.tensors), batch_size=4, shuffle=True)
if MODE == "peek":  # the same signature as the training loader (dataset type and length, batch size, ...)
    twin_loader = DataLoader(TensorDataset(torch.randn(40, 6), torch.randn(40, 1)), batch_size=4, shuffle=True)
if MODE == "chain":  # a second loader (its own dataset length) chained after the training one
    extra_loader = DataLoader(TensorDataset(torch.randn(24, 6), torch.randn(24, 1)), batch_size=4, shuffle=True)
if MODE == "zipgen":  # a second loader (its own dataset length) zipped with the training one
    aux_loader = DataLoader(TensorDataset(torch.randn(48, 6)), batch_size=4, shuffle=True)
val_loader = DataLoader(TensorDataset(torch.randn(12, 6), torch.randn(12, 1)), batch_size=4)


class Reentrant(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=True)


class Annealed(nn.Linear):
    """State outside state_dict(): a forward counter, a gain kept as a plain tensor attribute, and a table
    rebuilt every 5 calls into a non-persistent buffer registered empty, with its length in a plain int."""

    def __init__(self, *a):
        super().__init__(*a)
        self.calls, self.gain, self.table_len = 0, torch.ones(()), -1
        self.register_buffer("table", None, persistent=False)

    def forward(self, x):
        if self.training:
            self.calls += 1
            self.gain = self.gain * 0.99
        if self.table_len != self.calls // 5:
            self.table_len = self.calls // 5
            self.table = torch.full((1,), 1 + 0.1 * self.table_len)
        return super().forward(x) * self.gain * self.table


last = (Reentrant(nn.Linear(8, 1)) if MODE == "manual_reentrant" else Annealed(8, 1) if MODE in ("attrs", "attrs_while")
        else nn.Linear(8, 1))
model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.2), last)
models = {"model": model}
if MODE == "compiled":
    model = torch.compile(model, backend="eager")  # state_dict keys gain "_orig_mod."
    models = {"model": model}
class LookaheadAdamW(torch.optim.AdamW):
    """An optimizer of the script's class keeping state outside state_dict(): a step counter and the slow
    weights it pulls the parameters back to every k steps (Lookahead)."""

    def __init__(self, params, k=3, **kw):
        super().__init__(params, **kw)
        self.k, self.counter = k, 0
        self.slow = [p.detach().clone() for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        self.counter += 1
        if self.counter % self.k == 0:
            for p, s in zip([p for g in self.param_groups for p in g["params"]], self.slow):
                s.add_(p - s, alpha=0.5)
                p.copy_(s)
        return loss


if MODE in ("lbfgs", "lbfgs_while"):
    opts = [torch.optim.LBFGS(model.parameters(), lr=0.5, history_size=3, max_iter=3)]
elif MODE == "lookahead":
    opts = [LookaheadAdamW(model.parameters(), lr=1e-2)]
elif MODE == "gan":
    critic = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1))
    models["critic"] = critic
    opts = [torch.optim.Adam(critic.parameters(), lr=1e-2), torch.optim.SGD(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.02}], lr=0.01, momentum=0.9)]
elif MODE == "loose":  # optimizer parameters no module owns: a bare Parameter and a plain leaf tensor
    temp, shift = nn.Parameter(torch.zeros(())), torch.zeros(1, requires_grad=True)
    opts = [torch.optim.AdamW([*model.parameters(), temp, shift], lr=1e-2)]
else:
    opts = [torch.optim.AdamW(model.parameters(), lr=1e-2)]
if MODE == "unfreeze":
    model[0].requires_grad_(False)  # in the optimizer, not trained until unfrozen
if MODE == "ema":
    ema = torch.optim.swa_utils.AveragedModel(model)
    holder = types.SimpleNamespace(teacher=copy.deepcopy(model).requires_grad_(False))
    target = nn.Linear(600, 600).requires_grad_(False)
    models.update(ema=ema, teacher=holder.teacher, target=target)
if MODE == "hooks":  # stateful hooks only torch holds (no variable of the script reaches them)
    class RunningCenter:  # a forward pre-hook centring the input with a running mean it keeps
        def __init__(self):
            self.mean, self.calls = None, 0

        def __call__(self, module, args):
            m = args[0].detach().mean(0)
            self.mean = m if self.mean is None else 0.9 * self.mean + 0.1 * m
            self.calls += 1
            return (args[0] - self.mean,)

    def gradient_noise(seed):  # a gradient hook drawing noise from a generator its closure holds
        g = torch.Generator().manual_seed(seed)
        return lambda grad: grad + 1e-3 * torch.randn(grad.shape, generator=g)

    class Warmup:  # an optimizer step pre-hook setting the weight decay from the steps it counted
        def __init__(self):
            self.k = 0

        def __call__(self, opt, args, kwargs):
            self.k += 1
            for group in opt.param_groups:
                group["weight_decay"] = 0.5 * min(1.0, self.k / 20)

    def halving(every):  # a LambdaLR factor counting its calls in a nonlocal (state_dict() keeps no cells)
        calls = 0

        def factor(_):
            nonlocal calls
            calls += 1
            return 0.5 ** (calls // every)
        return factor

    model[0].register_forward_pre_hook(RunningCenter())
    model[2].weight.register_hook(gradient_noise(7))
    opts[0].register_step_pre_hook(Warmup())
    decay = torch.optim.lr_scheduler.LambdaLR(opts[0], halving(5))  # stepped after each optimizer step
if MODE == "modglobals":
    import tiny_settings
    from tiny_counter import jitter
if MODE == "codestate":
    class Schedule:
        temperature = 1.0  # a class-level setting the loop anneals

    def warm():
        warm.calls = getattr(warm, "calls", 0) + 1  # a function attribute as a counter
        return min(1.0, warm.calls / 8)

    def smoothed(x, recent=[]):  # noqa: B006 - a mutable default keeping state, on purpose
        recent.append(x)
        return sum(recent[-3:]) / len(recent[-3:])
if MODE == "patched":
    def patched_step(self, *a, **k):  # what some libraries do to an optimizer instance
        return type(self).step(self, *a, **k)

    opts[0].step = types.MethodType(patched_step, opts[0])
sched = torch.optim.lr_scheduler.SequentialLR(opts[-1], [  # SequentialLR skips LRScheduler.__init__
    torch.optim.lr_scheduler.LinearLR(opts[-1], start_factor=0.5, total_iters=2),
    torch.optim.lr_scheduler.StepLR(opts[-1], step_size=1, gamma=0.8)], milestones=[2])
plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opts[0], patience=0, factor=0.5)
step = 0
criterion = nn.SmoothL1Loss(beta=1.0)


def compiled_opt_step():
    opts[0].step()


if MODE.startswith("compiled_step"):  # (only there: torch.compile imports Dynamo, 1.5 s, and pyckpt's hooks
    # then run through torch.compiler.disable). Eager backend: Dynamo traces it all the same, without a compiler.
    compiled_opt_step = torch.compile(compiled_opt_step, fullgraph=False, backend="eager")


def train_step(x, y):
    global step
    if MODE in ("lbfgs", "lbfgs_while"):
        def closure():
            opts[0].zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            return loss
        opts[0].step(closure)
    elif MODE == "gan":
        d_opt, g_opt = opts
        d_opt.zero_grad()
        d_loss = critic(model(x).detach()).mean() - critic(y).mean()
        d_loss.backward()
        d_opt.step()
        g_opt.zero_grad()
        (-critic(model(x)).mean()).backward()
        g_opt.step()
    elif MODE == "sam_while":
        ((model(x) - y) ** 2).mean().backward()
        with torch.no_grad():
            moves = [0.05 * p.grad / (p.grad.norm() + 1e-12) for p in model.parameters()]
            for p, e in zip(model.parameters(), moves):
                p.add_(e)
        opts[0].zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        with torch.no_grad():
            for p, e in zip(model.parameters(), moves):
                p.sub_(e)
        opts[0].step()
        opts[0].zero_grad()
    elif MODE in ("manual", "manual_while", "manual_reentrant"):
        model.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.01 * p.grad
        if MODE == "manual":
            return
    else:
        if MODE == "unfreeze" and step == 6:
            model[0].requires_grad_(True)
        if MODE == "flags" and step in (6, 13):
            model[1].eval()  # dropout off for the rest of the epoch (the epoch loop calls model.train())
        if MODE.startswith("attrs") and step == 6:
            model[1].p = 0.5  # a hyper-parameter torch's layer keeps as an attribute, set by a schedule
            criterion.beta = 0.25  # and one of the loss function (a module with no state_dict() entries)
        opts[0].zero_grad()
        out = model(x) * temp.exp() + shift if MODE == "loose" else model(x)
        if MODE == "modglobals":
            out = jitter(out) * tiny_settings.SCALE
        if MODE == "codestate":
            out = out / Schedule.temperature * warm() * smoothed(1.0 + step % 3)
        (criterion(out, y) if MODE.startswith("attrs") else ((out - y) ** 2).mean()).backward()
        compiled_opt_step() if MODE.startswith("compiled_step") else opts[0].step()
        if MODE == "hooks":
            decay.step()
        if MODE == "codestate":
            Schedule.temperature *= 0.97
        if MODE == "modglobals":
            tiny_settings.SCALE *= 0.97
            tiny_settings.LOG.append(float(out.mean()))
        if MODE == "ema":
            ema.update_parameters(model)
            with torch.no_grad():
                for t, p in zip(holder.teacher.parameters(), model.parameters()):
                    t.lerp_(p, 0.25)
                target.weight.mul_(0.5).add_(model[0].weight.sum())
    step += 1
    if MODE == "peek" and step % 5 == 0:
        estimate_loss()
    maybe_die(step)


@torch.no_grad()
def estimate_loss():
    # Iterations of the training loader (and of one like it) inside the training loop's own epoch.
    total = 0.0
    for k, (x, y) in enumerate(loader):
        if k == 2:
            break
        total += ((model(x) - y) ** 2).mean().item()
    x, y = next(iter(twin_loader))
    return total + ((model(x) - y) ** 2).mean().item()


if MODE in ("while", "lbfgs_while", "manual_while", "manual_reentrant", "sam_while", "compiled_step_while",
            "attrs_while"):
    # compiled_step_while: no DataLoader at all, so pyckpt starts at the first (compiled) optimizer step
    x, y = data[:4] if MODE == "compiled_step_while" else next(iter(loader))
    while step < 30:
        train_step(x, y)
elif MODE == "cycle":  # 30 steps of next() on itertools.cycle(loader): its first pass kept, then replayed
    it = itertools.cycle(loader)
    for _ in range(30):
        train_step(*next(it))
elif MODE in ("reiter", "reiter_stream"):  # the loop of step-counted pre-training scripts
    it = iter(loader)
    while step < 30:
        try:
            x, y = next(it)
        except StopIteration:
            sched.step()
            it = iter(loader)
            x, y = next(it)
        train_step(x, y)
elif MODE == "subset":
    for epoch in range(EPOCHS):
        pick = torch.randperm(len(data))[:32]  # after the previous epoch's dropout draws
        for x, y in DataLoader(torch.utils.data.Subset(data, pick.tolist()), batch_size=4, shuffle=True):
            train_step(x, y)
        sched.step()
elif MODE == "reshuffle":  # Keras-style: the dataset's order shuffled in place at each epoch's start
    import numpy as np
    from torch.utils.data import default_collate

    def noisy(batch):  # main-process augmentation drawing from NumPy's global generator
        x, y = default_collate(batch)
        return x * (1 + 0.1 * float(np.random.rand())), y

    class Reordered(torch.utils.data.Dataset):  # datasets are not loop state: the relaunch makes its own
        def __init__(self):
            self.order = list(range(len(data)))

        def reshuffle(self):
            np.random.shuffle(self.order)  # cumulative: each epoch's order depends on all the draws before

        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return data[self.order[i]]

    np.random.seed(0)
    reordered = Reordered()
    in_order = DataLoader(reordered, batch_size=4, collate_fn=noisy)
    for epoch in range(EPOCHS):
        reordered.reshuffle()
        for x, y in in_order:
            train_step(x, y)
        sched.step()
elif MODE == "knobs":  # settings the loop changes on the dataset and the collate_fn object after each step
    from torch.utils.data import default_collate

    class Cropped(torch.utils.data.Dataset):  # a sequence-length warm-up kept on the dataset
        def __init__(self):
            self.keep = 2

        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            x, y = data[i]
            return torch.cat([x[:self.keep], torch.zeros(len(x) - self.keep)]), y

    class Noisy:  # a collator whose scale is annealed
        def __init__(self):
            self.scale = 0.5

        def __call__(self, batch):
            x, y = default_collate(batch)
            return x * (1 + self.scale), y

    cropped, noisy = Cropped(), Noisy()
    knob_loader = DataLoader(cropped, batch_size=4, shuffle=True, collate_fn=noisy,
                             num_workers=int(os.environ.get("WORKERS", "0")))
    for epoch in range(EPOCHS):
        for x, y in knob_loader:
            train_step(x, y)
            cropped.keep = min(6, 2 + step // 3)
            noisy.scale *= 0.9
        sched.step()
elif MODE == "multiepoch":  # timm's MultiEpochsDataLoader: one iterator over a batch sampler repeated forever
    class _RepeatSampler:
        def __init__(self, batch_sampler):
            self.sampler = batch_sampler

        def __iter__(self):
            while True:
                yield from iter(self.sampler)

    class MultiEpochsDataLoader(DataLoader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._DataLoader__initialized = False
            self.batch_sampler = _RepeatSampler(self.batch_sampler)
            self._DataLoader__initialized = True
            self.iterator = super().__iter__()

        def __len__(self):
            return len(self.batch_sampler.sampler)

        def __iter__(self):
            for _ in range(len(self)):
                yield next(self.iterator)

    repeating = MultiEpochsDataLoader(data, batch_size=4, shuffle=True)
    for epoch in range(EPOCHS):
        for x, y in repeating:
            train_step(x, y)
        sched.step()
elif MODE == "ohem":  # hard-example mining: a WeightedRandomSampler's weights updated in place from the losses
    weights = torch.ones(len(data), dtype=torch.double)
    indexed = torch.utils.data.StackDataset(data, torch.arange(len(data)))
    mining = DataLoader(indexed, batch_size=4, sampler=torch.utils.data.WeightedRandomSampler(weights, len(data)))
    for epoch in range(EPOCHS):
        for (x, y), i in mining:
            with torch.no_grad():
                weights[i] = ((model(x) - y) ** 2).squeeze(1).double() + 0.01
            train_step(x, y)
        sched.step()
elif MODE == "metriclogger":  # the torchvision references' MetricLogger: meters made at their first update()
    import collections

    class SmoothedValue:
        def __init__(self):
            self.window, self.total, self.count = collections.deque(maxlen=5), 0.0, 0

        def update(self, value):
            self.window.append(value)
            self.total, self.count = self.total + value, self.count + 1

    class MetricLogger:
        def __init__(self):
            self.meters = collections.defaultdict(SmoothedValue)

        def log_every(self, iterable):
            for obj in iterable:
                yield obj

    epoch_means = []
    for epoch in range(EPOCHS):
        metric_logger = MetricLogger()
        for x, y in metric_logger.log_every(loader):
            metric_logger.meters["loss"].update(((model(x) - y) ** 2).mean().item())
            train_step(x, y)
        # DeiT/MAE's train_one_epoch returns this (empty in an epoch a relaunch runs again without data)
        epoch_means.append({k: meter.total / meter.count for k, meter in metric_logger.meters.items()})
        sched.step()
    models["log"] = {"epoch_means": torch.tensor([stats["loss"] for stats in epoch_means])}
elif MODE == "split":  # batches made by hand, no DataLoader: each epoch's random permutation split in a tuple
    xs, ys = data.tensors
    for epoch in range(EPOCHS):
        batches = torch.randperm(len(xs)).split(4)
        for idx in batches:
            train_step(xs[idx], ys[idx])
        sched.step()
elif MODE == "split_direct":  # the same with the tuple in the loop's header (no variable holds it)
    xs, ys = data.tensors
    for epoch in range(EPOCHS):
        for idx in torch.randperm(len(xs)).split(4):
            train_step(xs[idx], ys[idx])
        sched.step()
elif MODE == "tqdm_off":  # a step-counted loop under tqdm with disable=True: its __iter__ is `yield from`
    from tqdm import trange

    data = iter(loader)
    for _ in trange(EPOCHS * 10, disable=True):
        try:
            x, y = next(data)
        except StopIteration:
            sched.step()
            data = iter(loader)
            x, y = next(data)
        train_step(x, y)
    sched.step()
elif MODE == "islice":  # steps per epoch limited by itertools.islice over the loader
    for epoch in range(EPOCHS):
        for x, y in itertools.islice(loader, 7):
            train_step(x, y)
        sched.step()
elif MODE == "chain":  # each epoch trains on the loader's 10 batches, then on another's 6 (itertools.chain)
    for epoch in range(EPOCHS):
        for x, y in itertools.chain(loader, extra_loader):
            train_step(x, y)
        sched.step()
elif MODE == "zipgen":  # the training loader zipped with another inside a generator expression
    for epoch in range(EPOCHS):
        for x, y, noise in ((x, y, a) for (x, y), (a,) in zip(loader, aux_loader)):
            train_step(x + 0.01 * noise, y)
        sched.step()
elif MODE == "fixed_next":
    for epoch in range(EPOCHS):
        it = iter(loader)
        for _ in range(7):
            train_step(*next(it))
        sched.step()
else:
    for epoch in range(EPOCHS):
        if MODE == "phases" and epoch == 1:  # a second phase: a new optimizer for the whole model
            opts[0] = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # (the schedulers keep the old)
        model.train()
        for x, y in loader:
            train_step(x, y)
            if MODE == "epoch_log":
                last_x = x
        sched.step()
        if MODE == "epoch_log":  # per-epoch code reading a variable set only inside the loader loop
            print("epoch", epoch, "last batch mean", float(last_x.mean()), flush=True)
        model.eval()
        with torch.no_grad():
            val = sum(((model(x) - y) ** 2).mean().item() for x, y in val_loader)
        plateau.step(val)
print("TRAINED", step, flush=True)
if MODE.startswith("attrs"):
    models["annealed"] = {"calls": torch.tensor(last.calls), "gain": last.gain, "table": last.table}
if MODE == "codestate":
    models["codestate"] = {"temperature": torch.tensor(Schedule.temperature), "calls": torch.tensor(warm.calls),
                           "recent": torch.tensor(smoothed.__defaults__[0])}
if MODE == "modglobals":
    import tiny_counter
    models["settings"] = {"scale": torch.tensor(tiny_settings.SCALE), "log": torch.tensor(tiny_settings.LOG),
                          "calls": torch.tensor(tiny_counter.calls)}
torch.save({"models": {k: m if isinstance(m, dict) else m.state_dict() for k, m in models.items()},
            "opts": [o.state_dict() for o in opts], "sched": sched.state_dict(),
            "plateau": plateau.state_dict(), "loose": [temp, shift] if MODE == "loose" else []}, sys.argv[1])
