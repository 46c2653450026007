"""Small synthetic videos with known ground truth, written with PyAV.

The test-suite uses these files to check shot detection (PySceneDetect's
``ContentDetector``, Castellano, *PySceneDetect* docs, "Detection Algorithms:
content-aware"), frame sampling, motion vectors, audio features and the
handling of bad input; ``vtx demo`` uses them to build a labelled "trailer"
data set. Everything is deterministic given ``seed``: the same arguments
give byte-identical files (libx264 runs single-threaded for that reason).

A video is a list of :class:`Shot`. Each shot shows one of
:data:`N_SCENES` static scene backgrounds (a textured pattern whose hue,
saturation, brightness *and* texture differ strongly from every other scene,
so a hard cut scores well above ContentDetector's default threshold of 27)
and a textured rectangle that moves by exactly ``Shot.motion`` pixels per
frame. Inside a shot only the rectangle changes, so consecutive frames score
far below the threshold.

Object position (ground truth for motion tests), with ``t`` the frame's index
within its shot on the constant-frame-rate timeline (dropped VFR frames keep
their ``t``)::

    top_left(t) = start + t * motion
    start = ((W - w) / 2 - motion_x * (n - 1) / 2,
             (H - h) / 2 - motion_y * (n - 1) / 2)

where ``(W, H)`` is the frame size, ``(w, h)`` the rectangle size
(:func:`object_size`) and ``n`` the shot's ``n_frames``: the trajectory is
centred on the frame, so a fast object may leave it at the ends of a long
shot. Sub-pixel positions are rendered by bilinear resampling of a smooth
texture (OpenCV ``warpAffine``, 1/32 px precision), so the displacement is a
true sub-pixel translation.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

N_SCENES = 8
"""Number of distinct scene looks; scene ids are taken modulo this."""

# (hue in OpenCV units 0-179, saturation, value, texture name). Chosen so that
# every pair of scenes differs by > 40 in ContentDetector's mean HSV distance.
_SCENES = (
    (0, 235, 215, "hstripes"),
    (115, 90, 70, "checker"),
    (60, 245, 130, "vstripes"),
    (150, 70, 235, "diagonal"),
    (25, 160, 45, "dots"),
    (95, 230, 230, "checker"),
    (170, 150, 120, "vstripes"),
    (40, 40, 160, "hstripes"),
)

_AUDIO_AMPLITUDE = 0.3
_LAYOUTS = {1: "mono", 2: "stereo"}


@dataclass
class Shot:
    """One shot of a synthetic video.

    Attributes:
        n_frames: Frames in the shot on the constant-frame-rate timeline (before
            any VFR drops).
        scene: Which scene background to show (taken modulo :data:`N_SCENES`).
            Consecutive shots with different ids (mod ``N_SCENES``) are hard cuts.
        motion: Displacement ``(dx, dy)`` of the moving rectangle in pixels per
            frame; integer or sub-pixel.
        tone_hz: Frequency of a sine tone played during the shot when the video
            has audio; ``None`` is silence.
    """

    n_frames: int
    scene: int = 0
    motion: tuple[float, float] = (0.0, 0.0)
    tone_hz: float | None = None


def object_size(size: tuple[int, int]) -> tuple[int, int]:
    """Size ``(w, h)`` of the moving rectangle in a frame of ``size`` ``(W, H)``."""
    width, height = size
    return max(4, round(width * 0.25)), max(4, round(height * 0.3))


def object_start(shot: Shot, size: tuple[int, int]) -> tuple[float, float]:
    """Top-left position of the rectangle in the shot's first frame (see module doc)."""
    width, height = size
    obj_w, obj_h = object_size(size)
    mx, my = shot.motion
    return (
        (width - obj_w) / 2 - mx * (shot.n_frames - 1) / 2,
        (height - obj_h) / 2 - my * (shot.n_frames - 1) / 2,
    )


