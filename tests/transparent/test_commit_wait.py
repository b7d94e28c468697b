"""The kill/resume scripts' wait for a committed checkpoint (commit_wait.py). A save's directory is
``step-N.tmp-<token>`` until the rename that commits it, and the manifest is written inside it before
that rename: a wait that took ``step-*/MANIFEST.json`` for a commit let a script SIGKILL itself between
the two, and the relaunch rightly found no checkpoint (CI: test_own_resume[25-37-script])."""
from __future__ import annotations

import subprocess
import sys

from transparent_helpers import HERE

WAIT = ("import sys; sys.path.insert(0, {here!r}); from commit_wait import wait_for_commit; "
        "wait_for_commit({root!r}, {step}, timeout=0.5)")


def _wait(root, step=None) -> subprocess.CompletedProcess:
    code = WAIT.format(here=str(HERE), root=str(root), step=step)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def _manifest_in(root, name):
    (root / name).mkdir(parents=True)
    (root / name / "MANIFEST.json").write_text("{}")


def test_a_manifest_in_an_uncommitted_save_directory_is_not_a_commit(tmp_path):
    _manifest_in(tmp_path, "step-000000025.tmp-abc")
    for step in (None, 25):
        r = _wait(tmp_path, step)
        assert r.returncode != 0 and "no checkpoint committed" in r.stderr, (step, r)


def test_a_committed_checkpoint_ends_the_wait(tmp_path):
    _manifest_in(tmp_path, "step-000000025.tmp-abc")
    _manifest_in(tmp_path, "step-000000025")
    for step in (None, 25):
        r = _wait(tmp_path, step)
        assert r.returncode == 0, (step, r.stderr)
    assert _wait(tmp_path, 26).returncode != 0
