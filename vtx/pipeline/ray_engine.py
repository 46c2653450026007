"""``vtx extract --engine ray``: the same per-video job on a Ray cluster.

The driver (this process) discovers the videos once, opens the cache once (merging what earlier
runs left, checking the settings, planning which videos need work, exactly as a local run
does), then starts *workers*: Ray actors that each load the models once and extract the videos
they are handed, one video per call, with the local pipeline
(:func:`vtx.pipeline.extract.extract` with ``inputs=``). Workers write their parts to the shared
cache themselves, claiming each video first (:mod:`vtx.io.claims`), so the cache and the
videos must be on a filesystem every node sees at the same path. The driver shows one progress
bar, merges at the end and returns the same :class:`ExtractSummary` as a local run.

A worker that dies mid-video (killed, out of memory, its node lost) costs one video: a
replacement worker is started and the video is handed to a worker again. Its claim is taken
over at once when the dead worker's lock was dropped (same machine, or a killed process), or
after ``--lease`` seconds when its machine was lost; until then the video is handed out again
every few seconds. A video whose worker died :data:`MAX_DEATHS` times is recorded as failed,
and one whose claim never frees is counted as failed with the reason: none is dropped
silently, and none is written twice (one claim, one part).

Ray is optional (``pip install 'vtx[ray]'``) and imported only when this engine runs.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from vtx.errors import UsageError, VtxError
from vtx.io.cache import CacheWriter
from vtx.io.claims import LocksUnsupported, check_locks
from vtx.io.space import writable_reason
from vtx.pipeline.extract import (ExtractConfig, ExtractSummary, VideoInput, discover_videos,
                                  extract, feature_specs, plan_run, record_failure)
from vtx.pipeline.sharding import parse_shard
from vtx.progress import progress

__all__ = ["run_on_ray", "MAX_DEATHS", "LOCAL_OBJECT_STORE_BYTES"]

MAX_DEATHS = 3
"""A video whose worker died this many times while extracting it is recorded as failed (a video
that kills every worker, e.g. out of memory, must not kill them all)."""

LOCAL_OBJECT_STORE_BYTES = 256 * 1024 ** 2
"""Object store of the local Ray instance: only videos' names and summaries travel through it."""

WORKER_START_TIMEOUT_S = 300.0
"""With videos left and no worker running, give up after this long (no room on the cluster)."""

RAY_MISSING = "--engine ray needs Ray: pip install 'vtx[ray]'"

LOCAL_ENV = {
    # the local instance binds and advertises 127.0.0.1 only (read when ray is imported)
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage report sent anywhere
}


