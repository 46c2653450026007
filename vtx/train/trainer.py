"""Training loop for the stage-2 heads over cached tokens.

Recipe (STAN, Fish et al. 2022, Section 4; loss per task as in LVU, Wu & Kraehenbuehl 2021):
AdamW, a linear warm-up then a cosine decay (stepped every batch), gradient clipping, fp16
autocast with a GradScaler on CUDA only, and a loss per task: BCE with logits (multi-label
genres), cross-entropy (multi-class) or MSE (regression, one output, whose bias starts at the
mean training target since targets are not standardised). The best epoch is picked
on the validation split's primary metric (:func:`vtx.train.metrics.primary_metric`), with early
stopping after ``patience`` epochs without improvement; without a validation split the training
loss is used instead (and the run says so).

The run folder ``out`` holds, after every epoch:

* ``metrics.jsonl``: one JSON object per epoch: ``epoch``, ``lr`` (of the epoch's last step),
  ``train_loss``, ``val_loss``, ``val_<metric>`` for each validation metric, ``best`` (this
  epoch became ``best.pt``), ``seconds``;
* ``last.pt`` (always) and ``best.pt`` (when the selection metric improves), see
  :mod:`vtx.train.checkpoint`;
* ``learning_curve.png``: losses and the primary metric against the epoch.

``resume=True`` continues from ``last.pt``: weights, optimizer, scheduler, RNG state, the best
metric, and the early-stopping count (from ``best.pt``'s epoch). It refuses when the head, its
options, the cache's features, the labels, the task, the validation fraction or ``max_tokens``
differ from the saved run. Each epoch's shuffling and dropout are seeded from
``(seed, epoch, rank)``, so on the CPU a resumed run ends with the same weights as an
uninterrupted one.

Distributed data parallel: under ``torchrun --nproc_per_node N`` (``WORLD_SIZE > 1``) each
process trains on its shard of a DistributedSampler (gloo on the CPU, nccl on CUDA with one GPU
per process, ``cuda:LOCAL_RANK``); the training loss is averaged over all ranks, and
validation, checkpoints, logs and files are handled by rank 0 alone, which then broadcasts the
early-stopping decision. Validation on rank 0 is exact (no padded duplicates) and cheap, since
heads are small.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from vtx.errors import UsageError
from vtx.heads import build_head, config_class
from vtx.heads.base import input_shape
from vtx.train.checkpoint import (
    get_rng_state,
    read_checkpoint,
    save_checkpoint,
    set_rng_state,
    to_plain,
)
from vtx.train.dataset import CacheData, collate, load_cache
from vtx.train.labels import load_labels
from vtx.train.metrics import compute_metrics, primary_metric

__all__ = ["TrainConfig", "TrainResult", "build_head_for", "head_inputs", "loss_fn", "predict_scores",
           "scores_from_logits", "train_head"]

#: Config fields a resumed run must share with the saved one.
RESUME_MUST_MATCH = ("head", "features", "labels", "task", "val_frac", "max_tokens", "head_options")


@dataclass
class TrainConfig:
    """Options of ``vtx train-head``; the CLI maps its flags one-to-one onto these fields.

    Attributes:
        head: a key of :data:`vtx.heads.HEADS`.
        features: the feature cache (``feats.h5``).
        labels: the label file or LVU task folder.
        out: the run folder.
        epochs: maximum epochs.
        batch_size: videos per step (per process under DDP).
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_epochs: linear warm-up length, then cosine decay to 0 at ``epochs``.
        grad_clip: max gradient norm (0 or None: off).
        patience: stop after this many epochs without a better selection metric.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        seed: seeds initialisation, shuffling and dropout.
        task: ``multilabel``, ``multiclass`` or ``regression``; inferred from the labels if None.
        val_frac: share of videos hashed into ``val`` when the labels give no split.
        max_tokens: cap on tokens per video (uniform subsample); None keeps all.
        resume: continue from ``out/last.pt``.
        amp: fp16 autocast and gradient scaling on CUDA (ignored on the CPU).
        head_options: head config fields (e.g. ``{"n_layers": 1}``); ``n_outputs`` and feature
            widths come from the labels and the cache.
    """

    head: str
    features: Path
    labels: Path
    out: Path
    epochs: int = 30
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_epochs: int = 2
    grad_clip: float | None = 1.0
    patience: int = 10
    device: str = "auto"
    seed: int = 0
    task: str | None = None
    val_frac: float = 0.2
    max_tokens: int | None = None
    resume: bool = False
    amp: bool = True
    head_options: dict = field(default_factory=dict)


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        run_dir: the run folder.
        best_metric: best value of the selection metric.
        metric: its name (``val_mAP_weighted``, ``val_top1``, ``val_mse`` or ``train_loss``).
        best_epoch: the epoch saved as ``best.pt``.
        epochs_run: epochs completed in total (resumed epochs included).
        best_path: ``run_dir / "best.pt"``.
        stopped_early: training stopped on ``patience``.
    """

    run_dir: Path
    best_metric: float | None
    metric: str
    best_epoch: int
    epochs_run: int
    best_path: Path
    stopped_early: bool = False

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["run_dir"], d["best_path"] = str(self.run_dir), str(self.best_path)
        return d

    def line(self) -> str:
        stop = ", stopped early" if self.stopped_early else ""
        best = "n/a" if self.best_metric is None else f"{self.best_metric:.4f}"
        return (f"trained {self.epochs_run} epochs{stop}: best {self.metric} {best} at epoch "
                f"{self.best_epoch} -> {self.best_path}")


