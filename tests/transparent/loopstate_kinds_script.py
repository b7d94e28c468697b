"""A small training loop keeping its own counters in one kind of script value (``KIND``), for
tests/transparent/test_loopstate_kinds.py. The learning rate follows the counters, so a resume that
drops them trains differently. ``KILL_AT``/``KILL_MARK``: SIGKILL itself once after that step.
Usage: python loopstate_kinds_script.py OUT.pt"""
import dataclasses
import enum
import os
import signal
import sys
import time
import typing

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

KIND = os.environ["KIND"]


@dataclasses.dataclass(slots=True)
class SlotsState:  # mutated in place, no __dict__
    step: int = 0
    best: float = float("inf")
    lrs: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Frozen:  # rebound with dataclasses.replace at every step
    step: int = 0
    best: float = float("inf")
    scale: float = dataclasses.field(init=False, default=1.0)  # derived in __post_init__

    def __post_init__(self):
        object.__setattr__(self, "scale", 1.0 / (1.0 + self.step / 10))


class NT(typing.NamedTuple):  # rebound with _replace at every step
    step: int = 0
    best: float = float("inf")
    hist: tuple = ()


class Slots:
    __slots__ = ("step", "best", "__decay")  # a private slot: mangled to _Slots__decay

    def __init__(self):
        self.step, self.best, self.__decay = 0, float("inf"), 1.0

    def tick(self, loss):
        self.step += 1
        self.best = min(self.best, loss)
        self.__decay *= 0.97

    @property
    def decay(self):
        return self.__decay


class AttrDict(dict):  # the EasyDict/AttrDict helper
    __getattr__ = dict.__getitem__
    __setattr__ = dict.__setitem__


class Meter:
    def __init__(self):
        self.n, self.total = 0, 0.0


class Phase(enum.Enum):
    WARM = 1
    MAIN = 2


class History(list):  # a script subclass of list: not restorable, said at the first snapshot
    pass


def make():
    if KIND == "slots_dc":
        return SlotsState()
    if KIND == "frozen":
        return Frozen()
    if KIND == "nt":
        return NT()
    if KIND == "slots":
        return Slots()
    if KIND == "attrdict":
        return AttrDict(step=0, best=float("inf"), sub=AttrDict(n=0, seen=[]))
    if KIND == "containers":  # plain objects, an enum and a namedtuple inside a dict
        return {"meters": [Meter(), Meter()], "phase": Phase.WARM, "rec": NT()}
    if KIND == "listsub":
        return History()
    raise SystemExit(f"unknown KIND {KIND}")


def step_of(st):
    if KIND == "containers":
        return st["rec"].step
    if KIND == "listsub":
        return len(st)
    return st["step"] if KIND == "attrdict" else st.step


def lr_of(st):
    lr = 0.05 / (1 + step_of(st) / 10)
    if KIND == "frozen":
        lr *= st.scale
    if KIND == "slots":
        lr *= st.decay
    if KIND == "attrdict":
        lr *= 1.0 / (1 + st.sub.n / 50)
    if KIND == "containers":
        lr *= 0.5 if st["phase"] is Phase.WARM else 1.0
    return lr


def bump(st, loss):
    if KIND == "slots_dc":
        st.step += 1
        st.best = min(st.best, loss)
        st.lrs.append(lr_of(st))
    elif KIND == "frozen":
        st = dataclasses.replace(st, step=st.step + 1, best=min(st.best, loss))
    elif KIND == "nt":
        st = st._replace(step=st.step + 1, best=min(st.best, loss), hist=(st.hist + (loss,))[-3:])
    elif KIND == "slots":
        st.tick(loss)
    elif KIND == "attrdict":
        st.step += 1
        st.best = min(st.best, loss)
        st.sub.n += 2
        st.sub.seen.append(st.step)
    elif KIND == "containers":
        st["meters"][0].n += 1
        st["meters"][1].total += loss
        st["rec"] = st["rec"]._replace(step=st["rec"].step + 1, best=min(st["rec"].best, loss))
        st["phase"] = Phase.MAIN if st["rec"].step >= 5 else Phase.WARM
    else:
        st.append(loss)
    return st


def summary(st):
    if KIND == "containers":
        return [st["meters"][0].n, st["meters"][1].total, st["phase"].value, list(st["rec"])]
    if KIND == "attrdict":
        return [st.step, st.best, st.sub.n, list(st.sub.seen), sorted(st)]
    if KIND == "listsub":
        return list(st)
    out = [st.step, st.best]
    if KIND == "slots_dc":
        out.append(list(st.lrs))
    if KIND == "frozen":
        out.append(st.scale)
    if KIND == "nt":
        out.append(list(st.hist))
    if KIND == "slots":
        out.append(st.decay)
    return out


def main():
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(40, 5), torch.randn(40, 1)), batch_size=4, shuffle=True)
    model = nn.Linear(5, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    st = make()
    for epoch in range(2):
        for x, y in loader:
            for g in opt.param_groups:
                g["lr"] = lr_of(st)
            loss = ((model(x) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            st = bump(st, loss.item())
            mark = os.environ.get("KILL_MARK")
            if step_of(st) == int(os.environ.get("KILL_AT", "0")) and mark and not os.path.exists(mark):
                open(mark, "w").close()
                time.sleep(0.5)  # let the last checkpoint commit
                os.kill(os.getpid(), signal.SIGKILL)
    torch.save({"model": model.state_dict(), "state": summary(st)}, sys.argv[1])


main()