def _texture(name: str, size: tuple[int, int]) -> np.ndarray:
    """A {-1, +1} pattern of shape (H, W)."""
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    period = 8
    if name == "hstripes":
        on = (yy // (period // 2)) % 2 == 0
    elif name == "vstripes":
        on = (xx // (period // 2)) % 2 == 0
    elif name == "checker":
        on = ((xx // period) + (yy // period)) % 2 == 0
    elif name == "diagonal":
        on = ((xx + yy) // (period // 2)) % 2 == 0
    elif name == "dots":
        on = ((xx % period) < 3) & ((yy % period) < 3)
    else:
        raise ValueError(f"unknown texture {name!r}")
    return np.where(on, 1.0, -1.0)


def scene_background(scene: int, size: tuple[int, int], *, seed: int = 0) -> np.ndarray:
    """RGB background (H, W, 3) uint8 of a scene.

    Args:
        scene: Scene id, taken modulo :data:`N_SCENES`.
        size: Frame size ``(W, H)``.
        seed: Seeds a faint static grain on top of the pattern.
    """
    hue, sat, val, texture = _SCENES[scene % N_SCENES]
    pattern = _texture(texture, size)  # (H, W)
    rng = np.random.default_rng([seed, scene % N_SCENES])
    grain = rng.normal(0.0, 3.0, pattern.shape)
    hsv = np.stack(
        [
            np.full(pattern.shape, float(hue)),
            np.clip(sat - 15 * pattern, 0, 255),
            np.clip(val + 25 * pattern + grain, 0, 255),
        ],
        axis=-1,
    )  # (H, W, 3)
    hsv = np.round(hsv).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def object_sprite(size: tuple[int, int], seed: int) -> np.ndarray:
    """The moving rectangle: RGBA float32 (h + 2, w + 2, 4), a 1 px transparent border.

    RGB is a smooth random texture in [30, 230] (blurred so that bilinear resampling
    is a faithful sub-pixel translation); alpha is 1 inside the rectangle and 0 on
    the border, which gives anti-aliased sub-pixel edges.

    Args:
        size: Frame size ``(W, H)``; the rectangle is :func:`object_size` of it.
        seed: Seeds the texture.
    """
    obj_w, obj_h = object_size(size)
    rng = np.random.default_rng([seed, 1_000_003])
    noise = rng.random((obj_h, obj_w, 3)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), sigmaX=1.5)
    lo, hi = smooth.min(), smooth.max()
    smooth = (smooth - lo) / max(hi - lo, 1e-6)
    rgb = 30.0 + 200.0 * smooth  # (h, w, 3)
    sprite = np.zeros((obj_h + 2, obj_w + 2, 4), np.float32)
    sprite[1:-1, 1:-1, :3] = rgb
    sprite[1:-1, 1:-1, 3] = 1.0
    return sprite


def render_frame(
    background: np.ndarray, sprite: np.ndarray, top_left: tuple[float, float]
) -> np.ndarray:
    """Composite the sprite with its top-left interior pixel at ``top_left`` (x, y)."""
    height, width = background.shape[:2]
    x, y = top_left
    matrix = np.float32([[1, 0, x - 1], [0, 1, y - 1]])  # sprite has a 1 px border
    warped = cv2.warpAffine(
        sprite, matrix, (width, height), flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT, borderValue=0,
    )  # (H, W, 4)
    alpha = warped[..., 3:4]
    out = background.astype(np.float32) * (1.0 - alpha) + warped[..., :3]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _time_base(fps: Fraction) -> Fraction:
    """A fine stream time base in which every CFR frame time is an integer."""
    if (Fraction(90000) / fps).denominator == 1:
        return Fraction(1, 90000)
    return Fraction(1, fps.numerator * 1000)


def _check_pix_fmt(pix_fmt: str | None, size: tuple[int, int]) -> str:
    """Pick ``yuv420p`` or, for odd sizes, ``yuv444p``; reject 4:2:0 with odd sizes."""
    width, height = size
    odd = bool(width % 2 or height % 2)
    if pix_fmt is None:
        return "yuv444p" if odd else "yuv420p"
    if odd and ("420" in pix_fmt or pix_fmt in ("nv12", "nv21")):
        raise ValueError(
            f"size {width}x{height} has an odd side, which {pix_fmt} cannot store "
            "(chroma is subsampled 2x2); pass pix_fmt=None or pix_fmt='yuv444p'"
        )
    return pix_fmt


def write_video(
    path: str | os.PathLike,
    shots: list[Shot],
    *,
    size: tuple[int, int] = (160, 96),
    fps: float | Fraction = 25,
    codec: str = "libx264",
    pix_fmt: str | None = None,
    audio: bool = False,
    sample_rate: int = 48000,
    audio_channels: int = 2,
    vfr_drop: set[int] | None = None,
    gop: int | None = None,
    bframes: int | None = None,
    rotation: int | None = None,
    crf: int = 18,
    seed: int = 0,
) -> dict:
    """Write a synthetic video and return its ground truth.

    Args:
        path: Output file; the container follows the extension. ``frame_times`` are
            exact for MP4/MOV (which keep the 1/90000-style stream time base);
            Matroska rounds timestamps to milliseconds.
        shots: The shots, in order. Each one after the first starts with a hard cut
            if its scene differs from the previous shot's (mod ``N_SCENES``); two
            consecutive shots of the same scene are listed in ``cut_frames`` but
            look like one shot.
        size: Frame size ``(width, height)``. Any size works: ``yuv420p`` needs even
            sizes, so with ``pix_fmt=None`` an odd width or height is encoded as
            ``yuv444p`` (libx264 High 4:4:4), which decodes at the exact size.
        fps: Nominal frame rate of the constant-frame-rate timeline.
        codec: Video encoder name.
        pix_fmt: Encoder pixel format; ``None`` picks ``yuv420p`` for even sizes and
            ``yuv444p`` otherwise. An explicit ``yuv420p`` with an odd size raises.
        audio: Add an AAC track with each shot's tone (``Shot.tone_hz``).
        sample_rate: Audio sample rate.
        audio_channels: 1 (mono) or 2 (stereo); every channel carries the same tone.
        vfr_drop: Indices into the CFR timeline (``0 .. sum(n_frames) - 1``) of frames
            not written. The remaining frames keep their CFR timestamps, so their
            PTS deltas are uneven (variable frame rate). A shot may not lose all its
            frames.
        gop: Encoder GOP size (option ``g``); ``None`` keeps the encoder default.
        bframes: Maximum consecutive B-frames (option ``bf``); 0 gives a stream of
            I- and P-frames only. ``None`` keeps the encoder default.
        rotation: Counter-clockwise display rotation in degrees, written with PyAV's
            ``VideoStream.set_display_rotation`` as display-matrix side data (the
            ``tkhd`` matrix in MP4). PyAV reports it on decode as
            ``VideoFrame.rotation``, normalised to [-180, 180): 90 reads back as 90,
            180 as -180, 270 as -90. The pixels themselves are not rotated.
        crf: libx264 constant rate factor (ignored by other encoders).
        seed: Seeds the scene grain and the moving rectangle's texture.

    Returns:
        Ground truth: ``n_frames`` (frames written = frames decoded), ``cut_frames``
        (output-order indices of the first written frame of every shot after the
        first), ``cut_times`` (their PTS in seconds), ``frame_times`` (PTS in seconds
        of every written frame; if frame 0 is dropped they start above 0, and tools
        that rebase on the stream's ``start_time``, such as PySceneDetect, report
        times minus ``frame_times[0]``), ``size``, ``fps`` (``Fraction``), ``pix_fmt``,
        ``time_base`` (video stream time base, ``Fraction``), ``rotation``, and
        ``shots``: per shot a dict with ``scene``, ``first_frame`` (output index),
        ``start_time``/``end_time`` (CFR seconds), ``object_start`` ``(x, y)``,
        ``object_size`` ``(w, h)`` and ``motion``.

    Raises:
        ValueError: Empty or invalid shots, ``vfr_drop`` outside the timeline or
            dropping a whole shot, or an odd size with a 4:2:0 pixel format.
    """
    if not shots:
        raise ValueError("write_video needs at least one Shot")
    if any(s.n_frames < 1 for s in shots):
        raise ValueError("every Shot needs n_frames >= 1")
    width, height = size
    fps = Fraction(fps).limit_denominator(1_000_000)
    pix_fmt = _check_pix_fmt(pix_fmt, size)
    drop = set(vfr_drop or ())
    total = sum(s.n_frames for s in shots)
    if any(not 0 <= i < total for i in drop):
        raise ValueError(f"vfr_drop indices must lie in 0..{total - 1} (the CFR timeline)")
    time_base = _time_base(fps)
    ticks_per_frame = Fraction(1) / fps / time_base

    # Plan the timeline: which CFR frames are written, and where each shot starts.
    shot_info = []
    first_cfr = 0
    kept = 0
    frame_pts: list[int] = []
    for shot in shots:
        cfr = range(first_cfr, first_cfr + shot.n_frames)
        kept_here = [i for i in cfr if i not in drop]
        if not kept_here:
            raise ValueError(
                f"vfr_drop removes every frame of the shot starting at CFR frame {first_cfr}; "
                "keep at least one"
            )
        shot_info.append(
            {
                "scene": shot.scene,
                "first_frame": kept,
                "start_time": float(first_cfr / fps),
                "end_time": float((first_cfr + shot.n_frames) / fps),
                "object_start": object_start(shot, size),
                "object_size": object_size(size),
                "motion": tuple(shot.motion),
            }
        )
        frame_pts.extend(round(i * ticks_per_frame) for i in kept_here)
        kept += len(kept_here)
        first_cfr += shot.n_frames

    container = av.open(str(path), mode="w")
    try:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = pix_fmt
        stream.time_base = time_base
        # The encoder counts CFR frames (dropped ones leave gaps), which every codec
        # accepts; the muxer rescales packets to the fine stream time base.
        stream.codec_context.time_base = 1 / fps
        options = {}
        if codec == "libx264":
            options.update({"crf": str(crf), "preset": "veryfast", "threads": "1"})
        if gop is not None:
            options["g"] = str(gop)
        if bframes is not None:
            options["bf"] = str(bframes)
        stream.options = options
        if rotation is not None:
            stream.set_display_rotation(rotation)

        astream = _add_aac_stream(container, sample_rate, audio_channels) if audio else None
        tone = _ToneTrack(shots, fps, sample_rate, audio_channels) if audio else None

        sprite = object_sprite(size, seed)
        cfr_index = 0
        for shot, info in zip(shots, shot_info):
            background = scene_background(shot.scene, size, seed=seed)
            x0, y0 = info["object_start"]
            mx, my = shot.motion
            for t in range(shot.n_frames):
                index = cfr_index + t
                if index in drop:
                    continue
                if astream is not None:
                    _mux_all(container, astream, tone.frames_until(index / fps))
                rgb = render_frame(background, sprite, (x0 + t * mx, y0 + t * my))
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                frame.pts = index
                frame.time_base = 1 / fps
                _mux_all(container, stream, [frame])
            cfr_index += shot.n_frames
        container.mux(stream.encode(None))
        if astream is not None:
            _mux_all(container, astream, tone.frames_until(None))
            container.mux(astream.encode(None))
    finally:
        container.close()

    frame_times = [float(p * time_base) for p in frame_pts]
    cut_frames = [info["first_frame"] for info in shot_info[1:]]
    return {
        "n_frames": len(frame_pts),
        "cut_frames": cut_frames,
        "cut_times": [frame_times[i] for i in cut_frames],
        "frame_times": frame_times,
        "size": (width, height),
        "fps": fps,
        "pix_fmt": pix_fmt,
        "time_base": time_base,
        "rotation": rotation,
        "shots": shot_info,
    }


def _add_aac_stream(container, sample_rate: int, channels: int):
    if channels not in _LAYOUTS:
        raise ValueError(f"audio_channels must be 1 or 2, got {channels}")
    stream = container.add_stream("aac", rate=sample_rate, layout=_LAYOUTS[channels])
    stream.format = "fltp"
    stream.time_base = Fraction(1, sample_rate)
    return stream


def _mux_all(container, stream, frames) -> None:
    for frame in frames:
        container.mux(stream.encode(frame))


class _ToneTrack:
    """Yields 1024-sample AAC input frames of each shot's tone, in order."""

    frame_size = 1024

    def __init__(self, shots: list[Shot], fps: Fraction, sample_rate: int, channels: int):
        self.sample_rate = sample_rate
        self.channels = channels
        bounds = []
        start = 0
        for shot in shots:
            bounds.append((start, start + shot.n_frames, shot.tone_hz))
            start += shot.n_frames
        # Shot boundaries in samples on the CFR timeline.
        self.segments = [
            (round(a / fps * sample_rate), round(b / fps * sample_rate), hz) for a, b, hz in bounds
        ]
        self.total = self.segments[-1][1]
        self.next_sample = 0

    def samples(self, start: int, stop: int) -> np.ndarray:
        """Mono signal for samples ``start .. stop - 1``."""
        n = np.arange(start, stop)
        out = np.zeros(stop - start, np.float32)
        for seg_start, seg_stop, hz in self.segments:
            if hz is None:
                continue
            inside = (n >= seg_start) & (n < seg_stop)
            phase = 2 * math.pi * hz * (n[inside] - seg_start) / self.sample_rate
            out[inside] = _AUDIO_AMPLITUDE * np.sin(phase)
        return out

    def frames_until(self, seconds: Fraction | None):
        """AudioFrames covering the timeline up to ``seconds`` (``None``: to the end)."""
        stop = self.total if seconds is None else min(self.total, round(seconds * self.sample_rate))
        while self.next_sample < stop:
            start = self.next_sample
            end = min(start + self.frame_size, self.total)
            mono = self.samples(start, end)  # (n,)
            planes = np.repeat(mono[None, :], self.channels, axis=0)  # (C, n)
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(planes), format="fltp",
                layout=_LAYOUTS[self.channels],
            )
            frame.sample_rate = self.sample_rate
            frame.pts = start
            frame.time_base = Fraction(1, self.sample_rate)
            self.next_sample = end
            yield frame


BAD_INPUTS = {
    "empty.mp4": "zero bytes; av.open raises av.error.InvalidDataError",
    "text.mp4": "a plain text file named .mp4; av.open raises av.error.InvalidDataError",
    "truncated.mp4": (
        "a real H.264 MP4 cut to 40% of its bytes; the moov index is written last, so it is "
        "lost and av.open raises av.error.InvalidDataError"
    ),
    "audio_only.mp4": "a valid MP4 with one AAC stream (1 s, 440 Hz) and no video stream",
    "unreadable.mp4": (
        "a dangling symlink (to missing/nothing.mp4), which cannot be opened even as root; "
        "av.open raises av.error.FileNotFoundError, a FileNotFoundError"
    ),
    "corrupt_middle.mp4": (
        "a 100-frame H.264 MP4 (2 shots, cut at frame 50, GOP 10, no B-frames) with garbage "
        "in the middle of mdat: packets 42-43 are overwritten whole, so decoding them raises "
        "av.error.InvalidDataError and those 2 frames are lost; packets 64-66 are overwritten "
        "after their first 30%, so they decode with frame.is_corrupt True; the other 95 "
        "frames decode cleanly"
    ),
}
"""What :func:`write_bad_inputs` creates, file name -> description."""

CORRUPT_MIDDLE = {"n_frames": 100, "lost": (42, 43), "corrupt": (64, 65, 66), "cut_frames": [50]}
"""Ground truth of ``corrupt_middle.mp4``: frame indices on the written timeline."""


def write_bad_inputs(folder: str | os.PathLike) -> dict[str, str]:
    """Write bad and odd inputs for robustness tests into ``folder``.

    What each file is, and how PyAV 18 (FFmpeg's mov demuxer and h264 decoder)
    reacts to it, is in :data:`BAD_INPUTS`. ``unreadable.mp4`` is a dangling
    symlink because ``chmod 000`` does not stop root, which CI runs as; note that
    ``os.path.exists`` is False for it while ``os.path.lexists`` is True.

    For ``corrupt_middle.mp4``, H.264 hides most damage: a packet whose NAL length
    prefix is garbage fails in ``avcodec_send_packet`` with
    ``av.error.InvalidDataError`` (iterating ``container.decode(video=0)`` therefore
    stops there; demux and decode packet by packet to carry on), while a packet
    whose slice data alone is garbage is error-concealed and returned with
    ``VideoFrame.is_corrupt`` set. Frames that reference a lost frame are
    concealed silently. See :data:`CORRUPT_MIDDLE`.

    Args:
        folder: Created if missing; existing files of the same names are replaced.

    Returns:
        :data:`BAD_INPUTS`, file name -> description.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in BAD_INPUTS:
        if os.path.lexists(folder / name):
            (folder / name).unlink()

    (folder / "empty.mp4").write_bytes(b"")
    (folder / "text.mp4").write_text("This is not a video, only text with an .mp4 name.\n" * 20)

    truncated = folder / "truncated.mp4"
    write_video(truncated, [Shot(30, 0, (1.0, 0.0))], gop=10)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: int(len(data) * 0.4)])

    _write_audio_only(folder / "audio_only.mp4")

    os.symlink(os.path.join("missing", "nothing.mp4"), folder / "unreadable.mp4")

    _write_corrupt_middle(folder / "corrupt_middle.mp4")
    return dict(BAD_INPUTS)


def _write_audio_only(path: Path, seconds: float = 1.0, hz: float = 440.0) -> None:
    sample_rate = 48000
    fps = Fraction(25)
    shots = [Shot(round(seconds * fps), tone_hz=hz)]
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = _add_aac_stream(container, sample_rate, 2)
        _mux_all(container, stream, _ToneTrack(shots, fps, sample_rate, 2).frames_until(None))
        container.mux(stream.encode(None))


def _write_corrupt_middle(path: Path) -> None:
    n_half = CORRUPT_MIDDLE["n_frames"] // 2
    shots = [Shot(n_half, 0, (2.0, 1.0)), Shot(n_half, 3, (-1.0, 1.0))]
    write_video(path, shots, gop=10, bframes=0)
    with av.open(str(path)) as container:
        # (file offset, size) of each video packet; decode order = output order here
        spans = [(p.pos, p.size) for p in container.demux(video=0) if p.size]
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(12345)
    # Garbage from byte 0 breaks the NAL length prefix (InvalidDataError); from 30% on
    # it only breaks slice data (error-concealed, frame.is_corrupt).
    damage = [(i, 0.0) for i in CORRUPT_MIDDLE["lost"]]
    damage += [(i, 0.3) for i in CORRUPT_MIDDLE["corrupt"]]
    for index, keep_fraction in damage:
        pos, size = spans[index]
        start, stop = pos + int(size * keep_fraction), pos + size
        data[start:stop] = rng.integers(0, 256, stop - start, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
