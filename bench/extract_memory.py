"""Does ``vtx extract`` run in constant memory whatever the video's length?

Runs the ``vtx extract`` command as a child process on a generated 1-minute and a generated
10-minute video (same frame size, same shot-length distribution: shots of 2-6 s, see
``bench/_common.py``) and reads the child's peak resident set size from ``os.wait4`` (its
``ru_maxrss``, the kernel's high-water mark, so short peaks between samples are not missed).
While the child runs, ``/proc/<pid>/status`` is also polled (VmRSS every 0.1 s) to show how the
RSS moves over the run (peak of each quarter of the run time).

A third child only imports vtx and loads both backbones (no video): the memory any run needs
before it touches a video. ``peak - baseline`` is what the video costs.

The figure of merit is ``peak(10 min) / peak(1 min)``, target <= 1.2.

Weights are random (``--weights random``): same architecture and memory as the official ones.

Usage::

    python bench/extract_memory.py --workdir /tmp/vtx-bench   # keeps the videos for reruns
    python bench/extract_memory.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, make_video, verdict  # noqa: E402

TARGET = 1.2
BASELINE_CODE = """
import sys
from vtx.features import parse_features
from vtx.pipeline.backbones import load_backbones, resolve_device
import vtx.pipeline.extract  # everything extract imports (torch, PyAV, OpenCV, h5py, scenedetect)
device = resolve_device(sys.argv[1])
models = load_backbones(parse_features(sys.argv[2]), "random", device=device)
"""


def log(msg: str) -> None:
    print(f"[extract_memory] {msg}", file=sys.stderr, flush=True)


def vtx_command() -> list[str]:
    """The ``vtx`` console script of this interpreter's environment, else ``python -m``."""
    script = Path(sys.executable).with_name("vtx")
    return [str(script)] if script.exists() else [sys.executable, "-m", "vtx.cli.main"]


