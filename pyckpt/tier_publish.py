"""Storage checkpoints written from the memory tier's copy, not from a second capture.

With ``PYCKPT_SHM_MB`` a snapshot is captured once, into the memory tier
(``shm_tier``). When it is also due for storage (``PYCKPT_STORAGE_EVERY``), a
``Publication`` copies the memory copy's committed files into ``PYCKPT_DIR``
once they are committed: every chunk record (lengths, CRC32Cs, fingerprint)
is kept, the bytes go from the memory copy's mapped pages to storage with
``O_DIRECT`` (no CPU copy; ``sendfile`` where alignment or the file system
does not allow it), and the storage checkpoint is committed by the same protocol
as a ``Checkpointer.save`` (tmp directory, every rank's part, rank 0's
manifest, ``latest``, retention). The training tensors are read once, by the
memory tier's capture; the storage write never delays an optimizer step.
The part is taken as this process committed it to the memory tier (held by
that save's future), not parsed back from ``/dev/shm``, and its storage
records and tensor entries keep their cached encoding (``writer.encode_part``):
for thousands of tensors those were tens of milliseconds of the GIL per copy.

Incremental: a chunk whose fingerprint (and CRC32C, compared for free from
the two records) equals the one storage's newest checkpoint holds for the same
bytes is referenced there instead of copied (docs/FORMAT.md §14), exactly as
``Checkpointer.save`` would have.

Used only where a plain copy gives the same checkpoint a save would: a local
storage directory (not object storage) without compression or ``keep_best``;
otherwise the snapshot is captured a second time for storage, as before.

``publish_whole``: at a normal end the newest snapshot may be held only by
the memory copy, which is about to be removed; rank 0 then copies it to
storage alone, every rank's part (``shm_tier``).
"""
from __future__ import annotations

import logging
import mmap
import os
import threading
from typing import Any

from . import _native, commit, incremental, layout, manifest, metrics, threads, writer
from .checkpointer import SaveFuture
from .safe_fs import CheckpointDir

log = logging.getLogger("pyckpt")

ALIGN = 4096  # chunks start at 4 KiB-aligned file offsets, as the engine writes them


def usable(storage: Any) -> bool:
    """Whether ``storage`` (a Checkpointer) can take its checkpoints as copies of the memory tier's."""
    return (storage.remote is None and storage.compress == "none" and not storage.keep_best
            and not storage._closed)


class Publication:
    """Storage's checkpoint of one snapshot, copied from the memory tier's commit of it.

    Created on the training thread (so every rank numbers its storage saves alike); the copy
    and the commit run on a thread of their own. ``future`` is storage's ``SaveFuture``."""

    def __init__(self, tier_root: str, source: SaveFuture, storage: Any, step: int) -> None:
        self.tier_root, self.source, self.storage, self.step = tier_root, source, storage, step
        self.opened = threading.Event()  # the source files are open: the tier may retire them now
        self.future, self.seq, self._prev = _numbered(storage, step, inflight=True)
        self.thread = threading.Thread(target=self._run, name=f"pyckpt-publish-{step}", daemon=False)
        if not threads.start(self.thread, f"the copy of step {step} to storage", "it is copied on this thread instead"):
            self._run()  # a future that never finished would hold up every later storage save

    def _run(self) -> None:
        _native.name_os_thread()
        fds: dict[str, int] = {}
        try:
            try:
                src = self.source.result()
                source_timer = getattr(self.source, "_timer", None)
                if source_timer is not None:  # the training stall was the memory save's (stats, metrics.jsonl)
                    self.future._timer.stall_s = source_timer.stall()
            except BaseException as e:  # the memory copy failed on every rank (its commit is collective)
                self.opened.set()  # and was said there (a vetoed lazy capture, a full /dev/shm)
                self.storage._record(self.future, None, e)
                self.future._finish(None, e)
                return
            part, err = None, None
            committed, self.source._committed = self.source._committed, None  # (part, plan), or None
            try:
                part = _open_source(src, self.storage.coord.rank, self.tier_root, fds,
                                    committed[0] if committed is not None else None)
            except Exception as e:  # one rank only, maybe: the commit below fails on every rank
                err = e
            finally:
                self.opened.set()
            self._publish(part, fds, err, committed[1] if committed is not None else None)
        except BaseException as e:
            log.warning("pyckpt: checkpoint of step %d not written to storage: %s", self.step, e)
            self.storage._record(self.future, None, e)
            self.future._finish(None, e)
        finally:
            for fd in fds.values():
                os.close(fd)

    def _publish(self, part: dict | None, fds: dict[str, int], err: BaseException | None, plan: Any) -> None:
        """``plan``: the memory copy's plan when it handed its committed part over, else None."""
        st, step = self.storage, self.step
        coord = st.coord
        # As Checkpointer.save: one storage save in flight; every rank goes ahead or none does.
        ready = self._prev is None or self._prev._done.wait()
        if coord.world_size > 1:
            ready = all(coord.all_gather_json(bool(ready), f"tier-publish/{self.seq}/ready"))
        if not ready:
            raise RuntimeError("the previous storage checkpoint of another rank failed to finish")
        token, final, tmp = _paths(st, step, self.seq)
        if coord.rank == 0:
            commit.gc_tmp(st.directory, {token}, locked=True)
        out = None
        if err is None:
            try:
                out, collisions = _copy_part(part, fds, tmp, final, st)
                self.future._timer.captured()
                if collisions:
                    log.warning("%s", incremental.collisions_line([incremental.STATUS_COLLISION] * collisions,
                                                                  os.path.basename(final)))
            except Exception as e:  # disk full, a bad record: no rank commits
                err = e
        raw = None
        if err is None and plan is not None:
            try:  # storage records and entries shared with the memory copy's plan: encoded once (writer.py)
                raw = writer.encode_part(plan, out)
            except Exception as e:  # reported by every rank's commit
                err = e
        self.future._timer.figures = commit.commit_parts(coord, f"tier-publish/{self.seq}", tmp, final, step, out,
                                                         err, st.directory, raw)
        _committed(st, self.future, final, step, out)

    def wait(self) -> None:
        """Until storage's checkpoint is committed or failed."""
        if self.thread.ident is not None:  # else it ran on the thread that made it
            self.thread.join()


