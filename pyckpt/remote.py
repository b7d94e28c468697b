"""Checkpoint roots on object storage: ``s3://bucket/prefix`` (any fsspec URL with its package).

The engine writes and reads local files only, so a remote root is backed by
local directories under ``PYCKPT_CACHE_DIR`` (default ``~/.cache/pyckpt``):

* **staging**: the ``Checkpointer`` saves into it with the local commit
  protocol, unchanged (lock, tmp names, fsync, manifest, rename). Then the
  commit thread uploads the committed directory (``upload``): every data
  file and part first, in parallel (multipart for large files), their sizes
  checked by a listing, then ``MANIFEST.json`` (the commit point: a
  checkpoint without it is invisible), then ``latest``; retention deletes
  only after that. Staging keeps only its newest checkpoint.
* **reads**: loading downloads one checkpoint (``fetch``) with ranged GETs,
  driven by what the checkpoint says: the manifest (size-capped) is read and
  validated first, then each part (size and CRC from the manifest), then
  exactly the recorded bytes of each data file. The copy is then read by the
  ordinary verified reader, so nothing from the bucket is used before the
  same checks as a local checkpoint (docs/FORMAT.md §7, §11, §13).

Object stores have no rename, so a commit is "manifest written last"; a
crash during an upload leaves a ``step-*`` prefix without a manifest, which
readers ignore and the next upload deletes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any

from . import commit, layout
from .errors import CheckpointNotFoundError, ConfigError, CorruptCheckpointError, PyckptError

log = logging.getLogger("pyckpt")

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# protocol -> (the package fsspec needs for it, the pyckpt extra that installs it)
_PACKAGES = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", None), "gcs": ("gcsfs", None),
             "az": ("adlfs", None), "abfs": ("adlfs", None), "abfss": ("adlfs", None)}
PART_BYTES = 64 << 20  # multipart part size: files of at least twice this are uploaded in parts, in parallel
RANGE_BYTES = 16 << 20  # one ranged GET while downloading
BATCH_BYTES = 256 << 20  # memory one download batch may hold
MONITOR_FILE = "pyckpt-monitor.json"  # catalog.MONITOR_FILE (not imported: catalog imports this module)
_SMALL_CAP = 1 << 16  # latest, FINISHED.json, pyckpt-monitor.json


def is_url(path: Any) -> bool:
    """Whether ``path`` is a ``scheme://`` URL (a str; PathLike objects are local paths)."""
    return isinstance(path, str) and _URL.match(path) is not None


def check_supported(url: str, what: str = "checkpoint directory") -> str:
    """``url`` without a trailing ``/``; ``ConfigError`` naming the package (and pyckpt extra) it needs.

    Cheap (no import of the storage package): the start-up line calls it for PYCKPT_DIR."""
    import importlib.util

    proto = _URL.match(url).group(1).lower()
    if proto in ("file", "local"):
        raise ConfigError(f"{what} {url!r}: give a plain local path instead of a {proto}:// URL")
    package, extra = _PACKAGES.get(proto, (None, None))
    if package is None:
        from fsspec.registry import known_implementations, registry

        if proto not in known_implementations and proto not in registry:
            raise ConfigError(f"{what} {url!r}: remote storage is not supported for {proto}:// URLs (fsspec "
                              "knows no such protocol); use s3:// (pip install 'pyckpt[s3]') or a local path")
        package = known_implementations.get(proto, {}).get("class", "").split(".")[0] or None
    if package and importlib.util.find_spec(package) is None:
        how = f"pip install 'pyckpt[{extra}]'" if extra else f"pip install {package}"
        raise ConfigError(f"{what} {url!r} needs the {package} package for {proto}:// URLs: {how}")
    body = url.split("://", 1)[1].strip("/")
    if not body:
        raise ConfigError(f"{what} {url!r} names no bucket")
    return f"{proto}://{body}"


def _filesystem(url: str, storage_options: dict | None) -> tuple[Any, str]:
    """A fresh fsspec filesystem (no instance or listing cache: other writers change the bucket) and the
    root path inside it."""
    import fsspec

    opts = {"skip_instance_cache": True, "use_listings_cache": False, **(storage_options or {})}
    try:
        fs, path = fsspec.core.url_to_fs(url, **opts)
    except ImportError as e:  # the package vanished since check_supported, or a dependency of it is missing
        raise ConfigError(f"cannot use {url!r}: {e}") from None
    return fs, path.rstrip("/")