def _rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def measure(cmd: list[str]) -> dict:
    """Run ``cmd``; its peak RSS (MiB) from ``wait4`` and polled RSS samples."""
    samples: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            kib = _rss_kib(proc.pid)
            if kib is not None:
                samples.append((time.perf_counter() - t0, kib))
            done.wait(0.1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    # Read the pipes while waiting so a chatty child cannot block on a full pipe.
    out_chunks: list[str] = []
    err_chunks: list[str] = []
    readers = [threading.Thread(target=lambda s=s, c=c: c.append(s.read()), daemon=True)
               for s, c in ((proc.stdout, out_chunks), (proc.stderr, err_chunks))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    poller.join()
    for r in readers:
        r.join()
    stdout, stderr = "".join(out_chunks), "".join(err_chunks)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{stderr[-2000:]}")
    quarters = [0, 0, 0, 0]
    for t, kib in samples:
        q = min(3, int(4 * t / wall)) if wall > 0 else 0
        quarters[q] = max(quarters[q], kib)
    return {"peak_rss_mib": usage.ru_maxrss / 1024,  # ru_maxrss is in KiB on Linux
            "polled_peak_mib": max((k for _, k in samples), default=0) / 1024,
            "quarter_peaks_mib": [round(k / 1024, 1) for k in quarters],
            "wall_s": wall, "stdout": stdout}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=None,
                   help="folder for the generated videos and caches; kept, and videos already "
                        "there are reused [default: a temporary folder, removed]")
    p.add_argument("--size", default="640x360",
                   help="WxH of both generated videos [default: 640x360]")
    p.add_argument("--short", type=float, default=60.0, help="seconds of the short video")
    p.add_argument("--long", type=float, default=600.0, help="seconds of the long video")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--features", default="resnet18,r2plus1d")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs per video; the lowest peak is reported [default: 2]")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    args = p.parse_args(argv)

    own_tmp = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="vtx-bench-")) if own_tmp else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    w, h = (int(v) for v in args.size.lower().split("x"))
    try:
        videos = {}
        for label, seconds in (("short", args.short), ("long", args.long)):
            videos[label] = make_video(workdir / f"synthetic_{seconds:g}s_{w}x{h}.mp4",
                                       seconds, (w, h), log=log)

        log("baseline: imports + backbones, no video")
        base_runs = [measure([sys.executable, "-c", BASELINE_CODE, args.device, args.features])
                     for _ in range(args.repeats)]
        runs: dict[str, list[dict]] = {"short": [], "long": []}
        for r in range(args.repeats):
            for label in ("short", "long"):
                v = videos[label]
                out = workdir / f"feats_{label}.h5"
                cmd = vtx_command() + [
                    "extract", "--videos", v["path"], "--out", str(out), "--overwrite",
                    "--weights", "random", "--device", args.device,
                    "--features", args.features, "--batch-size", str(args.batch_size),
                    "--no-progress", "--json"]
                log(f"run {r + 1}/{args.repeats}: {label} ({v['seconds']:g} s) "
                    f"load avg {os.getloadavg()[0]:.2f}")
                m = measure(cmd)
                m["summary"] = json.loads(m.pop("stdout").strip().splitlines()[-1])
                m["loadavg_1min_after"] = os.getloadavg()[0]
                runs[label].append(m)
                out.unlink(missing_ok=True)
        command = " ".join(vtx_command()[-1:] + cmd[len(vtx_command()):])
        machine = machine_info(Path(videos["short"]["path"]))
    finally:
        if own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)

    for m in base_runs:
        m.pop("stdout", None)
    baseline = min(m["peak_rss_mib"] for m in base_runs)
    best = {label: min(rs, key=lambda m: m["peak_rss_mib"]) for label, rs in runs.items()}
    ratio = best["long"]["peak_rss_mib"] / best["short"]["peak_rss_mib"]
    result = {
        "benchmark": "extract_memory",
        "command": command,
        "videos": videos,
        "device": args.device,
        "batch_size": args.batch_size,
        "features": args.features.split(","),
        "weights": "random",
        "repeats": args.repeats,
        "baseline_peak_rss_mib": baseline,
        "peak_rss_mib": {label: m["peak_rss_mib"] for label, m in best.items()},
        "video_cost_mib": {label: m["peak_rss_mib"] - baseline for label, m in best.items()},
        "quarter_peaks_mib": {label: m["quarter_peaks_mib"] for label, m in best.items()},
        "runs": {"baseline": base_runs, **runs},
        "ratio_long_over_short": ratio,
        "target": TARGET,
        "verdict": verdict(ratio, TARGET),
        "machine": machine,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(summary(result))
    return result


def summary(r: dict) -> str:
    lines = [f"peak RSS of `vtx extract` (ru_maxrss of the child), lowest of {r['repeats']} runs;"
             f" device {r['device']}, batch {r['batch_size']}, weights random",
             f"  {'':24s} {'peak MiB':>9s} {'- baseline':>11s} {'shots':>6s} {'wall s':>7s}"
             f"   peak per quarter of the run (MiB)",
             f"  {'baseline (no video)':24s} {r['baseline_peak_rss_mib']:9.1f}"]
    for label in ("short", "long"):
        v = r["videos"][label]
        runs = r["runs"][label]
        m = min(runs, key=lambda m: m["peak_rss_mib"])
        name = f"{v['seconds']:g} s {v['size'][0]}x{v['size'][1]}"
        lines.append(f"  {name:24s} {m['peak_rss_mib']:9.1f} {r['video_cost_mib'][label]:11.1f}"
                     f" {m['summary']['shots']:6d} {m['wall_s']:7.1f}   "
                     + " / ".join(f"{q:.0f}" for q in m["quarter_peaks_mib"]))
    lines.append(f"peak(long) / peak(short): {r['ratio_long_over_short']:.3f}  "
                 f"target <= {r['target']:.2f}: {r['verdict']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
