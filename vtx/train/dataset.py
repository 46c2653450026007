"""Token datasets over the feature cache (docs/FORMAT.md), streamed from disk.

Stage 2 trains on cached tokens, not on video. A head names the cache datasets it reads
(``head.features``) and its token axis (``head.level``). :func:`load_cache` checks every
*labelled* video against the head from HDF5 metadata alone (no feature is read), and each
video's tokens are then read on demand, video by video through
:class:`vtx.io.reader.CacheReader`, when a :class:`TokenDataset` item is asked for; a bounded
in-memory cache (:class:`TokenSource`, ``cache_bytes``) keeps recent videos, so memory does not
grow with the cache and small caches are read once. :func:`collate` pads items into the head's
batch contract ``{feature: float (B, L, *shape), "mask": bool (B, L)}`` (see
``vtx/heads/__init__.py``).

Each video's datasets are aligned on the head's token axis by
:func:`vtx.train.tokens.align_tokens` (the same function ``vtx predict`` uses), which documents
the row levels (``shot``, ``frame``, ``audio``), the row shapes and the pooling rules. A
dataset's level is its ``level`` attr when it has one, else the feature registry's
(:func:`vtx.features.dataset_level`), else ``audio`` when a ``<name>_times`` dataset exists,
else ``shot`` (:meth:`vtx.io.reader.CacheReader.level`). Pass ``head.inputs`` as ``features``
to :func:`load_cache` so that a head's declared shapes are used (``motion`` read as
``(2, g, g)``, say).

``max_tokens`` caps ``L`` per video by a *uniform subsample*: the evenly spaced indices
``numpy.linspace(0, L - 1, max_tokens).round()`` (first and last token kept, order kept, the
same on every epoch and for evaluation). Videos with ``L <= max_tokens`` are unchanged.

Refusals (all :class:`CacheDataError`, a :class:`vtx.errors.UsageError`): a needed feature
missing from the cache (the message gives the ``vtx extract`` command that adds it), random
and official backbone weights mixed among the features used (features computed without learned
weights, ``codec`` motion vectors and residuals, go with either), and no labelled video in the
cache. A missing or unreadable cache file raises :class:`vtx.io.reader.CacheFileError` (also a
:class:`vtx.errors.UsageError`).
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from vtx.errors import UsageError
from vtx.features import grid_view, is_weight_free, resolve
from vtx.io.reader import CacheReader
from vtx.train.labels import LabelSet
from vtx.train.tokens import HEAD_LEVELS as LEVELS
from vtx.train.tokens import CacheDataError, align_tokens, token_length

__all__ = [
    "CacheData",
    "CacheDataError",
    "MissingFeatureError",
    "MixedWeightsError",
    "NoLabelledVideosError",
    "StreamedTokens",
    "TokenDataset",
    "TokenSource",
    "VideoTokens",
    "collate",
    "load_cache",
    "subsample_indices",
]

class MissingFeatureError(CacheDataError):
    """A feature the head reads is not in the cache (for some or all labelled videos)."""


class MixedWeightsError(CacheDataError):
    """Features made with random weights are mixed with features made with official weights."""


class NoLabelledVideosError(CacheDataError):
    """No cached video matches the label file."""


DEFAULT_CACHE_BYTES = 1 << 30
"""Default budget of the in-memory token cache (1 GiB per process)."""


class TokenSource:
    """Reads one video's tokens for a head from the cache on demand.

    Each process (DataLoader workers included) opens the cache itself on first use; the last
    videos read are kept in memory while they fit in ``cache_bytes`` (least recently used go
    first; a video larger than the budget is not kept).

    Args:
        cache: the HDF5 file.
        features: the datasets read, in the head's order.
        level: the head's token axis.
        shapes: features whose rows keep their shape (the head's shaped inputs).
        max_tokens: uniform subsample cap (:func:`subsample_indices`).
        cache_bytes: budget of the in-memory cache.
    """

    def __init__(self, cache: Path, features: Sequence[str], level: str,
                 shapes: Mapping[str, tuple], max_tokens: int | None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.cache, self.features, self.level = Path(cache), tuple(features), level
        self.shapes, self.max_tokens, self.cache_bytes = dict(shapes), max_tokens, cache_bytes
        self.reads = 0  # videos read from disk by this process
        self._reset()

    def _reset(self) -> None:
        self._pid, self._reader = None, None
        self._kept: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self._kept_bytes = 0

    def __getstate__(self) -> dict:  # to DataLoader workers: no open file, no cached tokens
        state = dict(self.__dict__)
        state.update(_pid=None, _reader=None, _kept=OrderedDict(), _kept_bytes=0)
        return state

    def reader(self) -> CacheReader:
        if self._pid != os.getpid():  # a new process: open the file here
            self._reset()
            self._reader, self._pid = CacheReader(self.cache), os.getpid()
        return self._reader

    def read(self, key: str, path: str = "") -> dict[str, np.ndarray]:
        """``{feature: (L, D) or (L, *shape)}`` of video ``key``, subsampled to ``max_tokens``."""
        if key in self._kept:
            self._kept.move_to_end(key)
            return self._kept[key]
        reader = self.reader()
        tokens = align_tokens(reader.arrays(key), self.features, self.level, shapes=self.shapes,
                              levels={ft: reader.level(key, ft) for ft in self.features},
                              dims={ft: _row_dim(reader, key, ft) for ft in self.features},
                              video=path)
        length = len(next(iter(tokens.values())))
        idx = subsample_indices(length, self.max_tokens)
        if len(idx) < length:
            tokens = {ft: x[idx] for ft, x in tokens.items()}
        self.reads += 1
        size = sum(x.nbytes for x in tokens.values())
        if size <= self.cache_bytes:
            self._kept[key] = tokens
            self._kept_bytes += size
            while self._kept_bytes > self.cache_bytes:
                _, old = self._kept.popitem(last=False)
                self._kept_bytes -= sum(x.nbytes for x in old.values())
        return tokens

    @property
    def kept_bytes(self) -> int:
        """Bytes of tokens held in memory by this process."""
        return self._kept_bytes


class StreamedTokens(Mapping):
    """A video's tokens as a mapping that reads them through a :class:`TokenSource` when
    indexed; ``length`` is known without reading."""

    def __init__(self, source: TokenSource, key: str, path: str, length: int):
        self.source, self.key, self.path, self.length = source, key, path, length

    def load(self) -> dict[str, np.ndarray]:
        return self.source.read(self.key, self.path)

    def __getitem__(self, feature: str) -> np.ndarray:
        return self.load()[feature]

    def __iter__(self):
        return iter(self.source.features)

    def __len__(self) -> int:
        return len(self.source.features)


@dataclass
class VideoTokens:
    """One labelled video's tokens.

    Attributes:
        key: HDF5 group name under ``/videos``.
        path: the cache's ``path`` attr (relative POSIX path of the video).
        label_key: the label file's key that matched ``path``.
        split: ``train``, ``val`` or ``test``.
        tokens: ``{feature: (L, D) or (L, *shape)}``, all on one token axis, in the cache's dtype:
            a dict in memory, or :class:`StreamedTokens` that read from the cache when indexed.
        target: multi-hot float32 ``(C,)``, int64 class index ``()`` or float64 value ``()``.
        positions: int64 ``(L,)``: each token's index in the video's whole token sequence,
            before ``max_tokens`` subsampling (None: ``0 .. L-1``). VTN's positions index them.
    """

    key: str
    path: str
    label_key: str
    split: str
    tokens: Mapping[str, np.ndarray]
    target: np.ndarray
    positions: np.ndarray | None = None

    @property
    def length(self) -> int:
        if isinstance(self.tokens, StreamedTokens):
            return self.tokens.length
        return len(next(iter(self.tokens.values())))

    def read(self) -> dict[str, np.ndarray]:
        """Every feature's tokens (one read of the video when streamed)."""
        if isinstance(self.tokens, StreamedTokens):
            return self.tokens.load()
        return dict(self.tokens)


@dataclass
class CacheData:
    """Everything stage 2 reads from a cache for one head and one label set.

    Attributes:
        cache: the HDF5 file.
        features: datasets read, in the head's order.
        level: token axis, ``shot`` or ``frame``.
        feature_attrs: ``{feature: {model, weights, weights_file, dim, sampling}}``.
        shot_config: the root ``shot_config`` attr (JSON), or None.
        frame_config: the root ``frame_config`` attr (JSON: how frames were sampled), or None.
        labels: the label set the videos were matched against.
        videos: labelled videos, in cache order.
        n_unlabelled: cached videos without a label (ignored).
        n_unmatched: labelled videos not in the cache.
    """

    cache: Path
    features: tuple[str, ...]
    level: str
    feature_attrs: dict[str, dict]
    shot_config: str | None
    frame_config: str | None
    labels: LabelSet
    videos: list[VideoTokens]
    n_unlabelled: int = 0
    n_unmatched: int = 0
    max_tokens: int | None = None
    _by_split: dict[str, list[VideoTokens]] = field(init=False, repr=False)

    def __post_init__(self):
        self._by_split = {}
        for v in self.videos:
            self._by_split.setdefault(v.split, []).append(v)

    @property
    def dims(self) -> dict[str, int]:
        """Width of each feature, from the cache."""
        return {f: int(a["dim"]) for f, a in self.feature_attrs.items()}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Token shape of each feature as loaded: ``(D,)`` for flattened rows, e.g. ``(196, 768)``
        for shaped ones."""
        v = self.videos[0]
        return {f: tuple(int(n) for n in v.tokens[f].shape[1:]) for f in self.features}

    def split_sizes(self) -> dict[str, int]:
        return {s: len(self._by_split.get(s, [])) for s in ("train", "val", "test")}

    def dataset(self, split: str = "all") -> "TokenDataset":
        """The videos of one split (``train``, ``val``, ``test``) or ``all``."""
        if split == "all":
            return TokenDataset(self.videos, self.features)
        if split not in ("train", "val", "test"):
            raise UsageError(f"unknown split {split!r}; valid splits: train, val, test, all")
        return TokenDataset(self._by_split.get(split, []), self.features)


class TokenDataset(Dataset):
    """Videos as ``{"tokens": {feature: (L, D)}, "target": ..., "index": i}`` items.

    Args:
        videos: the videos, in order; ``index`` is the position in this list.
        features: the feature datasets each item carries.
    """

    def __init__(self, videos: Sequence[VideoTokens], features: Sequence[str]):
        self.videos = list(videos)
        self.features = tuple(features)

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> dict:
        v = self.videos[i]
        tokens = v.read()
        positions = v.positions if v.positions is not None else np.arange(v.length)
        return {"tokens": {f: torch.from_numpy(tokens[f]) for f in self.features},
                "target": torch.from_numpy(np.asarray(v.target)), "index": i,
                "positions": torch.from_numpy(np.asarray(positions, dtype=np.int64))}


def collate(items: list[dict]) -> dict[str, Tensor]:
    """Pad a list of :class:`TokenDataset` items to the longest one.

    Returns:
        ``{feature: float32 (B, L, *shape), "mask": bool (B, L), "target": (B, C) | (B,),
        "index": int64 (B,)}``, and ``"positions"`` int64 ``(B, L)`` when the items carry them;
        padding is zero and trailing, ``mask`` True for real tokens.
    """
    features = list(items[0]["tokens"])
    lengths = [len(it["tokens"][features[0]]) for it in items]
    B, L = len(items), max(lengths)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    batch: dict[str, Tensor] = {"mask": mask}
    for f in features:
        shape = items[0]["tokens"][f].shape[1:]
        x = torch.zeros(B, L, *shape, dtype=torch.float32)  # (B, L, D) or (B, L, *shape)
        for b, it in enumerate(items):
            x[b, : lengths[b]] = it["tokens"][f].float()
        batch[f] = x
    if all("positions" in it for it in items):
        positions = torch.zeros(B, L, dtype=torch.int64)
        for b, it in enumerate(items):
            positions[b, : lengths[b]] = it["positions"]
        batch["positions"] = positions
    batch["target"] = torch.stack([it["target"] for it in items])
    batch["index"] = torch.tensor([it["index"] for it in items], dtype=torch.int64)
    return batch


def subsample_indices(length: int, max_tokens: int | None) -> np.ndarray:
    """Evenly spaced token indices keeping at most ``max_tokens`` of ``length`` (all if None)."""
    if max_tokens is None or length <= max_tokens:
        return np.arange(length)
    if max_tokens == 1:
        return np.array([length // 2])
    return np.linspace(0, length - 1, max_tokens).round().astype(np.int64)


# --------------------------------------------------------------------------- reading


def _extract_command(cache: Path, have: Sequence[str], missing: Sequence[str],
                     weights: str | None) -> str:
    names = list(dict.fromkeys([*have, *missing]))
    cmd = f"vtx extract --videos DIR --out {cache} --features {','.join(names)}"
    if weights == "random":
        cmd += " --weights random"
    return cmd


def load_cache(cache: str | Path, labels: LabelSet, features: Sequence[str] | Mapping[str, int | tuple],
               level: str = "shot",
               max_tokens: int | None = None,
               log: Callable[[str], None] | None = None,
               cache_bytes: int = DEFAULT_CACHE_BYTES) -> CacheData:
    """Read the tokens of every labelled video for a head reading ``features`` on ``level``.

    Args:
        cache: ``feats.h5`` written by ``vtx extract``.
        labels: targets and splits; cached videos are matched with ``labels.match(path)``.
        features: cache datasets the head reads (``head.features``), or ``head.inputs``
            (name -> width or token shape) so that features the head declares shaped (a tuple)
            keep their row shape and the others are flattened.
        level: the head's token axis (``head.level``).
        max_tokens: cap on tokens per video (uniform subsample, see the module docstring).
        log: where notes go (stderr by default).
        cache_bytes: budget of the in-memory token cache (:class:`TokenSource`).

    Raises:
        CacheFileError: the cache is missing or unreadable.
        CacheDataError: a feature is missing, random and official weights are mixed, no
            labelled video is cached, or datasets do not align.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    cache = Path(cache)
    shapes = ({ft: w for ft, w in features.items() if not isinstance(w, int)}
              if isinstance(features, Mapping) else {})
    features = tuple(features)
    if level not in LEVELS:
        raise CacheDataError(f"unknown token level {level!r}; valid levels: {', '.join(LEVELS)}")
    if max_tokens is not None and max_tokens < 1:
        raise CacheDataError(f"--max-tokens must be at least 1, got {max_tokens}")
    with CacheReader(cache) as reader:
        # 1. Which videos are labelled, and how their features were made.
        labelled = _labelled_videos(reader, labels)
        identity = _check_features(reader, labelled, features)
        _note_grid_views(identity, log)

        # 2. Check each video against the head from metadata; its tokens stream later.
        source = TokenSource(cache, features, level, shapes, max_tokens, cache_bytes)
        videos: list[VideoTokens] = []
        n_empty = 0
        notes: dict[str, int] = defaultdict(int)
        for key, path, label_key in labelled:
            length = token_length({n: reader.shape(key, n) for n in reader.datasets(key)},
                                  features, level, shapes=shapes,
                                  levels={ft: reader.level(key, ft) for ft in features},
                                  dims={ft: _row_dim(reader, key, ft) for ft in features},
                                  video=path, notes=notes)
            if length == 0:
                n_empty += 1
                continue
            positions = subsample_indices(length, max_tokens)
            tokens = StreamedTokens(source, key, path, len(positions))
            target = (np.asarray(labels.targets[label_key], dtype=np.float64)  # exact, for metrics
                      if labels.task == "regression" else labels.target_array(label_key))
            videos.append(VideoTokens(key=key, path=path, label_key=label_key,
                                      split=labels.splits[label_key], tokens=tokens,
                                      target=target, positions=positions))
        shot_config, frame_config = reader.shot_config, reader.frame_config
        n_unlabelled = len(reader) - len(labelled)
    for what, n in notes.items():
        log(f"vtx: note: {n} {what}")
    if n_empty:
        log(f"vtx: note: skipped {n_empty} labelled video(s) with no {level} tokens")
    if not videos:
        raise NoLabelledVideosError(f"every labelled video in {cache} has 0 {level} tokens")
    n_unmatched = len(labels.targets) - len(labelled)
    return CacheData(cache=cache, features=features, level=level, feature_attrs=identity,
                     shot_config=shot_config, frame_config=frame_config, labels=labels,
                     videos=videos, n_unlabelled=n_unlabelled, n_unmatched=n_unmatched,
                     max_tokens=max_tokens)


def _labelled_videos(reader: CacheReader, labels: LabelSet) -> list[tuple[str, str, str]]:
    """``(key, path, label key)`` of each cached video the label file names, in cache order.

    Raises:
        CacheDataError: a label matches two videos.
        NoLabelledVideosError: no cached video is labelled.
    """
    labelled: list[tuple[str, str, str]] = []
    seen_keys: dict[str, str] = {}
    for info in reader.videos():
        key = labels.match(info.path)
        if key is None:
            continue
        if key in seen_keys:
            raise CacheDataError(
                f"label {key!r} matches two cached videos, {seen_keys[key]!r} and {info.path!r}; "
                f"write the full relative path in the label file")
        seen_keys[key] = info.path
        labelled.append((info.key, info.path, key))
    if not labelled:
        paths = [reader.video(k).path for k in reader.keys()[:5]]
        keys = list(labels.targets)[:5]
        what = (f"its videos include {paths}" if paths else "it holds no videos")
        raise NoLabelledVideosError(
            f"no video in {reader.path} is labelled: {what}, while the label file's videos "
            f"include {keys}. Label rows are matched to the cache's relative paths in full, "
            f"then by file stem; write paths relative to the folder given to "
            f"vtx extract --videos")
    return labelled


def _note_grid_views(identity: Mapping[str, dict], log: Callable[[str], None]) -> None:
    """A note when the spatial grids a head reads cover different image regions (a cache of
    before grid views: its codec grids cover the whole coded frame, its ViT patches a crop)."""
    views = {}
    for ft, ident in identity.items():
        spec = resolve(ft)
        view = grid_view(spec, ident.get("weights", "")) if spec is not None else None
        if view is not None:
            views[ft] = view
    if len(set(views.values())) > 1:
        desc = ", ".join(f"{ft}: {v}" for ft, v in sorted(views.items()))
        log(f"vtx: note: the spatial grids read here cover different image regions ({desc}), "
            f"so patch (i, j) and motion cell (i, j) are not one place; re-extract them into "
            f"a new cache with one grid view (docs/FORMAT.md, 'Grid view')")


def _check_features(reader: CacheReader, labelled: Sequence[tuple[str, str, str]],
                    features: Sequence[str]) -> dict[str, dict]:
    """Every labelled video has every feature, each made with one weights setting, random and
    official weights not mixed. Returns ``{feature: identity}`` (of its first video).

    Raises:
        MissingFeatureError: a feature is missing from some labelled videos.
        MixedWeightsError: a feature's weights differ across videos, or random and official
            features are mixed.
    """
    cache = reader.path
    weights: dict[str, set[str]] = {ft: set() for ft in features}
    identity: dict[str, dict] = {}
    lacking: dict[str, list[str]] = {ft: [] for ft in features}
    for key, path, _ in labelled:
        for ft in features:
            if not reader.has(key, ft):
                lacking[ft].append(path)
                continue
            ident = reader.identity(key, ft)
            identity.setdefault(ft, ident)
            weights[ft].add(ident["weights"])
    missing = [ft for ft in features if lacking[ft]]
    if missing:
        root_features = reader.features
        have = [ft for ft in root_features if ft not in missing]
        kinds = {w for ws in weights.values() for w in ws} | set(root_features.values())
        parts = []
        for ft in missing:
            n = len(lacking[ft])
            scope = (f"all {n} labelled videos" if n == len(labelled)
                     else f"{n} of {len(labelled)} labelled videos (e.g. {lacking[ft][0]!r})")
            parts.append(f"feature {ft!r} is missing from {scope}")
        command = _extract_command(cache, have, missing,
                                   "random" if kinds == {"random"} else None)
        raise MissingFeatureError(
            f"{'; '.join(parts)} in cache {cache} (it has: {', '.join(root_features) or 'none'}). "
            f"Add it with: {command}"
            f"  (DIR is the folder the cache was extracted from; rerunning extract computes "
            f"only the missing feature)")

    split_weights = {ft: ws for ft, ws in weights.items() if len(ws) > 1}
    if split_weights:
        desc = "; ".join(f"{ft}: {sorted(ws)}" for ft, ws in split_weights.items())
        raise MixedWeightsError(
            f"in cache {cache} the same feature was made with different weights across "
            f"videos ({desc}); re-extract it into a new cache with one --weights setting")
    chosen = {ft: next(iter(ws)) for ft, ws in weights.items()}
    learned = {ft: w for ft, w in chosen.items() if not is_weight_free(w)}
    random = [ft for ft, w in learned.items() if w.split("+")[0] == "random"]  # random+full-frame
    if random and len(random) < len(learned):
        desc = ", ".join(f"{ft} ({w})" for ft, w in learned.items())
        raise MixedWeightsError(
            f"the features {desc} of cache {cache} mix random and official backbone weights; "
            f"random features are only for smoke tests and must not be mixed with official "
            f"ones. Re-extract every feature with one setting into a new cache: "
            f"vtx extract --videos DIR --out NEW.h5 --features {','.join(features)} "
            f"--weights official (or --weights random)")
    return identity


def _row_dim(reader: CacheReader, key: str, ft: str) -> int:
    """A dataset's ``dim`` attr, else its row width (axis 1), else 0: the width
    :func:`align_tokens` flattens rows to."""
    attrs = reader.dataset_attrs(key, ft)
    if "dim" in attrs:
        return int(attrs["dim"])
    shape = reader.shape(key, ft)
    return shape[1] if len(shape) >= 2 else 0
