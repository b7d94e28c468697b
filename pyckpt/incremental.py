"""Incremental checkpoints: unchanged chunks reference the earlier checkpoint that holds them.

A ``Baseline`` remembers, per chunk *signature* (which storage bytes the chunk
holds), the fingerprint and the chunk record of the last committed
checkpoint of this rank. The next save asks the engine to skip every chunk
whose fingerprint is unchanged (``expectations``); the part then records
such a chunk as a reference to the file that physically holds it
(``../step-P/rank-R/data-000.bin``, one hop, never a chain) with that
chunk's offset, lengths and CRC32Cs, so loading checks the same CRC as
before (docs/FORMAT.md §14).

Retention keeps referenced data alive: ``referenced_dirs`` lists the step
directories whose files a committed checkpoint references; ``commit``
retires (removes the manifest of) a checkpoint that is deleted while still
referenced and deletes its directory once nothing references it.
"""
from __future__ import annotations

import atexit
import logging
import operator
import os
import posixpath
import stat
import threading
import zlib

from . import _native, gcpause, layout, threads

log = logging.getLogger("pyckpt")

# PYCKPT_INCREMENTAL_VERIFY=sample: each save CRC-checks the unchanged chunks whose signature
# falls in this save's slot of SAMPLE_EVERY, so every unchanged chunk is checked at least once
# in SAMPLE_EVERY consecutive saves.
SAMPLE_EVERY = 8
STATUS_WRITTEN, STATUS_REFERENCED, STATUS_COLLISION = 0, 1, 2


def fp_hex(fp: int) -> str:
    return f"{fp:016x}"


def signatures(part_storages: list[dict], nchunks: int) -> list[tuple]:
    """Per chunk index: its pieces as sorted (chunk offset, scope, storage id, storage offset, bytes).

    Computed from storage JSON, so a plan (via ``writer``) and a part read back
    from disk give the same signatures."""
    sig: list[list[tuple]] = [[] for _ in range(nchunks)]
    for s in part_storages:
        for p in s["pieces"]:
            if 0 <= p["chunk"] < nchunks:
                sig[p["chunk"]].append((p["chunk_offset"], s["scope"], s["id"], p["storage_offset"], p["nbytes"]))
    return [tuple(sorted(x)) for x in sig]


