"""Tests for vtx/train/evaluate.py and ``vtx evaluate``: metrics per task, recomputed with
scikit-learn from the predictions CSV, the CSV's columns, split fallback and refusals."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.metrics import (
    average_precision_score,
    mean_squared_error,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from test_train import config, make_cache, quiet
from vtx.cli.main import cli
from vtx.errors import UsageError
from vtx.train.checkpoint import CheckpointError
from vtx.train.evaluate import evaluate_run
from vtx.train.labels import load_labels
from vtx.train.trainer import train_head

KEYS = {
    "multilabel": {"mAP_weighted", "mAP_macro", "precision_weighted", "recall_weighted",
                   "f1_weighted"},
    "multiclass": {"top1", "top5"},
    "regression": {"mse"},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=["multilabel", "multiclass", "regression"])
def run(request, tmp_path_factory):
    """A short training run per task: (task, cache, labels, run folder)."""
    task = request.param
    folder = tmp_path_factory.mktemp(task)
    n_classes = 7 if task == "multiclass" else 3   # top5 differs from top1 with 7 classes
    cache, labels, _ = make_cache(folder, task=task, n_classes=n_classes, n_videos=30)
    out = folder / "run"
    train_head(config(cache, labels, out, epochs=3), log=quiet)
    return task, cache, labels, out


def _read_csv(path):
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def test_evaluate_json_matches_sklearn_on_the_predictions_csv(run, tmp_path):
    task, cache, labels, out = run
    preds = tmp_path / "preds.csv"
    r = CliRunner().invoke(cli, ["evaluate", str(out), "--features", str(cache), "--labels",
                                 str(labels), "--predictions-out", str(preds), "--json",
                                 "--device", "cpu"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert KEYS[task] <= set(result)
    assert not (set().union(*KEYS.values()) - KEYS[task]) & set(result)
    assert result["split"] == "test" and result["task"] == task

    # independent recomputation from the CSV and the label file
    header, rows = _read_csv(preds)
    ls = load_labels(labels, task=task)
    test_videos = [k for k, s in ls.splits.items() if s == "test"]
    assert sorted(r[0] for r in rows) == sorted(test_videos) and result["n_videos"] == len(rows)
    scores = np.array([[float(v) for v in r[1:]] for r in rows])
    if task == "regression":
        assert header == ["video", "value"]
        y = np.array([ls.targets[r[0]] for r in rows])
        assert result["mse"] == pytest.approx(mean_squared_error(y, scores[:, 0]), rel=1e-9)
    elif task == "multiclass":
        assert header == ["video", *ls.vocab]
        np.testing.assert_allclose(scores.sum(1), 1.0, atol=1e-5)       # softmax
        y = np.array([ls.vocab.index(ls.targets[r[0]]) for r in rows])
        labels_range = list(range(len(ls.vocab)))
        assert result["top1"] == pytest.approx(
            top_k_accuracy_score(y, scores, k=1, labels=labels_range))
        assert result["top5"] == pytest.approx(
            top_k_accuracy_score(y, scores, k=5, labels=labels_range))
    else:
        assert header == ["video", *ls.vocab]
        assert ((scores > 0) & (scores < 1)).all()                      # sigmoid
        y = np.array([[int(c in ls.targets[r[0]]) for c in ls.vocab] for r in rows])
        assert result["mAP_weighted"] == pytest.approx(
            average_precision_score(y, scores, average="weighted"), rel=1e-9)
        assert result["mAP_macro"] == pytest.approx(
            average_precision_score(y, scores, average="macro"), rel=1e-9)
        p, rc, f1, _ = precision_recall_fscore_support(y, scores >= 0.5, average="weighted",
                                                       zero_division=0)
        assert (result["precision_weighted"], result["recall_weighted"],
                result["f1_weighted"]) == pytest.approx((p, rc, f1), rel=1e-9)
        assert [row["class"] for row in result["per_class"]] == ls.vocab


def test_evaluate_text_mode_prints_the_per_class_table(run):
    task, cache, labels, out = run
    r = CliRunner().invoke(cli, ["evaluate", str(out / "best.pt"), "--features", str(cache),
                                 "--labels", str(labels), "--split", "val", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    first = r.stdout.splitlines()[0]
    assert "best.pt" in first and "val videos" in first
    for key in KEYS[task]:
        assert f"{key} " in first
    if task == "multilabel":
        assert "weighted avg" in r.stdout and "c0" in r.stdout and "precision" in r.stdout
    else:
        assert "weighted avg" not in r.stdout


def test_splits_all_and_fallback(run, tmp_path):
    task, cache, labels, out = run
    everything = evaluate_run(out, cache, labels, split="all", device="cpu", log=quiet)
    assert everything["n_videos"] == 30
    # a label file without test rows: --split test falls back to val and says so
    no_test = tmp_path / "labels.csv"
    lines = labels.read_text().splitlines()
    no_test.write_text("\n".join(line for line in lines if not line.endswith(",test")) + "\n")
    logs = []
    res = evaluate_run(out, cache, no_test, split="test", device="cpu", log=logs.append)
    assert res["split"] == "val" and res["requested_split"] == "test" and res["n_videos"] == 10
    assert any("evaluating the 'val' split instead" in m for m in logs)
    with pytest.raises(UsageError, match="unknown split"):
        evaluate_run(out, cache, labels, split="nope", device="cpu")


@pytest.mark.parametrize("make,message", [
    pytest.param(lambda p: p.write_bytes(b"garbage"), "not a vtx head checkpoint", id="garbage"),
    pytest.param(lambda p: torch.save({"a": 1}, p), "not a vtx head checkpoint", id="other-dict"),
    pytest.param(lambda p: p.mkdir(), "has no best.pt", id="empty-folder"),
])
def test_evaluate_refuses_what_is_not_a_checkpoint(tmp_path, make, message):
    target = tmp_path / "x.pt"
    make(target)
    cache, labels, _ = make_cache(tmp_path / "c", n_videos=3)
    with pytest.raises(CheckpointError, match=message):
        evaluate_run(target, cache, labels, device="cpu")
    r = CliRunner().invoke(cli, ["evaluate", str(target), "--features", str(cache),
                                 "--labels", str(labels)])
    assert r.exit_code == 2 and "vtx: error:" in r.stderr and message in r.stderr


def test_evaluate_refuses_features_made_with_other_weights(tmp_path):
    cache, labels, _ = make_cache(tmp_path / "official", n_videos=6)
    out = tmp_path / "run"
    train_head(config(cache, labels, out, epochs=1), log=quiet)
    other, _, _ = make_cache(tmp_path / "random", n_videos=6,
                             weights={"resnet18": "random", "r2plus1d": "random"})
    with pytest.raises(UsageError, match=r"resnet18\.weights: checkpoint 'ResNet18_Weights"):
        evaluate_run(out, other, labels, device="cpu")


def test_evaluate_help_documents_exit_codes():
    r = CliRunner().invoke(cli, ["evaluate", "--help"])
    assert r.exit_code == 0
    for opt in ("--features", "--labels", "--split", "--predictions-out", "--json"):
        assert opt in r.output
    assert "Exit codes:" in r.output and "2  bad usage" in r.output


def test_videos_without_a_positive_class_train_and_evaluate(tmp_path):
    """Rows with an empty labels field (``clip.mp4,,train``) are all-negative targets: training
    keeps them, and evaluate's metrics on them are scikit-learn's, a class with no positive in
    the split included."""
    cache, labels, _ = make_cache(tmp_path, task="multilabel", n_videos=24, n_classes=3)
    with open(labels, newline="") as fh:
        header, *rows = list(csv.reader(fh))
    for i, row in enumerate(rows):
        if i % 4 == 0:
            row[1] = ""                                       # no class applies
        elif row[2] == "test":
            row[1] = "|".join(c for c in row[1].split("|") if c != "c2") or "c0"
    with open(labels, "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    out = tmp_path / "run"
    logs = []
    train_head(config(cache, labels, out, epochs=2), log=logs.append)
    assert "24 labelled videos" in " ".join(logs)             # none dropped
    preds = tmp_path / "preds.csv"
    with pytest.warns(UserWarning, match=r"no positive sample for class indices \[2\]"):
        result = evaluate_run(out, cache, labels, split="test", predictions_out=preds,
                              device="cpu", log=quiet)
    ls = load_labels(labels)
    _, pred_rows = _read_csv(preds)
    y = np.array([[int(c in ls.targets[r[0]]) for c in ls.vocab] for r in pred_rows])
    assert (y.sum(1) == 0).any() and y[:, 2].sum() == 0
    scores = np.array([[float(v) for v in r[1:]] for r in pred_rows])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert result["mAP_weighted"] == pytest.approx(
            average_precision_score(y, scores, average="weighted"), rel=1e-9)
        assert result["mAP_macro"] == pytest.approx(
            average_precision_score(y, scores, average="macro"), rel=1e-9)
        p, rc, f1, _ = precision_recall_fscore_support(y, scores >= 0.5, average="weighted",
                                                       zero_division=0)
    assert (result["precision_weighted"], result["recall_weighted"],
            result["f1_weighted"]) == pytest.approx((p, rc, f1), rel=1e-9)