def publish_whole(tier_root: str, src: str, storage: Any, step: int) -> str:
    """Storage's checkpoint of ``step`` copied from the committed memory copy ``src`` by this process
    alone, every rank's part; returns its path, or raises (nothing committed, nothing left behind).

    For the end of a run (``shm_tier``), when the other ranks may have exited: a storage commit of
    their own would need them all. None is needed: the memory copy was committed only once every
    rank's part was in, so its parts are the checkpoint the job agreed on, and a copy of all of them
    (records unchanged) is what every rank's publication would have committed. Rank 0 (it holds
    storage's directory lock); runs on the calling thread, as an exit handler may start none."""
    st = storage
    fut, seq, _ = _numbered(st, step)
    token, final, tmp = _paths(st, step, seq)
    outs, infos, figures = {}, [], []
    try:
        commit.gc_tmp(st.directory, {token}, locked=True)
        try:
            for rank in range(manifest.read_manifest(src)["world_size"]):
                fds: dict[str, int] = {}
                try:
                    out, collisions = _copy_part(_open_source(src, rank, tier_root, fds), fds, tmp, final, st,
                                                 rank=rank)
                finally:
                    for fd in fds.values():
                        os.close(fd)
                if collisions:
                    log.warning("%s", incremental.collisions_line([incremental.STATUS_COLLISION] * collisions,
                                                                  os.path.basename(final)))
                infos.append(commit._write_part(tmp, rank, manifest.dumps(out)))
                figures.append(metrics.part_figures(out))
                outs[rank] = out
            fut._timer.captured()
        except BaseException:
            commit.remove_tree(tmp)
            raise
        outcome = commit._rank0_publish(tmp, final, step, infos, [], st.directory)  # removes tmp on failure
        if not outcome["ok"]:
            from .errors import NativeError

            raise NativeError(f"checkpoint {final} was not committed: {outcome['error']}")
    except Exception as e:
        st._record(fut, None, e)
        fut._finish(None, e)
        raise
    fut._timer.figures = metrics.sum_figures(figures)
    _committed(st, fut, final, step, outs.get(st.coord.rank))
    return final