def _timestamp(info: dict) -> float:
    t = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
    if hasattr(t, "timestamp"):
        return t.timestamp()
    return float(t) if isinstance(t, (int, float)) else 0.0


@dataclass(frozen=True)
class RemoteEntry:
    """One ``step-*`` prefix of a remote root."""

    name: str
    step: int
    complete: bool  # has MANIFEST.json
    seq: int | None
    mtime: float  # LastModified of MANIFEST.json (or of the newest object when incomplete)
    size: int  # bytes of every object under the prefix


def _seq_of(raw: bytes) -> int | None:
    """The ``seq`` of manifest bytes, or None. Orders candidates only: the manifest is validated on download."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    seq = obj.get("seq") if isinstance(obj, dict) else None
    return seq if type(seq) is int and seq >= 0 else None


class RemoteRoot:
    """A checkpoint root at ``url`` with its local staging and read directories.

    ``writer=True`` (a Checkpointer) probes the root with a small write and
    delete, so a missing bucket, wrong endpoint or missing permission is one
    error at construction instead of a failed save later."""

    def __init__(self, url: str, storage_options: dict | None = None, cache_dir: str | os.PathLike | None = None,
                 writer: bool = True) -> None:
        self.url = check_supported(url)
        self.fs, self.root = _filesystem(self.url, storage_options)
        self.staging = staging_dir(self.url, cache_dir)
        self.cache = os.path.dirname(self.staging)
        self.part_bytes = PART_BYTES
        self._reads: str | None = None  # this instance's download directory, made on first fetch
        self._fetched: dict[str, tuple[bytes, str]] = {}  # name -> (manifest bytes, local copy)
        if writer:
            self._probe()

    # -- names ---------------------------------------------------------------------------------------
    def key(self, *rel: str) -> str:
        return "/".join((self.root, *rel))

    def url_of(self, *rel: str) -> str:
        return "/".join((self.url, *rel))

    def _probe(self) -> None:
        probe = self.key(f".pyckpt-probe-{commit.new_token()}")
        try:
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except Exception as e:  # botocore/aiohttp errors have no common base
            raise PyckptError(f"cannot write to {self.url}: {type(e).__name__}: {e} (check the bucket, the "
                              "credentials and the endpoint, e.g. AWS_ENDPOINT_URL)") from None

    # -- listing -------------------------------------------------------------------------------------
    def _objects(self, under: str | None = None) -> dict[str, dict]:
        """Relative key -> listing info of every object under the root (or under ``under``)."""
        base = self.key(under) if under else self.root
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        prefix = self.root + "/"
        return {k[len(prefix):]: v for k, v in found.items() if k.startswith(prefix) and v.get("type") != "directory"}

    def scan(self) -> list[RemoteEntry]:
        """Every ``step-*`` prefix of the root, by step. Manifests are read (one small GET each) for ``seq``."""
        groups: dict[str, dict[str, dict]] = {}
        for rel, info in self._objects().items():
            name, _, inner = rel.partition("/")
            if inner and layout.parse_step(name) is not None:
                groups.setdefault(name, {})[inner] = info
        from .manifest import MAX_MANIFEST_BYTES

        manifests = {n: self.key(n, layout.MANIFEST) for n, objs in groups.items()
                     if layout.MANIFEST in objs and (objs[layout.MANIFEST].get("size") or 0) <= MAX_MANIFEST_BYTES}
        raws = self.fs.cat(list(manifests.values()), on_error="return") if manifests else {}
        out = []
        for name, objs in groups.items():
            m = objs.get(layout.MANIFEST)
            raw = raws.get(manifests.get(name, ""), None)
            seq = _seq_of(raw) if isinstance(raw, bytes) else None
            mtime = _timestamp(m) if m is not None else max(_timestamp(i) for i in objs.values())
            out.append(RemoteEntry(name, layout.parse_step(name), m is not None, seq, mtime,
                                   sum(int(i.get("size") or 0) for i in objs.values())))
        return sorted(out, key=lambda e: (e.step, e.name))

    def committed(self) -> list[RemoteEntry]:
        """Committed checkpoints, newest commit first (the order of ``layout.committed``)."""
        done = [e for e in self.scan() if e.complete]
        return sorted(done, key=lambda e: (e.seq is not None, e.seq or 0, e.mtime, e.name), reverse=True)

    def read_small(self, rel: str) -> bytes | None:
        """A small object (``latest``, FINISHED.json), or None when absent or over 64 KiB."""
        try:
            info = self.fs.info(self.key(rel))
            if (info.get("size") or 0) > _SMALL_CAP:
                return None
            return self.fs.cat_file(self.key(rel))
        except FileNotFoundError:
            return None

    def write_small(self, rel: str, data: bytes) -> None:
        self.fs.pipe_file(self.key(rel), data)

    def delete(self, rel: str) -> bool:
        try:
            self.fs.rm_file(self.key(rel))
            return True
        except FileNotFoundError:
            return False

    def read_latest(self) -> str | None:
        raw = self.read_small(layout.LATEST)
        try:
            name = raw.decode("utf-8").strip() if raw is not None else None
        except UnicodeDecodeError:
            return None
        return name if name is not None and layout.parse_step(name) is not None else None

    # -- writing -------------------------------------------------------------------------------------
    def _remove_prefix(self, name: str, point: str | None = None) -> None:
        """Delete checkpoint ``name``: its manifest first (it stops being a checkpoint), then the rest."""
        if point:
            commit._crash_point(f"{point}.before")
        self.delete(f"{name}/{layout.MANIFEST}")
        if point:
            commit._crash_point(f"{point}.after")
        try:
            self.fs.rm(self.key(name), recursive=True)
        except FileNotFoundError:
            pass

    def upload(self, local_dir: str) -> str:
        """Publish committed local checkpoint ``local_dir``: data and parts, then MANIFEST.json, then ``latest``.

        Prefixes without a manifest (uploads cut by a crash) and an existing
        checkpoint of the same name (the step saved again) are deleted first.
        The manifest gets the remote commit sequence number (1 + the highest
        in the bucket). Returns the checkpoint's URL; raises on failure (then
        nothing new is visible and every earlier checkpoint is untouched)."""
        from . import manifest

        name = os.path.basename(local_dir)
        entries = self.scan()
        for e in entries:
            if not e.complete or e.name == name:
                self._remove_prefix(e.name, "remote.gc")
        seq = 1 + max((e.seq or 0 for e in entries if e.complete and e.name != name), default=0)
        m = manifest.read_manifest(local_dir)
        files = [(info["file"], info["nbytes"]) for info in m["parts"]]
        for info in m["parts"]:
            part = manifest.read_part(local_dir, info)
            if any(f["path"].startswith("../") for f in part["files"]):  # Checkpointer never does for URLs
                raise PyckptError(f"{local_dir} references data of another checkpoint (incremental save): "
                                  "object-storage roots upload self-contained checkpoints only")
            files += [(f["path"], f["nbytes"]) for f in part["files"]]
        if os.path.isfile(os.path.join(local_dir, MONITOR_FILE)):
            files.append((MONITOR_FILE, os.path.getsize(os.path.join(local_dir, MONITOR_FILE))))
        for rel, nbytes in files:
            p = os.path.join(local_dir, rel)
            if not os.path.isfile(p) or os.path.getsize(p) < nbytes:
                raise PyckptError(f"{p} is missing or short: every rank's files must be in the staging directory "
                                  f"{os.path.dirname(local_dir)} (several hosts need PYCKPT_CACHE_DIR on a shared "
                                  "file system)")
        commit._crash_point("remote.data.before")
        if files:
            # Files in parallel; each file of >= 2 parts as a multipart upload with its parts in parallel.
            self.fs.put([os.path.join(local_dir, r) for r, _ in files], [self.key(name, r) for r, _ in files],
                        chunksize=self.part_bytes)
        got = self._objects(name)
        short = [r for r, n in files if int(got.get(f"{name}/{r}", {}).get("size", -1)) < n]
        if short:
            raise PyckptError(f"upload of {self.url_of(name)} incomplete: {', '.join(short)} missing or short")
        commit._crash_point("remote.data.after")
        body = manifest.seal({**{k: v for k, v in json.loads(_read(local_dir, layout.MANIFEST)).items()}, "seq": seq})
        commit._crash_point("remote.manifest.before")
        self.write_small(f"{name}/{layout.MANIFEST}", body)  # the commit point
        commit._crash_point("remote.manifest.after")
        try:
            self.write_small(layout.LATEST, (name + "\n").encode())
        except Exception as e:  # committed already; readers find the newest by listing
            log.warning("pyckpt: %s committed, but %s was not updated: %s", self.url_of(name),
                        self.url_of(layout.LATEST), e)
        commit._crash_point("remote.latest.after")
        return self.url_of(name)

    def retain(self, keep: int, protect: set[str] = frozenset()) -> list[str]:
        """Delete committed checkpoints older than the ``keep`` newest; the newest, ``latest``'s target and
        ``protect`` stay. Each victim loses its manifest first. Returns the deleted URLs."""
        order = self.committed()
        if len(order) <= keep:
            return []
        spared = {e.name for e in order[:keep]} | set(protect)
        pointer = self.read_latest()
        if pointer is not None:
            spared.add(pointer)
        deleted = []
        for e in order[keep:]:
            if e.name not in spared:
                self._remove_prefix(e.name, "remote.retention")
                deleted.append(self.url_of(e.name))
        return deleted

    def monitor_values(self) -> dict[str, float | None]:
        """The stored keep_best metric of each committed checkpoint (None when absent or unusable)."""
        import math

        names = [e.name for e in self.committed()]
        keys = {self.key(n, MONITOR_FILE): n for n in names}
        raws = self.fs.cat(list(keys), on_error="return") if keys else {}
        out: dict[str, float | None] = {n: None for n in names}
        for k, raw in raws.items():
            try:
                v = json.loads(raw[:4096]).get("value") if isinstance(raw, bytes) else None
            except (ValueError, AttributeError, UnicodeDecodeError):
                v = None
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[keys[k]] = float(v)
        return out

    # -- reading -------------------------------------------------------------------------------------
    def reads_dir(self) -> str:
        """This instance's download directory (``read-<pid>x<hex>``; leftovers of dead processes are removed)."""
        if self._reads is None:
            os.makedirs(self.cache, exist_ok=True)
            for n in os.listdir(self.cache):
                if n.startswith("read-") and not _pid_alive(n[5:]):
                    shutil.rmtree(os.path.join(self.cache, n), ignore_errors=True)
            self._reads = os.path.join(self.cache, f"read-{commit.new_token()}")
            os.makedirs(self._reads)
        return self._reads

    def close(self) -> None:
        """Remove the downloaded copies."""
        reads, self._reads = self._reads, None
        self._fetched.clear()
        if reads is not None:
            shutil.rmtree(reads, ignore_errors=True)

    def fetch(self, name: str, progress: Any = None) -> str:
        """Download committed checkpoint ``name`` into the read directory; returns the local copy's path.

        Driven by the checkpoint's own records, each checked before it is
        used: the manifest (capped at 16 MiB, validated), then each part (size
        and CRC32C from the manifest, validated), then ``[0, nbytes)`` of each
        data file the parts list, by ranged GETs. Chunk checksums are checked
        by the reader that loads the copy. Raises ``CheckpointNotFoundError``
        (no manifest there) or ``CorruptCheckpointError`` naming the URL.
        ``progress(nbytes)`` is called as bytes arrive (the CLI's bar)."""
        from . import manifest

        objs = self._objects(name)
        minfo = objs.get(f"{name}/{layout.MANIFEST}")
        if layout.parse_step(name) is None or minfo is None:
            raise CheckpointNotFoundError(f"no committed checkpoint {self.url_of(name)}")
        if int(minfo.get("size") or 0) > manifest.MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(f"{self.url_of(name, layout.MANIFEST)} is over the "
                                         f"{manifest.MAX_MANIFEST_BYTES}-byte cap", path=self.url_of(name))
        raw = self.fs.cat_file(self.key(name, layout.MANIFEST))
        cached = self._fetched.get(name)
        if cached is not None and cached[0] == raw and os.path.isdir(cached[1]):
            return cached[1]
        reads = self.reads_dir()
        # Disk stays bounded: besides the new copy keep only the one fetched last (latest() then load()).
        for old in list(self._fetched)[:-1]:
            shutil.rmtree(self._fetched.pop(old)[1], ignore_errors=True)
        tmp = os.path.join(reads, layout.tmp_dir_name(name, commit.new_token()))
        os.makedirs(tmp)
        try:
            _write(tmp, layout.MANIFEST, raw)
            m = manifest.read_manifest(tmp)
            self._download(name, tmp, objs, [(p["file"], p["nbytes"]) for p in m["parts"]], progress)
            files: dict[str, int] = {}
            for info in m["parts"]:
                for f in manifest.read_part(tmp, info)["files"]:
                    if not f["path"].startswith("../"):
                        files[f["path"]] = max(files.get(f["path"], 0), f["nbytes"])
            self._download(name, tmp, objs, sorted(files.items()), progress)
            mon = objs.get(f"{name}/{MONITOR_FILE}")
            if mon is not None and int(mon.get("size") or 0) <= 4096:
                self._download(name, tmp, objs, [(MONITOR_FILE, int(mon["size"]))])
        except CorruptCheckpointError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if self.url in str(e):
                raise
            # Checked in the local copy: name the object instead of the temporary file.
            where = self.url_of(name, os.path.relpath(e.path, tmp)) if e.path and e.path.startswith(tmp) else None
            raise CorruptCheckpointError(f"{self.url_of(name)}: {str(e).replace(tmp, self.url_of(name))}",
                                         path=where or self.url_of(name)) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        final = os.path.join(reads, name)
        if os.path.lexists(final):
            shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        self._fetched.pop(name, None)
        self._fetched[name] = (raw, final)  # insertion order = fetch order
        return final

    def _download(self, name: str, local: str, objs: dict[str, dict], files: list[tuple[str, int]],
                  progress: Any = None) -> None:
        """Bytes ``[0, nbytes)`` of each ``(rel, nbytes)`` of checkpoint ``name`` into ``local/rel``, by ranged
        GETs of RANGE_BYTES, at most BATCH_BYTES in memory at a time."""
        ranges: list[tuple[int, int, int]] = []  # (file index, start, end)
        fds: list[int] = []
        try:
            for i, (rel, nbytes) in enumerate(files):
                have = int(objs.get(f"{name}/{rel}", {}).get("size", -1))
                if have < nbytes:
                    what = "missing" if have < 0 else f"truncated: {have} of {nbytes} bytes"
                    raise CorruptCheckpointError(f"{self.url_of(name, rel)} is {what}", path=self.url_of(name, rel))
                path = os.path.join(local, *rel.split("/"))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fds.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
                ranges += [(i, s, min(s + RANGE_BYTES, nbytes)) for s in range(0, nbytes, RANGE_BYTES)]
            at = 0
            while at < len(ranges):
                batch, size = [], 0
                while at < len(ranges) and (not batch or size + ranges[at][2] - ranges[at][1] <= BATCH_BYTES):
                    batch.append(ranges[at])
                    size += ranges[at][2] - ranges[at][1]
                    at += 1
                datas = self.fs.cat_ranges([self.key(name, files[i][0]) for i, _, _ in batch],
                                           [s for _, s, _ in batch], [e for _, _, e in batch])
                for (i, s, e), data in zip(batch, datas):
                    if not isinstance(data, (bytes, bytearray)) or len(data) != e - s:
                        raise CorruptCheckpointError(f"{self.url_of(name, files[i][0])}: bytes {s}-{e} could not be "
                                                     "read in full", path=self.url_of(name, files[i][0]))
                    view = memoryview(data)
                    while view:
                        view = view[os.pwrite(fds[i], view, s + len(data) - len(view)):]
                if progress is not None:
                    progress(size)
        finally:
            for fd in fds:
                os.close(fd)


