"""The host-memory tier: the newest transparent snapshot also kept in ``/dev/shm``.

``PYCKPT_SHM_MB=N`` (0, the default, is off) keeps the newest snapshot of
up to N MiB in ``/dev/shm/pyckpt-<hash of PYCKPT_DIR>`` as well: a second
``Checkpointer`` there with ``keep=1`` and the same commit protocol, so a
copy survives a crash (SIGKILL included) of the training process, though
not a reboot. A relaunch on the same machine resumes from it without
reading the storage checkpoint's data, after verifying every checksum,
when it is at least as new as the newest storage commit; otherwise (damaged,
older, written for another directory) it says so in one line and resumes
from storage. ``PYCKPT_STORAGE_EVERY=N`` then writes only every Nth snapshot
to ``PYCKPT_DIR``. A snapshot is captured once, by this tier: storage's
checkpoint is copied from the committed memory copy (``tier_publish``). The
memory copy is verified where it lies (``checkpointer.verify_share``: the
engine checksums chunks of files on tmpfs through a mapping, no read into a
buffer). The copy is removed when the process
exits without an uncaught exception; first, when this process's newest
snapshot is held only by the copy (``PYCKPT_STORAGE_EVERY``), rank 0 writes
it to storage (``keep_newest``: the finished marker names it, and the run's
last snapshot is not lost with the copy).

The tier needs every rank of the job on this machine (one ``/dev/shm``):
it is off, with one line, when ``LOCAL_WORLD_SIZE`` differs from
``WORLD_SIZE`` or when the ranks see different ``/dev/shm``s (``_machine_id``,
compared across ranks as the tier opens: not every launcher sets
``LOCAL_WORLD_SIZE``). Decisions that must agree across ranks (tier on, a
snapshot too large for it or without room) are taken from values the ranks
exchange (``Tier.save``: every rank's per-rank bytes and free room).
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import shutil
import socket
import stat
import sys
from typing import Any

import torch

from . import commit, finish, knobs, layout, safe_fs, tree
from .activation import _say as say

SHM_ROOT = "/dev/shm"
ORIGIN = ".origin.json"  # which storage directory (path, device, inode) the copy belongs to
# A copy's bytes beyond its tensors' (measured: ~300 B of manifest a tensor, ~24 KiB of manifest
# framing, marker files and page rounding a copy): counted so that PYCKPT_SHM_MB's bound holds as said.
ENTRY_BYTES = 512
COPY_BYTES = 64 << 10
SPARES = ".spare"  # evicted snapshots' data files, parked for the next snapshot to write over
TOKEN = ".pyckpt-tier-token"  # in PYCKPT_DIR: a random id the marker repeats (a wiped directory loses it)

_TIERS: dict[str, Tier | None] = {}  # storage directory -> its tier (None: off), one per process
_REFUSED: dict[str, list[str]] = {}  # storage directory -> the memory copy choose() found unsound
_crashed = False
_UNDECIDED = object()


class Tier:
    """The memory copy of one storage directory."""

    def __init__(self, storage_dir: str, path: str, limit: int, coord: Any) -> None:
        from .checkpointer import Checkpointer

        self.storage_dir, self.path, self.limit = storage_dir, path, limit
        self.every = knobs.get("PYCKPT_STORAGE_EVERY")
        self.warned: set[str] = set()  # kinds of snapshot not kept (Tier._not_kept) said so far
        self.ckpt = Checkpointer(path, keep=1, compress="none", coordinator=coord)
        self.ckpt.hand_over_parts = True  # storage's copies take the committed part as it is (tier_publish.py)
        self.rank0 = coord.rank == 0
        self.publication: Any = None  # the newest tier_publish.Publication (storage copied from this tier)
        self.storage: Any = None  # storage's Checkpointer (set by tier_for)
        # (step, its SaveFuture here, or the committed path a resume found) of this process's newest
        # snapshot while this tier holds it; None once storage took a newer one directly (over the limit).
        self.newest: tuple[int, Any] | None = None
        self.kept: Any = _UNDECIDED  # keep_newest's answer, once given
        self.saves = 0  # snapshots this process put here (it trained: its normal end is the run's)
        # every - 1 after a resume from a copy storage lacks: this process's first snapshot goes to storage
        # too. Counted per process, a job restarted before its every-th snapshot never wrote storage.
        self.lag = 0
        # An evicted snapshot's data files are written over by a later snapshot (mapped, in place): new
        # tmpfs files cost a page allocation and zeroing per 4 KiB, and freeing the old ones as much
        # again. Not while this rank's publication may still read one (it holds their descriptors;
        # a publication reads only the snapshot it was started for, and one runs at a time).
        self.ckpt._spares = os.path.join(path, SPARES)
        os.makedirs(self.ckpt._spares, mode=0o700, exist_ok=True)
        if self.rank0:
            _drop_spares_of_missing_ranks(self.ckpt._spares, coord.world_size)
            # A copy being written when its process was killed: its data would count toward PYCKPT_SHM_MB
            # (Tier.save) until this tier's first commit removed it, and no copy is kept while it does.
            commit.gc_tmp(path, set(), locked=True)  # rank 0 holds the directory lock: no writer is live
        self.ckpt._may_recycle = self._publication_done

    def _publication_done(self) -> bool:
        p = self.publication
        return p is None or not p.thread.is_alive()

    def storage_due(self, n: int) -> bool:
        """Whether snapshot number ``n`` (1, 2, ...) of this process also goes to storage."""
        return (n + self.lag) % self.every == 0

    def save(self, step: int, state: Any, rank_state: Any, **kw: Any) -> Any:
        """Start the memory copy (a SaveFuture), or None when it is not kept (one line): the tier would
        hold more of ``/dev/shm`` than PYCKPT_SHM_MB, or ``/dev/shm`` lacks the room."""
        coord = self.ckpt.coord
        prev, timeout = self.ckpt._inflight, knobs.get("PYCKPT_STAGING_TIMEOUT_S")
        # Measured once the copy before is committed and its predecessor parked (retention runs in the
        # save's commit); Checkpointer.save would wait for it as long, a moment later.
        committed = prev is None or prev._done.wait(timeout)
        shared, mine = _nbytes(state), _nbytes(rank_state)
        need = COPY_BYTES + shared + mine
        held, parked, room = self._held()
        recyclable = self._publication_done()  # else Checkpointer._take_spare leaves the parked files be
        if coord.world_size > 1:
            # Every rank's per-rank state lands in this /dev/shm too (a ZeroRedundancyOptimizer's share of
            # the optimizer state is most of a snapshot); one store round, so that every rank decides alike.
            # Rank 0's footprint: its wait above covered the commit, and retention, of every rank's part.
            seen = coord.all_gather_json([mine, room, held, parked, recyclable, committed], "tier/need")
            need = COPY_BYTES + shared + sum(s[0] for s in seen)
            room = min(s[1] for s in seen)
            held, parked = seen[0][2], seen[0][3]
            recyclable = all(s[4] for s in seen)
            committed = all(s[5] for s in seen)
        if not recyclable:
            parked = 0  # a new file is written next to them
        mib, limit = 2**20, f"PYCKPT_SHM_MB={self.limit >> 20}"
        if not committed:
            # Not a failed copy (Checkpointer.save would wait as long again, then skip it, and the storage
            # checkpoint due to be copied from it with it).
            return self._not_kept("slow", f"snapshot of step {step} not kept in memory: the copy before it is still "
                                  f"being committed after PYCKPT_STAGING_TIMEOUT_S={timeout:g} s")
        if 2 * need > self.limit:  # the copy before a snapshot stays until the snapshot is committed
            return self._not_kept("size", f"snapshot of {need / mib:.1f} MiB is not kept in memory: it needs "
                                  f"{-(-2 * need * 10 // mib) / 10:.1f} MiB of {SHM_ROOT} (the copy before it stays "
                                  f"until it is committed), over {limit}; written to storage instead "
                                  f"(PYCKPT_SHM_MB={-(-2 * need // mib)} or more keeps it)", suffix=False)
        if held - parked + need > self.limit:  # a larger copy before it, or leftovers: kept once they are gone
            return self._not_kept("held", f"snapshot of step {step} ({need / mib:.1f} MiB) not kept in memory: "
                                  "next to what the tier holds now (the copy before it, files a storage copy still "
                                  f"reads) it would hold {(held - parked + need) / mib:.1f} MiB of {SHM_ROOT}, "
                                  f"over {limit}")
        if need > room:
            return self._not_kept("space", f"snapshot of step {step} ({need / mib:.1f} MiB) not kept in memory: "
                                  f"{room / mib:.1f} MiB free in {SHM_ROOT} next to the copy before it")
        if self.publication is not None:
            self.publication.opened.wait()  # its source files are open: retention may delete them now
        fut = self.ckpt.save(step, state, rank_state, **kw)
        self.newest = (step, fut)
        self.saves += 1
        return fut

    def _not_kept(self, kind: str, line: str, suffix: bool = True) -> None:
        """Storage captures this snapshot itself (the memory copy is older now); one line per kind."""
        self.newest = None
        if kind not in self.warned and self.rank0:
            say(f"warning: {line}" + (" (written to storage instead)" if suffix else ""), "warning")
        self.warned.add(kind)

    def _held(self) -> tuple[int, int, int]:
        """(bytes of /dev/shm the tier holds, of those the parked files a new copy writes over, bytes a
        new copy can take). The room is free tmpfs space plus the parked files: the copy before stays
        until the new one is committed, so running out there would fail the snapshot (and the storage
        checkpoint due to be copied from it)."""
        parked = _allocated(self.ckpt._spares)
        held = _allocated(self.path) if self.rank0 else 0  # rank 0's is the one used (Tier.save)
        return held, parked, _free(self.path) + parked

    def publish(self, source: Any, storage: Any, step: int) -> Any:
        """Storage's checkpoint of ``step`` copied from this tier's commit ``source`` (a SaveFuture);
        returns storage's SaveFuture, or None when ``storage`` must capture it itself (tier_publish.usable)."""
        from . import tier_publish

        if not tier_publish.usable(storage):
            return None
        if self.publication is not None:
            self.publication.wait()  # one storage checkpoint at a time, as Checkpointer.save waits
        self.publication = tier_publish.Publication(self.path, source, storage, step)
        return self.publication.future

    def remove(self) -> None:
        """Wait for the memory copy in flight, then delete it (the run ended normally)."""
        if self.kept is _UNDECIDED:
            self.kept = None  # nothing is left to keep_newest
        if self.publication is not None:
            self.publication.wait()  # it reads the memory copy's files
        self.ckpt.close()
        shutil.rmtree(self.path, ignore_errors=True)


