"""Reading the HDF5 feature cache (docs/FORMAT.md): the one reader stage 2 and the tools use.

:class:`CacheReader` opens ``feats.h5`` read-only and answers what the cache holds: the root
attrs (``shot_config``, ``frame_config``, the ``features`` JSON), the videos under
``/videos/<key>`` with their attrs, which datasets each video has, each dataset's attrs, weights
identity and row level, and the datasets themselves. Reads are per video and per dataset, on
demand: nothing is loaded until it is asked for, so a caller can stream a large cache video by
video. The writer is :class:`vtx.io.cache.CacheWriter`.

Row levels. Every feature dataset lies on one of three row axes (:data:`vtx.features.LEVELS`):
``shot`` (aligned with ``shots``), ``frame`` (aligned with ``frames``) or ``audio`` (aligned
with ``<name>_times``). A dataset's level is its ``level`` attr; caches written before that attr
existed fall back to the feature registry (:func:`vtx.features.dataset_level`), then to the
``<name>_times`` rule: a dataset with a ``<name>_times`` sibling is ``audio``, anything else is
``shot`` (:func:`infer_level`).

Damage. Every dataset vtx writes carries HDF5's Fletcher-32 chunk checksum, so a changed byte in
feature data fails the read instead of being returned. That, and any HDF5 error from a damaged
structure (an object header, a heap, a B-tree), raises :class:`vtx.errors.CacheDamaged` naming
the file, and the video and dataset when known, with what to do (``vtx check FILE --repair``);
never a bare h5py exception. :func:`damage_error` builds that error for the other modules of
:mod:`vtx.io`. Caches written before the checksums read as before (unchecked).
"""

from __future__ import annotations

import json
import os
from collections.abc import Container, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from vtx.errors import CacheDamaged, UsageError
from vtx.features import LEVELS, dataset_level

__all__ = [
    "FEATURE_ATTRS",
    "CacheFileError",
    "CacheNotFoundError",
    "CacheReader",
    "CacheUnreadableError",
    "VideoArrays",
    "VideoInfo",
    "damage_error",
    "damage_reason",
    "guard",
    "infer_level",
    "key_path",
]

VIDEOS = "videos"
FAILURES = "failures"

#: Attrs of a feature dataset that identify how it was made (copied into checkpoints).
FEATURE_ATTRS = ("model", "weights", "weights_file", "dim", "sampling")


class CacheFileError(UsageError):
    """The cache file cannot be read; the message says what to do."""


class CacheNotFoundError(CacheFileError):
    """No cache file at the given path."""


class CacheUnreadableError(CacheFileError):
    """The path exists but is not a readable HDF5 file."""


#: What h5py raises when the bytes under an object are not what HDF5 wrote: a checksum that
#: does not match (OSError), a broken object header (KeyError on open), a bad heap or B-tree
#: (OSError, RuntimeError), an undecodable attr (ValueError) or datatype (TypeError).
DAMAGE_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)


def key_path(key: str) -> str:
    """The video's relative path from its group name (undoes :func:`vtx.io.cache.video_key`)."""
    return key.replace("%2F", "/").replace("%25", "%")


def damage_reason(e: BaseException) -> str:
    """A one-line reason for an h5py error raised by damaged bytes."""
    text = " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())
    if "can't open file" in text or "unable to open external file" in text.lower():
        return ("the part file its index entry links to is missing or cannot be opened (copy "
                "or move a cache together with its feats.h5.parts/ folder, or make it one "
                f"file with vtx compact; see docs/FORMAT.md) (HDF5: {text})")
    if "filter returned failure" in text or "checksum" in text.lower():
        return ("Fletcher-32 checksum mismatch: the stored bytes changed after vtx wrote them "
                f"(HDF5: {text})")
    return f"HDF5 cannot read it: {text}" if text else f"HDF5 cannot read it ({type(e).__name__})"


def damage_error(path: str | os.PathLike, reason: str | BaseException, key: str | None = None,
                 dataset: str | None = None, where: str | None = None) -> CacheDamaged:
    """The :class:`CacheDamaged` error for damage in cache ``path``.

    Args:
        reason: the h5py error (turned into words by :func:`damage_reason`) or words.
        key: the video's group name, when known.
        dataset: the dataset's name, when known.
        where: what was being read when no video is concerned (``root attributes``).
    """
    if isinstance(reason, BaseException):
        reason = damage_reason(reason)
    if key is not None:
        place = f"video {key_path(key)!r}" + (f", dataset {dataset!r}" if dataset else "")
    else:
        place = where or "its structure"
    err = CacheDamaged(
        f"feature cache {path} is damaged: {place}: {reason}. Run `vtx check {path}` to list "
        f"every damaged video, then `vtx check {path} --repair` to remove them (the other "
        f"videos are kept) and rerun the same vtx extract to recompute only those")
    err.path, err.key, err.dataset, err.reason = str(path), key, dataset, reason
    return err


