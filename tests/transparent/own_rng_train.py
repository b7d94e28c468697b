"""Training script of test_loader_own_rng.py: a batch sampler or a dataset drawing from a random generator
it keeps itself (not a ``generator`` attribute, not a global stream). ``python own_rng_train.py OUT``.

SHAPE: ``sampler_random`` / ``sampler_numpy`` / ``sampler_torch`` (a length-bucketing batch sampler whose
``self.rng`` is a ``random.Random``, ``np.random.default_rng``, ``torch.Generator``), ``dataset_numpy``
(augmentation in ``__getitem__`` from the dataset's own ``np.random.default_rng``, no workers),
``subset_numpy`` (the same dataset under a ``Subset``), ``collate_torch`` (a collate_fn object masking from a
``torch.Generator`` it makes at its first call and remakes in another process, wrapped in another collator
object: transformers' ``DataCollatorForLanguageModeling(seed=...)`` under the Trainer's
``RemoveColumnsCollator``), ``collate_hf`` (that transformers collator itself), ``transform_numpy`` (a
dataset's transforms, in a ``Compose``, jittering from their own ``np.random.default_rng``),
``collate_partial`` (``functools.partial(masking, generator=g)`` as the collate_fn), ``collate_closure`` (a
collate_fn function drawing from a generator its maker's closure holds), ``sampler_helper`` (a sampler whose
order comes from a helper object it holds, not callable, with its own ``np.random.default_rng``),
``collate_lazy_closure`` (a collate_fn function making its generator at its first call, ``nonlocal``),
``sampler_helper_deep`` (the same helper holding its generator one object further down),
``dataset_helper`` (a dataset augmenting through a helper object's method, not ``__call__``, with its own
``random.Random``), ``transform_helper`` (a transform drawing from a generator an object it holds keeps),
``dataset_class`` (a dataset drawing from a generator made in its class body, ``ClassNoisy.rng``),
``transform_bound`` (a ``Compose`` of ``functools.partial(scaled, rng=...)`` and a bound method ``noise.apply``),
``iterable_persistent`` (an iterable dataset over 2 persistent workers drawing from each worker's global torch
generator and its copy of the dataset's ``random.Random``, also after its last item).
KILL_AT: SIGKILL after that step (once: KILL_MARK).
"""
import functools
import os
import random
import signal
import sys

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, Subset, TensorDataset, get_worker_info

SHAPE = os.environ["SHAPE"]


class BucketBatches(Sampler):
    """Batches of similar length, in an order drawn from the sampler's own generator every epoch."""

    def __init__(self, lengths, bs, kind, seed=123):
        self.lengths, self.bs, self.kind = lengths, bs, kind
        self.rng = {"random": lambda: random.Random(seed), "numpy": lambda: np.random.default_rng(seed),
                    "torch": lambda: torch.Generator().manual_seed(seed)}[kind]()

    def _perm(self, n):
        if self.kind == "random":
            p = list(range(n))
            self.rng.shuffle(p)
            return p
        if self.kind == "numpy":
            return self.rng.permutation(n).tolist()
        return torch.randperm(n, generator=self.rng).tolist()

    def __iter__(self):
        order = sorted(range(len(self.lengths)), key=lambda i: self.lengths[i])
        batches = [order[i:i + self.bs] for i in range(0, len(order), self.bs)]
        for j in self._perm(len(batches)):
            yield batches[j]

    def __len__(self):
        return (len(self.lengths) + self.bs - 1) // self.bs


