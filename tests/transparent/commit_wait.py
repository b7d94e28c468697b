"""For the kill/resume scripts: commits are asynchronous, so a script that SIGKILLs itself right after
a checkpoint step first waits for that checkpoint to be committed (else the relaunch finds none and the
test fails for the wrong reason). Standard library only: the structure tests prepend this file's text
to the scripts they write."""
import os
import re
import sys
import time

# Only a committed checkpoint has this name: a save writes its manifest inside ``step-N.tmp-<token>``
# and commits with the rename, so ``step-*/MANIFEST.json`` also matches a save not yet committed.
_COMMITTED = re.compile(r"^step-(\d{9,})$")


def _committed(ckpt_dir, step):
    try:
        names = os.listdir(ckpt_dir)
    except OSError:
        return False
    for name in names:
        m = _COMMITTED.match(name)
        if m and (step is None or int(m.group(1)) == step) \
                and os.path.isfile(os.path.join(ckpt_dir, name, "MANIFEST.json")):
            return True
    return False


def wait_for_commit(ckpt_dir, step=None, timeout=60.0):
    """Wait until ``ckpt_dir`` holds the committed checkpoint of ``step`` (any step when None); exit the
    script when none comes within ``timeout`` s. No directory: no wait."""
    if not ckpt_dir:
        return
    deadline = time.monotonic() + timeout
    while not _committed(ckpt_dir, step):
        if time.monotonic() > deadline:
            sys.exit("no checkpoint committed in %s (step %s)" % (ckpt_dir, "any" if step is None else step))
        time.sleep(0.02)