class Baseline:
    """The previous checkpoint's chunks of one rank: signature -> (fingerprint, root-relative chunk record)."""

    def __init__(self) -> None:
        self.chunks: dict[tuple, tuple[int, dict, int]] = {}  # sig -> (fp, record, file nbytes)
        self.changed: set[tuple] = set()  # sigs whose fingerprint changed at the last save
        # Sigs the last save recorded without a fingerprint (trained chunks copied without one), and
        # those it fingerprinted, that the save before had recorded so, whose tensors moved in between:
        # one fingerprint with nothing to compare it with does not show they stopped changing.
        self.unfingerprinted: set[tuple] = set()
        self.unproven: set[tuple] = set()
        self.saves = 0
        self.seeded = False
        # What ``seed`` may start from. References are checked against CRC records, never against the
        # bytes on disk, so a damaged chunk referenced once is inherited by every later checkpoint:
        # ``source`` is the checkpoint (absolute path) this process restored or verified, the one to
        # seed from; ``damaged`` the checkpoints it found unloadable, never seeded from (Checkpointer).
        self.source: str | None = None
        self.damaged: set[str] = set()
        # The last signatures computed, with the storage records they came from (held, so their
        # identities stay theirs): expectations and update see the same records at every save of
        # a reused plan (writer.storages_json shares them, read-only), and computing them again
        # cost milliseconds of the GIL per save for thousands of storages.
        self._sigs: tuple[list[dict], int, list[tuple]] | None = None
        self._crcs: tuple[list[tuple], dict[int, int]] | None = None  # (signatures, chunk -> crc), _sig_crc
        # The bytes a reference points at can rot after their commit, and a reference is checked
        # against its CRC record only: each referenced chunk is read back and CRC-checked once before
        # a save references it. Per root-relative file: the identity it had then (a write, a
        # truncation or a replacement changes it: checked again) and the chunks found sound, as
        # (offset, stored_len, crc32c). Filled off the training thread where possible: by the
        # pre-check a commit starts (``precheck``) and by a restore's reads (``checked_on_disk``).
        self._sound_on_disk: dict[str, tuple[tuple, set[tuple[int, int, int]]]] = {}
        self._lock = threading.Lock()  # _sound_on_disk and its sets: the pre-check thread writes them too
        self._precheck: _Precheck | None = None

    def __bool__(self) -> bool:
        return bool(self.chunks)

    def update(self, part: dict, step_name: str, root: str | None = None, moved: set[int] = frozenset()) -> None:
        """Take the chunks of ``part`` (this rank's part of committed checkpoint ``step_name``); with
        ``root`` (the checkpoints' root), start the background pre-check of those the next save may reference.
        ``moved``: the chunks whose tensors all moved their version counter before that save."""
        sizes = {f["path"]: f["nbytes"] for f in part.get("files", [])}
        sigs = self.signatures(part.get("storages", []), len(part.get("chunks", [])))
        new: dict[tuple, tuple[int, dict, int]] = {}
        unfingerprinted: set[tuple] = set()
        unproven: set[tuple] = set()
        for i, (ch, sig) in enumerate(zip(part.get("chunks", []), sigs)):
            fp = ch.get("fingerprint")
            if sig and not isinstance(fp, str):
                unfingerprinted.add((ch["raw_len"],) + sig)
            if not isinstance(fp, str) or not sig or ch["file"] not in sizes:
                continue
            if i in moved and (ch["raw_len"],) + sig in self.unfingerprinted:
                unproven.add((ch["raw_len"],) + sig)
            try:
                value = int(fp, 16)
            except ValueError:
                continue
            rec = dict(ch)
            rec["file"] = root_relative(step_name, ch["file"])
            if rec["file"] is None:
                continue
            new[(ch["raw_len"],) + sig] = (value, rec, sizes[ch["file"]])
        # A chunk that just changed (trained weights, optimizer moments) will most likely change
        # again: the next save copies it without fingerprinting it first (no extra read on the
        # capture path); its fingerprint still comes from the staged copy, so a chunk that stops
        # changing is referenced again one save later.
        self.changed = {k for k, v in new.items() if k in self.chunks and self.chunks[k][0] != v[0]}
        # A trained chunk sampled by this save (Checkpointer._moved_chunks fingerprints moved chunks at two
        # saves in a row): not read back until the second fingerprint shows it unchanged. One that did
        # not move this time (trained no more) is read back as any other.
        self.unproven = unproven
        self.unfingerprinted = unfingerprinted
        self.chunks = new
        self.saves += 1
        if root is not None:
            self.precheck(root)

    def precheck(self, root: str) -> None:
        """Read back and CRC-check, on a low-priority daemon thread, the chunks the next save may
        reference (all but those that just changed, or that have only one fingerprint since they last
        moved: trained weights, which would be read back and compared in vain), so that save finds them
        checked: the read costs the training thread nothing unless that save comes before it is done."""
        self.stop_precheck()
        if _EXITING:
            return
        todo: dict[str, tuple[int, list[dict]]] = {}
        for key, (_, rec, nbytes) in self.chunks.items():
            if key not in self.changed and key not in self.unproven:
                todo.setdefault(rec["file"], (nbytes, []))[1].append(rec)
        if todo:
            check = _Precheck(self, root, todo)
            if threads.start(check, "the pre-check of the chunks the next save may reference",
                             "that save checks them itself"):
                self._precheck = check

    def stop_precheck(self) -> None:
        """Tell the pre-check to stop (it does after its current read of at most 8 MiB); never waits.
        What it found so far stays remembered; what it did not reach, a save checks itself."""
        t, self._precheck = self._precheck, None
        if t is not None:
            t.stop.set()

    def checked_on_disk(self, root: str, checked: dict[tuple[str, str], tuple[tuple, set]]) -> None:
        """Remember the chunks a restore or verify read and found sound (``reader.checked_reads``):
        those of checkpoints in ``root`` need no read before the next save references them."""
        root = os.path.abspath(root)
        with self._lock:
            for (ckpt, rel), (ident, keys) in checked.items():
                name = root_relative(os.path.basename(ckpt), rel) if os.path.dirname(ckpt) == root else None
                if name is None:
                    continue
                prev = self._sound_on_disk.get(name)
                if prev is None or prev[0] != ident:
                    prev = self._sound_on_disk[name] = (ident, set())
                prev[1].update(keys)

    def signatures(self, storages_json: list[dict], nchunks: int) -> list[tuple]:
        """``signatures(storages_json, nchunks)``, reused while called with the very same record
        objects (in order) and chunk count as last time; the returned list must not be changed."""
        last = self._sigs
        if (last is not None and last[1] == nchunks and len(last[0]) == len(storages_json)
                and all(map(operator.is_, last[0], storages_json))):
            return last[2]
        sigs = signatures(storages_json, nchunks)
        self._sigs = (list(storages_json), nchunks, sigs)
        return sigs

    def _sig_crc(self, sigs: list[tuple], i: int) -> int:
        """CRC32 of ``repr(sigs[i])`` (the sample rotation's phase), remembered while ``sigs`` is the
        list ``signatures`` returns again: the repr of a chunk of thousands of storages is not made anew
        at every save."""
        memo = self._crcs
        if memo is None or memo[0] is not sigs:
            memo = self._crcs = (sigs, {})
        crc = memo[1].get(i)
        if crc is None:
            crc = memo[1][i] = zlib.crc32(repr(sigs[i]).encode())
        return crc

    def seed(self, root: str, rank: int) -> None:
        """First save of this process: start from a committed checkpoint's part of ``rank`` (its chunk
        records carry fingerprints), so a resumed job's first save is incremental too.

        That checkpoint is ``source`` (the one restored, whose chunks were verified) when set; else
        the newest commit, unless a checkpoint was found damaged: then nothing (the save is written
        in full), since the newest may be the damaged one or reference its data."""
        from . import manifest
        from .errors import PyckptError
        from .safe_fs import CheckpointDir

        self.seeded = True
        committed = layout.committed(root)
        if self.source is not None:
            e = next((e for e in committed if os.path.abspath(e.path) == self.source), None)
        else:
            e = committed[0] if committed and not self.damaged else None
        if e is None:
            return
        try:
            with CheckpointDir(e.path) as d:
                m = manifest.read_manifest(e.path, d)
                if rank >= len(m["parts"]):
                    return
                part = manifest.read_part(e.path, m["parts"][rank], d)
        except (PyckptError, OSError) as exc:
            log.debug("pyckpt: no incremental baseline from %s: %s", e.path, exc)
            return
        self.update(part, e.name)

    def expectations(self, storages_json: list[dict], raw_lens: list[int], on_device: list[bool],
                     final_name: str, root: str, verify: str,
                     moved: set[int] = frozenset(), deferred: dict[int, tuple[str, dict, int]] | None = None,
                     ) -> tuple[list[tuple], dict[int, tuple[dict, int]]]:
        """For the plan chunks (described by their storage JSON, raw lengths, whether on a GPU): the
        engine's ``expect`` list and the reference each skipped chunk would become (chunk -> (record, nbytes)).

        ``verify`` (PYCKPT_INCREMENTAL_VERIFY) says which unchanged chunks the engine also CRC-checks
        against the referenced chunk's ``raw_crc32c`` before skipping them: ``all``; ``sample`` (a
        rotating 1 in SAMPLE_EVERY); ``auto`` (all host chunks, where the CRC comes from the same read
        as the fingerprint; sampled GPU chunks, where it costs a device-to-host copy); ``off``.

        Only checkpoints of a lower step are referenced: never ``final_name`` itself (the same
        step saved again replaces it), nor a higher step left by a run this one resumed before
        (the run will save that step again, replacing what a reference would point at); nor
        files that are no longer there with their recorded size.

        A chunk in ``moved`` (its storages were written in place since the last save: trained
        weights, optimizer moments) almost surely changed: it is expected unchanged only when the
        chunk it would reference is already known sound (found so by the pre-check after the last
        commit, or by a restore), and is otherwise written afresh without an expectation. It is
        never read back here, on the caller's thread: on an H200 that read (64 MiB per save at
        most, then) was the whole of a 71 ms ``save()`` of a 4 GiB state whose every chunk had
        changed. A chunk that did not move (a frozen weight) whose reference the pre-check has not
        reached yet is checked here, unless ``deferred`` is given: then it is expected unchanged
        without a read and entered there (chunk -> (file, record, file nbytes)); the caller checks
        those references off this thread (``check_deferred``) before the save may commit."""
        # A pre-check still running is not waited for: what it has not checked yet is checked here
        # (or, with ``deferred``, on the commit thread), or not referenced.
        self.stop_precheck()
        expect: list[tuple] = []
        refs: dict[int, tuple[dict, int]] = {}
        files: dict[str, _RefFile | None] = {}  # each referenced file opened once per save
        used: set[tuple[str, int]] = set()
        cur = layout.parse_step(final_name)
        try:
            sigs = self.signatures(storages_json, len(raw_lens))
            for i, sig in enumerate(sigs):
                key = (raw_lens[i],) + sig
                hit = self.chunks.get(key)
                if hit is None or key in self.changed:
                    continue
                fp, rec, nbytes = hit
                f = rec["file"]
                held_by = layout.parse_step(f.split("/", 1)[0])
                if held_by is None or cur is None or held_by >= cur or (f, rec["offset"]) in used:
                    continue
                if f not in files:
                    files[f] = _RefFile.open(root, f, nbytes, self)
                if files[f] is None:
                    continue
                if i in moved and not files[f].known_sound(rec):
                    continue  # written afresh by this save, without reading its reference back
                if deferred is not None and not files[f].known_sound(rec):
                    deferred[i] = (f, rec, nbytes)  # checked before the commit, by check_deferred
                elif not files[f].sound(rec):
                    continue  # written afresh by this save
                used.add((f, rec["offset"]))  # a part may not hold the same bytes twice
                sampled = (self._sig_crc(sigs, i) + self.saves) % SAMPLE_EVERY == 0
                check = (verify == "all" or (verify == "auto" and not on_device[i])
                         or (verify in ("sample", "auto") and sampled))
                expect.append((i, fp, check, rec["raw_crc32c"]))
                refs[i] = (rec, nbytes)
        finally:
            for ref in files.values():
                if ref is not None:
                    ref.close()
        # A file this save does not reference is referenced by no later one (references are copied
        # from the previous save's part): forget it.
        with self._lock:
            self._sound_on_disk = {f: v for f, v in self._sound_on_disk.items() if f in files}
        return expect, refs

    def check_deferred(self, root: str, deferred: dict[int, tuple[str, dict, int]], part: dict) -> Exception | None:
        """Read back and CRC-check the references ``expectations`` entered in ``deferred`` that this
        save's ``part`` made (the chunk was found unchanged): on the commit thread, before the save
        may commit. None when every one is sound; else the error that keeps this save from committing,
        naming the damaged file; those chunks are then forgotten, so the next save writes them afresh."""
        from .errors import CorruptCheckpointError

        todo: dict[str, tuple[int, list[dict]]] = {}
        for i, (rel, rec, nbytes) in deferred.items():
            if part["chunks"][i]["file"].startswith("../"):
                todo.setdefault(rel, (nbytes, []))[1].append(rec)
        bad = read_back(self, root, todo)
        if not bad:
            return None
        gone = {(rel, rec["offset"]) for rel, rec in bad}
        self.chunks = {k: v for k, v in self.chunks.items() if (v[1]["file"], v[1]["offset"]) not in gone}
        path = os.path.join(root, bad[0][0])
        return CorruptCheckpointError(
            f"{path}: {len(bad)} chunk(s) this checkpoint would reference no longer match their CRC32C (damaged "
            "on disk or gone): it is not committed, and the next checkpoint writes them afresh; the checkpoints "
            "that hold or reference them are damaged (pyckpt verify)", path=path)


