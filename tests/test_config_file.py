"""``--config FILE.toml`` for ``vtx extract`` and ``vtx train-head``: keys, overrides, errors,
and the resolved settings recorded where flags' settings are."""

from __future__ import annotations

import json

import h5py
import pytest
import torch
from click.testing import CliRunner

from vtx.cli.main import cli


def invoke(args, **kw):
    return CliRunner().invoke(cli, args, **kw)


@pytest.fixture(scope="module")
def extracted(synth_dir, tmp_path_factory):
    """extract.toml beside its own paths (videos, out relative to it), run from elsewhere."""
    d = tmp_path_factory.mktemp("cfg")
    (d / "extract.toml").write_text(
        f'videos = "{synth_dir}"\n'
        'out = "cache/feats.h5"\n'
        'glob = "sub/**/*.mp4"          # a single value of a repeatable option\n'
        'features = "resnet18"\n'
        'detector = "content"\n'
        'threshold = 30\n'
        'max-shot-len = 0.4\n'
        'min_shot_len = "15"\n'
        'quiet = true\n')
    r = invoke(["extract", "--config", str(d / "extract.toml"), "--json"])
    assert r.exit_code == 0, r.output
    assert r.stderr == ""  # quiet = true
    return d


def test_extract_reads_every_key_and_records_the_settings(extracted):
    with h5py.File(extracted / "cache" / "feats.h5") as f:
        assert list(f["videos"]) == ["sub%2Fb.mp4"]
        assert json.loads(f.attrs["shot_config"]) == {
            "detector": "content", "threshold": 30.0, "min_shot_len": "15", "max_shot_len": 0.4}
        assert list(json.loads(f.attrs["features"])) == ["resnet18"]
        # 16 + 22 frames at 30 fps, split at 0.4 s
        assert f["videos"]["sub%2Fb.mp4"]["shots"][()].tolist() == [[0, 8], [8, 16], [16, 27],
                                                                   [27, 38]]


def test_command_line_flags_override_the_file(extracted):
    out = extracted / "other.h5"
    r = invoke(["extract", "--config", str(extracted / "extract.toml"), "--out", str(out),
                "--max-shot-len", "10", "--glob", "c.mp4"])
    assert r.exit_code == 0, r.output
    with h5py.File(out) as f:
        assert list(f["videos"]) == ["c.mp4"]
        config = json.loads(f.attrs["shot_config"])
        assert config["max_shot_len"] == 10.0 and config["threshold"] == 30.0  # file's value


@pytest.mark.parametrize("text,message", [
    pytest.param('bogus-key = 1\n', "unknown key 'bogus-key'", id="unknown-key"),
    pytest.param('batch-size = "many"\n', "'many' is not a valid integer", id="bad-type"),
    pytest.param('batch-size = 4\nbatch_size = 8\n', "twice", id="twice"),
    pytest.param('batch-size = \n', "is not valid TOML", id="not-toml"),
])
def test_bad_config_files_exit_2(tmp_path, synth_dir, text, message):
    path = tmp_path / "extract.toml"
    path.write_text(text)
    r = invoke(["extract", "--config", str(path), "--videos", str(synth_dir), "--out",
                str(tmp_path / "f.h5")])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    if "unknown key" in message:  # the valid keys are listed
        for key in ("videos", "batch-size", "min-shot-len", "glob", "quiet"):
            assert key in r.output


def test_train_head_config_with_head_and_set_table(extracted, tmp_path):
    cache = extracted / "cache" / "feats.h5"
    (extracted / "labels.csv").write_text("video,labels,split\nsub/b.mp4,x|y,train\n")
    (extracted / "head.toml").write_text(
        'head = "meanpool"\nfeatures = "cache/feats.h5"\nlabels = "labels.csv"\n'
        'out = "runs/mp"\nepochs = 1\nbatch_size = 2\nlr = 0.001\ndropout = 0.25\nquiet = true\n'
        '[set]\nhidden = 24\nfeatures = ["resnet18"]\n')
    r = invoke(["train-head", "--config", str(extracted / "head.toml"), "--epochs", "2"])
    assert r.exit_code == 0, r.output
    assert "epoch 1/2" not in r.stderr  # quiet
    ckpt = torch.load(extracted / "runs" / "mp" / "last.pt", weights_only=True)
    config = ckpt["train_config"]
    assert (config["head"], config["epochs"], config["batch_size"], config["lr"]) == (
        "meanpool", 2, 2, 0.001)
    assert config["features"] == str(cache) and config["progress"] is False
    assert config["head_options"] == {"dropout": 0.25, "hidden": 24, "features": ["resnet18"]}
    assert ckpt["head_config"]["hidden"] == 24

    # An unknown key is named, with train-head's valid keys.
    (tmp_path / "bad.toml").write_text('head = "stan"\nlayer = 2\n')
    r = invoke(["train-head", "--config", str(tmp_path / "bad.toml")])
    assert r.exit_code == 2 and "unknown key 'layer'" in r.output
    assert "layers" in r.output and "head" in r.output
