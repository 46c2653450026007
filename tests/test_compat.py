"""A cache and checkpoints written by the previous version of vtx (before the feature registry)
read, evaluate and predict to the same numbers with the current code (tests/data/prev_version)."""

from __future__ import annotations

import csv
import shutil

import h5py
import pytest

from conftest import ROOT
from vtx.pipeline.extract import ExtractConfig, extract
from vtx.pipeline.sampling import FrameSampling
from vtx.train.evaluate import evaluate_run
from vtx.train.predict import PredictConfig, predict

PREV = ROOT / "tests" / "data" / "prev_version"


def expected(head: str) -> dict[str, dict[str, float]]:
    with open(PREV / f"{head}_preds.csv") as f:
        return {r["video"]: {k: float(v) for k, v in r.items() if k != "video"}
                for r in csv.DictReader(f)}


@pytest.mark.parametrize("head", ["stan", "vtn"])
def test_previous_cache_and_checkpoint_evaluate_identically(head, tmp_path):
    out = tmp_path / "preds.csv"
    evaluate_run(PREV / head / "best.pt", PREV / "feats.h5", PREV / "labels.csv", split="all",
                 predictions_out=out, device="cpu", log=lambda m: None)
    with open(out) as f:
        got = {r["video"]: r for r in csv.DictReader(f)}
    want = expected(head)
    assert set(got) == set(want) == {f"v{i}.mp4" for i in range(4)}
    for video, probs in want.items():
        for label, p in probs.items():
            assert float(got[video][label]) == pytest.approx(p, abs=1e-5)


@pytest.mark.parametrize("head", ["stan", "vtn"])
def test_previous_checkpoint_predicts_identically(head):
    """predict re-extracts with the checkpoint's (random, seeded) weights identity."""
    want = expected(head)
    videos = tuple(PREV / "videos" / v for v in sorted(want))
    # fp32, as the previous version extracted (bf16, the default on a CPU that has it, agrees
    # to rounding only)
    for pred in predict(PredictConfig(videos=videos, model=PREV / head / "best.pt",
                                      device="cpu", top_k=2, precision="fp32")):
        assert pred.error is None
        for label, p in pred.labels:
            assert p == pytest.approx(want[pred.video.split("/")[-1]][label], abs=1e-4)


def test_previous_cache_resumes_without_recomputing(tmp_path):
    cache = tmp_path / "feats.h5"
    shutil.copy(PREV / "feats.h5", cache)
    with h5py.File(cache) as f:
        before = {k: g["resnet18"][()] for k, g in f["videos"].items()}
    summary = extract(ExtractConfig(videos=PREV / "videos", out=cache, progress=False,
                                    features=("resnet18", "r2plus1d", "vit"), weights="random",
                                    frames=FrameSampling(frame_rate=2.0), device="cpu",
                                    dtype="float32"))
    assert (summary.skipped, summary.done, summary.failed) == (4, 0, 0)
    with h5py.File(cache) as f:
        for k, g in f["videos"].items():
            assert (g["resnet18"][()] == before[k]).all()
