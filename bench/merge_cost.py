"""What adding one video costs, against the number of videos already cached (issue 9).

Builds caches of ``--sizes`` videos (default 10 and 1000) whose parts hold what the default
features write for a 3-minute trailer (60 shots: ``shots``, ``shot_times``, ``resnet18`` and
``r2plus1d``, 512 float16 each), merged into the index, then times adding one more video in
two ways, best of ``--repeats``:

* **part + merge**: ``CacheWriter.write_video`` of the new video's datasets plus ``merge()``
  (what ``vtx extract`` does after the models ran): the storage cost alone;
* **plan**: ``CacheWriter.versions()``, how ``vtx extract`` finds what a cache holds before a
  run (reads the index's catalog, no part);

and, for comparison, what the earlier one-file layout's merge did: copy the whole cache file
(timed as ``shutil.copyfile`` of a ``vtx compact``-ed copy). Prints the ratio of the largest to
the smallest cache (target <= 2) for part + merge.

    .venv/bin/python bench/merge_cost.py [--sizes 10 1000] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info  # noqa: E402

from vtx.io.cache import CacheWriter, compact_cache  # noqa: E402

SHOTS = 60


def video(i: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(i)
    starts = np.arange(SHOTS) * 75
    shots = np.stack([starts, starts + 75], 1).astype(np.int64)
    attrs = {"path": f"v{i:05d}.mp4", "size_bytes": 1000 + i, "duration_s": 180.0}
    ds = {"shots": (shots, {}), "shot_times": (shots / 25.0, {}),
          "resnet18": (rng.standard_normal((SHOTS, 512)).astype(np.float16), {"model": "r"}),
          "r2plus1d": (rng.standard_normal((SHOTS, 512)).astype(np.float16), {"model": "r2"})}
    return attrs, ds


def build(folder: Path, n: int) -> Path:
    out = folder / "feats.h5"
    with CacheWriter(out, merge=False) as w:
        for i in range(n):
            attrs, ds = video(i)
            w.write_video(f"v{i:05d}.mp4", attrs, ds, replace=True)
        w.merge(create=True)
    return out


def size_of(cache: Path) -> int:
    parts = Path(str(cache) + ".parts")
    return cache.stat().st_size + sum(p.stat().st_size for p in parts.glob("*.h5"))


def measure(n: int, repeats: int, root: Path) -> dict:
    folder = root / f"n{n}"
    folder.mkdir()
    t0 = time.perf_counter()
    cache = build(folder, n)
    built = time.perf_counter() - t0
    add, plan = [], []
    for r in range(repeats):
        attrs, ds = video(10_000_000 + r)
        t = time.perf_counter()
        with CacheWriter(cache, merge=False) as w:
            w.write_video(f"new{r}.mp4", attrs, ds, replace=True)
            w.merge()
        add.append(time.perf_counter() - t)
        t = time.perf_counter()
        with CacheWriter(cache, merge=False) as w:
            held = len(w.versions())
        plan.append(time.perf_counter() - t)
        assert held == n + r + 1
    single = folder / "single.h5"
    compact_cache(cache, single, progress=False)
    copies = []
    for _ in range(max(1, repeats // 2)):
        t = time.perf_counter()
        shutil.copyfile(single, folder / "copy.h5")
        copies.append(time.perf_counter() - t)
        (folder / "copy.h5").unlink()
    return {"videos": n, "cache_bytes": size_of(cache), "index_bytes": cache.stat().st_size,
            "build_s": round(built, 2), "add_one_s": round(min(add), 4),
            "plan_s": round(min(plan), 4), "one_file_copy_s": round(min(copies), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 1000])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        rows = [measure(n, args.repeats, Path(tmp)) for n in args.sizes]
    ratio = rows[-1]["add_one_s"] / rows[0]["add_one_s"]
    result = {"machine": machine_info(), "load": os.getloadavg(), "rows": rows,
              "ratio_add_one": round(ratio, 2), "target": 2.0,
              "verdict": "PASS" if ratio <= 2.0 else "MISS"}
    if args.json:
        print(json.dumps(result))
        return
    for r in rows:
        print(f"{r['videos']:>6} videos ({r['cache_bytes'] / 1e6:8.1f} MB, index "
              f"{r['index_bytes'] / 1e3:7.1f} kB): add one {1e3 * r['add_one_s']:7.1f} ms, "
              f"plan {1e3 * r['plan_s']:7.1f} ms; one-file copy {1e3 * r['one_file_copy_s']:7.1f} ms")
    print(f"add one video, {rows[-1]['videos']} vs {rows[0]['videos']} videos: x{ratio:.2f} "
          f"(target <= 2): {result['verdict']}; load {result['load'][0]:.1f}")


if __name__ == "__main__":
    main()
