"""For the kill/resume scripts: commits are asynchronous, so a script that SIGKILLs itself right after
a checkpoint step first waits for that checkpoint to be committed (else the relaunch finds none and the
test fails for the wrong reason). Standard library only: the structure tests prepend this file's text
to the scripts they write."""
import glob
import os
import sys
import time


def wait_for_commit(ckpt_dir, step=None, timeout=60.0):
    """Wait until ``ckpt_dir`` holds the committed checkpoint of ``step`` (any step when None); exit the
    script when none comes within ``timeout`` s. No directory: no wait."""
    if not ckpt_dir:
        return
    pattern = os.path.join(glob.escape(ckpt_dir), "step-*" if step is None else "step-%09d" % step, "MANIFEST.json")
    deadline = time.monotonic() + timeout
    while not glob.glob(pattern):
        if time.monotonic() > deadline:
            sys.exit("no checkpoint committed at " + pattern)
        time.sleep(0.02)