# --------------------------------------------------------------------------- building blocks


def build_head_for(name: str, n_outputs: int, dims: dict[str, int] | None = None,
                   options: dict | None = None) -> nn.Module:
    """Build head ``name`` with ``options``, its feature widths set to the cache's ``dims``.

    Widths go to whichever config field the head uses: ``<feature>_dim`` (STAN),
    ``feature_dim`` (VTN, for its ``feature``) or ``feature_dims`` (baselines). With ``dims``
    None the head only tells which features and level it reads (widths may be placeholders).

    Raises:
        UsageError: unknown head, unknown option, ``n_outputs`` among the options, an invalid
            value, or widths the head cannot take.
    """
    options = dict(options or {})
    try:
        cfg_cls = config_class(name)
    except ValueError as e:
        raise UsageError(str(e)) from e
    valid = [f.name for f in dataclasses.fields(cfg_cls) if f.name != "n_outputs"]
    if "n_outputs" in options:
        raise UsageError("n_outputs is set from the labels (the number of classes, 1 for "
                         "regression); drop it from the head options")
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UsageError(f"head {name!r} has no option(s) {unknown}; its options are {valid}")
    try:
        proto_options = dict(options)
        if "feature_dims" in valid and "feature_dims" not in options:
            # placeholder widths, so features without a default width can be named
            proto_options["feature_dims"] = {f: 1 for f in options.get("features", ())}
        head = build_head(name, n_outputs=n_outputs, **proto_options)
        if dims is None:
            return head
        kw = dict(options)
        for ft in head.features:
            if ft not in dims:
                continue
            if f"{ft}_dim" in valid:
                kw[f"{ft}_dim"] = dims[ft]
            elif "feature_dims" in valid:
                kw["feature_dims"] = {**kw.get("feature_dims", {}), ft: dims[ft]}
            elif "feature_dim" in valid and getattr(head.config, "feature", None) == ft:
                kw["feature_dim"] = dims[ft]
        head = build_head(name, n_outputs=n_outputs, **kw)
    except (TypeError, ValueError) as e:
        raise UsageError(f"head {name!r}: {e}") from e
    wrong = {ft: (w, dims[ft]) for ft, w in head.inputs.items()
             if ft in dims and dims[ft] not in (input_shape(w)[-1], int(np.prod(input_shape(w))))}
    if wrong:
        raise UsageError(f"head {name!r} expects widths {wrong} (head, cache) that differ; "
                         f"leave the feature widths to the cache")
    return head


def input_stats(data, features) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-dimension mean and std of each feature over every token of the train split (all
    videos when there is none), for the head's input standardisation."""
    videos = [v for v in data.videos if v.split == "train"] or data.videos
    out = {}
    for name in features:
        # Shaped tokens (e.g. patches (196, 768)) are standardised over their last dimension:
        # accumulate sums per video in float64 rather than concatenating everything.
        n, total, squares = 0, 0.0, 0.0
        for v in videos:
            x = np.asarray(v.tokens[name], np.float64)
            if not len(x):
                continue
            x = x.reshape(-1, x.shape[-1])
            n += len(x)
            total = total + x.sum(0)
            squares = squares + (x * x).sum(0)
        if not n:
            continue
        mean = total / n
        std = np.sqrt(np.maximum(squares / n - mean * mean, 0.0))
        out[name] = (torch.from_numpy(mean).float(), torch.from_numpy(std).float())
    return out


