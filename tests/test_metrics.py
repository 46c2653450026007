"""Tests for vtx.train.metrics: equal to scikit-learn's definitions, and hand-checked cases."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

from vtx.train.metrics import (
    compute_metrics,
    format_table,
    multiclass_metrics,
    multilabel_metrics,
    per_class_table,
    primary_metric,
    regression_metrics,
)

skm = pytest.importorskip("sklearn.metrics")

EXACT = dict(rel=1e-12, abs=1e-15)


def random_multilabel(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random (y_true, scores) with heavy ties, and often a class with no positives."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    c = int(rng.integers(2, 12))
    y = (rng.random((n, c)) < rng.uniform(0.05, 0.7)).astype(np.int64)
    if seed % 3 == 0:
        y[:, rng.integers(c)] = 0                     # a class with zero support
    if seed % 17 == 0:
        y[:] = 0                                      # no positives at all
    decimals = int(rng.integers(0, 3))                # 0 decimals: scores are only 0 or 1
    scores = np.round(rng.random((n, c)), decimals)
    if seed % 5 == 0:
        scores[:, 0] = 0.5                            # a fully tied column, on the threshold
    return y, scores


def sklearn_multilabel(y, scores, threshold=0.5):
    pred = (scores >= threshold).astype(np.int64)
    p, r, f, _ = skm.precision_recall_fscore_support(y, pred, average="weighted",
                                                     zero_division=0)
    return {"mAP_weighted": skm.average_precision_score(y, scores, average="weighted"),
            "mAP_macro": skm.average_precision_score(y, scores, average="macro"),
            "precision_weighted": p, "recall_weighted": r, "f1_weighted": f}


def test_multilabel_matches_sklearn():
    for seed in range(100):
        y, scores = random_multilabel(seed)
        threshold = [0.5, 0.3, 0.8][seed % 3]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = multilabel_metrics(y, scores, threshold=threshold)
            ref = sklearn_multilabel(y, scores, threshold)
        assert list(ours) == ["mAP_weighted", "mAP_macro", "precision_weighted",
                              "recall_weighted", "f1_weighted"]
        for key, value in ref.items():
            assert ours[key] == pytest.approx(float(value), **EXACT), (seed, key)
            assert isinstance(ours[key], float)


def test_per_class_table_matches_sklearn():
    for seed in range(40):
        y, scores = random_multilabel(seed)
        names = [f"g{i}" for i in range(y.shape[1])]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = per_class_table(y, scores, names)
            ap = skm.average_precision_score(y, scores, average=None)
            p, r, f, s = skm.precision_recall_fscore_support(
                y, (scores >= 0.5).astype(int), average=None, zero_division=0)
        assert [row["class"] for row in rows] == names
        for c, row in enumerate(rows):
            assert row["support"] == s[c], seed
            assert row["AP"] == pytest.approx(ap[c], **EXACT), seed
            assert row["precision"] == pytest.approx(p[c], **EXACT), seed
            assert row["recall"] == pytest.approx(r[c], **EXACT), seed
            assert row["f1"] == pytest.approx(f[c], **EXACT), seed


def test_all_negative_videos_and_a_class_without_positives_match_sklearn():
    """Videos with no positive class (empty labels fields) and a class with no positive in the
    split: every metric and the per-class table are scikit-learn's."""
    rng = np.random.default_rng(7)
    y = (rng.random((30, 5)) < 0.4).astype(np.int64)
    y[::3] = 0          # every third video: no class applies
    y[:, 2] = 0         # class 2: no positive in this split
    scores = np.round(rng.random((30, 5)), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = sklearn_multilabel(y, scores)
        ap = skm.average_precision_score(y, scores, average=None)
    with pytest.warns(UserWarning, match=r"no positive sample for class indices \[2\]"):
        ours = multilabel_metrics(y, scores)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(float(value), **EXACT), key
    with pytest.warns(UserWarning):
        rows = per_class_table(y, scores, list("abcde"))
    assert rows[2]["support"] == 0 and rows[2]["AP"] == 0.0 == ap[2]
    for c, row in enumerate(rows):
        assert row["AP"] == pytest.approx(ap[c], **EXACT)
    # An all-negative video changes the metrics only through its scores: a high score on it is a
    # false positive (precision and AP fall), a low one changes nothing.
    base_y, base_s = y[1:3], scores[1:3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        low = multilabel_metrics(np.vstack([base_y, np.zeros((1, 5), int)]),
                                 np.vstack([base_s, np.zeros((1, 5))]))
        plain = multilabel_metrics(base_y, base_s)
    assert low["mAP_weighted"] == pytest.approx(plain["mAP_weighted"])
    assert low["precision_weighted"] == pytest.approx(plain["precision_weighted"])


def test_ap_is_stepwise_not_interpolated():
    # Ranked: neg, pos, pos. P/R after each: (0, 0), (1/2, 1/2), (2/3, 1).
    # Step-wise AP = 1/2 * 1/2 + 1/2 * 2/3 = 7/12; interpolation would give 2/3.
    y = np.array([[0], [1], [1]])
    s = np.array([[0.9], [0.8], [0.7]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # no warning: the class has positives
        assert per_class_table(y, s, ["a"])[0]["AP"] == pytest.approx(7 / 12, **EXACT)


def test_ap_tied_scores_form_one_threshold():
    # 0.9 (pos) then a tie at 0.8 (neg, pos): P/R = (1, 1/2) then (2/3, 1).
    # A tie counts as one step: AP = 1/2 * 1 + 1/2 * 2/3 = 5/6, whatever the order inside.
    y = np.array([1, 0, 1, 0])
    for order in ([0, 1, 2, 3], [0, 2, 1, 3]):
        s = np.array([0.9, 0.8, 0.8, 0.1])
        yy, ss = y[order][:, None], s[order][:, None]
        assert per_class_table(yy, ss, ["a"])[0]["AP"] == pytest.approx(5 / 6, **EXACT)
    # All scores tied: AP is the positive rate.
    y = np.array([[1], [0], [0], [1], [0]])
    assert per_class_table(y, np.full((5, 1), 0.3), ["a"])[0]["AP"] == pytest.approx(0.4)


def test_weighted_and_macro_map_by_hand():
    # Class 0: one positive ranked first -> AP 1. Class 1: ranked neg, pos, pos -> AP 7/12.
    y = np.array([[1, 0], [0, 1], [0, 1]])
    s = np.array([[0.9, 0.9], [0.2, 0.8], [0.1, 0.7]])
    m = multilabel_metrics(y, s)
    assert m["mAP_macro"] == pytest.approx((1 + 7 / 12) / 2, **EXACT)
    assert m["mAP_weighted"] == pytest.approx((1 * 1 + 2 * 7 / 12) / 3, **EXACT)
    # Predictions (>= 0.5): class 0 {row 0} -> P 1, R 1; class 1 {rows 0, 1, 2} -> P 2/3, R 1.
    assert m["precision_weighted"] == pytest.approx((1 + 2 * 2 / 3) / 3, **EXACT)
    assert m["recall_weighted"] == pytest.approx(1.0, **EXACT)
    assert m["f1_weighted"] == pytest.approx((1 + 2 * 0.8) / 3, **EXACT)


def test_threshold_is_inclusive():
    y = np.array([[1, 0], [0, 1]])
    s = np.array([[0.5, 0.0], [0.0, 0.49]])
    m = multilabel_metrics(y, s, threshold=0.5)
    assert m["recall_weighted"] == pytest.approx(0.5)   # 0.5 counts, 0.49 does not


def test_class_without_positives_gets_ap_zero_and_warns():
    y = np.array([[1, 0], [0, 0], [1, 0]])
    s = np.array([[0.9, 0.1], [0.1, 0.9], [0.8, 0.2]])
    with pytest.warns(UserWarning, match=r"no positive sample for class indices \[1\]"):
        m = multilabel_metrics(y, s)
    assert m["mAP_weighted"] == pytest.approx(1.0)      # weight 0 for class 1
    assert m["mAP_macro"] == pytest.approx(0.5)         # class 1 counts as AP 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert skm.average_precision_score(y, s, average="macro") == pytest.approx(0.5)


def test_no_positives_at_all():
    y = np.zeros((4, 3), dtype=int)
    s = np.random.default_rng(0).random((4, 3))
    with pytest.warns(UserWarning):
        m = multilabel_metrics(y, s)
    assert m == {"mAP_weighted": 0.0, "mAP_macro": 0.0, "precision_weighted": 0.0,
                 "recall_weighted": 0.0, "f1_weighted": 0.0}


@pytest.mark.parametrize("y, s, match", [
    pytest.param(np.ones((3, 2)), np.ones((3, 3)), "same shape", id="shape"),
    pytest.param(np.full((2, 2), 2), np.ones((2, 2)), "0/1", id="not-binary"),
    pytest.param(np.ones((2, 2)), np.array([[np.nan, 1], [1, 1]]), "NaN", id="nan"),
    pytest.param(np.ones((0, 2)), np.ones((0, 2)), "at least one", id="empty"),
])
def test_multilabel_rejects_bad_input(y, s, match):
    with pytest.raises(ValueError, match=match):
        multilabel_metrics(y, s)


def test_format_table_lists_classes_and_weighted_map():
    y = np.array([[1, 0], [0, 1], [0, 1]])
    s = np.array([[0.9, 0.9], [0.2, 0.8], [0.1, 0.7]])
    rows = per_class_table(y, s, ["Action", "Science Fiction"])
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["class", "support", "AP", "precision", "recall", "f1"]
    assert lines[2].split()[:3] == ["Action", "1", "1.0000"]
    assert lines[3].startswith("Science Fiction")
    weighted = next(line for line in lines if line.startswith("weighted avg"))
    assert f"{multilabel_metrics(y, s)['mAP_weighted']:.4f}" == weighted.split()[3]
    assert weighted.split()[2] == "3"


def test_multiclass_matches_sklearn():
    for seed in range(120):
        rng = np.random.default_rng(1000 + seed)
        n = int(rng.integers(1, 50))
        c = int(rng.integers(3, 15))
        y = rng.integers(0, c, n)
        if seed % 4 == 0:
            scores = rng.integers(0, 3, (n, c)).astype(float)   # many ties
        else:
            scores = rng.random((n, c))
        ours = multiclass_metrics(y, scores)
        labels = np.arange(c)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                      # k >= n_classes warning
            top1 = skm.top_k_accuracy_score(y, scores, k=1, labels=labels)
            top5 = skm.top_k_accuracy_score(y, scores, k=min(5, c), labels=labels)
        assert ours == {"top1": pytest.approx(top1, **EXACT),
                        "top5": pytest.approx(top5, **EXACT)}, seed


def test_topk_ties_favor_higher_class_index():
    scores = np.array([[0.4, 0.4, 0.2], [0.4, 0.4, 0.2]])
    assert multiclass_metrics(np.array([1, 0]), scores)["top1"] == 0.5
    assert skm.top_k_accuracy_score([1, 0], scores, k=1, labels=[0, 1, 2]) == 0.5
    # Six-way tie: top-5 drops the lowest index.
    assert multiclass_metrics(np.array([0, 5]), np.zeros((2, 6)))["top5"] == 0.5


@pytest.mark.parametrize("c", [1, 2, 3, 4, 5])
def test_top5_with_few_classes_is_perfect(c):
    rng = np.random.default_rng(c)
    y = rng.integers(0, c, 20)
    m = multiclass_metrics(y, rng.random((20, c)))
    assert m["top5"] == 1.0
    if c == 1:
        assert m["top1"] == 1.0


def test_two_classes_top1_is_argmax_and_agrees_with_sklearn_binary():
    rng = np.random.default_rng(3)
    p1 = rng.random(40)
    p1[p1 == 0.5] = 0.6
    scores = np.stack([1 - p1, p1], axis=1)                  # softmax-like rows, (40, 2)
    y = rng.integers(0, 2, 40)
    ours = multiclass_metrics(y, scores)["top1"]
    assert ours == pytest.approx(float(np.mean((p1 > 0.5) == y)))
    assert ours == pytest.approx(skm.top_k_accuracy_score(y, p1, k=1, labels=[0, 1]))


@pytest.mark.parametrize("y, s, match", [
    pytest.param(np.array([0, 3]), np.ones((2, 3)), "out of range", id="index"),
    pytest.param(np.array([0, 1]), np.ones((3, 3)), r"\(N, C\)", id="length"),
    pytest.param(np.array([0.5, 1]), np.ones((2, 3)), "integer", id="fractional"),
    pytest.param(np.array([0, 1]), np.array([[np.inf, 0], [0, 1]]), "NaN", id="inf"),
])
def test_multiclass_rejects_bad_input(y, s, match):
    with pytest.raises(ValueError, match=match):
        multiclass_metrics(y, s)


def test_regression_matches_sklearn():
    for seed in range(30):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(1, 100))
        y, p = rng.normal(9, 2, n), rng.normal(9, 2, n)
        assert regression_metrics(y, p)["mse"] == pytest.approx(
            skm.mean_squared_error(y, p), **EXACT), seed


def test_regression_by_hand():
    assert regression_metrics([1.0, 2.0, 4.0], [1.0, 3.0, 1.0]) == {"mse": pytest.approx(10 / 3)}
    with pytest.raises(ValueError, match="same non-zero length"):
        regression_metrics([1.0, 2.0], [1.0])


def test_compute_metrics_dispatch_and_primary_metric():
    y = np.array([[1, 0], [0, 1]])
    s = np.array([[0.9, 0.2], [0.3, 0.6]])
    assert compute_metrics("multilabel", y, s) == multilabel_metrics(y, s)
    assert compute_metrics("multiclass", np.array([0, 1]), s) == {"top1": 1.0, "top5": 1.0}
    assert compute_metrics("regression", [1.0, 2.0], [1.0, 1.0]) == {"mse": 0.5}
    assert primary_metric("multilabel") == ("mAP_weighted", True)
    assert primary_metric("multiclass") == ("top1", True)
    assert primary_metric("regression") == ("mse", False)
    for task in ("multilabel", "multiclass", "regression"):
        key, _ = primary_metric(task)
        assert key in compute_metrics(task, *{"multilabel": (y, s),
                                              "multiclass": (np.array([0, 1]), s),
                                              "regression": ([1.0], [2.0])}[task])
    with pytest.raises(ValueError, match="valid tasks: multilabel, multiclass, regression"):
        compute_metrics("ranking", y, s)
    with pytest.raises(ValueError, match="valid tasks"):
        primary_metric("ranking")


def test_runtime_does_not_import_sklearn():
    code = "import sys, vtx.train.metrics; print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
