"""Shot segmentation fed from vtx's own decode pass, and bounded per-shot frame buffers.

PySceneDetect's detector classes are driven frame by frame with exactly the inputs its
``SceneManager`` would give them when running ``scenedetect.detect(path, detector,
backend="pyav")``: BGR frames downscaled to an effective width of 256 px with linear
interpolation, and ``FrameTimecode`` positions built from PTS relative to the stream start. The
cuts are therefore the ones ``scenedetect.detect`` reports, without scenedetect decoding the file
a second time.

A shot is ``[start, end)`` in decode-order frame indices. A video without cuts is one shot.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from fractions import Fraction

import cv2
import numpy as np
from scenedetect import (AdaptiveDetector, ContentDetector, HashDetector, HistogramDetector,
                         ThresholdDetector)
from scenedetect.common import FrameTimecode, Timecode
from scenedetect.scene_manager import compute_downscale_factor

from vtx.errors import UsageError

DETECTORS = {
    "content": (ContentDetector, "threshold", 27.0),
    "adaptive": (AdaptiveDetector, "adaptive_threshold", 3.0),
    "threshold": (ThresholdDetector, "threshold", 12.0),
    "histogram": (HistogramDetector, "threshold", 0.05),
    "hash": (HashDetector, "threshold", 0.395),
}
"""name -> (PySceneDetect class, name of its threshold argument, vtx's default threshold)."""


@dataclass(frozen=True)
class ShotConfig:
    """How videos are cut into shots.

    Attributes:
        detector: a key of :data:`DETECTORS`.
        threshold: the detector's threshold; None takes the default of :data:`DETECTORS`.
        min_shot_len: minimum shot length: frames (``"15"``) or time (``"0.6s"``), as
            PySceneDetect's ``min_scene_len``.
        max_shot_len: split shots longer than this many seconds into equal parts; None = off.
    """

    detector: str = "content"
    threshold: float | None = None
    min_shot_len: str = "15"
    max_shot_len: float | None = None

    def __post_init__(self):
        if self.detector not in DETECTORS:
            raise UsageError(f"unknown --detector {self.detector!r}; "
                             f"valid: {', '.join(DETECTORS)}")
        if self.max_shot_len is not None and not self.max_shot_len > 0:
            raise UsageError("--max-shot-len must be a positive number of seconds")
        _min_scene_len(self.min_shot_len)

    def to_json(self) -> str:
        d = asdict(self)
        if d["threshold"] is None:
            d["threshold"] = DETECTORS[self.detector][2]
        return json.dumps(d, sort_keys=True)


def _min_scene_len(value: str) -> int | str:
    v = str(value).strip()
    if v.isdigit():
        return int(v)
    try:
        FrameTimecode(v, fps=100.0)
    except (ValueError, TypeError) as e:
        raise UsageError(f"--min-shot-len {value!r}: use frames (15) or seconds (0.6s)") from e
    return v


def make_detector(config: ShotConfig):
    cls, arg, default = DETECTORS[config.detector]
    threshold = default if config.threshold is None else config.threshold
    return cls(**{arg: threshold, "min_scene_len": _min_scene_len(config.min_shot_len)})


class ShotDetector:
    """Feeds one video's decoded frames to a PySceneDetect detector and reports cuts.

    Args:
        config: detector settings.
        frame_size: coded (width, height) of the stream, as PySceneDetect's backend reports it.
        frame_rate: the stream's guessed frame rate.
    """

    def __init__(self, config: ShotConfig, frame_size: tuple[int, int], frame_rate: Fraction):
        self.detector = make_detector(config)
        self.frame_rate = frame_rate if frame_rate > 0 else Fraction(25)
        factor = compute_downscale_factor(max(frame_size))
        w, h = frame_size
        self.size = ((max(1, round(w / factor)), max(1, round(h / factor)))
                     if factor > 1.0 else None)
        # Cuts can name a frame a few frames back; remember enough positions to map them.
        self._recent: deque[tuple[FrameTimecode, int]] = deque(
            maxlen=max(64, 2 * int(self.detector.event_buffer_length) + 8))
        self._last: FrameTimecode | None = None

    def push(self, index: int, pts: int | None, time_base: Fraction, rgb: np.ndarray) -> list[int]:
        """Process decoded frame ``index`` (unrotated RGB); return new cuts as frame indices."""
        if pts is not None:
            position = FrameTimecode(Timecode(pts=pts, time_base=time_base), fps=self.frame_rate)
        else:
            position = FrameTimecode(index, fps=self.frame_rate)
        small = rgb if self.size is None else cv2.resize(rgb, self.size,
                                                         interpolation=cv2.INTER_LINEAR)
        bgr = cv2.cvtColor(small, cv2.COLOR_RGB2BGR)
        self._recent.append((position, index))
        self._last = position
        return self._to_indices(self.detector.process_frame(position, bgr))

    def finish(self) -> list[int]:
        if self._last is None:
            return []
        return self._to_indices(self.detector.post_process(self._last))

    def _to_indices(self, cuts) -> list[int]:
        out = []
        for cut in cuts:
            for position, index in reversed(self._recent):
                if position == cut:
                    out.append(index)
                    break
            else:  # older than our window: fall back to the nearest remembered frame
                out.append(self._recent[0][1])
        return out


class KnownShots:
    """Replays shots already stored in the cache (resume), with ShotDetector's interface."""

    def __init__(self, shots: np.ndarray):
        self._starts = set(int(s) for s in shots[1:, 0]) if len(shots) else set()

    def push(self, index: int, pts, time_base, rgb) -> list[int]:
        return [index] if index in self._starts else []

    def finish(self) -> list[int]:
        return []


def split_shot(start: int, end: int, start_time: float, end_time: float,
               max_len: float | None) -> list[tuple[int, int]]:
    """Split [start, end) into equal parts of at most ``max_len`` seconds (by frame count)."""
    n = end - start
    if max_len is None or end_time - start_time <= max_len or n < 2:
        return [(start, end)]
    parts = min(n, math.ceil((end_time - start_time) / max_len))
    bounds = [start + round(j * n / parts) for j in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


LAZY_BYTES = 256 << 20
"""Most bytes of decoded frames a :class:`ShotBuffer` holds unreduced (per decode thread)."""


class ShotBuffer:
    """Frames of the current shot, for the model inputs its sampled frames give, in bounded
    memory.

    Every frame is kept while the shot is short. Beyond ``capacity`` frames, every other frame
    older than ``lookback`` frames is dropped (the kept frames stay evenly spaced), so memory
    never exceeds ``capacity`` frames whatever the shot's length. Sampling then takes the nearest
    kept frame: exact for shots of up to ``capacity`` frames, and off by at most half the
    current spacing beyond that.

    A frame is held either reduced (:meth:`add`: a dict of model-input arrays) or as decoded
    (:meth:`add_lazy`), and then reduced by ``reduce`` only when a shot samples it
    (:meth:`get`): which frames a shot samples is known only once the shot ends, and any frame
    can still become a sampled one when it arrives, so reducing on arrival reduces every frame.
    Decoded frames are held up to ``lazy_bytes``; a frame that would exceed it is reduced at
    once. Which frames are kept, and so sampled, does not depend on how they are held.

    Args:
        capacity: most frames held at once.
        lookback: the most recent frames are never dropped (cuts may be reported late).
        reduce: ``reduce(frame, rgb)``: a decoded frame's model-input arrays (``rgb`` its
            RGB array when already at hand, else None).
        lazy_bytes: most bytes of decoded frames held unreduced.
    """

    def __init__(self, capacity: int = 300, lookback: int = 64,
                 reduce: Callable[[object, np.ndarray | None], dict] | None = None,
                 lazy_bytes: int = LAZY_BYTES):
        if capacity < 2 * lookback + 2:
            raise ValueError("capacity must exceed twice the lookback")
        self.capacity = capacity
        self.lookback = lookback
        self.reduce = reduce
        self.lazy_bytes = lazy_bytes
        self.index: list[int] = []
        self.time: list[float] = []
        self.items: list = []  # reduced arrays (a dict), or a decoded frame not reduced yet
        self.nbytes: list[int] = []  # bytes of each unreduced frame, 0 once reduced
        self.lazy = 0  # bytes of the unreduced frames held
        self.reduced = 0  # frames reduced so far (on arrival or when sampled)
        # Times of every frame of the open shot (8 bytes each) give exact split boundaries.
        self._times: dict[int, float] = {}

    def add(self, index: int, time: float, item: dict[str, np.ndarray]) -> None:
        """Hold a frame already reduced (``item``: its model-input arrays)."""
        self._append(index, time, item, 0)

    def add_lazy(self, index: int, time: float, frame, nbytes: int,
                 rgb: np.ndarray | None = None) -> None:
        """Hold a decoded ``frame`` of ``nbytes`` bytes, to reduce only if a shot samples it;
        reduced at once (from ``rgb`` when given) if it would exceed ``lazy_bytes``."""
        if self.lazy + nbytes > self.lazy_bytes:
            self.reduced += 1
            self._append(index, time, self.reduce(frame, rgb), 0)
        else:
            self._append(index, time, frame, nbytes)

    def get(self, pos: int) -> dict[str, np.ndarray]:
        """The reduced arrays of the frame at buffer position ``pos`` (reducing it now if it
        was held as decoded)."""
        if self.nbytes[pos]:
            self.items[pos] = self.reduce(self.items[pos], None)
            self.lazy -= self.nbytes[pos]
            self.nbytes[pos] = 0
            self.reduced += 1
        return self.items[pos]

    def _append(self, index: int, time: float, item, nbytes: int) -> None:
        self.index.append(index)
        self.time.append(time)
        self.items.append(item)
        self.nbytes.append(nbytes)
        self.lazy += nbytes
        self._times[index] = time
        if len(self.index) > self.capacity:
            self._decimate()

    def _decimate(self) -> None:
        newest = self.index[-1]
        n_old = sum(1 for i in self.index if i < newest - self.lookback)
        keep = list(range(0, n_old, 2)) + list(range(n_old, len(self.index)))
        self.index = [self.index[k] for k in keep]
        self.time = [self.time[k] for k in keep]
        self.items = [self.items[k] for k in keep]
        self.nbytes = [self.nbytes[k] for k in keep]
        self.lazy = sum(self.nbytes)

    def time_of(self, index: int) -> float:
        return self._times[index]

    def nearest(self, targets: np.ndarray, upto: int) -> list[int]:
        """Positions in the buffer of the kept frames nearest to ``targets`` (indices < upto)."""
        idx = np.asarray([i for i in self.index if i < upto])
        pos = np.searchsorted(idx, targets)
        pos = np.clip(pos, 0, len(idx) - 1)
        left = np.clip(pos - 1, 0, len(idx) - 1)
        better_left = np.abs(idx[left] - targets) <= np.abs(idx[pos] - targets)
        return np.where(better_left, left, pos).tolist()

    def release(self, upto: int) -> None:
        """Drop frames before ``upto`` (the next shot's first frame)."""
        k = 0
        while k < len(self.index) and self.index[k] < upto:
            k += 1
        del self.index[:k], self.time[:k], self.items[:k], self.nbytes[:k]
        self.lazy = sum(self.nbytes)
        for i in [i for i in self._times if i < upto]:
            del self._times[i]
