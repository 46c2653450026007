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
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from vtx import SCHEMA_VERSION, __version__
from vtx.errors import CacheInUse, CacheMismatch, UsageError

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


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems do not support fsync on directories
        pass


CHUNK_BYTES = 1 << 20


def write_dataset(group: h5py.Group, name: str, data: np.ndarray, attrs: dict | None = None,
                  chunk_rows: int | None = None) -> h5py.Dataset:
    """A chunked dataset of whole rows (about 1 MiB a chunk unless ``chunk_rows`` is given),
    empty ones included."""
    data = np.asarray(data)
    if chunk_rows is None and data.ndim:
        row_bytes = max(1, data.dtype.itemsize * int(np.prod(data.shape[1:], dtype=np.int64)))
        chunk_rows = max(1, min(1024, CHUNK_BYTES // row_bytes))
    rows = max(1, min(len(data), chunk_rows)) if data.ndim else None
    kwargs = {}
    if data.ndim:
        kwargs = dict(chunks=(rows,) + data.shape[1:], maxshape=(None,) + data.shape[1:])
    ds = group.create_dataset(name, data=data, **kwargs)
    for k, v in (attrs or {}).items():
        ds.attrs[k] = v
    return ds


class CacheWriter:
    """Writes videos into a cache file crash-safely. Use as a context manager.

    Args:
        path: the cache file (``feats.h5``).
        overwrite: start from an empty cache, discarding the existing file and shards.
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False):
        self.path = Path(path)
        if self.path.exists() and self.path.is_dir():
            raise UsageError(f"--out {self.path} is a directory; give a file name such as "
                             f"{self.path / 'feats.h5'}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.parts = self.path.with_name(self.path.name + ".parts")
        self._merge_tmp = self.path.with_name(self.path.name + ".merge-tmp")
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock_file = _acquire_lock(self._lock_path, self.path)
        self._root: dict[str, str] = {}
        if overwrite:
            shutil.rmtree(self.parts, ignore_errors=True)
            self.path.unlink(missing_ok=True)
        self._merge_tmp.unlink(missing_ok=True)  # left by a run killed while merging
        self.parts.mkdir(exist_ok=True)
        for tmp in self.parts.glob("*.tmp"):  # shards a killed run had not finished
            tmp.unlink()
        if self.path.exists():
            self._check_readable()
        self.merge()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Merge the finished parts into the cache and release it."""
        if self._lock_file.closed:
            return
        try:
            self.merge(create=True)
            try:
                self.parts.rmdir()  # only when empty: every shard was merged
            except OSError:
                pass
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Release the cache without merging, as a process that dies does: the finished parts
        stay in ``feats.h5.parts/`` and the next writer merges them."""
        if self._lock_file.closed:
            return
        self._lock_path.unlink(missing_ok=True)
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()

    def _check_readable(self) -> None:
        try:
            with h5py.File(self.path, "r") as f:
                version = int(f.attrs.get("schema_version", -1))
        except OSError as e:
            raise UsageError(f"{self.path} exists but is not a readable HDF5 file ({e}); "
                             f"move it away or pass --overwrite") from e
        if version != SCHEMA_VERSION:
            raise CacheMismatch(f"{self.path} has schema_version {version}, this vtx writes "
                                f"{SCHEMA_VERSION}; pass --overwrite or use another --out")

    # ----------------------------------------------------------------- reading what is there
    def root_attrs(self) -> dict[str, str]:
        if not self.path.exists():
            return {}
        with h5py.File(self.path, "r") as f:
            return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}

    def records(self) -> dict[str, VideoRecord]:
        """Videos already complete in the cache, by key."""
        out: dict[str, VideoRecord] = {}
        if not self.path.exists():
            return out
        with h5py.File(self.path, "r") as f:
            for key, g in f.get(VIDEOS, {}).items():
                feats = {n for n, d in g.items() if "model" in d.attrs}
                out[key] = VideoRecord(key=key, path=str(g.attrs.get("path", "")),
                                       size_bytes=int(g.attrs.get("size_bytes", -1)),
                                       features=feats, datasets=set(g))
        return out

    def read_dataset(self, key: str, name: str) -> np.ndarray:
        with h5py.File(self.path, "r") as f:
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
        """
        def fill(f: h5py.File) -> None:
            g = f.create_group("video")
            for k, v in attrs.items():
                g.attrs[k] = v
            for name, (data, dattrs, *rows) in datasets.items():
                write_dataset(g, name, data, dattrs, rows[0] if rows else None)
        self._write_shard("video", key, replace, fill)

    def write_failure(self, key: str, path: str, reason: str) -> None:
        def fill(f: h5py.File) -> None:
            g = f.create_group("failure")
            g.attrs["path"] = path
            g.attrs["reason"] = reason
            g.attrs["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._write_shard("failure", key, False, fill)

    def _write_shard(self, kind: str, key: str, replace: bool, fill) -> None:
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        tmp = self.parts / f"{name}.tmp"
        with h5py.File(tmp, "w") as f:
            f.attrs["kind"] = kind
            f.attrs["key"] = key
            f.attrs["replace"] = bool(replace)
            f.attrs["root"] = json.dumps(self._root)
            fill(f)
        _fsync_file(tmp)
        os.replace(tmp, self.parts / f"{name}.h5")
        _fsync_dir(self.parts)

    # ----------------------------------------------------------------- merging
    def merge(self, create: bool = False) -> int:
        """Fold finished shards into the cache file atomically. Returns how many were merged."""
        shards = sorted(self.parts.glob("*.h5"))
        if not shards and (self.path.exists() or not create) and not self._root_changed():
            return 0
        if self.path.exists():
            shutil.copyfile(self.path, self._merge_tmp)
        with h5py.File(self._merge_tmp, "a" if self.path.exists() else "w") as f:
            f.attrs["vtx_version"] = __version__
            f.attrs["schema_version"] = SCHEMA_VERSION
            videos = f.require_group(VIDEOS)
            failures = f.require_group(FAILURES)
            for shard in shards:
                with h5py.File(shard, "r") as s:
                    _merge_root(f, json.loads(s.attrs["root"]))
                    key = s.attrs["key"]
                    if s.attrs["kind"] == "failure":
                        if key in failures:
                            del failures[key]
                        s.copy(s["failure"], failures, name=key)
                        continue
                    if key in failures:
                        del failures[key]
                    if key in videos and bool(s.attrs["replace"]):
                        del videos[key]
                    if key not in videos:
                        s.copy(s["video"], videos, name=key)
                        continue
                    g = videos[key]
                    for k, v in s["video"].attrs.items():
                        g.attrs[k] = v
                    for name in s["video"]:
                        if name in g:
                            del g[name]
                        s.copy(s["video"][name], g, name=name)
            _merge_root(f, self._root)
        _fsync_file(self._merge_tmp)
        os.replace(self._merge_tmp, self.path)
        _fsync_dir(self.path.parent)
        for shard in shards:
            shard.unlink()
        self._merged_root = dict(self._root)
        return len(shards)

    def _root_changed(self) -> bool:
        return bool(self._root) and self._root != getattr(self, "_merged_root", None)


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