class Shuffler:
    """A sampler's helper object drawing orders from its own generator (not called: a method is)."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def order(self, n):
        return self.rng.permutation(n).tolist()


class Source:
    """Holds a generator for the object that holds it (one object further down)."""

    def __init__(self, rng):
        self.rng = rng


class DeepShuffler:
    def __init__(self, seed):
        self.source = Source(torch.Generator().manual_seed(seed))

    def order(self, n):
        return torch.randperm(n, generator=self.source.rng).tolist()


class HelperOrder(Sampler):
    def __init__(self, n, seed=9, helper=Shuffler):
        self.n, self.shuffler = n, helper(seed)

    def __iter__(self):
        return iter(self.shuffler.order(self.n))

    def __len__(self):
        return self.n


class Noisy(Dataset):
    """Augmentation from the dataset's own seeded generator (the reproducibility idiom)."""

    def __init__(self, x, y, seed=7):
        self.x, self.y, self.rng = x, y, np.random.default_rng(seed)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + torch.from_numpy(self.rng.normal(0, 0.1, self.x.shape[1])).float(), self.y[i]


class Noise:
    """Adds noise from its own generator, through a method (a dataset's helper, not a transform)."""

    def __init__(self, seed):
        self.rng = random.Random(seed)

    def apply(self, x):
        return x + 0.1 * self.rng.gauss(0, 1)


class HelperNoisy(Noisy):
    def __init__(self, x, y):
        self.x, self.y, self.aug = x, y, Noise(4)

    def __getitem__(self, i):
        return self.aug.apply(self.x[i]), self.y[i]


class ClassNoisy(Noisy):
    rng = np.random.default_rng(8)

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __getitem__(self, i):
        return self.x[i] + torch.from_numpy(ClassNoisy.rng.normal(0, 0.1, self.x.shape[1])).float(), self.y[i]


def scaled(x, rng):
    return x * float(1 + 0.1 * rng.standard_normal())


class SourcedJitter:
    """A transform whose generator an object it holds keeps."""

    def __init__(self, seed):
        self.src = Source(np.random.default_rng(seed))

    def __call__(self, x):
        return x * float(1 + 0.1 * self.src.rng.standard_normal())


class Jitter:
    """A transform with its own seeded generator."""

    def __init__(self, seed=5):
        self.rng = np.random.default_rng(seed)

    def __call__(self, x):
        return x * float(1 + 0.1 * self.rng.standard_normal())


class Compose:
    """Applies a list of transforms (torchvision's and albumentations' ``Compose``)."""

    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class Transformed(Dataset):
    def __init__(self, x, y, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.transform(self.x[i]), self.y[i]


def masking(items, generator):
    xb, yb = torch.utils.data.default_collate(items)
    return xb * torch.bernoulli(torch.full(xb.shape, 0.8), generator=generator), yb


def make_masking(seed):
    generator = torch.Generator().manual_seed(seed)

    def collate(items):
        return masking(items, generator)
    return collate


def make_lazy_masking(seed):
    generator = None

    def collate(items):
        nonlocal generator
        if generator is None:
            generator = torch.Generator().manual_seed(seed)
        return masking(items, generator)
    return collate


class Masking:
    """Drops features at random from its own seeded generator, made at its first call in each process."""

    def __init__(self, seed=11):
        self.seed, self.generator, self.pid = seed, None, None

    def __call__(self, items):
        xb, yb = torch.utils.data.default_collate(items)
        if self.generator is None or self.pid != os.getpid():
            self.generator, self.pid = torch.Generator().manual_seed(self.seed), os.getpid()
        return xb * torch.bernoulli(torch.full(xb.shape, 0.8), generator=self.generator), yb


class Outer:
    """Calls the collator it wraps."""

    def __init__(self, inner):
        self.data_collator = inner

    def __call__(self, items):
        return self.data_collator(items)


class ToPair:
    """Calls transformers' collator on the token ids (as the Trainer's ``RemoveColumnsCollator`` does) and
    hands the model the masked ids with the labels folded in, and the targets."""

    def __init__(self, inner):
        self.data_collator = inner

    def __call__(self, items):
        b = self.data_collator([{"input_ids": i.tolist()} for i, _ in items])
        return b["input_ids"].float() / 35 + b["labels"].float() / 1000, torch.stack([t for _, t in items])


def hf_loader(y):
    from transformers import BertTokenizer, DataCollatorForLanguageModeling

    vocab = os.path.join(os.path.dirname(os.path.abspath(sys.argv[1])), "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(30)]) + "\n")
    ids = torch.randint(5, 35, (40, 6))
    coll = DataCollatorForLanguageModeling(BertTokenizer(vocab), mlm_probability=0.3, seed=17)
    return DataLoader(list(zip(ids, y)), batch_size=4, shuffle=True, collate_fn=ToPair(coll))


class WorkerStream(IterableDataset):
    """Each worker yields its half of the items with noise from its global generator and its copy of
    ``self.rng``; after its last item it draws once more (the next epoch starts from there)."""

    def __init__(self, x, y):
        self.x, self.y, self.rng = x, y, random.Random(4)

    def __iter__(self):
        info = get_worker_info()
        for i in range(info.id, len(self.x), info.num_workers):
            yield self.x[i] + 0.1 * torch.rand(6) + self.rng.random(), self.y[i]
        torch.rand(1)


torch.manual_seed(0)
x, y = torch.randn(40, 6), torch.randn(40, 1)
if SHAPE == "iterable_persistent":
    loader = DataLoader(WorkerStream(x, y), batch_size=4, num_workers=2, persistent_workers=True)
elif SHAPE == "collate_hf":
    loader = hf_loader(y)
elif SHAPE == "transform_numpy":
    loader = DataLoader(Transformed(x, y, Compose([Jitter(5), Jitter(6)])), batch_size=4, shuffle=True)
elif SHAPE == "collate_closure":
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, collate_fn=make_masking(3))
elif SHAPE == "collate_lazy_closure":
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, collate_fn=make_lazy_masking(3))
elif SHAPE == "collate_partial":
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True,
                        collate_fn=functools.partial(masking, generator=torch.Generator().manual_seed(3)))
