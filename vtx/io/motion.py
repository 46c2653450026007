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
* Both are computed on the coded frame, then reduced to the stored grid over a *region* of it
  (:func:`region_average`: exact area averages of the cells or pixels over a box in coded
  pixels, such as the ViT's centre crop) and turned to the display orientation
  (:func:`rotate_grid`; the x/y components of the vectors turn with it, values stay in pixels).
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
    """(2, h, w) -> (2, size, size) over the whole coded frame, unrotated: the grids of caches
    written before grid views (``legacy``), kept so their checkpoints predict as trained."""
    out = [cv2.resize(c, (size, size), interpolation=cv2.INTER_AREA if c.shape[0] >= size
                      else cv2.INTER_LINEAR) for c in field]
    return np.stack(out).astype(np.float32)


def area_weights(n: int, lo: float, hi: float, size: int, cell: int = 1) -> np.ndarray:
    """Averaging weights ``(size, ceil(n / cell))`` along one axis.

    The axis is ``n`` pixels long, cut into input cells of ``cell`` pixels (the last one ends at
    ``n``). Output cell ``j`` covers ``[lo + j s, lo + (j + 1) s)`` with ``s = (hi - lo) / size``;
    its row holds the share of that span each input cell covers, so it sums to 1 (an exact
    area average, whether the output cells are larger or smaller than the input ones).
    """
    edges = np.minimum(np.arange(-(-n // cell) + 1) * cell, n).astype(np.float64)  # (m + 1,)
    step = (hi - lo) / size
    a = lo + step * np.arange(size)  # (size,) output cell starts
    overlap = np.clip(np.minimum(a[:, None] + step, edges[None, 1:])
                      - np.maximum(a[:, None], edges[None, :-1]), 0.0, None)  # (size, m)
    total = overlap.sum(axis=1, keepdims=True)
    return overlap / np.where(total > 0, total, 1.0)


def region_average(grid: np.ndarray, box, size: int, width: int, height: int,
                   cell: int = 1) -> np.ndarray:
    """``(C, h, w)`` values on cells of ``cell`` pixels of a ``width`` x ``height`` frame ->
    ``(C, size, size)`` area averages over ``box`` = ``(x0, y0, x1, y1)`` in pixels."""
    x0, y0, x1, y1 = box
    wy = area_weights(height, y0, y1, size, cell).astype(np.float32)  # (size, h)
    wx = area_weights(width, x0, x1, size, cell).astype(np.float32)  # (size, w)
    return np.einsum("ij,cjk,lk->cil", wy, grid.astype(np.float32), wx).astype(np.float32)


def rotate_grid(grid: np.ndarray, rotation: int, vectors: bool = False) -> np.ndarray:
    """A ``(C, h, w)`` grid in coded orientation -> display orientation (``numpy.rot90`` by
    ``rotation`` degrees counter-clockwise, as frames are displayed). With ``vectors`` the grid
    is a ``(2, h, w)`` field of (x, y) displacements, which turn with it."""
    k = int(round(rotation / 90.0)) % 4
    if not k:
        return grid
    out = np.rot90(grid, k=k, axes=(1, 2))
    if vectors:  # display (x, y) = coded (y, -x), (-x, -y), (-y, x) for k = 1, 2, 3
        x, y = out[0], out[1]
        out = np.stack({1: (y, -x), 2: (-x, -y), 3: (-y, x)}[k])
    return np.ascontiguousarray(out, dtype=np.float32)


def field_on_grid(field: np.ndarray, box, size: int, width: int, height: int,
                  rotation: int = 0) -> np.ndarray:
    """A macroblock field ``(2, H/16, W/16)`` -> ``(2, size, size)`` over ``box`` (coded pixels),
    in display orientation; values stay in pixels."""
    return rotate_grid(region_average(field, box, size, width, height, cell=MB), rotation,
                       vectors=True)


def residual(current: np.ndarray, previous: np.ndarray | None, field: np.ndarray,
             size: int, box=None, rotation: int = 0, legacy: bool = False) -> np.ndarray:
    """Motion-compensated residual (3, size, size) float32 in [-1, 1].

    Args:
        current: RGB uint8 (H, W, 3) of the frame.
        previous: RGB uint8 of the previous decoded frame (None for the first frame).
        field: the frame's motion field (2, H/16, W/16).
        size: output side length.
        box: ``(x0, y0, x1, y1)``: the region of the coded frame to keep [default: all of it].
        rotation: display rotation applied to the output.
        legacy: the whole frame resized by OpenCV, unrotated (caches before grid views).
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
    if legacy:
        small = cv2.resize(res, (size, size), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(small.transpose(2, 0, 1))
    h, w = current.shape[:2]
    x0, y0, x1, y1 = box if box is not None else (0.0, 0.0, float(w), float(h))
    r0, c0 = int(np.floor(y0)), int(np.floor(x0))  # only the pixels the box touches
    r1, c1 = min(h, int(np.ceil(y1))), min(w, int(np.ceil(x1)))
    crop = res[r0:r1, c0:c1].transpose(2, 0, 1)  # (3, rows, cols)
    small = region_average(crop, (x0 - c0, y0 - r0, x1 - c0, y1 - r0), size, c1 - c0, r1 - r0)
    return rotate_grid(small, rotation)