def shm_path(storage_dir: str) -> str:
    """``/dev/shm/pyckpt-<16 hex digits of the storage directory's real path>``."""
    digest = hashlib.sha1(os.path.realpath(storage_dir).encode()).hexdigest()[:16]
    return os.path.join(SHM_ROOT, f"pyckpt-{digest}")


def _drop_spares_of_missing_ranks(spares: str, world_size: int) -> None:
    """Delete parked files of ranks this job does not have (a larger job's, before a resize): no save
    writes over them, so they would hold their tmpfs pages, and count as room (``Tier._held``) that no
    copy can use, until the memory copy is removed."""
    try:
        names = os.listdir(spares)
    except OSError:
        return
    for name in names:
        rank = name[5:-4]
        if name.startswith("rank-") and name.endswith(".bin") and rank.isdigit() and int(rank) >= world_size:
            try:
                os.unlink(os.path.join(spares, name))
            except OSError:
                pass  # gone already; or not removable, then the copy's removal takes it


def tier_for(ckpt: Any, coord: Any) -> Tier | None:
    """The memory tier of ``ckpt``'s directory (opened on the first call), or None when it is off."""
    key = ckpt.directory
    if key not in _TIERS:
        _TIERS[key] = _open(ckpt.directory, coord)
    tier = _TIERS[key]
    if tier is not None:
        tier.storage = ckpt
    return tier


