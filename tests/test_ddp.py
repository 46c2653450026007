"""Distributed data parallel: ``vtx train-head`` under ``torchrun --nproc_per_node 2`` on the
CPU (gloo), the way a multi-GPU run is launched."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from conftest import vtx_env
from test_train import make_cache
from vtx.train.checkpoint import load_checkpoint, read_checkpoint


def test_train_head_under_torchrun_with_two_cpu_processes(tmp_path):
    cache, labels, _ = make_cache(tmp_path, n_videos=24)
    out = tmp_path / "run"
    env = vtx_env()
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vtx.cli.main", "train-head", "meanpool", "--features", str(cache),
           "--labels", str(labels), "--out", str(out), "--epochs", "3", "--batch-size", "4",
           "--lr", "3e-3", "--device", "cpu", "--set", "hidden=16", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300,
                          cwd=os.getcwd())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # rank 0 alone prints the summary and the per-epoch lines
    summaries = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["epochs_run"] == 3
    assert sum(x.startswith("epoch 1/3") for x in proc.stderr.splitlines()) == 1

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert all(r["val_loss"] is not None and 0 <= r["val_mAP_weighted"] <= 1 for r in lines)
    last = read_checkpoint(out / "last.pt")
    assert last["epoch"] == 3
    # 8 training videos over 2 ranks at batch 4: one step per rank per epoch
    assert last["scheduler"]["last_epoch"] == 3
    head, best = load_checkpoint(out / "best.pt")
    assert best["epoch"] == max(r["epoch"] for r in lines if r["best"])
    assert not any(k.startswith("module.") for k in best["state_dict"])  # unwrapped from DDP
    assert all(torch.isfinite(v).all() for v in best["state_dict"].values())
