"""``vtx info``: a cache's and a run's contents, checked against h5py, torch.load and
metrics.jsonl read directly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import pytest
import torch
from click.testing import CliRunner

from vtx.cli.main import cli


@pytest.fixture(scope="module")
def cache(synth_dir, tmp_path_factory):
    """Two good videos and one that is not a video: exit 3, one failure recorded."""
    d = tmp_path_factory.mktemp("info")
    videos = d / "videos"
    videos.mkdir()
    for name in ("a.mp4", "c.mp4"):
        shutil.copy(synth_dir / name, videos / name)
    (videos / "text.mp4").write_text("not a video\n" * 50)
    out = d / "feats.h5"
    r = CliRunner().invoke(cli, ["extract", "--videos", str(videos), "--out", str(out),
                                 "--features", "resnet18", "--quiet"])
    assert r.exit_code == 3, r.output
    return out


@pytest.fixture(scope="module")
def run(cache):
    labels = cache.parent / "labels.csv"
    labels.write_text("video,labels,split\na.mp4,x|y,train\nc.mp4,y,val\n")
    out = cache.parent / "runs" / "mp"
    r = CliRunner().invoke(cli, ["train-head", "meanpool", "--features", str(cache), "--labels",
                                 str(labels), "--out", str(out), "--epochs", "3", "--quiet",
                                 "--set", "hidden=16", "--set", 'features=["resnet18"]'])
    assert r.exit_code == 0, r.output
    return out


def test_cache_info_matches_the_file(cache):
    r = CliRunner().invoke(cli, ["info", str(cache), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    with h5py.File(cache) as f:
        groups = list(f["videos"].values())
        assert info["videos"] == len(groups) == 2
        assert info["duration_s"] == pytest.approx(sum(g.attrs["duration_s"] for g in groups),
                                                   abs=1e-3)
        assert info["shots"] == sum(len(g["shots"]) for g in groups)
        assert info["shot_config"] == json.loads(f.attrs["shot_config"])
        assert info["frame_config"] is None
        (feat,) = info["features"]
        assert feat["name"] == "resnet18"
        assert feat["identity"] == json.loads(f.attrs["features"])["resnet18"]
        assert (feat["level"], feat["row_shape"], feat["model"]) == ("shot", [512], "resnet18")
        assert feat["rows"] == info["shots"] and feat["videos"] == 2
        assert feat["bytes"] == sum(g["resnet18"].id.get_storage_size() for g in groups)
        assert feat["dtype"] == "float16"
        assert {d["name"] for d in info["other_datasets"]} == {"shots", "shot_times"}
        (failure,) = info["failures"]
        assert failure["path"] == "text.mp4"
        assert failure["reason"] == f["failures"]["text.mp4"].attrs["reason"]
    parts = list(Path(str(cache) + ".parts").iterdir())
    assert info["layout"] == "index" and info["parts"] == len(parts) and info["not_merged"] == 0
    assert info["file_bytes"] == cache.stat().st_size + sum(p.stat().st_size for p in parts)

    text = CliRunner().invoke(cli, ["info", str(cache)]).stdout
    assert f"2 videos, {info['duration_s'] / 60:.1f} min of video, {info['shots']} shots" in text
    assert "resnet18  shot   512" in text
    assert "  text.mp4: " in text


def test_run_info_matches_the_checkpoint_and_metrics(run, cache):
    r = CliRunner().invoke(cli, ["info", str(run), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    ckpt = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = [rec for rec in records if rec["best"]][-1]
    assert info["head"] == "meanpool" and info["head_config"] == ckpt["head_config"]
    assert info["head_config"]["hidden"] == 16
    assert info["parameters"] == sum(t.numel() for t in ckpt["state_dict"].values())
    assert info["classes"] == ["x", "y"] and info["task"] == "multilabel"
    assert info["trained_on"]["features"] == str(cache)
    assert info["trained_on"]["feature_identities"] == {
        "resnet18": ckpt["features"]["resnet18"]["weights"]}
    assert info["best"]["epoch"] == best["epoch"] == ckpt["epoch"]
    assert info["best"]["metric"] == "val_mAP_weighted"
    assert info["best"]["value"] == best["val_mAP_weighted"]
    assert (info["epochs_run"], info["epochs"]) == (3, 3)
    assert {f["name"] for f in info["files"]} == {"best.pt", "last.pt", "metrics.jsonl",
                                                  "learning_curve.png"}
    assert next(f for f in info["files"] if f["name"] == "best.pt")["bytes"] == \
        (run / "best.pt").stat().st_size

    text = CliRunner().invoke(cli, ["info", str(run / "last.pt")]).stdout
    assert "head meanpool" in text and f"best: epoch {best['epoch']}, val_mAP_weighted" in text
    assert "checkpoint: " in text and "(epoch 3)" in text


@pytest.mark.parametrize("make,message", [
    pytest.param(lambda d: d / "nothing.h5", "does not exist", id="missing"),
    pytest.param(lambda d: (d / "notes.txt", (d / "notes.txt").write_text("hi"))[0],
                 "not a vtx head checkpoint", id="not-a-checkpoint"),
    pytest.param(lambda d: d, "holds no best.pt or last.pt", id="empty-folder"),
])
def test_info_errors_exit_2(tmp_path, make, message):
    r = CliRunner().invoke(cli, ["info", str(make(tmp_path))])
    assert r.exit_code == 2, r.output
    assert message in r.stderr and "Traceback" not in r.output