def keep_newest(tier: Tier) -> tuple[int | None, bool] | None:
    """At a normal end (rank 0, before the copy is removed): write this process's newest snapshot to
    storage when only this tier holds it (``PYCKPT_STORAGE_EVERY``), else it is lost with the copy.

    Returns None when nothing changed (no such snapshot, or storage has it), else (the step of
    storage's newest checkpoint now, None when it has none; whether that is the newest snapshot).
    Answered once: the finished marker's exit handler and this tier's run in either order. Never
    raises (a failure is one line).

    Multi-rank: the other ranks may have exited, so rank 0 copies every rank's part of the committed
    memory copy itself (``tier_publish.publish_whole``), which the memory commit already agreed on."""
    if tier.kept is not _UNDECIDED:
        return tier.kept
    tier.kept = None
    if tier.newest is None or tier.storage is None or not tier.rank0 or tier.ckpt._closed:
        return None  # (closed: this process let the copy go, as a test's relaunch does)
    from . import tier_publish

    storage, step = tier.storage, tier.newest[0]
    try:
        src, step, failed = _memory_only(tier)
        if src is None:  # storage holds it; or the newest failed (said in its own line), nothing older is here
            tier.kept = (finish.newest_step(storage.directory), False) if failed else None
            return tier.kept
        why = _uncopyable(storage)
        if why is None:
            tier_publish.publish_whole(tier.path, src, storage, step)
            tier.kept = (step, not failed)
            return tier.kept
    except Exception as e:  # disk full, storage gone: the marker must not name a step storage lacks
        why = " ".join(f"{type(e).__name__}: {e}".split())  # one line
    stored = finish.newest_step(storage.directory)
    say(f"warning: the snapshot of step {step}, kept only in memory, could not be written to "
        f"{storage.directory} at the end of the run ({why}); it is lost with the memory copy: the newest "
        "checkpoint there is " + (f"step {stored}" if stored is not None else "none"), "warning")
    tier.kept = (stored, False)
    return tier.kept


