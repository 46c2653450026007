"""Stage 1: the one-pass extractor (``vtx extract``).

Each video is decoded once (:class:`vtx.io.decode.VideoReader`). Every decoded frame is handed,
in the same loop, to the shot detector and to each feature's :class:`FramePrep`, which reduces it
to the model's input size straight away; a bounded :class:`ShotBuffer` keeps only those reduced
frames of the current shot. When a shot closes, its sampled frames go to the model thread.

Threads: ``workers`` decode threads (one video each) feed a bounded queue; the main thread batches
shots across videos through the backbones and writes each finished video to the cache. The
queue bound keeps memory constant whatever the number or length of the videos.
"""

from __future__ import annotations

import json
import os
import queue
import sys
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
from vtx.io.cache import CacheWriter, video_key
from vtx.io.decode import VideoReader
from vtx.pipeline.backbones import (Backbone, FramePrep, get_spec, load_backbone,
                                    resolve_device, sample_indices)
from vtx.pipeline.shots import KnownShots, ShotBuffer, ShotConfig, ShotDetector, split_shot

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts",
                    ".flv", ".wmv", ".3gp")
DEFAULT_FEATURES = ("resnet18", "r2plus1d")


@dataclass
class ExtractConfig:
    """Options of ``vtx extract``; the CLI maps its flags one-to-one onto these fields."""

    videos: Path
    out: Path
    features: tuple[str, ...] = DEFAULT_FEATURES
    device: str = "auto"
    shots: ShotConfig = field(default_factory=ShotConfig)
    weights: str = "official"
    weights_dir: Path | None = None
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
    vid: int
    path: Path
    relpath: str
    key: str
    features: tuple[str, ...]
    replace: bool
    known_shots: np.ndarray | None = None


@dataclass
class _ShotInput:
    vid: int
    shot: int
    frames: dict[str, np.ndarray]  # feature -> uint8 (T, H, W, 3)


@dataclass
class _VideoDone:
    vid: int
    attrs: dict
    shots: np.ndarray
    shot_times: np.ndarray


@dataclass
class _VideoFailed:
    vid: int
    reason: str


class _WorkerExit:
    pass


def decode_video(job: _Job, preps: dict[str, FramePrep], shot_config: ShotConfig,
                 emit: Callable[[object], None], capacity: int = 300,
                 progress: tqdm | None = None) -> None:
    """Decode one video once; emit a :class:`_ShotInput` per shot, then :class:`_VideoDone`."""
    with VideoReader(job.path) as reader:
        info = reader.info
        if job.known_shots is not None:
            detector = KnownShots(job.known_shots)
        else:
            detector = ShotDetector(shot_config, (info.width, info.height), reader.frame_rate)
        buffer = ShotBuffer(capacity=capacity)
        shots: list[tuple[int, int]] = []
        times: list[tuple[float, float]] = []
        start = 0
        if progress is not None:
            progress.reset(total=info.n_frames_expected or None)
            progress.set_description(job.relpath[-40:])

        def close(end: int, end_time: float) -> None:
            nonlocal start
            if end <= start:
                return
            start_time = buffer.time_of(start)
            pieces = ([(start, end)] if job.known_shots is not None else
                      split_shot(start, end, start_time, end_time, shot_config.max_shot_len))
            for a, b in pieces:
                frames = {}
                for name in preps:
                    pos = buffer.nearest(sample_indices(name, a, b), upto=b)
                    frames[name] = np.stack([buffer.items[p][name] for p in pos])
                emit(_ShotInput(job.vid, len(shots), frames))
                shots.append((a, b))
                times.append((buffer.time_of(a), buffer.time_of(b) if b != end else end_time))
            buffer.release(end)
            start = end

        for frame in reader.frames():
            rgb = frame.av_frame.to_ndarray(format="rgb24")
            cuts = detector.push(frame.index, frame.pts, frame.time_base, rgb)
            buffer.add(frame.index, frame.time,
                       {name: prep(rgb, info.rotation) for name, prep in preps.items()})
            for cut in sorted(cuts):
                close(cut, buffer.time_of(cut))
            if progress is not None:
                progress.update()
        for cut in sorted(detector.finish()):
            close(cut, buffer.time_of(cut))
        close(info.n_frames, info.duration_s)
    attrs = info.attrs()
    attrs.update(path=job.relpath, decode_errors=reader.decode_errors,
                 corrupt_frames=reader.corrupt_frames)
    emit(_VideoDone(job.vid, attrs, np.asarray(shots, dtype=np.int64).reshape(-1, 2),
                    np.asarray(times, dtype=np.float64).reshape(-1, 2)))


class _Assembler:
    """Collects a video's per-shot features from the batched models until it is complete."""

    def __init__(self, job: _Job):
        self.job = job
        self.feats: dict[str, dict[int, np.ndarray]] = {f: {} for f in job.features}
        self.done: _VideoDone | None = None

    def complete(self) -> bool:
        if self.done is None:
            return False
        n = len(self.done.shots)
        return all(len(v) == n for v in self.feats.values())


def weights_identity(name: str, weights: str) -> str:
    spec = get_spec(name)
    return "random" if weights == "random" else f"{spec.weights_enum.__name__}.{spec.default_weights}"


