"""How much faster are the backbones at ``--precision bf16`` (or fp16 on CUDA) than at fp32?

For each model run of ``--features`` it loads the backbone twice through the product path,
``load_backbones(..., precision="fp32")`` and ``load_backbones(..., precision=P)`` (P =
``--precision``, default ``auto``: bf16 on a CPU with AVX512_BF16/AMX, fp16 on CUDA), and times
one batch of ``--batch-size`` random model inputs (uint8 frames of the model's input size, or
log-mel examples for VGGish) through ``Backbone.__call__``: normalisation, the forward pass and
the float32 output included, exactly what ``BatchRunner`` times per batch. Models are loaded
and warmed up before timing; the two precisions alternate batch by batch in a tight loop,
``--repeats`` times, and the minimum of each is reported (other processes only ever add time).
Next to every figure: the 1-minute load average around the loop (``os.getloadavg()``) and the
CPU seconds other processes used meanwhile (``/proc/stat``).

``--variants`` also times the alternatives the implementation chose between, on the same
inputs: fp32 in channels-last layout, bf16 through ``torch.autocast`` (fp32 weights) and bf16
by casting the model, each in the default and the channels-last layout (``channels_last_3d``
for video models). The product path is whatever ``Backbone.set_precision`` does.

Random weights have the architecture and compute of the official ones (this was written
offline); the timing does not depend on the values.

Usage::

    python bench/precision.py                                  # resnet18,r2plus1d,vit,vggish
    python bench/precision.py --features vit --repeats 5 --variants --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ForeignCpu, machine_info, own_cpu_s, wait_for_quiet  # noqa: E402

TARGET = 1.5  # bf16 at least 1.5x faster than fp32 (issue 13)


def log(msg: str) -> None:
    print(f"[precision] {msg}", file=sys.stderr, flush=True)


def model_input(bb, batch: int, seed: int = 0):
    """One batch of random model inputs: uint8 (B, T, H, W, 3) frames, or for VGGish float
    (B, 96, 64) log-mel examples (log of values in [0.01, 1.01], as the front end gives)."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    if bb.kind == "audio":
        return torch.from_numpy(np.log(rng.random((batch, 96, 64), np.float32) + 0.01))
    h, w = bb.prep.crop_size
    return torch.from_numpy(rng.integers(0, 256, (batch, bb.clip_len, h, w, 3), np.uint8))


def variants(bb_fp32, bb_lp, lp: str, want_all: bool) -> dict:
    """name -> (backbone, context) to time. Always ``fp32`` and ``lp`` (the product path);
    with ``want_all`` the CPU alternatives too, built on copies of the fp32 backbone."""
    import copy

    import torch

    out = {"fp32": (bb_fp32, contextlib.nullcontext), lp: (bb_lp, contextlib.nullcontext)}
    if not want_all or bb_fp32.device.type != "cpu":
        return out
    cl = torch.channels_last_3d if bb_fp32.clip_len > 1 else torch.channels_last

    def variant(dtype, layout):
        bb = copy.deepcopy(bb_fp32)
        bb.model.to(dtype=dtype, memory_format=layout)
        bb.input_dtype, bb.memory_format = dtype, layout
        if bb.kind == "audio":  # VGGish's input (B, 96, 64) has no channel axis to lay out
            bb.memory_format = torch.contiguous_format
        return bb

    def cpu_autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    plain = torch.contiguous_format
    out["fp32 plain"] = (variant(torch.float32, plain), contextlib.nullcontext)
    out["fp32 channels-last"] = (variant(torch.float32, cl), contextlib.nullcontext)
    out["bf16 autocast"] = (variant(torch.float32, plain), cpu_autocast)
    out["bf16 autocast channels-last"] = (variant(torch.float32, cl), cpu_autocast)
    out["bf16 cast plain"] = (variant(torch.bfloat16, plain), contextlib.nullcontext)
    out["bf16 cast channels-last"] = (variant(torch.bfloat16, cl), contextlib.nullcontext)
    return out


