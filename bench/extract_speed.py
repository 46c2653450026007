"""How close is ``vtx extract`` to the cost of its two unavoidable parts, decode and models?

Measured on one video, each part in this process, best of ``--repeats`` runs:

decode
    :class:`vtx.io.decode.VideoReader` with vtx's settings (thread_type AUTO), iterating every
    frame and converting it to a full-size RGB ndarray, the conversion a pipeline that hands
    every frame to its consumers needs, done the cheapest way PyAV allows: one swscale context
    for the whole video (:class:`vtx.io.decode.RgbConverter`; ``av_frame.to_ndarray`` sets one
    up per frame, which made this baseline 0.3 to 0.9 ms a frame slower before 2026-12-02).
    Includes opening the container and demuxing; nothing else.
model
    The same batches ``extract`` runs: as many shots as the extraction found, per feature, in
    batches of ``--batch-size`` (the last one partial), random uint8 tensors of the model input
    shape ``(B, T, H, W, 3)`` through the loaded backbones (normalisation included), outputs
    copied back to host memory. Building the tensors is not timed; loading the models is not
    included (see "model load").
extract
    ``vtx.pipeline.extract.extract`` in this process, with ``weights="random"``, one worker, no
    progress bars, a fresh HDF5 file: its ``wall_s``. That includes loading the backbones; the
    load time is recorded by the same call (``ExtractSummary.load_s``) so the ratio is reported
    both without it and with it (then added to the baseline as well). The time the main thread
    spends in model batches is recorded through extract's public timing hook (``on_batch``);
    the rest of ``wall_s`` is waiting for the decode thread, and overhead.
producer (for diagnosis, not part of the ratio)
    ``vtx.pipeline.producer.VideoProducer``, the per-video loop of the decode thread (decode,
    RGB conversion, shot detection, shot buffering, and the per-feature resize/crop of the
    frames the shots sample), with the shots thrown away: what the decode thread costs without
    the models running beside it.

Since issue 13 the model thread runs a partial batch whenever it would otherwise wait for the
decode thread (``vtx/pipeline/runner.py``), so "model batches" inside extract overlap decoding
and may be more, smaller batches than the standalone "model" part runs.

The figure of merit is ``extract / (decode + model)``, target <= 1.10 on CPU.

Random weights have the architecture and compute of the official ones (the machine this was
written on is offline); the features are meaningless but the timing is the same.

Usage::

    python bench/extract_speed.py                  # generated ~1-minute 640x360 video
    python bench/extract_speed.py ../shared/media/testvideo.mp4 --repeats 3 --json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (ForeignCpu, best, machine_info, make_video, own_cpu_s, spread,  # noqa: E402
                     verdict, wait_for_quiet)

TARGET = 1.10


def log(msg: str) -> None:
    print(f"[extract_speed] {msg}", file=sys.stderr, flush=True)


def time_decode(path: Path, rgb: str = "one_context") -> tuple[float, int]:
    """Seconds to decode every frame to an RGB ndarray, and the frame count.

    ``rgb``: ``one_context`` (:class:`vtx.io.decode.RgbConverter`, the baseline), ``to_ndarray``
    (``av_frame.to_ndarray(format="rgb24")``, a swscale context per frame: the baseline when
    issue 13 was filed) or ``none`` (decoding alone, for reference)."""
    from vtx.io.decode import RgbConverter, VideoReader

    t0 = time.perf_counter()
    n = 0
    with VideoReader(path) as reader:
        convert = {"one_context": RgbConverter(), "none": lambda f: None,
                   "to_ndarray": lambda f: f.to_ndarray(format="rgb24")}[rgb]
        for frame in reader.frames():
            convert(frame.av_frame)
            n += 1
    return time.perf_counter() - t0, n


def time_producer(path: Path, specs: tuple, backbones: dict) -> tuple[float, int, int]:
    """Seconds of extract's per-video decode loop with its output discarded; (s, frames, shots).

    Runs :class:`vtx.pipeline.producer.VideoProducer`; only the message that ends the video is
    looked at (its shot table), everything else is dropped.
    """
    from vtx.pipeline.producer import VideoDone, VideoJob, VideoProducer
    from vtx.pipeline.shots import ShotConfig

    preps = {key: bb.prep for key, bb in backbones.items() if bb.prep is not None}
    job = VideoJob(0, path, path.name, "bench", specs, replace=True)
    done: list = []

    def emit(msg) -> None:
        if isinstance(msg, VideoDone):
            done.append(msg)

    t0 = time.perf_counter()
    VideoProducer(job, preps, ShotConfig(), emit).run()
    seconds = time.perf_counter() - t0
    msg = done[-1]
    return seconds, int(msg.attrs["n_frames"]), len(msg.fixed["shots"])


def model_name(bb) -> str:
    """A backbone's features, for the report (``vit+vit_patches`` share one run)."""
    return "+".join(bb.features)


