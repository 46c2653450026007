"""Tests for vtx/train: the token dataset over the cache, checkpoints and the training loop.

Most tests use small hand-written caches that follow docs/FORMAT.md (fast, and the features
carry a class-dependent direction plus noise, so heads can learn); one test trains on a cache
written by the real extractor. ``make_cache`` is shared with test_evaluate.py and test_ddp.py.
"""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from vtx.cli.main import cli
from vtx.train.checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from vtx.train.dataset import (
    MissingFeatureError,
    MixedWeightsError,
    NoLabelledVideosError,
    TokenDataset,
    VideoTokens,
    collate,
    load_cache,
    subsample_indices,
)
from vtx.train.labels import load_labels
from vtx.train.run_files import read_records, write_records
from vtx.train.trainer import TrainConfig, build_head_for, param_groups, train_head
from vtx.errors import UsageError

OFFICIAL = {"resnet18": "ResNet18_Weights.IMAGENET1K_V1",
            "r2plus1d": "R2Plus1D_18_Weights.KINETICS400_V1",
            "vit": "ViT_B_16_Weights.IMAGENET1K_V1", "vggish": "vggish", "motion": "codec"}
MODELS = {"resnet18": "resnet18", "r2plus1d": "r2plus1d_18", "vit": "vit_b_16", "vggish": "VGGish",
          "motion": "codec"}
SHOT_CONFIG = json.dumps({"detector": "content", "threshold": 27.0, "min_shot_len": 15,
                          "max_shot_len": None})
MEANPOOL_TINY = {"hidden": 32, "dropout": 0.0}
STAN_TINY = {"d_model": 16, "n_heads": 2, "n_layers": 1, "dropout": 0.1}


def make_cache(folder: Path, *, n_videos: int = 36, task: str = "multilabel", n_classes: int = 3,
               dims: dict | None = None, frame_dims: dict | None = None, audio_dim: int = 0,
               weights: dict | None = None, splits=("train", "val", "test"), seed: int = 0,
               noise: float = 0.6, name: str = "feats.h5") -> tuple[Path, Path, dict]:
    """Write a cache and a label CSV in ``folder``; features carry the label plus noise.

    Layout as docs/FORMAT.md and the frame/audio extractor: shot features (``dims``) have one
    row per shot; frame features (``frame_dims``: a width, or a row shape such as ``(2, 2, 2)``
    for motion-like datasets) one row per sampled frame, aligned on ``frames`` (every 7th
    frame); ``audio_dim`` adds ``vggish`` with ``vggish_times`` (0.96 s examples; video 0 is
    silent, with no rows). Each video's target adds a fixed random direction per class (or a
    multiple of one direction, for regression) to every row.

    Returns:
        ``(cache, labels_csv, {path: target})``.
    """
    rng = np.random.default_rng(seed)
    dims = {"resnet18": 24, "r2plus1d": 20} if dims is None else dims
    shapes = {f: (d,) if isinstance(d, int) else tuple(d) for f, d in (frame_dims or {}).items()}
    weights = {**OFFICIAL, **(weights or {})}
    all_dims = {**dims, **{f: int(np.prod(sh)) for f, sh in shapes.items()}}
    if audio_dim:
        all_dims["vggish"] = audio_dim
    direction = {f: rng.normal(size=(max(n_classes, 1), d)) * 1.5 for f, d in all_dims.items()}
    classes = [f"c{i}" for i in range(n_classes)]
    folder.mkdir(parents=True, exist_ok=True)
    cache, labels = folder / name, folder / "labels.csv"
    truth = {}
    rows = []

    def rows_of(ft, coef, n):
        return coef @ direction[ft][: len(coef)] + noise * rng.normal(size=(n, all_dims[ft]))

    with h5py.File(cache, "w") as f:
        f.attrs["vtx_version"] = "0.1.0"
        f.attrs["schema_version"] = 1
        f.attrs["shot_config"] = SHOT_CONFIG
        f.attrs["features"] = json.dumps({k: weights[k] for k in all_dims}, sort_keys=True)
        videos = f.create_group("videos")
        for v in range(n_videos):
            path = f"clips/v{v:03d}.mp4"
            if task == "multilabel":
                hot = rng.random(n_classes) < 0.45
                if not hot.any():
                    hot[rng.integers(n_classes)] = True
                target = [classes[i] for i in np.flatnonzero(hot)]
                coef = hot.astype(float)
            elif task == "multiclass":
                c = int(rng.integers(n_classes)) if v >= n_classes else v
                target, coef = [classes[c]], np.eye(n_classes)[c]
            else:
                target = float(np.round(rng.uniform(0, 10), 3))
                coef = np.array([target / 5 - 1.0])
            truth[path] = target
            n_shots = int(rng.integers(2, 8))
            cuts = np.sort(rng.choice(np.arange(1, 20 * n_shots), n_shots - 1, replace=False))
            bounds = np.concatenate([[0], cuts, [20 * n_shots]])
            shots = np.stack([bounds[:-1], bounds[1:]], axis=1).astype(np.int64)
            duration = bounds[-1] / 25
            g = videos.create_group(path.replace("/", "%2F"))
            g.attrs.update({"path": path, "size_bytes": 1000 + v, "duration_s": duration,
                            "fps": 25.0, "n_frames": int(bounds[-1]), "n_frames_expected": 0,
                            "width": 64, "height": 48, "codec": "h264", "rotation": 0,
                            "has_audio": bool(audio_dim) and v > 0, "decode_errors": 0,
                            "corrupt_frames": 0})
            g.create_dataset("shots", data=shots)
            g.create_dataset("shot_times", data=shots / 25.0)
            for ft in dims:
                _feature(g, ft, rows_of(ft, coef, n_shots), weights[ft])
            if shapes:
                frames = np.arange(0, bounds[-1], 7, dtype=np.int64)
                g.create_dataset("frames", data=frames)
                g.create_dataset("frame_times", data=frames / 25.0)
                for ft, sh in shapes.items():
                    x = rows_of(ft, coef, len(frames)).reshape(len(frames), *sh)
                    _feature(g, ft, x, weights[ft])
            if audio_dim:
                starts = np.arange(0, duration - 0.96 + 1e-9, 0.96) if v > 0 else np.zeros(0)
                g.create_dataset("vggish_times", data=np.stack([starts, starts + 0.96], axis=1)
                                 .reshape(-1, 2))
                _feature(g, "vggish", rows_of("vggish", coef, len(starts)), weights["vggish"])
            split = splits[v % len(splits)] if splits else None
            value = "|".join(target) if task != "regression" else repr(target)
            rows.append([path, value] + ([split] if split else []))
    with open(labels, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["video", "labels" if task != "regression" else "value"]
                   + (["split"] if splits else []))
        w.writerows(rows)
    return cache, labels, truth


