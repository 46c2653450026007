"""What HDF5's Fletcher-32 chunk checksums cost the cache: write time, read time and size
(a benchmark, not a test).

Two synthetic caches are written with :func:`vtx.io.cache.write_dataset` (vtx's own chunking),
once with and once without ``fletcher32``, and read back whole:

* ``all features``: ``--videos`` one-minute videos with every built-in feature at 1 fps (20
  shots, 60 sampled frames, 62 audio examples a video; float16 features, float32 motion), about
  19.5 MB a video, nearly all of it ``vit_patches`` in 1 MiB chunks;
* ``shot features``: ``--small-videos`` videos with only ``resnet18`` and ``r2plus1d`` (20 rows
  of 512 float16 each): many tiny chunks, as stage 2 reads them.

Writes end with an fsync (so the time includes putting the bytes on the disk); reads run with
the file in the page cache (the checksum's CPU cost is what is measured; a cold read is bound
by the disk and the checksum adds the same CPU time to it). Each figure is the best of
``--repeats`` runs, in wall-clock seconds and in this process's CPU seconds (the CPU figures
are steadier when other processes share the cores; the write's fsync wait is not CPU time).

Usage:  python bench/checksum_cost.py [--videos 10] [--small-videos 500] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info  # noqa: E402

from vtx.features import FEATURES  # noqa: E402
from vtx.io.cache import write_dataset  # noqa: E402

ROWS = {"shot": 20, "frame": 60, "audio": 62}  # one video-minute
SIZES = {"motion_grid": 14, "residual_size": 56}


def video_arrays(rng: np.random.Generator, names: tuple[str, ...]) -> dict[str, tuple]:
    """One video-minute of the named features' datasets, random values, storage dtypes."""
    out = {}
    for name in names:
        spec = FEATURES[name]
        for d in spec.datasets:
            dtype = np.float16 if d.dtype == "feature" else np.dtype(d.dtype)
            shape = (ROWS[spec.level],) + spec.shape(d, SIZES)
            if np.dtype(dtype).kind == "f":
                x = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
            else:
                x = rng.integers(0, 2, shape).astype(dtype)
            out[d.name] = (x, d.chunk_rows)
    return out


def write(path: Path, videos: list[dict], fletcher32: bool) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    with h5py.File(path, "w") as f:
        g = f.create_group("videos")
        for i, arrays in enumerate(videos):
            v = g.create_group(f"v{i}.mp4")
            for name, (x, rows) in arrays.items():
                write_dataset(v, name, x, {"level": "shot"}, rows, fletcher32=fletcher32)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t0, time.process_time() - c0


def read(path: Path) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    with h5py.File(path, "r") as f:
        for g in f["videos"].values():
            for d in g.values():
                d[()]
    return time.perf_counter() - t0, time.process_time() - c0


def measure(label: str, videos: list[dict], repeats: int, tmp: Path) -> dict:
    row = {"case": label, "videos": len(videos),
           "data_bytes": sum(x.nbytes for v in videos for x, _ in v.values())}
    for checks in (False, True):
        key = "fletcher32" if checks else "plain"
        path = tmp / f"{key}.h5"
        w = [write(path, videos, checks) for _ in range(repeats)]
        read(path)  # into the page cache
        r = [read(path) for _ in range(repeats)]
        row[key] = {"write_s": round(min(x[0] for x in w), 4),
                    "write_cpu_s": round(min(x[1] for x in w), 4),
                    "read_s": round(min(x[0] for x in r), 4),
                    "read_cpu_s": round(min(x[1] for x in r), 4),
                    "file_bytes": path.stat().st_size}
        path.unlink()
    a, b = row["plain"], row["fletcher32"]
    for k in ("write_s", "write_cpu_s", "read_s", "read_cpu_s"):
        row[f"{k}_overhead"] = round(b[k] / a[k] - 1, 4)
    row["read_cpu_ms_per_mb"] = round(1e3 * (b["read_cpu_s"] - a["read_cpu_s"])
                                      / (row["data_bytes"] / 1e6), 4)
    row["size_overhead_bytes"] = b["file_bytes"] - a["file_bytes"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=int, default=10, help="one-minute videos, all features")
    ap.add_argument("--small-videos", type=int, default=500, help="videos, shot features only")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    everything = tuple(n for n in FEATURES if FEATURES[n].builtin)
    big = [video_arrays(rng, everything) for _ in range(args.videos)]
    small = [video_arrays(rng, ("resnet18", "r2plus1d")) for _ in range(args.small_videos)]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        rows = [measure("all features", big, args.repeats, Path(tmp)),
                measure("shot features", small, args.repeats, Path(tmp))]
    if args.json:
        print(json.dumps({"machine": machine_info(), "results": rows}))
        return
    for r in rows:
        a, b = r["plain"], r["fletcher32"]
        print(f"{r['case']}: {r['videos']} videos, {r['data_bytes'] / 1e6:.1f} MB of data "
              f"(plain -> fletcher32, best of {args.repeats})")
        for k, what in (("write_s", "write wall s"), ("write_cpu_s", "write CPU s"),
                        ("read_s", "read wall s"), ("read_cpu_s", "read CPU s")):
            print(f"  {what:<13} {a[k]:.3f} -> {b[k]:.3f} ({100 * r[f'{k}_overhead']:+.1f}%)")
        print(f"  read CPU per MB of data: +{r['read_cpu_ms_per_mb']:.3f} ms")
        print(f"  file size     {a['file_bytes']:,} -> {b['file_bytes']:,} B "
              f"(+{r['size_overhead_bytes']} B)")


if __name__ == "__main__":
    main()
