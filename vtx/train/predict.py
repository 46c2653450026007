"""``vtx predict``: labels for new videos from a trained head, without a cache file.

The features a checkpoint's head needs are extracted with the same stage-1 code
(:func:`vtx.pipeline.extract.extract_video`, one decode pass, the same shot settings and the same
weights identity as the cache it was trained on). ``--explain`` draws the shots as thumbnails
with the CLS attention each received (last layer, averaged over heads).

A video is treated exactly as training treats a cached one: a feature with no rows (a video
without audio, read by a head trained with audio) is stored as zero rows and aligned by
:func:`vtx.train.tokens.align_tokens`, which gives zero tokens for it and a note; a video that
gives the head no token at all cannot be predicted and gets ``error`` (training skips such
videos with a note), as does a video that cannot be decoded.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vtx.errors import UsageError, VideoError
from vtx.features import FULL_FRAME, LEGACY_VIEW, grid_view, parse_feature, parse_identity
from vtx.pipeline.backbones import grid_prep, load_backbones, resolve_device, view_prep
from vtx.pipeline.extract import FrameSettings, VideoFeatures, extract_video
from vtx.pipeline.sampling import FrameSampling
from vtx.pipeline.shots import ShotConfig
from vtx.progress import progress as progress_bar
from vtx.train.dataset import subsample_indices
from vtx.train.tokens import align_tokens


@dataclass
class PredictConfig:
    videos: tuple[Path, ...]
    model: Path
    device: str = "auto"
    precision: str = "auto"  # backbone precision, as vtx extract --precision
    top_k: int = 5
    explain: Path | None = None
    weights_dir: Path | None = None
    progress: bool = True  # a bar over the videos (vtx.progress); --quiet is False


@dataclass
class Prediction:
    video: str
    task: str
    labels: list[tuple[str, float]] = field(default_factory=list)  # (label, probability)
    value: float | None = None  # regression
    attention: list[float] = field(default_factory=list)  # per shot
    shot_times: list[list[float]] = field(default_factory=list)  # [start, end) s per token
    token_index: list[int] = field(default_factory=list)  # shot / sampled-frame index per token
    error: str | None = None
    notes: list[str] = field(default_factory=list)  # e.g. no audio: zero audio tokens

    def to_dict(self) -> dict:
        d = {"video": self.video, "task": self.task}
        if self.notes:
            d["notes"] = list(self.notes)
        if self.error:
            d["error"] = self.error
        elif self.task == "regression":
            d["value"] = self.value
        else:
            d["labels"] = [{"label": n, "probability": round(p, 6)} for n, p in self.labels]
        if self.attention:
            d["attention"] = [round(a, 6) for a in self.attention]
            d["token_times"] = self.shot_times
            d["token_index"] = self.token_index
        return d


def _scores_to_labels(task: str, logits: torch.Tensor, vocab: list[str], top_k: int):
    if task == "multilabel":
        probs = torch.sigmoid(logits)
    else:
        probs = torch.softmax(logits, dim=-1)
    order = torch.argsort(probs, descending=True)[:top_k]
    return [(vocab[i], float(probs[i])) for i in order.tolist()]


def predict(config: PredictConfig, log: Callable[[str], None] | None = None) -> list[Prediction]:
    """Predict every video; a video that cannot be decoded, or gives the head no token, gets
    ``error`` set, not an exception.

    Args:
        log: receives one note per video that needed one, such as zero audio tokens for a video
            without audio (stderr by default).
    """
    from vtx.train.checkpoint import load_checkpoint

    log = log or (lambda msg: print(msg, file=sys.stderr))
    head, ckpt = load_checkpoint(config.model)
    device = resolve_device(config.device)
    head = head.to(device).eval()
    # The features as the cache that trained the head made them: each one's weights identity
    # (torchvision member, random, +pca, +full-frame) picks the weights and the view; one load
    # per (weights, pca, full frame).
    features, groups, views = [], {}, set()
    for name in head.features:
        spec = parse_feature(name)
        identity = ckpt["features"].get(name, {}).get("weights", "")
        member, flags = parse_identity(identity)
        if member is not None:
            spec = spec.with_weights(member.name)
        features.append(spec)
        weights = "random" if "random" in flags else "official"
        groups.setdefault((weights, "pca" in flags, FULL_FRAME in flags), []).append(spec)
        if spec.spatial:
            views.add(grid_view(spec, identity, default=grid_prep(spec.weights).view
                                if spec.kind != "codec" else None))
    backbones = {}
    for (weights, pca, full_frame), specs in groups.items():
        backbones.update(load_backbones(specs, weights, config.weights_dir, device, pca=pca,
                                        full_frame=full_frame, precision=config.precision))
    shot_json, frame_json = ckpt.get("shot_config"), ckpt.get("frame_config")
    shot_config = ShotConfig(**json.loads(shot_json)) if shot_json else ShotConfig()
    settings = FrameSettings(FrameSampling(**json.loads(frame_json)) if frame_json
                             else FrameSampling(), **_grid_settings(head, views))
    out = []
    for video in progress_bar(config.videos, desc="predict", unit="video",
                              enabled=config.progress):
        try:
            feats = extract_video(video, backbones, shot_config, settings=settings,
                                  thumbnails=config.explain is not None, features=features)
        except VideoError as e:
            out.append(Prediction(str(video), ckpt["task"], error=str(e)))
            continue
        try:
            pred = predict_features(head, ckpt, feats, config.top_k, device, video=str(video))
        except NoTokensError as e:
            out.append(Prediction(str(video), ckpt["task"], error=str(e)))
            continue
        pred.video = str(video)
        for note in pred.notes:
            log(f"vtx: note: {video}: {note}")
        out.append(pred)
        if config.explain is not None:
            target = config.explain
            if len(config.videos) > 1:
                target = target.with_name(f"{target.stem}_{Path(video).stem}{target.suffix}")
            render_explanation(target, pred, feats, head.level)
    return out


class NoTokensError(UsageError):
    """A video gives the head no token (training skips such videos)."""


def _grid_settings(head, views: set[str]) -> dict:
    """The codec grids' sizes and view as the head was trained on them (``FrameSettings``
    fields): motion and residual sides from the head's token shapes, the grid view from the
    checkpoint's identities (``legacy``: as vtx computed them before grid views)."""
    out = {}
    if "motion" in head.inputs:
        out["motion_grid"] = int(head.inputs["motion"][-1])
    if "residual" in head.inputs:
        out["residual_size"] = int(head.inputs["residual"][-1])
    view = next(iter(sorted(views - {LEGACY_VIEW})), None)
    if LEGACY_VIEW in views:
        out["legacy_grids"] = True
    if view is not None:
        out["view"] = view_prep(view)
    return out