def _feature(g: h5py.Group, name: str, x: np.ndarray, weights: str) -> None:
    ds = g.create_dataset(name, data=x.astype(np.float16))
    ds.attrs.update({"model": MODELS.get(name, name), "weights": weights,
                     "weights_file": "" if weights in ("random", "codec") else f"{name}-0000.pth",
                     "dim": int(np.prod(x.shape[1:])), "sampling": "synthetic",
                     "dtype": "float16"})


def config(cache, labels, out, head="meanpool", **kw) -> TrainConfig:
    """A fast CPU TrainConfig."""
    opts = kw.pop("head_options", MEANPOOL_TINY if head == "meanpool" else STAN_TINY)
    base = dict(epochs=8, batch_size=8, lr=3e-3, warmup_epochs=1, patience=50, device="cpu",
                seed=0, amp=False)
    base.update(kw)
    return TrainConfig(head=head, features=cache, labels=labels, out=out, head_options=opts, **base)


def quiet(msg: str) -> None:
    pass


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny heads run faster (and steadier on a shared machine) on one intra-op thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ml_data(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("ml"), task="multilabel")


@pytest.fixture(scope="module")
def ml_run(ml_data, tmp_path_factory):
    """One trained multilabel meanpool run, shared by the checks on its files."""
    cache, labels, _ = ml_data
    out = tmp_path_factory.mktemp("ml_run") / "run"
    cfg = config(cache, labels, out, epochs=10)
    return cfg, train_head(cfg, log=quiet)


# --------------------------------------------------------------------------- dataset


def test_collate_pads_and_masks():
    a = VideoTokens("a", "a.mp4", "a", "train", {"x": np.ones((3, 2), np.float16)},
                    np.zeros(2, np.float32))
    b = VideoTokens("b", "b.mp4", "b", "train", {"x": np.full((5, 2), 2, np.float16)},
                    np.ones(2, np.float32))
    batch = collate([TokenDataset([a, b], ["x"])[i] for i in range(2)])
    assert batch["x"].shape == (2, 5, 2) and batch["x"].dtype == torch.float32
    assert batch["mask"].tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert batch["x"][0, 3:].abs().sum() == 0 and batch["x"][1].eq(2).all()
    assert batch["target"].shape == (2, 2) and batch["index"].tolist() == [0, 1]


