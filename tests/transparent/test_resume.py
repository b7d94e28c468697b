"""Kill a tiny training script at various steps, relaunch it, and compare with an uninterrupted run."""
from __future__ import annotations

import re
import shutil
import signal

import pytest

from pyckpt import layout

from transparent_helpers import TINY, load, run_script, tree_equal


def _kill_and_resume(tmp_path, mode: str, **env: str):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.pt"
    settings = dict(MODE=mode, PYCKPT_DIR=ckpt, PYCKPT_EVERY_STEPS="4", KILL_MARK=tmp_path / "mark", **env)
    first = run_script([TINY, out], tmp_path, **settings)
    second = run_script([TINY, out], tmp_path, **settings)
    assert second.returncode == 0, second.stderr
    return first, second, load(out)


@pytest.mark.parametrize("mode,kill_at", [
    ("adamw", 13),   # mid-epoch
    ("adamw", 10),   # last step of an epoch whose end runs scheduler.step()
    ("adamw", 11),   # first step of an epoch
    ("gan", 13),     # two optimizers, several param groups
    ("lbfgs", 13),   # closure optimizer with history in its state
    ("patched", 13),  # opt.step replaced on the instance
    ("compiled", 13),  # torch.compile'd module (_orig_mod. keys)
    ("compiled_step", 13),  # optimizer step under torch.compile: its Dynamo graph module (the optimizer's
    # parameters as its own) was saved as a second model, which the relaunch (no step compiled yet) lacked
    ("ema", 13),     # modules owning no optimizer parameter: an EMA copy (global), a teacher (an attribute)
    ("loose", 13),   # optimizer parameters no module owns: were not saved, or restored as new tensors
    ("phases", 23),  # the optimizer replaced at epoch 1: steps (and snapshots) used to stop being counted
    ("peek", 17),    # the training loader iterated inside its own epoch (an evaluation): the relaunch never
    ("peek", 22),    # got there (trained 0 steps, exit 0), or took the snapshot inside the evaluation
    ("unfreeze", 13),  # requires_grad flipped in the loop at step 6: the relaunch trained on with it frozen
    ("subset", 19),  # a per-epoch subset drawn with randperm before iter(): other samples after a resume
    ("lookahead", 13),  # an optimizer of the script's class: its counter and slow weights restarted
    ("multiepoch", 17),  # MultiEpochsDataLoader: its generator's loop advanced twice (the script's epoch ended
                         # early), and the pass drew its order from another state (other batches)
    ("metriclogger", 17),  # its meters, made at their first update(), were not there at the restore point:
                           # the whole logger was left out, and the epoch's mean loss came out wrong
    ("hooks", 13),  # stateful hooks only torch holds (a forward pre-hook object, a gradient hook's closure, an
    # optimizer step pre-hook object): the relaunch ran them as made anew (running mean, noise, warm-up count)
    ("modglobals", 13),  # settings in the script's own modules the loop changes (a scale, a log, a call
    # counter behind an imported function): no frame of those modules runs, so they came back as imported
    ("codestate", 13),  # a class attribute, a function attribute and a mutable default the loop changes:
    # classes and functions were skipped as code, so the relaunch started them over
    ("islice", 13),  # 7 batches of each epoch's 10 (itertools.islice): the relaunch's islice counted from 0
                     # again and ran past 7 ("a loop over itertools.islice, whose position cannot be restored")
])
def test_sigkill_then_relaunch_equals_uninterrupted(tmp_path, plain_results, mode, kill_at):
    first, second, final = _kill_and_resume(tmp_path, mode, KILL_AT=str(kill_at))
    assert first.returncode == -signal.SIGKILL
    assert "TRAINED" not in first.stdout
    saved = (kill_at // 4) * 4
    assert f"pyckpt: resumed from step {saved} " in second.stderr or f"resumed from step {saved - 4} " in second.stderr
    # A resume into epoch 1 runs epoch 0's code again without data first, and says so; one into epoch 0 does not.
    epoch = int(re.search(r"resumed from step \d+ \(epoch (\d+)", second.stderr).group(1))
    said = "pyckpt: epoch 0 runs again without data before the restore point (epoch 1): what the script's"
    assert (said in second.stderr) == (epoch == 1) and "runs again" not in second.stderr.replace(said, ""), \
        second.stderr
    assert tree_equal(final, plain_results(mode))
    if mode in ("adamw", "lbfgs"):  # steps counted as the script counts them: 10 batches per epoch
        assert re.search(rf"resumed from step {saved} \(epoch {saved // 10}, batch {saved % 10}\)|"
                         rf"resumed from step {saved - 4} \(epoch {(saved - 4) // 10}, batch {(saved - 4) % 10}\)",
                         second.stderr), second.stderr


@pytest.mark.parametrize("kill_at", [25, 30])
def test_a_loop_over_a_chain_of_loaders_resumes_exactly_and_unwarned(tmp_path, plain_results, kill_at):
    # 16 steps an epoch: 10 of the training loader, then 6 of another. Killed in epoch 1 in the first loader's
    # part (a snapshot at step 24: batch 8 of 10) or the second's (step 28: its batch 2). Before, each snapshot
    # said "a loop over itertools.chain, whose position cannot be restored", though the loaders' fast-forward
    # positions a chain of loaders; the chain's loaders left are now saved and checked at the restore point.
    first, second, final = _kill_and_resume(tmp_path, "chain", KILL_AT=str(kill_at))
    assert first.returncode == -signal.SIGKILL
    saved = (kill_at // 4) * 4
    assert re.search(rf"pyckpt: resumed from step ({saved}|{saved - 4}) ", second.stderr), second.stderr
    assert "warning" not in first.stderr + second.stderr, first.stderr + second.stderr
    assert tree_equal(final, plain_results("chain"))


@pytest.mark.parametrize("kill_at", [9, 25])
def test_itertools_cycle_over_the_loader_resumes_exactly_in_its_first_pass_and_its_replay(tmp_path, plain_results,
                                                                                          kill_at):
    # 10 batches in the loader; it = itertools.cycle(loader), then next(it) 30 times: in its first pass (step 9)
    # the cycle has kept the batches so far, then it replays them (step 25) without touching the loader. Before,
    # each snapshot said "it: an iterator (itertools.cycle) whose position cannot be restored" and a relaunch
    # drew another first pass (a new epoch of the loader): other batches. Its kept batches and place are saved.
    first, second, final = _kill_and_resume(tmp_path, "cycle", KILL_AT=str(kill_at))
    assert first.returncode == -signal.SIGKILL
    assert re.search(rf"pyckpt: resumed from step ({kill_at // 4 * 4}|{kill_at // 4 * 4 - 4}) ", second.stderr), \
        second.stderr
    assert "warning" not in first.stderr + second.stderr, first.stderr + second.stderr
    assert tree_equal(final, plain_results("cycle"))


@pytest.mark.parametrize("mode,kill_at", [
    ("reiter", 25),  # next(it); at StopIteration it = iter(loader) and next(it) again
    ("reiter_stream", 17),  # the same over an IterableDataset, restored inside epoch 1 (step 16 or 12): the skipped
                            # epoch's iterator goes on as the resumed one, and its second next() asked bool() of the
                            # real iterator, which is len(loader): TypeError, no len() for an IterableDataset's sampler
    ("fixed_next", 17),  # 7 x next(it) per epoch, fewer than the loader has
    ("tqdm_off", 25),  # for _ in trange(30, disable=True): the relaunch ran 30 more steps after the restored 24,
                       # with no line (tqdm's `yield from range(30)` was not seen as a loop)
])
def test_a_loop_calling_next_itself_resumes_in_a_later_epoch(tmp_path, plain_results, mode, kill_at):
    # An epoch skipped on resume raised StopIteration at the script's own next(): uncaught, or caught and
    # raised again by the next iter()'s next(), the relaunch crashed before its restore point. The
    # skipped epoch's iterator goes on as the resumed epoch instead, and no epoch's code runs again.
    first, second, final = _kill_and_resume(tmp_path, mode, KILL_AT=str(kill_at))
    assert first.returncode == -signal.SIGKILL
    resumed = re.search(r"pyckpt: resumed from step (\d+) \(epoch (\d+)", second.stderr)
    assert resumed and int(resumed.group(1)) in (kill_at // 4 * 4, kill_at // 4 * 4 - 4), second.stderr
    assert int(resumed.group(2)) >= 1  # (the snapshot before the last one may not be committed at the kill)
    assert "again without data" not in second.stderr
    assert tree_equal(final, plain_results(mode))


@pytest.mark.parametrize("mode", [
    "lazy_gen",  # a sampler's torch.Generator, made at its first __iter__ (accelerate's SeedableRandomSampler)
    "lazy_aug",  # a dataset's random.Random, made at its first __getitem__
])
def test_a_generator_made_at_its_first_use_is_restored_in_a_later_epoch(tmp_path, plain_results, mode):
    """A sampler that makes its generator at its first ``__iter__`` (accelerate's SeedableRandomSampler, under
    every Trainer run), a dataset that makes its augmentation generator at its first ``__getitem__``: a
    relaunch that skipped the earlier epochs without data holds none yet, so the saved state was said not
    to fit, and the resumed epoch drew the first epoch's numbers again. A generator of the saved kind is made
    there now, where the attribute holds None, and given the saved state."""
    first, second, final = _kill_and_resume(tmp_path, mode, KILL_AT="17")
    assert first.returncode == -signal.SIGKILL
    assert re.search(r"pyckpt: resumed from step (16|12) \(epoch 1", second.stderr), second.stderr
    assert "not restored" not in second.stderr, second.stderr
    assert tree_equal(final, plain_results(mode))


def _edited(tmp_path, mode: str, kill_at: str, edit=lambda src: src):
    """A copy of train_tiny.py killed at ``kill_at``, then edited (one more line of code, as a fixed
    evaluation bug or a new log line, then ``edit``): (the first run, ``relaunch(**env)`` giving the edited
    script's run and its final state or None)."""
    script, ckpt, out = tmp_path / "train_tiny.py", tmp_path / "ckpt", tmp_path / "out.pt"
    shutil.copy(TINY, script)
    settings = dict(MODE=mode, PYCKPT_DIR=ckpt, PYCKPT_EVERY_STEPS="4", KILL_MARK=tmp_path / "mark", KILL_AT=kill_at)
    first = run_script([script, out], tmp_path, **settings)
    script.write_text(edit(script.read_text().replace('MODE = os.environ.get("MODE", "adamw")\n',
                                                      'MODE = os.environ.get("MODE", "adamw")\nprint("edited")\n', 1)))

    def relaunch(**env: str):
        r = run_script([script, out], tmp_path, **settings, **env)
        return r, load(out) if out.exists() else None

    return first, relaunch


# a DataLoader-driven loop; with modules no optimizer owns (an EMA copy and a target network in globals, a
# teacher held by an object's attribute); a loop no DataLoader drives
@pytest.mark.parametrize("mode", ["adamw", "ema", "while"])
def test_an_edited_script_is_refused_unless_resume_edited_asks_for_the_tracked_state(tmp_path, plain_results, mode):
    """Any edit of the script refused the resume, and the only way on was PYCKPT_RESUME=never: a job whose
    evaluation bug was fixed lost all its training. The refusal now names PYCKPT_RESUME_EDITED=tracked,
    which resumes the models, optimizers, schedulers, data position and RNG exactly, and the variables the
    edited loops carry by name: the step counter that ``train_step`` keeps through ``global`` went on from
    the checkpoint's (it started over before, so a ``while step < 30`` loop trained 30 more steps)."""
    first, relaunch = _edited(tmp_path, mode, "13")
    assert first.returncode == -signal.SIGKILL
    refused, _ = relaunch()
    assert refused.returncode == 2, refused.stderr
    lines = [ln for ln in refused.stderr.splitlines() if ln.startswith("pyckpt: cannot resume")]
    assert len(lines) == 1 and "changed since the checkpoint was written" in lines[0], refused.stderr
    assert "PYCKPT_RESUME_EDITED=tracked" in lines[0] and "PYCKPT_RESUME=never" in lines[0]

    second, final = relaunch(PYCKPT_RESUME_EDITED="tracked")  # the same checkpoint: the refusal wrote nothing
    assert second.returncode == 0, second.stderr
    said = [ln for ln in second.stderr.splitlines() if "PYCKPT_RESUME_EDITED=tracked" in ln]
    assert len(said) == 1 and said[0].startswith("pyckpt: warning: the script or its call stack differs"), \
        second.stderr
    assert "not exact" in said[0], said
    carried = re.search(r"the variables its loops carry \(([^)]*)\)", said[0])
    assert carried and "step" in carried.group(1).split(", "), said
    resumed = int(re.search(r"pyckpt: resumed from step (\d+)", second.stderr).group(1))
    assert resumed in (12, 8), second.stderr  # (the snapshot of step 12 may not be committed at the kill)
    # the data position, the tracked state and the step counter are the checkpoint's: the weights (the EMA
    # copy, teacher and target included) end as a plain run's, the loop no DataLoader drives included
    assert int(re.search(r"TRAINED (\d+)", second.stdout).group(1)) == 30
    assert tree_equal(final["models"], plain_results(mode)["models"])
    assert tree_equal(final["opts"], plain_results(mode)["opts"])


def test_an_edit_of_the_configuration_set_before_the_loop_is_kept_by_a_tracked_resume(tmp_path):
    """The edit asks for one more epoch (``EPOCHS``, set before the loop): the tracked resume puts back the
    variables the loop carries (the step counter) but not the configuration the edit changed, so the job
    goes on from the checkpoint's step and trains the longer schedule."""
    _, relaunch = _edited(tmp_path, "adamw", "13", lambda src: src.replace(
        'EPOCHS = int(os.environ.get("EPOCHS", "3"))', "EPOCHS = 4", 1))
    second, _ = relaunch(PYCKPT_RESUME_EDITED="tracked")
    assert second.returncode == 0, second.stderr
    assert re.search(r"pyckpt: resumed from step (12|8) \(epoch 0", second.stderr), second.stderr
    said = [ln for ln in second.stderr.splitlines() if "PYCKPT_RESUME_EDITED=tracked" in ln]
    assert len(said) == 1 and "EPOCHS" not in said[0], said
    assert int(re.search(r"TRAINED (\d+)", second.stdout).group(1)) == 40  # 4 epochs of 10 steps in all


def test_a_module_an_edit_moved_elsewhere_is_named_as_not_restored(tmp_path):
    """The edit renamed the attribute holding the teacher copy: the tracked resume cannot find it, and says
    so in one line naming it (the EMA copy and the target, still where they were, are restored)."""
    _, relaunch = _edited(tmp_path, "ema", "13", lambda src: src.replace("teacher", "mentor"))
    second, _ = relaunch(PYCKPT_RESUME_EDITED="tracked")
    assert second.returncode == 0, second.stderr
    lines = [ln for ln in second.stderr.splitlines() if "are not restored" in ln]
    assert len(lines) == 1 and "holder.teacher (not there)" in lines[0], second.stderr
    assert "ema" not in lines[0].split("not restored:")[1] and "target" not in lines[0], lines


def test_per_epoch_code_reading_a_variable_of_the_loader_loop_runs_in_a_skipped_epoch(tmp_path, plain_results):
    """A resume into epoch 1 runs epoch 0's per-epoch code again without data: a variable set only inside the
    loader loop (``last_x``, read by an epoch-end log line) was unset there, and the relaunch died with
    NameError before its restore point. Such variables are now bound to the checkpoint's values there."""
    first, second, final = _kill_and_resume(tmp_path, "epoch_log", KILL_AT="17")
    assert first.returncode == -signal.SIGKILL
    assert re.search(r"pyckpt: resumed from step (16|12) \(epoch 1", second.stderr), second.stderr
    assert "epoch 0 last batch mean" in second.stdout  # the skipped epoch's log line ran, with a value
    assert tree_equal(final, plain_results("epoch_log"))


def test_loaders_zipped_inside_a_generator_expression_resume_exactly_without_a_warning(tmp_path, plain_results):
    # ``for x, y, a in ((x, y, a) for (x, y), (a,) in zip(loader, aux))``: the generator expression's
    # ``.0`` is the zip its loop runs; it was also taken for a variable holding an iterator that cannot
    # be restored ("a resume will not be exact", twice), although both loaders are positioned.
    first, second, final = _kill_and_resume(tmp_path, "zipgen", KILL_AT="13")
    assert first.returncode == -signal.SIGKILL
    assert "pyckpt: resumed from step " in second.stderr, second.stderr
    assert "will not be exact" not in first.stderr + second.stderr, first.stderr
    assert tree_equal(final, plain_results("zipgen"))


@pytest.mark.parametrize("mode", ["split", "split_direct"])
def test_batches_split_by_hand_from_a_random_permutation_resume_exactly(tmp_path, plain_results, mode):
    # No DataLoader: ``batches = torch.randperm(n).split(4)`` per epoch (split_direct: in the loop's header). The
    # relaunch's loop went on through its own tuple (epoch 0's permutation): other batches, no line.
    first, second, final = _kill_and_resume(tmp_path, mode, KILL_AT="17")
    assert first.returncode == -signal.SIGKILL
    assert "no DataLoader position" in second.stderr and "pyckpt: resumed from step 1" in second.stderr, second.stderr
    assert tree_equal(final, plain_results(mode))


def test_modules_no_optimizer_owns_resume_exactly_over_the_loop_state_cap(tmp_path, plain_results):
    # The EMA copy and the teacher (~0.5 kB each) are over a 64-byte loop-state cap: they are saved
    # with the rank's state by reference, not copied into the loop state, so the cap does not apply.
    first, second, final = _kill_and_resume(tmp_path, "ema", KILL_AT="13", PYCKPT_LOOP_STATE_MAX_BYTES="64")
    assert first.returncode == -signal.SIGKILL
    assert "ema" not in first.stderr and "teacher" not in first.stderr  # no warning names them
    assert tree_equal(final, plain_results("ema"))


def test_never_killed_run_equals_plain_run(tmp_path, plain_results):
    out = tmp_path / "out.pt"
    r = run_script([TINY, out], tmp_path, PYCKPT_DIR=tmp_path / "ckpt", PYCKPT_EVERY_STEPS="3")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ckpt" / layout.step_dir_name(30)).is_dir()
    assert tree_equal(load(out), plain_results("adamw"))


def test_sigterm_snapshots_then_exits_by_signal(tmp_path, plain_results):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.pt"
    env = dict(PYCKPT_DIR=ckpt, PYCKPT_EVERY_STEPS="100", TERM_AT="13", KILL_MARK=tmp_path / "mark")
    first = run_script([TINY, out], tmp_path, **env)
    assert first.returncode == -signal.SIGTERM
    assert "TRAINED" not in first.stdout
    committed = [p.name for p in ckpt.iterdir() if layout.is_checkpoint_dir(str(p))]
    assert committed == [layout.step_dir_name(14)]  # the step after the signal, at its consistent point
    second = run_script([TINY, out], tmp_path, **env)
    assert "pyckpt: resumed from step 14 " in second.stderr
    assert tree_equal(load(out), plain_results("adamw"))


def test_resume_never_ignores_checkpoints(tmp_path):
    env = dict(PYCKPT_DIR=tmp_path / "ckpt", PYCKPT_EVERY_STEPS="4", KILL_AT="13", KILL_MARK=tmp_path / "m")
    run_script([TINY, tmp_path / "a.pt"], tmp_path, **env)
    r = run_script([TINY, tmp_path / "a.pt"], tmp_path, PYCKPT_RESUME="never", **env)
    assert r.returncode == 0 and "resumed" not in r.stderr
    assert "TRAINED 30" in r.stdout


@pytest.mark.parametrize("mode", ["while", "lbfgs_while", "compiled_step_while"])
def test_loop_without_a_dataloader_resumes_exactly(tmp_path, plain_results, mode):
    # The optimizer steps with no DataLoader fetch in between: formerly a warning and no snapshots;
    # now snapshots at the end of optimizer.step() with the script's loop state (issue 6).
    # lbfgs_while: LBFGS's closure calls backward() inside step(), between updates of the weights. Those
    # were taken for weights updated by hand: snapshots inside step() (the relaunch died in LBFGS with a
    # TypeError) and relaunches refused ("this run reached a backward point first").
    # compiled_step_while: the optimizer step under torch.compile, whose Dynamo traced pyckpt's post-step hook
    # (the snapshot) and failed inside it: training died with InternalTorchDynamoError.
    first, second, final = _kill_and_resume(tmp_path, mode, KILL_AT="13")
    assert first.returncode == -signal.SIGKILL
    assert "pyckpt: warning" not in first.stderr + second.stderr, first.stderr + second.stderr
    assert any(f"pyckpt: resumed from step {s} (after optimizer.step(), no DataLoader position)" in second.stderr
               for s in (8, 12)), second.stderr
    assert "TRAINED 30" in second.stdout
    assert tree_equal(final, plain_results(mode))


def test_weights_updated_by_hand_are_checkpointed_and_resume_exactly(tmp_path, plain_results):
    # An optimizer exists but never steps; the script updates the weights itself after backward().
    # Formerly a warning and no snapshots; now every backward() is a step (checkpoints at 4, 8, ...).
    ckpt, out = tmp_path / "ckpt", tmp_path / "o.pt"
    env = dict(MODE="manual", PYCKPT_DIR=ckpt, PYCKPT_EVERY_STEPS="4")
    first = run_script([TINY, out], tmp_path, **env)
    assert first.returncode == 0 and "pyckpt: warning" not in first.stderr, first.stderr
    assert tree_equal(load(out), plain_results("manual"))
    # Relaunch from the middle of epoch 2 (a relaunch after a kill there).
    older = ckpt / layout.step_dir_name(20)
    second = run_script([TINY, out], tmp_path, PYCKPT_RESUME=str(older), **env)
    assert second.returncode == 0, second.stderr
    assert "pyckpt: resumed from step 20 (epoch " in second.stderr
    assert tree_equal(load(out), plain_results("manual"))


def test_weights_moved_between_two_backwards_before_the_first_step_do_not_block_the_resume(tmp_path, plain_results):
    # SAM's two-step use with no loader in the loop: in the first iteration the weights change between two
    # backward() calls before any optimizer step, which reads as weights updated by hand. The relaunch
    # stopped there, at a backward() point, and refused every checkpoint (all taken after optimizer.step()).
    first, second, final = _kill_and_resume(tmp_path, "sam_while", KILL_AT="13")
    assert first.returncode == -signal.SIGKILL
    assert second.returncode == 0 and "cannot resume" not in second.stderr, second.stderr
    assert re.search(r"pyckpt: resumed from step \d+ \(after optimizer.step\(\), no DataLoader position\)",
                     second.stderr), second.stderr
    assert "TRAINED 30" in second.stdout
    assert tree_equal(final, plain_results("sam_while"))


WHOLE_STEP_COMPILED = """
import sys, torch
from torch import nn
torch.manual_seed(0)
x, y = torch.randn(8, 4), torch.randn(8, 1)
model = nn.Linear(4, 1)
opt = torch.optim.AdamW(model.parameters(), lr=0.01)

@torch.compile(backend="eager")
def train_step():
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()  # (Dynamo breaks its graph here: optimizer.step() runs in a resumed, transformed frame)
    opt.step()
    opt.zero_grad()
    return loss

step = 0
while step < 12:
    train_step()
    step += 1
print("TRAINED", step, flush=True)
"""


def test_a_step_point_inside_a_compiled_train_step_takes_no_checkpoint_and_says_so(tmp_path):
    # The step point lay inside Dynamo's transformed frames, whose code changes as Dynamo recompiles: every
    # relaunch refused those checkpoints ("the code of train_step changed"), each written with no word.
    (tmp_path / "whole.py").write_text(WHOLE_STEP_COMPILED)
    ckpt = tmp_path / "ckpt"
    r = run_script([tmp_path / "whole.py"], tmp_path, PYCKPT_DIR=ckpt, PYCKPT_EVERY_STEPS="4")
    assert r.returncode == 0 and "TRAINED 12" in r.stdout, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("pyckpt: warning: no checkpoints")]
    assert len(lines) == 1 and "train_step" in lines[0] and "torch.compile" in lines[0], r.stderr
    assert not [p for p in ckpt.iterdir() if layout.is_checkpoint_dir(str(p))]


@pytest.mark.parametrize("mode", ["manual_while", "manual_reentrant"])
def test_weights_updated_by_hand_with_no_loader_resume_exactly(tmp_path, plain_results, mode):
    # Snapshots right after backward(), an optimizer that never steps: the gradients the script's update
    # uses next were saved only when no optimizer existed, so the relaunch updated with its own (silently).
    # manual_reentrant: the last layer under a reentrant activation checkpoint, whose backward() runs inside
    # the script's. Each was counted as a step, and a snapshot taken inside the script's backward() was
    # resumed silently, with the rest of that backward computed from other weights.
    first, second, final = _kill_and_resume(tmp_path, mode, KILL_AT="13")
    assert first.returncode == -signal.SIGKILL
    assert any(f"pyckpt: resumed from step {s} (after backward(), no DataLoader position)" in second.stderr
               for s in (8, 12)), second.stderr
    assert "TRAINED 30" in second.stdout
    assert tree_equal(final, plain_results(mode))


def _run_then_resume_from(tmp_path, mode: str, epochs: str, step: int) -> str:
    """Train ``mode`` to the end with a checkpoint every 4 steps, relaunch from the one at ``step``, check the
    result equals a plain run's; returns the relaunch's stderr."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "o.pt"
    env = dict(MODE=mode, PYCKPT_DIR=ckpt, PYCKPT_EVERY_STEPS="4", PYCKPT_KEEP="20", EPOCHS=epochs)
    first = run_script([TINY, out], tmp_path, **env)
    assert first.returncode == 0, first.stderr
    second = run_script([TINY, out], tmp_path, PYCKPT_RESUME=str(ckpt / layout.step_dir_name(step)), **env)
    assert second.returncode == 0, second.stderr
    plain = run_script([TINY, tmp_path / "plain.pt"], tmp_path, MODE=mode, EPOCHS=epochs)
    assert plain.returncode == 0, plain.stderr
    assert tree_equal(load(out), load(tmp_path / "plain.pt"))
    return second.stderr


@pytest.mark.parametrize("resume_at", [24, 28])
def test_per_epoch_code_with_cumulative_draws_resumes_exactly_epochs_later(tmp_path, resume_at):
    # The dataset's order, a list shuffled in place with NumPy at each epoch's start, while the batches
    # draw NumPy numbers in the main process: the relaunch's skipped epochs shuffled from other states
    # (only the last epoch end's was put back), so epoch 2 trained on another order, silently.
    said = _run_then_resume_from(tmp_path, "reshuffle", "4", resume_at)
    assert f"pyckpt: resumed from step {resume_at} (epoch 2, batch {resume_at - 20})" in said, said
    assert "pyckpt: warning" not in said, said


def test_per_epoch_torch_draws_resume_exactly_several_epochs_later(tmp_path):
    # A new subset drawn with torch.randperm at each epoch's start: the torch states of the gaps are kept as
    # one table, and the relaunch put back its second row (a view into the table) with torch.set_rng_state,
    # which read it from the wrong place and crashed the relaunch (SIGSEGV) in the epochs it ran again.
    said = _run_then_resume_from(tmp_path, "subset", "5", 36)
    assert "pyckpt: resumed from step 36 (epoch 4, batch 4)" in said, said


@pytest.mark.parametrize("resume_at", [20, 24])
def test_sampler_weights_the_loop_updates_in_place_resume_exactly(tmp_path, resume_at):
    # Hard-example mining: a WeightedRandomSampler's weights updated in place from the losses. The resumed epoch
    # drew its samples with the relaunch's weights (all ones; at 24, mid-epoch), and the script's variable, bound
    # to a new tensor at the restore, was no longer the sampler's: later epochs drew with stale weights (at 20).
    said = _run_then_resume_from(tmp_path, "ohem", "4", resume_at)
    assert f"pyckpt: resumed from step {resume_at} (epoch " in said, said
    assert "pyckpt: warning" not in said, said


@pytest.mark.parametrize("workers", ["0", "2"])
@pytest.mark.parametrize("resume_at", [12, 24])
def test_settings_the_loop_keeps_on_the_dataset_and_collate_fn_resume_exactly(tmp_path, workers, resume_at):
    # A crop length warmed up on the dataset and a collator's annealed scale, set after each step: the
    # relaunch's fast-forward skipped those steps and loaded the resumed batches with its own values (in the
    # main process, or in the worker processes copying the dataset at the resumed epoch's iter()).
    ckpt, out = tmp_path / "ckpt", tmp_path / "o.pt"
    env = dict(MODE="knobs", WORKERS=workers)
    plain = run_script([TINY, tmp_path / "plain.pt"], tmp_path, **env)
    assert plain.returncode == 0, plain.stderr
    env.update(PYCKPT_DIR=ckpt, PYCKPT_EVERY_STEPS="4", PYCKPT_KEEP="10")
    assert run_script([TINY, out], tmp_path, **env).returncode == 0
    second = run_script([TINY, out], tmp_path, PYCKPT_RESUME=str(ckpt / layout.step_dir_name(resume_at)), **env)
    assert second.returncode == 0, second.stderr
    assert f"pyckpt: resumed from step {resume_at} (epoch {resume_at // 10}, batch {resume_at % 10})" in \
        second.stderr, second.stderr
    assert "pyckpt: warning" not in second.stderr, second.stderr
    assert tree_equal(load(out), load(tmp_path / "plain.pt"))


KEPT_TWO = """
import runpy, sys
import pyckpt.epoch_gaps
pyckpt.epoch_gaps.KEPT = 2  # the gaps of the last 2 epochs only
runpy.run_path(sys.argv.pop(1), run_name="__main__")
"""


def test_a_resume_past_the_kept_gap_states_says_so(tmp_path):
    # Epoch 4 of 5, 2 gap states kept: the per-epoch code of gaps 0 and 1 drew from others after the resume.
    script = tmp_path / "kept_two.py"
    script.write_text(KEPT_TWO)
    ckpt, out = tmp_path / "ckpt", tmp_path / "o.pt"
    env = dict(MODE="reshuffle", PYCKPT_DIR=ckpt, PYCKPT_EVERY_STEPS="4", PYCKPT_KEEP="20", EPOCHS="5")
    first = run_script([script, TINY, out], tmp_path, **env)
    assert first.returncode == 0, first.stderr
    second = run_script([script, TINY, out], tmp_path, PYCKPT_RESUME=str(ckpt / layout.step_dir_name(44)), **env)
    assert second.returncode == 0, second.stderr
    assert "pyckpt: resumed from step 44 (epoch 4, batch 4)" in second.stderr, second.stderr
    lines = [x for x in second.stderr.splitlines() if "are kept for the last 2 epochs only" in x]
    assert len(lines) == 1 and lines[0].startswith("pyckpt: warning: loader") and "before epochs 1-2 " in lines[0], \
        second.stderr


@pytest.mark.parametrize("resume_at", [8, 16])
def test_train_eval_flags_set_inside_the_loop_resume_exactly(tmp_path, plain_results, resume_at):
    # Dropout put in eval mode at steps 6 and 13 until the epoch loop's model.train(): a resume in that
    # stretch trained on with dropout on, silently (flags are no state_dict() entry, and the relaunch's
    # fast-forward skips the step that set them). Resumed from those very checkpoints (a kill right after
    # one may find it not committed yet, and the one before is outside the stretch).
    ckpt, out = tmp_path / "ckpt", tmp_path / "o.pt"
    env = dict(MODE="flags", PYCKPT_DIR=ckpt, PYCKPT_EVERY_STEPS="4", PYCKPT_KEEP="10")
    first = run_script([TINY, out], tmp_path, **env)
    assert first.returncode == 0 and tree_equal(load(out), plain_results("flags")), first.stderr
    second = run_script([TINY, out], tmp_path, PYCKPT_RESUME=str(ckpt / layout.step_dir_name(resume_at)), **env)
    assert second.returncode == 0, second.stderr
    assert f"pyckpt: resumed from step {resume_at} (epoch {resume_at // 10}, batch {resume_at % 10})" in \
        second.stderr, second.stderr
    assert "pyckpt: warning" not in second.stderr, second.stderr
    assert tree_equal(load(out), plain_results("flags"))


@pytest.mark.parametrize("mode", ["attrs", "attrs_while"])
def test_module_state_outside_state_dict_resumes_exactly(tmp_path, plain_results, mode):
    # A layer of the script's own class counting its calls, keeping a gain as a plain tensor attribute and
    # a table in a non-persistent buffer registered empty and made in forward; dropout's p set at step 6.
    # The relaunch trained on with its own counter, gain and table (from a checkpoint taken at a step point
    # too, where its own first iteration had run), and with p = 0.2.
    first, second, final = _kill_and_resume(tmp_path, mode, KILL_AT="13")
    assert first.returncode == -signal.SIGKILL
    assert re.search(r"pyckpt: resumed from step (8|12) ", second.stderr), second.stderr
    assert "pyckpt: warning" not in first.stderr + second.stderr, first.stderr + second.stderr
    assert "TRAINED 30" in second.stdout
    plain = plain_results(mode)
    assert final["models"]["annealed"]["calls"] == plain["models"]["annealed"]["calls"] == 30  # training forwards
    assert tree_equal(final, plain)


REGISTERED = """
import os, signal, sys, torch
import pyckpt
from torch.utils.data import DataLoader, TensorDataset

class Counter:
    def __init__(self): self.seen = 0
    def state_dict(self): return {"seen": self.seen}
    def load_state_dict(self, s): self.seen = s["seen"]

counter = pyckpt.register("counter", Counter())
torch.manual_seed(0)
model = torch.nn.Linear(2, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
loader = DataLoader(TensorDataset(torch.randn(16, 2)), batch_size=2, shuffle=True)
step = 0
for epoch in range(2):
    for (x,) in loader:
        opt.zero_grad(); model(x).sum().backward(); opt.step()
        counter.seen += len(x); step += 1
        if step == 11 and not os.path.exists("mark"):
            open("mark", "w").close(); os.kill(os.getpid(), signal.SIGKILL)
print("SEEN", counter.seen)
"""


def test_registered_object_is_saved_and_restored(tmp_path):
    (tmp_path / "reg.py").write_text(REGISTERED)
    env = dict(PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="5")
    first = run_script(["reg.py"], tmp_path, **env)
    assert first.returncode == -signal.SIGKILL
    second = run_script(["reg.py"], tmp_path, **env)
    assert "pyckpt: resumed from step 10 " in second.stderr or "pyckpt: resumed from step 5 " in second.stderr
    assert "SEEN 32" in second.stdout  # what was seen before the checkpoint is restored, not recounted


REGISTERED_NUMPY = """
import os, signal, sys, numpy as np, torch
import pyckpt
from torch.utils.data import DataLoader, TensorDataset

stats = {"sum": np.zeros(2, dtype=np.float32), "batches": np.int64(0)}
def put_back(s):
    stats.update(s)
pyckpt.register("stats", getter=lambda: dict(stats), setter=put_back)
torch.manual_seed(0)
model = torch.nn.Linear(2, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
loader = DataLoader(TensorDataset(torch.randn(16, 2)), batch_size=2, shuffle=True)
step = 0
for epoch in range(2):
    for (x,) in loader:
        opt.zero_grad(); model(x).sum().backward(); opt.step()
        stats["sum"] += x.numpy().sum(0); stats["batches"] += 1; step += 1
        if step == 11 and os.environ.get("PYCKPT_DIR") and not os.path.exists("mark"):
            open("mark", "w").close(); os.kill(os.getpid(), signal.SIGKILL)
print("STATS", type(stats["batches"]).__name__, stats["batches"], stats["sum"].dtype, stats["sum"].tobytes().hex())
"""


def test_registered_numpy_state_is_saved_and_restored(tmp_path):
    """A getter returning NumPy arrays and scalars (running statistics kept with NumPy): every snapshot
    used to be refused (no NumPy in a state); now the relaunch ends with the plain run's bytes and types."""
    (tmp_path / "reg.py").write_text(REGISTERED_NUMPY)
    plain = run_script(["reg.py"], tmp_path)
    assert plain.returncode == 0 and "STATS int64 16 float32" in plain.stdout, plain.stderr[-2000:]
    env = dict(PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="5")
    first = run_script(["reg.py"], tmp_path, **env)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    second = run_script(["reg.py"], tmp_path, **env)
    assert re.search(r"pyckpt: resumed from step (5|10) ", second.stderr), second.stderr[-2000:]
    assert second.stdout.splitlines()[-1] == plain.stdout.splitlines()[-1], (second.stdout, plain.stdout)


def test_a_registered_getter_or_setter_that_raises_is_named_in_one_line(tmp_path):
    """A getter that raises skips the snapshot with a line naming the registered name and where it
    raised (it said only "RuntimeError: ..."); a setter that raises at resume used to end the relaunch
    with a traceback from inside the loader: now one refusal line naming it, exit status 2."""
    script = REGISTERED.replace(
        '    def state_dict(self): return {"seen": self.seen}',
        '    def state_dict(self):\n'
        '        if os.environ.get("BAD") == "get" and self.seen > 12: raise RuntimeError("no state now")\n'
        '        return {"seen": self.seen}').replace(
        '    def load_state_dict(self, s): self.seen = s["seen"]',
        '    def load_state_dict(self, s):\n'
        '        if os.environ.get("BAD") == "set": raise KeyError("seen")\n'
        '        self.seen = s["seen"]')
    (tmp_path / "reg.py").write_text(script)
    env = dict(PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="5")
    got = run_script(["reg.py"], tmp_path, BAD="get", **env)
    assert got.returncode == -signal.SIGKILL, got.stderr[-2000:]
    assert re.search(r"pyckpt: warning: checkpoint of step 10 skipped: the getter registered as 'counter' raised "
                     r"RuntimeError: no state now \(reg\.py:\d+\)", got.stderr), got.stderr[-2000:]
    shutil.rmtree(tmp_path / "ck")
    (tmp_path / "mark").unlink()
    assert run_script(["reg.py"], tmp_path, **env).returncode == -signal.SIGKILL
    put = run_script(["reg.py"], tmp_path, BAD="set", **env)
    assert put.returncode == 2 and "Traceback" not in put.stderr, put.stderr[-2000:]
    lines = [line for line in put.stderr.splitlines() if "cannot resume" in line]
    assert len(lines) == 1 and "the setter registered as 'counter' raised KeyError: 'seen' (reg.py:" in lines[0], \
        put.stderr[-2000:]
    assert "PYCKPT_RESUME=never" in lines[0]


UNFREEZE = r"""
import os, signal, sys, time, torch
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0)
loader = DataLoader(TensorDataset(torch.randn(96, 16), torch.randn(96, 4)), batch_size=4)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
model[0].requires_grad_(False)
opt = torch.optim.Adam(model[2].parameters(), lr=1e-2)
for step, (x, y) in enumerate(loader, 1):
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
    if step == 4:  # gradual unfreezing: the backbone joins the optimizer
        model[0].requires_grad_(True)
        opt.add_param_group({"params": list(model[0].parameters()), "lr": 1e-3})
    time.sleep(0.05)  # a real step's time: the step-8 checkpoint commits before the kill
    if step == 15 and not os.path.exists("mark"):
        open("mark", "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
print("TRAINED")
"""


def test_a_param_group_added_while_training_is_refused_with_one_line_not_a_traceback(tmp_path):
    # The fast-forward does not run the script's add_param_group again, so the optimizer has fewer
    # groups at the restore point than the checkpoint: one refusal, exit 2, nothing loaded or trained.
    (tmp_path / "train.py").write_text(UNFREEZE)
    env = dict(PYCKPT_DIR=tmp_path / "ck", PYCKPT_EVERY_STEPS="8")
    first = run_script(["train.py"], tmp_path, **env)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    second = run_script(["train.py"], tmp_path, **env)
    assert second.returncode == 2, second.stderr[-3000:]
    assert "Traceback" not in second.stderr and "TRAINED" not in second.stdout, second.stderr[-3000:]
    lines = [x for x in second.stderr.splitlines() if x.startswith("pyckpt: cannot resume")]
    assert len(lines) == 1 and "add_param_group" in lines[0] and "PYCKPT_RESUME=never" in lines[0], second.stderr


def test_a_relaunch_that_ends_before_the_checkpoints_position_says_so_and_is_not_marked_finished(tmp_path):
    # The relaunch's loops end sooner (fewer epochs) than the epoch the checkpoint was taken in: the restore
    # point is never reached. That used to end with status 0 and no line, as if it had resumed and finished.
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.pt"
    env = dict(PYCKPT_DIR=ckpt, PYCKPT_EVERY_STEPS="4", KILL_AT="29", KILL_MARK=tmp_path / "mark")
    first = run_script([TINY, out], tmp_path, **env)
    assert first.returncode == -signal.SIGKILL
    second = run_script([TINY, out], tmp_path, **env, EPOCHS="2")
    assert "resumed from" not in second.stderr
    said = re.search(r"pyckpt: warning: the script ended before reaching the point checkpoint \S+step-0+(\d+) was "
                     r"taken at \(epoch 2, batch \d\): nothing was restored", second.stderr)
    assert said and int(said.group(1)) in (24, 28), second.stderr
    # No step trained; the step counter, which the loop changed in the checkpoint's epoch, holds the checkpoint's
    # value from the end of the first epoch run without data on (as per-epoch code there reads it).
    assert f"TRAINED {said.group(1)}" in second.stdout, second.stdout
    assert not (ckpt / "FINISHED.json").exists()
    third = run_script([TINY, out], tmp_path, **env)  # the full command resumes it
    assert f"pyckpt: resumed from step {said.group(1)} " in third.stderr and "TRAINED 30" in third.stdout
