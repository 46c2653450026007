"""Evaluation metrics for the three label kinds vtx trains on.

Multi-label genre classification follows STAN (Fish et al., 2022), Section 4 "Metrics"
and Table 3: mean average precision per genre, averaged with weights equal to each genre's
support, plus support-weighted precision, recall and F1 at a fixed threshold. LVU
(Wu & Kraehenbuehl, 2021) reports top-1 accuracy for its classification tasks and mean
squared error for its regression tasks.

Every number here is defined to equal scikit-learn's (checked in ``tests/test_metrics.py``),
but only numpy is needed at runtime:

* ``mAP_weighted`` / ``mAP_macro``: ``average_precision_score(average="weighted"/"macro")``.
  AP is the step-wise sum ``sum_k (R_k - R_{k-1}) * P_k`` over the *distinct* score values
  (tied scores form one threshold; no interpolation). A class with no positive sample
  gets AP 0 and a warning, as in scikit-learn: it has weight 0 in ``mAP_weighted`` but
  pulls ``mAP_macro`` down. If no class has a positive, ``mAP_weighted`` is 0.
* ``precision/recall/f1_weighted``: ``precision_recall_fscore_support(average="weighted",
  zero_division=0)`` with predictions ``scores >= threshold``. A 0/0 ratio counts as 0.
  If no class has a positive, the support weights all vanish and the plain mean over
  classes is returned (which is then 0), as scikit-learn does.
* A video with no positive class (an all-negative row, e.g. an empty ``labels`` field) is a
  negative for every class: it adds no support, and counts in AP and precision through its
  scores only (a false positive where it scores at or above the threshold), exactly as in
  scikit-learn, whose per-class metrics treat rows independently of each other's labels.
* ``top1`` / ``top5``: ``top_k_accuracy_score(labels=range(C))``. Ranking uses a stable
  sort, so among tied scores the *higher* class index ranks first. ``top5`` uses
  ``k = min(5, C)`` and is therefore 1.0 whenever ``C <= 5``.
* ``mse``: ``mean_squared_error``.

Known divergences, both where scikit-learn would not treat the input as we do:

* ``C == 1`` multi-label: one label column. scikit-learn reads a single column as a
  *binary* problem and averages precision/recall/F1 over both classes 0 and 1.
* ``C == 2`` multi-class: top-1 is the arg-max of the two columns (ties go to class 1).
  scikit-learn refuses ``(N, 2)`` scores here and wants the class-1 score alone,
  thresholded at 0.5 (strictly greater); for softmax rows the two agree except at an
  exact 0.5/0.5 tie.
"""

from __future__ import annotations

import warnings

import numpy as np

TASKS = ("multilabel", "multiclass", "regression")


# --------------------------------------------------------------------------- validation


