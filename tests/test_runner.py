"""The batching runner: batches across items, routing to videos, and the public timing hook."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vtx.features import FEATURES
from vtx.pipeline.extract import ExtractConfig, extract
from vtx.pipeline.producer import ModelItem, VideoDone, VideoJob
from vtx.pipeline.runner import BatchRunner


class EchoBackbone:
    """A stand-in for ``Backbone``: each output row is its input's value."""

    key, level, device = "echo", "shot", torch.device("cpu")

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"echo": x.reshape(len(x), -1)[:, :1].float()}  # (B, 1)


def job(vid: int) -> VideoJob:
    return VideoJob(vid, Path(f"{vid}.mp4"), f"{vid}.mp4", f"{vid}.mp4", (), replace=True)


def done(vid: int, n: int) -> VideoDone:
    return VideoDone(vid, {}, {"shots": np.zeros((n, 2), np.int64)}, {"shot": n},
                     {"echo": n}, 0)


def test_on_batch_reports_every_model_batch():
    calls = []
    runner = BatchRunner({"echo": EchoBackbone()}, batch_size=3,
                         on_batch=lambda key, n, s: calls.append((key, n, s)))
    runner.open(job(0))
    runner.open(job(1))
    finished = []
    for i in range(4):  # batches span videos: 0, 1, 0, 1 | 0, 1, 0, 1
        for vid in (0, 1):
            finished += runner.put(ModelItem(vid, "echo", i, np.full((1,), 10 * vid + i)))
    finished += runner.put(done(0, 4)) + runner.put(done(1, 4))
    assert [(k, n) for k, n, _ in calls] == [("echo", 3), ("echo", 3)]
    assert finished == []  # two items still wait for a batch
    finished = runner.flush()
    assert [(k, n) for k, n, _ in calls] == [("echo", 3), ("echo", 3), ("echo", 2)]
    assert all(s >= 0 for _, _, s in calls)
    assert sorted(a.job.vid for a in finished) == [0, 1] and not runner.videos
    rows = {a.job.vid: a.arrays()["echo"][:, 0].tolist() for a in finished}
    assert rows == {0: [0, 1, 2, 3], 1: [10, 11, 12, 13]}


def test_failed_video_items_are_dropped_not_run():
    calls = []
    runner = BatchRunner({"echo": EchoBackbone()}, batch_size=8,
                         on_batch=lambda key, n, s: calls.append((key, n)))
    runner.open(job(0))
    runner.open(job(1))
    runner.put(ModelItem(0, "echo", 0, np.zeros(1)))
    runner.put(ModelItem(1, "echo", 0, np.ones(1)))
    assert runner.fail(0).job.vid == 0
    runner.put(done(1, 1))
    finished = runner.flush()
    assert calls == [("echo", 1)]  # only video 1's item ran
    assert [a.job.vid for a in finished] == [1]


def test_extract_on_batch_counts_every_model_input(synth_dir, tmp_path):
    calls = []
    s = extract(ExtractConfig(videos=synth_dir, out=tmp_path / "feats.h5",
                              features=("resnet18", "r2plus1d"), weights="random",
                              device="cpu", batch_size=4, progress=False),
                on_batch=lambda key, n, sec: calls.append((key, n, sec)))
    assert (s.done, s.failed) == (3, 0)
    keys = {FEATURES["resnet18"].model_key, FEATURES["r2plus1d"].model_key}
    assert {k for k, _, _ in calls} == keys
    for key in keys:  # one input per shot and model, in batches of at most 4 (across videos)
        sizes = [n for k, n, _ in calls if k == key]
        assert sum(sizes) == s.shots and max(sizes) <= 4
    assert 0 < sum(sec for _, _, sec in calls) < s.wall_s
    assert 0 < s.load_s < s.wall_s
