"""Frame sampling for frame-level features, decided frame by frame during the one decode pass.

One sampling is shared by every frame-level dataset of a video (``vit``, ``vit_patches``,
``motion``, ``residual``); it is stored once as ``frames`` (decode indices) and ``frame_times``.

* ``frame_rate=R``: R frames per second by PTS: the first frame at or after each multiple of 1/R
  seconds (from the stream start). Default 1.0.
* ``frames_per_video=N``: N frames uniformly over the whole video (VTN's full-video inference
  uses N = 250): the first frame at or after ``(k + 0.5) * D / N`` for k = 0..N-1, with D the
  duration the container declares. A frame is never taken twice, so a video with fewer frames
  than N (or gaps in PTS) yields fewer samples.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np

from vtx.errors import UsageError

EPS = 1e-6


@dataclass(frozen=True)
class FrameSampling:
    frame_rate: float | None = 1.0
    frames_per_video: int | None = None

    def __post_init__(self):
        if self.frames_per_video is not None:
            if self.frames_per_video < 1:
                raise UsageError("--frames-per-video must be at least 1")
            object.__setattr__(self, "frame_rate", None)
        elif self.frame_rate is None or not self.frame_rate > 0:
            raise UsageError("--frame-rate must be a positive number of frames per second")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def describe(self) -> str:
        if self.frames_per_video is not None:
            return f"{self.frames_per_video} frames uniformly over the video"
        return f"{self.frame_rate:g} frames per second by PTS"


class FrameSampler:
    """Says, for each decoded frame in order, whether it is sampled."""

    def __init__(self, sampling: FrameSampling, expected_duration: float):
        self.sampling = sampling
        if sampling.frames_per_video is not None:
            n = sampling.frames_per_video
            d = max(expected_duration, 0.0)
            self._targets = [(k + 0.5) * d / n for k in range(n)] if d > 0 else [0.0] * n
        else:
            self._targets = None
        self._next = 0.0
        self._k = 0

    def take(self, index: int, time: float) -> bool:
        if self._targets is None:
            if time + EPS < self._next:
                return False
            rate = self.sampling.frame_rate
            self._next = (math.floor(time * rate + EPS) + 1) / rate
            return True
        if self._k >= len(self._targets) or time + EPS < self._targets[self._k]:
            return False
        while self._k < len(self._targets) and self._targets[self._k] <= time + EPS:
            self._k += 1
        return True


class KnownFrames:
    """Replays stored ``frames`` (resume), with :class:`FrameSampler`'s interface."""

    def __init__(self, frames: np.ndarray):
        self._frames = set(int(i) for i in frames)

    def take(self, index: int, time: float) -> bool:
        return index in self._frames