def root_relative(step_name: str, rel: str) -> str | None:
    """The root-relative path of ``rel`` as written in a part of ``step_name`` (None if it leaves the root)."""
    if rel.startswith("../"):
        out = posixpath.normpath(rel[3:])
    else:
        out = posixpath.normpath(f"{step_name}/{rel}")
    head = out.split("/", 1)[0]
    return out if layout.parse_step(head) is not None and not out.startswith("..") else None


_READ_BYTES = 8 << 20  # read-back buffer of the on-disk check


def read_back(owner: Baseline, root: str, todo: dict[str, tuple[int, list[dict]]],
              stop: threading.Event | None = None) -> list[tuple[str, dict]]:
    """Read back and CRC-check chunk records ``todo`` (root-relative file -> (its nbytes, records)),
    one pass along each file; the sound ones are remembered in ``owner``. Returns the (file, record)
    found unsound, a file that cannot be opened counting for all its records; when ``stop`` is set
    meanwhile, returns early (what was not reached counts as neither)."""
    bad: list[tuple[str, dict]] = []
    for rel, (nbytes, recs) in todo.items():
        if stop is not None and stop.is_set():
            break
        ref = _RefFile.open(root, rel, nbytes, owner)
        if ref is None:
            bad += [(rel, rec) for rec in recs]
            continue
        try:
            for rec in sorted(recs, key=operator.itemgetter("offset")):
                sound = ref.sound(rec, stop)
                if stop is not None and stop.is_set():
                    break
                if not sound:
                    bad.append((rel, rec))
        finally:
            ref.close(quiet=True)
    return bad


