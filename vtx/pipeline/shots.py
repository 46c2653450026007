"""Shot segmentation fed from vtx's own decode pass, and bounded per-shot frame buffers.

PySceneDetect's detector classes are driven frame by frame with exactly the inputs its
``SceneManager`` would give them when running ``scenedetect.detect(path, detector,
backend="pyav")``: BGR frames downscaled to an effective width of 256 px with linear
interpolation, and ``FrameTimecode`` positions built from PTS relative to the stream start. The
cuts are therefore the ones ``scenedetect.detect`` reports, without scenedetect decoding the file
a second time.

The detector's input is built by :class:`DetectorInput`: when the downscale factor is an odd
integer (1280x720, 3840x2160, 768x432), only the pixels OpenCV's ``INTER_LINEAR`` reads are
converted from YUV, with the same pixels as the full-size path (its docstring says how).

A shot is ``[start, end)`` in decode-order frame indices. A video without cuts is one shot.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from fractions import Fraction

import av
import cv2
import numpy as np
from scenedetect import (AdaptiveDetector, ContentDetector, HashDetector, HistogramDetector,
                         ThresholdDetector)
from scenedetect.common import FrameTimecode, Timecode
from scenedetect.scene_manager import compute_downscale_factor

from vtx.errors import UsageError
from vtx.io.decode import RgbConverter

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


class DetectorInput:
    """The downscaled frame PySceneDetect's detectors see, computed exactly and cheaply.

    ``scenedetect.detect`` converts every frame to full-size BGR (FFmpeg's swscale, as PyAV's
    ``to_ndarray``) and shrinks it to ``size`` with OpenCV's ``INTER_LINEAR``. Shrinking by an odd
    integer factor ``f`` on both axes (1280x720 -> 256x144: f = 5), ``INTER_LINEAR`` reads one
    source pixel per output pixel, ``(f*y + f//2, f*x + f//2)``, with weight 1: the output *is*
    those pixels. So only they are converted: their luma samples, each with the chroma sample of
    its own 2x2 block, are written into a small 4:2:2 frame with every luma sample doubled
    across (each pair of it holds one sampled pixel, and the pair's chroma is that pixel's), and
    swscale converts it to RGB at the same size (no scaling; its same-size YUV to RGB converter
    takes chroma per pair in 4:2:2 as per 2x2 block in 4:2:0); the first pixel of each pair of
    the result is the sampled pixel's full-size RGB value. At 1280x720 that converts 8 % as many
    pixels.

    The path is taken for 8-bit 4:2:0 frames (``yuv420p``, ``yuvj420p``) of the stream's size,
    and each video checks it against the full-size path on its frames until three that are not
    flat agreed (or 250 frames did); a disagreement (another FFmpeg build's swscale, say)
    switches the video to the full-size path for good (``exact`` then reads False). Equality on
    real clips and on full-range and BT.709 streams: ``tests/test_shots.py``.

    Args:
        frame_size: coded (width, height) of the stream.
        size: the detector's (width, height), or None when frames are not downscaled.
        rgb: converter for full-size frames (the decode thread's, to share its swscale context).
    """

    CHECKS = 3
    MAX_CHECKED = 250

    def __init__(self, frame_size: tuple[int, int], size: tuple[int, int] | None,
                 rgb: RgbConverter | None = None):
        self.frame_size, self.size = frame_size, size
        self.rgb = rgb or RgbConverter()
        self.step = _odd_step(frame_size, size) if size is not None else None
        self.exact = True  # the sampled path agreed with the full one on every frame checked
        self._checks_left, self._checked = self.CHECKS, 0
        if self.step is not None:
            f, (dw, dh) = self.step, size
            rows, cols = f * np.arange(dh) + f // 2, f * np.arange(dw) + f // 2
            self._chroma = rows // 2, cols // 2  # the 2x2 block of each sampled pixel
            self._small = RgbConverter()  # its own swscale context: another frame size
            self._doubled: dict[str, tuple] = {}  # pixel format -> (frame, its planes)

    def takes_sampled(self, av_frame) -> bool:
        """Whether this frame takes the sampled path (unless a full-size RGB is passed)."""
        return (self.step is not None and self.exact and
                av_frame.format.name in ("yuv420p", "yuvj420p") and
                (av_frame.width, av_frame.height) == self.frame_size)

    def __call__(self, av_frame, rgb: np.ndarray | None = None) -> np.ndarray:
        """The detector's RGB input (h, w, 3) for one decoded frame; ``rgb`` is its full-size
        conversion when the caller has one already."""
        if rgb is None and self.takes_sampled(av_frame):
            small = self._sampled(av_frame)
            if not self._checks_left:
                return small
            full = self._shrink(self.rgb(av_frame))
            if not np.array_equal(small, full):
                self.exact = False
            elif small.min() != small.max():
                self._checks_left -= 1
            self._checked += 1
            if self._checked >= self.MAX_CHECKED:
                self._checks_left = 0
            return full
        return self._shrink(self.rgb(av_frame) if rgb is None else rgb)

    def _shrink(self, rgb: np.ndarray) -> np.ndarray:
        if self.size is None:
            return rgb
        return cv2.resize(rgb, self.size, interpolation=cv2.INTER_LINEAR)

    def _sampled(self, av_frame) -> np.ndarray:
        f, (dw, dh) = self.step, self.size
        y, u, v = (_plane_array(p) for p in av_frame.planes[:3])
        name = av_frame.format.name
        if name not in self._doubled:  # a (2 dw) x dh 4:2:2 frame, written in place
            frame = av.VideoFrame(2 * dw, dh, _HALF_CHROMA[name])
            self._doubled[name] = frame, [_plane_array(p) for p in frame.planes[:3]]
        small, (y2, u2, v2) = self._doubled[name]
        sampled = y[f // 2::f, f // 2::f][:dh, :dw]
        y2[:, 0::2] = sampled  # every luma sample doubled across: a pair per chroma sample
        y2[:, 1::2] = sampled
        crow, ccol = self._chroma
        u2[...] = u[crow][:, ccol]
        v2[...] = v[crow][:, ccol]
        small.colorspace, small.color_range = av_frame.colorspace, av_frame.color_range
        doubled = self._small(small)  # (dh, 2 dw, 3): keep one pixel of each pair
        # OpenCV's nearest neighbour at exactly 1/2 takes the first pixel of each pair
        return cv2.resize(doubled, (dw, dh), interpolation=cv2.INTER_NEAREST)


_HALF_CHROMA = {"yuv420p": "yuv422p", "yuvj420p": "yuvj422p"}
"""The 4:2:2 format a sampled 4:2:0 frame is converted through (same range, same matrix)."""


def _plane_array(plane) -> np.ndarray:
    """A (height, width) uint8 view of one 8-bit plane of a PyAV frame (no copy; writable when
    the frame's buffer is)."""
    return np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, :plane.width]


def _odd_step(frame_size: tuple[int, int], size: tuple[int, int]) -> int | None:
    """The factor f when ``INTER_LINEAR`` from ``frame_size`` to ``size`` reads exactly the
    pixels ``f*i + f//2`` on both axes (an odd integer f > 1 on both); else None."""
    (w, h), (dw, dh) = frame_size, size
    if w % dw or h % dh or w // dw != h // dh or (w // dw) % 2 == 0 or w // dw < 3:
        return None
    f = w // dw
    for n, m in ((w, dw), (h, dh)):  # OpenCV's source positions: (i + 0.5) * scale - 0.5
        scale = 1.0 / (m / n)
        pos = (np.arange(m) + 0.5) * scale - 0.5
        if np.abs(pos - (f * np.arange(m) + f // 2)).max() > 1e-6:
            return None
    return f


class ShotDetector:
    """Feeds one video's decoded frames to a PySceneDetect detector and reports cuts.

    Args:
        config: detector settings.
        frame_size: coded (width, height) of the stream, as PySceneDetect's backend reports it.
        frame_rate: the stream's guessed frame rate.
        rgb: the decode thread's full-size converter, shared (a new one when None).
    """

    def __init__(self, config: ShotConfig, frame_size: tuple[int, int], frame_rate: Fraction,
                 rgb: RgbConverter | None = None):
        self.detector = make_detector(config)
        self.frame_rate = frame_rate if frame_rate > 0 else Fraction(25)
        factor = compute_downscale_factor(max(frame_size))
        w, h = frame_size
        self.size = ((max(1, round(w / factor)), max(1, round(h / factor)))
                     if factor > 1.0 else None)
        self.input = DetectorInput(frame_size, self.size, rgb)
        # Cuts can name a frame a few frames back; remember enough positions to map them.
        self._recent: deque[tuple[FrameTimecode, int]] = deque(
            maxlen=max(64, 2 * int(self.detector.event_buffer_length) + 8))
        self.max_delay = self._recent.maxlen  # a cut names a frame at most this far back
        self._last: FrameTimecode | None = None

    def wants_rgb(self, av_frame) -> bool:
        """Whether this frame gets converted to full-size RGB for the detector anyway (then the
        caller may as well convert it and pass it to :meth:`push`)."""
        return not self.input.takes_sampled(av_frame)

    def end_of(self, start: int) -> None:
        """The end of the shot starting at ``start``: not known before its cut is found."""
        return None

    def push(self, index: int, pts: int | None, time_base: Fraction, av_frame,
             rgb: np.ndarray | None = None) -> list[int]:
        """Process decoded frame ``index`` (``rgb``: its unrotated full-size RGB, when the
        caller has it); return new cuts as frame indices."""
        if pts is not None:
            position = FrameTimecode(Timecode(pts=pts, time_base=time_base), fps=self.frame_rate)
        else:
            position = FrameTimecode(index, fps=self.frame_rate)
        bgr = cv2.cvtColor(self.input(av_frame, rgb), cv2.COLOR_RGB2BGR)
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

    max_delay = 0  # a cut is reported on its own frame

    def __init__(self, shots: np.ndarray):
        self._starts = set(int(s) for s in shots[1:, 0]) if len(shots) else set()
        self._ends = {int(a): int(b) for a, b in shots} if len(shots) else {}

    def end_of(self, start: int) -> int | None:
        """The end of the stored shot that starts at frame ``start`` (None if none does)."""
        return self._ends.get(start)

    def wants_rgb(self, av_frame) -> bool:
        return False

    def push(self, index: int, pts, time_base, av_frame, rgb=None) -> list[int]:
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
    (:meth:`add_lazy`), and then reduced by ``reduce`` only when a shot samples it, and only for
    the models that sample it (:meth:`get`): which frames a shot samples is known only once the
    shot ends, and any frame can still become a sampled one when it arrives, so reducing on
    arrival reduces every frame for every model. Decoded frames are held up to ``lazy_bytes``.
    Past it, the oldest held frames that some models can no longer sample (``wanted``: a long
    shot's first frames cannot become its centre frame) are reduced for the other models only
    and let go, oldest first; a frame that would still exceed the budget is reduced at once, for
    every model. Which frames are kept, and so sampled, does not depend on how they are held.

    Args:
        capacity: most frames held at once.
        lookback: the most recent frames are never dropped (cuts may be reported late).
        reduce: ``reduce(frame, rgb, keys)``: a decoded frame's model-input arrays by key, for
            ``keys`` or (None) for every model (``rgb`` its RGB array when already at hand, else
            None).
        lazy_bytes: most bytes of decoded frames held unreduced.
        wanted: ``wanted(index, newest, gap)``: the keys that may still sample the held frame
            ``index`` now that frame ``newest`` has arrived (``gap``: the widest spacing of the
            held frames), or None for every key; None (the default): every frame, every key.
    """

    def __init__(self, capacity: int = 300, lookback: int = 64,
                 reduce: Callable[[object, np.ndarray | None], dict] | None = None,
                 lazy_bytes: int = LAZY_BYTES,
                 wanted: Callable[[int, int, int], set[str] | None] | None = None):
        if capacity < 2 * lookback + 2:
            raise ValueError("capacity must exceed twice the lookback")
        self.capacity = capacity
        self.lookback = lookback
        self.reduce = reduce
        self.lazy_bytes = lazy_bytes
        self.wanted = wanted
        self.index: list[int] = []
        self.time: list[float] = []
        self.items: list = []  # reduced arrays (a dict), or a decoded frame not reduced yet
        self.nbytes: list[int] = []  # bytes of each unreduced frame, 0 once reduced
        self.lazy = 0  # bytes of the unreduced frames held
        self.reduced = 0  # frames reduced so far (on arrival or when sampled)
        self.let_go = 0  # held frames reduced for the models still wanting them, then let go
        # Times of every frame of the open shot (8 bytes each) give exact split boundaries.
        self._times: dict[int, float] = {}

    def add(self, index: int, time: float, item: dict[str, np.ndarray]) -> None:
        """Hold a frame already reduced (``item``: its model-input arrays)."""
        self._append(index, time, item, 0)

    def add_lazy(self, index: int, time: float, frame, nbytes: int,
                 rgb: np.ndarray | None = None) -> None:
        """Hold a decoded ``frame`` of ``nbytes`` bytes, to reduce only if a shot samples it;
        reduced at once (from ``rgb`` when given) if it would exceed ``lazy_bytes`` after the
        held frames that fewer models can still sample were let go."""
        if self.lazy + nbytes > self.lazy_bytes and self.wanted is not None:
            self._let_go(index, self.lazy + nbytes - self.lazy_bytes)
        if self.lazy + nbytes > self.lazy_bytes:
            self.reduced += 1
            self._append(index, time, self.reduce(frame, rgb, None), 0)
        else:
            self._append(index, time, (frame, {}), nbytes)

    def get(self, pos: int, keys: set[str] | None = None) -> dict[str, np.ndarray]:
        """The reduced arrays of the frame at buffer position ``pos``: those of ``keys``, or
        (None) all. A frame held as decoded is reduced now, for ``keys`` only, and stays held
        as decoded (so that another key can still be asked for) until :meth:`release`."""
        if not self.nbytes[pos]:
            arrays = self.items[pos]
            if keys is not None and not set(keys) <= arrays.keys():
                raise RuntimeError(f"internal error: frame {self.index[pos]} was let go without "
                                   f"{sorted(set(keys) - arrays.keys())}, which a shot samples")
            return arrays
        arrays = self._reduce_held(pos, keys)
        if keys is None:
            self._release_decoded(pos)
        return arrays

    def _reduce_held(self, pos: int, keys) -> dict[str, np.ndarray]:
        """Reduce the frame held as decoded at ``pos`` for those of ``keys`` (None: every key)
        it has no arrays for yet; its arrays."""
        frame, arrays = self.items[pos]
        missing = None if keys is None else set(keys) - arrays.keys()
        if missing is None or missing:
            if not arrays:
                self.reduced += 1
            arrays.update(self.reduce(frame, None, missing))
        return arrays

    def _release_decoded(self, pos: int) -> None:
        """Keep only the arrays of the frame at ``pos``: its decoded frame goes."""
        self.items[pos] = self.items[pos][1]
        self.lazy -= self.nbytes[pos]
        self.nbytes[pos] = 0

    def _let_go(self, newest: int, need: int) -> None:
        """Free ``need`` bytes of held frames, oldest first, by reducing each for the keys that
        may still sample it (``wanted``) and letting its decoded frame go; stops at the first
        frame every key may still want (the later ones are no less wanted)."""
        gap = max((b - a for a, b in zip(self.index, self.index[1:])), default=1)
        for pos in range(len(self.index)):
            if need <= 0:
                break
            if not self.nbytes[pos]:
                continue
            keys = self.wanted(self.index[pos], newest, gap)
            if keys is None:
                break
            self._reduce_held(pos, keys)
            need -= self.nbytes[pos]
            self._release_decoded(pos)
            self.let_go += 1

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