@pytest.mark.parametrize("length,cap,expected", [
    pytest.param(5, None, [0, 1, 2, 3, 4], id="no-cap"),
    pytest.param(5, 8, [0, 1, 2, 3, 4], id="short"),
    pytest.param(9, 3, [0, 4, 8], id="ends-kept"),
    pytest.param(10, 4, [0, 3, 6, 9], id="even"),
    pytest.param(7, 1, [3], id="one-middle"),
])
def test_subsample_indices(length, cap, expected):
    assert subsample_indices(length, cap).tolist() == expected


def test_load_cache_matches_labels_splits_and_caps_tokens(ml_data):
    cache, labels_csv, truth = ml_data
    labels = load_labels(labels_csv)
    data = load_cache(cache, labels, ("resnet18", "r2plus1d"), "shot", log=quiet)
    assert len(data.videos) == len(truth)
    assert data.split_sizes() == {"train": 12, "val": 12, "test": 12}
    assert data.dims == {"resnet18": 24, "r2plus1d": 20}
    assert data.feature_attrs["resnet18"]["weights"] == OFFICIAL["resnet18"]
    with h5py.File(cache) as f:
        v = data.videos[0]
        assert np.array_equal(v.tokens["resnet18"], f["videos"][v.key]["resnet18"][()])
        assert v.length == len(f["videos"][v.key]["shots"])
        assert sorted(labels.vocab[i] for i in np.flatnonzero(v.target)) == truth[v.path]
    capped = load_cache(cache, labels, ("resnet18",), "shot", max_tokens=2, log=quiet)
    assert max(v.length for v in capped.videos) == 2
    long = next(i for i, v in enumerate(data.videos) if v.length > 2)
    idx = subsample_indices(data.videos[long].length, 2)
    assert np.array_equal(capped.videos[long].tokens["resnet18"],
                          data.videos[long].tokens["resnet18"][idx])


def _manual_pool(rows, pos, spans, centres):
    """Reference: mean of the rows inside each [a, b) span (first/last span also take rows
    before/after), else the row nearest the span's centre."""
    out = []
    for t, (a, b) in enumerate(spans):
        inside = (pos >= a) & (pos < b)
        if t == 0:
            inside |= pos < a
        if t == len(spans) - 1:
            inside |= pos >= b
        out.append(rows[inside].mean(0) if inside.any()
                   else rows[np.argmin(np.abs(pos - centres[t]))])
    return np.array(out)


def _manual_overlap(rows, times, spans):
    """Reference: mean of the rows whose [start, end) overlaps each span, else the nearest."""
    out = []
    for a, b in spans:
        hit = [i for i, (s, e) in enumerate(times) if s < b and e > a]
        out.append(rows[hit].mean(0) if hit
                   else rows[np.argmin(np.abs(times.mean(1) - (a + b) / 2))])
    return np.array(out)


def _manual_cover(rows, times, at):
    """Reference: the row covering each time (latest start), else the nearest by centre."""
    out = []
    for t in at:
        cover = [i for i, (s, e) in enumerate(times) if s <= t < e]
        out.append(rows[cover[-1]] if cover else rows[np.argmin(np.abs(times.mean(1) - t))])
    return np.array(out)


