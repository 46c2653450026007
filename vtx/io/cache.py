"""The HDF5 feature cache: the contract between stage 1 and stage 2 (see docs/FORMAT.md).

Layout. ``feats.h5`` is an index of external links into immutable part files in
``feats.h5.parts/``, one per finished video (:mod:`vtx.io.index`); plain h5py reads it as one
file. A merge writes a new index (old links plus the new parts') and atomically replaces the old
one, so its cost does not depend on the bytes already cached.

Crash safety. Nothing is modified in place, so ``kill -9`` at any moment cannot corrupt the cache:

1. Each finished video (and each failure record) is written to its own part file: first to a
   ``.tmp`` name, then fsynced and atomically renamed. A part therefore exists only once all of
   the video's requested features are in it.
2. At the start and end of a run (and with ``vtx merge``), finished parts are linked into a new
   index which then atomically replaces ``feats.h5``; parts no longer linked (older versions)
   are deleted afterwards.

A rerun skips videos that are already complete, merges what a killed run finished, and computes
only what is missing. Any number of writers may share a cache: ``vtx extract`` claims each video
before computing it (:mod:`vtx.io.claims`), and merges are serialised by ``feats.h5.lock``
(:class:`CacheLock`), held only while merging.

Integrity. Every dataset is written with HDF5's Fletcher-32 chunk checksum (:func:`write_dataset`),
so a changed byte in stored data fails the read (:class:`vtx.errors.CacheDamaged`) rather than
being read back; ``vtx check`` (:mod:`vtx.io.check`) verifies a whole cache and removes damaged
videos. Reading a damaged cache raises :class:`~vtx.errors.CacheDamaged` naming the video and
dataset, never a bare h5py error.

Full disks. HDF5 finds a full disk only when it flushes, and h5py may then crash the process, so
no HDF5 write here can run out of space: a shard's file and the merge's copy get their space
reserved first (:mod:`vtx.io.space`), and the merge checks the free space before it copies. A
full disk raises :class:`vtx.errors.DiskFull` (exit code 5) saying which path filled up, how much
the step needed and what was kept: the cache file is untouched, finished shards stay for the
next run, and no half-written file is left behind.

Read-only places. A cache whose folder cannot be written opens read-only: it answers what it
holds (so an ``extract`` with nothing to do succeeds), and the first write that is needed raises
:class:`vtx.errors.ReadOnly` naming the path (:meth:`CacheWriter.require_writable`).

Test hook: with the environment variable ``VTX_TEST_KILL_IN_PART=N`` the process kills itself
(``SIGKILL``) while it writes the ``.tmp`` file of its N-th video shard, after the first dataset
is in it: the last kill point of the crash-safety tests. Never set it otherwise.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from vtx import SCHEMA_VERSION, __version__
from vtx.errors import CacheDamaged, CacheInUse, CacheMismatch, DiskFull, ReadOnly, UsageError
from vtx.io import index
from vtx.io.claims import claim_name
from vtx.io.reader import DAMAGE_ERRORS, damage_reason, guard, key_path
from vtx.io.space import (create_reserved, free_bytes, fsync_dir, fsync_file, human,
                          is_disk_full, is_read_only, replaced_atomically, reserve,
                          writable_reason)

VIDEOS = "videos"
FAILURES = "failures"


def video_key(relpath: str) -> str:
    """HDF5 group name of a video: its relative POSIX path with ``%`` and ``/`` escaped."""
    return relpath.replace("%", "%25").replace("/", "%2F")


@dataclass
class VideoRecord:
    """What the cache already holds for one video."""

    key: str
    path: str
    size_bytes: int
    features: set[str] = field(default_factory=set)  # datasets with a ``model`` attr
    datasets: set[str] = field(default_factory=set)  # every dataset


CHUNK_BYTES = 1 << 20

KILL_IN_PART_ENV = "VTX_TEST_KILL_IN_PART"
"""Test-only: kill the process while it writes its N-th video shard (see the module docstring)."""


def write_dataset(group: h5py.Group, name: str, data: np.ndarray, attrs: dict | None = None,
                  chunk_rows: int | None = None, fletcher32: bool = True) -> h5py.Dataset:
    """A chunked dataset of whole rows (about 1 MiB a chunk unless ``chunk_rows`` is given),
    empty ones included, each chunk with a Fletcher-32 checksum (``fletcher32=False`` only
    for ``bench/checksum_cost.py``, which measures what the checksum costs)."""
    data = np.asarray(data)
    kwargs = {}
    if data.ndim:
        rows = _chunk_rows(data, chunk_rows)
        kwargs = dict(chunks=(rows,) + data.shape[1:], maxshape=(None,) + data.shape[1:],
                      fletcher32=fletcher32)
    ds = group.create_dataset(name, data=data, **kwargs)
    for k, v in (attrs or {}).items():
        ds.attrs[k] = v
    return ds


def _chunk_rows(data: np.ndarray, chunk_rows: int | None) -> int:
    """Rows per chunk of ``data`` (ndim >= 1): ``chunk_rows``, else about 1 MiB of rows."""
    if chunk_rows is None:
        row_bytes = max(1, data.dtype.itemsize * int(np.prod(data.shape[1:], dtype=np.int64)))
        chunk_rows = max(1, min(1024, CHUNK_BYTES // row_bytes))
    return max(1, min(len(data), chunk_rows))


def part_bytes(datasets: dict[str, tuple], attrs: dict | None = None) -> int:
    """Bytes to reserve for a shard holding ``datasets`` (name -> (array, attrs[, rows per
    chunk])): the data, plus generous room for HDF5's headers, chunk indexes, checksums and
    attrs."""
    total = 256 << 10
    for data, dattrs, *rows in datasets.values():
        data = np.asarray(data)
        chunks = -(-len(data) // _chunk_rows(data, rows[0] if rows else None)) if data.ndim else 1
        total += data.nbytes + data.nbytes // 50 + 128 * chunks + 16384
        total += 4 * sum(len(str(v)) for v in (dattrs or {}).values())
    return total + 16384 + 4 * sum(len(str(v)) for v in (attrs or {}).values())


class CacheLock:
    """The lock of a cache (``feats.h5.lock``), held until :meth:`release` or the process ends
    (the OS drops it then). Merges, ``--overwrite``, ``vtx compact`` and ``vtx check --repair``
    take it; extracting workers do not (they claim videos, :mod:`vtx.io.claims`).

    Args:
        cache_path: the cache file.
        wait: wait for the lock (a merge waits for another one to finish); otherwise raise
            :class:`~vtx.errors.CacheInUse` at once.

    Raises:
        CacheInUse: another process holds it and ``wait`` is false.
        OSError: the lock file cannot be created (a read-only folder).
    """

    def __init__(self, cache_path: str | os.PathLike, wait: bool = False):
        cache_path = Path(cache_path)
        self.path = cache_path.with_name(cache_path.name + ".lock")
        self._fh = _acquire_lock(self.path, cache_path, wait)

    def release(self) -> None:
        if self._fh.closed:
            return
        self.path.unlink(missing_ok=True)
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()

    def __enter__(self) -> "CacheLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


_UNSET = object()  # versions_of(): no version given


class CacheWriter:
    """Writes videos into a cache crash-safely; any number of writers may share one cache.
    Use as a context manager.

    Each finished video becomes a part file (:meth:`write_video`); :meth:`merge` links the
    finished parts into the index ``feats.h5`` (:mod:`vtx.io.index`). Writers on one cache
    must not compute the same video at once: ``vtx extract`` claims each video first
    (:mod:`vtx.io.claims`).

    A cache in a folder that cannot be written opens read-only (:attr:`read_only` says why):
    reading works, and the first write needed raises :class:`vtx.errors.ReadOnly`.

    Args:
        path: the cache file (``feats.h5``).
        overwrite: start from an empty cache, discarding the existing index and parts.
        merge: merge finished parts when opening and closing (``--no-merge``: never; ``vtx
            merge`` does it later).
        claims: the claims folder (``feats.h5.claims``); with ``overwrite``, a live claim in
            it (another worker computing a video) refuses the overwrite.

    Raises:
        CacheInUse: ``overwrite`` while other workers write the cache.
        DiskFull: merging parts left by a killed run needs more space than is free.
        ReadOnly: the folder is read-only and the cache must be created, overwritten or merged.
        CacheDamaged: the existing cache cannot be read.
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False, merge: bool = True,
                 claims: Path | None = None):
        self.path = Path(path)
        if self.path.exists() and self.path.is_dir():
            raise UsageError(f"--out {self.path} is a directory; give a file name such as "
                             f"{self.path / 'feats.h5'}")
        self.parts = self.path.with_name(self.path.name + ".parts")
        self._merge_tmp = self.path.with_name(self.path.name + ".merge-tmp")
        self._root: dict[str, str] = {}
        self._merged_root: dict[str, str] | None = None
        self._parts_started = 0
        self._merge_on_close = merge
        self._closed = False
        #: Why the cache cannot be written (None when it can).
        self.read_only: str | None = writable_reason(self.path.parent)
        if self.read_only is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                if overwrite:
                    self._overwrite(claims)
                self.parts.mkdir(exist_ok=True)
            except OSError as e:
                if not is_read_only(e):
                    raise
                self.read_only = f"{self.path.parent} cannot be written ({e.strerror or e})"
        if self.read_only is not None:
            self._open_read_only(overwrite)
            return
        if self.path.exists():
            self._check_readable()
        if merge:
            self.merge()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if isinstance(exc, (DiskFull, ReadOnly)):
            self.abandon()  # merging would need the space (or access) that just ran out
        else:
            self.close()

    def close(self) -> None:
        """Merge the finished parts into the cache (unless ``merge=False``)."""
        if self._closed:
            return
        try:
            if self.read_only is None:
                if self._merge_on_close:
                    self.merge(create=True)
            elif self._root_changed():
                self.require_writable("the cache's settings (its root attributes) changed")
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Stop without merging, as a process that dies does: the finished parts stay in
        ``feats.h5.parts/`` and the next merge links them."""
        self._closed = True

    def _overwrite(self, claims: Path | None) -> None:
        """``--overwrite``: remove the index, the parts and dead claims, under the lock."""
        with CacheLock(self.path):
            if claims is not None and claims.is_dir():
                from vtx.io.claims import live_claims
                live = live_claims(claims)
                if live:
                    raise CacheInUse(
                        f"--overwrite would delete {self.path}, but other vtx processes are "
                        f"extracting {len(live)} video(s) into it now (claims in {claims}/). "
                        f"Wait for them to finish or stop them, or write to another --out")
                shutil.rmtree(claims, ignore_errors=True)
            shutil.rmtree(self.parts, ignore_errors=True)
            self.path.unlink(missing_ok=True)

    def require_writable(self, what: str) -> None:
        """Raise :class:`vtx.errors.ReadOnly` when the cache is read-only.

        Args:
            what: what must be written, in words (``3 videos need extracting``).
        """
        if self.read_only is not None:
            fix = (f"copy {self.path.name} (with {self.parts.name}/) to a writable folder and "
                   f"pass the copy as --out" if self.path.exists() else
                   "pass an --out in a writable folder")
            raise ReadOnly(f"{what}, so {self.path} must be written, but {self.read_only}. "
                           f"Make that folder writable, or {fix}")

    def _open_read_only(self, overwrite: bool) -> None:
        if overwrite:
            self.require_writable("--overwrite replaces the cache")
        if not self.path.exists():
            self.require_writable("the cache does not exist yet")
        if self._merge_on_close:
            pending = self.pending_parts()
            if pending:
                self.require_writable(f"{len(pending)} finished video(s) in {self.parts}/ "
                                      f"wait to be merged")
        self._check_readable()

    def _check_readable(self) -> None:
        try:
            f = h5py.File(self.path, "r")
        except OSError as e:
            raise UsageError(f"{self.path} exists but is not a readable HDF5 file ({e}); "
                             f"move it away or pass --overwrite") from e
        with f, guard(self.path, where="the root attribute 'schema_version'"):
            version = int(f.attrs.get("schema_version", -1))
        if version != SCHEMA_VERSION:
            raise CacheMismatch(f"{self.path} has schema_version {version}, this vtx writes "
                                f"{SCHEMA_VERSION}; pass --overwrite or use another --out")

    # ----------------------------------------------------------------- reading what is there
    def root_attrs(self) -> dict[str, str]:
        if not self.path.exists():
            return {}
        with h5py.File(self.path, "r") as f, \
                guard(self.path, where="the root attributes (the cache's settings)"):
            return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()
                    if k != index.LAYOUT_ATTR}

    def _index_entries(self, records: bool = True
                       ) -> tuple[dict[str, index.Entry], dict[str, index.Entry]]:
        """The index's video and failure entries (empty when there is no cache yet); with
        ``records`` false the videos' records are not parsed."""
        if not self.path.exists():
            return {}, {}
        with h5py.File(self.path, "r") as f, guard(self.path, where=f"the /{VIDEOS} group"):
            return index.read_index(f, records)

    def pending_parts(self, entries: tuple[dict, dict] | None = None) -> list[Path]:
        """Finished parts that no index links yet, oldest first (older versions that a merge
        replaced but a killed merge did not delete are included; the merge sorts them out).

        Args:
            entries: the index's entries when already read (:meth:`_index_entries`).
        """
        if not self.parts.is_dir():
            return []
        linked: set[str] = set()
        if entries is not None or self.path.exists():
            videos, failures = (entries if entries is not None else
                                self._index_entries(records=False))
            linked = {e.file for e in (*videos.values(), *failures.values()) if e.file}
        with os.scandir(self.parts) as it:  # names only: cheap with many parts
            names = [e.name for e in it if e.name.endswith(".h5") and e.name not in linked
                     and not e.name.startswith("base-")]
        return [self.parts / n for n in sorted(names, key=lambda n: (index.part_time(n), n))]

    def versions(self) -> dict[str, index.Entry]:
        """The newest version of every video: key -> entry with its record (from the index's
        catalog, or read from the part), over the index and the parts not merged yet."""
        videos, _ = self._index_entries()
        out = {}
        for key, e in videos.items():
            if e.record is None:
                e = index.Entry(e.file, e.obj, e.time, self._read_record(key, e))
            out[key] = e
        for part in self.pending_parts():
            t = index.part_time(part.name)
            try:
                with h5py.File(part, "r") as s:
                    kind, key = str(s.attrs["kind"]), str(s.attrs["key"])
                    if kind != "video" or (key in out and out[key].time > t):
                        continue
                    record = index.group_record(s["video"])
            except DAMAGE_ERRORS:
                continue  # the merge reports it
            out[key] = index.Entry(part.name, "/video", t, record)
        return out

    def _file(self, e: index.Entry) -> Path:
        return self.path if e.file is None else self.parts / e.file

    def _read_record(self, key: str, e: index.Entry) -> dict:
        with h5py.File(self._file(e), "r") as f, guard(self.path, key):
            return index.group_record(f[e.obj])

    def records(self) -> dict[str, VideoRecord]:
        """Videos already complete in the cache (or in parts not merged yet), by key."""
        return {key: VideoRecord(key=key, path=r["path"], size_bytes=r["size_bytes"],
                                 features=set(r["features"]), datasets=set(r["datasets"]))
                for key, e in self.versions().items() for r in [e.record]}

    def read_dataset(self, key: str, name: str) -> np.ndarray:
        e = self.version(key)
        if e is None:
            raise KeyError(f"{key_path(key)!r} is not in {self.path}")
        with h5py.File(self._file(e), "r") as f, guard(self.path, key, name):
            return f[e.obj][name][()]

    def versions_of(self, key: str, version=_UNSET) -> index.Entry | None:
        """:meth:`version` of one video with its record (``version``: that version, when the
        caller has it already)."""
        e = self.version(key) if version is _UNSET else version
        return None if e is None else index.Entry(e.file, e.obj, e.time,
                                                  self._read_record(key, e))

    def claimed(self, key: str) -> index.Entry | None:
        """For the worker that has just claimed video ``key``: delete the unfinished part files
        a killed worker left (nobody else writes them while the claim is held) and return the
        video's newest version (as :meth:`version`), listing the parts folder once for both."""
        prefix, finished = f"{claim_name(key)}-", []
        try:
            with os.scandir(self.parts) as entries:
                for d in entries:
                    if not d.name.startswith(prefix):
                        continue
                    if d.name.endswith(".tmp"):
                        Path(d.path).unlink(missing_ok=True)
                    elif d.name.endswith(".h5"):
                        finished.append(Path(d.path))
        except FileNotFoundError:  # no part written yet
            pass
        return self.version(key, finished)

    def version(self, key: str, parts: list[Path] | None = None) -> index.Entry | None:
        """The newest version of one video (index or finished part), without its record;
        None when the cache does not hold it. Reads only that video's entries (``parts``: its
        finished part files, when the caller has listed them)."""
        best = None
        if self.path.exists():
            with h5py.File(self.path, "r") as f, guard(self.path, key):
                g = f.get(VIDEOS)
                if g is not None and key in g:
                    link = g.get(key, getlink=True)
                    if isinstance(link, h5py.ExternalLink):
                        name = link.filename.split("/", 1)[-1]
                        best = index.Entry(name, link.path, index.part_time(name))
                    else:
                        best = index.Entry(None, f"/{VIDEOS}/{key}", 0)
        if parts is None:
            parts = self.parts.glob(f"{claim_name(key)}-*.h5")
        for part in parts:
            t = index.part_time(part.name)
            if best is not None and best.time >= t:
                continue
            try:
                with h5py.File(part, "r") as s:
                    if str(s.attrs["kind"]) != "video" or str(s.attrs["key"]) != key:
                        continue
            except DAMAGE_ERRORS:
                continue
            best = index.Entry(part.name, "/video", t)
        return best

    def set_root_attrs(self, **attrs: str) -> None:
        """Root attrs written at the next merge (and carried by every part until then)."""
        self._root.update(attrs)

    # ----------------------------------------------------------------- writing parts
    def write_video(self, key: str, attrs: dict, datasets: dict[str, tuple], replace: bool
                    ) -> bool:
        """Persist one finished video atomically, as a part file holding the whole video.

        Args:
            key: the group name under ``/videos``.
            attrs: the video group's attrs.
            datasets: name -> (array, attrs) or (array, attrs, rows per chunk).
            replace: drop what the cache holds for this video first (the file changed);
                otherwise the part holds the cached datasets (copied from the video's newest
                version; only this video's bytes are read) plus ``datasets``.

        Returns:
            False when ``replace`` is false and the video is no longer in the cache (``vtx
            check --repair`` removed it meanwhile): nothing is written, and the next run
            extracts the whole video again.

        Raises:
            DiskFull: the part does not fit (nothing of it is left behind).
            ReadOnly: the cache is read-only.
        """
        base = None
        need = part_bytes(datasets, attrs)
        if not replace:
            base = self.version(key)
            if base is None:
                return False
            need += _group_bytes(self._file(base), base.obj)

        def fill(f: h5py.File) -> None:
            if base is not None:
                with h5py.File(self._file(base), "r") as src, guard(self.path, key):
                    src.copy(src[base.obj], f, name="video")
                g = f["video"]
                for name in datasets:
                    if name in g:
                        del g[name]
            else:
                g = f.create_group("video")
            for k, v in attrs.items():
                g.attrs[k] = v
            for i, (name, (data, dattrs, *rows)) in enumerate(datasets.items()):
                write_dataset(g, name, data, dattrs, rows[0] if rows else None)
                if i == 0:
                    self._test_kill_point(f)
        self._write_part("video", key, fill, need)
        return True

    def write_failure(self, key: str, path: str, reason: str) -> None:
        def fill(f: h5py.File) -> None:
            g = f.create_group("failure")
            g.attrs["path"] = path
            g.attrs["reason"] = reason
            g.attrs["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._write_part("failure", key, fill, part_bytes({}, {"r": reason}))

    def _write_part(self, kind: str, key: str, fill, need: int) -> None:
        what = f"the {'features' if kind == 'video' else 'failure record'} of {key_path(key)!r}"
        self.require_writable(f"{what} must be stored")
        name = index.part_name(claim_name(key))
        tmp = self.parts / f"{name}.tmp"
        self._parts_started += 1
        free = free_bytes(self.parts)
        if free < need:
            raise DiskFull(self._part_full(what, need, free))
        try:
            create_reserved(tmp, need, {"kind": kind, "key": key,
                                        "root": json.dumps(self._root)})
            with h5py.File(tmp, "r+") as f:
                fill(f)
            fsync_file(tmp)
            os.replace(tmp, self.parts / f"{name}.h5")
            fsync_dir(self.parts)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if is_disk_full(e):
                raise DiskFull(self._part_full(what, need, free_bytes(self.parts))) from e
            if is_read_only(e) and isinstance(e, OSError):
                self.read_only = f"{self.parts} cannot be written ({e.strerror or e})"
                self.require_writable(f"{what} must be stored")
            raise

    def _part_full(self, what: str, need: int, free: int) -> str:
        n = len(self.pending_parts())
        kept = (f", and the {n} video(s) finished so far are kept in {self.parts}/ for the next "
                f"run to merge" if n else "")
        return (f"no space left on the device of {self.parts}: writing {what} needs about "
                f"{human(need)}, and {human(free)} is free. Nothing was lost: "
                f"{self._untouched()}{kept}. Free at least {human(max(need - free, 1))} more "
                f"there (or pass an --out on a bigger disk) and rerun the same command: it keeps "
                f"what is finished and computes only the rest")

    def _untouched(self) -> str:
        return (f"the cache {self.path} is untouched" if self.path.exists() else
                f"the cache {self.path} was not created yet")

    def _test_kill_point(self, f: h5py.File) -> None:
        when = os.environ.get(KILL_IN_PART_ENV)
        if when and self._parts_started == int(when):
            f.flush()  # the first dataset is in the .tmp file; the rest never will be
            os.kill(os.getpid(), signal.SIGKILL)

    # ----------------------------------------------------------------- merging
    def merge(self, create: bool = False) -> int:
        """Link the finished parts into the index atomically; returns how many were merged.

        Under the cache's lock (a second merge waits). The new index holds the old links plus
        the new parts' (no feature data is read or copied); it replaces the old index with one
        rename, and the parts it no longer links (older versions) are deleted afterwards.

        Raises:
            DiskFull: the new index does not fit; the cache and the parts are untouched.
            ReadOnly: the cache is read-only.
            CacheDamaged: the cache (or a part) cannot be read.
        """
        if self.read_only is not None:
            pending = self.pending_parts()
            if not pending and (self.path.exists() or not create) and not self._root_changed():
                return 0
        self.require_writable("finished videos must be merged")
        with CacheLock(self.path, wait=True):
            return self._merge_locked(create)

    def _merge_locked(self, create: bool) -> int:
        self._merge_tmp.unlink(missing_ok=True)  # left by a merge that was killed
        self.parts.mkdir(exist_ok=True)
        exists = self.path.exists()
        root: dict[str, str] = {}
        videos: dict[str, index.Entry] = {}
        failures: dict[str, index.Entry] = {}
        renamed = False
        if exists:
            with h5py.File(self.path, "r") as f:
                with guard(self.path, where="the root attributes (the cache's settings)"):
                    root = {k: _plain(v) for k, v in f.attrs.items()}
                with guard(self.path, where=f"the /{VIDEOS} group"):
                    videos, failures = index.read_index(f, records=False)
                    renamed = bool(index.link_folders(f) - {self.parts.name})
        pending = self.pending_parts((videos, failures))
        if not pending and (exists or not create) and not self._root_changed(root) \
                and not renamed:
            return 0
        base = None
        if exists:
            if any(e.file is None for e in (*videos.values(), *failures.values())):
                base = index.link_base(self.path, self.parts)  # a self-contained cache
                videos = {k: index.Entry(base, e.obj, 0, self._read_record(k, e))
                          if e.file is None else e for k, e in videos.items()}
                failures = {k: index.Entry(base, e.obj, 0) if e.file is None else e
                            for k, e in failures.items()}
        before = {e.file for e in (*videos.values(), *failures.values())}
        old = None
        if exists and all(e.cataloged for e in (*videos.values(), *failures.values())):
            old = (dict(videos), dict(failures))  # an index read from its catalog: patchable
        for part in pending:
            self._fold_part(part, root, videos, failures)
        _merge_root(root, self._root)
        root["vtx_version"] = __version__
        root["schema_version"] = SCHEMA_VERSION
        n = len(videos) + len(failures)
        need = index.index_bytes(n) + 4 * sum(len(str(v)) for v in root.values())
        if exists:
            need += self.path.stat().st_size  # a patched copy starts as the whole index
        free = free_bytes(self.path.parent)
        if free < need:
            self._drop_base(base)
            raise DiskFull(self._merge_full(len(pending), need, free))
        patch = (exists and base is None and not renamed and old is not None
                 and index.patchable(self.path, n))
        full = lambda: self._merge_full(len(pending), need, free_bytes(self.path.parent))  # noqa: E731
        try:
            with replaced_atomically(self._merge_tmp, self.path, full):
                if patch:  # a byte copy of the index, with only the changed links redone
                    shutil.copyfile(self.path, self._merge_tmp)
                    reserve(self._merge_tmp, need)
                else:
                    create_reserved(self._merge_tmp, need)
                index.write_index(self._merge_tmp, self.parts.name, root, videos, failures,
                                  old=old if patch else None)
        except BaseException:
            self._drop_base(base)
            raise
        linked = {e.file for e in (*videos.values(), *failures.values())}
        for name in (before | {p.name for p in pending}) - linked:
            if name:
                (self.parts / name).unlink(missing_ok=True)  # older versions, never linked again
        self._merged_root = dict(self._root)
        return len(pending)

    def _drop_base(self, base: str | None) -> None:
        if base is not None:
            (self.parts / base).unlink(missing_ok=True)

    def _fold_part(self, part: Path, root: dict, videos: dict[str, index.Entry],
                   failures: dict[str, index.Entry]) -> None:
        """Add one part to the entries, if it is newer than what they hold for its video."""
        try:
            with h5py.File(part, "r") as s:
                part_root, key = json.loads(s.attrs["root"]), str(s.attrs["key"])
                kind = str(s.attrs["kind"])
                complete = bool(s.attrs.get("replace", True)) or kind != "video"
                record = index.group_record(s["video"]) if kind == "video" else None
        except DAMAGE_ERRORS as e:
            raise CacheDamaged(
                f"the finished part {part} cannot be read ({damage_reason(e)}); delete it "
                f"and rerun the same vtx extract: its video is computed again") from e
        _merge_root(root, part_root)
        t = index.part_time(part.name)
        if kind == "failure":
            if key not in failures or failures[key].time <= t:
                failures[key] = index.Entry(part.name, "/failure", t)
            return
        if not complete:
            return  # written by an older vtx: features to add, not a whole video; the next
            # run extracts them again
        if key not in videos or videos[key].time <= t:
            videos[key] = index.Entry(part.name, "/video", t, record)
            if key in failures and failures[key].time <= t:
                del failures[key]

    def _merge_full(self, n: int, need: int, free: int) -> str:
        what = (f"merging {n} finished video(s) into {self.path}" if n else
                f"updating the settings of {self.path}")
        kept = f" and the finished videos stay in {self.parts}/" if n else ""
        return (f"no space left on the device of {self.path.parent}: {what} writes a new index "
                f"file, which needs about {human(need)}, and {human(free)} is free. Nothing was "
                f"lost: {self._untouched()}{kept}. Free at least {human(max(need - free, 1))} "
                f"more there and rerun the same command: it merges them first")

    def _root_changed(self, current: dict | None = None) -> bool:
        """Whether merging ``set_root_attrs`` would change the cache's root attrs (``current``:
        the cache's root attrs when already read)."""
        if not self._root or self._root == self._merged_root:
            return False
        if current is None and not self.path.exists():
            return True
        current = self.root_attrs() if current is None else current
        for k, v in self._root.items():
            if k == "features" and "features" in current:
                have = json.loads(current["features"])
                if {**have, **json.loads(v)} != have:
                    return True
            elif current.get(k) != v:
                return True
        return False


def _acquire_lock(lock_path: Path, cache_path: Path, wait: bool = False):
    """Exclusive lock on ``lock_path`` (waiting for it when ``wait``); the OS drops it if the
    process dies.

    The lock file is removed on release, so after locking we check that the path still names
    the file we locked (another process may have removed it in between) and retry otherwise.
    """
    for _ in range(1000 if wait else 10):
        fh = open(lock_path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.close()
            raise CacheInUse(
                f"{cache_path} is being merged, compacted or repaired by another vtx process "
                f"(lock {lock_path}). Wait for it to finish, or write to a different --out."
            ) from None
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fh.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()}\n")
            fh.flush()
            return fh
        fh.close()
    raise CacheInUse(f"could not lock {lock_path}; another process keeps replacing it")


def _merge_root(into: dict, root: dict) -> None:
    """Root attrs; ``features`` (JSON name -> weights identity) is a union, not a replacement."""
    for k, v in root.items():
        if k == "features" and "features" in into:
            merged = json.loads(into["features"])
            merged.update(json.loads(v))
            v = json.dumps(merged, sort_keys=True)
        into[k] = v


def _plain(value):
    return value.decode() if isinstance(value, bytes) else value


def _group_bytes(file: Path, obj: str) -> int:
    """Bytes stored by the datasets of one group (to reserve room for a copy of it)."""
    total = 0
    with h5py.File(file, "r") as f:
        g = f[obj]
        for name in g:
            item = g[name]
            if isinstance(item, h5py.Dataset):
                total += item.id.get_storage_size() + 16384
    return total


# ----------------------------------------------------------------------------- maintenance
@dataclass
class MaintenanceReport:
    """What ``vtx merge`` or ``vtx compact`` did."""

    cache: str
    merged: int = 0  # finished parts linked by this command
    videos: int = 0
    failures: int = 0
    stale_removed: int = 0  # unfinished parts of dead workers deleted
    compacted_to: str | None = None
    bytes: int = 0  # size of the cache afterwards: index + the parts it links (or the file)
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def line(self) -> str:
        what = (f"compacted into {self.compacted_to} (one self-contained file)"
                if self.compacted_to else f"merged {self.merged} finished part(s)")
        stale = f", removed {self.stale_removed} unfinished part(s) of dead workers" \
            if self.stale_removed else ""
        return (f"{self.cache}: {what}{stale} | videos: {self.videos}, failures: "
                f"{self.failures} | {human(self.bytes)} | wall: {self.wall_s:.1f} s")


def merge_cache(path: str | os.PathLike) -> MaintenanceReport:
    """``vtx merge``: link every finished part into the index (waiting for a merge in
    progress), and delete the unfinished parts of workers that died.

    Raises:
        CacheNotFoundError: neither the cache nor its parts folder exists.
    """
    from vtx.io.claims import live_claims
    from vtx.io.reader import CacheNotFoundError

    t0 = time.perf_counter()
    path = Path(path)
    parts = path.with_name(path.name + ".parts")
    if not path.exists() and not parts.is_dir():
        raise CacheNotFoundError(f"feature cache {path} does not exist (nor {parts}/)")
    report = MaintenanceReport(cache=str(path))
    with CacheWriter(path, merge=False) as w:
        report.merged = w.merge(create=True)
        claims = path.with_name(path.name + ".claims")
        live = {n for n in live_claims(claims)} if claims.is_dir() else set()
        for tmp in w.parts.glob("*.tmp"):
            if tmp.name.split("-")[0] not in live:
                tmp.unlink(missing_ok=True)
                report.stale_removed += 1
        _count(w, report)
    report.wall_s = time.perf_counter() - t0
    return report


def compact_cache(path: str | os.PathLike, out: str | os.PathLike | None = None,
                  progress: bool = True) -> MaintenanceReport:
    """``vtx compact``: fold the index and every part it links into one self-contained HDF5
    file (to copy or publish a cache as a single file).

    In place (``out`` None) the compacted file replaces the index atomically and the parts it
    folded are deleted; finished parts are merged first. Workers may keep extracting into the
    cache meanwhile: their new parts are merged later as usual.

    Raises:
        CacheNotFoundError: the cache does not exist.
        DiskFull: the compacted copy does not fit; nothing was changed.
    """
    from vtx.io.reader import CacheNotFoundError
    from vtx.progress import progress as progress_bar

    t0 = time.perf_counter()
    path = Path(path)
    if not path.exists():
        raise CacheNotFoundError(f"feature cache {path} does not exist")
    target = Path(out) if out is not None else path
    report = MaintenanceReport(cache=str(path), compacted_to=str(target))
    with CacheWriter(path) as w:  # merges what is finished
        pass
    tmp = target.with_name(target.name + ".compact-tmp")
    with CacheLock(path, wait=True):
        videos, failures = w._index_entries(records=False)
        files = {e.file for e in (*videos.values(), *failures.values()) if e.file}
        need = path.stat().st_size + sum((w.parts / f).stat().st_size for f in files) * 11 // 10
        free = free_bytes(target.parent)
        if free < need:
            raise DiskFull(f"no space left on the device of {target.parent}: compacting "
                           f"{path} writes one file of about {human(need)}, and {human(free)} "
                           f"is free. Nothing was changed. Free at least "
                           f"{human(need - free)} more there, or pass --out on a bigger disk")
        full = lambda: (f"no space left on the device of {target.parent} while "  # noqa: E731
                        f"compacting {path}. Nothing was changed; free space (about "
                        f"{human(need)} in all) and run vtx compact again")
        with replaced_atomically(tmp, target, full):
            create_reserved(tmp, need)
            with h5py.File(path, "r") as src, h5py.File(tmp, "r+") as dst:
                with guard(path, where="the root attributes (the cache's settings)"):
                    for k, v in src.attrs.items():
                        if k != index.LAYOUT_ATTR:
                            dst.attrs[k] = v
                for group, entries in ((VIDEOS, videos), (FAILURES, failures)):
                    g = dst.create_group(group)
                    for key in progress_bar(sorted(entries), desc=f"compact {group}",
                                            unit="video", enabled=progress and group == VIDEOS):
                        with guard(path, key):
                            src.copy(src[group][key], g, name=key)
        if out is None:
            for f in files:
                (w.parts / f).unlink(missing_ok=True)
    report.videos, report.failures = len(videos), len(failures)
    report.bytes = target.stat().st_size
    report.wall_s = time.perf_counter() - t0
    return report


def _count(w: CacheWriter, report: MaintenanceReport) -> None:
    videos, failures = w._index_entries(records=False)
    report.videos, report.failures = len(videos), len(failures)
    files = {e.file for e in (*videos.values(), *failures.values()) if e.file}
    report.bytes = (w.path.stat().st_size if w.path.exists() else 0) + sum(
        (w.parts / f).stat().st_size for f in files if (w.parts / f).exists())