def _numbered(storage: Any, step: int, inflight: bool = False) -> tuple[SaveFuture, int, Any]:
    """Storage's future for its copy of ``step``, the save number (every rank numbers alike) and, with
    ``inflight`` (the copy is storage's save in flight from now on), the save in flight before it."""
    fut, prev = SaveFuture(step), None
    fut._timer = metrics.SaveTimer(step)
    with storage._lock:
        if inflight:
            prev, storage._inflight = storage._inflight, fut
        seq, storage._seq = storage._seq, storage._seq + 1
    fut._timer.returned()
    return fut, seq, prev


def _paths(storage: Any, step: int, seq: int) -> tuple[str, str, str]:
    """(token, final directory, temporary directory) of storage's save number ``seq``, as a save's."""
    token = f"{storage._session}-{seq}"
    name = layout.step_dir_name(step)
    return (token, os.path.join(storage.directory, name),
            os.path.join(storage.directory, layout.tmp_dir_name(name, token)))


def _committed(st: Any, fut: SaveFuture, final: str, step: int, own: dict | None) -> None:
    """After storage committed ``final``: the next copy references this rank's part ``own`` (incremental),
    retention runs (rank 0), and the future reports it."""
    if st.incremental and own is not None:
        st._baseline.update(own, os.path.basename(final))
    if st.coord.rank == 0:
        try:
            commit.apply_retention(st.directory, st.keep, protect={os.path.basename(final)})
        except Exception as e:  # committed; retention tries again after the next save
            log.warning("pyckpt: checkpoint of step %d committed, but retention failed: %s", step, e)
    st._record(fut, final, None)
    fut._finish(final, None)