def test_frame_and_audio_rows_align_on_the_heads_tokens(tmp_path):
    cache, labels_csv, _ = make_cache(tmp_path, n_videos=6, frame_dims={"vit": 16,
                                      "motion": (2, 2, 2)}, audio_dim=8)
    labels = load_labels(labels_csv)
    notes = []
    frame = load_cache(cache, labels, ("vit", "motion", "vggish"), "frame", log=notes.append)
    shot = load_cache(cache, labels, ("resnet18", "vit", "vggish"), "shot", log=quiet)
    assert frame.dims == {"vit": 16, "motion": 8, "vggish": 8}
    assert any("1 videos without vggish rows" in n for n in notes)
    with h5py.File(cache) as f:
        for vf, vs in zip(frame.videos, shot.videos):
            g = f["videos"][vf.key]
            frames, ftimes = g["frames"][()], g["frame_times"][()]
            shots, stimes = g["shots"][()], g["shot_times"][()]
            assert vf.length == len(frames) and vs.length == len(shots)
            assert np.array_equal(vf.tokens["vit"], g["vit"][()])
            assert np.array_equal(vf.tokens["motion"], g["motion"][()].reshape(len(frames), 8))
            vit = g["vit"][()].astype(np.float64)
            want = _manual_pool(vit, frames, shots, (shots[:, 0] + shots[:, 1] - 1) / 2)
            np.testing.assert_allclose(vs.tokens["vit"], want, rtol=2e-3, atol=2e-3)
            audio, atimes = g["vggish"][()].astype(np.float64), g["vggish_times"][()]
            if len(audio) == 0:                                  # silent video: zero tokens
                assert not vs.tokens["vggish"].any() and not vf.tokens["vggish"].any()
                continue
            want = _manual_overlap(audio, atimes, stimes)
            np.testing.assert_allclose(vs.tokens["vggish"], want, rtol=2e-3, atol=2e-3)
            assert np.array_equal(vf.tokens["vggish"], _manual_cover(g["vggish"][()], atimes,
                                                                     ftimes))
    # a frame-level head cannot read shot rows
    with pytest.raises(UsageError, match="'resnet18' is a shot-level feature"):
        load_cache(cache, labels, ("resnet18",), "frame", log=quiet)


def test_frame_level_heads_train(tmp_path):
    cache, labels, _ = make_cache(tmp_path, n_videos=12, frame_dims={"vit": 16}, audio_dim=8)
    vtn = config(cache, labels, tmp_path / "vtn", head="vtn", epochs=2,
                 head_options={"d_model": 16, "n_heads": 2, "n_layers": 1, "window": 4})
    assert train_head(vtn, log=quiet).epochs_run == 2
    stan = config(cache, labels, tmp_path / "stan", head="stan", epochs=1,
                  head_options={**STAN_TINY, "audio": True})
    train_head(stan, log=quiet)
    ckpt = read_checkpoint(tmp_path / "stan" / "best.pt")
    assert ckpt["head_config"]["vggish_dim"] == 8 and set(ckpt["features"]) == {
        "resnet18", "r2plus1d", "vggish"}
    vtn_ckpt = read_checkpoint(tmp_path / "vtn" / "best.pt")
    assert vtn_ckpt["level"] == "frame" and vtn_ckpt["head_config"]["feature_dim"] == 16


def test_missing_feature_is_refused_with_the_extract_command(tmp_path):
    cache, labels, _ = make_cache(tmp_path, n_videos=4, dims={"resnet18": 8})
    with pytest.raises(MissingFeatureError) as e:
        train_head(config(cache, labels, tmp_path / "run", head="stan"), log=quiet)
    msg = str(e.value)
    assert "feature 'r2plus1d' is missing from all 4 labelled videos" in msg
    assert str(cache) in msg
    assert f"vtx extract --videos DIR --out {cache} --features resnet18,r2plus1d" in msg
    assert "computes only the missing feature" in msg
    assert e.value.exit_code == 2


@pytest.mark.filterwarnings("ignore:no positive sample")
def test_random_and_official_weights_are_not_mixed(tmp_path):
    cache, labels, _ = make_cache(tmp_path, n_videos=4, weights={"resnet18": "random"})
    with pytest.raises(MixedWeightsError) as e:
        train_head(config(cache, labels, tmp_path / "run"), log=quiet)
    assert "resnet18 (random)" in str(e.value) and "mix random and official" in str(e.value)
    # one kind of weights alone is fine, and weight-free (codec) features go with either kind
    cache, labels, _ = make_cache(tmp_path / "codec", n_videos=4, frame_dims={"motion": (2, 2)},
                                  weights={"resnet18": "random"})
    cfg = config(cache, labels, tmp_path / "ok", epochs=1,
                 head_options={**MEANPOOL_TINY, "features": ["resnet18", "motion"]})
    assert train_head(cfg, log=quiet).epochs_run == 1


def test_no_labelled_video_lists_paths_and_keys(tmp_path):
    cache, _, _ = make_cache(tmp_path, n_videos=3)
    other = tmp_path / "other.csv"
    other.write_text("video,labels\nsomething_else.mp4,c0\nzzz,c1\n")
    with pytest.raises(NoLabelledVideosError) as e:
        train_head(config(cache, other, tmp_path / "run"), log=quiet)
    assert "clips/v000.mp4" in str(e.value) and "something_else.mp4" in str(e.value)


