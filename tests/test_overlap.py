"""Overlap of decoding and models: partial batches change the batches, never the features.

The runner runs a partial batch when its queue is empty and an input has waited
``PARTIAL_WAIT_S`` (``vtx/pipeline/runner.py``), so batch sizes and compositions depend on
thread timing. These tests check what the runner's
docstring promises: a row depends on its own input only, to float rounding, whatever batch it
ran in.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from vtx.features import FEATURES
from vtx.pipeline.backbones import load_backbones
from vtx.io.cache import video_key
from vtx.pipeline.extract import discover_videos
from vtx.pipeline.producer import (DirectItem, ModelItem, VideoDone, VideoJob,
                                   VideoProducer)
from vtx.pipeline.runner import PARTIAL_WAIT_S, BatchRunner, run_jobs
from vtx.pipeline.shots import ShotConfig

FEATURE_NAMES = ("resnet18", "r2plus1d", "vggish")


@pytest.fixture(scope="module")
def backbones():
    specs = [FEATURES[n] for n in FEATURE_NAMES]
    return load_backbones(specs, "random", device="cpu")


def close(a: np.ndarray, b: np.ndarray) -> None:
    """Equal to float32 rounding of a forward pass (a few ulps of the rows' scale)."""
    assert a.shape == b.shape
    scale = max(float(np.abs(a).max()), 1e-6)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def inputs(bb, n: int, rng) -> list[np.ndarray]:
    if bb.kind == "audio":
        return [rng.normal(size=(96, 64)).astype(np.float32) for _ in range(n)]
    h, w = bb.prep.crop_size
    return [rng.integers(0, 256, (bb.clip_len, h, w, 3), dtype=np.uint8) for _ in range(n)]


def rows_in_batches(bb, items: list[np.ndarray], batch_size: int, eager_after: int | None = None
                    ) -> tuple[np.ndarray, list[int]]:
    """The rows of ``items`` run through a BatchRunner in batches of ``batch_size``; with
    ``eager_after`` a partial batch also runs after every that many items (as when the queue
    runs dry). Returns the rows (n, dim) and the batch sizes that ran."""
    sizes: list[int] = []
    runner = BatchRunner({bb.key: bb}, batch_size, on_batch=lambda k, n, s: sizes.append(n))
    job = VideoJob(0, None, "x", "x", bb.specs, replace=True)
    a = runner.open(job)
    for i, x in enumerate(items):
        runner.put(ModelItem(0, bb.key, i, x))
        if eager_after and (i + 1) % eager_after == 0 and runner.has_pending():
            runner.run_partial()
    n = len(items)
    runner.put(VideoDone(0, {}, {}, {bb.level: n}, {bb.key: n}, 0))
    runner.flush()
    assert a.complete()
    return a.arrays()[bb.features[0]], sizes


@pytest.mark.parametrize("name", FEATURE_NAMES)
def test_rows_do_not_depend_on_the_batch(backbones, name):
    bb = backbones[FEATURES[name].model_key]
    n = 3 if name == "r2plus1d" else 7  # R(2+1)D is slow on CPU: fewer, the same checks
    items = inputs(bb, n, np.random.default_rng(0))
    one_batch, sizes = rows_in_batches(bb, items, batch_size=n)
    assert sizes == [n]
    rows, sizes = rows_in_batches(bb, items, batch_size=1)
    assert sizes == [1] * n
    close(rows, one_batch)
    # full batches of 2 with a partial one after every 3rd item (the queue ran dry): 2, 1, ...
    rows, sizes = rows_in_batches(bb, items[::-1], batch_size=2, eager_after=3)
    assert sum(sizes) == n and sizes[:2] == [2, 1]
    close(rows[::-1], one_batch)  # other neighbours, other batch sizes: the same rows


def test_training_mode_is_refused(backbones):
    bb = backbones[FEATURES["resnet18"].model_key]
    bb.model.train()
    try:
        with pytest.raises(ValueError, match="training mode.*eval"):
            BatchRunner({bb.key: bb}, 4)
    finally:
        bb.model.eval()


def extract_rows(synth_dir, backbones, *, partial: bool):
    """Two videos of ``synth_dir`` (4 shots) through run_jobs (real producers, one decode
    thread). With ``partial`` the producer waits after each model input until a batch has
    taken it, so the queue runs dry at every input: the runner must run a partial batch (of
    one) each time, or the run would stall. Returns ({relpath: arrays}, batch sizes per model,
    and, per video, whether every batch of its inputs ran before its VideoDone was emitted)."""
    specs = tuple(FEATURES[n] for n in ("resnet18", "r2plus1d"))
    bbs = {s.model_key: backbones[s.model_key] for s in specs}
    preps = {k: bb.prep for k, bb in bbs.items()}
    jobs = [VideoJob(i, v.path, v.relpath, video_key(v.relpath), specs, replace=True)
            for i, v in enumerate(discover_videos(synth_dir))
            if v.relpath in ("a.mp4", "c.mp4")]  # 4 shots: R(2+1)D is slow on CPU
    sizes: dict[str, list[int]] = {k: [] for k in bbs}
    ran = threading.Condition()
    count = {"emitted": 0, "batched": 0}
    before_done: dict[str, bool] = {}

    def on_batch(key, n, s):
        sizes[key].append(n)
        with ran:
            count["batched"] += n
            ran.notify_all()

    def produce(job, emit, bar):
        def waiting_emit(msg):
            emit(msg)
            if isinstance(msg, ModelItem) and partial:
                count["emitted"] += 1
                with ran:  # the model thread has nothing else to do: it must run it now
                    assert ran.wait_for(lambda: count["batched"] >= count["emitted"], 60)
            elif isinstance(msg, VideoDone):
                before_done[job.relpath] = count["batched"] == count["emitted"]
        VideoProducer(job, preps, ShotConfig(), waiting_emit).run()

    out, failures = {}, []
    runner = BatchRunner(bbs, batch_size=16, on_batch=on_batch)
    run_jobs(jobs, runner, produce, workers=1, progress=False, partial_batches=partial,
             on_video=lambda a: out.__setitem__(a.job.relpath, a.arrays()),
             on_failure=lambda job, reason: failures.append((job.relpath, reason)))
    assert not failures
    return out, sizes, before_done


def test_partial_batches_overlap_decoding_and_keep_the_features(synth_dir, backbones):
    full, full_sizes, _ = extract_rows(synth_dir, backbones, partial=False)
    eager, eager_sizes, before_done = extract_rows(synth_dir, backbones, partial=True)
    n_shots = sum(len(v["shots"]) for v in full.values())
    assert n_shots == 4  # < 16: without partial batches each model runs once, after decoding
    assert all(s == [n_shots] for s in full_sizes.values())
    # with them, every input ran in a batch of its own while its video was being decoded
    assert all(s == [1] * n_shots for s in eager_sizes.values()), eager_sizes
    assert before_done == {"a.mp4": True, "c.mp4": True}
    assert full.keys() == eager.keys()
    for rel, arrays in full.items():
        assert arrays.keys() == eager[rel].keys()
        for name, arr in arrays.items():
            if arr.dtype.kind == "f" and name not in ("shot_times",):
                close(eager[rel][name], arr)
            else:
                np.testing.assert_array_equal(eager[rel][name], arr)



def chatty_run(bb, items: list[np.ndarray], gap_s: float, chatter_s: float,
               partial: bool = True) -> tuple[list[tuple[int, float]], float, float]:
    """One video through run_jobs whose producer emits ``items`` (VGGish inputs) ``gap_s``
    apart, then other messages only (a sampled frame's thumbnail, as a decode thread sends
    every second of video) every 10 ms for ``chatter_s``, then its end. Returns the batches
    that ran as (size, time after the first input), the time of the last input and the time
    the producer finished, both after the first input."""
    batches: list[tuple[int, float]] = []
    times: dict[str, float] = {}
    n = len(items)

    def produce(job, emit, bar):
        t0 = times["first"] = time.perf_counter()
        for i, x in enumerate(items):
            emit(ModelItem(job.vid, bb.key, i, x))
            time.sleep(gap_s)
        times["last"] = time.perf_counter() - t0
        k = 0
        while time.perf_counter() - t0 < times["last"] + chatter_s:
            emit(DirectItem(job.vid, k, {"frame_thumbnail": np.zeros((2, 2, 3), np.uint8)}))
            k += 1
            time.sleep(0.01)
        times["done"] = time.perf_counter() - t0
        emit(VideoDone(job.vid, {}, {}, {bb.level: n, "frame": k}, {bb.key: n}, k))

    runner = BatchRunner({bb.key: bb}, batch_size=16, on_batch=lambda key, m, s: batches.append(
        (m, time.perf_counter() - times["first"])))
    job = VideoJob(0, None, "x.mp4", "x.mp4", bb.specs, replace=True)
    out, failures = [], []
    run_jobs([job], runner, produce, workers=1, progress=False, partial_batches=partial,
             on_video=out.append, on_failure=lambda job, reason: failures.append(reason))
    assert not failures and len(out) == 1
    assert out[0].arrays()[bb.features[0]].shape[0] == n  # every row came back
    return batches, times["last"], times["done"]


def test_other_messages_do_not_keep_a_waiting_input_from_its_model(backbones):
    # A decode thread sends more than model inputs (a thumbnail per sampled frame): the queue
    # never stays empty for PARTIAL_WAIT_S, yet the one pending shot must not wait for the
    # video's end (the models idle until the last frame of a video of fewer shots than the
    # batch size was what issue 13 set out to fix).
    bb = backbones[FEATURES["vggish"].model_key]
    items = inputs(bb, 3, np.random.default_rng(0))
    batches, last, done = chatty_run(bb, items, gap_s=0.0, chatter_s=6 * PARTIAL_WAIT_S)
    assert [m for m, _ in batches] == [3]
    assert batches[0][1] < done - 2 * PARTIAL_WAIT_S, (batches, done)
    # without partial batches the inputs wait for the end of the video
    batches, _, done = chatty_run(bb, items, gap_s=0.0, chatter_s=2 * PARTIAL_WAIT_S,
                                  partial=False)
    assert [m for m, _ in batches] == [3] and batches[0][1] >= done


def test_inputs_arriving_steadily_fill_batches(backbones, monkeypatch):
    # VGGish examples of a decode-bound video arrive a few ms apart: they wait for one another
    # (up to PARTIAL_WAIT_S, and longer while the rate they come at would fill the batch within
    # another such wait), so the batches are full, not one per PARTIAL_WAIT_S of inputs.
    import vtx.pipeline.runner as runner_module

    monkeypatch.setattr(runner_module, "PARTIAL_WAIT_S", 0.5)  # sleep jitter matters less
    bb = backbones[FEATURES["vggish"].model_key]
    items = inputs(bb, 20, np.random.default_rng(1))
    batches, last, done = chatty_run(bb, items, gap_s=0.5 / 12, chatter_s=0.0)
    # 12 inputs in the first 0.5 s (a batch of 12 without the rate rule): at that rate the
    # other 4 come well within another 0.5 s
    assert [m for m, _ in batches] == [16, 4], batches


def test_a_partial_batch_serves_the_model_that_waited_longest(backbones):
    # VGGish examples keep arriving while a shot's one clip waits: the clip's model runs first
    # (picking the model with the most inputs would starve it until the video's end).
    rng = np.random.default_rng(2)
    vg, rn = (backbones[FEATURES[n].model_key] for n in ("vggish", "resnet18"))
    ran: list[tuple[str, int]] = []
    runner = BatchRunner({vg.key: vg, rn.key: rn}, 16,
                         on_batch=lambda key, n, s: ran.append((key, n)))
    runner.open(VideoJob(0, None, "x", "x", vg.specs + rn.specs, replace=True))
    runner.put(ModelItem(0, rn.key, 0, inputs(rn, 1, rng)[0]))
    time.sleep(0.002)
    for i, x in enumerate(inputs(vg, 5, rng)):
        runner.put(ModelItem(0, vg.key, i, x))
    assert runner.waited() >= 0.002
    runner.run_partial()
    assert ran == [(rn.key, 1)]
    runner.run_partial()
    assert ran == [(rn.key, 1), (vg.key, 5)] and not runner.has_pending()
    assert runner.waited() == 0.0


def test_a_failed_video_leaves_no_input_waiting(backbones):
    # its pending inputs go with it; when they were the only ones, nothing is due any more
    rng = np.random.default_rng(3)
    vg = backbones[FEATURES["vggish"].model_key]
    runner = BatchRunner({vg.key: vg}, 16)
    for vid in (0, 1):
        runner.open(VideoJob(vid, None, f"{vid}", f"{vid}", vg.specs, replace=True))
    runner.put(ModelItem(0, vg.key, 0, inputs(vg, 1, rng)[0]))
    runner.put(ModelItem(1, vg.key, 0, inputs(vg, 1, rng)[0]))
    runner.fail(0)
    assert [it.vid for it in runner.pending[vg.key]] == [1]
    key, _ = runner.next_partial(0.0)
    assert key == vg.key
    runner.fail(1)
    assert not runner.has_pending() and runner.waited() == 0.0
    assert runner.next_partial(0.0) == (None, float("inf"))


def blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]