def file_identity(st: os.stat_result) -> tuple:
    """What tells a data file's bytes may have changed since a check: a write, a truncation or a
    replacement moves one of these (ctime too: a write that puts the old mtime back still moves it)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class _RefFile:
    """A data file a save is about to reference, open for the on-disk check of its chunks."""

    def __init__(self, path: str, fd: int, owner: Baseline, sound: set[tuple[int, int, int]]) -> None:
        self.path, self.fd, self._owner, self._sound = path, fd, owner, sound
        self.damaged = 0
        self._buf: memoryview | None = None

    @classmethod
    def open(cls, root: str, rel: str, nbytes: int, owner: Baseline) -> _RefFile | None:
        """``rel`` opened (no link followed at its last component), or None when it is not a
        regular file of at least ``nbytes`` bytes (its chunks are then written afresh)."""
        path = os.path.join(root, rel)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_size < nbytes:
            os.close(fd)
            return None
        ident = file_identity(st)
        with owner._lock:
            prev = owner._sound_on_disk.get(rel)
            if prev is None or prev[0] != ident:
                prev = owner._sound_on_disk[rel] = (ident, set())
        return cls(path, fd, owner, prev[1])

    def known_sound(self, rec: dict) -> bool:
        """Whether chunk ``rec`` was already found sound in this file (no read)."""
        with self._owner._lock:
            return (rec["offset"], rec["stored_len"], rec["crc32c"]) in self._sound

    def sound(self, rec: dict, stop: threading.Event | None = None) -> bool:
        """Whether chunk ``rec``'s stored bytes in this file match its ``crc32c`` (read once, then
        remembered); False without a verdict when ``stop`` is set meanwhile."""
        key = (rec["offset"], rec["stored_len"], rec["crc32c"])
        with self._owner._lock:
            if key in self._sound:
                return True
        from ._native import native

        if self._buf is None:
            self._buf = memoryview(bytearray(_READ_BYTES))
        crc, pos, left = 0, rec["offset"], rec["stored_len"]
        try:
            while left:
                if stop is not None and stop.is_set():
                    return False
                n = os.preadv(self.fd, [self._buf[:min(left, _READ_BYTES)]], pos)
                if n <= 0:
                    break
                crc = native().crc32c(self._buf[:n], crc)
                pos, left = pos + n, left - n
        except OSError:
            left = -1
        if left == 0 and crc == rec["crc32c"]:
            with self._owner._lock:
                self._sound.add(key)
            return True
        self.damaged += 1
        return False

    def close(self, quiet: bool = False) -> None:
        os.close(self.fd)
        if self.damaged and not quiet:
            log.warning("pyckpt: %s: %d chunk(s) no longer match their CRC32C (damaged on disk): this save "
                        "writes them afresh instead of referencing them; the checkpoints that hold or "
                        "reference them are damaged (pyckpt verify)", self.path, self.damaged)


_RUNNING: set[_Precheck] = set()  # pre-checks not finished: stopped and joined at exit (_stop_all)


def _stop_all() -> None:
    """At exit, before the interpreter finalizes: stop every pre-check and wait for it (it stops after its
    current read of at most 8 MiB). A daemon thread still inside the native CRC (the GIL released) when
    the interpreter finalizes is ended by pthread_exit while it takes the GIL back, an unwind through
    pybind11's noexcept GIL guard: std::terminate, the process aborted at its end."""
    global _EXITING
    _EXITING = True  # a commit at exit (another atexit handler's) starts none after this
    for t in list(_RUNNING):
        t.stop.set()
    for t in list(_RUNNING):
        t.join(30)


