"""What the decode thread costs per frame, and what issue 13's changes save, in CPU-seconds.

CPU-seconds of this process (``time.process_time``: FFmpeg's decoder threads included) are far
less sensitive than wall times to other processes on a shared machine. Four measurements:

per-frame
    Per decoded frame, on the video's first 40 frames: the RGB conversion with a new swscale
    context per frame (``to_ndarray(format="rgb24")``, each frame's first) and with one for all
    (:class:`vtx.io.decode.RgbConverter`), each shot-level model's ``FramePrep`` (resize and crop
    to the model input, exactly the weights' transform), the detector's input full-size
    (convert, then OpenCV's ``INTER_LINEAR``) and as vtx builds it
    (:class:`vtx.pipeline.shots.DetectorInput`: only the sampled pixels where the factor is an
    odd integer; ``detector_input_sampled`` says whether it was), and PySceneDetect's detector
    alone on the small BGR frames.
producer
    ``VideoProducer`` (resnet18 + r2plus1d, output dropped) with ``lazy_bytes=0`` (every frame
    reduced on arrival for every model, as before issue 13) and with the default budget (only
    the frames a shot samples are reduced), ``--repeats`` runs of each, interleaved; best and
    median, and how many frames were reduced.
audio
    A ``vggish``-only producer: first run (every frame decoded for the shot detector) and the
    same job resumed with the shots known (audio stream only, no frame decoded).

The producers run with numpy's BLAS on one thread (``runner.one_blas_thread``), as in ``vtx
extract``.
scaler
    Whether PyAV's scaler (``frame.reformat`` straight to the detector's input size, in C) would
    give PySceneDetect's cuts: ContentDetector cuts and CPU-seconds per interpolation against
    vtx's exact path (full-size RGB, OpenCV ``INTER_LINEAR``, as ``scenedetect.detect`` does).

Usage::

    python bench/decode_thread.py VIDEO [VIDEO ...] [--repeats 2] [--audio VIDEO]
        [--only per-frame|producer|scaler] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def per_frame(path: Path, n: int = 40) -> dict[str, float]:
    """CPU milliseconds per frame of each per-frame step."""
    from vtx.features import FEATURES, weights_member
    import cv2
    from scenedetect.common import FrameTimecode

    from vtx.io.decode import RgbConverter, VideoReader
    from vtx.pipeline.backbones import FramePrep
    from vtx.pipeline.shots import DetectorInput, ShotConfig, ShotDetector, make_detector

    with VideoReader(path) as r:
        frames = [f.av_frame for _, f in zip(range(n), r.frames())]
        det = ShotDetector(ShotConfig(), (r.info.width, r.info.height), r.frame_rate)
    n = len(frames)

    def ms(fn) -> float:
        c = time.process_time()
        for i in range(n):
            fn(i)
        return (time.process_time() - c) / n * 1e3

    # first: each frame's first conversion, so that its own reformatter is new (as in a run)
    out = {"rgb24_to_ndarray": ms(lambda i: frames[i].to_ndarray(format="rgb24"))}
    convert = RgbConverter()
    out["rgb24_one_context"] = ms(lambda i: convert(frames[i]))
    rgb = [convert(f) for f in frames]
    for name in ("resnet18", "r2plus1d"):
        spec = FEATURES[name]
        prep = FramePrep(weights_member(spec.builder, spec.weights).transforms())
        out[f"{name}_prep"] = ms(lambda i: prep(rgb[i]))
    full = DetectorInput(det.input.frame_size, det.size, convert)
    out["detector_input_full"] = ms(lambda i: full(frames[i]))  # convert, then INTER_LINEAR
    out["detector_input"] = ms(lambda i: det.input(frames[i]))  # sampled where it can
    out["detector_input_sampled"] = det.input.step is not None and det.input.exact
    small = [cv2.cvtColor(full(f), cv2.COLOR_RGB2BGR) for f in frames]
    alone = make_detector(ShotConfig())
    times = [FrameTimecode(i, fps=det.frame_rate) for i in range(n)]
    out["detector_alone"] = ms(lambda i: alone.process_frame(times[i], small[i]))
    return out


def run_producer(path: Path, specs: tuple, lazy_bytes: int | None = None, known_shots=None):
    """(CPU s, wall s, frames reduced, the VideoDone message) of one producer run."""
    from vtx.features import weights_member
    from vtx.pipeline.backbones import FramePrep
    from vtx.pipeline.producer import VideoDone, VideoJob, VideoProducer
    from vtx.pipeline.shots import ShotConfig

    preps = {s.model_key: FramePrep(weights_member(s.builder, s.weights).transforms())
             for s in specs if s.kind not in ("audio", "codec")}
    job = VideoJob(0, path, path.name, "bench", specs, replace=known_shots is None,
                   known_shots=known_shots)
    done = []
    kw = {} if lazy_bytes is None else {"lazy_bytes": lazy_bytes}
    p = VideoProducer(job, preps, ShotConfig(),
                      lambda m: done.append(m) if isinstance(m, VideoDone) else None, **kw)
    from vtx.pipeline.runner import one_blas_thread

    with one_blas_thread():  # as vtx extract runs its decode threads
        c0, t0 = time.process_time(), time.perf_counter()
        p.run()
    return time.process_time() - c0, time.perf_counter() - t0, p.buffer.reduced, done[-1]


def producer(path: Path, repeats: int) -> dict:
    from vtx.features import FEATURES
    from vtx.pipeline.shots import LAZY_BYTES

    specs = (FEATURES["resnet18"], FEATURES["r2plus1d"])
    budgets = {"every_frame": 0, "sampled_only": LAZY_BYTES}
    runs: dict[str, list] = {name: [] for name in budgets}
    for _ in range(repeats):  # interleaved, so that a busy spell hits both alike
        for name, budget in budgets.items():
            runs[name].append(run_producer(path, specs, budget))
    out = {}
    for name, rs in runs.items():
        best = min(rs, key=lambda r: r[0])
        out[name] = {"cpu_s": best[0], "cpu_median_s": statistics.median(r[0] for r in rs),
                     "wall_s": best[1], "reduced": best[2],
                     "frames": int(best[3].attrs["n_frames"]), "cpu_runs": [r[0] for r in rs]}
    return out


def audio(path: Path, repeats: int) -> dict:
    from vtx.features import FEATURES

    specs = (FEATURES["vggish"],)
    first = [run_producer(path, specs) for _ in range(repeats)]
    shots = first[0][3].fixed["shots"]
    resumed = [run_producer(path, specs, known_shots=shots) for _ in range(repeats)]
    return {name: {"cpu_s": min(r[0] for r in runs), "wall_s": min(r[1] for r in runs)}
            for name, runs in (("first_run", first), ("resumed", resumed))}


def scaler(path: Path) -> dict:
    from scenedetect.common import FrameTimecode, Timecode

    from vtx.io.decode import VideoReader
    from vtx.pipeline.shots import ShotConfig, ShotDetector

    out = {}
    for mode in ("exact", "BILINEAR", "AREA", "FAST_BILINEAR"):
        with VideoReader(path) as r:
            det = ShotDetector(ShotConfig(), (r.info.width, r.info.height), r.frame_rate)
            w, h = det.size or (r.info.width, r.info.height)
            cuts = []
            c0 = time.process_time()
            for f in r.frames():
                if mode == "exact":
                    cuts += det.push(f.index, f.pts, f.time_base, f.av_frame,
                                     f.av_frame.to_ndarray(format="rgb24"))
                    continue
                bgr = f.av_frame.reformat(width=w, height=h, format="bgr24",
                                          interpolation=mode).to_ndarray()
                pos = FrameTimecode(Timecode(pts=f.pts, time_base=f.time_base),
                                    fps=det.frame_rate)
                det._recent.append((pos, f.index))
                det._last = pos
                cuts += det._to_indices(det.detector.process_frame(pos, bgr))
            cuts += det.finish()
            out[mode] = {"cpu_s": time.process_time() - c0, "cuts": sorted(cuts)}
    for v in out.values():
        v["same_cuts"] = v["cuts"] == out["exact"]["cuts"]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("videos", nargs="+", type=Path)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--audio", type=Path, action="append", default=[],
                   help="a video with an audio stream for the audio-only measurement")
    p.add_argument("--only", choices=("per-frame", "producer", "scaler"), action="append",
                   help="run only these measurements of the videos (repeatable)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = {"loadavg_before": os.getloadavg(), "videos": {}}
    for v in args.videos:
        only = set(args.only or ("per-frame", "producer", "scaler"))
        r = result["videos"][v.name] = {}
        if "per-frame" in only:
            r["per_frame_ms"] = per_frame(v)
        if "producer" in only:
            r["producer"] = producer(v, args.repeats)
        if "scaler" in only:
            r["scaler"] = scaler(v)
        print(f"[decode_thread] {v.name} done", file=sys.stderr, flush=True)
    result["audio"] = {v.name: audio(v, args.repeats) for v in args.audio}
    result["loadavg_after"] = os.getloadavg()
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for name, r in result["videos"].items():
            pf = ", ".join(f"{k} {x:.2f}" for k, x in r.get("per_frame_ms", {}).items())
            print(f"{name}: per frame (CPU ms): {pf}")
            for k, x in r.get("producer", {}).items():
                print(f"  producer {k}: {x['cpu_s']:.2f} CPU-s best, {x['cpu_median_s']:.2f} "
                      f"median ({x['wall_s']:.2f} s wall), {x['reduced']} of {x['frames']} "
                      f"frames reduced")
            for k, x in r.get("scaler", {}).items():
                print(f"  detector input {k}: {x['cpu_s']:.2f} CPU-s, {len(x['cuts'])} cuts"
                      f"{'' if x['same_cuts'] else ' (NOT the exact cuts)'}")
        for name, r in result["audio"].items():
            print(f"{name} vggish only: first run {r['first_run']['cpu_s']:.2f} CPU-s, "
                  f"resumed (audio stream only) {r['resumed']['cpu_s']:.2f} CPU-s")
        print(f"load average before / after: {result['loadavg_before'][0]:.1f} / "
              f"{result['loadavg_after'][0]:.1f}")
    return result


if __name__ == "__main__":
    main()
