"""Stage 1: the one-pass extractor (``vtx extract``).

Each video is decoded once; the work is split by concern:

* :mod:`vtx.pipeline.producer`: one video's decode pass (:class:`VideoProducer`): shots, sampled
  frames, model inputs, codec arrays and audio examples;
* :mod:`vtx.pipeline.runner`: decode threads, the bounded queue and the model batches across
  videos (:func:`run_jobs`, :class:`BatchRunner`);
* :mod:`vtx.io.schema`: a finished video's arrays as the cache's datasets and attrs;
* :mod:`vtx.io.cache`: crash-safe writes and resume.

This module decides what to do: which videos, which of their features are missing (resume),
which models to load; :func:`extract` runs it into a cache, :func:`extract_video` runs one video
into memory (for ``vtx predict``). What each feature is comes from :mod:`vtx.features`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, NamedTuple, TextIO

import numpy as np

from vtx.errors import CacheMismatch, UsageError
from vtx.features import (ALL_FEATURES, DEFAULT_FEATURES, FEATURES, FeatureSpec,
                          follows_grid_view, grid_view, parse_features, resolve)
from vtx.io import schema
from vtx.io.cache import CacheWriter, video_key
from vtx.io.claims import DEFAULT_LEASE_S, Claims, LocksUnsupported, check_locks
from vtx.io.space import writable_reason
from vtx.pipeline.backbones import (THUMBNAIL, Backbone, ThumbnailPrep, grid_prep,
                                    load_backbones, resolve_device, resolve_precision)
from vtx.pipeline.codec import codec_attrs
from vtx.pipeline.producer import FRAME_THUMBNAIL, FrameSettings, VideoJob, VideoProducer
from vtx.pipeline.runner import (BatchRunner, JobSkipped, OnBatch, VideoAssembler, one_blas_thread,
                                 run_jobs)
from vtx.pipeline.sampling import FrameSampling
from vtx.pipeline.sharding import auto_device, parse_shard
from vtx.pipeline.shots import ShotConfig

__all__ = ["ExtractConfig", "ExtractSummary", "VideoFeatures", "VideoInput", "FrameSettings",
           "discover_videos", "LIST_SUFFIXES",
           "extract", "extract_video", "feature_specs", "parse_features", "DEFAULT_FEATURES",
           "VIDEO_EXTENSIONS"]

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts",
                    ".flv", ".wmv", ".3gp")
LIST_SUFFIXES = (".txt", ".lst", ".list")
"""A ``--videos`` file with one of these suffixes is a list of paths, not a video."""

def feature_specs(features: str | Sequence[str | FeatureSpec],
                  vit_weights: str | None = None) -> tuple[FeatureSpec, ...]:
    """``ExtractConfig.features`` as specs, in order, without repeats.

    Args:
        features: a ``--features`` string, or names, ``tv:`` specs and :class:`FeatureSpec`.
        vit_weights: ``--vit-weights``: the weights member of the built-in ViT run (``vit``,
            ``vit_patches``).

    Raises:
        UsageError: an unknown feature or weights member.
    """
    vit = FEATURES["vit"].model_key
    out: dict[str, FeatureSpec] = {}
    for item in [features] if isinstance(features, str) else features:
        for spec in (item,) if isinstance(item, FeatureSpec) else parse_features(item):
            if vit_weights and spec.builtin and spec.model_key == vit:
                spec = spec.with_weights(vit_weights)
            out.setdefault(spec.name, spec)
    if not out:
        raise UsageError(f"no feature given; valid features: {', '.join(ALL_FEATURES)}, "
                         f"all, or tv:<torchvision builder>")
    return tuple(out.values())


@dataclass
class ExtractConfig:
    """Options of ``vtx extract``; the CLI maps its flags one-to-one onto these fields.

    ``videos`` is one input or several: folders, video files, list files or ``-``
    (:func:`discover_videos`). ``features`` takes built-in names, ``tv:`` specs (``"resnet18,tv:mobilenet_v3_small@frame"``)
    or :class:`FeatureSpec` objects (:func:`feature_specs`).

    Every spatial grid (``vit_patches``, ``motion``, ``residual``) covers the ViT's centre crop
    of the display-rotated frame; ``full_frame_grids`` makes them, and the ViT itself (``vit``
    too), cover the whole frame instead (``--full-frame-grids``). One cache holds one view.
    """

    videos: Path | Sequence[Path]
    out: Path
    features: str | Sequence[str | FeatureSpec] = DEFAULT_FEATURES
    device: str = "auto"
    precision: str = "auto"  # --precision: auto, fp32, bf16, fp16 (backbones.resolve_precision)
    shots: ShotConfig = field(default_factory=ShotConfig)
    frames: FrameSampling = field(default_factory=FrameSampling)
    weights: str = "official"
    weights_dir: Path | None = None
    vit_weights: str = "IMAGENET1K_V1"
    vggish_pca: bool = False
    motion_grid: int = 14
    residual_size: int = 56
    gop_normalise: bool = False
    full_frame_grids: bool = False
    overwrite: bool = False
    batch_size: int = 16
    workers: int = 1
    globs: tuple[str, ...] = ()
    dtype: str = "float16"
    progress: bool = True
    seed: int = 0
    shard: str | None = None
    merge: bool = True
    lease_s: float = DEFAULT_LEASE_S
    engine: str = "local"
    address: str | None = None
    ray_workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


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
    others: int = 0  # videos another worker was computing (or finished meanwhile)
    shard: str | None = None  # "K/N" when --shard picked a subset
    pending: int = 0  # finished videos not merged (--no-merge)
    load_s: float = 0.0  # of wall_s, loading the models (not in to_dict or line)

    @property
    def throughput(self) -> float:
        """Video-seconds extracted per wall-clock second."""
        return self.video_seconds / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {"output": self.output, "done": self.done, "skipped": self.skipped,
                "failed": self.failed, "shots": self.shots,
                "video_seconds": round(self.video_seconds, 3), "wall_s": round(self.wall_s, 3),
                "throughput": round(self.throughput, 3),
                "failures": [{"path": p, "reason": r} for p, r in self.failures],
                "other_workers": self.others, "shard": self.shard, "not_merged": self.pending}

    def line(self) -> str:
        others = f", {self.others} left to other workers" if self.others else ""
        shard = f" (shard {self.shard})" if self.shard else ""
        merge = (f" ({self.pending} finished part(s) not merged: run vtx merge {self.output})"
                 if self.pending else "")
        return (f"videos{shard}: {self.done} done, {self.skipped} skipped, {self.failed} failed"
                f"{others} | shots: {self.shots} | wall: {self.wall_s:.1f} s | "
                f"throughput: {self.throughput:.2f} video-s/s | cache: {self.output}{merge}")


class VideoInput(NamedTuple):
    """One video to extract, as :func:`discover_videos` found it.

    Attributes:
        path: the file to decode.
        relpath: its POSIX path relative to the base folder (see :func:`discover_videos`); the
            cache key is :func:`vtx.io.cache.video_key` of it.
        error: why it cannot be extracted (a listed file that does not exist), else None.
    """

    path: Path
    relpath: str
    error: str | None = None


def discover_videos(inputs: str | os.PathLike | Sequence[str | os.PathLike],
                    globs: tuple[str, ...] = (), stdin: TextIO | None = None) -> list[VideoInput]:
    """The videos to extract from ``--videos`` inputs, sorted by relative path, without repeats.

    Each input is a folder (searched recursively: ``globs`` relative to it, such as
    ``**/*.mp4``, or every file with a common video extension), a video file, a list file
    (suffix ``.txt``, ``.lst`` or ``.list``: one path per line, relative to the list file's
    folder unless absolute; blank lines and lines starting with ``#`` are skipped; a listed
    folder is searched like a folder input), or ``-`` (the same list read from ``stdin``, paths
    relative to the current folder).

    Relative paths (and so cache keys) are taken from the *base folder*: the deepest folder
    that holds every input and every video. A folder input counts as itself, a list file as its
    own folder, ``-`` as the current folder, and a video file as its folder. So one folder gives
    paths relative to it, one file gives its name, a list gives the paths as listed, and videos
    with the same name in different folders keep distinct keys.

    Args:
        inputs: one input or several.
        globs: patterns for folder inputs [default: :data:`VIDEO_EXTENSIONS`].
        stdin: where ``-`` reads [default: ``sys.stdin``].

    Returns:
        One :class:`VideoInput` per video; a listed file that does not exist is included with
        ``error`` set (``extract`` records it as a failed video).

    Raises:
        UsageError: an input (not a listed entry) that does not exist, or no input.
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not items:
        raise UsageError("no --videos given; give a folder, a video file, a list file or -")
    anchors: list[str] = []
    found: dict[str, tuple[Path, str | None]] = {}  # absolute path -> (path, error)

    def add(path: Path, error: str | None = None) -> None:
        found.setdefault(_absolute(path), (path, error))

    def add_folder(folder: Path) -> None:
        anchors.append(_absolute(folder))
        for p in _scan_folder(folder, globs):
            add(p)

    for item in items:
        if str(item) == "-":
            anchors.append(_absolute(Path.cwd()))
            entries = _read_list(stdin if stdin is not None else sys.stdin, Path.cwd(), "stdin")
        else:
            root = Path(item)
            if root.is_dir():
                add_folder(root)
                continue
            if not (root.is_file() or root.is_symlink()):
                raise UsageError(f"--videos {root} does not exist; give a folder of videos, a "
                                 f"video file, a list file ({', '.join(LIST_SUFFIXES)}: one "
                                 f"path per line) or - to read paths from stdin")
            if root.suffix.lower() not in LIST_SUFFIXES:
                anchors.append(_absolute(root.parent))
                add(root)
                continue
            anchors.append(_absolute(root.parent))
            try:
                with open(root, encoding="utf-8") as fh:
                    entries = _read_list(fh, root.parent, str(root))
            except (OSError, UnicodeDecodeError) as e:
                raise UsageError(f"--videos {root}: cannot read this list file ({e}); give a "
                                 f"UTF-8 text file with one video path per line") from e
        for path, where in entries:
            if path.is_dir():
                add_folder(path)
            elif path.is_file() or path.is_symlink():
                add(path)
            else:
                add(path, f"does not exist (listed in {where})")

    if not found:
        return []
    base = os.path.commonpath(anchors + [os.path.dirname(a) for a in found])
    videos = [VideoInput(path, Path(os.path.relpath(a, base)).as_posix(), error)
              for a, (path, error) in found.items()]
    return sorted(videos, key=lambda v: PurePosixPath(v.relpath).parts)


def _absolute(path: Path) -> str:
    """``path`` made absolute and normalised, symbolic links kept (as the user named it)."""
    return os.path.normpath(os.path.abspath(path))


def _scan_folder(root: Path, globs: tuple[str, ...]) -> list[Path]:
    if globs:
        found = {p for g in globs for p in root.glob(g)}
    else:
        found = {p for p in root.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS}
    return sorted(p for p in found if p.is_file() or p.is_symlink())


def _read_list(lines: Iterable[str], folder: Path, source: str) -> list[tuple[Path, str]]:
    """A list's entries: (path, where it was listed) per line that is not blank or a comment;
    relative paths are taken relative to ``folder``."""
    entries = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        path = Path(text).expanduser()
        entries.append((path if path.is_absolute() else folder / path, f"{source} line {number}"))
    return entries


# ----------------------------------------------------------------------------- the run
def extract(config: ExtractConfig, log: Callable[[str], None] | None = None,
            on_batch: OnBatch | None = None, inputs: Sequence[VideoInput] | None = None,
            models: dict | None = None) -> ExtractSummary:
    """Run stage 1 over ``config.videos`` into ``config.out``. See :class:`ExtractConfig`.

    Args:
        log: receives one line per failed video [default: stderr].
        on_batch: called after every model batch with ``(model_key, n_items, seconds)`` (the
            timing hook of ``bench/``); the models' load time is ``ExtractSummary.load_s``.
        inputs: the videos, as :func:`discover_videos` found them, instead of discovering
            ``config.videos`` (a distributed worker is handed its videos with their keys).
        models: a dict kept between calls: loaded backbones are stored in it and reused (a
            worker that runs many calls loads each model once).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    t0 = time.perf_counter()
    specs = feature_specs(config.features, config.vit_weights)
    if config.dtype not in ("float16", "float32"):
        raise UsageError("--dtype must be float16 or float32")
    if config.batch_size < 1 or config.workers < 1:
        raise UsageError("--batch-size and --workers must be at least 1")
    if config.motion_grid < 1 or config.residual_size < 1:
        raise UsageError("--motion-grid and --residual-size must be at least 1")
    if config.engine == "ray" and inputs is None:  # the workers resolve device and precision
        from vtx.pipeline.ray_engine import run_on_ray
        return run_on_ray(config, log)
    if config.engine not in ("local", "ray"):
        raise UsageError(f"--engine {config.engine!r}: use local or ray")
    shard = parse_shard(config.shard)
    device = resolve_device(auto_device(config.device) if shard else config.device)
    precision = resolve_precision(config.precision, device)
    videos = list(inputs) if inputs is not None else discover_videos(config.videos,
                                                                      config.globs)
    if not videos:
        pattern = ", ".join(config.globs) or "common video extensions"
        given = config.videos if isinstance(config.videos, (str, os.PathLike)) else \
            ", ".join(map(str, config.videos))
        raise UsageError(f"no videos found in {given} ({pattern}); check --videos "
                         f"and --glob")
    summary = ExtractSummary(output=str(config.out), shard=str(shard) if shard else None)
    if shard is not None:
        videos = [v for v in videos if shard.owns(v.relpath)]
    claims_dir = Path(config.out).with_name(Path(config.out).name + ".claims")
    locks = _locks_work(Path(config.out).parent, config, shard)
    with CacheWriter(config.out, overwrite=config.overwrite, merge=config.merge,
                     claims=claims_dir) as cache:
        jobs, planned = plan_run(cache, config, specs, videos, summary, log)
        if jobs:
            t_load = time.perf_counter()
            needed = {s.name: s for j in jobs for s in j.features}
            # a worker that keeps its models loads every requested feature's model once
            load = (tuple(specs) if models is not None else tuple(needed.values()),
                    config.weights, config.weights_dir, device,
                    config.seed, config.vggish_pca, config.full_frame_grids, precision)
            backbones = models.get(load) if models is not None else None
            if backbones is None:
                backbones = load_backbones(load[0], config.weights, config.weights_dir, device,
                                           seed=config.seed, pca=config.vggish_pca,
                                           full_frame=config.full_frame_grids,
                                           precision=precision)
                if models is not None:
                    models[load] = backbones
            summary.load_s = time.perf_counter() - t_load
            with tempfile.TemporaryDirectory(prefix="vtx-gop-") as tmp, \
                    Claims(claims_dir, config.lease_s, locks, log) as claims:
                _Run(config, backbones, cache, summary, log, Path(tmp), claims, planned,
                     specs).run(jobs, on_batch)
    if not config.merge and cache.read_only is None:
        summary.pending = len(cache.pending_parts())
    summary.wall_s = time.perf_counter() - t0
    return summary


def run_grid(config: ExtractConfig, specs: tuple[FeatureSpec, ...]):
    """The run's grid view (:func:`vtx.pipeline.backbones.grid_prep`), or None when no
    requested feature depends on it (building it needs torchvision, which a run without image
    models does not import)."""
    if not any(s.kind == "codec" or follows_grid_view(s) for s in specs):
        return None
    return grid_prep(config.vit_weights, config.full_frame_grids)


def plan_run(cache: CacheWriter, config: ExtractConfig, specs: tuple[FeatureSpec, ...],
             videos: list[VideoInput], summary: ExtractSummary, log: Callable[[str], None]
             ) -> tuple[list[VideoJob], dict[str, int | None]]:
    """What a run (local or a distributed driver) does with an open cache before any model
    runs: refuse other settings than the cache's, set its root attrs, record listed files that
    do not exist as failures, and plan the jobs (:func:`_jobs`).

    Raises:
        CacheMismatch: other shot, frame or feature settings than the cache's.
        ReadOnly: videos need extracting into a read-only cache.
    """
    official = config.weights == "official"
    grid = run_grid(config, specs)
    view = grid.view if grid is not None else None
    wanted = {s.name: s.identity(config.weights, pca=config.vggish_pca and official,
                                 gop=config.gop_normalise, view=view) for s in specs}
    frame_level = any(s.level == "frame" for s in specs)
    _check_settings(cache.root_attrs(), config, wanted, frame_level)
    attrs = {"shot_config": config.shots.to_json(),
             "features": json.dumps(wanted, sort_keys=True)}
    if frame_level:
        attrs["frame_config"] = config.frames.to_json()
    cache.set_root_attrs(**attrs)
    for v in videos:
        if v.error:  # a listed file that does not exist fails like a bad video
            record_failure(cache, summary, log, v.relpath, v.error)
    jobs, planned = _jobs([v for v in videos if not v.error], specs, cache, summary)
    if jobs:
        cache.require_writable(f"{len(jobs)} of {len(videos)} video(s) need extracting")
    elif cache.read_only is not None:
        log(f"vtx: note: {config.out} is read-only ({cache.read_only}); every video is "
            f"already in it, so there is nothing to do")
    return jobs, planned


def _locks_work(folder: Path, config: ExtractConfig, shard) -> bool:
    """Whether ``flock`` works where the cache lives (:func:`vtx.io.claims.check_locks`).

    Without working locks, workers can only share a cache when each has its own shard and
    none merges (``--shard K/N --no-merge``, then ``vtx merge``): claims then rely on their
    lease alone. Otherwise the run stops with :class:`LocksUnsupported`.
    """
    if writable_reason(folder) is not None:
        return True  # a read-only cache: nothing will be claimed or merged
    try:
        check_locks(folder)
        return True
    except LocksUnsupported:
        if shard is not None and not config.merge:
            return False
        raise


def _jobs(videos: list[VideoInput], specs: tuple[FeatureSpec, ...], cache: CacheWriter,
          summary: ExtractSummary) -> tuple[list[VideoJob], dict[str, int | None]]:
    """One job per video that lacks a requested feature; a video already in the cache (same
    size) keeps its shots and sampled frames and computes only the missing features.

    Returns:
        the jobs, and the version (time) of every job's video the plan was made from (None:
        not in the cache), which a worker compares after claiming the video.
    """
    current = cache.versions()
    jobs, planned = [], {}
    for path, rel, _ in videos:
        key = video_key(rel)
        entry = current.get(key)
        job = _plan(len(jobs), path, rel, key, specs, entry, cache)
        if job is None:
            summary.skipped += 1
            continue
        jobs.append(job)
        planned[key] = entry.time if entry is not None else None
    return jobs, planned


def _plan(vid: int, path: Path, rel: str, key: str, specs: tuple[FeatureSpec, ...],
          entry, cache: CacheWriter) -> VideoJob | None:
    """The job for one video given its cached version ``entry`` (None when not cached);
    None when nothing is missing."""
    try:
        size = path.stat().st_size
    except OSError:
        size = -1
    record = entry.record if entry is not None else None
    if record is None or record["size_bytes"] != size:
        return VideoJob(vid, path, rel, key, specs, replace=True)
    have = set(record["datasets"])
    missing = tuple(s for s in specs if not set(s.dataset_names) <= have)
    if not missing:
        return None
    job = VideoJob(vid, path, rel, key, missing, replace=False,
                   known_shots=cache.read_dataset(key, "shots"))
    if "frames" in have:
        job.known_frames = cache.read_dataset(key, "frames")
    return job


def record_failure(cache: CacheWriter, summary: ExtractSummary, log: Callable[[str], None],
                    relpath: str, reason: str) -> None:
    """One failed video: a line on ``log``, a ``/failures`` record and the summary's count
    (also the distributed drivers' way to record one, :mod:`vtx.pipeline.ray_engine`)."""
    log(f"vtx: failed: {relpath}: {reason}")
    cache.write_failure(video_key(relpath), relpath, reason)
    summary.failed += 1
    summary.failures.append((relpath, reason))


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
    _check_grid_views(have, wanted, config, fix)


def _check_grid_views(have: dict[str, str], wanted: dict[str, str], config: ExtractConfig,
                      fix: str) -> None:
    """Every spatial grid of one cache covers one image region: refuse a run whose grids
    (ViT patches, motion, residuals) would cover another region than those already cached."""
    grids = {name: (spec, identity) for name, identity in {**have, **wanted}.items()
             if (spec := resolve(name)) is not None and spec.spatial}
    if not grids:
        return
    crop = grid_prep(config.vit_weights).view
    views = {}
    for name, (spec, identity) in grids.items():
        view = grid_view(spec, identity, default=crop)
        if view is not None:
            views[name] = view
    if len(set(views.values())) > 1:
        desc = ", ".join(f"{n}: {v}" + (" (cached)" if n in have and n not in wanted else "")
                         for n, v in sorted(views.items()))
        raise CacheMismatch(
            f"the spatial grids of one cache must cover one image region, but these would "
            f"not ({desc}); 'legacy' grids come from an older vtx (whole coded frame, not "
            f"rotated). Rerun with the cache's view (--full-frame-grids or not, the same "
            f"--vit-weights), or {fix}")


class _Run:
    """One ``extract`` run's producers and writer, handed to :func:`run_jobs`."""

    def __init__(self, config: ExtractConfig, backbones: dict[str, Backbone],
                 cache: CacheWriter, summary: ExtractSummary, log: Callable[[str], None],
                 tmp: Path, claims: Claims, planned: dict[str, int | None],
                 specs: tuple[FeatureSpec, ...]):
        self.config, self.backbones, self.cache = config, backbones, cache
        self.summary, self.log, self.tmp = summary, log, tmp
        self.claims, self.planned, self.specs = claims, planned, specs
        self.preps = {k: bb.prep for k, bb in backbones.items() if bb.prep is not None}
        self.settings = FrameSettings(config.frames, config.motion_grid, config.residual_size,
                                      run_grid(config, specs))
        self.schema = schema.RunSchema(dtype=config.dtype, shot_config=config.shots.to_json(),
                                       frame_sampling=config.frames.describe(),
                                       frame_config=config.frames.to_json(),
                                       sizes=self.settings.sizes)

    def run(self, jobs: list[VideoJob], on_batch: OnBatch | None) -> None:
        runner = BatchRunner(self.backbones, self.config.batch_size, on_batch)
        run_jobs(jobs, runner, self.produce, workers=self.config.workers, on_video=self.write,
                 on_failure=self.fail, on_skip=self.skip, progress=self.config.progress)

    def claim(self, job: VideoJob) -> None:
        """Claim the job's video before decoding it (:mod:`vtx.io.claims`), and plan it again
        when another worker changed it since this run listed the cache.

        Raises:
            JobSkipped: another worker holds the video, or finished it meanwhile.
        """
        if not self.claims.acquire(job.key):
            raise JobSkipped("another worker is extracting it")
        try:
            now = self.cache.claimed(job.key)  # (also deletes a killed worker's unfinished part)
            if (now.time if now is not None else None) == self.planned.get(job.key):
                return
            # another worker wrote this video since the run started: plan it from that version
            entry = self.cache.versions_of(job.key, now)
            fresh = _plan(job.vid, job.path, job.relpath, job.key, self.specs, entry,
                          self.cache)
            if fresh is None:
                raise JobSkipped("another worker extracted it meanwhile")
            if any(s.model_key not in self.backbones for s in fresh.features
                   if s.kind != "codec"):
                raise JobSkipped("another worker changed it meanwhile; rerun to complete it")
            job.features, job.replace = fresh.features, fresh.replace
            job.known_shots, job.known_frames = fresh.known_shots, fresh.known_frames
        except BaseException:
            self.claims.release(job.key)
            raise

    def produce(self, job: VideoJob, emit: Callable[[object], None], bar) -> None:
        """In a decode thread: claim the video, then run its producer (re-encoded first with
        --gop-normalise)."""
        self.claim(job)
        if self.config.gop_normalise and any(s.kind == "codec" for s in job.features):
            from vtx.io.transcode import gop_normalise
            job.path = gop_normalise(job.path, self.tmp / f"{job.vid}.mp4")
        VideoProducer(job, self.preps, self.config.shots, emit, self.settings,
                      progress=bar).run()

    def write(self, a: VideoAssembler) -> None:
        """Persist one complete video: only the datasets it lacked (all of them if replaced)."""
        job, done = a.job, a.done
        attrs, datasets = schema.video_entry(
            done.attrs, a.arrays(), job.features,
            {s.name: self.feature_attrs(s, done.attrs) for s in job.features}, self.schema,
            shots=job.known_shots is None, frames=job.known_frames is None)
        try:
            written = self.cache.write_video(job.key, attrs, datasets, replace=job.replace)
        finally:
            self.claims.release(job.key)
        if not written:
            self.fail(job, "removed from the cache during this run (vtx check --repair?); "
                           "rerun the same command to extract it again")
            return
        self.summary.done += 1
        self.summary.shots += len(done.fixed["shots"])
        self.summary.video_seconds += done.video_seconds  # attrs lack it when audio-only

    def fail(self, job: VideoJob, reason: str) -> None:
        try:
            record_failure(self.cache, self.summary, self.log, job.relpath, reason)
        finally:
            self.claims.release(job.key)

    def skip(self, job: VideoJob, reason: str) -> None:
        """A video another worker has (:meth:`claim`): counted, not failed."""
        self.summary.others += 1

    def feature_attrs(self, spec: FeatureSpec, video: dict) -> dict:
        """The dataset attrs of ``spec`` for one video (``video``: its attrs); a spatial grid
        also records the region it covers (``region``, ``rotation``, ``view``)."""
        if spec.kind == "codec":
            attrs = codec_attrs(spec, self.config.frames.describe(), self.config.gop_normalise,
                                self.settings.sizes, self.settings.grid.view)
        else:
            attrs = self.backbones[spec.model_key].attrs(spec.name)
        if spec.spatial:
            grid = self.settings.grid
            width, height, rotation = (int(video["width"]), int(video["height"]),
                                       int(video.get("rotation", 0)))
            attrs.update(region=np.round(grid.region(width, height, rotation), 3),
                         rotation=rotation, view=grid.view)
        return attrs


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
                  features: Sequence[str | FeatureSpec] | None = None) -> VideoFeatures:
    """Extract one video with the same one-pass code as ``vtx extract``, into memory.

    Args:
        backbones: ``model_key`` -> loaded backbone (:func:`load_backbones`).
        features: the features to compute [default: every feature of the backbones]; codec
            features need no backbone.

    Raises:
        VideoError: the file cannot be decoded.
    """
    path = Path(path)
    specs = (feature_specs(features) if features is not None else
             tuple(s for bb in backbones.values() for s in bb.specs))
    job = VideoJob(0, path, path.name, video_key(path.name), specs, replace=True)
    runner = BatchRunner(backbones, batch_size)
    a = runner.open(job)
    preps = {k: bb.prep for k, bb in backbones.items() if bb.prep is not None}
    with one_blas_thread():
        VideoProducer(job, preps, shot_config, runner.put, settings,
                      thumbnail=ThumbnailPrep() if thumbnails else None).run()
    runner.flush()
    done = a.done
    n_shots, n_frames = done.rows["shot"], done.rows["frame"]
    arrays = a.arrays(skip=(THUMBNAIL, FRAME_THUMBNAIL))
    out = {name: arrays[name].astype(np.float32) for name in a.items if name in arrays}
    sizes = (settings or FrameSettings()).sizes
    for spec in specs:  # a feature without rows (no audio) has zero rows, as in a cache
        for d in spec.datasets:
            if d.name not in out and d.name not in done.fixed:
                out[d.name] = np.zeros((0, *spec.shape(d, sizes)), np.float32)
    thumbs = [a.items[THUMBNAIL][-1 - i] for i in range(n_shots)] if thumbnails else None
    frame_thumbs = ([a.items[FRAME_THUMBNAIL][i] for i in range(n_frames)]
                    if thumbnails and n_frames else None)
    return VideoFeatures(attrs=done.attrs, shots=done.fixed["shots"],
                         shot_times=done.fixed["shot_times"], features=out, fixed=done.fixed,
                         thumbnails=thumbs, frame_thumbnails=frame_thumbs)