def _memory_only(tier: Tier) -> tuple[str | None, int, bool]:
    """(path, step) of the newest snapshot only this tier holds (path None: none), and whether the
    newest snapshot failed."""
    from .checkpointer import iter_valid

    step, held = tier.newest
    storage = tier.storage
    if tier.publication is not None:
        tier.publication.wait()
    failed = False
    if not isinstance(held, str):
        if held.wait():
            done = storage._inflight  # storage's newest save or copy (of this step, when one was due)
            if done is not None and done.step == step and done.wait():
                return None, step, False
            return held.result(), step, False
        failed = True  # said in its own line; the snapshot before it may be held only here too
    # Resumed from this copy with no snapshot since, or the newest snapshot failed: the copy's newest
    # commit is the newest snapshot there is.
    info = next(iter(iter_valid(tier.path, warn=False)), None)
    if info is None or any(e.step == info.step for e in layout.committed(storage.directory)):
        return None, step, failed
    return info.path, info.step, failed


def _uncopyable(storage: Any) -> str | None:
    """Why the memory copy cannot be copied into ``storage`` (tier_publish.usable), or None."""
    if storage._closed:
        return "its Checkpointer was closed (pyckpt.disable())"
    if storage.remote is not None:
        return "object storage takes no copies of it"
    if storage.compress != "none" or storage.keep_best:
        return "a compressed or keep_best PYCKPT_DIR takes no copies of it"
    return None


def keep_newest_before_close(ckpt: Any) -> None:
    """``keep_newest`` before storage's Checkpointer ``ckpt`` closes (``pyckpt.disable()``), answered for
    that session only: an ``enable()`` on the same directory reuses the tier, and its own newest
    snapshot must be kept at its end in turn."""
    tier = _TIERS.get(ckpt.directory)
    if tier is not None:
        keep_newest(tier)
        tier.newest, tier.kept = None, _UNDECIDED


def at_normal_end(ckpt: Any) -> tuple[int | None, bool] | None:
    """``keep_newest`` for ``ckpt``'s directory (finish.py, rank 0), or None when its tier is off."""
    tier = _TIERS.get(ckpt.directory)
    return keep_newest(tier) if tier is not None else None