def _check_multilabel(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    scores = np.asarray(scores, dtype=np.float64)
    if y_true.ndim != 2 or scores.shape != y_true.shape:
        raise ValueError(f"multi-label metrics need y_true and scores of the same shape (N, C); "
                         f"got {y_true.shape} and {scores.shape}")
    if y_true.shape[0] == 0:
        raise ValueError("multi-label metrics need at least one sample; got N = 0")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("multi-label y_true must be a 0/1 indicator matrix; "
                         f"found values {np.unique(y_true)[:10].tolist()}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity; check the model output")
    return y_true.astype(np.int64), scores


# --------------------------------------------------------------------------- multi-label


def _average_precision(y_true: np.ndarray, score: np.ndarray) -> float:
    """Step-wise AP of one binary column, the same operations as scikit-learn's.

    Args:
        y_true: 0/1 labels, (N,).
        score: scores, (N,); higher means more likely positive.
    """
    order = np.argsort(score, kind="stable")[::-1]          # descending score
    y_sorted = y_true[order].astype(np.float64)
    s_sorted = score[order]
    # Last index of each run of tied scores, then the end of the list.
    threshold_idxs = np.concatenate([np.nonzero(np.diff(s_sorted))[0], [y_sorted.size - 1]])
    tps = np.cumsum(y_sorted, dtype=np.float64)[threshold_idxs]
    fps = 1 + threshold_idxs.astype(np.float64) - tps
    ps = tps + fps
    precision = np.where(ps != 0, tps / np.where(ps != 0, ps, 1), 0.0)
    if tps[-1] == 0:
        recall = np.ones_like(tps)                       # scikit-learn's convention
    else:
        recall = tps / tps[-1]
    # Reverse so recall decreases, then close the curve at (recall 0, precision 1).
    precision = np.concatenate([precision[::-1], [1.0]])
    recall = np.concatenate([recall[::-1], [0.0]])
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def _per_class(y_true: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """Per-class support, AP, precision, recall and F1, each (C,)."""
    n_classes = y_true.shape[1]
    support = y_true.sum(axis=0)
    if n_classes and (support == 0).any():
        missing = np.flatnonzero(support == 0).tolist()
        warnings.warn(f"no positive sample for class indices {missing}: their average "
                      "precision is set to 0 (as scikit-learn does), which lowers mAP_macro; "
                      "mAP_weighted gives them weight 0", UserWarning, stacklevel=3)
    ap = np.array([_average_precision(y_true[:, c], scores[:, c]) for c in range(n_classes)],
                  dtype=np.float64)

    pred = scores >= threshold
    tp = np.logical_and(pred, y_true == 1).sum(axis=0)
    pred_sum = pred.sum(axis=0)

    def divide(num, den):
        num = np.asarray(num, dtype=np.float64)
        den = np.asarray(den, dtype=np.float64)
        return np.where(den == 0, 0.0, num / np.where(den == 0, 1.0, den))

    precision = divide(tp, pred_sum)
    recall = divide(tp, support)
    f1 = divide(2.0 * tp, 1.0 * support + pred_sum)
    return {"support": support, "AP": ap, "precision": precision, "recall": recall, "f1": f1}


def _weighted_mean(values: np.ndarray, weights: np.ndarray) -> float:
    """scikit-learn's ``_nanaverage``: support-weighted, the plain mean if all weights are 0."""
    weights = weights.astype(np.float64)
    total = weights.sum()
    if total == 0:
        return float(np.mean(values))
    return float(np.sum(values * weights) / total)


def multilabel_metrics(y_true, scores, threshold: float = 0.5) -> dict[str, float]:
    """Genre-style multi-label metrics (STAN, Section 4 "Metrics").

    Args:
        y_true: 0/1 indicator matrix, (N, C).
        scores: per-class probabilities, (N, C).
        threshold: a class is predicted when its score is ``>= threshold``.

    Returns:
        ``mAP_weighted``, ``mAP_macro``, ``precision_weighted``, ``recall_weighted``,
        ``f1_weighted``.
    """
    y_true, scores = _check_multilabel(y_true, scores)
    pc = _per_class(y_true, scores, threshold)
    support = pc["support"]
    if support.sum() == 0:
        map_weighted = 0.0                          # scikit-learn returns 0 here
    else:
        ap = np.where(support == 0, 0.0, pc["AP"])
        map_weighted = _weighted_mean(ap, support)
    return {
        "mAP_weighted": map_weighted,
        "mAP_macro": float(np.mean(pc["AP"])),
        "precision_weighted": _weighted_mean(pc["precision"], support),
        "recall_weighted": _weighted_mean(pc["recall"], support),
        "f1_weighted": _weighted_mean(pc["f1"], support),
    }


def per_class_table(y_true, scores, class_names, threshold: float = 0.5) -> list[dict]:
    """One row per class, as in Table 3 of STAN.

    Args:
        y_true: 0/1 indicator matrix, (N, C).
        scores: per-class probabilities, (N, C).
        class_names: C names, in column order.
        threshold: a class is predicted when its score is ``>= threshold``.

    Returns:
        Rows ``{"class", "support", "AP", "precision", "recall", "f1"}`` in column order.
    """
    y_true, scores = _check_multilabel(y_true, scores)
    class_names = list(class_names)
    if len(class_names) != y_true.shape[1]:
        raise ValueError(f"{len(class_names)} class names for {y_true.shape[1]} score columns")
    pc = _per_class(y_true, scores, threshold)
    return [{"class": str(name),
             "support": int(pc["support"][c]),
             "AP": float(pc["AP"][c]),
             "precision": float(pc["precision"][c]),
             "recall": float(pc["recall"][c]),
             "f1": float(pc["f1"][c])} for c, name in enumerate(class_names)]


def format_table(rows: list[dict]) -> str:
    """Render ``per_class_table`` rows as aligned text, with weighted and macro summary lines.

    The weighted line uses the support as weights, so its AP equals ``mAP_weighted``.
    """
    cols = ("support", "AP", "precision", "recall", "f1")
    width = max([len("class"), len("weighted avg")] + [len(r["class"]) for r in rows])
    header = f"{'class':<{width}}  {'support':>7}" + "".join(f"  {c:>9}" for c in cols[1:])

    def line(name, support, values):
        return f"{name:<{width}}  {support:>7}" + "".join(f"  {v:>9.4f}" for v in values)

    out = [header, "-" * len(header)]
    out += [line(r["class"], r["support"], [r[c] for c in cols[1:]]) for r in rows]
    if rows:
        support = np.array([r["support"] for r in rows], dtype=np.float64)
        table = np.array([[r[c] for c in cols[1:]] for r in rows], dtype=np.float64)  # (C, 4)
        weighted = [_weighted_mean(table[:, j], support) for j in range(table.shape[1])]
        if support.sum() == 0:
            weighted[0] = 0.0
        out.append("-" * len(header))
        out.append(line("weighted avg", int(support.sum()), weighted))
        out.append(line("macro avg", int(support.sum()), table.mean(axis=0)))
    return "\n".join(out)


# --------------------------------------------------------------------------- multi-class


def multiclass_metrics(y_true, scores) -> dict[str, float]:
    """Top-1 and top-5 accuracy (LVU's classification metric is top-1).

    Args:
        y_true: class indices, (N,).
        scores: per-class scores or probabilities, (N, C).

    Returns:
        ``top1`` and ``top5``; top-5 uses ``k = min(5, C)``.
    """
    y_true = np.asarray(y_true)
    scores = np.asarray(scores, dtype=np.float64)
    if y_true.ndim != 1 or scores.ndim != 2 or scores.shape[0] != y_true.shape[0]:
        raise ValueError(f"multi-class metrics need y_true (N,) and scores (N, C); "
                         f"got {y_true.shape} and {scores.shape}")
    n, n_classes = scores.shape
    if n == 0 or n_classes == 0:
        raise ValueError(f"multi-class metrics need N > 0 and C > 0; got scores {scores.shape}")
    if not np.issubdtype(y_true.dtype, np.integer):
        if not np.all(np.mod(y_true, 1) == 0):
            raise ValueError("multi-class y_true must hold integer class indices")
        y_true = y_true.astype(np.int64)
    if y_true.min() < 0 or y_true.max() >= n_classes:
        raise ValueError(f"class index out of range: y_true spans [{y_true.min()}, "
                         f"{y_true.max()}] but scores have {n_classes} columns")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity; check the model output")
    # Stable ascending sort, reversed: among ties the higher class index ranks first.
    ranked = np.argsort(scores, axis=1, kind="stable")[:, ::-1]    # (N, C)

    def top_k(k: int) -> float:
        hits = (ranked[:, :k] == y_true[:, None]).any(axis=1)       # (N,)
        return float(np.mean(hits))

    return {"top1": top_k(1), "top5": top_k(min(5, n_classes))}


# --------------------------------------------------------------------------- regression


def regression_metrics(y_true, y_pred) -> dict[str, float]:
    """Mean squared error (LVU's metric for the ``like`` and ``view`` tasks).

    Args:
        y_true: targets, (N,).
        y_pred: predictions, (N,).
    """
    y_true = np.asarray(y_true, dtype=np.float64).reshape(-1)
    y_pred = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"regression metrics need y_true and y_pred of the same non-zero "
                         f"length; got {y_true.shape} and {y_pred.shape}")
    if not (np.isfinite(y_true).all() and np.isfinite(y_pred).all()):
        raise ValueError("regression targets or predictions contain NaN or infinity")
    err = ((y_true - y_pred) ** 2).reshape(-1, 1)                   # (N, 1), one output
    return {"mse": float(np.mean(np.mean(err, axis=0)))}


# --------------------------------------------------------------------------- dispatch


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")


def compute_metrics(task: str, y_true, scores) -> dict[str, float]:
    """The metrics of one task.

    Args:
        task: ``multilabel``, ``multiclass`` or ``regression``.
        y_true: (N, C) indicator matrix, (N,) class indices, or (N,) targets.
        scores: (N, C) probabilities, (N, C) class scores, or (N,) predictions.
    """
    _check_task(task)
    if task == "multilabel":
        return multilabel_metrics(y_true, scores)
    if task == "multiclass":
        return multiclass_metrics(y_true, scores)
    return regression_metrics(y_true, scores)


def primary_metric(task: str) -> tuple[str, bool]:
    """The metric that picks the best checkpoint: ``(key, higher_is_better)``."""
    _check_task(task)
    return {"multilabel": ("mAP_weighted", True),
            "multiclass": ("top1", True),
            "regression": ("mse", False)}[task]