# ----------------------------------------------------------------------------- the worker
class _Worker:
    """One Ray actor: keeps its models loaded and extracts the videos it is handed.

    Args:
        config: the run's settings for a local run into the shared cache (no merge, no
            progress, no overwrite: the driver does those once).
        threads: torch's CPU threads (the CPUs the actor reserved).
    """

    def __init__(self, config: ExtractConfig, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.config = config
        self.models: dict = {}

    def ready(self) -> int:
        """The worker's process id, once it has started."""
        return os.getpid()

    def run(self, videos: list[VideoInput]) -> tuple[ExtractSummary, list[str]]:
        """Extract ``videos`` into the cache; returns the summary and the lines it logged."""
        lines: list[str] = []
        summary = extract(self.config, log=lines.append, inputs=videos, models=self.models)
        return summary, lines


# ----------------------------------------------------------------------------- the driver
def run_on_ray(config: ExtractConfig, log: Callable[[str], None] | None = None
               ) -> ExtractSummary:
    """Run ``vtx extract`` on Ray workers (see the module's docstring).

    Args:
        config: ``engine``, ``address``, ``ray_workers``, ``cpus_per_worker`` and
            ``gpus_per_worker`` say where and how; the rest as for a local run.
        log: receives one line per failed video and notes [default: stderr].

    Raises:
        UsageError: Ray is not installed, bad worker sizes, no room for one worker, or the
            usual errors of a local run (no videos, settings that differ from the cache's).
        VtxError: the workers cannot start, or a worker stopped the run (as a local run would
            stop: a full disk, a damaged cache).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    t0 = time.perf_counter()
    _check_sizes(config)
    ray = _import_ray(local=config.address is None)
    specs = feature_specs(config.features, config.vit_weights)
    shard = parse_shard(config.shard)
    if config.dtype not in ("float16", "float32"):
        raise UsageError("--dtype must be float16 or float32")
    videos = [v._replace(path=Path(os.path.abspath(v.path)))
              for v in discover_videos(config.videos, config.globs)]
    if not videos:
        pattern = ", ".join(config.globs) or "common video extensions"
        raise UsageError(f"no videos found in {config.videos} ({pattern}); check --videos "
                         f"and --glob")
    if shard is not None:
        videos = [v for v in videos if shard.owns(v.relpath)]
    summary = ExtractSummary(output=str(config.out), shard=str(shard) if shard else None)
    out = Path(os.path.abspath(config.out))
    if writable_reason(out.parent) is None:
        _check_locks(out.parent)
    with CacheWriter(out, overwrite=config.overwrite, merge=config.merge,
                     claims=out.with_name(out.name + ".claims")) as cache:
        jobs, _ = plan_run(cache, config, specs, videos, summary, log)
        if jobs:
            todo = [VideoInput(j.path, j.relpath) for j in jobs]
            worker_config = _worker_config(config, out)
            with _ray(ray, config):
                _Scheduler(ray, config, worker_config, cache, summary, log).run(todo)
    if not config.merge and cache.read_only is None:
        summary.pending = len(cache.pending_parts())
    summary.wall_s = time.perf_counter() - t0
    return summary


def _check_locks(folder: Path) -> None:
    """Ray workers share one cache at once: they need working file locks, shards or not."""
    try:
        check_locks(folder)
    except LocksUnsupported as e:
        why = e.__cause__ or "a second lock on one file was granted"
        raise LocksUnsupported(
            f"--engine ray: file locks do not work in {folder} ({why}), and the Ray workers "
            f"share one cache, so they could compute one video twice. Write the cache on a "
            f"filesystem with working locks (NFS needs its lock daemon), or run plain workers "
            f"instead, each with its own --shard K/N and --no-merge, then `vtx merge` once") from e


def _check_sizes(config: ExtractConfig) -> None:
    if not config.cpus_per_worker > 0 or config.gpus_per_worker < 0:
        raise UsageError("--cpus-per-worker must be more than 0 and --gpus-per-worker at "
                         "least 0")
    if config.ray_workers is not None and config.ray_workers < 1:
        raise UsageError("--ray-workers must be at least 1 (or left out: as many as fit)")


def _worker_config(config: ExtractConfig, out: Path) -> ExtractConfig:
    """The settings a worker runs with: a plain local run of the videos it is handed, into
    the same cache (absolute paths: a worker's folder is not the driver's)."""
    weights_dir = Path(os.path.abspath(config.weights_dir)) if config.weights_dir else None
    return replace(config, out=out, weights_dir=weights_dir, engine="local", merge=False,
                   progress=False, overwrite=False, shard=None, workers=1, address=None)


def _import_ray(local: bool):
    if local:
        for k, v in LOCAL_ENV.items():
            os.environ.setdefault(k, v)
    try:
        import ray
    except ImportError as e:
        raise UsageError(RAY_MISSING) from e
    return ray


@contextmanager
def _ray(ray, config: ExtractConfig):
    """Ray, connected: the instance the caller started, ``--address``, or a new local
    instance on 127.0.0.1 (shut down at the end)."""
    if ray.is_initialized():
        yield ray
        return
    if config.address is None:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False,
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES, _node_ip_address="127.0.0.1",
                 logging_level=logging.WARNING)
    else:
        try:
            ray.init(address=config.address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UsageError(f"--address {config.address}: cannot connect to a Ray cluster "
                             f"({e}); give auto (a cluster started on this node with `ray "
                             f"start`) or ray://HOST:PORT of its head node") from e
    try:
        yield ray
    finally:
        ray.shutdown()


def worker_count(config: ExtractConfig, resources: dict, videos: int,
                 log: Callable[[str], None] = lambda m: None) -> int:
    """How many workers to start: ``--ray-workers``, or as many as the cluster's CPUs (GPUs,
    with ``--gpus-per-worker``) hold; at least 1 and at most ``videos``.

    Raises:
        UsageError: not even one worker fits and ``--ray-workers`` was not given.
    """
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    fits = math.floor(cpus / config.cpus_per_worker + 1e-9)
    if config.gpus_per_worker > 0:
        fits = min(fits, math.floor(gpus / config.gpus_per_worker + 1e-9))
    need = (f"{config.cpus_per_worker:g} CPU(s)"
            + (f" and {config.gpus_per_worker:g} GPU(s)" if config.gpus_per_worker else ""))
    have = f"{cpus:g} CPU(s) and {gpus:g} GPU(s)"
    if config.ray_workers is None:
        if fits < 1:
            raise UsageError(f"one Ray worker needs {need}, but the cluster has {have}; lower "
                             f"--cpus-per-worker/--gpus-per-worker or use a larger cluster "
                             f"(--address)")
        n = fits
    else:
        n = config.ray_workers
        if n > fits:
            log(f"vtx: note: {n} workers asked for, each with {need}, but the cluster has "
                f"{have} now: the others start when it has room")
    return max(1, min(n, videos))


@dataclass
class _Item:
    """One video to hand out, and what happened to it so far."""

    video: VideoInput
    deaths: int = 0  # workers that died while extracting it
    died_at: float = 0.0  # time.monotonic() of the last death
    not_before: float = 0.0  # hand it out again from then on
    error: str = ""  # the last death, in words


@dataclass
class _Slot:
    """One worker: its actor, whether it has started, and the video it is working on."""

    actor: object
    ready: bool = False
    busy: bool = False


class _Scheduler:
    """Hands the videos to the workers, one at a time, and adds up what they did."""

    def __init__(self, ray, config: ExtractConfig, worker_config: ExtractConfig,
                 cache: CacheWriter, summary: ExtractSummary, log: Callable[[str], None]):
        self.ray, self.config, self.worker_config = ray, config, worker_config
        self.cache, self.summary, self.log = cache, summary, log
        ex = ray.exceptions
        self.deaths = tuple(getattr(ex, n) for n in (
            "RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError",
            "OutOfMemoryError", "NodeDiedError", "ObjectLostError", "OwnerDiedError")
            if hasattr(ex, n))
        self.remote = ray.remote(_Worker).options(
            num_cpus=config.cpus_per_worker, num_gpus=config.gpus_per_worker,
            max_restarts=0, max_task_retries=0)
        self.inflight: dict[object, tuple[str, _Slot, _Item | None]] = {}
        self.slots: list[_Slot] = []
        self.n = 1  # workers to keep running
        self.start_failures = 0  # workers that died before starting, since one started
        self.idle_since = time.monotonic()  # when the last worker stopped being available
        # a retried video still claimed by its dead worker: wait out the lease, and a bit more
        self.grace_s = config.lease_s + max(5.0, config.lease_s / 4)
        self.retry_s = max(0.5, min(config.lease_s / 10, 10.0))

    # ------------------------------------------------------------------ the loop
    def run(self, videos: list[VideoInput]) -> None:
        queue = deque(_Item(v) for v in videos)
        self.n = worker_count(self.config, self.ray.cluster_resources(), len(videos), self.log)
        bar = progress(total=len(videos), desc="extract", unit="video",
                       enabled=self.config.progress)
        try:
            for _ in range(self.n):
                self._start()
            while queue or any(kind == "video" for kind, _, _ in self.inflight.values()):
                self._dispatch(queue)
                if not self.inflight:  # every video left waits for a dead worker's claim
                    time.sleep(self._wait_s(queue))
                    continue
                ready, _ = self.ray.wait(list(self.inflight), num_returns=1,
                                         timeout=self._wait_s(queue))
                for ref in ready:
                    self._collect(ref, queue, bar)
                self._check_starved(queue)
        finally:
            bar.close()
            for slot in self.slots:
                self._kill(slot)

    def _start(self) -> None:
        threads = max(1, int(self.config.cpus_per_worker))
        slot = _Slot(self.remote.remote(self.worker_config, threads))
        self.slots.append(slot)
        self.inflight[slot.actor.ready.remote()] = ("ready", slot, None)

    def _kill(self, slot: _Slot) -> None:
        try:
            self.ray.kill(slot.actor, no_restart=True)
        except Exception:  # already dead
            pass

    def _dispatch(self, queue: deque) -> None:
        """Hand a video to every started worker that has none, oldest first, skipping the
        videos that wait for a dead worker's claim to expire."""
        now = time.monotonic()
        for slot in self.slots:
            if not slot.ready or slot.busy:
                continue
            item = next((it for it in queue if it.not_before <= now), None)
            if item is None:
                return
            queue.remove(item)
            slot.busy = True
            self.inflight[slot.actor.run.remote([item.video])] = ("video", slot, item)

    def _wait_s(self, queue: deque) -> float:
        """How long to wait for a result: until the next delayed video may be handed out."""
        now = time.monotonic()
        waits = [it.not_before - now for it in queue if it.not_before > now]
        return max(0.05, min(waits, default=1.0))

    def _check_starved(self, queue: deque) -> None:
        if any(s.ready for s in self.slots) or not queue:
            self.idle_since = time.monotonic()
            return
        if time.monotonic() - self.idle_since > WORKER_START_TIMEOUT_S:
            raise VtxError(
                f"no Ray worker has run for {WORKER_START_TIMEOUT_S:.0f} s and {len(queue)} "
                f"video(s) are left: the cluster has no room for a worker with "
                f"{self.config.cpus_per_worker:g} CPU(s) and {self.config.gpus_per_worker:g} "
                f"GPU(s) (it has {self.ray.cluster_resources()}). Add nodes or lower "
                f"--cpus-per-worker/--gpus-per-worker, then rerun the same command: finished "
                f"videos are kept")

    # ------------------------------------------------------------------ results
    def _collect(self, ref, queue: deque, bar) -> None:
        kind, slot, item = self.inflight.pop(ref)
        try:
            result = self.ray.get(ref)
        except self.deaths as e:
            self._worker_died(slot, item, e, queue, bar)
            return
        except self.ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, VtxError):
                raise cause from None  # a full disk, a damaged cache: the run stops, as locally
            raise
        except self.ray.exceptions.RayError as e:  # the cluster itself failed
            raise VtxError(f"the Ray cluster failed ({_first_line(e)}); rerun the same "
                           f"command when it works again: finished videos are kept") from e
        if kind == "ready":
            slot.ready, self.start_failures = True, 0
            return
        slot.busy = False
        part, lines = result
        for line in lines:
            self.log(line)
        if part.others and item.deaths:
            self._still_claimed(item, queue, bar)
            return
        self._add(part)
        bar.update(1)

    def _worker_died(self, slot: _Slot, item: _Item | None, error, queue: deque,
                     bar) -> None:
        """Replace the dead worker; hand its video out again (or record it as failed when it
        has killed :data:`MAX_DEATHS` workers)."""
        self.slots.remove(slot)
        self._kill(slot)
        reason = _first_line(error)
        if item is None:  # died before it started
            self.start_failures += 1
            if self.start_failures >= 3 * self.n:
                raise VtxError(
                    f"Ray workers die as they start ({reason}); check that vtx and its "
                    f"dependencies (same versions) are installed on every node of the cluster")
        else:
            item.deaths, item.died_at, item.error = item.deaths + 1, time.monotonic(), reason
            if item.deaths >= MAX_DEATHS:
                record_failure(self.cache, self.summary, self.log, item.video.relpath,
                                f"its Ray worker died {item.deaths} times while extracting "
                                f"it (last: {reason}); it may need more memory than a "
                                f"worker has: raise --cpus-per-worker, or run it alone")
                bar.update(1)
            else:
                self.log(f"vtx: note: the worker extracting {item.video.relpath} died "
                         f"({reason}); handing it to another worker")
                queue.appendleft(item)
        self._start()

    def _still_claimed(self, item: _Item, queue: deque, bar) -> None:
        """A video whose worker died is still claimed by it (its machine was lost, so its lock
        was not dropped): try again until the claim's lease has run out."""
        now = time.monotonic()
        if now - item.died_at < self.grace_s:
            item.not_before = now + self.retry_s
            queue.append(item)
            return
        reason = (f"its Ray worker died ({item.error}) and its claim on the video did not "
                  f"expire within {self.grace_s:.0f} s (--lease {self.config.lease_s:g}); "
                  f"rerun the same command to extract it")
        self.log(f"vtx: failed: {item.video.relpath}: {reason}")
        self.summary.failed += 1
        self.summary.failures.append((item.video.relpath, reason))
        bar.update(1)

    def _add(self, part: ExtractSummary) -> None:
        s = self.summary
        s.done += part.done
        s.skipped += part.skipped
        s.failed += part.failed
        s.failures.extend(part.failures)
        s.shots += part.shots
        s.video_seconds += part.video_seconds
        s.others += part.others
        s.load_s = max(s.load_s, part.load_s)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip(": ")