# --------------------------------------------------------------------------- training


def test_training_learns_and_writes_one_line_per_epoch(ml_run):
    cfg, result = ml_run
    lines = [json.loads(x) for x in (cfg.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, 11)) and result.epochs_run == 10
    for r in lines:
        assert {"epoch", "lr", "train_loss", "val_loss", "val_mAP_weighted", "val_f1_weighted",
                "best", "seconds"} <= set(r) and r["seconds"] >= 0
    assert lines[-1]["train_loss"] < 0.6 * lines[0]["train_loss"]
    # chance mAP is the positive rate (~0.45); the features make the task easy
    assert result.best_metric > 0.85 and result.metric == "val_mAP_weighted"
    assert result.best_metric == max(r["val_mAP_weighted"] for r in lines)
    best_epochs = [r["epoch"] for r in lines if r["best"]]
    assert best_epochs[-1] == result.best_epoch
    lrs = [r["lr"] for r in lines]
    assert lrs[0] == pytest.approx(cfg.lr)              # end of the 1-epoch warm-up
    assert all(a > b for a, b in zip(lrs, lrs[1:]))     # then cosine decay
    assert lrs[-1] < 0.05 * cfg.lr
    assert (cfg.out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoints_follow_the_contract(ml_run):
    cfg, result = ml_run
    best = read_checkpoint(result.best_path)
    last = read_checkpoint(cfg.out / "last.pt")
    keys = {"format", "version", "vtx_version", "head", "head_config", "state_dict", "task",
            "vocab", "level", "features", "shot_config", "frame_config", "epoch", "metrics",
            "train_config", "optimizer", "scheduler", "best_metric", "rng"}
    assert set(best) == keys and set(last) == keys
    assert best["format"] == "vtx-head" and best["version"] == 1
    assert best["head"] == "meanpool" and best["task"] == "multilabel"
    assert best["vocab"] == ["c0", "c1", "c2"] and best["level"] == "shot"
    assert best["head_config"]["n_outputs"] == 3
    assert best["head_config"]["feature_dims"] == {"resnet18": 24, "r2plus1d": 20}
    assert best["features"]["resnet18"] == {
        "model": "resnet18", "weights": OFFICIAL["resnet18"], "weights_file": "resnet18-0000.pth",
        "dim": 24, "sampling": "synthetic"}
    assert best["shot_config"] == SHOT_CONFIG and best["frame_config"] is None
    assert best["epoch"] == result.best_epoch and last["epoch"] == 10
    assert best["metrics"]["mAP_weighted"] == pytest.approx(result.best_metric)
    assert best["best_metric"] == pytest.approx(result.best_metric)
    assert best["train_config"]["head"] == "meanpool" and best["train_config"]["lr"] == cfg.lr
    assert best["train_config"]["features"] == str(cfg.features)
    assert {"state", "param_groups"} <= set(last["optimizer"])
    assert last["scheduler"]["last_epoch"] == 10 * 2  # 12 train videos / batch 8 = 2 steps
    assert {"python", "numpy", "torch"} <= set(last["rng"])
    head, ckpt = load_checkpoint(result.best_path)
    assert not head.training
    for k, v in head.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][k])
    # the best epoch's weights reproduce its metric
    from vtx.train.evaluate import evaluate_run
    ev = evaluate_run(result.best_path, cfg.features, cfg.labels, split="val", device="cpu")
    assert ev["mAP_weighted"] == pytest.approx(result.best_metric, abs=1e-6)


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file at all")
    with pytest.raises(CheckpointError, match="not a vtx head checkpoint"):
        load_checkpoint(bad)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a vtx head checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


class _Stop(Exception):
    pass