_EXITING = False


atexit.register(_stop_all)


class _Precheck(threading.Thread):
    """``Baseline.precheck``'s thread. A daemon (never holds up the process's exit: ``_stop_all``) at the
    lowest CPU priority, which Linux's BFQ and CFQ I/O schedulers also apply to its reads; its reads and
    CRC passes release the GIL. A damaged chunk it finds is only left unremembered: the save checks
    it again, writes it afresh and says so in its one line."""

    def __init__(self, owner: Baseline, root: str, todo: dict[str, tuple[int, list[dict]]]) -> None:
        super().__init__(name="pyckpt-precheck", daemon=True)
        self.owner, self.root, self.todo = owner, root, todo
        self.stop = threading.Event()

    def start(self) -> None:
        _RUNNING.add(self)
        try:
            super().start()
        except RuntimeError:  # not started: nothing to stop at exit
            _RUNNING.discard(self)
            raise

    def run(self) -> None:
        try:
            self._check()
        finally:
            _RUNNING.discard(self)

    def _check(self) -> None:
        _native.name_os_thread()
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only (Linux)
        except (AttributeError, OSError):
            pass
        try:
            read_back(self.owner, self.root, self.todo, self.stop)  # a damaged chunk: the save checks it again
        except Exception as e:  # never into training: the save checks what is left
            log.debug("pyckpt: incremental pre-check stopped: %s", e)


