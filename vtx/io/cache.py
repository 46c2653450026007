"""The HDF5 feature cache: the contract between stage 1 and stage 2 (see docs/FORMAT.md).

Crash safety. The cache file ``feats.h5`` is never modified in place, so ``kill -9`` at any moment
cannot corrupt it:

1. Each finished video (and each failure record) is written to its own small HDF5 *shard* under
   ``feats.h5.parts/``: first to a ``.tmp`` name, then fsynced and atomically renamed. A shard
   therefore exists only once all of the video's requested features are in it.
2. At the end of a run (and at the start of the next one, for shards a killed run left behind),
   shards are merged into a copy of ``feats.h5`` which then atomically replaces it.

A rerun skips videos that are already complete, merges what a killed run finished, and computes
only what is missing. An exclusive lock (``feats.h5.lock``, released by the OS when the process
dies) stops two processes from writing the same cache.

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
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from vtx import SCHEMA_VERSION, __version__
from vtx.errors import CacheDamaged, CacheInUse, CacheMismatch, DiskFull, ReadOnly, UsageError
from vtx.io.reader import DAMAGE_ERRORS, damage_reason, guard, key_path
from vtx.io.space import (create_reserved, free_bytes, fsync_dir, fsync_file, human,
                          is_disk_full, is_read_only, reserve, writable_reason)

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
    """The exclusive lock of a cache (``feats.h5.lock``), held until :meth:`release` or the
    process ends (the OS drops it then).

    Raises:
        CacheInUse: another process holds it.
        OSError: the lock file cannot be created (a read-only folder).
    """

    def __init__(self, cache_path: str | os.PathLike):
        cache_path = Path(cache_path)
        self.path = cache_path.with_name(cache_path.name + ".lock")
        self._fh = _acquire_lock(self.path, cache_path)

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


class CacheWriter:
    """Writes videos into a cache file crash-safely. Use as a context manager.

    A cache in a folder that cannot be written opens read-only (:attr:`read_only` says why):
    reading works, and the first write needed raises :class:`vtx.errors.ReadOnly`.

    Args:
        path: the cache file (``feats.h5``).
        overwrite: start from an empty cache, discarding the existing file and shards.

    Raises:
        DiskFull: merging shards left by a killed run needs more space than is free.
        ReadOnly: the folder is read-only and the cache must be created, overwritten or merged.
        CacheDamaged: the existing cache cannot be read.
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False):
        self.path = Path(path)
        if self.path.exists() and self.path.is_dir():
            raise UsageError(f"--out {self.path} is a directory; give a file name such as "
                             f"{self.path / 'feats.h5'}")
        self.parts = self.path.with_name(self.path.name + ".parts")
        self._merge_tmp = self.path.with_name(self.path.name + ".merge-tmp")
        self._root: dict[str, str] = {}
        self._merged_root: dict[str, str] | None = None
        self._parts_started = 0
        self._lock: CacheLock | None = None
        self._closed = False
        #: Why the cache cannot be written (None when it can).
        self.read_only: str | None = writable_reason(self.path.parent)
        if self.read_only is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._lock = CacheLock(self.path)
            except OSError as e:
                if not is_read_only(e):
                    raise
                self.read_only = f"{self.path.parent} cannot be written ({e.strerror or e})"
        try:
            if self.read_only is not None:
                self._open_read_only(overwrite)
                return
            if overwrite:
                shutil.rmtree(self.parts, ignore_errors=True)
                self.path.unlink(missing_ok=True)
            self._merge_tmp.unlink(missing_ok=True)  # left by a run killed while merging
            self.path.with_name(self.path.name + ".repair-tmp").unlink(missing_ok=True)
            self.parts.mkdir(exist_ok=True)
            for tmp in self.parts.glob("*.tmp"):  # shards a killed run had not finished
                tmp.unlink()
            if self.path.exists():
                self._check_readable()
            self.merge()
        except BaseException:
            self.abandon()
            raise

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if isinstance(exc, (DiskFull, ReadOnly)):
            self.abandon()  # merging would need the space (or access) that just ran out
        else:
            self.close()

    def close(self) -> None:
        """Merge the finished parts into the cache and release it."""
        if self._closed:
            return
        try:
            if self.read_only is None:
                self.merge(create=True)
                try:
                    self.parts.rmdir()  # only when empty: every shard was merged
                except OSError:
                    pass
            elif self._root_changed():
                self.require_writable("the cache's settings (its root attributes) changed")
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Release the cache without merging, as a process that dies does: the finished parts
        stay in ``feats.h5.parts/`` and the next writer merges them."""
        self._closed = True
        if self._lock is not None:
            self._lock.release()

    def require_writable(self, what: str) -> None:
        """Raise :class:`vtx.errors.ReadOnly` when the cache is read-only.

        Args:
            what: what must be written, in words (``3 videos need extracting``).
        """
        if self.read_only is not None:
            fix = (f"copy {self.path.name} to a writable folder and pass the copy as --out"
                   if self.path.exists() else "pass an --out in a writable folder")
            raise ReadOnly(f"{what}, so {self.path} must be written, but {self.read_only}. "
                           f"Make that folder writable, or {fix}")

    def _open_read_only(self, overwrite: bool) -> None:
        if overwrite:
            self.require_writable("--overwrite replaces the cache")
        if not self.path.exists():
            self.require_writable("the cache does not exist yet")
        shards = list(self.parts.glob("*.h5")) if self.parts.is_dir() else []
        if shards:
            self.require_writable(f"{len(shards)} finished video(s) in {self.parts}/ wait to "
                                  f"be merged")
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
            return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}

    def records(self) -> dict[str, VideoRecord]:
        """Videos already complete in the cache, by key."""
        out: dict[str, VideoRecord] = {}
        if not self.path.exists():
            return out
        with h5py.File(self.path, "r") as f:
            with guard(self.path, where=f"the /{VIDEOS} group"):
                videos = f.get(VIDEOS)
                keys = list(videos) if videos is not None else []
            for key in keys:
                with guard(self.path, key):
                    g = videos[key]
                    names = list(g)
                    path = str(g.attrs.get("path", ""))
                    size = int(g.attrs.get("size_bytes", -1))
                feats = set()
                for name in names:
                    with guard(self.path, key, name):
                        if "model" in g[name].attrs:
                            feats.add(name)
                out[key] = VideoRecord(key=key, path=path, size_bytes=size, features=feats,
                                       datasets=set(names))
        return out

    def read_dataset(self, key: str, name: str) -> np.ndarray:
        with h5py.File(self.path, "r") as f, guard(self.path, key, name):
            return f[VIDEOS][key][name][()]

    def set_root_attrs(self, **attrs: str) -> None:
        """Root attrs written at the next merge (and carried by every shard until then)."""
        self._root.update(attrs)

    # ----------------------------------------------------------------- writing shards
    def write_video(self, key: str, attrs: dict, datasets: dict[str, tuple], replace: bool
                    ) -> None:
        """Persist one finished video atomically.

        Args:
            key: the group name under ``/videos``.
            attrs: the video group's attrs.
            datasets: name -> (array, attrs) or (array, attrs, rows per chunk).
            replace: drop what the cache holds for this video first (the file changed);
                otherwise the datasets are added to the existing group.

        Raises:
            DiskFull: the shard does not fit (nothing of it is left behind).
            ReadOnly: the cache is read-only.
        """
        def fill(f: h5py.File) -> None:
            g = f.create_group("video")
            for k, v in attrs.items():
                g.attrs[k] = v
            for i, (name, (data, dattrs, *rows)) in enumerate(datasets.items()):
                write_dataset(g, name, data, dattrs, rows[0] if rows else None)
                if i == 0:
                    self._test_kill_point(f)
        self._write_shard("video", key, replace, fill, part_bytes(datasets, attrs))

    def write_failure(self, key: str, path: str, reason: str) -> None:
        def fill(f: h5py.File) -> None:
            g = f.create_group("failure")
            g.attrs["path"] = path
            g.attrs["reason"] = reason
            g.attrs["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._write_shard("failure", key, False, fill, part_bytes({}, {"r": reason}))

    def _write_shard(self, kind: str, key: str, replace: bool, fill, need: int) -> None:
        what = f"the {'features' if kind == 'video' else 'failure record'} of {key_path(key)!r}"
        self.require_writable(f"{what} must be stored")
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        tmp = self.parts / f"{name}.tmp"
        self._parts_started += 1
        free = free_bytes(self.parts)
        if free < need:
            raise DiskFull(self._part_full(what, need, free))
        try:
            create_reserved(tmp, need, {"kind": kind, "key": key, "replace": bool(replace),
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
        n = len(list(self.parts.glob("*.h5")))
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
        """Fold finished shards into the cache file atomically. Returns how many were merged.

        The new file is a copy of the cache plus the shards; the free space for it is checked
        (and reserved) before anything is written.

        Raises:
            DiskFull: the copy does not fit; the cache and the shards are untouched.
            ReadOnly: the cache is read-only.
            CacheDamaged: the cache (or a shard) cannot be read.
        """
        shards = sorted(self.parts.glob("*.h5")) if self.parts.is_dir() else []
        exists = self.path.exists()
        if not shards and (exists or not create) and not self._root_changed():
            return 0
        self.require_writable(f"{len(shards)} finished video(s) must be merged" if shards else
                              "the cache's settings (its root attributes) changed")
        cache_bytes = self.path.stat().st_size if exists else 0
        shard_bytes = sum(s.stat().st_size for s in shards)
        extra = shard_bytes + shard_bytes // 4 + cache_bytes // 100 + (1 << 20)
        free = free_bytes(self.path.parent)
        if free < cache_bytes + extra:
            raise DiskFull(self._merge_full(len(shards), cache_bytes, extra, free))
        try:
            if exists:
                shutil.copyfile(self.path, self._merge_tmp)
                reserve(self._merge_tmp, cache_bytes + extra)
            else:
                create_reserved(self._merge_tmp, extra)
            with h5py.File(self._merge_tmp, "r+") as f:
                self._fold(f, shards)
            fsync_file(self._merge_tmp)
            os.replace(self._merge_tmp, self.path)
            fsync_dir(self.path.parent)
        except BaseException as e:
            self._merge_tmp.unlink(missing_ok=True)
            if is_disk_full(e):
                raise DiskFull(self._merge_full(len(shards), cache_bytes, extra,
                                                free_bytes(self.path.parent))) from e
            raise
        for shard in shards:
            shard.unlink()
        self._merged_root = dict(self._root)
        return len(shards)

    def _fold(self, f: h5py.File, shards: list[Path]) -> None:
        """Add the shards' videos and failures and the root attrs to the open copy ``f``."""
        with guard(self.path, where="the root attributes (the cache's settings)"):
            f.attrs["vtx_version"] = __version__
            f.attrs["schema_version"] = SCHEMA_VERSION
            videos = f.require_group(VIDEOS)
            failures = f.require_group(FAILURES)
        for shard in shards:
            s = None
            try:
                s = h5py.File(shard, "r")
                root, key = json.loads(s.attrs["root"]), str(s.attrs["key"])
                kind, replace = str(s.attrs["kind"]), bool(s.attrs["replace"])
            except DAMAGE_ERRORS as e:
                if s is not None:
                    s.close()
                raise CacheDamaged(
                    f"the finished part {shard} cannot be read ({damage_reason(e)}); delete it "
                    f"and rerun the same vtx extract: its video is computed again") from e
            with s:
                with guard(self.path, where="the root attributes (the cache's settings)"):
                    _merge_root(f, root)
                with guard(self.path, key):
                    self._fold_one(s, kind, key, replace, videos, failures)
        with guard(self.path, where="the root attributes (the cache's settings)"):
            _merge_root(f, self._root)

    @staticmethod
    def _fold_one(s: h5py.File, kind: str, key: str, replace: bool, videos: h5py.Group,
                  failures: h5py.Group) -> None:
        if kind == "failure":
            if key in failures:
                del failures[key]
            s.copy(s["failure"], failures, name=key)
            return
        if key in failures:
            del failures[key]
        if key in videos and replace:
            del videos[key]
        if key not in videos:
            if replace:
                s.copy(s["video"], videos, name=key)
            # else: features to add to a video that is gone (vtx check --repair removed it);
            # dropped, so the next run extracts the whole video again
            return
        g = videos[key]
        for k, v in s["video"].attrs.items():
            g.attrs[k] = v
        for name in s["video"]:
            if name in g:
                del g[name]
            s.copy(s["video"][name], g, name=name)

    def _merge_full(self, n: int, cache_bytes: int, extra: int, free: int) -> str:
        need = cache_bytes + extra
        what = (f"merging {n} finished video(s) into {self.path}" if n else
                f"updating the settings of {self.path}")
        copy = (f"writes a new copy of the cache first, which needs about {human(need)} "
                f"({human(cache_bytes)} for the copy plus {human(extra)} for the new data and "
                f"headroom)" if cache_bytes else
                f"writes a new cache file, which needs about {human(need)}")
        kept = f" and the finished videos stay in {self.parts}/" if n else ""
        return (f"no space left on the device of {self.path.parent}: {what} {copy}, and "
                f"{human(free)} is free. Nothing was lost: {self._untouched()}{kept}. Free at "
                f"least {human(max(need - free, 1))} more there and rerun the same command: it "
                f"merges them first")

    def _root_changed(self) -> bool:
        """Whether merging ``set_root_attrs`` would change the cache's root attrs."""
        if not self._root or self._root == self._merged_root:
            return False
        if not self.path.exists():
            return True
        current = self.root_attrs()
        for k, v in self._root.items():
            if k == "features" and "features" in current:
                have = json.loads(current["features"])
                if {**have, **json.loads(v)} != have:
                    return True
            elif current.get(k) != v:
                return True
        return False


def _acquire_lock(lock_path: Path, cache_path: Path):
    """Exclusive, non-blocking lock on ``lock_path``; the OS drops it if the process dies.

    The lock file is removed on close, so after locking we check that the path still names the
    file we locked (another process may have removed it in between) and retry otherwise.
    """
    for _ in range(10):
        fh = open(lock_path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise CacheInUse(
                f"{cache_path} is already in use by another vtx process (lock {lock_path}). "
                f"Wait for it to finish, or write to a different --out."
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


def _merge_root(f: h5py.File, root: dict) -> None:
    """Root attrs; ``features`` (JSON name -> weights identity) is a union, not a replacement."""
    for k, v in root.items():
        if k == "features" and "features" in f.attrs:
            merged = json.loads(f.attrs["features"])
            merged.update(json.loads(v))
            v = json.dumps(merged, sort_keys=True)
        f.attrs[k] = v