def model_batches(backbones: dict, n_shots: int, batch_size: int) -> dict:
    """Per model run: the list of batch sizes extract runs for ``n_shots`` shots, and one random
    uint8 input per distinct size (the compute does not depend on the values)."""
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    out = {}
    for key, bb in backbones.items():
        sizes = [min(batch_size, n_shots - i) for i in range(0, n_shots, batch_size)]
        h, w = bb.prep.crop_size
        inputs = {b: torch.from_numpy(rng.integers(0, 256, (b, bb.clip_len, h, w, 3),
                                                   dtype=np.uint8))
                  for b in set(sizes)}
        out[key] = (sizes, inputs)
    return out


def time_model(backbones: dict, batches: dict) -> dict[str, float]:
    """Seconds per model run to run the batches through the backbones (host to host)."""
    import torch

    times = {}
    for key, bb in backbones.items():
        sizes, inputs = batches[key]
        device = bb.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for b in sizes:
            out = bb(inputs[b].to(device, non_blocking=True))
            for v in (out.values() if isinstance(out, dict) else [out]):
                v.cpu().numpy()
        times[model_name(bb)] = time.perf_counter() - t0
    return times


def time_extract(path: Path, out: Path, features: tuple, device: str, batch_size: int,
                 progress: bool, precision: str = "auto") -> dict:
    """One in-process ``extract``: wall time, model-load time inside it (``summary.load_s``),
    time in model batches (the ``on_batch`` hook), shots."""
    from vtx.pipeline.extract import ExtractConfig, extract

    batches: list[float] = []
    config = ExtractConfig(videos=path, out=out, features=features, device=device,
                           precision=precision, weights="random", batch_size=batch_size, workers=1,
                           progress=progress, overwrite=True)
    try:
        summary = extract(config, log=log, on_batch=lambda key, n, s: batches.append(s))
    finally:
        out.unlink(missing_ok=True)
    if summary.failed:
        raise SystemExit(f"extract failed on {path}: {summary.failures}")
    return {"wall_s": summary.wall_s, "load_s": summary.load_s, "shots": summary.shots,
            "video_seconds": summary.video_seconds, "batches_s": sum(batches)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("video", nargs="?", type=Path,
                   help="video to measure [default: generate a synthetic one]")
    p.add_argument("--seconds", type=float, default=60.0,
                   help="length of the generated video [default: 60]")
    p.add_argument("--size", default="640x360", help="WxH of the generated video")
    p.add_argument("--workdir", type=Path, default=None,
                   help="folder for the generated video and the HDF5 output; kept, and a "
                        "video already there is reused [default: a temporary folder]")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto",
                   help="model precision, as vtx extract --precision (both parts use it)")
    p.add_argument("--features", default="resnet18,r2plus1d")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs of each measurement; the best is reported [default: 2]")
    p.add_argument("--quiet-wait", type=float, default=0.0, metavar="SECONDS",
                   help="before each measurement wait up to this long for other processes to "
                        "use < 0.15 cores (shared machines) [default: 0, do not wait]")
    p.add_argument("--progress", action="store_true",
                   help="let extract draw its progress bars (the CLI default)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    args = p.parse_args(argv)

    import torch

    from vtx.features import parse_features
    from vtx.pipeline.backbones import load_backbones, resolve_device

    features = parse_features(args.features)
    device = resolve_device(args.device)
    own_tmp = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="vtx-bench-")) if own_tmp else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.video is None:
            w, h = (int(v) for v in args.size.lower().split("x"))
            video_desc = make_video(workdir / f"synthetic_{args.seconds:g}s_{w}x{h}.mp4",
                                    args.seconds, (w, h), log=log)
            video = Path(video_desc["path"])
        else:
            video = args.video
            video_desc = {"path": str(video)}
            if not video.is_file():
                raise SystemExit(f"no such video: {video}")

        t0 = time.perf_counter()
        backbones = load_backbones(features, "random", device=device, precision=args.precision)
        standalone_load_s = time.perf_counter() - t0

        parts = ("decode", "decode_to_ndarray", "decode_only", "producer", "model", "extract")
        rec: dict[str, list] = {**{p: [] for p in parts}, "extract_load": [],
                                "extract_batches": [], "loadavg": []}
        foreign: dict[str, list] = {p: [] for p in parts}
        cpu: dict[str, list] = {p: [] for p in parts}
        frames = shots = None
        batches = None

        def measure(part: str, fn):
            wait_for_quiet(args.quiet_wait, log=log)
            log(f"run {r + 1}/{args.repeats}: {part}")
            c0 = own_cpu_s()
            with ForeignCpu() as fc:
                value = fn()
            cpu[part].append(own_cpu_s() - c0)
            foreign[part].append(fc.seconds)
            return value

        for r in range(args.repeats):
            rec["loadavg"].append(os.getloadavg()[0])
            s, frames = measure("decode", lambda: time_decode(video))
            rec["decode"].append(s)
            for part, how in (("decode_to_ndarray", "to_ndarray"), ("decode_only", "none")):
                rec[part].append(measure(part, lambda: time_decode(video, how))[0])
            s, _, shots = measure("producer", lambda: time_producer(video, features, backbones))
            rec["producer"].append(s)
            if batches is None:
                batches = model_batches(backbones, shots, args.batch_size)
                for key, (sizes, inputs) in batches.items():  # warm up every input shape
                    for b in inputs:
                        backbones[key](inputs[b].to(device))
            rec["model"].append(measure("model", lambda: time_model(backbones, batches)))
            e = measure("extract", lambda: time_extract(
                video, workdir / "bench_feats.h5", features, str(device), args.batch_size,
                args.progress, args.precision))
            if e["shots"] != shots:
                log(f"warning: extract found {e['shots']} shots, the producer {shots}")
            rec["extract"].append(e["wall_s"])
            rec["extract_load"].append(e["load_s"])
            rec["extract_batches"].append(e["batches_s"])
            video_seconds = e["video_seconds"]
        machine = machine_info(video)  # reads the encoder string, before a temp video goes
    finally:
        if own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)

    model_totals = [sum(m.values()) for m in rec["model"]]
    decode_s = best(rec["decode"])
    model_s = best(model_totals)
    i_ext = min(range(len(rec["extract"])), key=lambda i: rec["extract"][i])
    extract_s = rec["extract"][i_ext]
    load_s = rec["extract_load"][i_ext]
    ratio_no_load = (extract_s - load_s) / (decode_s + model_s)
    ratio_with_load = extract_s / (decode_s + model_s + load_s)
    other_baselines = {part: (extract_s - load_s) / (best(rec[part]) + model_s)
                       for part in ("decode_to_ndarray", "decode_only")}
    per_feature = {f: best([m[f] for m in rec["model"]]) for f in rec["model"][0]}
    result = {
        "benchmark": "extract_speed",
        "video": video_desc,
        "frames": frames,
        "shots": shots,
        "video_seconds": video_seconds,
        "device": str(device),
        "batch_size": args.batch_size,
        "features": [s.name for s in features],
        "weights": "random",
        "repeats": args.repeats,
        "best_s": {
            "decode": decode_s,
            "decode_to_ndarray": best(rec["decode_to_ndarray"]),
            "decode_only": best(rec["decode_only"]),
            "model": model_s,
            "model_per_feature": per_feature,
            "extract": extract_s,
            "extract_model_load": load_s,
            "extract_minus_load": extract_s - load_s,
            "extract_model_batches": rec["extract_batches"][i_ext],
            "producer": best(rec["producer"]),
            "standalone_model_load": standalone_load_s,
        },
        "runs_s": {"decode": rec["decode"], "decode_to_ndarray": rec["decode_to_ndarray"],
                   "decode_only": rec["decode_only"], "model": model_totals,
                   "extract": rec["extract"], "extract_model_load": rec["extract_load"],
                   "extract_model_batches": rec["extract_batches"],
                   "producer": rec["producer"]},
        "loadavg_1min_before_run": rec["loadavg"],
        "foreign_cpu_s": foreign,
        "own_cpu_s": cpu,
        "cpu_ratio_extract_over_decode_plus_model": (
            min(cpu["extract"]) / (min(cpu["decode"]) + min(cpu["model"]))),
        "decode_fps": frames / decode_s,
        "extract_throughput_video_s_per_s": video_seconds / extract_s,
        "ratio_extract_over_decode_plus_model": ratio_no_load,
        "ratio_with_model_load": ratio_with_load,
        # the same ratio over other decode baselines: to_ndarray per frame (as filed), none
        "ratio_over_decode_to_ndarray": other_baselines["decode_to_ndarray"],
        "ratio_over_decode_only": other_baselines["decode_only"],
        "target": TARGET,
        "verdict": verdict(ratio_no_load, TARGET),
        "machine": machine,
        "torch_threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(summary(result, rec, model_totals))
    return result


def summary(r: dict, rec: dict, model_totals: list[float]) -> str:
    b = r["best_s"]
    per_feature = ", ".join(f"{k} {t:.2f}" for k, t in b["model_per_feature"].items())
    rows = [
        ("decode (PyAV + RGB, one swscale context)", b["decode"], spread(rec["decode"]),
         f"{r['decode_fps']:.0f} frames/s"),
        ("decode + to_ndarray per frame", b["decode_to_ndarray"],
         spread(rec["decode_to_ndarray"]), "the baseline when issue 13 was filed"),
        ("decode only (no RGB)", b["decode_only"], spread(rec["decode_only"]), "reference"),
        ("model (load excluded)", b["model"], spread(model_totals), per_feature),
        ("extract (in-process wall_s)", b["extract"], spread(rec["extract"]),
         f"{r['extract_throughput_video_s_per_s']:.2f} video-s/s"),
        ("  of which model load", b["extract_model_load"], "", ""),
        ("  of which model batches", b["extract_model_batches"] or float("nan"), "",
         "main thread inside the models"),
        ("producer (VideoProducer, no models)", b["producer"], spread(rec["producer"]),
         "diagnostic"),
    ]
    lines = [
        f"video: {Path(r['video']['path']).name}  {r['frames']} frames, "
        f"{r['video_seconds']:.1f} s, {r['shots']} shots | device {r['device']}, batch "
        f"{r['batch_size']}, weights random, torch threads {r['torch_threads']}",
        f"{'seconds, best of ' + str(r['repeats']):36s} {'best':>7s}   runs: best / median / worst",
    ]
    for name, value, runs, note in rows:
        detail = "  ".join(x for x in (runs, f"({note})" if note else "") if x)
        lines.append(f"  {name:34s} {value:7.2f}   {detail}".rstrip())
    lines += [
        f"extract / (decode + model), load excluded: "
        f"{r['ratio_extract_over_decode_plus_model']:.3f}  target <= {r['target']:.2f}: "
        f"{r['verdict']}",
        f"extract / (decode + model + load):         {r['ratio_with_model_load']:.3f}",
        f"same, decode as filed (to_ndarray per frame): {r['ratio_over_decode_to_ndarray']:.3f};"
        f" decode only (no RGB): {r['ratio_over_decode_only']:.3f}",
        f"same in CPU-seconds (load included in extract; less sensitive to other processes):"
        f" {r['cpu_ratio_extract_over_decode_plus_model']:.3f}",
        f"load average before runs: {', '.join(f'{x:.2f}' for x in r['loadavg_1min_before_run'])}"
        f"; CPU-s used by other processes during each run: " + "; ".join(
            f"{k} " + ", ".join("?" if x is None else f"{x:.1f}" for x in v)
            for k, v in r["foreign_cpu_s"].items()),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