@contextmanager
def guard(path: str | os.PathLike, key: str | None = None, dataset: str | None = None,
          where: str | None = None):
    """Turn an h5py error raised inside the block into :func:`damage_error`."""
    try:
        yield
    except CacheDamaged:
        raise
    except DAMAGE_ERRORS as e:
        raise damage_error(path, e, key, dataset, where) from e


def infer_level(name: str, names: Container[str] = ()) -> str:
    """Row level of dataset ``name`` when it carries no ``level`` attr (older caches).

    Args:
        name: the dataset's name.
        names: the other datasets of the same video (only ``<name>_times`` is looked for).

    Returns:
        the registry's level of the feature that writes ``name``; else ``audio`` when
        ``<name>_times`` is among ``names``; else ``shot``.
    """
    level = dataset_level(name)
    if level is not None:
        return level
    return "audio" if f"{name}_times" in names else "shot"


def _plain(value):
    """An HDF5 attr value as plain Python: bytes decoded, numpy scalars unwrapped."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class VideoInfo:
    """One video of the cache.

    Attributes:
        key: group name under ``/videos`` (the escaped relative path).
        path: the ``path`` attr (relative POSIX path of the video); ``key`` if absent.
        attrs: every attr of the group, as plain Python values.
        datasets: names of the group's datasets, sorted.
    """

    key: str
    path: str
    attrs: dict = field(repr=False)
    datasets: tuple[str, ...] = ()


class CacheReader:
    """Read-only access to a feature cache. Use as a context manager.

    Args:
        path: the cache file (``feats.h5``).

    Raises:
        CacheNotFoundError: no file at ``path``.
        CacheUnreadableError: ``path`` is not a readable HDF5 file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CacheNotFoundError(f"feature cache {self.path} does not exist; create it with "
                                     f"vtx extract --videos DIR --out {self.path}")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as e:
            raise CacheUnreadableError(
                f"{self.path} is not a readable HDF5 feature cache ({e}); point --features at "
                f"the feats.h5 written by vtx extract") from e

    def __enter__(self) -> "CacheReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    # ----------------------------------------------------------------- root
    def root_attrs(self) -> dict:
        """Every root attr, as plain Python values (strings decoded)."""
        with guard(self.path, where="the root attributes (the cache's settings)"):
            return {k: _plain(v) for k, v in self._file.attrs.items()}

    def _root_text(self, name: str) -> str | None:
        with guard(self.path, where=f"the root attribute {name!r}"):
            value = self._file.attrs.get(name)
            return None if value is None else _text(value)

    @property
    def shot_config(self) -> str | None:
        """The root ``shot_config`` attr (JSON: how shots were cut), or None."""
        return self._root_text("shot_config")

    @property
    def frame_config(self) -> str | None:
        """The root ``frame_config`` attr (JSON: how frames were sampled), or None."""
        return self._root_text("frame_config")

    @property
    def features(self) -> dict[str, str]:
        """The root ``features`` attr: feature name -> weights identity ({} when absent or not
        valid JSON)."""
        try:
            return dict(json.loads(self._root_text("features") or "{}"))
        except (json.JSONDecodeError, TypeError, ValueError):
            return {}

    # ----------------------------------------------------------------- videos
    def _videos(self) -> h5py.Group | dict:
        with guard(self.path, where=f"the /{VIDEOS} group"):
            group = self._file.get(VIDEOS)
            return {} if group is None else group

    def _group(self, key: str) -> h5py.Group:
        videos = self._videos()
        with guard(self.path, key):
            present = key in videos
            if present:
                return videos[key]
        raise KeyError(f"{self.path} has no video {key!r} under /{VIDEOS}")

    def _dataset(self, key: str, name: str) -> h5py.Dataset:
        g = self._group(key)
        with guard(self.path, key, name):
            present = name in g
            if present:
                return g[name]
        raise KeyError(f"video {key!r} of {self.path} has no dataset {name!r}")

    def keys(self) -> list[str]:
        """Keys of the cached videos, sorted."""
        videos = self._videos()
        with guard(self.path, where=f"the list of videos under /{VIDEOS}"):
            return sorted(videos)

    def __len__(self) -> int:
        videos = self._videos()
        with guard(self.path, where=f"the list of videos under /{VIDEOS}"):
            return len(videos)

    def video(self, key: str) -> VideoInfo:
        """The video ``key``: its path, attrs and dataset names (no data is read)."""
        g = self._group(key)
        with guard(self.path, key):
            attrs = {k: _plain(v) for k, v in g.attrs.items()}
            names = tuple(sorted(g))
        return VideoInfo(key=key, path=_text(attrs.get("path", key)), attrs=attrs,
                         datasets=names)

    def videos(self) -> Iterator[VideoInfo]:
        """Every cached video, in key order (lazily, one group at a time)."""
        for key in self.keys():
            yield self.video(key)

    def failures(self) -> dict[str, dict]:
        """``/failures``: key -> attrs (``path``, ``reason``, ``time``) of videos whose latest
        attempt failed."""
        with guard(self.path, where=f"the /{FAILURES} group"):
            groups = self._file.get(FAILURES)
            groups = {} if groups is None else groups
            return {k: {a: _plain(v) for a, v in groups[k].attrs.items()}
                    for k in sorted(groups)}

    # ----------------------------------------------------------------- datasets
    def datasets(self, key: str) -> tuple[str, ...]:
        """Names of the datasets video ``key`` has, sorted."""
        g = self._group(key)
        with guard(self.path, key):
            return tuple(sorted(g))

    def has(self, key: str, name: str) -> bool:
        """Whether video ``key`` has dataset ``name``."""
        g = self._group(key)
        with guard(self.path, key, name):
            return name in g

    def read(self, key: str, name: str) -> np.ndarray:
        """The whole dataset ``name`` of video ``key``, in its stored dtype.

        Raises:
            KeyError: no such video or dataset.
            CacheDamaged: the data fails its checksum, or HDF5 cannot read it.
        """
        ds = self._dataset(key, name)
        with guard(self.path, key, name):
            return ds[()]

    def arrays(self, key: str) -> "VideoArrays":
        """Video ``key``'s datasets as a read-only mapping that reads each one when indexed."""
        self._group(key)  # KeyError now, not on the first read
        return VideoArrays(self, key)

    def shape(self, key: str, name: str) -> tuple[int, ...]:
        """Shape of a dataset, without reading it."""
        ds = self._dataset(key, name)
        with guard(self.path, key, name):
            return tuple(int(n) for n in ds.shape)

    def storage_bytes(self, key: str, name: str) -> int:
        """Bytes a dataset takes in the file (HDF5's storage size)."""
        ds = self._dataset(key, name)
        with guard(self.path, key, name):
            return int(ds.id.get_storage_size())

    def dataset_attrs(self, key: str, name: str) -> dict:
        """Every attr of a dataset, as plain Python values."""
        ds = self._dataset(key, name)
        with guard(self.path, key, name):
            return {k: _plain(v) for k, v in ds.attrs.items()}

    def identity(self, key: str, name: str) -> dict:
        """How a feature dataset was made: ``{model, weights, weights_file, dim, sampling}``
        (those present; ``dim`` defaults to the row width of a 2-d dataset, else 0, and
        ``weights`` to ``unknown``), as stored in checkpoints."""
        ds = self._dataset(key, name)
        attrs = {}
        with guard(self.path, key, name):
            for a in FEATURE_ATTRS:
                if a in ds.attrs:
                    v = ds.attrs[a]
                    attrs[a] = int(v) if a == "dim" else _text(v)
            attrs.setdefault("dim", int(ds.shape[1]) if ds.ndim == 2 else 0)
        attrs.setdefault("weights", "unknown")
        return attrs

    def level(self, key: str, name: str) -> str:
        """Row level of a dataset (``shot``, ``frame`` or ``audio``): its ``level`` attr, else
        :func:`infer_level` (see the module docstring)."""
        ds = self._dataset(key, name)
        with guard(self.path, key, name):
            level = ds.attrs.get("level")
            if level is not None and _text(level) in LEVELS:
                return _text(level)
            names = set(ds.parent)
        return infer_level(name, names)


class VideoArrays(Mapping):
    """One video's datasets as a read-only ``{name: numpy array}`` mapping; indexing reads the
    dataset from the file (every time), membership and iteration read nothing."""

    def __init__(self, reader: CacheReader, key: str):
        self.reader, self.key = reader, key

    def __getitem__(self, name: str) -> np.ndarray:
        return self.reader.read(self.key, name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.reader.has(self.key, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.reader.datasets(self.key))

    def __len__(self) -> int:
        return len(self.reader.datasets(self.key))
