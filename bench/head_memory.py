"""Peak memory of one training step of every head at paper size (a benchmark, not a test).

The project promises that every head trains at paper size with batch 32 on one 16 GB card. For
each case below this prints the peak memory of one AdamW training step in four settings (fp32;
AMP; AMP with activation checkpointing; and the gradient accumulation that fits 16 GiB with
both) and the parameter count against the paper's:

| case | head at ``--size paper`` | tokens per video |
|---|---|---|
| timesformer | depth 12, width 768, divided attention | 8 frames x 196 patches |
| mevit | depth 12 + 1 class-attention layer, width 768, M = 2 | 8 x 196 |
| mmvit | variant III merged, depth 12, width 768, all of I, M, R, A | 8 x 196 per modality |
| vtn | 3 Longformer layers of 768, window 32 | 7,200 frames (2 h at 1 fps) |
| stan-trailer | two streams of 768, 2 layers | 256 shots (a trailer) |
| stan-film | the same | 2,400 shots (a 2-hour film, 3 s shots) |

Method, per row (the ``method`` column):

* ``measured``: on a CUDA device, two real training steps (the second holds the optimizer
  state), ``torch.cuda.max_memory_allocated`` (``vtx.train.memory.measure_training_memory``).
* ``estimated``: without a GPU, :func:`vtx.train.memory.estimate_training_memory`, with no real
  memory: the head is built on the ``meta`` device, moved with ``to_empty`` into a
  ``FakeTensorMode``, the bytes of every storage saved for backward are summed by a
  ``saved_tensors_hooks`` pack hook during a forward pass, and parameters, gradients, AdamW
  state (and autocast's fp16 weight copies with AMP) plus a backward workspace are added.
  ``MemTracker`` over fake CUDA tensors would need a CUDA context; this needs none.

Usage:  python bench/head_memory.py [--batch 32] [--budget-gib 16] [--cases vtn,stan-film]
                                    [--measure] [--json]

``--measure`` (CUDA only) adds the measured rows next to the estimated ones.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from vtx.heads import build_head, preset  # noqa: E402
from vtx.train.memory import (GiB, estimate_training_memory, fake_batch,  # noqa: E402
                              measure_training_memory)

#: name -> (head, extra config, tokens per video, what the paper reports as parameters (M) and
#: how that number compares: ``None`` when it has none for this head alone).
CASES = {
    "timesformer": ("timesformer", {"n_outputs": 400}, 8,
                    (121.4, "Table 1, divided space-time (with its patch embedding)")),
    "mevit": ("mevit", {"n_outputs": 400}, 8, (None, "the paper gives no count")),
    "mmvit": ("mmvit", {"n_outputs": 101}, 8, (158.14, "Table 1, MM-ViT III merged")),
    "vtn": ("vtn", {"n_outputs": 400}, 7200,
            (114 - 86.6, "Table 3, ViT-B-VTN 3 layers (114 M) minus ViT-B/16 (86.6 M)")),
    "stan-trailer": ("stan", {"n_outputs": 20}, 256,
                     (45 - 11.2, "Table 4, STAN-Small (45 M) minus ResNet18 (11.2 M)")),
    "stan-film": ("stan", {"n_outputs": 20}, 2400, (45 - 11.2, "as above")),
}
SETTINGS = (("fp32", False, False), ("amp", True, False), ("amp+ckpt", True, True))


def head_of(case: str, device: str = "meta") -> torch.nn.Module:
    name, extra, _, _ = CASES[case]
    with torch.device(device):
        return build_head(name, **{**preset(name, "paper"), **extra})


def fit_accumulation(case: str, batch: int, budget: int) -> dict:
    """The fewest accumulation steps N (micro-batch ``batch / N``) at which AMP + checkpointing
    fits ``budget``."""
    name, _, length, _ = CASES[case]
    head = head_of(case)
    for n in (1, 2, 4, 8, 16, 32):
        if batch % n:
            continue
        est = estimate_training_memory(name, head.config, head.inputs, batch // n, length,
                                       amp=True, grad_checkpoint=True)
        if est.peak <= budget:
            return {"accumulate": n, "micro_batch": batch // n, "peak_gib": est.peak / GiB}
    return {"accumulate": None, "micro_batch": None, "peak_gib": None}


def run_case(case: str, batch: int, budget: int, measure: bool) -> list[dict]:
    name, _, length, (paper_m, paper_what) = CASES[case]
    head = head_of(case)
    params_m = sum(p.numel() for p in head.parameters()) / 1e6
    rows = []
    for label, amp, ckpt in SETTINGS:
        t0 = time.perf_counter()
        est = estimate_training_memory(name, head.config, head.inputs, batch, length, amp=amp,
                                       grad_checkpoint=ckpt)
        rows.append({"case": case, "head": name, "tokens": length, "batch": batch,
                     "setting": label, "method": "estimated", "peak_gib": est.peak / GiB,
                     "activations_gib": est.activations / GiB, "fits": est.peak <= budget,
                     "params_m": params_m, "paper_params_m": paper_m, "paper": paper_what,
                     "seconds": round(time.perf_counter() - t0, 2)})
        if measure:
            rows.append(dict(rows[-1], method="measured", activations_gib=None,
                             **_measure(case, batch, amp, ckpt)))
    fit = fit_accumulation(case, batch, budget)
    rows.append({"case": case, "head": name, "tokens": length, "batch": batch,
                 "setting": f"amp+ckpt, accumulate {fit['accumulate']} x {fit['micro_batch']}",
                 "method": "estimated", "peak_gib": fit["peak_gib"], "activations_gib": None,
                 "fits": fit["accumulate"] is not None, "params_m": params_m,
                 "paper_params_m": paper_m, "paper": paper_what, "seconds": 0.0,
                 "accumulate": fit["accumulate"], "micro_batch": fit["micro_batch"]})
    return rows


def _measure(case: str, batch: int, amp: bool, ckpt: bool) -> dict:
    name, _, length, _ = CASES[case]
    head = head_of(case, "cuda")
    head.set_grad_checkpointing(ckpt)
    inputs = fake_batch(head.inputs, batch, length, "cuda")
    try:
        peak = measure_training_memory(head, inputs, amp=amp)
        return {"peak_gib": peak / GiB, "fits": None, "oom": False}
    except torch.cuda.OutOfMemoryError:
        return {"peak_gib": None, "fits": False, "oom": True}
    finally:
        del head, inputs
        torch.cuda.empty_cache()


def table(rows: list[dict], budget_gib: float) -> str:
    out = [f"| case | tokens | setting | method | peak (GiB) | fits {budget_gib:g} GiB | "
           f"params (M) | paper (M) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = "OOM" if r.get("oom") else ("-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}")
        fits = "-" if r["fits"] is None else ("yes" if r["fits"] else "no")
        paper = "-" if r["paper_params_m"] is None else f"{r['paper_params_m']:.1f}"
        out.append(f"| {r['case']} | {r['tokens']} | {r['setting']} | {r['method']} | {peak} | "
                   f"{fits} | {r['params_m']:.1f} | {paper} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--budget-gib", type=float, default=16.0)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--measure", action="store_true", help="also measure on CUDA")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.measure and not torch.cuda.is_available():
        sys.exit("--measure needs a CUDA device")
    budget = int(args.budget_gib * GiB)
    rows = []
    for case in args.cases.split(","):
        rows += run_case(case.strip(), args.batch, budget, args.measure)
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.platform(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "batch": args.batch, "budget_gib": args.budget_gib}
    if args.json:
        print(json.dumps({"info": info, "rows": rows}, indent=1))
        return
    print(table(rows, args.budget_gib))
    fitted = [r for r in rows if r["setting"].startswith("amp+ckpt, accumulate")]
    ok = all(r["fits"] for r in fitted)
    print(f"\nevery head at paper size, batch {args.batch}, within {args.budget_gib:g} GiB: "
          f"{'PASS' if ok else 'MISS'} (with AMP, --grad-checkpoint and the --accumulate shown)")
    print(f"torch {info['torch']}, {info['cuda'] or 'no CUDA device: estimated rows only'}")


if __name__ == "__main__":
    main()