def _open_source(src: str, rank: int, tier_root: str, fds: dict[str, int], committed: dict | None = None) -> dict:
    """Rank ``rank``'s part of the committed memory copy ``src``, with every data file it names opened
    into ``fds`` (root-relative path -> descriptor), so the tier may delete them while they are read.

    ``committed``: that part as this process committed it (``SaveFuture._committed``): taken as it is
    (its chunk records copied, they get a source here) instead of parsing and validating the file
    it was just written to, which for thousands of tensors cost tens of milliseconds of the GIL."""
    if committed is not None:
        part = dict(committed, chunks=[dict(ch) for ch in committed["chunks"]])
    else:
        with CheckpointDir(src) as d:
            m = manifest.read_manifest(src, d)
            part = manifest.read_part(src, m["parts"][rank], d)
    name = os.path.basename(src)
    for ch in part["chunks"]:
        rel = incremental.root_relative(name, ch["file"])
        if rel is None:
            raise OSError(f"memory copy {src}: chunk file {ch['file']!r} leaves its root")
        if rel not in fds:
            fds[rel] = os.open(os.path.join(tier_root, rel), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        ch["_src"] = rel
    return part


def _copy_part(part: dict, fds: dict[str, int], tmp: str, final: str, st: Any,
               rank: int | None = None) -> tuple[dict, int]:
    """Write rank ``rank``'s (default: this rank's) data file of ``tmp`` from the memory copy; returns its
    part JSON and the number of fingerprint collisions caught (chunks then copied)."""
    own = rank is None or rank == st.coord.rank
    rank = st.coord.rank if rank is None else rank
    chunks = part["chunks"]
    expect: dict[int, tuple[int, int]] = {}
    refs: dict[int, tuple[dict, int]] = {}
    # Chunks written without a fingerprint (they had changed: Checkpointer._moved_chunks) are copied;
    # so is another rank's part (publish_whole): only this rank's baseline is known here.
    if own and st.incremental and chunks and any(isinstance(c.get("fingerprint"), str) for c in chunks):
        if not st._baseline.seeded and not st._baseline:
            st._baseline.seed(st.directory, st.coord.rank)
        exp, refs = st._baseline.expectations(part["storages"], [c["raw_len"] for c in chunks],
                                              [False] * len(chunks), os.path.basename(final), st.directory, "off")
        expect = {i: (fp, crc) for i, fp, _, crc in exp}
    rel = layout.data_file_name(rank)
    out_chunks, ref_files, collisions, off = [], {}, 0, 0
    # The part is committed in ``tmp`` even when no data file is written there (every chunk referenced,
    # or no tensor at all): ``_Writer`` creates its folder only for a first chunk copied.
    os.makedirs(tmp, exist_ok=True)
    with _Writer(os.path.join(tmp, rel), fds) as w:
        for i, ch in enumerate(chunks):
            src = ch.pop("_src")
            if i in expect and isinstance(ch.get("fingerprint"), str) and int(ch["fingerprint"], 16) == expect[i][0]:
                if ch["raw_crc32c"] == expect[i][1]:
                    rec, nbytes = refs[i]
                    new = {"file": "../" + rec["file"]}
                    new.update((k, rec[k]) for k in ("offset", "stored_len", "raw_len", "elem_size", "codec",
                                                     "crc32c", "raw_crc32c"))
                    new["fingerprint"] = ch["fingerprint"]
                    ref_files[new["file"]] = nbytes
                    out_chunks.append(new)
                    continue
                collisions += 1  # same fingerprint, other bytes: written in full
            w.copy(src, ch["offset"], off, ch["stored_len"])
            out_chunks.append(dict(ch, file=rel, offset=off))
            off = -(-(off + ch["stored_len"]) // ALIGN) * ALIGN
        files = [{"path": rel, "nbytes": w.finish()}] if w.fd >= 0 else []
    files += [{"path": f, "nbytes": n} for f, n in sorted(ref_files.items())]
    return dict(part, chunks=out_chunks, files=files), collisions


class _Writer:
    """This rank's data file of the storage checkpoint, written from the memory copy's files.

    Chunk bytes go out with ``O_DIRECT`` straight from the memory copy's mapped pages (no CPU copy, no
    page cache, as the engine writes storage), as far as alignment allows: the memory copy's chunks
    start 4 KiB-aligned, and the padding after a chunk is the next chunk's or lies in its own region
    here. The rest (a file's unaligned tail, a file system without ``O_DIRECT``) goes by ``sendfile``."""

    def __init__(self, path: str, fds: dict[str, int]) -> None:
        self.path, self.fds = path, fds
        self.fd = self.dfd = -1
        self.maps: dict[str, tuple[mmap.mmap | None, memoryview]] = {}

    def __enter__(self) -> _Writer:
        return self

    def _open(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        self.fd = os.open(self.path, flags, 0o644)
        try:
            self.dfd = os.open(self.path, (flags & ~os.O_TRUNC) | getattr(os, "O_DIRECT", 0), 0o644)
        except OSError:  # no O_DIRECT here: every byte goes by sendfile
            self.dfd = -1

    def _view(self, src: str) -> memoryview:
        if src not in self.maps:
            size = os.fstat(self.fds[src]).st_size
            mm = mmap.mmap(self.fds[src], size, prot=mmap.PROT_READ) if size else None
            self.maps[src] = (mm, memoryview(mm) if mm is not None else memoryview(b""))
        return self.maps[src][1]

    def copy(self, src: str, src_off: int, dst_off: int, n: int) -> None:
        """``n`` bytes of memory-copy file ``src`` at ``src_off`` to this file at ``dst_off`` (4 KiB-aligned)."""
        if self.fd < 0:
            self._open()
        done = 0
        if self.dfd >= 0 and src_off % ALIGN == 0 and hasattr(os, "O_DIRECT"):
            view = self._view(src)
            padded = -(-n // ALIGN) * ALIGN
            direct = padded if src_off + padded <= len(view) else n // ALIGN * ALIGN
            try:
                while done < direct:
                    done += os.pwrite(self.dfd, view[src_off + done:src_off + direct], dst_off + done)
            except OSError:  # alignment this file system refuses: the rest by sendfile
                os.close(self.dfd)
                self.dfd = -1
            done = min(done // ALIGN * ALIGN, n)
        if done < n:
            _sendfile(self.fds[src], src_off + done, self.fd, dst_off + done, n - done)

    def finish(self) -> int:
        """fsync; the file's size."""
        os.fsync(self.fd)
        return os.fstat(self.fd).st_size

    def __exit__(self, *exc: object) -> None:
        for mm, view in self.maps.values():
            view.release()
            if mm is not None:
                mm.close()
        for fd in (self.fd, self.dfd):
            if fd >= 0:
                os.close(fd)


def _sendfile(src: int, src_off: int, dst: int, dst_off: int, n: int) -> None:
    """``n`` bytes from ``src`` at ``src_off`` to ``dst`` at ``dst_off``, in the kernel."""
    os.lseek(dst, dst_off, os.SEEK_SET)
    while n > 0:
        done = os.sendfile(dst, src, src_off, n)
        if done <= 0:
            raise OSError(f"memory copy ended {n} bytes early")
        src_off, n = src_off + done, n - done
