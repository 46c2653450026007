"""The per-video producer: one decode pass, every model input and codec array of one video.

:class:`VideoProducer` decodes a video once (:class:`vtx.io.decode.VideoReader`, its audio
demuxed in the same pass) and hands every decoded frame to:

* the shot detector (when the shots are not known already), which gets its downscaled input
  from the YUV frame, converting only the pixels it reads where the downscale factor allows
  (:class:`vtx.pipeline.shots.DetectorInput`), else from the frame's full-size RGB array; a
  full-size conversion of every frame is made only where that or codec residuals need it, with
  one swscale context per video (:class:`vtx.io.decode.RgbConverter`);
* a bounded :class:`ShotBuffer` of the current shot's frames, held as decoded; a closed shot
  sends its sampled frames (the centre frame for an image model, ``clip_len`` frames for a
  video model, :func:`sample_indices`) to the models, and only those are converted to RGB and
  reduced, each for the models that sample it only, to the model's input size
  (:class:`FramePrep`, exactly the weights' transform). Any frame can still become a sampled
  one when it is decoded, so reducing on arrival would reduce every frame for every model;
  past the buffer's byte budget (:data:`vtx.pipeline.shots.LAZY_BYTES`) a long shot's first
  frames, which can no longer become its centre frame (:meth:`VideoProducer.still_wanted`), are
  reduced for the clip models only and let go, and frames that still exceed it are reduced on
  arrival for every model;
* the frame sampler: a sampled frame is reduced for every frame-level image model, and its codec
  arrays are computed on the spot (:class:`vtx.pipeline.codec.CodecStream`);
* (audio) the 16 kHz resampler and the incremental log-mel front end of VGGish.

A job that only adds audio features to a video whose shots are cached (``job.known_shots``)
decodes no video frame at all: only the audio stream is demuxed and decoded
(:meth:`VideoReader.audio`), and the video attrs that only decoding the frames gives
(:data:`DECODED_ATTRS`) are left out of :class:`VideoDone`, so the cached ones stay.

Which of these run comes from the features' specs (:mod:`vtx.features`): their ``level``,
``kind`` and ``clip_len``. What the producer finds leaves through ``emit`` as messages:
:class:`ModelItem` (one model input), :class:`DirectItem` (arrays computed here), and finally
:class:`VideoDone`; :class:`VideoFailed` is sent by whoever runs the producer when it raises.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vtx.features import FeatureSpec
from vtx.io import audio as audio_io
from vtx.io.decode import Frame, RgbConverter, VideoReader
from vtx.pipeline.backbones import THUMBNAIL, FramePrep, ThumbnailPrep, grid_prep, sample_indices
from vtx.pipeline.codec import CODEC_OPTIONS, CodecStream, pict_type
from vtx.pipeline.sampling import FrameSampler, FrameSampling, KnownFrames
from vtx.pipeline.shots import (LAZY_BYTES, KnownShots, ShotBuffer, ShotConfig, ShotDetector,
                                split_shot)

FRAME_THUMBNAIL = "frame_thumbnail"
"""Pseudo-feature: a small picture of each sampled frame (for ``vtx predict --explain``)."""


DECODED_ATTRS = ("rotation", "n_frames", "duration_s", "resized_frames", "decode_errors",
                 "corrupt_frames")
"""Video attrs known only once the video frames are decoded (left out by an audio-only job)."""


@dataclass
class VideoJob:
    """One video to decode, and what to compute from it."""

    vid: int
    path: Path
    relpath: str
    key: str
    features: tuple[FeatureSpec, ...]  # the requested features this video lacks
    replace: bool  # replace what the cache holds for the video (else add to it)
    known_shots: np.ndarray | None = None  # stored shots to reuse (resume)
    known_frames: np.ndarray | None = None  # stored sampled frames to reuse (resume)

    @property
    def models(self) -> dict[str, FeatureSpec]:
        """The model runs this job needs: ``model_key`` -> the first feature of that run."""
        out: dict[str, FeatureSpec] = {}
        for spec in self.features:
            if spec.kind != "codec":
                out.setdefault(spec.model_key, spec)
        return out

    @property
    def frame_level(self) -> bool:
        return any(spec.level == "frame" for spec in self.features)

    @property
    def audio_only(self) -> bool:
        """The job needs no pixels: audio features only, for a video whose shots are known."""
        return (self.known_shots is not None and bool(self.features)
                and all(spec.kind == "audio" for spec in self.features))


@dataclass
class ModelItem:
    """One model input: a shot clip, a sampled frame or an audio example."""

    vid: int
    model: str  # model_key
    index: int  # row: shot, sampled frame or audio example
    data: np.ndarray  # uint8 (clip_len, h, w, 3), or float32 (96, 64) log-mel


@dataclass
class DirectItem:
    """Arrays computed in the decode thread (codec arrays, thumbnails), by dataset name.

    ``index`` is the sampled frame's row; a per-shot item (a shot thumbnail) has ``-1 - shot``.
    """

    vid: int
    index: int
    data: dict[str, np.ndarray]


@dataclass
class VideoDone:
    """The video is decoded: its attrs, the arrays known only at the end, and item counts."""

    vid: int
    attrs: dict
    fixed: dict[str, np.ndarray]  # shots, shot_times, frames, frame_times, frame_types, ...
    rows: dict[str, int]  # level -> number of rows (shots, sampled frames, audio examples)
    model_items: dict[str, int]  # model_key -> number of ModelItems emitted
    direct_items: int  # number of per-frame DirectItems emitted
    video_seconds: float = 0.0  # the decoded duration (the declared one when audio-only)


@dataclass
class VideoFailed:
    vid: int
    reason: str


@dataclass
class FrameSettings:
    """Per-run settings of the frame-level and audio streams.

    ``view`` is the grid view: the frame reducer of the built-in ViT run, whose output region
    the codec's grids cover too (:func:`vtx.pipeline.backbones.grid_prep`); None means the
    default ViT's centre crop. ``legacy_grids`` computes the codec's grids as vtx did before
    grid views (``vtx predict`` for a head trained on such a cache).
    """

    sampling: FrameSampling = field(default_factory=FrameSampling)
    motion_grid: int = 14
    residual_size: int = 56
    view: FramePrep | None = None
    legacy_grids: bool = False

    @property
    def grid(self) -> FramePrep:
        """The grid view's frame reducer (``view``, or the default ViT's)."""
        if self.view is None:
            self.view = grid_prep()
        return self.view

    @property
    def sizes(self) -> dict[str, int]:
        """The named row sizes of :meth:`vtx.features.FeatureSpec.shape`."""
        return {"motion_grid": self.motion_grid, "residual_size": self.residual_size}


class VideoProducer:
    """Decodes one video once and emits every model input and computed array.

    Args:
        job: the video and the features to compute.
        preps: ``model_key`` -> frame reducer, for each image or video model the job runs.
        shot_config: shot detection settings (ignored when ``job.known_shots`` is set).
        emit: receives :class:`ModelItem`, :class:`DirectItem` and finally :class:`VideoDone`.
        settings: frame sampling, motion grid and residual size.
        thumbnail: also emit a thumbnail of each shot's centre frame and of each sampled frame.
        capacity: most frames the shot buffer holds.
        lazy_bytes: most bytes of decoded frames the shot buffer holds unreduced (0: reduce
            every frame on arrival, as before; the model inputs are the same either way).
        progress: a bar advanced per decoded frame (:func:`vtx.progress.progress`).
    """

    def __init__(self, job: VideoJob, preps: Mapping[str, FramePrep], shot_config: ShotConfig,
                 emit: Callable[[object], None], settings: FrameSettings | None = None,
                 thumbnail: ThumbnailPrep | None = None, capacity: int = 300,
                 progress=None, lazy_bytes: int = LAZY_BYTES):
        self.job = job
        self.shot_config = shot_config
        self.emit = emit
        self.settings = settings or FrameSettings()
        self.thumbnail = thumbnail
        self.capacity = capacity
        self.lazy_bytes = lazy_bytes
        self.progress = progress
        models = job.models
        # model_key -> (clip_len, prep) of the shot-level models, prep of the frame-level ones.
        self.shot_models = {k: (s.clip_len, preps[k]) for k, s in models.items()
                            if s.level == "shot"}
        self.frame_models = {k: preps[k] for k, s in models.items() if s.level == "frame"}
        self.audio_models = [k for k, s in models.items() if s.level == "audio"]
        self.preps = {k: preps[k] for k in (*self.shot_models, *self.frame_models)}
        self.codec = [s.name for s in job.features if s.kind == "codec"]
        self.audio_times = [f"{s.name}_times" for s in job.features if s.level == "audio"]
        self.frame_level = job.frame_level
        self.audio_only = job.audio_only and thumbnail is None
        self.buffered = bool(self.shot_models) or thumbnail is not None  # shot inputs to hold
        # centre-frame inputs (image models, the thumbnail) and the clip models' inputs
        self.centre_keys = frozenset([k for k, (n, _) in self.shot_models.items() if n <= 1]
                                     + ([THUMBNAIL] if thumbnail is not None else []))
        self.clip_keys = frozenset(self.shot_models) - self.centre_keys
        self.shots: list[tuple[int, int]] = []
        self.shot_times: list[tuple[float, float]] = []
        self.frames: list[int] = []
        self.frame_times: list[float] = []
        self.frame_types: list[str] = []
        self.start = 0  # first frame of the open shot
        self.audio_offset: float | None = None
        self.audio_examples = 0
        self.model_items = dict.fromkeys(models, 0)
        self.direct_items = 0

    # ------------------------------------------------------------------ the decode loop
    def run(self) -> None:
        """Decode the video and emit everything; ends with :class:`VideoDone`.

        Raises:
            VideoError: the file cannot be decoded.
        """
        options = CODEC_OPTIONS if self.codec else None
        with VideoReader(self.job.path, codec_options=options) as reader:
            self.open(reader)
            if self.audio_only:  # no pixels needed: the audio stream alone
                reader.audio(self.on_audio)
                self.emit(self.finish())
                return
            for frame in reader.frames(on_audio=self.on_audio if self.audio_models else None):
                self.on_frame(frame)
            for cut in sorted(self.detector.finish()):
                self.close_shot(cut, self.buffer.time_of(cut))
            self.close_shot(self.info.n_frames, self.info.duration_s)
        self.emit(self.finish())

    def open(self, reader: VideoReader) -> None:
        """Set up the per-video state once the file is open."""
        job, info = self.job, reader.info
        self.reader, self.info = reader, info
        self.to_rgb = RgbConverter()  # one swscale context for the video's full-size frames
        self.detector = (KnownShots(job.known_shots) if job.known_shots is not None else
                         ShotDetector(self.shot_config, (info.width, info.height),
                                      reader.frame_rate, self.to_rgb))
        self.sampler = (KnownFrames(job.known_frames) if job.known_frames is not None else
                        FrameSampler(self.settings.sampling, reader.expected_duration))
        letting_go = bool(self.centre_keys) and (job.known_shots is not None or
                                                 self.shot_config.max_shot_len is None)
        self.buffer = ShotBuffer(capacity=self.capacity, reduce=self.reduce,
                                 lazy_bytes=self.lazy_bytes,
                                 wanted=self.still_wanted if letting_go else None)
        self.codec_stream = (CodecStream(self.codec, info.width, info.height,
                                         self.settings.motion_grid, self.settings.residual_size,
                                         legacy=self.settings.legacy_grids)
                             if self.codec else None)
        # Every frame's full-size RGB array for codec residuals (the previous frame); the shot
        # detector asks per frame (it converts only the pixels it reads where it can).
        self.rgb_every_frame = self.codec_stream is not None and self.codec_stream.residual
        self.frame_bytes = 0  # bytes of one decoded frame (set at the first frame)
        if self.audio_models:
            self.resampler = audio_io.AudioResampler()
            self.mel = audio_io.LogMelStream()
        if self.progress is not None:
            self.progress.reset(total=info.n_frames_expected or None)
            self.progress.set_description(job.relpath[-40:])

    def on_frame(self, frame: Frame) -> None:
        """One decoded frame: shot detection, the shot buffer, frame sampling, codec arrays."""
        rotation = self.info.rotation  # known once the first frame is decoded
        if frame.index == 0 and self.codec_stream is not None:  # the grids cover the grid view
            info = self.info
            self.codec_stream.place(self.settings.grid.region(info.width, info.height, rotation),
                                    rotation)
        av_frame = frame.av_frame
        rgb = (self.to_rgb(av_frame)
               if self.rgb_every_frame or self.detector.wants_rgb(av_frame) else None)
        cuts = self.detector.push(frame.index, frame.pts, frame.time_base, av_frame, rgb)
        if self.buffered:  # held as decoded; reduced only if a shot samples it
            if not self.frame_bytes:
                self.frame_bytes = sum(plane.buffer_size for plane in av_frame.planes)
            self.buffer.add_lazy(frame.index, frame.time, av_frame, self.frame_bytes, rgb)
        else:
            self.buffer.add(frame.index, frame.time, {})
        for cut in sorted(cuts):
            self.close_shot(cut, self.buffer.time_of(cut))
        sampled = self.frame_level and self.sampler.take(frame.index, frame.time)
        pict = pict_type(av_frame)
        codec = (self.codec_stream.push(av_frame, rgb, pict, sampled)
                 if self.codec_stream is not None else {})
        if sampled:
            if rgb is None:
                rgb = self.to_rgb(av_frame)
            self.on_sampled_frame(frame, rgb, pict, codec)
        if self.progress is not None:
            self.progress.update()

    def reduce(self, av_frame, rgb: np.ndarray | None = None,
               keys: set[str] | None = None) -> dict[str, np.ndarray]:
        """A decoded frame's inputs to the shot-level models (and its thumbnail), by key: all of
        them, or those in ``keys`` (the models a shot samples this frame for)."""
        if rgb is None:
            rgb = self.to_rgb(av_frame)
        rotation = self.info.rotation
        reduced = {k: prep(rgb, rotation) for k, (_, prep) in self.shot_models.items()
                   if keys is None or k in keys}
        if self.thumbnail is not None and (keys is None or THUMBNAIL in keys):
            reduced[THUMBNAIL] = self.thumbnail(rgb, rotation)
        return reduced

    def still_wanted(self, index: int, newest: int, gap: int) -> frozenset[str] | None:
        """The keys that may still sample held frame ``index`` of the open shot now that frame
        ``newest`` has arrived (``gap``: the widest spacing of the held frames); None: every key.

        A clip model may sample any frame of the shot (its frames span the whole shot, however
        long it gets). The centre frame ``start + (end - start) // 2`` can only move later as
        the shot grows, and its end is at least ``newest`` less the detector's delay (a cut may
        name a frame that far back); the buffer then takes the nearest held frame, off by less
        than the spacing of the held frames, which decimation widens to at most about 1/33 of
        the shot's length. So a frame well before the earliest possible centre (a margin of 4
        gaps, 1/16 of the shot so far and 4 frames) can no longer be any shot's centre frame.
        With the shots known (resume) the centre is known, and the frames well after it go too.
        Not used when shots are split (``--max-shot-len``: any frame can be a part's centre).
        """
        a = self.start
        known = self.detector.end_of(a)
        exact = known is not None and known > newest
        end = known if exact else max(a + 1, newest - self.detector.max_delay)  # at least
        centre = a + (end - a) // 2
        margin = 4 * gap + (end - a) // 16 + 4
        far = index < centre - margin or (exact and index > centre + margin)
        return self.clip_keys if far else None

    def close_shot(self, end: int, end_time: float) -> None:
        """The open shot ends before frame ``end``: emit its clips (split when too long)."""
        start, buffer = self.start, self.buffer
        if end <= start:
            return
        start_time = buffer.time_of(start)
        pieces = ([(start, end)] if self.job.known_shots is not None else
                  split_shot(start, end, start_time, end_time, self.shot_config.max_shot_len))
        for a, b in pieces:
            index = len(self.shots)
            sampled = {key: buffer.nearest(sample_indices(clip_len, a, b), upto=b)
                       for key, (clip_len, _) in self.shot_models.items()}
            if self.thumbnail is not None:  # the shot's centre frame
                sampled[THUMBNAIL] = buffer.nearest(sample_indices(1, a, b), upto=b)
            wanted: dict[int, set[str]] = {}  # buffer position -> the keys sampling it
            for key, pos in sampled.items():
                for p in pos:
                    wanted.setdefault(p, set()).add(key)
            for key in self.shot_models:
                clip = np.stack([buffer.get(p, wanted[p])[key] for p in sampled[key]])
                self._emit_model(key, index, clip)  # clip: (clip_len, h, w, 3)
            if self.thumbnail is not None:  # negative index: a per-shot item, not a frame
                p = sampled[THUMBNAIL][0]
                self.emit(DirectItem(self.job.vid, -1 - index,
                                     {THUMBNAIL: buffer.get(p, wanted[p])[THUMBNAIL]}))
            self.shots.append((a, b))
            self.shot_times.append((buffer.time_of(a),
                                    buffer.time_of(b) if b != end else end_time))
        buffer.release(end)
        self.start = end

    def on_sampled_frame(self, frame: Frame, rgb: np.ndarray, pict: str,
                         codec: dict[str, np.ndarray]) -> None:
        """A sampled frame: its frame-level model inputs and its codec arrays."""
        index = len(self.frames)
        self.frames.append(frame.index)
        self.frame_times.append(frame.time)
        self.frame_types.append(pict)
        for key, prep in self.frame_models.items():
            self._emit_model(key, index, prep(rgb, self.info.rotation)[None])  # (1, h, w, 3)
        direct = dict(codec)
        if self.thumbnail is not None:
            direct[FRAME_THUMBNAIL] = self.thumbnail(rgb, self.info.rotation)
        if direct:
            self.emit(DirectItem(self.job.vid, index, direct))
            self.direct_items += 1

    def on_audio(self, aframe) -> None:
        """A decoded audio frame (None at the end): resample, emit complete log-mel examples."""
        if aframe is not None and self.audio_offset is None and aframe.time is not None:
            self.audio_offset = aframe.time - self.reader.start_time
        for example in self.mel.push(self.resampler(aframe)):  # (96, 64)
            for key in self.audio_models:
                self._emit_model(key, self.audio_examples, example.astype(np.float32))
            self.audio_examples += 1

    def finish(self) -> VideoDone:
        """The message that ends the video: attrs, shots, sampled frames, audio times, counts."""
        reader = self.reader
        attrs = self.info.attrs()
        attrs.update(path=self.job.relpath, decode_errors=reader.decode_errors,
                     corrupt_frames=reader.corrupt_frames)
        if self.audio_only:  # no frame decoded: keep the cached frame counts and duration
            attrs = {k: v for k, v in attrs.items() if k not in DECODED_ATTRS}
            fixed = {"shots": np.asarray(self.job.known_shots, np.int64).reshape(-1, 2)}
        else:
            fixed = {"shots": np.asarray(self.shots, dtype=np.int64).reshape(-1, 2),
                     "shot_times": np.asarray(self.shot_times, dtype=np.float64).reshape(-1, 2)}
        if self.frame_level:
            fixed["frames"] = np.asarray(self.frames, dtype=np.int64)
            fixed["frame_times"] = np.asarray(self.frame_times, dtype=np.float64)
            if self.codec_stream is not None and self.codec_stream.motion:
                fixed["frame_types"] = np.asarray(self.frame_types, dtype="S1")
        if self.audio_models:
            n = self.audio_examples
            starts = (self.audio_offset or 0.0) + audio_io.EXAMPLE_SECONDS * np.arange(n)
            times = (np.stack([starts, starts + audio_io.EXAMPLE_SECONDS], axis=1) if n
                     else np.zeros((0, 2)))
            for name in self.audio_times:
                fixed[name] = times
        rows = {"shot": len(self.shots), "frame": len(self.frames),
                "audio": self.audio_examples}
        seconds = reader.expected_duration if self.audio_only else self.info.duration_s
        return VideoDone(self.job.vid, attrs, fixed, rows, dict(self.model_items),
                         self.direct_items, float(seconds))

    def _emit_model(self, key: str, index: int, data: np.ndarray) -> None:
        self.emit(ModelItem(self.job.vid, key, index, data))
        self.model_items[key] += 1