def head_tokens(head, feats: VideoFeatures, video: str = "",
                notes: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """The head's tokens of one video, aligned exactly as training aligns cache datasets
    (:func:`vtx.train.tokens.align_tokens`), from features extracted in memory.

    Each feature's row level comes from the feature registry (as for a cache without ``level``
    attrs); rows are flattened unless the head declares them shaped (``head.inputs``).
    ``notes`` collects what training notes (a feature without rows gets zero tokens).
    """
    arrays = {**feats.fixed, **feats.features}  # the cache's datasets of this video, in memory
    shapes = {n: w for n, w in head.inputs.items() if not isinstance(w, int)}
    return align_tokens(arrays, tuple(head.features), head.level, shapes=shapes, video=video,
                        notes=notes)


@torch.no_grad()
def predict_features(head, ckpt: dict, feats: VideoFeatures, top_k: int,
                     device: torch.device, video: str = "") -> Prediction:
    """The prediction of one video's extracted features.

    Raises:
        NoTokensError: the video gives the head no token.
    """
    notes: dict[str, int] = {}
    tokens = head_tokens(head, feats, video, notes)
    n = len(next(iter(tokens.values())))
    if n == 0:
        raise NoTokensError(f"the video gives no {head.level} token for this head (training "
                            f"skips such videos); nothing to predict from")
    # The same uniform subsample as training (--max-tokens), e.g. 8 frames for TimeSformer.
    keep = subsample_indices(n, (ckpt.get("train_config") or {}).get("max_tokens"))
    tokens = {name: x[keep] for name, x in tokens.items()}
    n = len(keep)
    batch = {name: torch.from_numpy(np.asarray(x, np.float32))[None].to(device)
             for name, x in tokens.items()}
    batch["mask"] = torch.ones(1, n, dtype=torch.bool, device=device)
    batch["positions"] = torch.as_tensor(keep, dtype=torch.int64, device=device)[None]  # as training
    logits, attn = head(batch, return_attention=True)
    logits = logits[0].float().cpu()
    if head.level == "frame":
        t = feats.fixed["frame_times"]
        ends = np.append(t[1:], feats.attrs.get("duration_s", t[-1]))
        spans = np.stack([t, ends], axis=1)[keep].tolist()
    else:
        spans = feats.shot_times[keep].tolist()
    pred = Prediction(video="", task=ckpt["task"], attention=attn[0].float().cpu().tolist(),
                      shot_times=spans, token_index=[int(i) for i in keep],
                      notes=[what.replace("videos without", "no").replace(" got ", ": ")
                             + ", as in training" for what in notes])
    if ckpt["task"] == "regression":
        pred.value = float(logits[0])
    else:
        pred.labels = _scores_to_labels(ckpt["task"], logits, ckpt["vocab"], top_k)
    return pred


MAX_THUMBNAILS = 32


def render_explanation(path: Path, pred: Prediction, feats: VideoFeatures,
                       level: str = "shot") -> Path:
    """A strip of shot (or frame) thumbnails, each with its CLS attention; the top labels as the
    title. With more than 32 tokens, the 32 most attended are shown, in time order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_thumbs = (feats.frame_thumbnails if level == "frame" else feats.thumbnails) or []
    keep = list(range(len(pred.attention)))  # positions in the head's (subsampled) tokens
    if len(keep) > MAX_THUMBNAILS:
        keep = sorted(np.argsort(pred.attention)[::-1][:MAX_THUMBNAILS].tolist())
    index = pred.token_index or list(range(len(pred.attention)))
    thumbs = [all_thumbs[index[i]] for i in keep]
    n = len(thumbs)
    cols = min(n, 8)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.0 * rows + 0.8), squeeze=False)
    top = max(pred.attention) if pred.attention else 0.0
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(thumbs[i])
        a = pred.attention[keep[i]]
        t0, t1 = pred.shot_times[keep[i]]
        ax.set_title(f"{level} {index[keep[i]]}: {t0:.1f}-{t1:.1f}s", fontsize=8)
        ax.text(0.5, -0.08, f"attention {a:.3f}", transform=ax.transAxes, ha="center",
                va="top", fontsize=9, fontweight="bold" if a == top else "normal",
                color="crimson" if a == top else "black")
    if pred.task == "regression":
        title = f"{Path(pred.video).name}: value {pred.value:.3f}"
    else:
        title = f"{Path(pred.video).name}: " + ", ".join(f"{n} {p:.2f}" for n, p in pred.labels[:3])
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_predictions(preds: list[Prediction]) -> str:
    lines = []
    for p in preds:
        if p.error:
            lines.append(f"{p.video}: failed: {p.error}")
        elif p.task == "regression":
            lines.append(f"{p.video}: {p.value:.4f}")
        else:
            labels = ", ".join(f"{n} ({prob:.2f})" for n, prob in p.labels)
            lines.append(f"{p.video}: {labels}")
    return "\n".join(lines)
