"""Forward cost of the stage-2 heads at ViT-B width (a benchmark, not a test).

Counts one forward pass of one video with ``torch.utils.flop_counter.FlopCounterMode`` on the
``meta`` device (nothing is computed, so it runs in seconds). What is counted: every matrix
product, i.e. every linear layer (``addmm``/``mm``/``bmm``) and the attention matmuls (``QK^T``
and ``AV``, including inside ``scaled_dot_product_attention``) and convolutions; a matmul of
``(m x k) @ (k x n)`` counts ``2 m k n`` FLOPs. Not counted: softmax, LayerNorm, GELU, biases,
residual adds, dropout, and the recurrent matmuls inside ``nn.LSTM`` (the flop counter has no
formula for the fused LSTM op, so the ``lstm`` row shows only its linear layers). The papers count multiply-accumulates (MACs, as fvcore does), so both
are printed: MACs = FLOPs / 2. ``n_outputs`` is 400 (Kinetics-400's classifier, as in the papers).

Inputs: the heads' own contract, 8 frames x 196 patches of width 768 for the patch heads
(``timesformer``, ``mevit``, ``mmvit``), 8 tokens for the frame-token heads (``vtn``) and 8
shots for the shot heads (``stan``, ``meanpool``, ``lstm``).

TimeSformer check: Table 2 of timesformer.txt gives 0.59 TFLOPs for 3 views (1 clip x 3 crops)
of 8 x 224 x 224, i.e. 0.1967 T (fvcore MACs) per view. That count includes the patch embedding
(Conv 16x16, 3 -> 768, over 8 x 196 patches: 8 * 196 * 768 * 768 MACs = 0.92 G), which the head
does not compute; it adds its own input projection Linear(768 -> 768) instead (the same 0.92 G).
The target is |head(divided, depth 12) - (0.1967 T - patch embedding)| <= 10 %.

MM-ViT (``mmvit``, another module) is included when it is registered: variants 1-4 and its
cross-modal attention options, with the ratios II/I and III/I (Table 1 of mm-vit.txt: about 0.67
and 0.65).

Usage:  python bench/head_flops.py [--json]
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from vtx.heads import HEADS, build_head
from vtx.heads.base import input_shape

FRAMES, PATCHES, WIDTH, N_OUT = 8, 196, 768, 400
VIT_B = dict(d_model=768, n_heads=12, n_frames=FRAMES, n_patches=PATCHES)
PAPER_TIMESFORMER_MACS = 0.59e12 / 3  # Table 2, per view
PATCH_EMBED_MACS = FRAMES * PATCHES * WIDTH * (3 * 16 * 16)  # Conv 16x16x3 -> 768 per patch


def variants() -> list[tuple[str, str, dict]]:
    """(label, head, config) of every head and setting to count."""
    rows = [
        ("timesformer divided depth 12", "timesformer", dict(VIT_B, depth=12)),
        ("timesformer joint depth 12", "timesformer", dict(VIT_B, depth=12, attention="joint")),
        ("timesformer space depth 12", "timesformer", dict(VIT_B, depth=12, attention="space")),
        ("timesformer divided depth 4 (default)", "timesformer", dict(VIT_B)),
        ("mevit default (depth 4, M=2, CA 1)", "mevit", dict(VIT_B)),
    ]
    for m in (1, 2, 3, 7, 14):  # Table 1
        rows.append((f"mevit T1 M={m} (12 SA)", "mevit",
                     dict(VIT_B, depth=12, block_size=m, class_attention_layers=0)))
    for sa, ca in ((9, 3), (10, 2), (11, 1), (12, 1)):  # Table 2
        rows.append((f"mevit T2 {sa}SA+{ca}CA M=2", "mevit", dict(VIT_B, depth=sa, class_attention_layers=ca)))
    for lt in (0, 2, 4, 8, 12):  # Table 3
        rows.append((f"mevit T3 L_t={lt} (12 SA) M=2", "mevit",
                     dict(VIT_B, depth=12, time_layers=lt, class_attention_layers=0)))
    rows.append(("mevit final (11SA, L_t=7, 1CA, M=2)", "mevit",
                 dict(VIT_B, depth=11, time_layers=7, class_attention_layers=1)))
    rows += [
        ("vtn default", "vtn", {}),
        ("stan default", "stan", {}),
        ("meanpool", "meanpool", {}),
        ("lstm", "lstm", {}),
    ]
    if "mmvit" in HEADS:
        mm = dict(VIT_B, depth=12, modalities="IMRA")
        for v in (1, 2, 3, 4):
            rows.append((f"mmvit variant {v}", "mmvit", dict(mm, variant=v)))
        for v in (1, 2, 3, 4):
            for cross in ("merged", "co", "shift-merge"):
                rows.append((f"mmvit variant {v} cross={cross}", "mmvit", dict(mm, variant=v, cross=cross)))
    return rows


def count(name: str, cfg: dict) -> dict:
    """FLOPs and MACs of one forward pass of one video, counted on the meta device (on the CPU
    for heads that need real data, such as the LSTM's packed sequences)."""
    try:
        return _count(name, cfg, "meta")
    except NotImplementedError:
        return _count(name, cfg, "cpu")


def _count(name: str, cfg: dict, device: str) -> dict:
    with torch.device(device):
        torch.manual_seed(0)
        head = build_head(name, n_outputs=N_OUT, **cfg).eval().requires_grad_(False)
        batch = {k: torch.randn(1, FRAMES, *input_shape(w)) for k, w in head.inputs.items()}
        batch["mask"] = torch.ones(1, FRAMES, dtype=torch.bool)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        head(batch)
    flops = counter.get_total_flops()
    params = sum(p.numel() for p in head.parameters())
    return {"flops": flops, "macs": flops / 2, "params": params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args()

    results = []
    for label, name, cfg in variants():
        try:
            r = count(name, cfg)
        except (TypeError, ValueError) as e:  # a setting the head does not offer (mmvit cross options)
            results.append({"label": label, "head": name, "config": cfg, "error": str(e)})
            continue
        results.append({"label": label, "head": name, "config": cfg, **r})

    by_label = {r["label"]: r for r in results if "macs" in r}
    target = PAPER_TIMESFORMER_MACS - PATCH_EMBED_MACS
    ours = by_label["timesformer divided depth 12"]["macs"]
    check = {
        "paper_macs_per_view": PAPER_TIMESFORMER_MACS,
        "patch_embedding_macs": PATCH_EMBED_MACS,
        "paper_less_patch_embedding_macs": target,
        "head_macs": ours,
        "relative_difference": ours / target - 1,
        "within_10_percent": abs(ours / target - 1) <= 0.10,
    }
    ratios = {}
    if all(f"mmvit variant {v}" in by_label for v in (1, 2, 3)):
        base = by_label["mmvit variant 1"]["macs"]
        ratios = {f"mmvit {k}/I": by_label[f"mmvit variant {v}"]["macs"] / base
                  for k, v in (("II", 2), ("III", 3), ("IV", 4)) if f"mmvit variant {v}" in by_label}
        ratios["paper"] = {"II/I": 0.67, "III/I": 0.65}

    if args.json:
        print(json.dumps({"frames": FRAMES, "patches": PATCHES, "n_outputs": N_OUT, "results": results,
                          "timesformer_check": check, "mmvit_ratios": ratios}, indent=1))
        return
    print(f"forward cost of one video ({FRAMES} frames x {PATCHES} patches, width {WIDTH}, "
          f"{N_OUT} outputs); matmuls only (linear layers, attention QK^T and AV)")
    print(f"{'head / setting':44s} {'GMACs':>9s} {'GFLOPs':>9s} {'params M':>9s}")
    for r in results:
        if "error" in r:
            print(f"{r['label']:44s} {'n/a':>9s}  ({r['error'][:60]})")
        else:
            print(f"{r['label']:44s} {r['macs'] / 1e9:9.2f} {r['flops'] / 1e9:9.2f} {r['params'] / 1e6:9.2f}")
    print(f"\nTimeSformer (divided, depth 12) vs timesformer.txt Table 2: paper {check['paper_macs_per_view'] / 1e9:.1f} "
          f"GMACs per view - patch embedding {check['patch_embedding_macs'] / 1e9:.2f} = "
          f"{target / 1e9:.1f}; head {ours / 1e9:.1f} ({check['relative_difference']:+.1%}, "
          f"{'within' if check['within_10_percent'] else 'NOT within'} 10%)")
    if ratios:
        print("MM-ViT MAC ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items() if k != "paper")
              + " (paper Table 1: II/I 0.67, III/I 0.65)")


if __name__ == "__main__":
    main()