def loss_fn(task: str, logits: Tensor, target: Tensor) -> Tensor:
    """BCE with logits (multilabel), cross-entropy (multiclass) or MSE (regression)."""
    logits = logits.float()
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, target.float())
    if task == "multiclass":
        return F.cross_entropy(logits, target.long())
    return F.mse_loss(logits.squeeze(-1), target.float())


def scores_from_logits(task: str, logits: Tensor) -> Tensor:
    """Sigmoid (multilabel), softmax (multiclass) or the raw value (regression, ``(B,)``)."""
    logits = logits.float()
    if task == "multilabel":
        return torch.sigmoid(logits)
    if task == "multiclass":
        return torch.softmax(logits, dim=-1)
    return logits.squeeze(-1)


def head_inputs(batch: dict[str, Tensor], features, device: torch.device) -> dict[str, Tensor]:
    """The head's part of a collated batch, on ``device``."""
    out = {f: batch[f].to(device, non_blocking=True) for f in features}
    out["mask"] = batch["mask"].to(device, non_blocking=True)
    return out


@torch.no_grad()
def predict_scores(head: nn.Module, loader: DataLoader, task: str, device: torch.device,
                   amp: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Run ``head`` (eval mode) over ``loader``.

    Returns:
        ``(index (N,), y_true, scores, mean loss)``, in loader order.
    """
    was_training = head.training
    head.eval()
    idx, ys, scores, loss_sum, n = [], [], [], 0.0, 0
    for batch in loader:
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp and device.type == "cuda"):
            logits = head(head_inputs(batch, head.features, device))
        target = batch["target"].to(device)
        loss_sum += float(loss_fn(task, logits, target)) * len(target)
        n += len(target)
        idx.append(batch["index"].numpy())
        ys.append(batch["target"].numpy())
        scores.append(scores_from_logits(task, logits).cpu().numpy())
    head.train(was_training)
    scores = np.concatenate(scores).astype(np.float64)
    return np.concatenate(idx), np.concatenate(ys), scores, loss_sum / max(n, 1)


def _lr_lambda(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up from ``1 / warmup_steps`` to 1, then cosine decay to 0 at ``total_steps``."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def _init_output_bias(head: nn.Module, value: float) -> bool:
    """Start the output layer's bias at ``value`` (the mean training target, for regression).

    The output layer is the last ``nn.Linear`` with ``n_outputs`` outputs. Regression targets
    are not standardised (LVU's like ratio is ~9, ln(views) ~12), and a bias starting at 0
    would take thousands of steps to get there.
    """
    n = head.config.n_outputs
    last = None
    for m in head.modules():
        if isinstance(m, nn.Linear) and m.out_features == n and m.bias is not None:
            last = m
    if last is None:
        return False
    with torch.no_grad():
        last.bias.fill_(value)
    return True


def _seed_everything(seed: int) -> None:
    import random
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % 2**63


# --------------------------------------------------------------------------- distributed


@dataclass
class _Dist:
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_opt: str) -> tuple[_Dist, torch.device]:
    import torch.distributed as dist

    from vtx.pipeline.backbones import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(), resolve_device(device_opt)
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_opt)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA "
                             f"device(s); start at most that many processes per node")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    return _Dist(world, dist.get_rank(), local, owns), device


def _all_mean(d: _Dist, total: float, count: int, device: torch.device) -> float:
    if not d.enabled:
        return total / max(count, 1)
    import torch.distributed as dist
    t = torch.tensor([total, float(count)], dtype=torch.float64,
                     device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t[0] / t[1].clamp_min(1))


def _broadcast(d: _Dist, obj):
    if not d.enabled:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _has_unused_parameters(head: nn.Module, dataset, device: torch.device) -> bool:
    """Whether some trainable parameter gets no gradient (DDP must then look for them).

    VTN's last layer, for one, computes frame outputs nobody reads. Probed with one backward
    pass on two videos; RNG state is restored afterwards.
    """
    state = torch.get_rng_state()
    batch = collate([dataset[i] for i in range(min(2, len(dataset)))])
    head.zero_grad(set_to_none=True)
    head(head_inputs(batch, head.features, device)).float().sum().backward()
    unused = any(p.grad is None for p in head.parameters() if p.requires_grad)
    head.zero_grad(set_to_none=True)
    torch.set_rng_state(state)
    return unused


# --------------------------------------------------------------------------- files


def _plain_config(config: TrainConfig) -> dict:
    d = dataclasses.asdict(config)
    for k in ("features", "labels", "out"):
        d[k] = str(d[k])
    return d


def _same_path(a, b) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return str(a) == str(b)


def _check_resume(saved: dict, config: TrainConfig, head_config: dict, data: CacheData,
                  log: Callable[[str], None]) -> None:
    old = saved.get("train_config") or {}
    now = to_plain(_plain_config(config))
    diffs = []
    for k in RESUME_MUST_MATCH:
        a, b = old.get(k), now[k]
        same = _same_path(a, b) if k in ("features", "labels") else a == b
        if not same:
            diffs.append(f"{k}: saved {a!r}, now {b!r}")
    if saved["head_config"] != to_plain(head_config):
        diffs.append(f"head config: saved {saved['head_config']}, now {to_plain(head_config)}")
    if saved["features"] != to_plain(data.feature_attrs):
        diffs.append(f"cache features: saved {saved['features']}, now {to_plain(data.feature_attrs)}")
    if saved["vocab"] != list(data.labels.vocab) or saved["task"] != data.labels.task:
        diffs.append(f"labels: saved task {saved['task']} with {len(saved['vocab'])} classes, now "
                     f"{data.labels.task} with {len(data.labels.vocab)}")
    if diffs:
        raise UsageError(f"cannot resume {config.out}: the run was made with other settings ("
                         + "; ".join(diffs) + "); rerun with the original options, or start a "
                         "new run with another --out")
    for k in ("batch_size", "lr", "weight_decay", "warmup_epochs", "grad_clip", "seed", "epochs"):
        a, b = old.get(k), getattr(config, k)
        if a != b:
            log(f"vtx: note: resuming with {k} = {b!r} (the run started with {a!r})")


def _render_curve(records: list[dict], path: Path, primary: str | None) -> None:
    """Losses (and the primary validation metric) against the epoch, as a PNG.

    Uses matplotlib's object API with the Agg canvas (no pyplot state, no display needed).
    """
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in records]
    n = 2 if primary else 1
    fig = Figure(figsize=(4.5 * n, 3.2), dpi=80)
    axes = fig.subplots(1, n, squeeze=False)[0]
    ax = axes[0]
    ax.plot(epochs, [r["train_loss"] for r in records], marker="o", label="train loss")
    if any(r.get("val_loss") is not None for r in records):
        ax.plot(epochs, [r.get("val_loss") for r in records], marker="o", label="val loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if primary:
        ax = axes[1]
        ax.plot(epochs, [r.get(f"val_{primary}") for r in records], marker="o", color="C2")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"val {primary}")
        ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.12 / n, right=0.98, bottom=0.16, top=0.95, wspace=0.3)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp)
    os.replace(tmp, path)


def _read_records(path: Path, upto: int) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if r["epoch"] <= upto:
                records.append(r)
    return records


def _write_records(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the loop


def train_head(config: TrainConfig, log: Callable[[str], None] | None = None,
               on_epoch_end: Callable[[dict], None] | None = None) -> TrainResult:
    """Train ``config.head`` on the cached tokens of the labelled videos.

    Args:
        config: the run's settings.
        log: where progress lines go (stderr by default; only rank 0 logs).
        on_epoch_end: called on rank 0 with each epoch's ``metrics.jsonl`` record after its
            files are written (raising there stops training; the run can be resumed).

    Returns:
        The run's summary. ``best.pt`` holds the weights of the best epoch.

    Raises:
        UsageError: bad options, labels, cache (see :mod:`vtx.train.dataset`) or resume state.
    """
    dist_state, device = _init_distributed(config.device)
    try:
        return _train(config, dist_state, device, log, on_epoch_end)
    finally:
        if dist_state.owns_group:
            import torch.distributed as dist
            dist.destroy_process_group()


def _train(config: TrainConfig, d: _Dist, device: torch.device,
           log: Callable[[str], None] | None, on_epoch_end) -> TrainResult:
    from tqdm import tqdm

    if log is None:
        log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if d.main else (lambda msg: None)
    elif not d.main:
        log = lambda msg: None  # noqa: E731
    if config.epochs < 1 or config.batch_size < 1:
        raise UsageError("--epochs and --batch-size must be at least 1")
    if config.patience < 1:
        raise UsageError("--patience must be at least 1")
    if config.warmup_epochs < 0 or config.lr <= 0:
        raise UsageError("--warmup-epochs must be >= 0 and --lr > 0")
    out = Path(config.out)
    last_path, best_path = out / "last.pt", out / "best.pt"
    metrics_path, curve_path = out / "metrics.jsonl", out / "learning_curve.png"
    if config.resume and not last_path.exists():
        raise UsageError(f"--resume: {last_path} does not exist, so there is nothing to resume; "
                         "drop --resume to start a new run")
    if not config.resume and (last_path.exists() or best_path.exists()):
        raise UsageError(f"{out} already holds a run (last.pt); pass --resume to continue it, "
                         "or choose another --out")

    _seed_everything(config.seed)
    labels = load_labels(config.labels, task=config.task, val_frac=config.val_frac)
    task = labels.task
    n_outputs = 1 if task == "regression" else len(labels.vocab)
    proto = build_head_for(config.head, n_outputs, None, config.head_options)
    data = load_cache(config.features, labels, proto.inputs, proto.level, config.max_tokens, log)
    torch.manual_seed(config.seed)
    head = build_head_for(config.head, n_outputs, data.dims, config.head_options)
    if task == "regression" and not config.resume:
        targets = [float(v.target) for v in data.videos if v.split == "train"]
        if targets:
            _init_output_bias(head, float(np.mean(targets)))
    if hasattr(head, "set_input_stats"):
        head.set_input_stats(input_stats(data, head.features))
    head = head.to(device)

    sizes = data.split_sizes()
    log(f"vtx: {len(data.videos)} labelled videos in {data.cache} (train {sizes['train']}, "
        f"val {sizes['val']}, test {sizes['test']}); {data.n_unlabelled} cached videos "
        f"unlabelled, {data.n_unmatched} labelled videos not in the cache")
    train_set, val_set = data.dataset("train"), data.dataset("val")
    if len(train_set) == 0:
        raise UsageError(f"no labelled video of {data.cache} is in the train split (splits: "
                         f"{sizes}); label some videos 'train' or lower --val-frac")
    key, higher = primary_metric(task)
    has_val = len(val_set) > 0
    select = f"val_{key}" if has_val else "train_loss"
    if not has_val:
        log("vtx: note: no validation videos (no 'val' split in the labels and none hashed into "
            "it); best.pt is selected on the training loss, which says nothing about "
            "generalisation. Add a split column or raise --val-frac")
        higher = False

    sampler = DistributedSampler(train_set, num_replicas=d.world, rank=d.rank, shuffle=True,
                                 seed=config.seed, drop_last=False)
    train_loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler,
                              collate_fn=collate, num_workers=0,
                              generator=torch.Generator().manual_seed(config.seed))
    val_loader = DataLoader(val_set, batch_size=config.batch_size, shuffle=False,
                            collate_fn=collate, num_workers=0,
                            generator=torch.Generator().manual_seed(config.seed))

    decay = [p for n, p in head.named_parameters() if p.ndim >= 2 and "cls" not in n]
    no_decay = [p for n, p in head.named_parameters() if not (p.ndim >= 2 and "cls" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    steps_per_epoch = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(config.warmup_epochs * steps_per_epoch, config.epochs * steps_per_epoch))
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start_epoch, best, best_epoch, records = 0, None, 0, []
    if config.resume:
        saved = read_checkpoint(last_path)
        _check_resume(saved, config, dataclasses.asdict(head.config), data, log)
        head.load_state_dict(saved["state_dict"])
        if saved.get("optimizer") is not None:
            optimizer.load_state_dict(saved["optimizer"])
        if saved.get("scheduler") is not None:
            scheduler.load_state_dict(saved["scheduler"])
        start_epoch, best = int(saved["epoch"]), saved.get("best_metric")
        if saved.get("rng") is not None:
            set_rng_state(saved["rng"])
        best_epoch = int(read_checkpoint(best_path)["epoch"]) if best_path.exists() else 0
        if d.main:
            records = _read_records(metrics_path, start_epoch)
            _write_records(metrics_path, records)  # drop lines of epochs after last.pt
        log(f"vtx: resuming {out} after epoch {start_epoch} (best {select} "
            f"{'n/a' if best is None else f'{best:.4f}'} at epoch {best_epoch})")
    elif d.main:
        out.mkdir(parents=True, exist_ok=True)
        metrics_path.unlink(missing_ok=True)

    model: nn.Module = head
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(head, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=_has_unused_parameters(head, train_set, device))

    def improved(value: float) -> bool:
        if best is None:
            return True
        return value > best if higher else value < best

    train_config = _plain_config(config)
    stopped_early = start_epoch - best_epoch >= config.patience and start_epoch > 0
    epoch = start_epoch
    while epoch < config.epochs and not stopped_early:
        epoch += 1
        t0 = time.perf_counter()
        torch.manual_seed(_epoch_seed(config.seed, epoch, d.rank))  # dropout of this epoch
        sampler.set_epoch(epoch)
        model.train()
        loss_sum, count, lr = 0.0, 0, optimizer.param_groups[0]["lr"]
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{config.epochs}", unit="batch",
                   file=sys.stderr, leave=False, disable=None if d.main else True)
        for batch in bar:
            inputs = head_inputs(batch, head.features, device)
            target = batch["target"].to(device, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                logits = model(inputs)
            loss = loss_fn(task, logits, target)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(head.parameters(), config.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(target)
            count += len(target)
            bar.set_postfix(loss=f"{loss_sum / count:.4f}")
        bar.close()
        train_loss = _all_mean(d, loss_sum, count, device)
        if not math.isfinite(train_loss):
            raise UsageError(f"the training loss became {train_loss} at epoch {epoch}; lower --lr "
                             "or check the features for NaN/inf")

        stop = False
        record = None
        if d.main:
            record = {"epoch": epoch, "lr": lr, "train_loss": train_loss, "val_loss": None}
            val_metrics: dict[str, float] = {}
            if has_val:
                _, y, scores, val_loss = predict_scores(head, val_loader, task, device, use_amp)
                val_metrics = compute_metrics(task, y, scores)
                record["val_loss"] = val_loss
                record.update({f"val_{k}": v for k, v in val_metrics.items()})
                value = val_metrics[key]
            else:
                value = train_loss
            is_best = improved(value)
            if is_best:
                best, best_epoch = value, epoch
            record["best"] = is_best
            record["seconds"] = round(time.perf_counter() - t0, 3)
            ckpt_metrics = {**val_metrics, **({"loss": record["val_loss"]} if has_val else {})}
            common = dict(head=head, head_name=config.head, task=task, vocab=labels.vocab,
                          features=data.feature_attrs, shot_config=data.shot_config,
                          frame_config=data.frame_config, epoch=epoch,
                          metrics=ckpt_metrics, train_config=train_config, optimizer=optimizer,
                          scheduler=scheduler, best_metric=best, rng=get_rng_state())
            if is_best:
                save_checkpoint(best_path, **common)
            records.append(record)
            _write_records(metrics_path, records)
            save_checkpoint(last_path, **common)
            _render_curve(records, curve_path, key if has_val else None)
            shown = f"{select} {value:.4f}" if has_val else ""
            log(f"epoch {epoch}/{config.epochs}  lr {lr:.2e}  train_loss {train_loss:.4f}"
                + (f"  val_loss {record['val_loss']:.4f}  {shown}" if has_val else "")
                + ("  *best*" if is_best else "") + f"  {record['seconds']:.1f}s")
            stop = epoch - best_epoch >= config.patience
            if stop:
                log(f"vtx: no better {select} for {config.patience} epochs; stopping early")
        stopped_early = _broadcast(d, stop)
        if d.main and on_epoch_end is not None:
            on_epoch_end(record)

    best_epoch, best = _broadcast(d, (best_epoch, best))
    return TrainResult(run_dir=out, best_metric=best, metric=select, best_epoch=best_epoch,
                       epochs_run=epoch, best_path=best_path, stopped_early=stopped_early)
