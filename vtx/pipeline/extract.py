"""Stage 1: the one-pass extractor (``vtx extract``).

Each video is decoded once (:class:`vtx.io.decode.VideoReader`), its audio demuxed in the same
pass. Every decoded frame is handed, in one loop, to:

* the shot detector, and each shot feature's :class:`FramePrep`, which reduces the frame to the
  model's input size straight away; a bounded :class:`ShotBuffer` keeps only those reduced
  frames of the current shot, and a closed shot sends its sampled frames to the models;
* the frame sampler: a sampled frame is reduced for ViT, and its codec motion field and
  motion-compensated residual are computed on the spot;
* (audio) the 16 kHz resampler and the incremental log-mel front end of VGGish.

Threads: ``workers`` decode threads (one video each) feed a bounded queue; the main thread batches
model inputs across shots, frames and videos, and writes each finished video to the cache. The
queue bound keeps memory constant whatever the number or length of the videos.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from vtx.errors import CacheMismatch, UsageError, VideoError
from vtx.io import audio as audio_io
from vtx.io import motion as motion_io
from vtx.io.cache import CacheWriter, video_key
from vtx.io.decode import VideoReader
from vtx.pipeline.backbones import (THUMBNAIL, Backbone, ThumbnailPrep, load_backbone,
                                    resolve_device, sample_indices, weights_identity)
from vtx.pipeline.sampling import FrameSampler, FrameSampling, KnownFrames
from vtx.pipeline.shots import KnownShots, ShotBuffer, ShotConfig, ShotDetector, split_shot

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts",
                    ".flv", ".wmv", ".3gp")
DEFAULT_FEATURES = ("resnet18", "r2plus1d")
ALL_FEATURES = ("resnet18", "r2plus1d", "vit", "vit_patches", "vggish", "motion", "residual")
"""What ``--features`` accepts (``all`` selects every one)."""

# Datasets each feature writes, besides the shared shots/frames datasets.
FEATURE_DATASETS = {
    "resnet18": ("resnet18",), "r2plus1d": ("r2plus1d",), "vit": ("vit",),
    "vit_patches": ("vit_patches",), "vggish": ("vggish", "vggish_times"),
    "motion": ("motion", "motion_accumulated", "frame_types"), "residual": ("residual",),
}
FRAME_LEVEL = ("vit", "vit_patches", "motion", "residual")
FRAME_THUMBNAIL = "frame_thumbnail"
PICT_TYPES = {1: "I", 2: "P", 3: "B", 4: "S", 5: "I", 6: "P", 7: "B"}  # FFmpeg AVPictureType


def parse_features(text: str | tuple[str, ...]) -> tuple[str, ...]:
    names = [f.strip() for f in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    if "all" in names:
        return ALL_FEATURES
    bad = [n for n in names if n not in ALL_FEATURES]
    if bad or not names:
        raise UsageError(f"unknown feature {', '.join(bad) or '(none)'}; valid features: "
                         f"{', '.join(ALL_FEATURES)}, or all")
    return tuple(dict.fromkeys(names))


@dataclass
class ExtractConfig:
    """Options of ``vtx extract``; the CLI maps its flags one-to-one onto these fields."""

    videos: Path
    out: Path
    features: tuple[str, ...] = DEFAULT_FEATURES
    device: str = "auto"
    shots: ShotConfig = field(default_factory=ShotConfig)
    frames: FrameSampling = field(default_factory=FrameSampling)
    weights: str = "official"
    weights_dir: Path | None = None
    vit_weights: str = "IMAGENET1K_V1"
    vggish_pca: bool = False
    motion_grid: int = 14
    residual_size: int = 56
    gop_normalise: bool = False
    overwrite: bool = False
    batch_size: int = 16
    workers: int = 1
    globs: tuple[str, ...] = ()
    dtype: str = "float16"
    progress: bool = True
    seed: int = 0


@dataclass
class ExtractSummary:
    """What one run did. ``failures`` lists (path, reason)."""

    output: str
    done: int = 0
    skipped: int = 0
    failed: int = 0
    shots: int = 0
    video_seconds: float = 0.0
    wall_s: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        """Video-seconds extracted per wall-clock second."""
        return self.video_seconds / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {"output": self.output, "done": self.done, "skipped": self.skipped,
                "failed": self.failed, "shots": self.shots,
                "video_seconds": round(self.video_seconds, 3), "wall_s": round(self.wall_s, 3),
                "throughput": round(self.throughput, 3),
                "failures": [{"path": p, "reason": r} for p, r in self.failures]}

    def line(self) -> str:
        return (f"videos: {self.done} done, {self.skipped} skipped, {self.failed} failed | "
                f"shots: {self.shots} | wall: {self.wall_s:.1f} s | "
                f"throughput: {self.throughput:.2f} video-s/s | cache: {self.output}")


def discover_videos(root: Path, globs: tuple[str, ...] = ()) -> list[tuple[Path, str]]:
    """(path, path relative to ``root`` as POSIX) of the videos to extract, sorted.

    ``root`` may be a single file. In a folder, ``globs`` are matched recursively relative to it
    (``**/*.mp4``); without globs every file with a common video extension is taken.
    """
    root = Path(root)
    if root.is_file() or root.is_symlink() and not root.is_dir():
        return [(root, root.name)]
    if not root.is_dir():
        raise UsageError(f"--videos {root} does not exist; give a folder of videos or one file")
    if globs:
        found = {p for g in globs for p in root.glob(g)}
    else:
        found = {p for p in root.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS}
    files = sorted(p for p in found if p.is_file() or p.is_symlink())
    return [(p, p.relative_to(root).as_posix()) for p in files]


@dataclass
class _Job:
    """One video to decode, and what to compute from it."""

    vid: int
    path: Path
    relpath: str
    key: str
    features: tuple[str, ...]  # the requested features this video lacks
    replace: bool
    known_shots: np.ndarray | None = None
    known_frames: np.ndarray | None = None

    @property
    def models(self) -> tuple[str, ...]:
        """Backbones this job runs (``vit_patches`` runs ``vit``)."""
        out = []
        for f in self.features:
            if f in ("resnet18", "r2plus1d", "vggish"):
                out.append(f)
            elif f in ("vit", "vit_patches"):
                out.append("vit")
        return tuple(dict.fromkeys(out))

    @property
    def frame_level(self) -> bool:
        return any(f in FRAME_LEVEL for f in self.features)


@dataclass
class _Item:
    """One model input: a shot clip, a sampled frame or an audio example."""

    vid: int
    model: str
    index: int
    data: np.ndarray


@dataclass
class _Direct:
    """Per-frame arrays computed in the decode thread (motion, residual, thumbnails)."""

    vid: int
    index: int
    data: dict[str, np.ndarray]


@dataclass
class _VideoDone:
    vid: int
    attrs: dict
    fixed: dict[str, np.ndarray]  # shots, shot_times, frames, frame_times, vggish_times, ...
    counts: dict[str, int]  # model -> number of items; "direct" -> number of direct items


@dataclass
class _VideoFailed:
    vid: int
    reason: str


class _WorkerExit:
    pass


@dataclass
class FrameSettings:
    """Per-run settings of the frame-level and audio streams."""

    sampling: FrameSampling = field(default_factory=FrameSampling)
    motion_grid: int = 14
    residual_size: int = 56


def decode_video(job: _Job, preps: dict[str, Callable], shot_config: ShotConfig,
                 emit: Callable[[object], None], settings: FrameSettings | None = None,
                 capacity: int = 300, progress: tqdm | None = None) -> None:
    """Decode one video once and emit every model input and computed array.

    Args:
        job: the video and the features to compute.
        preps: model name -> frame reducer, for the image models the job runs (shot-level
            ``resnet18``/``r2plus1d``, frame-level ``vit``) and optionally ``thumbnail``.
        shot_config: shot detection settings (ignored when ``job.known_shots`` is set).
        emit: receives :class:`_Item`, :class:`_Direct` and finally :class:`_VideoDone`.
        settings: frame sampling, motion grid and residual size.
        capacity: most frames the shot buffer holds.
        progress: a tqdm bar advanced per decoded frame.
    """
    settings = settings or FrameSettings()
    feats = set(job.features)
    shot_preps = {n: p for n, p in preps.items() if n in ("resnet18", "r2plus1d", THUMBNAIL)}
    frame_preps = {n: p for n, p in preps.items() if n == "vit"}
    want_motion, want_residual = "motion" in feats, "residual" in feats
    want_frames = job.frame_level
    want_audio = "vggish" in feats
    codec_options = {"flags2": "+export_mvs"} if (want_motion or want_residual) else None
    with VideoReader(job.path, codec_options=codec_options) as reader:
        info = reader.info
        detector = (KnownShots(job.known_shots) if job.known_shots is not None else
                    ShotDetector(shot_config, (info.width, info.height), reader.frame_rate))
        sampler = (KnownFrames(job.known_frames) if job.known_frames is not None else
                   FrameSampler(settings.sampling, reader.expected_duration))
        buffer = ShotBuffer(capacity=capacity)
        shots: list[tuple[int, int]] = []
        shot_times: list[tuple[float, float]] = []
        frames: list[int] = []
        frame_times: list[float] = []
        frame_types: list[str] = []
        counts = {m: 0 for m in job.models}
        counts["direct"] = 0
        accumulator = motion_io.MotionAccumulator() if want_motion else None
        previous_rgb: np.ndarray | None = None
        start = 0
        if progress is not None:
            progress.reset(total=info.n_frames_expected or None)
            progress.set_description(job.relpath[-40:])

        # ---- audio: resample to 16 kHz mono, log-mel examples as they complete
        audio_state = {"offset": None, "n": 0}
        if want_audio:
            resampler = audio_io.AudioResampler()
            mel = audio_io.LogMelStream()

            def on_audio(aframe) -> None:
                if aframe is not None and audio_state["offset"] is None and aframe.time is not None:
                    audio_state["offset"] = aframe.time - reader.start_time
                for example in mel.push(resampler(aframe)):
                    emit(_Item(job.vid, "vggish", audio_state["n"], example.astype(np.float32)))
                    audio_state["n"] += 1
        else:
            on_audio = None

        def close(end: int, end_time: float) -> None:
            nonlocal start
            if end <= start:
                return
            start_time = buffer.time_of(start)
            pieces = ([(start, end)] if job.known_shots is not None else
                      split_shot(start, end, start_time, end_time, shot_config.max_shot_len))
            for a, b in pieces:
                index = len(shots)
                for name in shot_preps:
                    pos = buffer.nearest(sample_indices(name, a, b), upto=b)
                    clip = np.stack([buffer.items[p][name] for p in pos])
                    if name == THUMBNAIL:  # negative index: a per-shot item, not a frame
                        emit(_Direct(job.vid, -1 - index, {THUMBNAIL: clip[0]}))
                    else:
                        emit(_Item(job.vid, name, index, clip))
                        counts[name] += 1
                shots.append((a, b))
                shot_times.append((buffer.time_of(a), buffer.time_of(b) if b != end else end_time))
            buffer.release(end)
            start = end

        for frame in reader.frames(on_audio=on_audio):
            rgb = frame.av_frame.to_ndarray(format="rgb24")
            cuts = detector.push(frame.index, frame.pts, frame.time_base, rgb)
            buffer.add(frame.index, frame.time,
                       {name: prep(rgb, info.rotation) for name, prep in shot_preps.items()})
            for cut in sorted(cuts):
                close(cut, buffer.time_of(cut))
            sampled = want_frames and sampler.take(frame.index, frame.time)
            field_ = None
            # Accumulated motion needs every frame's field; residuals only the sampled ones'.
            if accumulator is not None or (want_residual and sampled):
                field_ = motion_io.motion_field(frame.av_frame.side_data.get("MOTION_VECTORS"),
                                                info.width, info.height)
            pict = PICT_TYPES.get(int(frame.av_frame.pict_type), "?")
            accumulated = accumulator.push(field_, pict) if accumulator is not None else None
            if sampled:
                index = len(frames)
                frames.append(frame.index)
                frame_times.append(frame.time)
                frame_types.append(pict)
                for name, prep in frame_preps.items():
                    emit(_Item(job.vid, name, index, prep(rgb, info.rotation)[None]))
                    counts[name] += 1
                direct = {}
                if want_motion:
                    direct["motion"] = motion_io.resize_field(field_, settings.motion_grid)
                    direct["motion_accumulated"] = motion_io.resize_field(
                        accumulated, settings.motion_grid)
                if want_residual:
                    direct["residual"] = motion_io.residual(rgb, previous_rgb, field_,
                                                            settings.residual_size)
                if THUMBNAIL in preps:
                    direct[FRAME_THUMBNAIL] = preps[THUMBNAIL](rgb, info.rotation)
                if direct:
                    emit(_Direct(job.vid, index, direct))
                    counts["direct"] += 1
            if want_residual:
                previous_rgb = rgb
            if progress is not None:
                progress.update()
        for cut in sorted(detector.finish()):
            close(cut, buffer.time_of(cut))
        close(info.n_frames, info.duration_s)
    attrs = info.attrs()
    attrs.update(path=job.relpath, decode_errors=reader.decode_errors,
                 corrupt_frames=reader.corrupt_frames)
    fixed = {"shots": np.asarray(shots, dtype=np.int64).reshape(-1, 2),
             "shot_times": np.asarray(shot_times, dtype=np.float64).reshape(-1, 2)}
    if want_frames:
        fixed["frames"] = np.asarray(frames, dtype=np.int64)
        fixed["frame_times"] = np.asarray(frame_times, dtype=np.float64)
        if want_motion:
            fixed["frame_types"] = np.asarray(frame_types, dtype="S1")
    if want_audio:
        counts["vggish"] = audio_state["n"]
        offset = audio_state["offset"] or 0.0
        starts = offset + audio_io.EXAMPLE_SECONDS * np.arange(audio_state["n"])
        fixed["vggish_times"] = np.stack([starts, starts + audio_io.EXAMPLE_SECONDS], axis=1) \
            if audio_state["n"] else np.zeros((0, 2))
    emit(_VideoDone(job.vid, attrs, fixed, counts))


class _Assembler:
    """Collects one video's model outputs and direct arrays until it is complete."""

    def __init__(self, job: _Job):
        self.job = job
        self.items: dict[str, dict[int, np.ndarray]] = {}
        self.model_items: dict[str, int] = {}
        self.direct_items = 0
        self.done: _VideoDone | None = None

    def add_output(self, model: str, index: int, outputs: dict[str, np.ndarray]) -> None:
        for name, vec in outputs.items():
            self.items.setdefault(name, {})[index] = vec
        self.model_items[model] = self.model_items.get(model, 0) + 1

    def add_direct(self, msg: _Direct) -> None:
        for name, arr in msg.data.items():
            self.items.setdefault(name, {})[msg.index] = arr
        if msg.index >= 0:
            self.direct_items += 1

    def complete(self) -> bool:
        if self.done is None:
            return False
        counts = self.done.counts
        return (all(self.model_items.get(m, 0) == n for m, n in counts.items() if m != "direct")
                and self.direct_items == counts.get("direct", 0))

    def stacked(self, name: str, n: int, empty_shape: tuple[int, ...]) -> np.ndarray:
        got = self.items.get(name, {})
        if n == 0:
            return np.zeros((0,) + empty_shape, np.float32)
        return np.stack([got[i] for i in range(n)])


# ----------------------------------------------------------------------------- in memory
@dataclass
class VideoFeatures:
    """One video's shots and features, extracted in memory (no cache), e.g. for ``predict``."""

    attrs: dict
    shots: np.ndarray
    shot_times: np.ndarray
    features: dict[str, np.ndarray]  # dataset name -> float32 (n, ...)
    fixed: dict[str, np.ndarray] = field(default_factory=dict)
    thumbnails: list[np.ndarray] | None = None  # uint8 (h, w, 3) per shot
    frame_thumbnails: list[np.ndarray] | None = None  # uint8 (h, w, 3) per sampled frame


def extract_video(path: str | Path, backbones: dict[str, Backbone],
                  shot_config: ShotConfig = ShotConfig(), batch_size: int = 16,
                  thumbnails: bool = False, settings: FrameSettings | None = None,
                  features: tuple[str, ...] | None = None) -> VideoFeatures:
    """Extract one video with the same one-pass code as ``vtx extract``, into memory.

    Args:
        backbones: model name -> loaded backbone.
        features: the features to compute [default: one per backbone].

    Raises:
        VideoError: the file cannot be decoded.
    """
    path = Path(path)
    features = features or tuple(backbones)
    preps: dict[str, Callable] = {n: bb.prep for n, bb in backbones.items() if bb.prep}
    if thumbnails:
        preps[THUMBNAIL] = ThumbnailPrep()
    job = _Job(0, path, path.name, video_key(path.name), tuple(features), replace=True)
    a = _Assembler(job)
    pending: dict[str, list[_Item]] = {m: [] for m in backbones}

    def flush(model: str) -> None:
        if pending[model]:
            _run_model(backbones[model], pending[model], lambda vid: a)
            pending[model] = []

    def emit(msg) -> None:
        if isinstance(msg, _Item):
            pending[msg.model].append(msg)
            if len(pending[msg.model]) >= batch_size:
                flush(msg.model)
        elif isinstance(msg, _Direct):
            a.add_direct(msg)
        elif isinstance(msg, _VideoDone):
            a.done = msg

    decode_video(job, preps, shot_config, emit, settings)
    for m in backbones:
        flush(m)
    done = a.done
    n_shots, n_frames = len(done.fixed["shots"]), len(done.fixed.get("frames", []))
    out = {}
    for name in a.items:
        if name in (THUMBNAIL, FRAME_THUMBNAIL):
            continue
        n = n_shots if name in ("resnet18", "r2plus1d") else (
            done.counts.get("vggish", 0) if name == "vggish" else n_frames)
        out[name] = a.stacked(name, n, ()).astype(np.float32)
    thumbs = [a.items[THUMBNAIL][-1 - i] for i in range(n_shots)] if thumbnails else None
    frame_thumbs = ([a.items[FRAME_THUMBNAIL][i] for i in range(n_frames)]
                    if thumbnails and n_frames else None)
    return VideoFeatures(attrs=done.attrs, shots=done.fixed["shots"],
                         shot_times=done.fixed["shot_times"], features=out, fixed=done.fixed,
                         thumbnails=thumbs, frame_thumbnails=frame_thumbs)


def _run_model(bb: Backbone, items: list[_Item], assembler_of) -> set[int]:
    """Run one batch; route each output row to its video's assembler. Returns the video ids."""
    x = torch.from_numpy(np.stack([it.data for it in items]))
    outs = bb(x.to(bb.device, non_blocking=True))
    outs = {k: v.cpu().numpy() for k, v in outs.items()}
    for row, it in enumerate(items):
        a = assembler_of(it.vid)
        if a is not None:
            a.add_output(bb.spec.name, it.index, {k: v[row] for k, v in outs.items()})
    return {it.vid for it in items}


# ----------------------------------------------------------------------------- the run
def extract(config: ExtractConfig, log: Callable[[str], None] | None = None) -> ExtractSummary:
    """Run stage 1 over ``config.videos`` into ``config.out``. See :class:`ExtractConfig`."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    t0 = time.perf_counter()
    features = parse_features(config.features)
    if config.dtype not in ("float16", "float32"):
        raise UsageError("--dtype must be float16 or float32")
    if config.batch_size < 1 or config.workers < 1:
        raise UsageError("--batch-size and --workers must be at least 1")
    if config.motion_grid < 1 or config.residual_size < 1:
        raise UsageError("--motion-grid and --residual-size must be at least 1")
    device = resolve_device(config.device)
    videos = discover_videos(Path(config.videos), config.globs)
    if not videos:
        pattern = ", ".join(config.globs) or "common video extensions"
        raise UsageError(f"no videos found under {config.videos} ({pattern}); check --videos "
                         f"and --glob")
    summary = ExtractSummary(output=str(config.out))
    wanted = _identities(features, config)
    frame_level = any(f in FRAME_LEVEL for f in features)
    with CacheWriter(config.out, overwrite=config.overwrite) as cache:
        root = cache.root_attrs()
        _check_settings(root, config, wanted, frame_level)
        attrs = {"shot_config": config.shots.to_json(),
                 "features": json.dumps(wanted, sort_keys=True)}
        if frame_level:
            attrs["frame_config"] = config.frames.to_json()
        cache.set_root_attrs(**attrs)
        records = cache.records()
        jobs = []
        for path, rel in videos:
            key = video_key(rel)
            rec = records.get(key)
            try:
                size = path.stat().st_size
            except OSError:
                size = -1
            if rec is not None and rec.size_bytes == size:
                missing = tuple(f for f in features
                                if not set(FEATURE_DATASETS[f]) <= rec.datasets)
                if not missing:
                    summary.skipped += 1
                    continue
                job = _Job(len(jobs), path, rel, key, missing, replace=False,
                           known_shots=cache.read_dataset(key, "shots"))
                if "frames" in rec.datasets:
                    job.known_frames = cache.read_dataset(key, "frames")
                jobs.append(job)
            else:
                jobs.append(_Job(len(jobs), path, rel, key, features, replace=True))
        if jobs:
            needed = sorted({m for j in jobs for m in j.models})
            patches = any("vit_patches" in j.features for j in jobs)
            backbones = {m: load_backbone(m, config.weights, config.weights_dir, device,
                                          seed=config.seed,
                                          variant=config.vit_weights if m == "vit" else None,
                                          patches=patches, pca=config.vggish_pca)
                         for m in needed}
            with tempfile.TemporaryDirectory(prefix="vtx-gop-") as tmp:
                _run(jobs, backbones, config, cache, summary, log, Path(tmp))
    summary.wall_s = time.perf_counter() - t0
    return summary


def _identities(features: tuple[str, ...], config: ExtractConfig) -> dict[str, str]:
    out = {}
    for f in features:
        if f in ("motion", "residual"):
            out[f] = "codec" + ("+gop-normalised" if config.gop_normalise else "")
        else:
            variant = config.vit_weights if f in ("vit", "vit_patches") else None
            out[f] = weights_identity(f, config.weights, variant)
            if f == "vggish" and config.vggish_pca and config.weights == "official":
                out[f] += "+pca"
    return out


def _check_settings(root: dict, config: ExtractConfig, wanted: dict[str, str],
                    frame_level: bool) -> None:
    fix = "pass --overwrite, or write to another --out"
    if "shot_config" in root and root["shot_config"] != config.shots.to_json():
        raise CacheMismatch(
            f"this cache was cut into shots with {root['shot_config']}, not "
            f"{config.shots.to_json()}; rerun with the same --detector/--threshold/"
            f"--min-shot-len/--max-shot-len, or {fix}")
    if frame_level and "frame_config" in root and root["frame_config"] != config.frames.to_json():
        raise CacheMismatch(f"this cache sampled frames with {root['frame_config']}, not "
                            f"{config.frames.to_json()}; rerun with the same --frame-rate/"
                            f"--frames-per-video, or {fix}")
    have = json.loads(root.get("features", "{}"))
    clash = {f: (have[f], w) for f, w in wanted.items() if f in have and have[f] != w}
    if clash:
        desc = "; ".join(f"{f}: cache has {a}, asked for {b}" for f, (a, b) in clash.items())
        raise CacheMismatch(f"feature settings differ from the cache's ({desc}); {fix}")


def _run(jobs: list[_Job], backbones: dict[str, Backbone], config: ExtractConfig,
         cache: CacheWriter, summary: ExtractSummary, log: Callable[[str], None],
         tmp: Path) -> None:
    preps = {name: bb.prep for name, bb in backbones.items() if bb.prep is not None}
    settings = FrameSettings(config.frames, config.motion_grid, config.residual_size)
    dtype = np.float16 if config.dtype == "float16" else np.float32
    q: queue.Queue = queue.Queue(maxsize=max(8, 4 * config.batch_size))
    job_q: queue.Queue = queue.Queue()
    for job in jobs:
        job_q.put(job)
    n_workers = min(config.workers, len(jobs))
    stop = threading.Event()

    def worker(slot: int) -> None:
        bar = tqdm(total=0, position=slot + 1, leave=False, unit="frame",
                   disable=not config.progress, dynamic_ncols=True)
        try:
            while not stop.is_set():
                try:
                    job = job_q.get_nowait()
                except queue.Empty:
                    break
                job_preps = {m: preps[m] for m in job.models if m in preps}
                try:
                    if config.gop_normalise and ({"motion", "residual"} & set(job.features)):
                        from vtx.io.transcode import gop_normalise
                        source = job.path
                        job.path = gop_normalise(source, tmp / f"{job.vid}.mp4")
                    decode_video(job, job_preps, config.shots, q.put, settings, progress=bar)
                except VideoError as e:
                    q.put(_VideoFailed(job.vid, str(e)))
                except Exception as e:  # a bug or an unexpected file: never cost other videos
                    if os.environ.get("VTX_DEBUG"):
                        traceback.print_exc()
                    q.put(_VideoFailed(job.vid, f"{type(e).__name__}: {e}"))
        finally:
            bar.close()
            q.put(_WorkerExit())

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n_workers)]
    for t in threads:
        t.start()
    assemblers = {j.vid: _Assembler(j) for j in jobs}
    pending: dict[str, list[_Item]] = {m: [] for m in backbones}
    bar = tqdm(total=len(jobs), position=0, unit="video", desc="extract",
               disable=not config.progress, dynamic_ncols=True)

    def run_batch(model: str) -> None:
        items, pending[model] = pending[model], []
        if items:
            for vid in _run_model(backbones[model], items, assemblers.get):
                finish(vid)

    def finish(vid: int) -> None:
        a = assemblers.get(vid)
        if a is None or not a.complete():
            return
        del assemblers[vid]
        _write(a, backbones, config, cache, dtype)
        summary.done += 1
        summary.shots += len(a.done.fixed["shots"])
        summary.video_seconds += float(a.done.attrs["duration_s"])
        bar.update()

    active = n_workers
    try:
        while active:
            msg = q.get()
            if isinstance(msg, _WorkerExit):
                active -= 1
            elif isinstance(msg, _Item):
                pending[msg.model].append(msg)
                if len(pending[msg.model]) >= config.batch_size:
                    run_batch(msg.model)
            elif isinstance(msg, _Direct):
                if msg.vid in assemblers:
                    assemblers[msg.vid].add_direct(msg)
            elif isinstance(msg, _VideoDone):
                assemblers[msg.vid].done = msg
                finish(msg.vid)
            elif isinstance(msg, _VideoFailed):
                job = assemblers.pop(msg.vid).job
                for m in pending:
                    pending[m] = [p for p in pending[m] if p.vid != msg.vid]
                reason = " ".join(msg.reason.split())
                log(f"vtx: failed: {job.relpath}: {reason}")
                cache.write_failure(job.key, job.relpath, reason)
                summary.failed += 1
                summary.failures.append((job.relpath, reason))
                bar.update()
        for m in list(pending):
            run_batch(m)
        for vid, a in list(assemblers.items()):  # never drop a video silently
            reason = "internal error: the video's features were not all computed"
            log(f"vtx: failed: {a.job.relpath}: {reason}")
            cache.write_failure(a.job.key, a.job.relpath, reason)
            summary.failed += 1
            summary.failures.append((a.job.relpath, reason))
    finally:
        stop.set()
        bar.close()
        while any(t.is_alive() for t in threads):  # unblock workers waiting on a full queue
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass


def _write(a: _Assembler, backbones: dict[str, Backbone], config: ExtractConfig,
           cache: CacheWriter, dtype) -> None:
    """Persist one complete video: only the datasets it lacked (all of them if replaced)."""
    job, done = a.job, a.done
    fixed = done.fixed
    n_shots = len(fixed["shots"])
    n_frames = len(fixed.get("frames", []))
    wanted = {d for f in job.features for d in FEATURE_DATASETS[f]}
    datasets: dict[str, tuple[np.ndarray, dict]] = {}
    if job.known_shots is None:
        datasets["shots"] = (fixed["shots"], {"description": "[first frame, one past last "
                                              "frame] in decode order",
                                              **_shot_attrs(config.shots)})
        datasets["shot_times"] = (fixed["shot_times"],
                                  {"units": "seconds from the video stream start (PTS)"})
    if "frames" in fixed and job.known_frames is None:
        sampling = {"sampling": config.frames.describe(), "config": config.frames.to_json()}
        datasets["frames"] = (fixed["frames"], {"description": "decode-order frame indices",
                                                **sampling})
        datasets["frame_times"] = (fixed["frame_times"],
                                   {"units": "seconds from the video stream start (PTS)"})
    for model, bb in backbones.items():
        for name in bb.outputs:
            if name not in wanted:
                continue
            if model in ("resnet18", "r2plus1d"):
                n = n_shots
            elif model == "vggish":
                n = done.counts.get("vggish", 0)
            else:
                n = n_frames
            shape = (196, bb.spec.dim) if name == "vit_patches" else (bb.spec.dim,)
            arr = a.stacked(name, n, shape)
            store = np.float16 if name == "vit_patches" else dtype
            attrs = {**bb.attrs(name), "dtype": np.dtype(store).name, "level": bb.spec.level}
            datasets[name] = (arr.astype(store), attrs, 1 if name == "vit_patches" else None)
    if "vggish" in wanted:
        datasets["vggish_times"] = (fixed["vggish_times"].reshape(-1, 2).astype(np.float64),
                                    {"units": "seconds from the video stream start; each row "
                                              "is one 0.96 s example [start, end)"})
    motion_attrs = {"model": "codec", "weights": "codec", "weights_file": "",
                    "sampling": config.frames.describe(), "level": "frame"}
    g = config.motion_grid
    if "motion" in wanted:
        for name in ("motion", "motion_accumulated"):
            datasets[name] = (a.stacked(name, n_frames, (2, g, g)).astype(np.float32),
                              {**motion_attrs, "dim": 2 * g * g, "dtype": "float32",
                               "layout": f"(n_frames, 2 [x, y], {g}, {g}) pixels; "
                                         "src = dst + motion (past reference)",
                               "gop_normalised": bool(config.gop_normalise)})
        datasets["frame_types"] = (fixed["frame_types"], {"values": "I, P or B"})
    if "residual" in wanted:
        s = config.residual_size
        datasets["residual"] = (a.stacked("residual", n_frames, (3, s, s)).astype(np.float16),
                                {**motion_attrs, "dim": 3 * s * s, "dtype": "float16",
                                 "layout": f"(n_frames, 3 [RGB], {s}, {s}) in units of 1/255",
                                 "gop_normalised": bool(config.gop_normalise)})
    attrs = dict(done.attrs)
    if "vggish" in wanted:
        attrs["has_audio"] = bool(done.attrs.get("has_audio")) and len(fixed["vggish_times"]) > 0
    cache.write_video(job.key, attrs, datasets, replace=job.replace)


def _shot_attrs(shots: ShotConfig) -> dict:
    d = json.loads(shots.to_json())
    return {"detector": d["detector"], "threshold": d["threshold"],
            "min_shot_len": d["min_shot_len"],
            "max_shot_len": d["max_shot_len"] if d["max_shot_len"] is not None else 0.0}