elif SHAPE == "collate_torch":
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, collate_fn=Outer(Masking()))
elif SHAPE == "sampler_helper":
    loader = DataLoader(TensorDataset(x, y), batch_size=4, sampler=HelperOrder(40))
elif SHAPE == "sampler_helper_deep":
    loader = DataLoader(TensorDataset(x, y), batch_size=4, sampler=HelperOrder(40, helper=DeepShuffler))
elif SHAPE == "dataset_helper":
    loader = DataLoader(HelperNoisy(x, y), batch_size=4, shuffle=True)
elif SHAPE == "transform_bound":
    steps = [functools.partial(scaled, rng=np.random.default_rng(2)), Noise(6).apply]
    loader = DataLoader(Transformed(x, y, Compose(steps)), batch_size=4, shuffle=True)
elif SHAPE == "dataset_class":
    loader = DataLoader(ClassNoisy(x, y), batch_size=4, shuffle=True)
elif SHAPE == "transform_helper":
    loader = DataLoader(Transformed(x, y, SourcedJitter(5)), batch_size=4, shuffle=True)
elif SHAPE.startswith("sampler_"):
    lengths = torch.randint(1, 50, (40,)).tolist()
    loader = DataLoader(TensorDataset(x, y), batch_sampler=BucketBatches(lengths, 4, SHAPE.split("_")[1]))
elif SHAPE == "dataset_numpy":
    loader = DataLoader(Noisy(x, y), batch_size=4, shuffle=True)
else:
    loader = DataLoader(Subset(Noisy(x, y), list(range(40))), batch_size=4, shuffle=True)
model = nn.Linear(6, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
step, seen = 0, []
for epoch in range(3):
    for xb, yb in loader:
        loss = ((model(xb) - yb) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        seen.append(xb.sum())
        if str(step) == os.environ.get("KILL_AT") and not os.path.exists(os.environ["KILL_MARK"]):
            open(os.environ["KILL_MARK"], "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
torch.save({"model": model.state_dict(), "batches": torch.stack(seen)}, sys.argv[1])