def time_runs(runs: dict, x, repeats: int, quiet_wait: float) -> dict:
    """Alternate the runs batch by batch, ``repeats`` rounds; per run the wall seconds, own CPU
    seconds and foreign CPU seconds of every batch, and the load averages seen."""
    import torch

    rec = {name: {"wall": [], "cpu": [], "foreign": []} for name in runs}
    loads = [os.getloadavg()[0]]
    with torch.inference_mode():
        for name, (bb, ctx) in runs.items():  # warm up (oneDNN primitive caches, allocations)
            with ctx():
                bb(x.to(bb.device))
        for r in range(repeats):
            for name, (bb, ctx) in runs.items():
                wait_for_quiet(quiet_wait, log=log)
                xd = x.to(bb.device)
                if bb.device.type == "cuda":
                    torch.cuda.synchronize(bb.device)
                c0 = own_cpu_s()
                with ForeignCpu() as fc, ctx():
                    t0 = time.perf_counter()
                    {k: v.cpu() for k, v in bb(xd).items()}
                    wall = time.perf_counter() - t0
                rec[name]["wall"].append(wall)
                rec[name]["cpu"].append(own_cpu_s() - c0)
                rec[name]["foreign"].append(fc.seconds)
            loads.append(os.getloadavg()[0])
    return {"runs": rec, "loadavg_1min": [round(v, 2) for v in loads]}


def summarise(rec: dict, batch: int) -> dict:
    i = min(range(len(rec["wall"])), key=lambda j: rec["wall"][j])
    return {"best_s": round(rec["wall"][i], 4),
            "ms_per_item": round(1e3 * rec["wall"][i] / batch, 2),
            "foreign_cpu_s_at_best": rec["foreign"][i], "best_cpu_s": round(min(rec["cpu"]), 4),
            "all_s": [round(v, 4) for v in rec["wall"]]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", default="resnet18,r2plus1d,vit,vggish")
    p.add_argument("--precision", default="auto", help="the precision compared with fp32 "
                   "[default: auto: bf16 on a CPU with native bf16, fp16 on CUDA]")
    p.add_argument("--batch-size", type=int, default=16, help="inputs per batch [default: 16, "
                   "as vtx extract]")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5, help="rounds; the best is reported")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads [default: torch's, one per core]; with 1, the "
                        "CPU seconds of a batch hardly depend on other processes")
    p.add_argument("--variants", action="store_true",
                   help="also time the alternatives: autocast vs cast, channels-last or not")
    p.add_argument("--quiet-wait", type=float, default=0.0, metavar="SECONDS",
                   help="before each batch wait up to this long for other processes to use "
                        "< 0.15 cores [default: 0, do not wait]")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    args = p.parse_args(argv)

    from vtx.features import parse_features
    from vtx.pipeline.backbones import load_backbones, resolve_device, resolve_precision

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    lp = resolve_precision(args.precision, device)
    if lp == "fp32":
        raise SystemExit(f"--precision {args.precision} is fp32 on {device}; nothing to compare")
    specs = parse_features(args.features)
    fp32 = load_backbones(specs, "random", device=device, precision="fp32")
    low = load_backbones(specs, "random", device=device, precision=lp)
    results = {}
    for key, bb in fp32.items():
        name = "+".join(bb.features)
        log(f"{name}: batch {args.batch_size}, {args.repeats} rounds")
        runs = variants(bb, low[key], lp, args.variants)
        x = model_input(bb, args.batch_size)
        t = time_runs(runs, x, args.repeats, args.quiet_wait)
        rows = {v: summarise(rec, args.batch_size) for v, rec in t["runs"].items()}
        speedup = rows["fp32"]["best_s"] / rows[lp]["best_s"]
        cpu_speedup = rows["fp32"]["best_cpu_s"] / rows[lp]["best_cpu_s"]
        results[name] = {"runs": rows, "speedup": round(speedup, 2),
                         "cpu_speedup": round(cpu_speedup, 2),
                         "loadavg_1min": t["loadavg_1min"],
                         "layout": str(low[key].memory_format).removeprefix("torch.")}
        log(f"{name}: fp32 {rows['fp32']['best_s']:.3f} s, {lp} {rows[lp]['best_s']:.3f} s "
            f"per batch: x{speedup:.2f}")
    out = {"precision": lp, "device": str(device), "batch_size": args.batch_size,
           "threads": torch.get_num_threads(),
           "repeats": args.repeats, "target_speedup": TARGET, "models": results,
           "machine": machine_info()}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{lp} vs fp32 on {device}, batch {args.batch_size}, best of {args.repeats}, "
              f"{out['threads']} thread(s) "
              f"(load avg {out['machine']['loadavg'][0]:.1f} at the end)")
        for name, r in results.items():
            print(f"  {name:<22} " + "  ".join(f"{v}: {row['best_s']:.3f} s "
                                                f"(cpu {row['best_cpu_s']:.3f})"
                                                for v, row in r["runs"].items())
                  + f"  speedup x{r['speedup']:.2f} (cpu x{r['cpu_speedup']:.2f}) "
                    f"{'PASS' if r['speedup'] >= TARGET else 'MISS'} (target x{TARGET})"
                  + f"  load {min(r['loadavg_1min']):.1f}-{max(r['loadavg_1min']):.1f}")
    return out


if __name__ == "__main__":
    main()
