"""Wall time of ``vtx extract --engine ray`` against a plain local run, on the same videos.

Both runs extract the same ``--videos`` short synthetic videos (:func:`_common.make_video`:
``--seconds`` each, 2-6 s shots, ``--size``) with the default features (resnet18, r2plus1d),
random weights (the compute of the official ones), on the CPU, into a fresh cache each:

plain
    ``extract`` in this process, ``--workers 1`` (one decode thread; torch uses every core).
ray
    ``extract(engine="ray")`` with ``--ray-workers`` workers of ``--cpus-per-worker`` CPU(s)
    each (torch threads = that), on a local Ray instance on 127.0.0.1 that this script starts
    first; its start is timed apart ("ray start") and is not in the ray run's wall time. Each
    worker loads the models once (counted in the run's wall time, as in real use).

The two caches are compared dataset for dataset (the largest difference is printed: bf16
rounding differs with the batches, and a worker batches one video's shots at a time). For
each run the script prints the wall time, the throughput (video-seconds per wall-second) and
the cores busy on the whole machine while it ran (from /proc/stat: this process, the Ray
workers and anything else), and the load average before it, so a busy machine shows.

Usage::

    python bench/ray_vs_plain.py                      # 8 videos of 8 to 11.5 s, 320x180
    python bench/ray_vs_plain.py --videos 16 --seconds 20 --workdir /tmp/vtx-ray --json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import _system_busy_s, machine_info, make_video  # noqa: E402


def timed(fn):
    """(result, wall seconds, cores busy machine-wide, 1-minute load average before)."""
    load = os.getloadavg()[0]
    busy0, t0 = _system_busy_s(), time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    busy1 = _system_busy_s()
    cores = (busy1 - busy0) / wall if busy0 is not None and busy1 is not None else None
    return out, wall, cores, load


def cache_diff(a: Path, b: Path) -> float | None:
    """The largest absolute difference between two caches' numbers (None: they hold other
    videos, datasets, shapes or strings). With bf16 models (``--precision auto`` on a CPU
    with AVX512_BF16) a few 1e-2 is rounding: a Ray worker batches one video's shots, the plain
    run several videos'."""
    import h5py
    import numpy as np

    worst = 0.0
    with h5py.File(a) as x, h5py.File(b) as y:
        if set(x["videos"]) != set(y["videos"]):
            return None
        for key, g in x["videos"].items():
            if set(g) != set(y["videos"][key]):
                return None
            for name, d in g.items():
                u, v = d[()], y["videos"][key][name][()]
                if u.dtype.kind in "SUO":
                    if not np.array_equal(u, v):
                        return None
                elif u.shape != v.shape:
                    return None
                elif u.size:
                    worst = max(worst, float(np.abs(u.astype(float) - v.astype(float)).max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--size", default="320x180")
    ap.add_argument("--ray-workers", type=int, default=2)
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="folder for the videos and caches [default: a temporary one]")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from vtx.pipeline.extract import ExtractConfig, extract
    from vtx.pipeline.ray_engine import _import_ray, _ray

    size = tuple(int(x) for x in args.size.split("x"))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vtx-ray-bench-"))
    videos = work / "videos"
    for i in range(args.videos):
        make_video(videos / f"v{i}.mp4", args.seconds + i * 0.5, size=size)
    (work / "plain.h5").unlink(missing_ok=True)
    common = dict(videos=videos, device="cpu", weights="random", progress=False, overwrite=True)

    plain, plain_s, plain_cores, plain_load = timed(
        lambda: extract(ExtractConfig(out=work / "plain.h5", **common)))

    config = ExtractConfig(out=work / "ray.h5", engine="ray", ray_workers=args.ray_workers,
                           cpus_per_worker=args.cpus_per_worker, **common)
    with _ray_started(_ray(_import_ray(local=True), config)) as start_s:
        ray_sum, ray_s, ray_cores, ray_load = timed(lambda: extract(config))

    result = {
        "videos": args.videos,
        "seconds_each": [args.seconds, args.seconds + 0.5 * (args.videos - 1)],
        "size": list(size), "features": "resnet18,r2plus1d", "weights": "random",
        "plain": {"wall_s": round(plain_s, 2), "throughput": round(plain.throughput, 3),
                  "load_s": round(plain.load_s, 2), "busy_cores": _r(plain_cores),
                  "load_avg_before": round(plain_load, 2), "done": plain.done},
        "ray": {"workers": args.ray_workers, "cpus_per_worker": args.cpus_per_worker,
                "start_s": round(start_s, 2), "wall_s": round(ray_s, 2),
                "throughput": round(ray_sum.video_seconds / ray_s, 3),
                "busy_cores": _r(ray_cores), "load_avg_before": round(ray_load, 2),
                "done": ray_sum.done},
        "ray_over_plain": round(ray_s / plain_s, 3),
        "precision": _precision(work / "plain.h5"),
        "max_abs_diff": cache_diff(work / "plain.h5", work / "ray.h5"),
        "machine": machine_info(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    p, r = result["plain"], result["ray"]
    print(f"{args.videos} videos, {plain.video_seconds:.0f} video-s in all, {args.size}, "
          f"resnet18+r2plus1d, random weights, CPU ({os.cpu_count()} cores)")
    print(f"plain      : {p['wall_s']:7.2f} s  {p['throughput']:.3f} video-s/s  "
          f"(models load {p['load_s']:.1f} s; {p['busy_cores']} cores busy; load avg before "
          f"{p['load_avg_before']})")
    print(f"ray {args.ray_workers}x{args.cpus_per_worker:g}CPU: {r['wall_s']:7.2f} s  "
          f"{r['throughput']:.3f} video-s/s  (Ray start {r['start_s']:.1f} s not included; "
          f"{r['busy_cores']} cores busy; load avg before {r['load_avg_before']})")
    print(f"ray / plain: {result['ray_over_plain']:.2f}; caches: same videos and datasets, "
          f"max |difference| {result['max_abs_diff']} ({result['precision']} models)"
          if result["max_abs_diff"] is not None else "caches differ in videos or datasets!")


def _precision(cache: Path) -> str:
    import h5py

    with h5py.File(cache) as f:
        g = next(iter(f["videos"].values()))
        return str(g["resnet18"].attrs.get("precision", "?"))


def _r(x):
    return None if x is None else round(x, 2)


class _ray_started:
    """Start the local Ray instance the engine would start (timed); shut it down after."""

    def __init__(self, cm):
        self.cm = cm

    def __enter__(self) -> float:
        t0 = time.perf_counter()
        self.cm.__enter__()
        return time.perf_counter() - t0

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
