"""One decode pass over a video file with PyAV.

Every consumer of a video (the shot detector and every feature extractor) is fed from the
single iterator :meth:`VideoReader.frames`. Frames come out in decode order with their
presentation time taken from PTS, relative to the stream's start, exactly as PySceneDetect's
PyAV backend reports positions; variable-frame-rate files are therefore handled exactly.

:meth:`VideoReader.audio` decodes the audio stream alone, for runs that need no pixels.

Corrupt packets are skipped and counted (as PySceneDetect's PyAV reader does); decoding gives up
only after ``MAX_CONSECUTIVE_ERRORS`` consecutive failures.

A stream whose frame size changes mid-stream (concatenated broadcast segments, say) is scaled to
the size the stream starts with, as the ``ffmpeg`` command line does by default, so that every
consumer sees one size; the frames scaled are counted (``resized_frames``). A scaled frame keeps
its timestamps and picture type but not the codec's side data (its motion vectors are in the
other size's coordinates).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from vtx.errors import DecodeError, VideoOpenError

MAX_CONSECUTIVE_ERRORS = 32
"""Consecutive packets that may fail to decode before the video is declared broken."""


@dataclass
class VideoInfo:
    """Container and stream facts about one video, stored as the video group's attrs."""

    size_bytes: int
    fps: float
    width: int
    height: int
    codec: str
    rotation: int
    has_audio: bool
    n_frames_expected: int
    duration_s: float = 0.0  # filled in after decoding: end of the last frame
    n_frames: int = 0  # filled in after decoding: frames actually decoded
    resized_frames: int = 0  # filled in after decoding: frames scaled to width x height

    def attrs(self) -> dict:
        return asdict(self)


@dataclass
class Frame:
    """One decoded frame.

    Attributes:
        index: decode-order index from 0.
        time: presentation time in seconds, relative to the stream start.
        pts: presentation timestamp relative to the stream start, in ``time_base`` units
            (None when the file has no PTS for this frame).
        time_base: unit of ``pts``.
        av_frame: the PyAV frame (YUV, as decoded).
    """

    index: int
    time: float
    pts: int | None
    time_base: Fraction
    av_frame: av.VideoFrame

    def to_rgb(self, rotation: int = 0) -> np.ndarray:
        """Full-resolution RGB uint8 array (H, W, 3), rotated for display."""
        return rotate(self.av_frame.to_ndarray(format="rgb24"), rotation)


class RgbConverter:
    """Full-size RGB arrays of decoded frames, through one swscale context for a whole video.

    ``av_frame.to_ndarray(format="rgb24")`` goes through the frame's own, new reformatter, so
    FFmpeg sets up a swscale context for every frame: at 640x360 that set-up costs more than the
    conversion (0.50 against 0.13 CPU-ms a frame, ``docs/BENCHMARKS.md``). This
    keeps one PyAV ``VideoReformatter`` and calls it with the same arguments, so FFmpeg reuses its
    context and the pixels are the same (``tests/test_decode.py``). Not thread-safe: one per
    decode thread.
    """

    def __init__(self):
        self._reformatter = VideoReformatter()

    def __call__(self, av_frame: av.VideoFrame) -> np.ndarray:
        """(H, W, 3) uint8 RGB, as ``av_frame.to_ndarray(format="rgb24")``."""
        return self._reformatter.reformat(av_frame, format="rgb24").to_ndarray()


def rotate(img: np.ndarray, rotation: int) -> np.ndarray:
    """Apply a display-matrix rotation (degrees counter-clockwise, as PyAV reports it)."""
    k = (int(round(rotation / 90.0))) % 4
    return np.ascontiguousarray(np.rot90(img, k=k)) if k else img