def _open(storage_dir: str, coord: Any) -> Tier | None:
    mb = knobs.get("PYCKPT_SHM_MB")
    rank0 = coord.rank == 0
    if not mb:
        if knobs.get("PYCKPT_STORAGE_EVERY") > 1 and rank0:
            say("warning: PYCKPT_STORAGE_EVERY is ignored without the memory tier (PYCKPT_SHM_MB)", "warning")
        if rank0:
            _left_behind(storage_dir)
        return None
    limit = mb << 20
    path = shm_path(storage_dir)
    why = _unsuitable(limit, path)
    if coord.world_size > 1:
        # Launchers other than torchrun set no LOCAL_WORLD_SIZE: only the ranks can tell whether they
        # share one /dev/shm. Agreed, so that every rank turns the tier on or off alike.
        seen = coord.all_gather_json([_machine_id(), why], "tier/open")
        if len({m for m, _ in seen}) > 1:
            why = "the job's ranks are on more than one machine (or see different /dev/shm mounts)"
        else:
            why = next((w for _, w in seen if w is not None), None)
    if why is None:
        try:
            why = _claim(path, _origin(storage_dir)) if rank0 else None
        except OSError as e:  # said, and agreed below: the other ranks wait for rank 0's answer
            why = f"cannot record which directory the copy belongs to ({e.filename or storage_dir}: {e.strerror or e})"
        if coord.world_size > 1:
            why = coord.broadcast_json(why, "tier/claim")
    if why is not None:
        if rank0:
            say(f"warning: memory tier off: {why}; snapshots go to {storage_dir} only", "warning")
        return None
    tier = Tier(storage_dir, path, limit, coord)
    if rank0:
        atexit.register(_at_exit, tier)
        _watch_crashes()
    return tier


def _unsuitable(limit: int, path: str) -> str | None:
    if not os.path.isdir(SHM_ROOT):
        return f"{SHM_ROOT} does not exist"
    ws, lws = os.environ.get("WORLD_SIZE"), os.environ.get("LOCAL_WORLD_SIZE")
    if ws is not None and lws is not None and ws != lws:
        return f"the job spans machines (WORLD_SIZE={ws}, LOCAL_WORLD_SIZE={lws})"
    # A copy already at ``path`` (a crashed run's) is this tier's to reuse or replace: its room counts.
    free = _free(SHM_ROOT) + _allocated(path)
    if free < limit:
        return f"{SHM_ROOT} has {free >> 20} MiB free, less than PYCKPT_SHM_MB={limit >> 20}"
    return None


def _machine_id() -> str:
    """Which ``/dev/shm`` this process sees: the kernel's boot id (random per boot, so differs between
    machines), the mount's device number (differs between containers with their own) and the host name."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    try:
        dev = os.stat(SHM_ROOT).st_dev
    except OSError:
        dev = -1
    return f"{boot}:{dev}:{socket.gethostname()}"


def _free(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _allocated(path: str) -> int:
    """Bytes of tmpfs pages the files under ``path`` hold (0 when there is none)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def _origin(storage_dir: str) -> dict:
    """Which storage directory a copy belongs to: its real path, device and inode, and the token kept
    in it (made here when absent). A directory wiped and made again may get the same inode back, never
    the token."""
    st = os.stat(storage_dir)
    token_file = os.path.join(storage_dir, TOKEN)
    try:
        token = safe_fs.read_small(token_file, 4096).decode("ascii").strip()
    except (FileNotFoundError, ValueError):
        token = ""
    except OSError as e:
        if e.strerror != safe_fs.NOT_REGULAR:
            raise
        token = ""  # a FIFO, device or link in its place: replaced below (the copy it named proves nothing)
    if not token:
        token = os.urandom(16).hex()
        tmp = f"{token_file}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(token)
        os.replace(tmp, token_file)
    return {"directory": os.path.realpath(storage_dir), "dev": st.st_dev, "ino": st.st_ino, "token": token}


