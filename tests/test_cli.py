"""The ``vtx`` command line: options, exit codes, summaries and the demo."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import pytest
from click.testing import CliRunner

from conftest import vtx_env
from vtx.cli.main import cli

VTX = [sys.executable, "-m", "vtx.cli.main"]


def test_extract_help_documents_options_and_exit_codes():
    r = CliRunner().invoke(cli, ["extract", "--help"])
    assert r.exit_code == 0
    for opt in ("--videos", "--out", "--features", "--device", "--detector", "--threshold",
                "--min-shot-len", "--max-shot-len", "--weights", "--weights-dir", "--overwrite",
                "--batch-size", "--workers", "--glob", "--dtype", "--json"):
        assert opt in r.output, opt
    for code in ("0  every video", "2  bad usage", "3  some videos failed", "4  --overwrite while"):
        assert code in r.output


@pytest.mark.parametrize("args,message", [
    pytest.param(["--videos", "/nonexistent/dir"], "does not exist", id="missing-videos"),
    pytest.param(["--features", "resnet18,nope"], "unknown feature", id="bad-feature"),
    pytest.param(["--device", "cuda:0"], "CUDA", id="no-cuda"),
    pytest.param(["--min-shot-len", "xyz"], "min-shot-len", id="bad-min-len"),
    pytest.param(["--batch-size", "0"], "batch-size", id="bad-batch"),
])
def test_usage_errors_exit_2(synth_dir, tmp_path, args, message):
    if "--device" in args:
        import torch
        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    base = {"--videos": str(synth_dir), "--out": str(tmp_path / "f.h5")}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    argv = ["extract", "--no-progress"] + [x for kv in base.items() for x in kv]
    r = CliRunner().invoke(cli, argv)
    assert r.exit_code == 2, r.output
    assert message in r.output


def test_json_summary_and_glob(synth_dir, tmp_path):
    out = tmp_path / "f.h5"
    r = CliRunner().invoke(cli, ["extract", "--videos", str(synth_dir), "--out", str(out),
                                 "--glob", "sub/**/*.mp4", "--features", "resnet18",
                                 "--no-progress", "--json", "--max-shot-len", "0.4"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output.strip().splitlines()[-1])
    assert (s["done"], s["skipped"], s["failed"]) == (1, 0, 0)
    with h5py.File(out) as f:
        assert list(f["videos"]) == ["sub%2Fb.mp4"]
        shots = f["videos"]["sub%2Fb.mp4"]["shots"][()]
        times = f["videos"]["sub%2Fb.mp4"]["shot_times"][()]
    # 16 + 22 frames at 30 fps with --max-shot-len 0.4: each shot split into two equal halves.
    assert shots.tolist() == [[0, 8], [8, 16], [16, 27], [27, 38]]
    assert ((times[:, 1] - times[:, 0]) <= 0.4 + 1e-9).all()
    assert s["shots"] == 4 and s["video_seconds"] > 0 and s["throughput"] > 0
    r = CliRunner().invoke(cli, ["extract", "--videos", str(synth_dir), "--out", str(out),
                                 "--glob", "sub/**/*.mp4", "--features", "resnet18",
                                 "--no-progress", "--max-shot-len", "0.4"])
    assert r.exit_code == 0 and "0 done, 1 skipped, 0 failed" in r.output


def test_single_file_input(synth_dir, tmp_path):
    out = tmp_path / "f.h5"
    r = CliRunner().invoke(cli, ["extract", "--videos", str(synth_dir / "c.mp4"), "--out",
                                 str(out), "--features", "resnet18", "--no-progress"])
    assert r.exit_code == 0, r.output
    with h5py.File(out) as f:
        assert list(f["videos"]) == ["c.mp4"] and f["videos"]["c.mp4"].attrs["path"] == "c.mp4"


def test_demo_end_to_end_offline(tmp_path):
    """The demo synthesises, extracts, trains STAN and meanpool, evaluates and explains; without
    official weights it falls back to random ones and says so."""
    env = vtx_env()
    env["TORCH_HOME"] = str(tmp_path / "empty_torch_home")
    out = tmp_path / "demo"
    env["VTX_PROGRESS_INTERVAL"] = "0"  # a progress line whenever one may be written
    r = subprocess.run(VTX + ["demo", "--out", str(out), "--videos", "24", "--epochs", "2",
                              "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    # stderr is a pipe, not a terminal: plain lines, at most one per video, no bar fragments.
    assert "\r" not in r.stderr
    progress = [ln for ln in r.stderr.splitlines() if not ln.startswith("[demo]")]
    assert all(ln.startswith("extract: ") for ln in progress), progress
    assert len(progress) <= 25
    assert "FALLING BACK TO --weights random" in r.stderr
    for step in ("1/5", "2/5", "3/5 train-head stan", "3/5 train-head meanpool", "4/5", "5/5"):
        assert f"[demo] {step}" in r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["weights"] == "random" and result["order_label"] == "chase_before_crash"
    assert set(result["order_ap"]) == {"stan", "meanpool"}
    assert all(0.0 <= v <= 1.0 for v in result["order_ap"].values())
    assert (out / "explain.png").stat().st_size > 1000
    assert {x["label"] for x in result["prediction"]["labels"]} == {
        "has_city", "fast_motion", "chase_before_crash"}
    assert result["margin"] == pytest.approx(result["order_ap"]["stan"]
                                             - result["order_ap"]["meanpool"], abs=1e-6)
    with h5py.File(out / "feats.h5") as f:
        assert len(f["videos"]) == 25
        assert all(g["resnet18"].attrs["weights"] == "random" for g in f["videos"].values())
    for head in ("stan", "meanpool"):
        assert (out / "runs" / head / "best.pt").exists()
        assert (out / "runs" / head / "metrics.jsonl").read_text().count("\n") == 2


def test_help_documents_disk_full_damage_and_check():
    r = CliRunner().invoke(cli, ["extract", "--help"])
    assert "5  disk full" in r.output and "6  the cache is damaged" in r.output
    assert "read-only" in r.output and "vtx check" in r.output
    r = CliRunner().invoke(cli, ["check", "--help"])
    assert r.exit_code == 0
    for text in ("--repair", "--json", "Fletcher-32", "0  no damage found",
                 "6  damaged videos found", "5  --repair: disk full", "carry none"):
        assert text in r.output, text
    for command in (["train-head", "--help"], ["evaluate", "--help"]):
        r = CliRunner().invoke(cli, command)
        assert "6  the feature cache is damaged (see vtx check)" in r.output
    assert "read-only --out" in CliRunner().invoke(cli, ["train-head", "--help"]).output


def test_demo_cli_defaults_are_the_demo_config_defaults():
    from vtx.demo import DemoConfig

    params = {p.name: p.default for p in cli.commands["demo"].params}
    config = DemoConfig()
    assert (params["n_videos"], params["epochs"], params["seed"], params["device"]) == (
        config.n_videos, config.epochs, config.seed, config.device)
