"""Token datasets over the feature cache (docs/FORMAT.md), held in memory.

Stage 2 trains on cached tokens, not on video. A head names the cache datasets it reads
(``head.features``) and its token axis (``head.level``); :func:`load_cache` reads exactly those
datasets of every *labelled* video once (a shot token is ~2 KB, so thousands of videos fit in
memory easily) and :func:`collate` pads them into the head's batch contract
``{feature: float (B, L, *shape), "mask": bool (B, L)}`` (see ``vtx/heads/__init__.py``).

Token axes. Every cache dataset has one of three row axes (its ``level``):

* ``shot``: one row per shot, aligned on ``shots`` (``resnet18``, ``r2plus1d``);
* ``frame``: one row per sampled frame, aligned on the video's ``frames`` (decode indices,
  ``[m]``) and ``frame_times`` (``vit``, ``motion``, ``residual``);
* ``audio``: rows on their own time axis ``<name>_times`` (``[k, 2]`` seconds, ``[start,
  end)``), e.g. ``vggish`` with ``vggish_times`` (0.96 s examples).

A dataset's level is its ``level`` attr when it has one, else ``audio`` when a
``<name>_times`` dataset exists (or for ``vggish``), else ``frame`` for the known frame
datasets (:data:`FRAME_FEATURES`), else ``shot``. Rows of more than one axis are flattened to
the dataset's ``dim`` (``motion`` ``[m, 2, g, g]``), unless the head declares a *shaped* input
(``head.inputs[name]`` a tuple, e.g. ``vit_patches`` ``(196, 768)``) or the rows are ``dim`` wide
on their last axis only (``vit_patches`` ``[m, 196, 768]`` with ``dim`` 768): those rows keep
their shape, tokens ``(L, *shape)``. Pass ``head.inputs`` as ``features`` to :func:`load_cache`
so that a head's declared shapes are used (``motion`` read as ``(2, g, g)``, say).

A head reads tokens on its own level (``head.level``):

* ``shot`` heads (STAN, Fish et al. 2022, Section 3: one token per shot) get ``L = n_shots``.
  Frame rows are mean-pooled per shot (row ``i`` belongs to the shot whose ``[first, end)``
  frame range holds ``frames[i]``); audio rows are averaged over the examples that overlap
  each shot's ``shot_times`` (STAN's optional audio stream: VGGish pooled per shot).
* ``frame`` heads (VTN, Neimark et al. 2021, Section 3.1: one token per sampled frame) get
  ``L = m``. Each frame takes the audio example that covers its ``frame_times``. Shot rows
  are refused.

A token that no row falls in or covers takes the row nearest to it (by frame index or centre
time); a video without audio rows gets zero audio tokens (and a note).

``max_tokens`` caps ``L`` per video by a *uniform subsample*: the evenly spaced indices
``numpy.linspace(0, L - 1, max_tokens).round()`` (first and last token kept, order kept, the
same on every epoch and for evaluation). Videos with ``L <= max_tokens`` are unchanged.

Refusals (all :class:`CacheDataError`, a :class:`vtx.errors.UsageError`): a needed feature
missing from the cache (the message gives the ``vtx extract`` command that adds it), random
and official backbone weights mixed among the features used (features computed without learned
weights, ``codec`` motion vectors and residuals, go with either), and no labelled video in the
cache.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from vtx.errors import UsageError
from vtx.train.labels import LabelSet

__all__ = [
    "AUDIO_FEATURES",
    "FRAME_FEATURES",
    "CacheData",
    "CacheDataError",
    "MissingFeatureError",
    "MixedWeightsError",
    "NoLabelledVideosError",
    "TokenDataset",
    "VideoTokens",
    "collate",
    "load_cache",
    "subsample_indices",
]

#: Frame-level cache datasets (aligned on ``frames``) when a dataset carries no ``level`` attr.
FRAME_FEATURES = ("vit", "vit_patches", "motion", "residual")
#: Audio datasets (rows on their own ``<name>_times`` axis) when there is no ``level`` attr.
AUDIO_FEATURES = ("vggish",)
#: Attrs of a feature dataset that identify how it was made (copied into checkpoints).
FEATURE_ATTRS = ("model", "weights", "weights_file", "dim", "sampling")
LEVELS = ("shot", "frame")
#: Weights identities of features computed without learned weights (motion vectors, residuals):
#: they go with random and official features alike.
WEIGHT_FREE = ("codec",)
DATASET_LEVELS = ("shot", "frame", "audio")


class CacheDataError(UsageError):
    """The cache cannot feed this head with these labels; the message says how to fix it."""


class MissingFeatureError(CacheDataError):
    """A feature the head reads is not in the cache (for some or all labelled videos)."""


class MixedWeightsError(CacheDataError):
    """Features made with random weights are mixed with features made with official weights."""


class NoLabelledVideosError(CacheDataError):
    """No cached video matches the label file."""


@dataclass
class VideoTokens:
    """One labelled video's tokens.

    Attributes:
        key: HDF5 group name under ``/videos``.
        path: the cache's ``path`` attr (relative POSIX path of the video).
        label_key: the label file's key that matched ``path``.
        split: ``train``, ``val`` or ``test``.
        tokens: ``{feature: (L, D) or (L, *shape)}``, all on one token axis, in the cache's dtype.
        target: multi-hot float32 ``(C,)``, int64 class index ``()`` or float64 value ``()``.
    """

    key: str
    path: str
    label_key: str
    split: str
    tokens: dict[str, np.ndarray]
    target: np.ndarray

    @property
    def length(self) -> int:
        return len(next(iter(self.tokens.values())))


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
        return {"tokens": {f: torch.from_numpy(v.tokens[f]) for f in self.features},
                "target": torch.from_numpy(np.asarray(v.target)), "index": i}


def collate(items: list[dict]) -> dict[str, Tensor]:
    """Pad a list of :class:`TokenDataset` items to the longest one.

    Returns:
        ``{feature: float32 (B, L, *shape), "mask": bool (B, L), "target": (B, C) | (B,),
        "index": int64 (B,)}``; padding is zero and trailing, ``mask`` True for real tokens.
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


