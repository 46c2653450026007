"""The CUDA paths, checked on a GPU (a script to run where one is available; not a test).

Three checks, each recorded in one JSON file (``--out``, default ``$OUT/gpu_checks.json`` or
``gpu_checks.json``):

1. ``extraction``: the same synthetic videos extracted on the CPU in fp32 and on CUDA (whose
   backbones run under fp16 autocast), ``--weights random`` with one seed so both use the same
   weights offline; for every feature the centred cosine between the two (per row, centred on
   the CPU rows' mean, as ``tests/test_features.py``) must be >= 0.99 (min over rows).
2. ``training``: the demo's synthetic labelled trailers (``vtx.train.demo_data``) extracted on
   CUDA (every feature, random weights), then every head trained for a few epochs on CUDA with
   AMP (and, for comparison, without): the loss must stay finite; the losses and the best
   validation metric of both runs are recorded.
3. ``memory``: ``bench/head_memory.py --measure``: each head at paper size, batch 32, peak
   memory measured with ``torch.cuda.max_memory_allocated`` next to the estimate made without
   real memory (``vtx.train.memory``), and their ratio.

Usage (about 5 minutes on one H100-class GPU):
    python bench/gpu_checks.py [--out results.json] [--skip extraction,training,memory]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

FEATURES = ("resnet18", "r2plus1d", "vit", "vit_patches", "vggish", "motion", "residual")


def centred_cosine(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    ours = np.asarray(ours, np.float64).reshape(len(ours), -1)
    ref = np.asarray(ref, np.float64).reshape(len(ref), -1)
    mu = ref.mean(0)
    a, b = ours - mu, ref - mu
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return np.where((ours == ref).all(1), 1.0, cos)  # identical rows (codec arrays) agree


def check_extraction(work: Path) -> dict:
    import h5py

    from vtx.io.synth import Shot, write_video
    from vtx.pipeline.extract import ExtractConfig, extract
    from vtx.pipeline.sampling import FrameSampling

    videos = work / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        write_video(videos / f"v{i}.mp4", [Shot(40, i, (2, 1), tone_hz=440.0),
                                           Shot(40, 3 + i, (-1, 0), tone_hz=880.0)],
                    size=(320, 180), fps=25, audio=True, seed=i)
    out = {}
    for device in ("cpu", "cuda"):
        t0 = time.perf_counter()
        s = extract(ExtractConfig(videos=videos, out=work / f"{device}.h5", features=FEATURES,
                                  weights="random", seed=0, device=device, dtype="float32",
                                  precision="fp32" if device == "cpu" else "fp16",
                                  frames=FrameSampling(frame_rate=2.0), progress=False))
        out[f"{device}_seconds"] = round(time.perf_counter() - t0, 2)
        assert s.failed == 0, s.failures
    rows = {}
    with h5py.File(work / "cpu.h5") as a, h5py.File(work / "cuda.h5") as b:
        for name in FEATURES:
            cos = []
            for key in a["videos"]:
                x, y = a["videos"][key][name][()], b["videos"][key][name][()]
                if len(x):
                    cos.append(centred_cosine(y, x))
            cos = np.concatenate(cos)
            rows[name] = {"min": float(cos.min()), "mean": float(cos.mean()), "rows": len(cos),
                          "pass": bool(cos.min() >= 0.99)}
    out["features"] = rows
    out["pass"] = all(r["pass"] for r in rows.values())
    return out


def check_training(work: Path) -> dict:
    from vtx.pipeline.extract import ExtractConfig, extract
    from vtx.pipeline.sampling import FrameSampling
    from vtx.train.demo_data import design_dataset, write_dataset
    from vtx.train.trainer import TrainConfig, train_head

    labels = write_dataset(work / "videos", design_dataset(24, seed=1), size=(112, 64))
    cache = work / "feats.h5"
    s = extract(ExtractConfig(videos=work / "videos", out=cache, weights="random", device="cuda",
                              features="all", frames=FrameSampling(frame_rate=1.0),
                              progress=False))
    assert s.failed == 0, s.failures
    small = {"d_model": 64, "n_heads": 4}
    cases = {
        "stan": dict(small, audio=True),
        "vtn": dict(small, window=4),
        "meanpool": {},
        "lstm": {},
        "timesformer": dict(small, depth=2),
        "mevit": dict(small, depth=2, time_layers=1),
        "mmvit": dict(small, depth=2, n_frames=8),
    }
    out = {}
    for head, opts in cases.items():
        res = {}
        for amp in (True, False):
            records = []
            try:
                t0 = time.perf_counter()
                r = train_head(TrainConfig(head=head, features=cache, labels=labels,
                                           out=work / f"run-{head}-{amp}", epochs=6,
                                           batch_size=8, lr=1e-3, device="cuda", amp=amp,
                                           max_tokens=8, progress=False, head_options=opts),
                               log=lambda m: None, on_epoch_end=records.append)
                res["amp" if amp else "fp32"] = {
                    "train_loss": [round(x["train_loss"], 4) for x in records],
                    "best": r.best_metric, "metric": r.metric,
                    "seconds": round(time.perf_counter() - t0, 2)}
            except Exception as e:  # recorded, the other heads still run
                res["amp" if amp else "fp32"] = {"error": f"{type(e).__name__}: {e}"}
        amp_losses = res.get("amp", {}).get("train_loss", [])
        res["pass"] = bool(amp_losses) and bool(np.isfinite(amp_losses).all())
        out[head] = res
    out["pass"] = all(v["pass"] for v in out.values() if isinstance(v, dict))
    return out


def check_memory() -> dict:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "head_memory.py"), "--measure",
                        "--json"], capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        return {"error": r.stderr[-2000:], "pass": False}
    data = json.loads(r.stdout)
    pairs = []
    rows = data["rows"]
    for est, meas in zip(rows, rows[1:]):
        if est["method"] == "estimated" and meas["method"] == "measured":
            ratio = (meas["peak_gib"] / est["peak_gib"]) if meas["peak_gib"] else None
            pairs.append({"case": est["case"], "setting": est["setting"],
                          "estimated_gib": round(est["peak_gib"], 2),
                          "measured_gib": None if meas["peak_gib"] is None
                          else round(meas["peak_gib"], 2),
                          "oom": meas.get("oom", False),
                          "measured_over_estimated": None if ratio is None else round(ratio, 3)})
    fitted = [r for r in rows if r["setting"].startswith("amp+ckpt, accumulate")]
    return {"info": data["info"], "pairs": pairs,
            "accumulation": [{"case": r["case"], "accumulate": r.get("accumulate"),
                              "micro_batch": r.get("micro_batch")} for r in fitted],
            "pass": all(r["fits"] for r in fitted)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(os.environ.get("OUT", ".")) / "gpu_checks.json"
    ap.add_argument("--out", type=Path, default=default_out)
    ap.add_argument("--skip", default="", help="comma list of extraction, training, memory")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: these checks need one")
    skip = set(filter(None, args.skip.split(",")))
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="vtx-gpu-") as tmp:
        work = Path(tmp)
        for name, fn in (("extraction", lambda: check_extraction(work / "x")),
                         ("training", lambda: check_training(work / "t")),
                         ("memory", check_memory)):
            if name in skip:
                continue
            t0 = time.perf_counter()
            try:
                result[name] = fn()
            except Exception:
                result[name] = {"error": traceback.format_exc()[-3000:], "pass": False}
            result[name]["seconds"] = round(time.perf_counter() - t0, 1)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))  # partial results survive a timeout
            print(f"{name}: {'PASS' if result[name].get('pass') else 'MISS'} "
                  f"({result[name]['seconds']} s)", flush=True)
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