def extract(config: ExtractConfig, log: Callable[[str], None] | None = None) -> ExtractSummary:
    """Run stage 1 over ``config.videos`` into ``config.out``. See :class:`ExtractConfig`."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    t0 = time.perf_counter()
    for name in config.features:
        get_spec(name)
    if config.dtype not in ("float16", "float32"):
        raise UsageError("--dtype must be float16 or float32")
    if config.batch_size < 1 or config.workers < 1:
        raise UsageError("--batch-size and --workers must be at least 1")
    device = resolve_device(config.device)
    videos = discover_videos(Path(config.videos), config.globs)
    if not videos:
        pattern = ", ".join(config.globs) or "common video extensions"
        raise UsageError(f"no videos found under {config.videos} ({pattern}); check --videos "
                         f"and --glob")
    summary = ExtractSummary(output=str(config.out))
    wanted = {f: weights_identity(f, config.weights) for f in config.features}
    with CacheWriter(config.out, overwrite=config.overwrite) as cache:
        _check_settings(cache.root_attrs(), config.shots, wanted)
        cache.set_root_attrs(shot_config=config.shots.to_json(),
                             features=json.dumps(wanted, sort_keys=True))
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
                missing = tuple(f for f in config.features if f not in rec.features)
                if not missing:
                    summary.skipped += 1
                    continue
                jobs.append(_Job(len(jobs), path, rel, key, missing, replace=False,
                                 known_shots=cache.read_dataset(key, "shots")))
            else:
                jobs.append(_Job(len(jobs), path, rel, key, tuple(config.features), replace=True))
        if jobs:
            needed = sorted({f for j in jobs for f in j.features})
            backbones = {f: load_backbone(f, config.weights, config.weights_dir, device,
                                          seed=config.seed) for f in needed}
            _run(jobs, backbones, config, cache, summary, log)
    summary.wall_s = time.perf_counter() - t0
    return summary


def _check_settings(root: dict, shots: ShotConfig, wanted: dict[str, str]) -> None:
    if "shot_config" in root and root["shot_config"] != shots.to_json():
        raise CacheMismatch(
            f"this cache was cut into shots with {root['shot_config']}, not "
            f"{shots.to_json()}; rerun with the same --detector/--threshold/--min-shot-len/"
            f"--max-shot-len, pass --overwrite, or write to another --out")
    have = json.loads(root.get("features", "{}"))
    clash = {f: (have[f], w) for f, w in wanted.items() if f in have and have[f] != w}
    if clash:
        desc = "; ".join(f"{f}: cache has {a}, asked for {b}" for f, (a, b) in clash.items())
        raise CacheMismatch(f"weights differ from the cache's ({desc}); pass --overwrite or "
                            f"write to another --out")


def _run(jobs: list[_Job], backbones: dict[str, Backbone], config: ExtractConfig,
         cache: CacheWriter, summary: ExtractSummary, log: Callable[[str], None]) -> None:
    preps = {name: bb.prep for name, bb in backbones.items()}
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
                job_preps = {f: preps[f] for f in job.features}
                try:
                    decode_video(job, job_preps, config.shots, q.put, progress=bar)
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
    pending: dict[str, list[tuple[int, int, np.ndarray]]] = {f: [] for f in backbones}
    bar = tqdm(total=len(jobs), position=0, unit="video", desc="extract",
               disable=not config.progress, dynamic_ncols=True)

    def run_batch(name: str) -> None:
        items, pending[name] = pending[name], []
        if not items:
            return
        bb = backbones[name]
        for i in range(0, len(items), config.batch_size):
            chunk = items[i:i + config.batch_size]
            x = torch.from_numpy(np.stack([c[2] for c in chunk]))
            out = bb(x.to(bb.mean.device, non_blocking=True)).cpu().numpy()
            for (vid, shot, _), vec in zip(chunk, out):
                if vid in assemblers:
                    assemblers[vid].feats[name][shot] = vec
        for vid in {c[0] for c in items}:
            finish(vid)

    def finish(vid: int) -> None:
        a = assemblers.get(vid)
        if a is None or not a.complete():
            return
        del assemblers[vid]
        job, done = a.job, a.done
        datasets = {}
        if job.replace or job.known_shots is None:
            datasets["shots"] = (done.shots, {"description": "[first frame, one past last frame]"
                                              " in decode order", **_shot_attrs(config.shots)})
            datasets["shot_times"] = (done.shot_times, {"units": "seconds from stream start (PTS)"})
        n = len(done.shots)
        for name, vecs in a.feats.items():
            arr = np.stack([vecs[i] for i in range(n)]).astype(dtype)
            datasets[name] = (arr, {**backbones[name].attrs(), "dtype": config.dtype})
        cache.write_video(job.key, done.attrs, datasets, replace=job.replace)
        summary.done += 1
        summary.shots += n
        summary.video_seconds += float(done.attrs["duration_s"])
        bar.update()

    active = n_workers
    try:
        while active:
            msg = q.get()
            if isinstance(msg, _WorkerExit):
                active -= 1
            elif isinstance(msg, _ShotInput):
                for name, frames in msg.frames.items():
                    pending[name].append((msg.vid, msg.shot, frames))
                    if len(pending[name]) >= config.batch_size:
                        run_batch(name)
            elif isinstance(msg, _VideoDone):
                assemblers[msg.vid].done = msg
                finish(msg.vid)
            elif isinstance(msg, _VideoFailed):
                job = assemblers.pop(msg.vid).job
                for name in pending:
                    pending[name] = [p for p in pending[name] if p[0] != msg.vid]
                reason = " ".join(msg.reason.split())
                log(f"vtx: failed: {job.relpath}: {reason}")
                cache.write_failure(job.key, job.relpath, reason)
                summary.failed += 1
                summary.failures.append((job.relpath, reason))
                bar.update()
        for name in list(pending):
            run_batch(name)
    finally:
        stop.set()
        bar.close()
        while any(t.is_alive() for t in threads):  # unblock workers waiting on a full queue
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass


def _shot_attrs(shots: ShotConfig) -> dict:
    d = json.loads(shots.to_json())
    return {"detector": d["detector"], "threshold": d["threshold"],
            "min_shot_len": d["min_shot_len"],
            "max_shot_len": d["max_shot_len"] if d["max_shot_len"] is not None else 0.0}

