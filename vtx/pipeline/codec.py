"""The codec features: motion vectors and motion-compensated residuals, read from the stream.

MM-ViT (``mm-vit.txt``, section 3) and CoViAR (Wu et al., CVPR 2018) feed a model the
compressed video's own motion vectors and residuals instead of decoding more frames. vtx takes
them from FFmpeg's exported motion vectors (``flags2=+export_mvs``) as each frame is decoded
(:mod:`vtx.io.motion`):

* ``motion``: the frame's motion field on a G x G grid, and ``motion_accumulated``, the same
  motion traced back to the last I-frame (so every frame's field must be read);
* ``residual``: the frame minus the previous decoded frame moved by the field, S x S.

Both are stored for the sampled frames only; :class:`CodecStream` does the per-frame work for
:class:`vtx.pipeline.producer.VideoProducer`.

Both are grids over the frame, so they cover the run's *grid view*, as the ViT patch tokens do
(MM-ViT's cross-modal attention and shared space positions need patch (i, j) and motion cell
(i, j) to show the same place): by default the ViT's centre crop of the display-rotated frame,
with ``--full-frame-grids`` the whole frame. The fields and residuals are computed on the coded
frame (motion vectors live there), averaged over that region of it and rotated for display
(:func:`vtx.io.motion.field_on_grid`); the datasets record the region (``region``, ``rotation``,
``view``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from vtx.features import FeatureSpec
from vtx.io import motion as motion_io

CODEC_OPTIONS = {"flags2": "+export_mvs"}
"""Decoder options that make FFmpeg export each frame's motion vectors."""

PICT_TYPES = {1: "I", 2: "P", 3: "B", 4: "S", 5: "I", 6: "P", 7: "B"}  # FFmpeg AVPictureType

#: Row layout of each codec feature, filled with its row shape (the ``layout`` attr).
LAYOUTS = {
    "motion": "(n_frames, 2 [x, y], {1}, {2}) pixels; src = dst + motion (past reference)",
    "residual": "(n_frames, 3 [RGB], {1}, {2}) in units of 1/255",
}


def pict_type(av_frame) -> str:
    """``I``, ``P``, ``B`` (or ``S``, ``?``) of a decoded frame."""
    return PICT_TYPES.get(int(av_frame.pict_type), "?")


class CodecStream:
    """The codec arrays of one video, frame by frame in decode order.

    Args:
        features: names of the codec features to compute (``motion``, ``residual``).
        width, height: the coded frame size.
        motion_grid: side G of the stored motion fields.
        residual_size: side S of the stored residuals.
        region: ``(x0, y0, x1, y1)`` in coded pixels: what the grids cover [default: the whole
            frame] (:meth:`vtx.pipeline.backbones.FramePrep.region`).
        rotation: the display rotation (degrees counter-clockwise) the grids are turned by.
        legacy: the grids of caches written before grid views (whole coded frame, OpenCV
            resize, unrotated; ``region`` and ``rotation`` ignored), for ``vtx predict`` with a
            head trained on such a cache.
    """

    def __init__(self, features: Iterable[str], width: int, height: int, motion_grid: int = 14,
                 residual_size: int = 56, region: tuple[float, ...] | None = None,
                 rotation: int = 0, legacy: bool = False):
        features = set(features)
        self.motion = "motion" in features
        self.residual = "residual" in features
        self.width, self.height = width, height
        self.motion_grid, self.residual_size = motion_grid, residual_size
        self.region = tuple(region) if region is not None else (0.0, 0.0, width, height)
        self.rotation = rotation
        self.legacy = legacy
        self.accumulator = motion_io.MotionAccumulator() if self.motion else None
        self.previous_rgb: np.ndarray | None = None

    def place(self, region: tuple[float, ...], rotation: int) -> None:
        """Set the region the grids cover and the display rotation (known at the first frame)."""
        self.region, self.rotation = tuple(region), rotation

    def push(self, av_frame, rgb: np.ndarray, pict: str, sampled: bool) -> dict[str, np.ndarray]:
        """Take the next decoded frame; the arrays to store when it is a sampled frame."""
        field = None
        # Accumulated motion needs every frame's field; residuals only the sampled ones'.
        if self.accumulator is not None or (self.residual and sampled):
            field = motion_io.motion_field(av_frame.side_data.get("MOTION_VECTORS"),
                                           self.width, self.height)
        accumulated = self.accumulator.push(field, pict) if self.accumulator is not None else None
        out = {}
        grid = (self.region, self.motion_grid, self.width, self.height, self.rotation)
        if sampled and self.motion:
            if self.legacy:
                out["motion"] = motion_io.resize_field(field, self.motion_grid)
                out["motion_accumulated"] = motion_io.resize_field(accumulated, self.motion_grid)
            else:
                out["motion"] = motion_io.field_on_grid(field, *grid)
                out["motion_accumulated"] = motion_io.field_on_grid(accumulated, *grid)
        if sampled and self.residual:
            out["residual"] = motion_io.residual(rgb, self.previous_rgb, field,
                                                 self.residual_size, self.region, self.rotation,
                                                 legacy=self.legacy)
        if self.residual:
            self.previous_rgb = rgb
        return out


def codec_attrs(spec: FeatureSpec, sampling: str, gop_normalised: bool,
                sizes: dict | None = None, view: str | None = None) -> dict:
    """Dataset attrs of a codec feature (the counterpart of ``Backbone.attrs``).

    Args:
        spec: a codec feature.
        sampling: the frame sampling rule in words (``FrameSampling.describe()``).
        gop_normalised: the video was re-encoded first (``--gop-normalise``).
        sizes: named row sizes (``motion_grid``, ``residual_size``).
        view: the grid view (``FramePrep.view``), part of the weights identity.
    """
    shape = spec.shape(spec.datasets[0], sizes)
    return {"model": "codec", "weights": spec.identity(view=view),  # gop: its own attr
            "weights_file": "", "sampling": sampling,
            "level": spec.level, "dim": math.prod(shape),
            "layout": LAYOUTS[spec.name].format(*shape), "gop_normalised": bool(gop_normalised)}
