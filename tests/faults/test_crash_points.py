"""A crash (SIGKILL) at every point before and after every file operation of save, commit,
retention and garbage collection: the previous checkpoint always loads, the newest commit wins,
and the next successful save leaves nothing behind.

Each point is hit deterministically through PYCKPT_TEST_CRASH_AT (pyckpt.commit.CRASH_POINTS),
one child process per point (forked by the zygote fixture, torch already imported), all in one
root: every child first makes a clean save (which must collect the leftovers of the previous
child's crash), then crashes in its second save.
"""
import os
import signal
import textwrap

import torch

import pyckpt
from pyckpt import commit

N = 3000

CHILD = textwrap.dedent("""
    import os, sys, json, torch, pyckpt
    root, s1, g1, s2, g2, point, dead, api = sys.argv[1:9]
    def state(g):
        return {"t": torch.arange(%d, dtype=torch.float32) + int(g), "g": int(g)}
    if api == "1":  # pyckpt.save re-saving one path
        pyckpt.save(state(g1), root)
        print("CLEAN", json.dumps(sorted(os.listdir(os.path.dirname(root)))), flush=True)
        os.environ["PYCKPT_TEST_CRASH_AT"] = point
        pyckpt.save(state(g2), root)
        print("NOCRASH", flush=True)
        sys.exit(0)
    ck = pyckpt.Checkpointer(root, keep=1)
    path = ck.save(int(s1), state(g1)).result(60)
    print("CLEAN", json.dumps([sorted(os.listdir(root)), sorted(os.listdir(path))]), flush=True)
    # Leftovers of a dead writer, so the armed save's garbage collection has work to crash in.
    os.makedirs(os.path.join(root, f"step-000000777.tmp-{dead}x1", "rank-00000"))
    os.makedirs(os.path.join(root, f"step-000000778.del-{dead}x2"))
    open(os.path.join(root, f"latest.tmp-{dead}x3"), "w").close()
    os.environ["PYCKPT_TEST_CRASH_AT"] = point
    ck.save(int(s2), state(g2)).result(60)
    print("NOCRASH", flush=True)
""" % N)

# Points at or after which the new checkpoint is committed (it must then be the one that loads).
COMMITTED = ("commit.dir_rename.after", "commit.exchange.after", "commit.old_remove", "commit.latest", "retention")
RESAVE = ("commit.exchange", "commit.old_remove")  # reached only when re-saving an existing path


def run_child(zygote, root, s1, g1, s2, g2, point, api=False):
    dead = zygote.run("").pid  # a process that has exited: the leftovers' writer is dead
    child = zygote.run(CHILD, [root, s1, g1, s2, g2, point, dead, int(api)], timeout=120)
    assert child.returncode == -signal.SIGKILL, (
        f"{point}: not reached (rc {child.returncode})\n{child.stdout}\n{child.stderr}")
    clean = [ln for ln in child.stdout.splitlines() if ln.startswith("CLEAN ")]
    assert len(clean) == 1, child.stdout + child.stderr
    return clean[0][6:]


def check_loads(where, expect_g):
    out = pyckpt.load(where)
    assert out["g"] == expect_g, (where, out["g"], expect_g)
    assert torch.equal(out["t"], torch.arange(N, dtype=torch.float32) + expect_g)


def test_every_crash_point_keeps_a_loadable_checkpoint_and_leaves_nothing(tmp_path, zygote):
    import json

    root = str(tmp_path / "root")
    g = 0
    for point in commit.CRASH_POINTS:
        resave = point.startswith(RESAVE)
        g1, g2 = g + 1, g + 2
        s1, s2 = g1, (g1 if resave else g2)
        clean = json.loads(run_child(zygote, root, s1, g1, s2, g2, point))
        if g:  # the clean save collected everything the previous crash left
            assert clean == [[".pyckpt.lock", "latest", "metrics.jsonl", f"step-{s1:09d}"],
                             ["MANIFEST.json", "rank-00000", "rank-00000.json"]], (point, clean)
        committed = point.startswith(COMMITTED)
        check_loads(root, g2 if committed else g1)  # the newest commit, through the reader's scan
        if not committed or resave:
            check_loads(os.path.join(root, f"step-{s1:09d}"), g2 if committed else g1)
        g += 2
    with pyckpt.Checkpointer(root, keep=1) as ck:
        ck.save(g + 1, {"t": torch.arange(N, dtype=torch.float32) + g + 1, "g": g + 1}).result(60)
    assert sorted(os.listdir(root)) == [".pyckpt.lock", "latest", "metrics.jsonl", f"step-{g + 1:09d}"]
    check_loads(root, g + 1)


def test_resaving_one_path_never_leaves_it_empty(tmp_path, zygote):
    """pyckpt.save over an existing checkpoint: the path holds a complete checkpoint at every point."""
    import json

    path = str(tmp_path / "ckpt")
    g = 0
    points = [p for p in commit.CRASH_POINTS if p.startswith(("commit.manifest", "commit.exchange",
                                                                "commit.old_remove"))]
    for point in points:
        clean = json.loads(run_child(zygote, path, 0, g + 1, 0, g + 2, point, api=True))
        assert clean == ["ckpt"], (point, clean)  # the previous crash's leftovers were collected
        check_loads(path, g + 2 if point.startswith(COMMITTED) else g + 1)
        g += 2
    pyckpt.save({"t": torch.zeros(1)}, path)
    assert os.listdir(tmp_path) == ["ckpt"]