def _private(path: str) -> bool:
    """Whether ``path`` is a real directory of this user that nobody else may enter or change."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077


def _claim(path: str, origin: dict) -> str | None:
    """Make ``path`` this storage directory's private copy; None when done, else why it cannot be.

    /dev/shm is open to every user: a copy there is trusted only in a directory this user owns and
    nobody else may write (else anyone could plant a state to be resumed, loop variables included);
    one that is not, or that was written for another run, is removed (one line)."""
    marker = os.path.join(path, ORIGIN)
    if os.path.lexists(path):
        found = None
        if _private(path):
            try:
                with open(marker) as f:
                    found = json.load(f)
            except (OSError, ValueError):
                pass
            reason = "it was written for another run (directory " + (
                str(found.get("directory")) if isinstance(found, dict) else "unknown") + ")"
        else:
            reason = "it is not this user's private directory"
        if found != origin:
            say(f"warning: ignoring memory-tier copy {path}: {reason}; removing it", "warning")
            try:
                if os.path.islink(path) or not os.path.isdir(path):
                    os.unlink(path)
                else:
                    shutil.rmtree(path)
            except OSError as e:
                return f"cannot remove {path} ({e.strerror}), which is not this run's"
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass  # ours, checked above (or made by another process of this user just now: checked below)
    except OSError as e:
        return f"cannot create {path}: {e.strerror}"
    if not _private(path):  # someone else made it between the removal and here
        return f"{path} is not this user's private directory"
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            json.dump(origin, f)
    return None


def _left_behind(storage_dir: str) -> None:
    """With the tier off: say so when a copy of this directory is still in /dev/shm (a crashed run's),
    and remove it at a normal end (the run's newest snapshot may be there; nothing uses it now)."""
    path = shm_path(storage_dir)
    if not _private(path) or not any(n.startswith("step-") for n in os.listdir(path)):
        return  # none, or no snapshot in it (discarded)
    say(f"warning: memory-tier copy {path} is not used: PYCKPT_SHM_MB is 0 (set it to resume from that copy); "
        "it is removed if this run trains and ends normally", "warning")
    atexit.register(_remove_at_normal_exit, path)


def _remove_at_normal_exit(path: str) -> None:
    if _normal_end() and _trained(None):
        shutil.rmtree(path, ignore_errors=True)


def _trained(tier: Tier | None) -> bool:
    """Whether this process trained as the run (stepped past any pending restore, or put a snapshot in
    ``tier``): only then is its normal end the run's. An evaluation script sharing PYCKPT_DIR ends
    normally too, and removing the copy then lost a crashed run's newest snapshot."""
    from . import activation

    s = activation._SESSION
    if s is not None and s.step > 0 and s.source is None and getattr(s.tracker, "plan", None) is None:
        return True
    return tier is not None and tier.saves > 0


def held_copy(storage_dir: str) -> tuple[str, int] | None:
    """(path, step) of the newest snapshot this user's memory copy of ``storage_dir`` holds on this
    machine (``pyckpt ls``), or None. Not verified here: a relaunch checks it."""
    from .commit import read_latest

    path = shm_path(storage_dir)
    if not _private(path) or (name := read_latest(path)) is None:
        return None
    step = layout.parse_step(name)
    return None if step is None or not layout.is_checkpoint_dir(os.path.join(path, name)) else (path, step)


def discard(storage_dir: str) -> None:
    """Remove the snapshots of ``storage_dir``'s memory copy (rank 0): a run that starts over or from a
    chosen checkpoint (PYCKPT_RESUME never / a directory) forks from what the copy continues, and its
    step numbers repeat that run's. Left there, an ``auto`` relaunch took the copy for newer than this
    run's own checkpoints of lower steps and resumed the earlier run, silently."""
    path = shm_path(storage_dir)
    if not _private(path):
        return
    if any(n.startswith("step-") for n in os.listdir(path)):
        say(f"memory-tier copy {path} holds the run this one does not continue: removing it")
    _remove_snapshots(path)


def _remove_snapshots(path: str) -> None:
    """Delete every snapshot of the copy at ``path`` and its ``latest`` pointer (its parked spares and
    origin marker stay)."""
    for name in os.listdir(path):
        target = os.path.join(path, name)
        if name.startswith("step-") and os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target, ignore_errors=True)
        elif name.startswith("step-") or name == layout.LATEST:
            with contextlib.suppress(OSError):
                os.unlink(target)


def choose(ckpt: Any, coord: Any) -> Any:
    """For ``resume.choose``: a ``resume.Source`` in the memory tier when its newest copy is sound
    (every checksum verified) and at least as new as storage's newest commit, else None (one line
    saying why, when there was a copy). Storage data is not read. A copy written by another number
    of ranks is resumed like storage's would be (``resume.source_for``)."""
    from . import resume
    from .checkpointer import verify_share

    tier = tier_for(ckpt, coord)
    if tier is None:
        return None
    mine = next(iter(tier.ckpt._candidates()), None)
    if mine is None:
        return None
    step = _step(mine)
    # Storage's newest valid commit decides only if storage holds a later step at all: when no
    # commit there is newer than the copy, none is validated (parsing a part of thousands of
    # tensors costs as much as the tier's whole restore). Every rank takes the same branch.
    newer = ckpt.remote is not None or any((e.step if e.step is not None else -1) > step
                                           for e in layout.committed(ckpt.directory))
    if coord.world_size > 1:
        newer = any(coord.all_gather_json(newer, "tier/newer"))
    stored = next(iter(ckpt._candidates()), None) if newer else None  # manifests and parts only
    if stored is not None and _step(stored) > step:
        if tier.rank0:
            say(f"memory-tier copy of step {step} is older than {stored}: resuming from storage")
        return None
    err = None
    try:  # (on another number of ranks too: the copy holds every saved rank's part, as storage's would)
        verify_share(mine, coord.rank, coord.world_size)
    except Exception as e:  # damage, another job's shape: storage is the fallback
        err = e
    errors = tier.ckpt._gather_errors(err)
    if errors:
        _REFUSED[ckpt.directory] = [mine]
        if tier.rank0:
            say(f"warning: memory-tier copy {mine} not used ({errors[0][1]}); resuming from "
                f"{'storage' if stored is None else stored}; removing it", "warning")
            # Later copies would reference its chunks (incremental) and carry the damage on.
            _remove_snapshots(tier.path)
        return None
    if tier.rank0:
        say(f"resuming from the memory tier: {mine} (checksums verified; storage not read)")
    src = resume.source_for(tier.ckpt, mine, coord)  # another number of ranks: checked and said as for storage
    tier.newest = (step, mine)  # storage may not hold it: kept at a normal end if no snapshot follows
    if tier.every > 1 and not any(e.step == step for e in layout.committed(ckpt.directory)):
        tier.lag = tier.every - 1
    # Storage's chunks were not read, so not verified: its next checkpoint references none of them
    # (written in full once; a damaged chunk would otherwise be inherited by every later one).
    ckpt._baseline.seeded = True
    return src


def refused(ckpt: Any) -> list[str]:
    """The memory-tier copy of ``ckpt``'s directory that ``choose`` refused as unsound (a list of at
    most one path, the same on every rank), for the resume's "every checkpoint is damaged" check."""
    return _REFUSED.get(ckpt.directory, [])


def _step(path: str) -> int:
    from .checkpointer import info_for

    return info_for(path).step


def _nbytes(state: Any) -> int:
    """Bytes a copy of ``state`` (a state or its encoding, ``tree.Flat``) takes in the tier: the storages
    it views, and its tensors' manifest entries."""
    if type(state) is tree.Flat:
        tensors = state.tensors
    else:
        tensors, stack = [], [state]
        while stack:
            v = stack.pop()
            if isinstance(v, torch.Tensor):
                tensors.append(v)
            elif isinstance(v, dict):
                stack.extend(v.values())
            elif isinstance(v, (list, tuple)):
                stack.extend(v)
    from .sharded import storage_bytes  # a DTensor (FSDP2) has no storage pointer of its own

    seen: dict[Any, int] = {}
    for v in tensors:
        key, n = storage_bytes(v)
        seen[key] = n
    return sum(seen.values()) + ENTRY_BYTES * len(tensors)


def _watch_crashes() -> None:
    """An uncaught exception keeps the memory copy for the relaunch (a clean exit removes it)."""
    previous = sys.excepthook

    def hook(*args: Any) -> None:
        global _crashed
        _crashed = True
        previous(*args)

    sys.excepthook = hook


def _normal_end() -> bool:
    """This process (not a forked child) is ending without an uncaught exception or ``sys.exit`` with a
    non-zero status: finish.py's watch, so the same "normal end" as the finished marker."""
    return not _crashed and not finish._failed and os.getpid() == _PID


def _at_exit(tier: Tier) -> None:
    if _normal_end() and _trained(tier):
        keep_newest(tier)  # before the copy goes (done already if the finished marker's handler ran first)
        tier.remove()


_PID = os.getpid()
