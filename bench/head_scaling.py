"""Stage-2 head scaling (a benchmark, not a test).

1. VTN forward+backward time and peak memory at 1k, 2k, 4k and 8k tokens. Each length runs in a
   fresh subprocess so its peak RSS (CPU) or peak CUDA memory is its own. Target: time(8k) /
   time(1k) <= 10 (linear attention would give 8).
2. STAN training throughput in videos per second on synthetic tokens at MMX-Trailer-20 scale
   (6,047 videos x 60 shots, resnet18 + r2plus1d tokens of 512), with the default STAN config.

Usage:  python bench/head_scaling.py [--device auto] [--json] [--stan-steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

from vtx.heads import build_head
from vtx.pipeline.backbones import resolve_device


def vtn_once(length: int, device: str, repeats: int = 6) -> dict:
    dev = resolve_device(device)
    torch.manual_seed(0)
    head = build_head("vtn", n_outputs=10, feature_dim=768, d_model=256, n_heads=4, n_layers=3,
                      window=32, max_len=length + 8).to(dev)
    x = torch.randn(1, length, 768, device=dev)
    batch = {"vit": x, "mask": torch.ones(1, length, dtype=torch.bool, device=dev)}
    times = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        head(batch).sum().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"tokens": length, "seconds": min(times[1:]), "peak_bytes": int(peak),
            "peak_kind": "cuda_allocated" if dev.type == "cuda" else "process_rss"}


def stan_throughput(device: str, steps: int, batch_size: int = 32, shots: int = 60) -> dict:
    dev = resolve_device(device)
    torch.manual_seed(0)
    head = build_head("stan", n_outputs=20).to(dev)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-4)
    data = {n: torch.randn(batch_size, shots, 512, device=dev) for n in ("resnet18", "r2plus1d")}
    data["mask"] = torch.ones(batch_size, shots, dtype=torch.bool, device=dev)
    target = (torch.rand(batch_size, 20, device=dev) > 0.8).float()
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for i in range(steps + 3):
        if i == 3:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(head(data), target)
        loss.backward()
        opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    vps = steps * batch_size / seconds
    return {"videos_per_s": vps, "epoch_seconds_6047": 6047 / vps, "batch_size": batch_size,
            "shots": shots, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--stan-steps", type=int, default=40)
    ap.add_argument("--_vtn", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._vtn is not None:  # child process: one VTN length
        print(json.dumps(vtn_once(args._vtn, args.device)))
        return
    vtn = []
    for length in (1024, 2048, 4096, 8192):
        r = subprocess.run([sys.executable, __file__, "--device", args.device, "--_vtn",
                            str(length)], capture_output=True, text=True, check=True)
        vtn.append(json.loads(r.stdout.strip().splitlines()[-1]))
    ratio = vtn[-1]["seconds"] / vtn[0]["seconds"]
    stan = stan_throughput(args.device, args.stan_steps)
    result = {"machine": {"cpu": platform.processor() or platform.machine(),
                          "cores": os.cpu_count(), "torch": torch.__version__,
                          "device": str(resolve_device(args.device))},
              "vtn": vtn, "vtn_8k_over_1k": ratio, "stan": stan}
    if args.json:
        print(json.dumps(result))
        return
    print("VTN forward+backward (d_model 256, 3 layers, window 32, ViT tokens of 768):")
    for r in vtn:
        print(f"  {r['tokens']:>5} tokens: {r['seconds'] * 1000:8.1f} ms, peak "
              f"{r['peak_bytes'] / 2**20:8.1f} MiB ({r['peak_kind']})")
    print(f"  time 8k/1k = {ratio:.2f} (target <= 10: {'PASS' if ratio <= 10 else 'MISS'})")
    print(f"STAN training: {stan['videos_per_s']:.1f} videos/s (batch {stan['batch_size']}, "
          f"{stan['shots']} shots) -> one MMX-Trailer-20 epoch (6,047 videos) in "
          f"{stan['epoch_seconds_6047']:.1f} s")


if __name__ == "__main__":
    main()