def test_resume_continues_and_matches_an_uninterrupted_run(ml_data, tmp_path):
    cache, labels, _ = ml_data
    full = config(cache, labels, tmp_path / "full", head="stan", epochs=4)
    train_head(full, log=quiet)

    part = replace(full, out=tmp_path / "part")

    def stop_after_2(record):
        if record["epoch"] == 2:
            raise _Stop

    with pytest.raises(_Stop):
        train_head(part, log=quiet, on_epoch_end=stop_after_2)
    assert read_checkpoint(part.out / "last.pt")["epoch"] == 2
    with pytest.raises(UsageError, match="already holds a run"):
        train_head(part, log=quiet)
    logs = []
    result = train_head(replace(part, resume=True), log=logs.append)
    assert any("resuming" in m and "after epoch 2" in m for m in logs)
    assert result.epochs_run == 4

    a, b = read_checkpoint(full.out / "last.pt"), read_checkpoint(part.out / "last.pt")
    assert a["epoch"] == b["epoch"] == 4
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    la = [json.loads(x) for x in (full.out / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (part.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lb] == [1, 2, 3, 4]
    assert [r["train_loss"] for r in la] == [r["train_loss"] for r in lb]

    # a finished run resumes to a no-op; other settings are refused
    assert train_head(replace(part, resume=True), log=quiet).epochs_run == 4
    changed = replace(part, resume=True, head_options={**STAN_TINY, "n_layers": 2})
    with pytest.raises(UsageError, match="cannot resume .*head_options"):
        train_head(changed, log=quiet)
    with pytest.raises(UsageError, match="nothing to resume"):
        train_head(replace(part, out=tmp_path / "none", resume=True), log=quiet)


@pytest.mark.parametrize("task,head,metric", [
    pytest.param("multiclass", "meanpool", "val_top1", id="multiclass-meanpool"),
    pytest.param("regression", "lstm", "val_mse", id="regression-lstm"),
])
def test_other_tasks_learn(tmp_path, task, head, metric):
    cache, labels, _ = make_cache(tmp_path, task=task, n_classes=4, n_videos=48, noise=0.4)
    opts = {"hidden": 32, "dropout": 0.0}
    cfg = config(cache, labels, tmp_path / "run", head=head, epochs=10, lr=1e-2,
                 head_options=opts)
    result = train_head(cfg, log=quiet)
    lines = [json.loads(x) for x in (cfg.out / "metrics.jsonl").read_text().splitlines()]
    assert result.metric == metric
    assert lines[-1]["train_loss"] < 0.6 * lines[0]["train_loss"]
    if task == "multiclass":
        assert result.best_metric >= 0.6                    # chance 0.25
        assert read_checkpoint(result.best_path)["head_config"]["n_outputs"] == 4
    else:
        values = np.array([r for r in load_labels(labels).targets.values()])
        assert result.best_metric < 0.5 * values.var()      # better than predicting the mean
        assert read_checkpoint(result.best_path)["head_config"]["n_outputs"] == 1


def test_without_val_split_selects_on_train_loss(tmp_path):
    cache, labels, _ = make_cache(tmp_path, n_videos=8, splits=("train",))
    logs = []
    result = train_head(config(cache, labels, tmp_path / "run", epochs=2), log=logs.append)
    assert any("no validation videos" in m for m in logs)
    assert result.metric == "train_loss"
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result.best_metric == min(r["train_loss"] for r in lines)
    assert all(r["val_loss"] is None for r in lines)


def test_early_stopping(ml_data, tmp_path):
    cache, labels, _ = ml_data
    # a learning rate too small to change the val metric: no improvement after epoch 1
    result = train_head(config(cache, labels, tmp_path / "run", epochs=20, lr=1e-12, patience=2),
                        log=quiet)
    assert result.stopped_early and result.epochs_run == 3 and result.best_epoch == 1


def test_deterministic_on_cpu(ml_data, tmp_path):
    cache, labels, _ = ml_data
    r1 = train_head(config(cache, labels, tmp_path / "a", head="stan", epochs=2), log=quiet)
    r2 = train_head(config(cache, labels, tmp_path / "b", head="stan", epochs=2), log=quiet)
    a, b = read_checkpoint(r1.best_path), read_checkpoint(r2.best_path)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    r3 = train_head(config(cache, labels, tmp_path / "c", head="stan", epochs=2, seed=1), log=quiet)
    c = read_checkpoint(r3.best_path)
    assert not all(torch.equal(a["state_dict"][k], c["state_dict"][k]) for k in a["state_dict"])


def test_param_groups_decay_matrices_but_not_biases_norms_or_class_tokens():
    head = build_head_for("stan", 3, {"resnet18": 24, "r2plus1d": 20}, STAN_TINY)
    decay, no_decay = param_groups(head, 0.05)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    named = list(head.named_parameters())
    cls = {n for n, _ in named if n.startswith("cls.")}  # STAN's class tokens, (1, 1, d) each
    assert cls and all(p.ndim == 3 for n, p in named if n in cls)
    assert head.no_weight_decay() == cls
    want_decay = [p for n, p in named if p.ndim >= 2 and n not in cls]
    want_rest = [p for n, p in named if not (p.ndim >= 2 and n not in cls)]
    assert any(p.ndim == 1 for p in want_rest) and want_decay
    # every parameter exactly once, in named_parameters order
    assert [id(p) for p in decay["params"]] == [id(p) for p in want_decay]
    assert [id(p) for p in no_decay["params"]] == [id(p) for p in want_rest]


@pytest.mark.parametrize("name,options,field,want", [
    pytest.param("stan", STAN_TINY, "r2plus1d_dim", 20, id="stan-per-feature-field"),
    pytest.param("meanpool", MEANPOOL_TINY, "feature_dims", {"resnet18": 24, "r2plus1d": 20},
                 id="baseline-dict"),
    pytest.param("vtn", {"feature": "resnet18"}, "feature_dim", 24, id="vtn-its-feature"),
])
def test_build_head_for_takes_widths_from_the_cache(name, options, field, want):
    head = build_head_for(name, 2, {"resnet18": 24, "r2plus1d": 20, "vggish": 7}, options)
    assert getattr(head.config, field) == want and head.config.n_outputs == 2
    with pytest.raises(UsageError, match=r"reads \['r2plus1d'\], but the widths given"):
        build_head_for("stan", 2, {"resnet18": 24}, STAN_TINY)


def test_metrics_records_read_back_up_to_an_epoch(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_records(path, 5) == []
    records = [{"epoch": e, "train_loss": 1.0 / e, "best": e == 2} for e in (1, 2, 3)]
    write_records(path, records)
    assert read_records(path, 2) == records[:2]   # what a resume from last.pt at epoch 2 keeps
    assert read_records(path, 9) == records
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left


# --------------------------------------------------------------------------- CLI


def _cli(args):
    return CliRunner().invoke(cli, args)


def test_cli_train_head_maps_head_options(ml_data, tmp_path):
    cache, labels, _ = ml_data
    out = tmp_path / "run"
    r = _cli(["train-head", "stan", "--features", str(cache), "--labels", str(labels),
              "--out", str(out), "--epochs", "1", "--device", "cpu", "--d-model", "16",
              "--heads", "2", "--layers", "1", "--lambda", "0.3", "--fusion", "gated",
              "--streams", "both", "--dropout", "0.0", "--set", "mlp_ratio=2", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["epochs_run"] == 1 and summary["best_path"] == str(out / "best.pt")
    hc = read_checkpoint(out / "best.pt")["head_config"]
    assert (hc["lam"], hc["fusion"], hc["n_layers"], hc["n_heads"], hc["d_model"],
            hc["mlp_ratio"], hc["dropout"]) == (0.3, "gated", 1, 2, 16, 2, 0.0)
    assert hc["resnet18_dim"] == 24 and hc["r2plus1d_dim"] == 20


@pytest.mark.parametrize("args,message", [
    pytest.param(["meanpool", "--window", "8"], "head 'meanpool' has no option --window; "
                 "its options are: --dropout, --set features=...", id="window-for-meanpool"),
    pytest.param(["meanpool", "--lambda", "0.5"], "has no option --lambda", id="lambda"),
    pytest.param(["vtn", "--streams", "both"], "head 'vtn' has no option --streams", id="streams"),
    pytest.param(["stan", "--set", "hidden=3"], "head 'stan' has no config field 'hidden'",
                 id="set-unknown"),
    pytest.param(["stan", "--set", "oops"], "expected KEY=VALUE", id="set-malformed"),
    pytest.param(["stan", "--layers", "1", "--set", "n_layers=2"], "given twice", id="twice"),
    pytest.param(["nope"], "unknown head 'nope'; valid heads are 'lstm', 'meanpool'",
                 id="unknown-head"),
    pytest.param(["stan", "--set", "n_heads=3"], "divisible", id="invalid-value"),
])
def test_cli_head_option_errors(ml_data, tmp_path, args, message):
    cache, labels, _ = ml_data
    r = _cli(["train-head", *args, "--features", str(cache), "--labels", str(labels),
              "--out", str(tmp_path / "run"), "--epochs", "1", "--device", "cpu"])
    assert r.exit_code == 2, r.output
    assert "vtx: error:" in r.stderr and message in r.stderr, r.stderr


def test_train_head_help_documents_options_and_exit_codes():
    r = _cli(["train-head", "--help"])
    assert r.exit_code == 0
    for opt in ("--features", "--labels", "--out", "--epochs", "--batch-size", "--lr",
                "--weight-decay", "--warmup-epochs", "--patience", "--device", "--seed",
                "--task", "--val-frac", "--max-tokens", "--resume", "--json", "--streams",
                "--fusion", "--lambda", "--audio", "--window", "--pos", "--layers",
                "--d-model", "--heads", "--dropout", "--set"):
        assert opt in r.output, opt
    assert "Exit codes:" in r.output and "2  bad usage" in r.output


@pytest.mark.filterwarnings("ignore:no positive sample")
def test_real_extracted_cache_end_to_end(synth_dir, tmp_path):
    """The real extractor's cache (random weights) through train-head and evaluate."""
    from vtx.pipeline.extract import ExtractConfig, extract

    cache = tmp_path / "feats.h5"
    summary = extract(ExtractConfig(videos=synth_dir, out=cache, weights="random", device="cpu",
                                    progress=False, features=("resnet18", "r2plus1d")),
                      log=quiet)
    assert summary.failed == 0
    labels = tmp_path / "labels.csv"
    labels.write_text("video,labels,split\na.mp4,x|y,train\nsub/b.mp4,y,train\nc,x,val\n")
    out = tmp_path / "run"
    r = _cli(["train-head", "meanpool", "--features", str(cache), "--labels", str(labels),
              "--out", str(out), "--epochs", "2", "--device", "cpu", "--set", "hidden=16",
              "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["epochs_run"] == 2
    ckpt = read_checkpoint(out / "best.pt")
    assert ckpt["features"]["r2plus1d"]["weights"] == "random"
    assert ckpt["features"]["resnet18"]["dim"] == 512
    assert json.loads(ckpt["shot_config"])["detector"] == "content"
    r = _cli(["evaluate", str(out), "--features", str(cache), "--labels", str(labels),
              "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["split"] == "val" and result["n_videos"] == 1   # no test split: falls back
    assert "no labelled video" in r.stderr and "'val' split instead" in r.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (Linux, root only; skips elsewhere): room for one small checkpoint."""
    from conftest import mounted_tmpfs

    with mounted_tmpfs(tmp_path / "disk", "64k") as mnt:
        yield mnt


def test_a_full_disk_while_saving_a_checkpoint_is_a_disk_full_error(ml_data, ml_run, small_disk):
    # PyTorch's writer turns ENOSPC into RuntimeError("... unexpected pos ..."); the checkpoint
    # writer gives the full disk back as OSError(ENOSPC), the checkpoint already there stays
    # whole, and train-head ends with vtx's one-line error and exit code 5.
    import errno

    from vtx.train.checkpoint import save_checkpoint

    import shutil

    cfg, result = ml_run
    assert 32 << 10 < result.best_path.stat().st_size < 64 << 10  # one fits here, two do not
    head, ckpt = load_checkpoint(result.best_path)
    kw = dict(head=head, task=ckpt["task"], vocab=ckpt["vocab"], features=ckpt["features"])
    first = save_checkpoint(small_disk / "best.pt", **kw)
    room = shutil.disk_usage(small_disk).free - first.stat().st_size // 2
    (small_disk / "filler").write_bytes(b"\0" * max(0, room))  # half a checkpoint left
    with pytest.raises(OSError) as e:
        save_checkpoint(small_disk / "last.pt", **kw)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(small_disk / "last.pt")
    assert sorted(p.name for p in small_disk.iterdir()) == ["best.pt", "filler"]  # no tmp left
    for k, v in load_checkpoint(first)[0].state_dict().items():  # the one there stays whole
        assert torch.equal(v, ckpt["state_dict"][k])
    first.unlink()
    (small_disk / "filler").unlink()
    cache, labels, _ = ml_data
    r = _cli(["train-head", "meanpool", "--features", str(cache), "--labels", str(labels),
              "--out", str(small_disk / "run"), "--epochs", "3", "--device", "cpu",
              "--set", "hidden=32"])
    assert r.exit_code == 5, r.output
    assert "Traceback" not in r.output and "unexpected pos" not in r.output
    assert "vtx: error: no space left on the device writing" in r.stderr, r.stderr
    assert ".pt" in r.stderr  # a checkpoint was the write that failed
    assert not [p for p in (small_disk / "run").iterdir() if ".tmp" in p.name]