def test_decode_threads_run_numpy_blas_on_one_thread(tmp_path):
    # OpenBLAS's worker threads busy-wait after each of the decode thread's small matrix
    # products (VGGish's log-mel), taking CPU from decoding and the models: run_jobs keeps
    # numpy's BLAS on one thread while it runs, and leaves torch's threads alone.
    import torch

    from vtx.errors import VideoError

    from threadpoolctl import threadpool_limits

    torch_threads = torch.get_num_threads()
    seen = []

    def produce(job, emit, bar):
        seen.append((blas_threads(), torch.get_num_threads()))
        np.ones((300, 300)) @ np.ones((300, 300))  # runs (on one thread)
        raise VideoError("done")

    failures = []
    jobs = [VideoJob(i, tmp_path / f"{i}.mp4", f"{i}.mp4", f"{i}.mp4", (), replace=True)
            for i in range(2)]
    with threadpool_limits(limits=2, user_api="blas"):  # as on a 2-core machine
        before = blas_threads()
        assert before and set(before) == {2}, "numpy has no BLAS that threadpoolctl can see"
        run_jobs(jobs, BatchRunner({}, batch_size=1), produce, workers=2, progress=False,
                 on_video=lambda a: None, on_failure=lambda job, r: failures.append(r))
        assert blas_threads() == before  # restored
    assert failures == ["done", "done"]
    assert seen == [([1] * len(before), torch_threads)] * 2
