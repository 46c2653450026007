"""Cost of each stage-1 feature: compute in ms per video-second, disk per video-minute
(a benchmark, not a test).

For each feature, ``vtx extract --features F`` runs alone on the same video into a fresh cache;
the models' load time (``ExtractSummary.load_s``) is excluded. The baseline is the same one-pass
decode with shot detection only (no feature); "marginal" is a feature's time above that baseline.
Disk is the HDF5 storage size of each dataset divided by the video's minutes.

Usage:  python bench/feature_costs.py [VIDEO] [--seconds 60] [--frame-rate 1] [--json]
        (without VIDEO a synthetic 640x360 video is generated, see bench/_common.py)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import FPS, SIZE, machine_info, shot_plan  # noqa: E402

from vtx.io.cache import video_key  # noqa: E402
from vtx.io.reader import CacheReader  # noqa: E402
from vtx.features import parse_features  # noqa: E402
from vtx.pipeline.backbones import load_backbones  # noqa: E402
from vtx.pipeline.extract import ExtractConfig, extract  # noqa: E402
from vtx.pipeline.producer import VideoJob, VideoProducer  # noqa: E402
from vtx.pipeline.sampling import FrameSampling  # noqa: E402
from vtx.pipeline.shots import ShotConfig  # noqa: E402

FEATURES = ("resnet18", "r2plus1d", "vit", "vit_patches", "vggish", "motion", "residual")


def baseline_seconds(video: Path) -> float:
    """Decode + RGB conversion + shot detection, the part every feature shares."""
    job = VideoJob(0, video, video.name, video_key(video.name), (), replace=True)
    t0 = time.perf_counter()
    VideoProducer(job, {}, ShotConfig(), lambda msg: None).run()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("video", nargs="?", type=Path)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--frame-rate", type=float, default=1.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vtx-featcost-"))
    video = args.video
    if video is None:
        from dataclasses import replace

        from vtx.io.synth import write_video
        video = tmp / "bench.mp4"  # the benchmark shot plan, with a tone per shot (for VGGish)
        shots = [replace(s, tone_hz=220.0 * (1 + i % 5)) for i, s in enumerate(
            shot_plan(args.seconds))]
        write_video(video, shots, size=SIZE, fps=FPS, audio=True)
    # Warm the model cache (random weights: same compute as official ones).
    load_backbones(parse_features("resnet18,r2plus1d,vit,vggish"), "random")
    base = baseline_seconds(video)
    rows = []
    duration = None
    for feat in FEATURES:
        out = tmp / f"{feat}.h5"
        cfg = ExtractConfig(videos=video, out=out, features=(feat,), weights="random",
                            device=args.device, progress=False,
                            frames=FrameSampling(frame_rate=args.frame_rate))
        s = extract(cfg, log=lambda m: None)
        seconds = max(s.wall_s - s.load_s, 1e-9)  # model load excluded
        datasets = parse_features(feat)[0].dataset_names
        with CacheReader(out) as cache:
            info = next(cache.videos())
            duration = float(info.attrs["duration_s"])
            sizes = {n: cache.storage_bytes(info.key, n) for n in info.datasets
                     if n in datasets}
        rows.append({"feature": feat, "seconds": seconds,
                     "ms_per_video_s": 1000 * seconds / duration,
                     "marginal_ms_per_video_s": 1000 * (seconds - base) / duration,
                     "disk_bytes_per_video_min": {n: b * 60 / duration for n, b in sizes.items()}})
    result = {"machine": machine_info(), "video": str(video), "duration_s": duration,
              "frame_rate": args.frame_rate, "torch_threads": torch.get_num_threads(),
              "baseline_ms_per_video_s": 1000 * base / duration, "features": rows}
    if args.json:
        print(json.dumps(result))
        return
    print(f"video {video} ({duration:.1f} s), frame-level sampling {args.frame_rate:g} fps")
    print(f"baseline (decode + RGB + shot detection): {1000 * base / duration:.1f} ms/video-s")
    print(f"{'feature':<12}{'ms/video-s':>12}{'marginal':>12}   disk per video-minute")
    for r in rows:
        disk = ", ".join(f"{n} {b / 1e6:.3f} MB" for n, b in r["disk_bytes_per_video_min"].items())
        print(f"{r['feature']:<12}{r['ms_per_video_s']:>12.1f}{r['marginal_ms_per_video_s']:>12.1f}"
              f"   {disk}")


if __name__ == "__main__":
    main()
