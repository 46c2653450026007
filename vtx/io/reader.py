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
"""

from __future__ import annotations

import json
import os
from collections.abc import Container, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from vtx.errors import UsageError
from vtx.features import LEVELS, dataset_level

__all__ = [
    "FEATURE_ATTRS",
    "CacheFileError",
    "CacheNotFoundError",
    "CacheReader",
    "CacheUnreadableError",
    "VideoArrays",
    "VideoInfo",
    "infer_level",
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
        return {k: _plain(v) for k, v in self._file.attrs.items()}

    def _root_text(self, name: str) -> str | None:
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
        group = self._file.get(VIDEOS)
        return {} if group is None else group

    def _group(self, key: str) -> h5py.Group:
        try:
            return self._videos()[key]
        except KeyError:
            raise KeyError(f"{self.path} has no video {key!r} under /{VIDEOS}") from None

    def _dataset(self, key: str, name: str) -> h5py.Dataset:
        g = self._group(key)
        if name not in g:
            raise KeyError(f"video {key!r} of {self.path} has no dataset {name!r}")
        return g[name]

    def keys(self) -> list[str]:
        """Keys of the cached videos, sorted."""
        return sorted(self._videos())

    def __len__(self) -> int:
        return len(self._videos())

    def video(self, key: str) -> VideoInfo:
        """The video ``key``: its path, attrs and dataset names (no data is read)."""
        g = self._group(key)
        attrs = {k: _plain(v) for k, v in g.attrs.items()}
        return VideoInfo(key=key, path=_text(attrs.get("path", key)), attrs=attrs,
                         datasets=tuple(sorted(g)))

    def videos(self) -> Iterator[VideoInfo]:
        """Every cached video, in key order (lazily, one group at a time)."""
        for key in self.keys():
            yield self.video(key)

    def failures(self) -> dict[str, dict]:
        """``/failures``: key -> attrs (``path``, ``reason``, ``time``) of videos whose latest
        attempt failed."""
        groups = self._file.get(FAILURES)
        groups = {} if groups is None else groups
        return {k: {a: _plain(v) for a, v in groups[k].attrs.items()} for k in sorted(groups)}

    # ----------------------------------------------------------------- datasets
    def datasets(self, key: str) -> tuple[str, ...]:
        """Names of the datasets video ``key`` has, sorted."""
        return tuple(sorted(self._group(key)))

    def has(self, key: str, name: str) -> bool:
        """Whether video ``key`` has dataset ``name``."""
        return name in self._group(key)

    def read(self, key: str, name: str) -> np.ndarray:
        """The whole dataset ``name`` of video ``key``, in its stored dtype.

        Raises:
            KeyError: no such video or dataset.
        """
        return self._dataset(key, name)[()]

    def arrays(self, key: str) -> "VideoArrays":
        """Video ``key``'s datasets as a read-only mapping that reads each one when indexed."""
        self._group(key)  # KeyError now, not on the first read
        return VideoArrays(self, key)

    def shape(self, key: str, name: str) -> tuple[int, ...]:
        """Shape of a dataset, without reading it."""
        return tuple(int(n) for n in self._dataset(key, name).shape)

    def storage_bytes(self, key: str, name: str) -> int:
        """Bytes a dataset takes in the file (HDF5's storage size)."""
        return int(self._dataset(key, name).id.get_storage_size())

    def dataset_attrs(self, key: str, name: str) -> dict:
        """Every attr of a dataset, as plain Python values."""
        return {k: _plain(v) for k, v in self._dataset(key, name).attrs.items()}

    def identity(self, key: str, name: str) -> dict:
        """How a feature dataset was made: ``{model, weights, weights_file, dim, sampling}``
        (those present; ``dim`` defaults to the row width of a 2-d dataset, else 0, and
        ``weights`` to ``unknown``), as stored in checkpoints."""
        ds = self._dataset(key, name)
        attrs = {}
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
        g = self._group(key)
        if name not in g:
            raise KeyError(f"video {key!r} of {self.path} has no dataset {name!r}")
        level = g[name].attrs.get("level")
        if level is not None and _text(level) in LEVELS:
            return _text(level)
        return infer_level(name, g)


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
