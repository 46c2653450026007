"""Two local processes (``--shard 0/2`` and ``--shard 1/2``, one torch thread each) against one
process (two torch threads) on the same videos, and two processes without ``--shard`` sharing
the list through claims: the wall time of each setup, fresh caches.

The videos are ``--videos N`` synthetic 640x360 clips of ``--seconds`` each (the shot plan of
``bench/_common.py``), default features, random weights, CPU. The two shard processes write
one cache at once (claims, parts, merges under the lock) and the cache they leave is checked
against the one-process cache (same videos, same datasets).

    .venv/bin/python bench/shard_throughput.py [--videos 8] [--seconds 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, make_video  # noqa: E402

VTX = [sys.executable, "-m", "vtx.cli.main", "extract", "--weights", "random", "--device",
       "cpu", "--quiet", "--json"]


def run(cmds: list[list[str]], threads: int) -> tuple[float, list[dict]]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, text=True) for c in cmds]
    outs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - t0
    if any(p.returncode for p in procs):
        raise SystemExit(f"a run failed: {[p.returncode for p in procs]}")
    return wall, [json.loads(o) for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        videos = root / "videos"
        videos.mkdir()
        for i in range(args.videos):
            make_video(videos / f"clip{i:02d}.mp4", args.seconds)
        base = VTX + ["--videos", str(videos)]
        load0 = os.getloadavg()[0]
        one, [s1] = run([base + ["--out", str(root / "one.h5")]], threads=2)
        two, s2 = run([base + ["--out", str(root / "two.h5"), "--shard", f"{k}/2"]
                       for k in range(2)], threads=1)
        # two processes on the whole list: the claims share the videos out as they go
        claims, s3 = run([base + ["--out", str(root / "claims.h5")] for _ in range(2)],
                         threads=1)
        load1 = os.getloadavg()[0]
        import h5py
        with h5py.File(root / "one.h5") as a, h5py.File(root / "two.h5") as b:
            same = sorted(a["videos"]) == sorted(b["videos"]) and all(
                sorted(a["videos"][k]) == sorted(b["videos"][k]) for k in a["videos"])
    video_s = s1["video_seconds"]
    result = {"machine": machine_info(), "videos": args.videos, "seconds_each": args.seconds,
              "one_process_s": round(one, 2), "two_shards_s": round(two, 2),
              "speedup": round(one / two, 2), "one_throughput": round(video_s / one, 2),
              "two_throughput": round(video_s / two, 2),
              "shard_done": [s["done"] for s in s2], "same_datasets": same,
              "two_claiming_s": round(claims, 2), "claiming_done": [s["done"] for s in s3],
              "claiming_speedup": round(one / claims, 2),
              "load_before_after": [round(load0, 2), round(load1, 2)]}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.videos} videos x {args.seconds:.0f} s: one process {one:.1f} s "
          f"({result['one_throughput']} video-s/s), two shards {two:.1f} s "
          f"({result['two_throughput']} video-s/s; done {result['shard_done']}), "
          f"x{result['speedup']}; two processes claiming from one list {claims:.1f} s (done "
          f"{result['claiming_done']}), x{result['claiming_speedup']}; same datasets: {same}; "
          f"load {load0:.1f} -> {load1:.1f}")


if __name__ == "__main__":
    main()
