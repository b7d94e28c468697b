"""resume.Source: a resume reads this rank's section of the checkpoint once (choose() read it to
check the script's loop state; restore() takes that read instead of a second one)."""
import torch

import pyckpt
from pyckpt import reader, resume
from pyckpt.coord import LocalCoordinator


def test_restore_reads_the_rank_section_once(tmp_path, monkeypatch):
    ema = torch.arange(6.0)
    with pyckpt.Checkpointer(tmp_path) as ck:
        ck.save(3, {"w": torch.ones(4)}, rank_state={"script_objects": {"ema": {"w": ema}}}).result(60)
        scopes = []
        real = reader.load_section

        def counting(engine, op, scope, *a, **k):
            scopes.append(scope)
            return real(engine, op, scope, *a, **k)

        monkeypatch.setattr(reader, "load_section", counting)
        src = resume.choose(ck, LocalCoordinator(), "auto")
        restored = src.restore(None)
    assert scopes.count("rank") == 1 and scopes.count("replicated") == 1
    assert restored.rank_state is src.rank_state
    assert torch.equal(restored.rank_state["script_objects"]["ema"]["w"], ema)
    assert torch.equal(restored.state["w"], torch.ones(4)) and restored.step == 3
