"""The batching runner: decode threads, one bounded queue, model batches across videos.

``workers`` decode threads each run one :class:`vtx.pipeline.producer.VideoProducer` at a time
and put its messages on a bounded queue; the calling thread takes them off, gathers model
inputs into batches of ``batch_size`` per model run (batches span shots, frames and videos),
runs each full batch, and routes every output row to its video's :class:`VideoAssembler`. A
video whose rows are all in is handed to ``on_video`` (``vtx extract`` writes it to the cache).
The queue bound keeps memory constant whatever the number or length of the videos.

**Overlap.** When the queue is empty, so that the model thread would otherwise wait for the
decode threads, and a model input has been pending for :data:`PARTIAL_WAIT_S`, the model thread
runs a *partial* batch of that model run's pending inputs (:meth:`BatchRunner.next_partial`;
inputs that arrive fast enough to fill the batch within another such wait are let fill it, up
to :data:`MAX_WAIT_FACTOR` waits). The models therefore start on the first shots while
the rest of the video is still being decoded, instead of after its last frame when a video has
no more shots than ``batch_size``; when the models are the slower side the queue fills during
each batch and the batches are full again. The wait counts from the input's arrival, not from
the last message: the decode threads send other messages all the time (a sampled frame's
thumbnail every second of video), which must not keep the models idle. (Running a partial
batch at once, without the short wait, ran a decode-bound video's VGGish examples one at a
time: 187 batches of one, 8.8 s of model time instead of 0.5 s; docs/BENCHMARKS.md, "Issue 13:
targets". Waiting for a quiet queue instead left R(2+1)D idle until the last frame of a video
of 16 shots: "Issue 13, third pass".)

**Features do not depend on thread timing** (beyond float rounding), although the batch sizes
and compositions do:

* every model input is made in a decode thread from its video alone: which frames a shot or
  a sampled frame gives is decided by the decoded frames (shots, sampling), never by timing;
* every output row is routed by (video, model run, row index) carried with its input, never by
  its position in a batch or the order in which batches ran;
* a model maps each input to its output independently of the other inputs of the batch: the
  backbones run in eval mode (batch norm uses its running statistics, dropout is off;
  :class:`BatchRunner` refuses a model with a submodule in training mode), and no layer of
  them mixes samples (convolutions, pooling, per-sample layer norm, attention within one
  sample's tokens);
* what batch composition can change is which kernel computes a layer (oneDNN and cuDNN pick
  algorithms per input shape, and a batch of one may take another path than a batch of 16),
  hence the summation order: the float rounding of the outputs, not their values.

``tests/test_overlap.py`` checks this: the same inputs in batches of 1, 2, several and one,
and the same videos extracted with full batches and with forced partial batches, give the same
rows to float rounding.

:class:`BatchRunner` is the single-threaded core (``extract_video`` drives it directly);
:func:`run_jobs` adds the threads. ``on_batch(model_key, n_items, seconds)`` is called after
every model batch: the public timing hook that ``bench/`` reads.
"""
from __future__ import annotations

import os
import queue
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch

from vtx.errors import VideoError
from vtx.pipeline.backbones import Backbone
from vtx.pipeline.producer import DirectItem, ModelItem, VideoDone, VideoFailed, VideoJob
from vtx.progress import progress as progress_bar

OnBatch = Callable[[str, int, float], None]
"""``on_batch(model_key, n_items, seconds)``: one model batch ran (stacking the inputs, the
copy to the device, the forward pass and the copy back included)."""

INCOMPLETE = "internal error: the video's features were not all computed"

PARTIAL_WAIT_S = 0.25
"""How long a model input waits for its batch to fill before the model thread, finding the
queue empty, runs it in a partial batch. Inputs that keep arriving within it (VGGish examples
of a decode-bound video) fill batches instead of running one at a time; so do inputs arriving
fast enough to fill the batch within another such wait (:meth:`BatchRunner.next_partial`)."""

MAX_WAIT_FACTOR = 4
"""A pending input never waits more than this many :data:`PARTIAL_WAIT_S` while the model
thread is idle."""