def _str_attr(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _dataset_level(g: h5py.Group, name: str) -> str:
    level = g[name].attrs.get("level")
    if level is not None and _str_attr(level) in DATASET_LEVELS:
        return _str_attr(level)
    if f"{name}_times" in g or name in AUDIO_FEATURES:
        return "audio"
    return "frame" if name in FRAME_FEATURES else "shot"


def _feature_identity(name: str, ds: h5py.Dataset) -> dict:
    attrs = {}
    for a in FEATURE_ATTRS:
        if a in ds.attrs:
            v = ds.attrs[a]
            attrs[a] = int(v) if a == "dim" else _str_attr(v)
    attrs.setdefault("dim", int(ds.shape[1]) if ds.ndim == 2 else 0)
    attrs.setdefault("weights", "unknown")
    return attrs


def _pool_rows(x: np.ndarray, pos: np.ndarray, ends: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Mean of the rows falling in each token (frame rows onto shots); the nearest row for a
    token that holds none.

    Args:
        x: rows ``(k, D)``.
        pos: position of each row on the token axis (frame index or seconds) ``(k,)``.
        ends: end of each token's ``[start, end)`` range, ascending ``(n,)``; rows past the last
            end go to the last token, rows before the first start to the first.
        centres: centre of each token's range ``(n,)``.

    Returns:
        ``(n, D)`` in ``x``'s dtype; zeros when there is no row at all.
    """
    n = len(ends)
    if len(x) == 0:
        return np.zeros((n, x.shape[1]), dtype=x.dtype)
    which = np.clip(np.searchsorted(ends, pos, side="right"), 0, n - 1)  # (k,)
    sums = np.zeros((n, x.shape[1]), dtype=np.float64)
    np.add.at(sums, which, x.astype(np.float64))
    counts = np.bincount(which, minlength=n)
    out = sums / np.maximum(counts, 1)[:, None]  # (n, D)
    for t in np.flatnonzero(counts == 0):
        out[t] = x[int(np.argmin(np.abs(pos - centres[t])))]
    return out.astype(x.dtype)


def _pool_overlapping(x: np.ndarray, times: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """Mean of the time-stamped rows overlapping each span (the nearest row if none does).

    Args:
        x: rows ``(k, D)``.
        times: ``[start, end)`` of each row in seconds ``(k, 2)``.
        spans: ``[start, end)`` of each token in seconds ``(n, 2)``.

    Returns:
        ``(n, D)`` in ``x``'s dtype; zeros when there is no row.
    """
    out = np.zeros((len(spans), x.shape[1]), dtype=np.float64)
    if len(x) == 0:
        return out.astype(x.dtype)
    centres = times.mean(axis=1)  # (k,)
    for t, (a, b) in enumerate(spans):
        hit = (times[:, 0] < b) & (times[:, 1] > a)  # (k,)
        out[t] = (x[hit].astype(np.float64).mean(axis=0) if hit.any()
                  else x[int(np.argmin(np.abs(centres - (a + b) / 2)))])
    return out.astype(x.dtype)


def _covering_rows(x: np.ndarray, times: np.ndarray, at: np.ndarray) -> np.ndarray:
    """For each time in ``at`` ``(n,)``, the row whose ``[start, end)`` covers it (the one
    starting last if several do, the nearest by centre if none does); zeros without rows."""
    if len(x) == 0:
        return np.zeros((len(at), x.shape[1]), dtype=x.dtype)
    idx = np.searchsorted(times[:, 0], at, side="right") - 1  # (n,) last row starting <= t
    ok = (idx >= 0) & (times[np.clip(idx, 0, None), 1] > at)
    centres = times.mean(axis=1)  # ascending, (k,)
    right = np.clip(np.searchsorted(centres, at), 0, len(centres) - 1)
    left = np.clip(right - 1, 0, None)
    nearest = np.where(np.abs(centres[left] - at) <= np.abs(centres[right] - at), left, right)
    return x[np.where(ok, idx, nearest)]


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
               log: Callable[[str], None] | None = None) -> CacheData:
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

    Raises:
        CacheDataError: the cache is missing or unreadable, a feature is missing, random and
            official weights are mixed, no labelled video is cached, or datasets do not align.
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
    if not cache.is_file():
        raise CacheDataError(f"feature cache {cache} does not exist; create it with "
                             f"vtx extract --videos DIR --out {cache}")
    try:
        f = h5py.File(cache, "r")
    except OSError as e:
        raise CacheDataError(f"{cache} is not a readable HDF5 feature cache ({e}); "
                             "point --features at the feats.h5 written by vtx extract") from e
    with f:
        root = {k: _str_attr(v) for k, v in f.attrs.items()}
        shot_config, frame_config = root.get("shot_config"), root.get("frame_config")
        try:
            root_features = json.loads(root.get("features", "{}"))
        except json.JSONDecodeError:
            root_features = {}
        groups = f.get("videos")
        groups = {} if groups is None else groups
        names = sorted(groups)

        # Pass 1: which videos are labelled, which features they lack, how features were made.
        labelled: list[tuple[str, str, str]] = []     # (group, path, label key)
        seen_keys: dict[str, str] = {}
        n_unlabelled = 0
        for name in names:
            path = _str_attr(groups[name].attrs.get("path", name))
            key = labels.match(path)
            if key is None:
                n_unlabelled += 1
                continue
            if key in seen_keys:
                raise CacheDataError(
                    f"label {key!r} matches two cached videos, {seen_keys[key]!r} and {path!r}; "
                    f"write the full relative path in the label file")
            seen_keys[key] = path
            labelled.append((name, path, key))
        if not labelled:
            paths = [_str_attr(groups[n].attrs.get("path", n)) for n in names[:5]]
            keys = list(labels.targets)[:5]
            what = (f"its videos include {paths}" if paths else "it holds no videos")
            raise NoLabelledVideosError(
                f"no video in {cache} is labelled: {what}, while the label file's videos "
                f"include {keys}. Label rows are matched to the cache's relative paths in full, "
                f"then by file stem; write paths relative to the folder given to "
                f"vtx extract --videos")

        weights: dict[str, set[str]] = {ft: set() for ft in features}
        identity: dict[str, dict] = {}
        lacking: dict[str, list[str]] = {ft: [] for ft in features}
        for name, path, _ in labelled:
            g = groups[name]
            for ft in features:
                if ft not in g:
                    lacking[ft].append(path)
                    continue
                ident = _feature_identity(ft, g[ft])
                identity.setdefault(ft, ident)
                weights[ft].add(ident["weights"])
        missing = [ft for ft in features if lacking[ft]]
        if missing:
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
        learned = {ft: w for ft, w in chosen.items() if not w.startswith(WEIGHT_FREE)}
        random = [ft for ft, w in learned.items() if w == "random"]
        if random and len(random) < len(learned):
            desc = ", ".join(f"{ft} ({w})" for ft, w in learned.items())
            raise MixedWeightsError(
                f"the features {desc} of cache {cache} mix random and official backbone weights; "
                f"random features are only for smoke tests and must not be mixed with official "
                f"ones. Re-extract every feature with one setting into a new cache: "
                f"vtx extract --videos DIR --out NEW.h5 --features {','.join(features)} "
                f"--weights official (or --weights random)")

        # Pass 2: read the tokens.
        videos: list[VideoTokens] = []
        n_empty = 0
        notes: dict[str, int] = defaultdict(int)
        for name, path, key in labelled:
            tokens = _read_tokens(groups[name], path, features, level, notes, shapes)
            length = len(next(iter(tokens.values())))
            if length == 0:
                n_empty += 1
                continue
            idx = subsample_indices(length, max_tokens)
            if len(idx) < length:
                tokens = {ft: x[idx] for ft, x in tokens.items()}
            target = (np.asarray(labels.targets[key], dtype=np.float64)  # exact, for metrics
                      if labels.task == "regression" else labels.target_array(key))
            videos.append(VideoTokens(key=name, path=path, label_key=key,
                                      split=labels.splits[key], tokens=tokens, target=target))
    for what, n in notes.items():
        log(f"vtx: note: {n} {what}")
    if n_empty:
        log(f"vtx: note: skipped {n_empty} labelled video(s) with no {level} tokens")
    if not videos:
        raise NoLabelledVideosError(f"every labelled video in {cache} has 0 {level} tokens")
    n_unmatched = len(labels.targets) - len(labelled)
    return CacheData(cache=cache, features=features, level=level, feature_attrs=identity,
                     shot_config=shot_config, frame_config=frame_config, labels=labels,
                     videos=videos, n_unlabelled=n_unlabelled, n_unmatched=n_unmatched, max_tokens=max_tokens)


def _read_tokens(g: h5py.Group, path: str, features: Sequence[str], level: str,
                 notes: dict[str, int], shapes: Mapping[str, tuple] | None = None
                 ) -> dict[str, np.ndarray]:
    """``{feature: (L, D) or (L, *shape)}`` of one video, on the head's ``level``; ``shapes``
    names the features whose rows keep their shape (see the module docstring)."""
    shapes = shapes or {}
    shots = g["shots"][()] if "shots" in g else None
    frames = g["frames"][()] if "frames" in g else None
    if frames is not None and frames.ndim == 2:
        frames = frames[:, 0]

    def need(what: str, ft: str):
        if what not in g:
            raise CacheDataError(f"{path}: reading {ft!r} for a {level}-level head needs the "
                                 f"video's {what!r} dataset, which the cache lacks; re-extract it")
        return g[what][()]

    out: dict[str, np.ndarray] = {}
    for ft in features:
        ds = g[ft]
        x = ds[()]
        dim = int(ds.attrs.get("dim", x.shape[1] if x.ndim >= 2 else 0))
        row_shape = tuple(int(n) for n in x.shape[1:])
        if ft in shapes:
            want = tuple(int(n) for n in shapes[ft])
            if row_shape != want:
                raise CacheDataError(f"{path}: dataset {ft!r} has rows of shape {row_shape} but the "
                                     f"head reads {want}; configure the head for the cache's shape")
        elif x.ndim > 2 and int(np.prod(row_shape)) == dim:
            x = x.reshape(len(x), dim)  # (rows, dim), e.g. motion (m, 2, g, g)
        shaped = x.ndim > 2 and (ft in shapes or row_shape[-1] == dim)  # e.g. vit_patches (m, 196, 768)
        if x.ndim != 2 and not shaped:
            raise CacheDataError(f"{path}: dataset {ft!r} has rows of shape {x.shape[1:]}, not "
                                 f"one {dim}-d vector per token; heads cannot read it")
        ft_level = _dataset_level(g, ft)
        if ft_level == "shot":
            if level == "frame":
                raise CacheDataError(
                    f"{path}: {ft!r} is a shot-level feature (one row per shot) but the head "
                    f"reads frame tokens; use a frame-level feature ({', '.join(FRAME_FEATURES)})")
            if shots is not None and len(x) != len(shots):
                raise CacheDataError(f"{path}: {ft!r} has {len(x)} rows but 'shots' has "
                                     f"{len(shots)}; shot features must align on 'shots'")
        elif ft_level == "frame":
            frames = need("frames", ft) if frames is None else frames
            if len(x) != len(frames):
                raise CacheDataError(f"{path}: {ft!r} has {len(x)} rows but 'frames' has "
                                     f"{len(frames)}; frame features must align on 'frames'")
            if level == "shot":
                shots = need("shots", ft)
                x = _pool_rows(x.reshape(len(x), -1), frames, shots[:, 1].astype(np.float64),
                               (shots[:, 0] + shots[:, 1] - 1) / 2).reshape(-1, *x.shape[1:])
        else:  # audio: rows on their own time axis
            times = need(f"{ft}_times", ft).reshape(-1, 2)
            if len(times) != len(x):
                raise CacheDataError(f"{path}: {ft!r} has {len(x)} rows but '{ft}_times' has "
                                     f"{len(times)}")
            if len(x) == 0:
                notes[f"videos without {ft} rows (no audio) got zero {ft} tokens"] += 1
            if level == "shot":
                x = _pool_overlapping(x, times, need("shot_times", ft).astype(np.float64))
            else:
                x = _covering_rows(x, times, need("frame_times", ft).astype(np.float64))
        out[ft] = x
    lengths = {ft: len(x) for ft, x in out.items()}
    if len(set(lengths.values())) > 1:
        raise CacheDataError(f"{path}: features do not share one token axis: {lengths}")
    return out