def _read(d: str, rel: str) -> bytes:
    with open(os.path.join(d, rel), "rb") as f:
        return f.read()


def _write(d: str, rel: str, data: bytes) -> None:
    with open(os.path.join(d, rel), "xb") as f:
        f.write(data)


def _pid_alive(token: str) -> bool:
    pid = token.split("x", 1)[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def staging_dir(url: str, cache_dir: str | os.PathLike | None = None) -> str:
    """The local staging root of ``url``: ``CACHE/remote/<16 hex digits of sha256(url)>/staging``."""
    url = check_supported(url)
    return os.path.join(os.path.abspath(os.fspath(cache_dir or default_cache_dir())), "remote",
                        hashlib.sha256(url.encode()).hexdigest()[:16], "staging")


def default_cache_dir() -> str:
    """PYCKPT_CACHE_DIR, else ``$XDG_CACHE_HOME/pyckpt`` or ``~/.cache/pyckpt``."""
    from . import knobs

    return knobs.get("PYCKPT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "pyckpt")


# -- the Checkpointer's side --------------------------------------------------------------------------
def publish(ckpt: Any, final: str, seq: int) -> tuple[str | None, BaseException | None]:
    """After the local commit of ``final``: rank 0 uploads it and applies remote retention; every rank
    learns the outcome. Returns (the checkpoint's URL, None) or (None, the error)."""
    from .catalog import select_best

    rem: RemoteRoot = ckpt.remote
    outcome = None
    if ckpt.coord.rank == 0:
        try:
            url = rem.upload(final)
            outcome = {"url": url, "error": None}
        except Exception as e:
            outcome = {"url": None, "error": f"{type(e).__name__}: {e}"}
        if outcome["error"] is None:
            try:
                protect = select_best(rem.monitor_values(), ckpt.keep_best, ckpt.mode) if ckpt.keep_best else set()
                rem.retain(ckpt.keep, protect)
            except Exception as e:  # committed; retention tries again after the next save
                log.warning("pyckpt: %s committed, but remote retention failed: %s", outcome["url"], e)
    outcome = ckpt.coord.broadcast_json(outcome, f"upload/{seq}")
    if outcome["error"] is not None:
        return None, PyckptError(f"checkpoint {rem.url_of(os.path.basename(final))} was not uploaded "
                                 f"(earlier checkpoints are kept): {outcome['error']}")
    return outcome["url"], None


def candidates(ckpt: Any):
    """Local copies of the remote commits, newest first, each downloaded and validated (manifest, parts,
    sizes) when reached; damaged ones are skipped with one line. Every rank takes the same ones."""
    from . import reader

    rem: RemoteRoot = ckpt.remote
    rank, ws = ckpt.coord.rank, ckpt.coord.world_size
    names = [e.name for e in rem.committed()]
    if ws > 1:
        common = set(names)
        for theirs in ckpt.coord.all_gather_json(names, "remote-latest"):
            common &= set(theirs)
        names = [n for n in names if n in common]
    for name in names:
        out: list[str] = []

        def get() -> None:
            path = rem.fetch(name)
            reader.open_checkpoint(path)
            out.append(path)

        err = None
        try:
            get()
        except Exception as e:
            err = e
        errors = ckpt._gather_errors(err)
        if not errors:
            yield out[0]
            continue
        if err is not None and not isinstance(err, CorruptCheckpointError):
            raise err
        if rank == 0:
            r, msg, _ = errors[0]
            log.warning("pyckpt: skipping damaged checkpoint %s%s: %s", rem.url_of(name),
                        f" (rank {r})" if ws > 1 else "", msg)


def fetch_step(ckpt: Any, step: int) -> str:
    """The local copy of checkpoint ``step`` of a remote root (CheckpointNotFoundError when not committed)."""
    return ckpt.remote.fetch(layout.step_dir_name(step))


# -- one-off access (CLI, markers) ----------------------------------------------------------------------
_roots: dict[str, RemoteRoot] = {}


def reader_root(url: str) -> RemoteRoot:
    """A read-only RemoteRoot for ``url`` (one per URL per process; its downloads are removed at exit)."""
    url = check_supported(url)
    if url not in _roots:
        import atexit

        r = _roots[url] = RemoteRoot(url, writer=False)
        atexit.register(r.close)
    return _roots[url]


def split(url: str) -> tuple[str, str | None]:
    """``(root URL, step-N name or None)``: ``s3://b/run/step-000000100`` names one checkpoint of a root."""
    url = check_supported(url)
    head, _, last = url.rpartition("/")
    if layout.parse_step(last) is not None and "://" in head:
        return head, last
    return url, None


def resolve_local(url: str, newest_committed: bool = True, progress: Any = None) -> str:
    """Download the checkpoint ``url`` names (a root: its newest commit) and return the local copy's path."""
    root, name = split(url)
    r = reader_root(root)
    if name is None:
        order = r.committed()
        if not order:
            raise CheckpointNotFoundError(f"no complete checkpoint in {root}")
        if not newest_committed:
            from . import reader

            for e in order:
                try:
                    path = r.fetch(e.name, progress)
                    reader.open_checkpoint(path)
                    return path
                except CorruptCheckpointError as exc:
                    log.warning("pyckpt: skipping damaged checkpoint %s: %s", r.url_of(e.name), exc)
            raise CheckpointNotFoundError(f"no complete checkpoint in {root} validates")
        name = order[0].name
    return r.fetch(name, progress)


def infos(url: str, verify: bool = False) -> list:
    """``catalog.Info`` of every ``step-*`` prefix of remote root ``url`` (``path`` is the URL), oldest step
    first; ``verify`` downloads each committed one and checks every checksum."""
    from .catalog import Info, check

    root, name = split(url)
    r = reader_root(root)
    out = []
    for e in r.scan():
        if name is not None and e.name != name:
            continue
        sound, error = None, None
        if verify:
            if e.complete:
                try:
                    error = check(r.fetch(e.name))
                except PyckptError as exc:
                    error = str(exc)
            else:
                error = "incomplete (no MANIFEST.json)"
            sound = error is None
        out.append(Info(e.name, r.url_of(e.name), e.step, e.mtime, e.size, e.complete, sound, error))
    return out
