"""Stage-2 training memory against cache size (a benchmark, not a test).

Writes synthetic caches in the documented layout (docs/FORMAT.md) with ``vit_patches`` tokens,
8 frames x 196 x 768 float16 per video (2.4 MB), at 1x and 8x the number of videos, and trains a
small TimeSformer on each for one epoch in a fresh ``vtx train-head`` subprocess. Reports the
peak RSS of each run (``ru_maxrss`` of the child) and the ratio 8x / 1x. Tokens stream from the
cache (``--cache-mb`` bounds what a process keeps), so the ratio should stay near 1; the
target is <= 1.3.

Usage:  python bench/train_memory.py [--videos 40] [--factor 8] [--cache-mb 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np


def write_cache(folder: Path, n_videos: int, frames: int = 8) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    cache, labels = folder / "feats.h5", folder / "labels.csv"
    rows = ["video,labels,split"]
    with h5py.File(cache, "w") as f:
        f.attrs.update(vtx_version="bench", schema_version=1,
                       shot_config=json.dumps({"detector": "content"}),
                       frame_config=json.dumps({"frame_rate": 1.0, "frames_per_video": None}),
                       features=json.dumps({"vit_patches": "random"}))
        videos = f.create_group("videos")
        for v in range(n_videos):
            g = videos.create_group(f"v{v:05d}.mp4")
            g.attrs.update(path=f"v{v:05d}.mp4", size_bytes=1, duration_s=float(frames))
            g["shots"] = np.array([[0, 25 * frames]], np.int64)
            g["shot_times"] = np.array([[0.0, float(frames)]])
            g["frames"] = np.arange(frames, dtype=np.int64) * 25
            g["frame_times"] = np.arange(frames, dtype=np.float64)
            label = v % 2
            x = rng.normal(size=(frames, 196, 768)).astype(np.float16) + np.float16(label)
            ds = g.create_dataset("vit_patches", data=x, chunks=(1, 196, 768))
            ds.attrs.update(model="vit_b_16", weights="random", weights_file="", dim=768,
                            sampling="bench", level="frame")
            rows.append(f"v{v:05d},{'a' if label else 'b'},{'train' if v % 5 else 'val'}")
    labels.write_text("\n".join(rows) + "\n")
    return cache, labels


def train_peak_rss(cache: Path, labels: Path, out: Path, cache_mb: int) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one ``vtx train-head timesformer`` epoch."""
    code = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "r = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
            "time.perf_counter() - t); sys.exit(r.returncode)")
    cmd = [sys.executable, "-c", code, sys.executable, "-m", "vtx.cli.main", "train-head",
           "timesformer", "--features", str(cache), "--labels", str(labels), "--out", str(out),
           "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--depth", "1",
           "--d-model", "32", "--heads", "2", "--cache-mb", str(cache_mb)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    kib, seconds = res.stdout.split()[-2:]
    return int(kib) / 1024, float(seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=40)
    ap.add_argument("--factor", type=int, default=8)
    ap.add_argument("--cache-mb", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = {"machine": f"{platform.processor() or platform.machine()}, "
                      f"{resource.getpagesize()}-byte pages, python {platform.python_version()}",
           "cache_mb": args.cache_mb, "runs": []}
    with tempfile.TemporaryDirectory(prefix="vtx-train-mem-") as tmp:
        for n in (args.videos, args.videos * args.factor):
            folder = Path(tmp) / f"n{n}"
            folder.mkdir()
            t0 = time.perf_counter()
            cache, labels = write_cache(folder, n)
            write_s = time.perf_counter() - t0
            rss, seconds = train_peak_rss(cache, labels, folder / "run", args.cache_mb)
            out["runs"].append({"videos": n, "cache_mb_on_disk": round(cache.stat().st_size / 2**20),
                                "peak_rss_mib": round(rss), "train_s": round(seconds, 1),
                                "write_s": round(write_s, 1)})
            cache.unlink()
    out["ratio"] = round(out["runs"][1]["peak_rss_mib"] / out["runs"][0]["peak_rss_mib"], 3)
    if args.json:
        print(json.dumps(out))
    else:
        for r in out["runs"]:
            print(f"{r['videos']:6d} videos  cache {r['cache_mb_on_disk']:6d} MiB  peak RSS "
                  f"{r['peak_rss_mib']:6d} MiB  train {r['train_s']:.1f} s")
        print(f"peak RSS {args.factor}x / 1x = {out['ratio']} (target <= 1.3)")


if __name__ == "__main__":
    main()
