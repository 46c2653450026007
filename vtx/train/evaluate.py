"""Evaluate a trained head on one split of a cache: the metrics of its task and, optionally, a
CSV of per-video predictions.

Metrics follow :mod:`vtx.train.metrics`: for multi-label tasks the support-weighted mAP,
precision, recall and F1 of STAN (Fish et al. 2022, Section 4 "Metrics", Table 3) plus the
per-class table; top-1/top-5 accuracy for multi-class tasks and the MSE for regression (LVU,
Wu & Kraehenbuehl 2021).

The labels are read with the checkpoint's task, vocabulary and ``val_frac``, so the splits
are the ones the run trained with. A split with no video falls back (``test`` to ``val``,
``val`` to ``test``) and says so.

Predictions CSV: one row per video in cache order; a ``video`` column holding the cache's
``path``, then one column per class (named after it) holding its probability (sigmoid for
multi-label, softmax for multi-class), or a single ``value`` column for regression.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from vtx.errors import UsageError
from vtx.progress import progress as progress_bar
from vtx.train.checkpoint import CheckpointError, load_checkpoint
from vtx.train.dataset import collate, load_cache
from vtx.train.labels import load_labels
from vtx.train.metrics import compute_metrics, format_table, per_class_table

__all__ = ["SPLITS", "evaluate_run", "format_result", "resolve_checkpoint", "write_predictions"]

SPLITS = ("test", "val", "train", "all")
FALLBACK = {"test": ("val",), "val": ("test",), "train": (), "all": ()}


def resolve_checkpoint(run_or_ckpt: str | Path) -> Path:
    """``RUN/best.pt`` for a run folder, the path itself for a file."""
    p = Path(run_or_ckpt)
    if p.is_dir():
        best = p / "best.pt"
        if not best.is_file():
            hint = (f"; {p / 'last.pt'} exists, pass it to evaluate the latest epoch"
                    if (p / "last.pt").is_file() else "; is this a vtx train-head --out folder?")
            raise CheckpointError(f"run folder {p} has no best.pt{hint}")
        return best
    if not p.exists():
        raise CheckpointError(f"{p} does not exist; pass a run folder or a .pt checkpoint")
    return p


def write_predictions(path: str | Path, videos: list[str], scores: np.ndarray, task: str,
                      vocab: list[str]) -> Path:
    """Write the predictions CSV (see the module docstring) atomically."""
    path = Path(path)
    columns = ["value"] if task == "regression" else list(vocab)
    if "video" in columns:
        raise UsageError("a class is named 'video', which clashes with the CSV's video column")
    scores = np.asarray(scores, dtype=np.float64).reshape(len(videos), len(columns))
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["video", *columns])
        for video, row in zip(videos, scores):
            w.writerow([video, *(repr(float(v)) for v in row)])
    os.replace(tmp, path)
    return path


def evaluate_run(run_or_ckpt: str | Path, features: str | Path, labels: str | Path,
                 split: str = "test", predictions_out: str | Path | None = None, *,
                 device: str = "auto", batch_size: int = 32,
                 log: Callable[[str], None] | None = None, progress: bool = True) -> dict:
    """Evaluate a checkpoint on one split of a cache.

    Args:
        run_or_ckpt: a run folder (its ``best.pt`` is used) or a checkpoint file.
        features: the feature cache; its features must match the checkpoint's.
        labels: the label file (read with the checkpoint's task and vocabulary).
        split: ``test``, ``val``, ``train`` or ``all``.
        predictions_out: where to write the predictions CSV, if given.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: videos per forward pass.
        log: where notes go (stderr by default).
        progress: show progress over the batches (:mod:`vtx.progress`; ``--quiet`` is False).

    Returns:
        The task's metrics (``compute_metrics``) plus ``task``, ``split`` (the one evaluated),
        ``requested_split``, ``n_videos``, ``checkpoint``, ``epoch``, ``predictions`` (path or
        None) and, for multi-label tasks, ``per_class`` (``per_class_table`` rows).

    Raises:
        UsageError: bad split, checkpoint, labels or cache, or no video to evaluate.
    """
    from vtx.pipeline.backbones import resolve_device
    from vtx.train.trainer import predict_scores

    log = log or (lambda msg: print(msg, file=sys.stderr))
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    ckpt_path = resolve_checkpoint(run_or_ckpt)
    head, ckpt = load_checkpoint(ckpt_path)
    dev = resolve_device(device)
    task = ckpt["task"]
    train_config = ckpt.get("train_config") or {}
    labelset = load_labels(labels, task=task, val_frac=train_config.get("val_frac", 0.2),
                           vocab=list(ckpt["vocab"]) if task != "regression" else None)
    data = load_cache(features, labelset, head.inputs, head.level,
                      train_config.get("max_tokens"), log)
    _check_features(ckpt, data, ckpt_path, log)

    used = split
    dataset = data.dataset(split)
    if len(dataset) == 0:
        for alt in FALLBACK[split]:
            if len(data.dataset(alt)):
                log(f"vtx: note: no labelled video of {features} is in the {split!r} split; "
                    f"evaluating the {alt!r} split instead ({len(data.dataset(alt))} videos)")
                used, dataset = alt, data.dataset(alt)
                break
        else:
            raise UsageError(f"no labelled video of {features} is in the {split!r} split "
                             f"(splits: {data.split_sizes()}); pass --split train, val, test "
                             f"or all")

    head.to(dev)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    batches = progress_bar(loader, desc="evaluate", unit="batch", enabled=progress)
    idx, y_true, scores, loss = predict_scores(head, batches, task, dev)
    videos = [dataset.videos[i].path for i in idx]
    result: dict = dict(compute_metrics(task, y_true, scores))
    if task == "multilabel":
        result["per_class"] = per_class_table(y_true, scores, ckpt["vocab"])
    result.update(task=task, split=used, requested_split=split, n_videos=len(videos),
                  loss=loss, checkpoint=str(ckpt_path), epoch=ckpt.get("epoch"),
                  predictions=None)
    if predictions_out is not None:
        result["predictions"] = str(write_predictions(predictions_out, videos, scores, task,
                                                      ckpt["vocab"]))
    return result


def _check_features(ckpt: dict, data, ckpt_path: Path, log) -> None:
    """Refuse a cache whose features were made differently from the checkpoint's; warn when
    its shots were cut, or its frames sampled, with other settings."""
    diffs = []
    for ft, want in ckpt["features"].items():
        got = data.feature_attrs.get(ft, {})
        for attr in ("weights", "dim", "model"):
            if attr in want and attr in got and str(want[attr]) != str(got[attr]):
                diffs.append(f"{ft}.{attr}: checkpoint {want[attr]!r}, cache {got[attr]!r}")
    if diffs:
        raise UsageError(f"{ckpt_path} was trained on features made differently from those in "
                         f"{data.cache} ({'; '.join(diffs)}); evaluate on a cache extracted with "
                         f"the same backbones and weights")
    for key, what in (("shot_config", "cut into shots"), ("frame_config", "sampled frames")):
        mine, theirs = getattr(data, key), ckpt.get(key)
        if mine and theirs and mine != theirs:
            log(f"vtx: warning: {data.cache} {what} with {mine}, the checkpoint's cache with "
                f"{theirs}; metrics may not be comparable")


def format_result(result: dict) -> str:
    """Human-readable summary (and per-class table for multi-label tasks)."""
    skip = {"per_class", "task", "split", "requested_split", "n_videos", "checkpoint", "epoch",
            "predictions", "loss"}
    metrics = "  ".join(f"{k} {v:.4f}" for k, v in result.items() if k not in skip)
    lines = [f"{result['checkpoint']} (epoch {result['epoch']}) on {result['n_videos']} "
             f"{result['split']} videos, {result['task']}: {metrics}"]
    if result.get("per_class"):
        lines += ["", format_table(result["per_class"])]
    if result.get("predictions"):
        lines += ["", f"predictions: {result['predictions']}"]
    return "\n".join(lines)
