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


def _launch_save(ck, step: int, launch: str | None) -> str:
    """A commit as transparent mode writes it: the launch that wrote it in ``rank_state["pyckpt"]``."""
    rank_state = {"pyckpt": {"step": step, "world_size": 1, "launch": launch}}
    return ck.save(step, {"w": torch.full((8,), float(step))}, rank_state=rank_state).result(60)


_LAUNCH_VARS = ("PYCKPT_LAUNCH_ID", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")


@pytest.fixture
def launch_env(monkeypatch):
    for name in _LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)

    def set_env(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)
    return set_env


@pytest.mark.parametrize("setting", ["never", "path"])
def test_a_restart_resumes_its_own_launchs_newest_checkpoint_whatever_resume_names(tmp_path, launch_env, capsys,
                                                                                   setting):
    # pyckpt-run --resume never/<dir> --max-restarts N: the elastic agent restarts failed workers with the
    # same environment, and each restart used to start over from scratch (or go back to <dir>), silently
    # dropping everything this launch had trained and checkpointed.
    earlier = tmp_path / "earlier"
    with pyckpt.Checkpointer(earlier) as ck:
        given = _launch_save(ck, 5, "launch-0")
    launch_env(PYCKPT_LAUNCH_ID="launch-1")
    value = "never" if setting == "never" else given
    with pyckpt.Checkpointer(tmp_path / "ck", keep=3) as ck:
        _launch_save(ck, 20, "launch-0")  # an earlier launch's, in the same directory
        first = resume.choose(ck, LocalCoordinator(), value)  # nothing of this launch's yet: as set
        assert first is None if setting == "never" else first.path == given
        assert "restart" not in capsys.readouterr().err
        own = _launch_save(ck, 4, "launch-1")  # this launch's first checkpoint (a lower step, committed later)
        src = resume.choose(ck, LocalCoordinator(), value)
    assert src is not None and src.path == own and src.step == 4
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "restart" in ln]
    assert len(lines) == 1 and own in lines[0] and f"PYCKPT_RESUME={value}" in lines[0], lines


@pytest.mark.parametrize("setting", ["never", "path"])
def test_without_a_checkpoint_of_its_own_launch_the_setting_applies(tmp_path, launch_env, setting):
    # A new launch (another PYCKPT_LAUNCH_ID), or a restart before this launch committed anything: the
    # newest checkpoint is an earlier launch's, which never / <dir> were given to avoid.
    earlier = tmp_path / "earlier"
    with pyckpt.Checkpointer(earlier) as ck:
        given = _launch_save(ck, 5, None)
    launch_env(PYCKPT_LAUNCH_ID="launch-2")
    with pyckpt.Checkpointer(tmp_path / "ck") as ck:
        _launch_save(ck, 20, "launch-1")
        src = resume.choose(ck, LocalCoordinator(), "never" if setting == "never" else given)
    if setting == "never":
        assert src is None
    else:
        assert src.path == given and src.step == 5


@pytest.mark.parametrize("restart_count,resumes", [("1", True), ("0", False)])
def test_plain_torchrun_restarts_are_told_by_the_restart_count(tmp_path, launch_env, restart_count, resumes):
    # Without pyckpt-run the launch is torchrun's run id, which a multi-node job given a fixed --rdzv-id
    # keeps from one launch to the next: only a counted restart resumes against PYCKPT_RESUME=never.
    launch_env(TORCHELASTIC_RUN_ID="job7", TORCHELASTIC_RESTART_COUNT=restart_count)
    with pyckpt.Checkpointer(tmp_path / "ck") as ck:
        own = _launch_save(ck, 6, resume.launch_id())
        src = resume.choose(ck, LocalCoordinator(), "never")
    assert (src is not None and src.path == own) if resumes else src is None
