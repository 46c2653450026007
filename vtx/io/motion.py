"""Compressed-domain motion: codec motion vectors and motion-compensated residuals.

MM-ViT (``mm-vit.txt``, section 3) and CoViAR (Wu et al., CVPR 2018) use the motion vectors and
residuals a codec already computed. FFmpeg exports them as frame side data when the decoder runs
with ``flags2=+export_mvs``; each vector describes one block of the current frame.

Conventions (also in docs/FORMAT.md):

* A field is ``(2, H/16, W/16)`` on the macroblock grid of the coded frame (rounded up):
  channel 0 is x, channel 1 is y, in pixels.
* Each cell holds FFmpeg's ``motion_x / motion_scale`` and ``motion_y / motion_scale``: the
  offset from the block in the current frame to its source in the past reference frame
  (``src = dst + motion``). **An object moving right by d px/frame therefore reads -d.**
* Only vectors that point to a past reference (``source < 0``) are used, also for B-frames.
* Several blocks in one cell are averaged, weighted by their area; cells without a vector
  (intra blocks, I-frames) are 0.
* Accumulated motion (CoViAR) traces each cell back to the last I-frame:
  ``A_t(p) = m_t(p) + A_ref(p + m_t(p))``, with ``A = 0`` on I-frames; only I and P frames
  become references for later frames.
* The residual is the current RGB frame minus the previous decoded frame displaced by the
  motion field (pixel domain, as CoViAR), in units of 1/255.
"""

from __future__ import annotations

import cv2
import numpy as np

MB = 16  # macroblock size in pixels


def grid_shape(width: int, height: int) -> tuple[int, int]:
    return (height + MB - 1) // MB, (width + MB - 1) // MB


def motion_field(side_data, width: int, height: int) -> np.ndarray:
    """Dense float32 (2, H/16, W/16) field from a frame's ``MOTION_VECTORS`` side data."""
    gh, gw = grid_shape(width, height)
    field = np.zeros((2, gh, gw), np.float32)
    if side_data is None:
        return field
    mv = side_data.to_ndarray()
    mv = mv[mv["source"] < 0]
    if len(mv) == 0:
        return field
    scale = np.maximum(mv["motion_scale"].astype(np.float64), 1.0)
    dx = mv["motion_x"] / scale
    dy = mv["motion_y"] / scale
    area = mv["w"].astype(np.float64) * mv["h"].astype(np.float64)
    cy = np.clip(mv["dst_y"].astype(np.int64) // MB, 0, gh - 1)
    cx = np.clip(mv["dst_x"].astype(np.int64) // MB, 0, gw - 1)
    wsum = np.zeros((gh, gw))
    sx = np.zeros((gh, gw))
    sy = np.zeros((gh, gw))
    np.add.at(wsum, (cy, cx), area)
    np.add.at(sx, (cy, cx), area * dx)
    np.add.at(sy, (cy, cx), area * dy)
    has = wsum > 0
    field[0][has] = sx[has] / wsum[has]
    field[1][has] = sy[has] / wsum[has]
    return field


class MotionAccumulator:
    """Traces motion back to the last I-frame, frame by frame in decode order (CoViAR)."""

    def __init__(self):
        self._ref: np.ndarray | None = None  # accumulated field of the last I/P frame

    def push(self, field: np.ndarray, pict_type: str) -> np.ndarray:
        if pict_type == "I" or self._ref is None or self._ref.shape != field.shape:
            acc = np.zeros_like(field)
        else:
            _, gh, gw = field.shape
            yy, xx = np.mgrid[0:gh, 0:gw]
            # The cell each block came from, in the reference frame (nearest cell).
            sy = np.clip(np.rint(yy + field[1] / MB).astype(int), 0, gh - 1)
            sx = np.clip(np.rint(xx + field[0] / MB).astype(int), 0, gw - 1)
            acc = field + self._ref[:, sy, sx]
        if pict_type in ("I", "P"):
            self._ref = acc
        return acc


def resize_field(field: np.ndarray, size: int) -> np.ndarray:
    """(2, h, w) -> (2, size, size) by area averaging; values stay in pixels."""
    out = [cv2.resize(c, (size, size), interpolation=cv2.INTER_AREA if c.shape[0] >= size
                      else cv2.INTER_LINEAR) for c in field]
    return np.stack(out).astype(np.float32)


def residual(current: np.ndarray, previous: np.ndarray | None, field: np.ndarray,
             size: int) -> np.ndarray:
    """Motion-compensated residual (3, size, size) float32 in [-1, 1].

    Args:
        current: RGB uint8 (H, W, 3) of the frame.
        previous: RGB uint8 of the previous decoded frame (None for the first frame).
        field: the frame's motion field (2, H/16, W/16).
        size: output side length.
    """
    cur = current.astype(np.float32)
    if previous is None or previous.shape != current.shape:
        res = cur / 255.0  # nothing to predict from: the residual is the frame itself
    else:
        h, w = current.shape[:2]
        # Per-pixel source coordinates: every pixel of a macroblock moves with its block.
        mvx = np.repeat(np.repeat(field[0], MB, 0), MB, 1)[:h, :w]
        mvy = np.repeat(np.repeat(field[1], MB, 0), MB, 1)[:h, :w]
        xx, yy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
        predicted = cv2.remap(previous, xx + mvx, yy + mvy, interpolation=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REPLICATE)
        res = (cur - predicted.astype(np.float32)) / 255.0
    small = cv2.resize(res, (size, size), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(small.transpose(2, 0, 1))
