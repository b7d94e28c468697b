"""tqdm progress bars in a training loop (pyckpt/loopstate.py, ``_Bar``): a bar over the whole run updated at
each step and a bar over each epoch's loader. Their counts are loop state: a relaunch's bars go on from the
checkpoint's counts (before, both started at 0: the run's bar ended at 18/30 and a script reading ``bar.n``
as its step counter trained differently, said by nothing)."""
from __future__ import annotations

import re

from transparent_helpers import killed_and_relaunched, load, run_script, tree_equal

SCRIPT = r'''
import os, signal, sys
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

torch.manual_seed(0)
loader = DataLoader(TensorDataset(torch.randn(40, 6), torch.randn(40, 1)), batch_size=4, shuffle=True)
model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.2), nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
overall = tqdm(total=30, desc="train", mininterval=0)
counts = []
for epoch in range(3):
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, mininterval=0)
    for xb, yb in bar:
        for g in opt.param_groups:  # the schedule reads the bar's count as its step counter
            g["lr"] = 0.05 * (1 - overall.n / 30)
        loss = ((model(xb) - yb) ** 2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        overall.update(1)
        bar.set_postfix(loss=float(loss))
        counts.append((overall.n, bar.n))
        if str(overall.n) == os.environ.get("KILL_AT") and not os.path.exists(os.environ["KILL_MARK"]):
            open(os.environ["KILL_MARK"], "w").close(); os.kill(os.getpid(), signal.SIGKILL)
overall.close()
torch.save({"model": model.state_dict(), "counts": counts}, sys.argv[1])
'''


def test_progress_bars_go_on_from_the_checkpoints_counts(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    plain = run_script([script, tmp_path / "plain.pt"], tmp_path)
    assert plain.returncode == 0, plain.stderr
    _, second = killed_and_relaunched(script, tmp_path / "out.pt", tmp_path, kill_at=14, every_steps=4)
    resumed = re.search(r"pyckpt: resumed from step (12|8) \(epoch (1, batch 2|0, batch 8)\)", second.stderr)
    assert resumed, second.stderr
    a, b = load(tmp_path / "plain.pt"), load(tmp_path / "out.pt")
    # The relaunch's counts after the restore point are the uninterrupted run's, and so are the weights.
    step = int(resumed[1])
    assert b["counts"][-(30 - step):] == a["counts"][step:], (a["counts"], b["counts"])
    assert tree_equal(a["model"], b["model"])
    # What the user sees: the run's bar ends at 30/30, not at the steps the relaunch made.
    ends = re.findall(r"train: +\d+%\|[^|]*\| (\d+)/30", second.stderr)
    assert ends and ends[-1] == "30", ends[-3:]
    assert "warning" not in second.stderr, second.stderr


def test_a_bars_count_goes_into_the_live_bar_and_a_malformed_one_is_refused():
    import pytest
    from tqdm import tqdm

    from pyckpt import loopstate
    from pyckpt.errors import PyckptError

    live = tqdm(total=10, disable=True)
    assert loopstate._bar_count(tqdm(total=5, initial=3, disable=True)) == 3
    assert loopstate._bar_count(object()) is None
    dec = loopstate._Decoder([], {})
    bar = dec.value(["tq", 7])
    assert bar.into(live) is live and live.n == 7 and live.initial == 7
    stand_in = bar.into(None)  # nothing there in the relaunch: a disabled bar at that count
    assert isinstance(stand_in, tqdm) and stand_in.n == 7 and stand_in.disable
    for bad in (["tq", -1], ["tq", "7"], ["tq", float("inf")], ["tq", 1, 2], ["tq", True]):
        with pytest.raises(PyckptError, match="malformed"):
            dec.value(bad)
