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
from vtx.train.distributed import Dist, all_mean, broadcast, epoch_seed, has_unused_parameters


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


def test_has_unused_parameters_finds_parameters_without_gradients():
    class TwoBranches(torch.nn.Module):
        def __init__(self, use_second: bool):
            super().__init__()
            self.use_second = use_second
            self.a, self.b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)

        def forward(self, x):
            y = torch.nn.functional.dropout(self.a(x), 0.5)
            return y + self.b(x) if self.use_second else y

    x = torch.randn(4, 3)
    unused, used = TwoBranches(use_second=False), TwoBranches(use_second=True)
    state = torch.get_rng_state()
    assert has_unused_parameters(unused, x)
    assert not has_unused_parameters(used, x)
    assert all(p.grad is None for p in used.parameters())   # the probe leaves no gradients
    assert torch.equal(torch.get_rng_state(), state)        # nor any trace in the RNG (dropout)


def test_collectives_are_the_identity_on_one_process():
    d = Dist()
    assert not d.enabled and d.main
    assert all_mean(d, 6.0, 4, torch.device("cpu")) == 1.5
    assert all_mean(d, 0.0, 0, torch.device("cpu")) == 0.0
    assert broadcast(d, (3, None)) == (3, None)
    assert epoch_seed(0, 1, 0) != epoch_seed(0, 1, 1) != epoch_seed(0, 2, 1)