def referrers(root: str, wanted: set[str]) -> dict[str, tuple[str, ...]]:
    """For each step directory name in ``wanted``, the committed checkpoints of ``root`` other than
    itself whose parts reference its files, oldest step first; names nothing references are left out."""
    out: dict[str, list[str]] = {}
    for c in sorted(layout.committed(root), key=lambda c: (c.step, c.name)):
        for name in referenced_dirs(root, [c.name]) & wanted:
            out.setdefault(name, []).append(c.name)
    return {name: tuple(names) for name, names in out.items()}


def referenced_dirs(root: str, names: list[str] | None = None) -> set[str]:
    """Step directory names whose files the committed checkpoints ``names`` (all by default)
    reference, besides themselves.

    A checkpoint whose manifest or a part does not validate cannot be loaded, so what it
    references keeps nothing alive (its other parts' references are ignored too)."""
    from . import manifest
    from .errors import PyckptError
    from .safe_fs import CheckpointDir

    if names is None:
        names = [e.name for e in layout.committed(root)]
    out: set[str] = set()
    for name in names:
        path = os.path.join(root, name)
        mine: set[str] = set()
        try:
            with CheckpointDir(path) as d:
                m = manifest.read_manifest(path, d)
                for info in m["parts"]:
                    mine |= _part_references(path, info, d)
        except (PyckptError, OSError) as exc:
            log.debug("pyckpt: %s does not validate, its references keep nothing: %s", path, exc)
            continue
        out |= mine
    return out


# Retention asks what every kept checkpoint references at each commit; a part is parsed once, not at
# every later save (a part of a model with thousands of tensors takes tens of milliseconds of the
# GIL to parse and validate). The key holds the size and CRC32C the manifest gives the part, so a
# part rewritten under its name is read again. Only parts that validated are remembered.
_PART_REFS: dict[tuple, frozenset[str]] = {}
_PART_REFS_MAX = 1024


def remember_part(ckpt_dir: str, info: dict, part: dict) -> None:
    """Note what part ``info`` of ``ckpt_dir``, just committed by this process from ``part`` (its
    bytes are ``manifest.dumps(part)``), references: retention need not parse it back."""
    _remember(_part_key(ckpt_dir, info), _references(part))


def _part_references(path: str, info: dict, cdir) -> frozenset[str]:
    """The step directories the part ``info`` (a validated manifest entry) of checkpoint ``path`` references."""
    from . import manifest

    key = _part_key(path, info)
    refs = _PART_REFS.get(key)
    if refs is None:
        with gcpause.paused():  # the parsed part is tens of thousands of short-lived objects
            refs = _references(manifest.read_part(path, info, cdir))
        _remember(key, refs)
    return refs


def _part_key(ckpt_dir: str, info: dict) -> tuple:
    return (os.path.abspath(ckpt_dir), info["file"], info["nbytes"], info["crc32c"])


def _references(part: dict) -> frozenset[str]:
    return frozenset(f["path"].split("/")[1] for f in part["files"] if f["path"].startswith("../"))


def _remember(key: tuple, refs: frozenset[str]) -> None:
    if len(_PART_REFS) >= _PART_REFS_MAX:
        _PART_REFS.clear()
    _PART_REFS[key] = refs


def collisions_line(statuses: list[int], where: str) -> str | None:
    """The one stderr line for fingerprint collisions caught by CRC32C in a save, or None."""
    n = sum(1 for s in statuses if s == STATUS_COLLISION)
    if not n:
        return None
    return (f"pyckpt: {where}: {n} chunk(s) had an unchanged fingerprint but a different CRC32C "
            "(a fingerprint collision); they were written in full")

