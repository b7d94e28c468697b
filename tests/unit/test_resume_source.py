"""resume.Source: a resume reads this rank's section of the checkpoint once (choose() read it to
check the script's loop state; restore() takes that read instead of a second one). With PYCKPT_RESUME=auto,
committed checkpoints of which none is sound are an error, not a fresh start."""
import shutil

import pytest
import torch

import pyckpt
from pyckpt import layout, reader, resume
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


def test_every_committed_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path, flip_data_byte):
    with pyckpt.Checkpointer(tmp_path, keep=3) as ck:
        paths = [ck.save(s, {"w": torch.full((64,), float(s))}).result(60) for s in (1, 2)]
        for p in paths:
            flip_data_byte(p)
        with pytest.raises(pyckpt.CorruptCheckpointError) as ei:
            resume.choose(ck, LocalCoordinator(), "auto")
        msg = str(ei.value)
        assert msg.startswith(f"every committed checkpoint is damaged ({paths[1]}, {paths[0]};"), msg
        assert "PYCKPT_RESUME=never trains from scratch, PYCKPT_RESUME=<checkpoint dir>" in msg
        assert resume.choose(ck, LocalCoordinator(), "never") is None  # the way out the message names
        # The explicit API keeps its documented behaviour: latest() is None, restore() raises.
        assert ck.latest(verify=True) is None
        with pytest.raises(pyckpt.CorruptCheckpointError, match="every one is damaged"):
            ck.restore()


def test_only_checkpoint_referencing_a_deleted_data_file_is_an_error(tmp_path):
    # Incremental, keep=1: step 2 references the frozen tensor's chunk in retired step 1's data file.
    with pyckpt.Checkpointer(tmp_path, keep=1) as ck:
        frozen = torch.arange(1 << 20, dtype=torch.float32)
        ck.save(1, {"base": frozen, "lora": torch.zeros(8)}).result(60)
        newest = ck.save(2, {"base": frozen, "lora": torch.ones(8)}).result(60)
        assert [e.name for e in layout.committed(str(tmp_path))] == ["step-000000002"]
        shutil.rmtree(tmp_path / "step-000000001")  # the referenced data is lost
        with pytest.raises(pyckpt.CorruptCheckpointError) as ei:
            resume.choose(ck, LocalCoordinator(), "auto")
        assert str(ei.value).startswith(f"every committed checkpoint is damaged ({newest};"), str(ei.value)


def test_no_committed_checkpoint_starts_over(tmp_path):
    (tmp_path / "step-000000003.tmp-x-0").mkdir()  # an uncommitted leftover is no checkpoint
    with pyckpt.Checkpointer(tmp_path) as ck:
        assert resume.choose(ck, LocalCoordinator(), "auto") is None
