"""The cache schema: one finished video's arrays -> the datasets and attrs it is stored as.

``docs/FORMAT.md`` is the contract; this module writes it. Every video group holds the shot
table (``shots``, ``shot_times``), the sampled frames when a frame-level feature was extracted
(``frames``, ``frame_times``), and each feature's datasets as the registry lists them
(:attr:`vtx.features.FeatureSpec.datasets`): their row shape, storage dtype (``"feature"`` is the
run's ``--dtype``) and chunking. A feature's row datasets carry the attrs of the model (or codec)
that made them, plus ``dtype`` and ``level``; the datasets that index its rows (audio example
times, frame types) carry a description of their values.

:func:`video_entry` returns what :meth:`vtx.io.cache.CacheWriter.write_video` takes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from vtx.features import DatasetSpec, FeatureSpec

PTS_UNITS = "seconds from the video stream start (PTS)"

#: Attrs of the datasets that index a feature's rows rather than hold them.
INDEX_ATTRS = {
    "frame_types": {"values": "I, P or B"},
    "vggish_times": {"units": "seconds from the video stream start; each row is one 0.96 s "
                              "example [start, end)"},
}


@dataclass(frozen=True)
class RunSchema:
    """The run-wide settings a video's datasets record.

    Attributes:
        dtype: storage dtype of ``"feature"`` datasets (``--dtype``).
        shot_config: ``ShotConfig.to_json()``.
        frame_sampling: the frame sampling rule in words (``FrameSampling.describe()``).
        frame_config: ``FrameSampling.to_json()``.
        sizes: named row sizes (``motion_grid``, ``residual_size``) for empty datasets.
    """

    dtype: str = "float16"
    shot_config: str = "{}"
    frame_sampling: str = ""
    frame_config: str = ""
    sizes: dict = field(default_factory=dict)

    def shot_attrs(self) -> dict:
        d = json.loads(self.shot_config)
        return {"description": "[first frame, one past last frame] in decode order",
                "detector": d["detector"], "threshold": d["threshold"],
                "min_shot_len": d["min_shot_len"],
                "max_shot_len": d["max_shot_len"] if d["max_shot_len"] is not None else 0.0}

    def frame_attrs(self) -> dict:
        return {"description": "decode-order frame indices", "sampling": self.frame_sampling,
                "config": self.frame_config}


def video_entry(attrs: dict, arrays: Mapping[str, np.ndarray], specs: Sequence[FeatureSpec],
                feature_attrs: Mapping[str, dict], run: RunSchema, *, shots: bool = True,
                frames: bool = True) -> tuple[dict, dict[str, tuple]]:
    """The group attrs and datasets of one finished video.

    Args:
        attrs: the video's attrs (``VideoInfo.attrs()``, path, decode errors).
        arrays: dataset name -> array: ``shots``, ``shot_times``, ``frames``, ``frame_times``
            and the features' datasets; a feature dataset with no rows may be missing.
        specs: the features to store (only these: a resumed video keeps the rest).
        feature_attrs: feature name -> the attrs of its model or codec (``Backbone.attrs``).
        run: the run's settings.
        shots: store the shot table (False when it was reused from the cache).
        frames: store the sampled frames, when ``arrays`` has them (False when reused).

    Returns:
        ``(group attrs, {name: (array, attrs, rows per chunk)})`` for ``CacheWriter.write_video``.
    """
    datasets: dict[str, tuple] = {}
    if shots:
        datasets["shots"] = (arrays["shots"], run.shot_attrs(), None)
        datasets["shot_times"] = (arrays["shot_times"], {"units": PTS_UNITS}, None)
    if frames and "frames" in arrays:
        datasets["frames"] = (arrays["frames"], run.frame_attrs(), None)
        datasets["frame_times"] = (arrays["frame_times"], {"units": PTS_UNITS}, None)
    attrs = dict(attrs)
    for spec in specs:
        for d in spec.datasets:
            datasets[d.name] = _dataset(spec, d, arrays.get(d.name), feature_attrs[spec.name],
                                        run)
        if spec.level == "audio":  # a video with an audio stream too short for one example
            rows = len(datasets[spec.datasets[0].name][0])
            attrs["has_audio"] = bool(attrs.get("has_audio")) and rows > 0
    return attrs, datasets


def _dataset(spec: FeatureSpec, d: DatasetSpec, data: np.ndarray | None, attrs: dict,
             run: RunSchema) -> tuple[np.ndarray, dict, int | None]:
    store = np.dtype(run.dtype if d.dtype == "feature" else d.dtype)
    shape = spec.shape(d, run.sizes)
    if data is None:
        data = np.zeros((0,) + shape, store)
    if d.name in INDEX_ATTRS:
        return np.asarray(data).reshape((-1,) + shape).astype(store), INDEX_ATTRS[d.name], \
            d.chunk_rows
    return (np.asarray(data).astype(store),
            {**attrs, "dtype": store.name, "level": spec.level}, d.chunk_rows)
