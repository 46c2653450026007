"""Token alignment: one video's cache datasets, as numpy arrays, onto a head's token axis.

Training (:func:`vtx.train.dataset.load_cache`, arrays read through
:class:`vtx.io.reader.CacheReader`) and ``vtx predict`` (arrays extracted in memory) both call
:func:`align_tokens`, so a head sees the same tokens from a cache as from a new video.

Row levels. Every dataset lies on one of three row axes (its ``level``):

* ``shot``: one row per shot, aligned on ``shots`` (``resnet18``, ``r2plus1d``);
* ``frame``: one row per sampled frame, aligned on the video's ``frames`` (decode indices,
  ``[m]``) and ``frame_times`` (``vit``, ``motion``, ``residual``);
* ``audio``: rows on their own time axis ``<name>_times`` (``[k, 2]`` seconds, ``[start,
  end)``), e.g. ``vggish`` with ``vggish_times`` (0.96 s examples).

Row shapes. Rows of more than one axis are flattened to the dataset's ``dim`` (``motion``
``[m, 2, g, g]``), unless the head declares a *shaped* input (``head.inputs[name]`` a tuple, e.g.
``vit_patches`` ``(196, 768)``) or the rows are ``dim`` wide on their last axis only
(``vit_patches`` ``[m, 196, 768]`` with ``dim`` 768): those rows keep their shape, tokens
``(L, *shape)``.

A head reads tokens on its own level:

* ``shot`` heads (STAN, Fish et al. 2022, Section 3: one token per shot) get ``L = n_shots``.
  Frame rows are mean-pooled per shot (row ``i`` belongs to the shot whose ``[first, end)``
  frame range holds ``frames[i]``); audio rows are averaged over the examples that overlap
  each shot's ``shot_times`` (STAN's optional audio stream: VGGish pooled per shot).
* ``frame`` heads (VTN, Neimark et al. 2021, Section 3.1: one token per sampled frame) get
  ``L = m``. Each frame takes the audio example that covers its ``frame_times``. Shot rows
  are refused.

A token that no row falls in or covers takes the row nearest to it (by frame index or centre
time); a video without audio rows gets zero audio tokens (and a note).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence

import numpy as np

from vtx.errors import UsageError
from vtx.features import FEATURES
from vtx.io.reader import infer_level

__all__ = ["HEAD_LEVELS", "CacheDataError", "align_tokens", "token_length"]

#: Token axes a head can read.
HEAD_LEVELS = ("shot", "frame")


class CacheDataError(UsageError):
    """The cache (or a video's extracted features) cannot feed this head with these labels; the
    message says how to fix it."""


def _frame_features() -> str:
    return ", ".join(n for n, s in FEATURES.items() if s.level == "frame")


def token_length(shapes_of: Mapping[str, Sequence[int]], features: Sequence[str], level: str,
                 *, shapes: Mapping[str, Sequence[int]] | None = None,
                 levels: Mapping[str, str] | None = None,
                 dims: Mapping[str, int] | None = None, video: str = "",
                 notes: MutableMapping[str, int] | None = None) -> int:
    """Check one video's datasets for a head from their *shapes* alone, and return ``L``.

    Every refusal of :func:`align_tokens` depends only on shapes, so a cache can be checked for
    a head from HDF5 metadata without reading any feature (``vtx train-head`` does, before
    streaming tokens).

    Args:
        shapes_of: the video's datasets: name -> shape (a mapping may compute it on indexing).
        features, level, shapes, levels, dims, video, notes: as in :func:`align_tokens`.

    Raises:
        CacheDataError: as :func:`align_tokens`.
    """
    if level not in HEAD_LEVELS:
        raise CacheDataError(f"unknown token level {level!r}; valid levels: "
                             f"{', '.join(HEAD_LEVELS)}")
    shapes, levels, dims = shapes or {}, levels or {}, dims or {}

    def rows(what: str, ft: str) -> int:
        if what not in shapes_of:
            raise CacheDataError(f"{video}: reading {ft!r} for a {level}-level head needs "
                                 f"the video's {what!r} dataset, which the cache lacks; "
                                 f"re-extract it")
        return int(tuple(shapes_of[what])[0])

    n_shots = rows("shots", "") if "shots" in shapes_of else None
    lengths: dict[str, int] = {}
    for ft in features:
        if ft not in shapes_of:
            raise CacheDataError(f"{video}: the video has no {ft!r} dataset; extract it with "
                                 f"--features {ft}")
        n, *row_shape = (int(d) for d in shapes_of[ft])
        row_shape = tuple(row_shape)
        dim = int(dims[ft]) if ft in dims else (int(np.prod(row_shape)) if row_shape else 0)
        if ft in shapes:
            want = tuple(int(d) for d in shapes[ft])
            if row_shape != want:
                raise CacheDataError(f"{video}: dataset {ft!r} has rows of shape {row_shape} but "
                                     f"the head reads {want}; configure the head for the cache's "
                                     f"shape")
        elif len(row_shape) > 1 and int(np.prod(row_shape)) == dim:
            row_shape = (dim,)  # flattened, e.g. motion (m, 2, g, g) -> (m, dim)
        shaped = len(row_shape) > 1 and (ft in shapes or row_shape[-1] == dim)
        if len(row_shape) != 1 and not shaped:
            raise CacheDataError(f"{video}: dataset {ft!r} has rows of shape {row_shape}, not "
                                 f"one {dim}-d vector per token; heads cannot read it")
        ft_level = levels.get(ft) or infer_level(ft, shapes_of)
        if ft_level == "shot":
            if level == "frame":
                raise CacheDataError(
                    f"{video}: {ft!r} is a shot-level feature (one row per shot) but the head "
                    f"reads frame tokens; use a frame-level feature ({_frame_features()})")
            if n_shots is not None and n != n_shots:
                raise CacheDataError(f"{video}: {ft!r} has {n} rows but 'shots' has "
                                     f"{n_shots}; shot features must align on 'shots'")
            lengths[ft] = n
        elif ft_level == "frame":
            n_frames = rows("frames", ft)
            if n != n_frames:
                raise CacheDataError(f"{video}: {ft!r} has {n} rows but 'frames' has "
                                     f"{n_frames}; frame features must align on 'frames'")
            lengths[ft] = rows("shots", ft) if level == "shot" else n
        else:  # audio: rows on their own time axis
            k = int(np.prod(tuple(shapes_of[f"{ft}_times"]))) // 2 if f"{ft}_times" in \
                shapes_of else rows(f"{ft}_times", ft)
            if k != n:
                raise CacheDataError(f"{video}: {ft!r} has {n} rows but '{ft}_times' has {k}")
            if n == 0 and notes is not None:
                what = f"videos without {ft} rows (no audio) got zero {ft} tokens"
                notes[what] = notes.get(what, 0) + 1
            lengths[ft] = rows("shot_times" if level == "shot" else "frame_times", ft)
    if len(set(lengths.values())) > 1:
        raise CacheDataError(f"{video}: features do not share one token axis: {lengths}")
    return next(iter(lengths.values()), 0)


class _Shapes(Mapping):
    """Shapes of a video's arrays, reading (once) only the arrays asked about."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self.arrays, self.got = arrays, {}

    def get_array(self, name: str) -> np.ndarray:
        if name not in self.got:
            self.got[name] = np.asarray(self.arrays[name])
        return self.got[name]

    def __getitem__(self, name: str) -> tuple[int, ...]:
        return self.get_array(name).shape

    def __contains__(self, name) -> bool:
        return name in self.arrays

    def __iter__(self):
        return iter(self.arrays)

    def __len__(self) -> int:
        return len(self.arrays)


def align_tokens(arrays: Mapping[str, np.ndarray], features: Sequence[str], level: str, *,
                 shapes: Mapping[str, Sequence[int]] | None = None,
                 levels: Mapping[str, str] | None = None,
                 dims: Mapping[str, int] | None = None,
                 video: str = "",
                 notes: MutableMapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """One video's tokens ``{feature: (L, D) or (L, *shape)}`` on the head's ``level``.

    Args:
        arrays: the video's datasets by name, as in the cache: the ``features`` plus whichever
            of ``shots``, ``shot_times``, ``frames``, ``frame_times`` and ``<name>_times`` the
            alignment needs (a mapping that reads on indexing, such as
            :meth:`vtx.io.reader.CacheReader.arrays`, reads only those).
        features: the feature datasets to align, in the head's order.
        level: the head's token axis, ``shot`` or ``frame``.
        shapes: features whose rows keep this shape (the head's shaped inputs).
        levels: each feature's row level (``shot``, ``frame``, ``audio``); a feature not given
            gets :func:`vtx.io.reader.infer_level` over ``arrays``.
        dims: each feature's ``dim`` (the cache's ``dim`` attr); a feature not given gets its
            whole row size (rows are flattened).
        video: the video's path, prefixed to error messages.
        notes: counts of things worth a note (a video without audio rows), incremented.

    Returns:
        ``{feature: array}`` in the arrays' dtypes, all of one length ``L``.

    Raises:
        CacheDataError: a feature or a dataset the alignment needs is missing, a shot-level
            feature is read by a frame-level head, rows do not match ``shots`` / ``frames`` /
            ``<name>_times``, rows are not vectors of ``dim``, or the features disagree on ``L``
            (:func:`token_length`).
    """
    got = _Shapes(arrays)
    token_length(got, features, level, shapes=shapes, levels=levels, dims=dims, video=video,
                 notes=notes)
    shapes, levels, dims = shapes or {}, levels or {}, dims or {}
    out: dict[str, np.ndarray] = {}
    for ft in features:
        x = got.get_array(ft)
        dim = int(dims[ft]) if ft in dims else (int(np.prod(x.shape[1:])) if x.ndim > 1 else 0)
        if ft not in shapes and x.ndim > 2 and int(np.prod(x.shape[1:])) == dim:
            x = x.reshape(len(x), dim)  # (rows, dim), e.g. motion (m, 2, g, g)
        ft_level = levels.get(ft) or infer_level(ft, arrays)
        if ft_level == "frame" and level == "shot":
            frames, shots = got.get_array("frames"), got.get_array("shots")
            frames = frames[:, 0] if frames.ndim == 2 else frames
            pooled = _pool_rows(x.reshape(len(x), -1), frames,  # (m, D') flat rows
                                shots[:, 1].astype(np.float64),
                                (shots[:, 0] + shots[:, 1] - 1) / 2)  # (n_shots, D')
            x = pooled.reshape(-1, *x.shape[1:])  # (n_shots, D) or (n_shots, *shape)
        elif ft_level == "audio":
            times = got.get_array(f"{ft}_times").reshape(-1, 2)  # (k, 2)
            if level == "shot":
                x = _pool_overlapping(x, times, got.get_array("shot_times").astype(np.float64))
            else:
                x = _covering_rows(x, times, got.get_array("frame_times").astype(np.float64))
        out[ft] = x
    return out


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
