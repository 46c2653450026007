"""``vtx predict``: features extracted on the fly with the stage-1 code, the head's labels, and
the explanation picture."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import vtx_env
from vtx.io.synth import Shot, write_video
from vtx.pipeline.extract import ExtractConfig, extract
from vtx.pipeline.sampling import FrameSampling
from vtx.train.evaluate import evaluate_run
from vtx.train.predict import PredictConfig, predict
from vtx.train.trainer import TrainConfig, train_head

VTX = [sys.executable, "-m", "vtx.cli.main"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    videos = d / "videos"
    videos.mkdir()
    rows = []
    for i in range(6):
        scenes = [i % 3, 3 + i % 2, 6]
        write_video(videos / f"v{i}.mp4", [Shot(16, s, (i % 3, 0)) for s in scenes],
                    size=(96, 64), fps=16, seed=i)
        labels = ["warm"] if i % 3 == 0 else (["cold", "fast"] if i % 3 == 1 else ["fast"])
        rows.append((f"v{i}", "|".join(labels), "train" if i < 4 else "test"))
    with open(d / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", "labels", "split"])
        w.writerows(rows)
    cache = d / "feats.h5"
    s = extract(ExtractConfig(videos=videos, out=cache, features=("resnet18", "r2plus1d", "vit"),
                              frames=FrameSampling(frame_rate=1.0), progress=False, device="cpu",
                              dtype="float32"))
    assert s.done == 6
    runs = {}
    for head, opts in (("stan", {}), ("vtn", {"d_model": 32, "n_layers": 1, "window": 4})):
        r = train_head(TrainConfig(head=head, features=cache, labels=d / "labels.csv",
                                   out=d / head, epochs=2, batch_size=4, device="cpu",
                                   head_options=opts), log=lambda m: None)
        runs[head] = r.best_path
    return d, cache, runs


@pytest.mark.parametrize("head", ["stan", "vtn"])
def test_predict_equals_evaluate_on_cached_features(trained, head):
    d, cache, runs = trained
    preds_csv = d / f"{head}_preds.csv"
    evaluate_run(runs[head], cache, d / "labels.csv", split="test", predictions_out=preds_csv,
                 device="cpu", log=lambda m: None)
    with open(preds_csv) as f:
        expected = {r["video"]: r for r in csv.DictReader(f)}
    videos = tuple(d / "videos" / v for v in sorted(expected))
    got = predict(PredictConfig(videos=videos, model=runs[head], device="cpu", top_k=3))
    for p in got:
        row = expected[p.video.split("/")[-1]]
        assert len(p.labels) == 3
        for label, prob in p.labels:
            assert prob == pytest.approx(float(row[label]), abs=1e-4)
        assert sum(p.attention) == pytest.approx(1.0, abs=1e-5)
        assert len(p.attention) == (3 if head == "stan" else len(p.shot_times))


def test_cli_predict_json_explain_and_bad_video(trained, tmp_path):
    d, _, runs = trained
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    png = tmp_path / "why.png"
    r = subprocess.run(VTX + ["predict", str(d / "videos" / "v1.mp4"), str(bad), "--model",
                              str(runs["stan"]), "--json", "--explain", str(png), "--device",
                              "cpu"], env=vtx_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stderr
    lines = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert [x["video"].split("/")[-1] for x in lines] == ["v1.mp4", "bad.mp4"]
    ok, failed = lines
    assert {x["label"] for x in ok["labels"]} == {"cold", "fast", "warm"}
    assert len(ok["attention"]) == 3 and "error" in failed
    assert "vtx: failed: " in r.stderr and "bad.mp4" in r.stderr
    explained = tmp_path / "why_v1.png"  # one file per video when several are given
    with Image.open(explained) as im:
        assert im.size[0] >= 400 and im.size[1] >= 150


def test_predict_on_real_trailer_clip(trained, media, tmp_path):
    _, _, runs = trained
    png = tmp_path / "explain.png"
    r = subprocess.run(VTX + ["predict", str(media / "goldeneye-vfr-drop3.mp4"), "--model",
                              str(runs["stan"]), "--explain", str(png), "--device", "cpu"],
                       env=vtx_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(str(media / "goldeneye-vfr-drop3.mp4") + ": ")
    assert all(lbl in r.stdout for lbl in ("cold", "fast", "warm"))
    with Image.open(png) as im:
        pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 10  # thumbnails were drawn, not a blank canvas


def test_predict_without_audio_gets_zero_audio_tokens_and_a_note(tmp_path):
    """A head trained with audio, asked about a video without audio, predicts as training and
    evaluate treat such a video (zero audio tokens, a note), instead of failing."""
    videos = tmp_path / "videos"
    videos.mkdir()
    rows = []
    for i in range(4):
        write_video(videos / f"a{i}.mp4", [Shot(16, i % 3, (1, 0), tone_hz=440.0 * (1 + i % 2)),
                                           Shot(16, 4, tone_hz=880.0)],
                    size=(64, 48), fps=16, audio=i < 3, seed=i)  # a3 has no audio stream
        rows.append((f"a{i}", "loud" if i % 2 else "quiet|loud", "train"))
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("video", "labels", "split"), *rows])
    cache = tmp_path / "feats.h5"
    s = extract(ExtractConfig(videos=videos, out=cache, features=("resnet18", "r2plus1d", "vggish"),
                              progress=False, device="cpu", dtype="float32"))
    assert s.done == 4
    train_logs = []
    r = train_head(TrainConfig(head="stan", features=cache, labels=tmp_path / "labels.csv",
                               out=tmp_path / "run", epochs=1, batch_size=2, device="cpu",
                               head_options={"audio": True, "d_model": 16, "n_heads": 2,
                                             "n_layers": 1}), log=train_logs.append)
    assert any("zero vggish tokens" in m for m in train_logs)
    evaluate_run(r.best_path, cache, tmp_path / "labels.csv", split="all",
                 predictions_out=tmp_path / "preds.csv", device="cpu", log=lambda m: None)
    with open(tmp_path / "preds.csv") as f:
        expected = {row["video"]: row for row in csv.DictReader(f)}
    notes = []
    got = predict(PredictConfig(videos=(videos / "a3.mp4", videos / "a0.mp4"), model=r.best_path,
                                device="cpu", top_k=2), log=notes.append)
    silent, loud = got
    assert silent.error is None and loud.error is None
    assert silent.notes and "zero vggish tokens" in silent.notes[0] and not loud.notes
    assert len(notes) == 1 and "a3.mp4" in notes[0] and "vggish" in notes[0]
    assert "notes" in silent.to_dict() and "notes" not in loud.to_dict()
    for pred in got:
        for label, prob in pred.labels:
            assert prob == pytest.approx(float(expected[pred.video.split("/")[-1]][label]),
                                         abs=1e-4)


def test_a_video_without_tokens_is_a_per_video_error_not_a_crash():
    from vtx.heads import build_head
    from vtx.pipeline.extract import VideoFeatures
    from vtx.train.predict import NoTokensError, predict_features

    empty = np.zeros((0, 2))
    feats = VideoFeatures(attrs={}, shots=empty.astype(np.int64), shot_times=empty,
                          features={"resnet18": np.zeros((0, 512), np.float32),
                                    "r2plus1d": np.zeros((0, 512), np.float32)},
                          fixed={"shots": empty.astype(np.int64), "shot_times": empty})
    head = build_head("meanpool", n_outputs=2)
    ckpt = {"task": "multilabel", "vocab": ["a", "b"], "train_config": {}}
    with pytest.raises(NoTokensError, match="no shot token"):
        predict_features(head, ckpt, feats, 2, "cpu")