class VideoAssembler:
    """Collects one video's model outputs and direct arrays until it is complete."""

    def __init__(self, job: VideoJob):
        self.job = job
        self.items: dict[str, dict[int, np.ndarray]] = {}  # dataset name -> row -> array
        self.levels: dict[str, str] = {}  # dataset name -> level
        self.model_items: dict[str, int] = {}
        self.direct_items = 0
        self.done: VideoDone | None = None

    def add_outputs(self, backbone: Backbone, index: int, outputs: dict[str, np.ndarray]
                    ) -> None:
        """One model input's output rows, by feature name."""
        for name, row in outputs.items():
            self.items.setdefault(name, {})[index] = row
            self.levels[name] = backbone.level
        self.model_items[backbone.key] = self.model_items.get(backbone.key, 0) + 1

    def add_direct(self, msg: DirectItem) -> None:
        level = "frame" if msg.index >= 0 else "shot"
        for name, arr in msg.data.items():
            self.items.setdefault(name, {})[msg.index] = arr
            self.levels[name] = level
        if msg.index >= 0:
            self.direct_items += 1

    def complete(self) -> bool:
        done = self.done
        return (done is not None
                and all(self.model_items.get(k, 0) == n for k, n in done.model_items.items())
                and self.direct_items == done.direct_items)

    def arrays(self, skip: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        """Every dataset of the complete video: the end-of-video arrays (shots, frames, ...) and
        the collected rows stacked (``(n, *row shape)``); names with no row are left out."""
        out = dict(self.done.fixed)
        for name, got in self.items.items():
            n = self.done.rows[self.levels[name]]
            if name not in skip and n:
                out[name] = np.stack([got[i] for i in range(n)])
        return out


class BatchRunner:
    """Batches model inputs per model run and routes the outputs to the videos' assemblers.

    Args:
        backbones: ``model_key`` -> loaded backbone.
        batch_size: inputs per model batch.
        on_batch: the timing hook, see :data:`OnBatch`.
    """

    def __init__(self, backbones: Mapping[str, Backbone], batch_size: int,
                 on_batch: OnBatch | None = None):
        for key, bb in backbones.items():
            _check_per_sample(key, bb)
        self.backbones = backbones
        self.batch_size = batch_size
        self.on_batch = on_batch
        self.pending: dict[str, list[ModelItem]] = {k: [] for k in backbones}
        self.since: dict[str, float] = {}  # model run -> arrival time of its oldest pending input
        self.videos: dict[int, VideoAssembler] = {}

    def open(self, job: VideoJob) -> VideoAssembler:
        """Start collecting a video (before its producer runs)."""
        self.videos[job.vid] = VideoAssembler(job)
        return self.videos[job.vid]

    def put(self, msg: object) -> list[VideoAssembler]:
        """Take one producer message; returns the videos it completed (no longer tracked)."""
        if isinstance(msg, ModelItem):
            if not self.pending[msg.model]:
                self.since[msg.model] = time.perf_counter()
            self.pending[msg.model].append(msg)
            if len(self.pending[msg.model]) >= self.batch_size:
                return self.run(msg.model)
        elif isinstance(msg, DirectItem):
            if msg.vid in self.videos:
                self.videos[msg.vid].add_direct(msg)
        elif isinstance(msg, VideoDone):
            self.videos[msg.vid].done = msg
            return self._take_complete({msg.vid})
        else:
            raise TypeError(f"unexpected producer message {type(msg).__name__}")
        return []

    def fail(self, vid: int) -> VideoAssembler:
        """Forget a failed video and its pending inputs."""
        for key in self.pending:
            self.pending[key] = [it for it in self.pending[key] if it.vid != vid]
            if not self.pending[key]:  # else the oldest left arrived no earlier: wait less
                self.since.pop(key, None)
        return self.videos.pop(vid)

    def run(self, key: str) -> list[VideoAssembler]:
        """Run the pending inputs of one model as a batch; returns the videos completed."""
        items, self.pending[key] = self.pending[key], []
        self.since.pop(key, None)
        if not items:
            return []
        t0 = time.perf_counter()
        bb = self.backbones[key]
        x = torch.from_numpy(np.stack([it.data for it in items]))  # (B, clip_len, h, w, 3)
        outs = bb(x.to(bb.device, non_blocking=True))  # feature name -> (B, *row shape)
        outs = {name: y.cpu().numpy() for name, y in outs.items()}
        for row, it in enumerate(items):
            a = self.videos.get(it.vid)
            if a is not None:
                a.add_outputs(bb, it.index, {name: y[row] for name, y in outs.items()})
        if self.on_batch is not None:
            self.on_batch(key, len(items), time.perf_counter() - t0)
        return self._take_complete({it.vid for it in items})

    def has_pending(self) -> bool:
        """Whether any model input waits for a batch."""
        return any(self.pending.values())

    def waited(self) -> float:
        """Seconds the oldest pending input has waited for its batch (0 when none is)."""
        return time.perf_counter() - min(self.since.values()) if self.since else 0.0

    def next_partial(self, wait: float) -> tuple[str | None, float]:
        """Which model run is due for a partial batch, and else how long until one may be.

        A model's pending inputs are due once the oldest has waited ``wait`` seconds, unless
        inputs arriving at the rate they have arrived so far would fill the batch within
        another ``wait`` (VGGish examples of a decode-bound video: full batches, not one every
        ``wait``); never later than :data:`MAX_WAIT_FACTOR` times ``wait``. Of the due runs, the
        one whose oldest input has waited longest. Returns ``(key, 0.0)`` or ``(None,
        seconds)`` (``inf`` when nothing is pending).
        """
        now = time.perf_counter()
        due, until = None, float("inf")
        for key, since in sorted(self.since.items(), key=lambda kv: kv[1]):
            n, age = len(self.pending[key]), now - since
            if not n:
                continue
            cap = MAX_WAIT_FACTOR * wait
            if age < wait:
                until = min(until, wait - age)
                continue
            fill = (self.batch_size - n) * age / n  # at the rate so far
            if fill <= wait and age < cap:
                until = min(until, fill, cap - age)
                continue
            due = key
            break
        return (due, 0.0) if due is not None else (None, max(until, 1e-3))

    def run_partial(self) -> list[VideoAssembler]:
        """Run the pending inputs of the model run whose oldest input has waited longest
        (ties: the one with the most), full batch or not; returns the videos completed. A model
        whose inputs keep arriving never keeps a slower one's few inputs waiting."""
        pending = [k for k in self.pending if self.pending[k]]
        if not pending:
            return []
        key = min(pending, key=lambda k: (self.since.get(k, 0.0), -len(self.pending[k])))
        return self.run(key)

    def flush(self) -> list[VideoAssembler]:
        """Run every pending batch, full or not; returns the videos completed."""
        return [a for key in list(self.pending) for a in self.run(key)]

    def _take_complete(self, vids: set[int]) -> list[VideoAssembler]:
        return [self.videos.pop(v) for v in sorted(vids)
                if v in self.videos and self.videos[v].complete()]


def _check_per_sample(key: str, bb) -> None:
    """Refuse a model whose outputs could depend on the other inputs of its batch (a module
    left in training mode: batch norm over the batch, random dropout)."""
    model = getattr(bb, "model", None)
    if isinstance(model, torch.nn.Module):
        training = [name or type(model).__name__ for name, m in model.named_modules()
                    if m.training]
        if training:
            raise ValueError(f"model run {key!r} has modules in training mode "
                             f"({', '.join(training[:3])}); its outputs would depend on the "
                             f"batch. Call .eval() on it (load_backbones does) before batching")


class JobSkipped(Exception):
    """Raised by ``produce`` before emitting anything: the job is dropped, not failed (another
    worker of a shared cache has the video)."""


class _Skipped(NamedTuple):
    vid: int
    reason: str


Produce = Callable[[VideoJob, Callable[[object], None], object], None]
"""``produce(job, emit, bar)``: run one video's producer in a decode thread; ``bar`` is the
thread's frame bar (:func:`vtx.progress.progress`, silent outside a terminal)."""


def one_blas_thread():
    """A context in which numpy's BLAS (OpenBLAS) runs on the calling thread only.

    The decode threads' numpy matrix products are small (VGGish's log-mel: 96x257 by 257x64 per
    example), and OpenBLAS's own worker threads busy-wait after each call: on 2 cores a
    ``vggish`` producer on a 720p video used 22.0 CPU-s in 13.2 s with them and 9.2 CPU-s in
    7.8 s without (``docs/BENCHMARKS.md``), the difference taken from decoding and the models.
    torch's CPU kernels do not use numpy's BLAS and keep their threads.
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def run_jobs(jobs: Sequence[VideoJob], runner: BatchRunner, produce: Produce, *,
             workers: int, on_video: Callable[[VideoAssembler], None],
             on_failure: Callable[[VideoJob, str], None], progress: bool = True,
             partial_batches: bool = True,
             on_skip: Callable[[VideoJob, str], None] | None = None) -> None:
    """Produce every job in ``workers`` decode threads and batch their model inputs here.

    Args:
        jobs: the videos.
        runner: batches and assembles (its ``on_batch`` hook times the model batches).
        produce: decodes one video, emitting its messages; a :class:`VideoError` or any other
            exception fails that video only.
        workers: decode threads.
        on_video: receives each complete video, in this thread.
        on_failure: receives each failed video and the reason, in this thread.
        on_skip: receives each video whose ``produce`` raised :class:`JobSkipped` (another
            worker has it), in this thread.
        progress: show progress (:mod:`vtx.progress`): on a terminal a bar for the videos and
            one per decode thread; in a log a line every few seconds.
        partial_batches: run a partial batch whenever the queue is empty and inputs are
            pending, rather than wait for the decode threads (see the module docstring); with
            False only full batches run until every video is decoded.
    """
    with one_blas_thread():
        _run_jobs(jobs, runner, produce, workers=workers, on_video=on_video,
                  on_failure=on_failure, progress=progress, partial_batches=partial_batches,
                  on_skip=on_skip)


def _run_jobs(jobs, runner, produce, *, workers, on_video, on_failure, progress,
              partial_batches, on_skip) -> None:
    q: queue.Queue = queue.Queue(maxsize=max(8, 4 * runner.batch_size))
    job_q: queue.Queue = queue.Queue()
    for job in jobs:
        job_q.put(job)
        runner.open(job)
    stop = threading.Event()
    worker_exit = object()

    def worker(slot: int) -> None:
        bar = progress_bar(total=0, unit="frame", enabled=progress, nested=True,
                           position=slot + 1, leave=False)
        try:
            while not stop.is_set():
                try:
                    job = job_q.get_nowait()
                except queue.Empty:
                    break
                try:
                    produce(job, q.put, bar)
                except JobSkipped as e:
                    q.put(_Skipped(job.vid, str(e)))
                except VideoError as e:
                    q.put(VideoFailed(job.vid, str(e)))
                except Exception as e:  # a bug or an unexpected file: never cost other videos
                    if os.environ.get("VTX_DEBUG"):
                        traceback.print_exc()
                    q.put(VideoFailed(job.vid, f"{type(e).__name__}: {e}"))
        finally:
            bar.close()
            q.put(worker_exit)

    n_workers = min(workers, len(jobs))
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n_workers)]
    for t in threads:
        t.start()
    bar = progress_bar(total=len(jobs), desc="extract", unit="video", enabled=progress)

    def finished(videos: list[VideoAssembler]) -> None:
        for a in videos:
            on_video(a)
            bar.update()

    active = n_workers
    try:
        while active:
            try:
                msg = q.get_nowait()
            except queue.Empty:
                if partial_batches and runner.has_pending():
                    # the decode threads are the slower side: a model whose inputs have waited
                    # long enough runs them now (counted from their arrival: other messages do
                    # not reset it), else wait for the next message or that moment
                    key, wait = runner.next_partial(PARTIAL_WAIT_S)
                    if key is not None:
                        finished(runner.run(key))
                        continue
                    try:
                        msg = q.get(timeout=wait)
                    except queue.Empty:
                        continue
                else:
                    msg = q.get()
            if msg is worker_exit:
                active -= 1
            elif isinstance(msg, VideoFailed):
                job = runner.fail(msg.vid).job
                on_failure(job, " ".join(msg.reason.split()))
                bar.update()
            elif isinstance(msg, _Skipped):
                job = runner.fail(msg.vid).job
                if on_skip is not None:
                    on_skip(job, msg.reason)
                bar.update()
            else:
                finished(runner.put(msg))
        finished(runner.flush())
        for vid in list(runner.videos):  # never drop a video silently
            on_failure(runner.fail(vid).job, INCOMPLETE)
    finally:
        stop.set()
        bar.close()
        while any(t.is_alive() for t in threads):  # unblock workers waiting on a full queue
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