class VideoReader:
    """Opens a video once and yields its frames in decode order.

    Args:
        path: the video file.
        threads: PyAV thread type for the video decoder ("AUTO", "FRAME", "SLICE" or "NONE").
        codec_options: extra decoder options (e.g. ``{"flags2": "+export_mvs"}``).
    """

    def __init__(self, path: str | os.PathLike, threads: str = "AUTO",
                 codec_options: dict[str, str] | None = None):
        self.path = Path(path)
        if self.path.is_symlink() and not self.path.exists():
            raise VideoOpenError(f"broken symbolic link (points to {os.readlink(self.path)})")
        try:
            size = self.path.stat().st_size
        except OSError as e:
            raise VideoOpenError(f"cannot read file: {e.strerror or e}") from e
        if size == 0:
            raise VideoOpenError("file is empty (0 bytes)")
        try:
            self._container = av.open(str(self.path), mode="r")
        except av.error.FFmpegError as e:
            raise VideoOpenError(f"not a readable video (truncated, or not a video file?): "
                                 f"{_reason(e)}") from e
        except OSError as e:
            raise VideoOpenError(f"cannot open file: {e.strerror or e}") from e
        if not self._container.streams.video:
            kinds = sorted({s.type for s in self._container.streams}) or ["none"]
            self._container.close()
            raise VideoOpenError(f"no video stream (streams found: {', '.join(kinds)})")
        self.stream = self._container.streams.video[0]
        if threads and threads.upper() != "NONE":
            self.stream.thread_type = threads.upper()
        if codec_options:
            self.stream.codec_context.options = dict(codec_options)
        cc = self.stream.codec_context
        rate = self.stream.guessed_rate or self.stream.average_rate or cc.framerate
        self.frame_rate = Fraction(rate) if rate else Fraction(0)
        self.info = VideoInfo(
            size_bytes=size,
            fps=float(self.frame_rate),
            width=int(cc.width or self.stream.width),
            height=int(cc.height or self.stream.height),
            codec=_codec_name(cc),
            rotation=0,
            has_audio=bool(self._container.streams.audio),
            n_frames_expected=int(self.stream.frames or 0),
        )
        self.decode_errors = 0
        self._size = (self.info.width, self.info.height)
        self.audio_decode_errors = 0
        self.corrupt_frames = 0
        self._start_time = self.stream.start_time or 0
        self._stream_tb = Fraction(self.stream.time_base) if self.stream.time_base else None
        self.expected_duration = self._expected_duration()

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._container.close()

    @property
    def start_time(self) -> float:
        """The video stream's start time in seconds (frame times are relative to it)."""
        return float(self._start_time * self._stream_tb) if self._stream_tb else 0.0

    def frames(self, on_audio: Callable[[av.AudioFrame | None], None] | None = None
               ) -> Iterator[Frame]:
        """Decode the whole video stream once. Updates ``info`` (rotation, n_frames, duration).

        Args:
            on_audio: when given, the first audio stream is demuxed in the same pass and each
                decoded audio frame is passed to it (then ``None`` once at the end).
        """
        index = 0
        consecutive = 0
        last_end = 0.0
        audio = self._container.streams.audio[0] if (on_audio and self.info.has_audio) else None
        streams = (self.stream, audio) if audio is not None else (self.stream,)
        for packet in self._container.demux(*streams):
            if audio is not None and packet.stream is audio:
                try:
                    for aframe in packet.decode():
                        on_audio(aframe)
                except av.error.FFmpegError:
                    self.audio_decode_errors += 1
                continue
            try:
                decoded = packet.decode()
            except (av.error.InvalidDataError, av.error.FFmpegError) as e:
                if isinstance(e, av.error.EOFError):
                    break
                self.decode_errors += 1
                consecutive += 1
                if consecutive >= MAX_CONSECUTIVE_ERRORS:
                    raise DecodeError(
                        f"{consecutive} consecutive packets failed to decode near frame {index} "
                        f"({_reason(e)}); the file is corrupt from there on"
                    ) from e
                continue
            consecutive = 0
            for av_frame in decoded:
                if index == 0:
                    self.info.rotation = int(getattr(av_frame, "rotation", 0) or 0)
                if getattr(av_frame, "is_corrupt", False):
                    self.corrupt_frames += 1
                tb = Fraction(av_frame.time_base) if av_frame.time_base else self._stream_tb
                if av_frame.pts is not None and tb:
                    pts = av_frame.pts - self._start_offset(tb)
                    time = float(pts * tb)
                    dur = float(av_frame.duration * tb) if av_frame.duration else 0.0
                else:
                    pts, tb = None, tb or Fraction(1, 1)
                    time = index / self.info.fps if self.info.fps else float(index)
                    dur = 0.0
                if not dur:
                    dur = 1.0 / self.info.fps if self.info.fps else 0.0
                last_end = max(last_end, time + dur)
                if (av_frame.width, av_frame.height) != self._size and all(self._size):
                    av_frame = _rescale(av_frame, *self._size)
                    self.info.resized_frames += 1
                yield Frame(index=index, time=time, pts=pts, time_base=tb, av_frame=av_frame)
                index += 1
        if on_audio is not None:
            on_audio(None)
        self.info.n_frames = index
        self.info.duration_s = last_end
        if index == 0:
            raise DecodeError("no frame could be decoded from the video stream")

    def audio(self, on_audio: Callable[[av.AudioFrame | None], None]) -> None:
        """Decode the first audio stream only (no video frame is decoded): each decoded audio
        frame is passed to ``on_audio``, then ``None`` once at the end, exactly as
        :meth:`frames` passes them. ``info``'s decode results (rotation, n_frames, duration)
        stay unknown. A video without audio gives only the final ``None``."""
        if self.info.has_audio:
            audio = self._container.streams.audio[0]
            for packet in self._container.demux(audio):
                try:
                    for aframe in packet.decode():
                        on_audio(aframe)
                except av.error.FFmpegError:
                    self.audio_decode_errors += 1
        on_audio(None)

    def _expected_duration(self) -> float:
        """Duration the container declares, in seconds (0 when unknown)."""
        if self.stream.duration and self._stream_tb:
            return float(self.stream.duration * self._stream_tb)
        if self._container.duration:
            return self._container.duration / av.time_base
        if self.info.n_frames_expected and self.info.fps:
            return self.info.n_frames_expected / self.info.fps
        return 0.0

    def _start_offset(self, frame_tb: Fraction) -> int:
        """Stream start time in the frame's time base (as PySceneDetect normalises PTS)."""
        if not self._start_time:
            return 0
        if self._stream_tb and self._stream_tb != frame_tb:
            return int(self._start_time * self._stream_tb / frame_tb)
        return self._start_time


def _rescale(av_frame: av.VideoFrame, width: int, height: int) -> av.VideoFrame:
    """``av_frame`` scaled to ``width`` x ``height`` in its own pixel format, with its
    timestamps and picture type."""
    out = av_frame.reformat(width=width, height=height)
    out.pts, out.time_base = av_frame.pts, av_frame.time_base
    out.pict_type = av_frame.pict_type
    return out


def _codec_name(cc) -> str:
    """The codec's name (``av1``, ``h264``), never the decoder library's (``libdav1d``)."""
    codec = getattr(cc, "codec", None)
    name = getattr(codec, "canonical_name", None) or getattr(cc, "name", None) or ""
    return str(name)


def _reason(e: BaseException) -> str:
    """A short, single-line reason from a PyAV/FFmpeg error."""
    msg = getattr(e, "strerror", None) or str(e)
    return " ".join(str(msg).split())
