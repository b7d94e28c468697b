"""A library object with state_dict()/load_state_dict() that pyckpt does not track (an EMA helper in
the manner of diffusers' EMAModel or torch_ema), held by a script variable: a SIGKILLed run resumes
it exactly. Before, it was left out silently and the relaunch trained on with a fresh helper.

The helper's module is installed into a user site-packages directory (PYTHONUSERBASE), so the
script imports it from an installed package, as it would a real library."""
from __future__ import annotations

import os
import signal
import site
from pathlib import Path

from transparent_helpers import load, run_script, tree_equal

_LIB = '''
import torch


class ShadowEMA:
    """Keeps an exponential moving average of parameters (not an nn.Module)."""

    def __init__(self, params, decay=0.9):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self):
        self.updates += 1
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p, 1 - self.decay)

    def state_dict(self):
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state):
        self.decay, self.updates = state["decay"], state["updates"]
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)
'''

_SCRIPT = '''
import os, signal, sys
import torch
from ema_lib import ShadowEMA

torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
ema = ShadowEMA(model.parameters())
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(40, 4), torch.randn(40, 2)),
                                     batch_size=4, shuffle=True)
step = 0
for epoch in range(2):
    for x, y in loader:
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        ema.update()
        step += 1
        mark = os.environ.get("KILL_MARK")
        if mark and step == 13 and not os.path.exists(mark):
            open(mark, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
torch.save({"model": model.state_dict(), "ema": ema.state_dict()}, sys.argv[1])
'''


def _user_site(base: Path) -> Path:
    rel = Path(site.getusersitepackages()).relative_to(site.getuserbase())
    return base / rel


def test_library_object_with_state_dict_resumes_exactly(tmp_path):
    base = tmp_path / "userbase"
    lib = _user_site(base)
    lib.mkdir(parents=True)
    (lib / "ema_lib.py").write_text(_LIB)
    script = tmp_path / "train.py"
    script.write_text(_SCRIPT)
    # PYTHONUSERBASE makes the folder an installed-packages one (pyckpt's library roots); PYTHONPATH
    # puts it on the path also where user site-packages are off (a virtual environment).
    env = dict(PYTHONUSERBASE=base, PYTHONPATH=os.pathsep.join(filter(None, [str(lib), os.environ.get("PYTHONPATH")])))

    plain = run_script([script, tmp_path / "plain.pt"], tmp_path, **env)
    assert plain.returncode == 0, plain.stderr
    ckpt = dict(PYCKPT_DIR=tmp_path / "ckpt", PYCKPT_EVERY_STEPS="4", KILL_MARK=tmp_path / "mark", **env)
    first = run_script([script, tmp_path / "out.pt"], tmp_path, **ckpt)
    assert first.returncode == -signal.SIGKILL, first.stderr
    second = run_script([script, tmp_path / "out.pt"], tmp_path, **ckpt)
    assert second.returncode == 0, second.stderr
    assert "pyckpt: resumed from step" in second.stderr
    assert "warning" not in first.stderr + second.stderr
    assert tree_equal(load(tmp_path / "out.pt"), load(tmp_path / "plain.pt"))
