"""Training loop for the stage-2 heads over cached tokens.

Recipe (STAN, Fish et al. 2022, Section 4; loss per task as in LVU, Wu & Kraehenbuehl 2021):
AdamW, a linear warm-up then a cosine decay (stepped every batch), gradient clipping, fp16
autocast with a GradScaler on CUDA only, and a loss per task: BCE with logits (multi-label
genres), cross-entropy (multi-class) or MSE (regression, one output, whose bias starts at the
mean training target since targets are not standardised). The best epoch is picked
on the validation split's primary metric (:func:`vtx.train.metrics.primary_metric`), with early
stopping after ``patience`` epochs without improvement; without a validation split the training
loss is used instead (and the run says so).

Memory (a paper-size head on one 16 GB card, ``docs/BENCHMARKS.md``): ``grad_checkpoint``
checkpoints the head's layer stacks (``Head.set_grad_checkpointing``), ``accumulate`` steps the
optimizer once per N batches with the gradients of the N-times larger batch (each batch's loss
weighted by its share of the step's videos), and ``batch_size="auto"`` picks the largest batch
whose estimated step fits the device (:mod:`vtx.train.memory`); ``size="paper"`` builds the
head at the paper's size (:func:`vtx.heads.preset`).

The run folder ``out`` holds, after every epoch:

* ``metrics.jsonl``: one JSON object per epoch: ``epoch``, ``lr`` (of the epoch's last step),
  ``train_loss``, ``val_loss``, ``val_<metric>`` for each validation metric, ``best`` (this
  epoch became ``best.pt``), ``seconds``;
* ``last.pt`` (always) and ``best.pt`` (when the selection metric improves), see
  :mod:`vtx.train.checkpoint`;
* ``learning_curve.png``: losses and the primary metric against the epoch.

:mod:`vtx.train.run_files` knows these paths and writes ``metrics.jsonl`` and the curve.

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
heads are small. The process group and the collectives are in :mod:`vtx.train.distributed`.

The loop reads as numbered steps (check, load, loaders, optimizer, resume, DDP, epochs,
summary); each step longer than a few lines is a function of its own below it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
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
from vtx.heads import HEADS, SIZES, build_head, config_class, preset
from vtx.heads.base import input_shape
from vtx.progress import progress
from vtx.train.checkpoint import (
    get_rng_state,
    read_checkpoint,
    save_checkpoint,
    set_rng_state,
    to_plain,
)
from vtx.train.dataset import CacheData, TokenDataset, collate, load_cache
from vtx.train.distributed import (
    Dist,
    all_mean,
    broadcast,
    data_parallel,
    epoch_seed,
    init_distributed,
)
from vtx.train.labels import load_labels
from vtx.train.metrics import compute_metrics, primary_metric
from vtx.train.run_files import RunFiles, read_records, render_curve, write_records

__all__ = ["TrainConfig", "TrainResult", "build_head_for", "head_inputs", "input_stats", "loss_fn",
           "param_groups", "predict_scores", "scores_from_logits", "train_head"]

#: Config fields a resumed run must share with the saved one.
RESUME_MUST_MATCH = ("head", "features", "labels", "task", "val_frac", "max_tokens", "head_options",
                     "size")


@dataclass
class TrainConfig:
    """Options of ``vtx train-head``; the CLI maps its flags one-to-one onto these fields.

    Attributes:
        head: a key of :data:`vtx.heads.HEADS`.
        features: the feature cache (``feats.h5``).
        labels: the label file or LVU task folder.
        out: the run folder.
        epochs: maximum epochs.
        batch_size: videos per forward pass (per process under DDP), or ``"auto"``: the largest
            that fits the device (:func:`vtx.train.memory.auto_batch_size`); the run's
            ``train_config`` records the size picked.
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
        loader_workers: DataLoader worker processes reading tokens from the cache (0: the
            training process reads them itself).
        cache_mb: memory budget, per process, of recently read videos' tokens (tokens stream
            from the cache; peak memory does not grow with the cache beyond this).
        resume: continue from ``out/last.pt``.
        amp: fp16 autocast and gradient scaling on CUDA (ignored on the CPU).
        progress: a bar over each epoch's batches on a terminal, and one line per epoch
            (``--quiet`` turns both off; notes and warnings still go to ``log``).
        head_options: head config fields (e.g. ``{"n_layers": 1}``); ``n_outputs`` and feature
            widths come from the labels and the cache.
        size: ``"default"`` (the head config's own defaults) or ``"paper"``, the paper's model
            size (:func:`vtx.heads.preset`); ``head_options`` override it.
        grad_checkpoint: activation checkpointing of the head's layer stacks: the same
            gradients, the activations of about one layer instead of all, a third more compute.
        accumulate: gradient accumulation: one optimizer step per ``accumulate`` batches, with
            the gradients of one batch ``accumulate`` times larger (the loss of each is weighted
            by its share of the videos, so the gradients equal the big batch's up to float
            error). The schedule counts optimizer steps.
    """

    head: str
    features: Path
    labels: Path
    out: Path
    epochs: int = 30
    batch_size: int | str = 16
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
    loader_workers: int = 0
    cache_mb: int = 1024
    resume: bool = False
    amp: bool = True
    progress: bool = True
    head_options: dict = field(default_factory=dict)
    size: str = "default"
    grad_checkpoint: bool = False
    accumulate: int = 1


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

    The head's config places the widths (``config.with_input_widths(dims)``). With ``dims``
    None the head only tells which features and level it reads (widths may be placeholders).

    Raises:
        UsageError: unknown head, unknown option, ``n_outputs`` among the options, an invalid
            value, ``dims`` without a feature the head reads, or widths the head cannot take.
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
        missing = [ft for ft in head.config.input_width_fields() if ft not in dims]
        if missing:
            raise UsageError(f"head {name!r} reads {missing}, but the widths given are only "
                             f"for {sorted(dims)}")
        head = HEADS[name](head.config.with_input_widths(dims))
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
    # Shaped tokens (e.g. patches (196, 768)) are standardised over their last dimension:
    # accumulate sums per video in float64 (one streamed read of each video), never
    # concatenating everything.
    sums = {name: [0, 0.0, 0.0] for name in features}  # rows, sum, sum of squares
    for v in videos:
        tokens = v.read()
        for name in features:
            x = np.asarray(tokens[name], np.float64)
            if not len(x):
                continue
            x = x.reshape(-1, x.shape[-1])
            acc = sums[name]
            acc[0] += len(x)
            acc[1] = acc[1] + x.sum(0)
            acc[2] = acc[2] + (x * x).sum(0)
    out = {}
    for name, (n, total, squares) in sums.items():
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
    if "positions" in batch:  # each token's index in its video before --max-tokens (VTN)
        out["positions"] = batch["positions"].to(device, non_blocking=True)
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


def param_groups(head: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: ``weight_decay`` on weight matrices (parameters of 2 or more
    dimensions), none on biases, norms and what ``head.no_weight_decay()`` names (CLS tokens).

    Returns:
        ``[{"params": decayed, "weight_decay": weight_decay}, {"params": rest,
        "weight_decay": 0.0}]``, each in ``named_parameters`` order.
    """
    skip = head.no_weight_decay()
    decay, no_decay = [], []
    for name, p in head.named_parameters():
        (decay if p.ndim >= 2 and name not in skip else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _lr_lambda(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up from ``1 / warmup_steps`` to 1, then cosine decay to 0 at ``total_steps``."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        done = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * done))
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



# --------------------------------------------------------------------------- resume


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
        a, b = old.get(k, "default" if k == "size" else None), now[k]  # runs before --size
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
    for k in ("batch_size", "lr", "weight_decay", "warmup_epochs", "grad_clip", "seed", "epochs",
              "accumulate", "grad_checkpoint"):
        a, b = old.get(k, {"accumulate": 1, "grad_checkpoint": False}.get(k)), getattr(config, k)
        if a != b:
            log(f"vtx: note: resuming with {k} = {b!r} (the run started with {a!r})")



# --------------------------------------------------------------------------- the loop


@dataclass
class _Selection:
    """What picks the best epoch: the validation split's primary metric (``metric``, better
    when ``higher``), or the training loss (lower is better) when there is no validation split."""

    metric: str
    higher: bool
    has_val: bool

    @property
    def name(self) -> str:
        """The selecting key of a ``metrics.jsonl`` record."""
        return f"val_{self.metric}" if self.has_val else "train_loss"

    def improved(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best if self.higher else value < best


@dataclass
class _Run:
    """One run's state, handed from step to step of :func:`_train`."""

    config: TrainConfig
    files: RunFiles
    data: CacheData
    select: _Selection
    device: torch.device
    use_amp: bool
    head: nn.Module
    model: nn.Module  # what trains: the head, or the head wrapped in DDP
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    epoch: int = 0  # epochs completed
    best: float | None = None  # the selection metric of best.pt
    best_epoch: int = 0
    records: list[dict] = field(default_factory=list)  # metrics.jsonl (rank 0 only)


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
    d, device = init_distributed(config.device)
    try:
        return _train(config, d, device, _rank0_log(log, d), on_epoch_end)
    finally:
        d.close()


def _train(config: TrainConfig, d: Dist, device: torch.device, log: Callable[[str], None],
           on_epoch_end: Callable[[dict], None] | None) -> TrainResult:
    """:func:`train_head` on one process (every rank runs this; ``log`` is silent off rank 0)."""
    # 1. refuse bad options and a run folder in the wrong state, before reading anything
    files = RunFiles(Path(config.out))
    _check_options(config, files)

    # 2. labels, the cached tokens of the labelled videos, and the head with its input stats
    data, head = _load_data_and_head(config, device, log)
    train_set, val_set = _datasets(data, log)
    select = _selection(data.labels.task, has_val=len(val_set) > 0, log=log)
    config = _resolve_batch_size(config, head, train_set, device, log)  # --batch-size auto

    # 3. loaders: a DistributedSampler shards the training videos (one shard on one process)
    train_loader, val_loader = _loaders(config, train_set, val_set, d)

    # 4. AdamW, the warm-up + cosine schedule (stepped every batch) and the fp16 grad scaler
    use_amp = config.amp and device.type == "cuda"
    optimizer, scheduler, scaler = _optimizer(config, head,
                                              math.ceil(len(train_loader) / config.accumulate),
                                              use_amp)
    run = _Run(config=config, files=files, data=data, select=select, device=device,
               use_amp=use_amp, head=head, model=head, optimizer=optimizer, scheduler=scheduler,
               scaler=scaler)

    # 5. continue from last.pt, or start the run folder
    if config.resume:
        _resume(run, d, log)
    elif d.main:
        files.out.mkdir(parents=True, exist_ok=True)
        files.metrics.unlink(missing_ok=True)

    # 6. under torchrun, train through DDP (the files keep the unwrapped head)
    if d.enabled:
        probe = collate([train_set[i] for i in range(min(2, len(train_set)))])
        run.model = data_parallel(head, device, head_inputs(probe, head.features, device))

    # 7. epochs: train on every rank; rank 0 validates, saves and decides whether to stop
    stopped_early = run.epoch > 0 and run.epoch - run.best_epoch >= config.patience
    while run.epoch < config.epochs and not stopped_early:
        run.epoch += 1
        t0 = time.perf_counter()
        train_loss, lr = _train_epoch(run, train_loader, d)
        record, stop = None, False
        if d.main:
            record = _evaluate_and_save(run, val_loader, train_loss, lr, t0, log)
            stop = run.epoch - run.best_epoch >= config.patience
            if stop:
                log(f"vtx: no better {select.name} for {config.patience} epochs; stopping early")
        stopped_early = broadcast(d, stop)
        if record is not None and on_epoch_end is not None:
            on_epoch_end(record)

    # 8. every rank returns rank 0's summary
    best_epoch, best = broadcast(d, (run.best_epoch, run.best))
    return TrainResult(run_dir=files.out, best_metric=best, metric=select.name,
                       best_epoch=best_epoch, epochs_run=run.epoch, best_path=files.best,
                       stopped_early=stopped_early)


def _rank0_log(log: Callable[[str], None] | None, d: Dist) -> Callable[[str], None]:
    """``log`` (stderr when None) on rank 0; silence on the other ranks."""
    if not d.main:
        return lambda msg: None
    return log or (lambda msg: print(msg, file=sys.stderr, flush=True))


def _check_options(config: TrainConfig, files: RunFiles) -> None:
    auto = config.batch_size == "auto"
    if config.epochs < 1 or not auto and (not isinstance(config.batch_size, int)
                                          or config.batch_size < 1):
        raise UsageError(f"--epochs must be at least 1 and --batch-size at least 1 or 'auto' "
                         f"(got {config.epochs}, {config.batch_size!r})")
    if config.accumulate < 1:
        raise UsageError(f"--accumulate must be at least 1, got {config.accumulate}")
    if config.size not in SIZES:
        raise UsageError(f"--size must be one of {', '.join(SIZES)}, got {config.size!r}")
    if config.loader_workers < 0 or config.cache_mb < 0:
        raise UsageError("--loader-workers and --cache-mb must be at least 0")
    if config.patience < 1:
        raise UsageError("--patience must be at least 1")
    if config.warmup_epochs < 0 or config.lr <= 0:
        raise UsageError("--warmup-epochs must be >= 0 and --lr > 0")
    files.check(config.resume)


def _load_data_and_head(config: TrainConfig, device: torch.device,
                        log: Callable[[str], None]) -> tuple[CacheData, nn.Module]:
    """Labels, the cached tokens the head reads, and the head (seeded with ``config.seed``;
    widths from the cache, input statistics from the train split, regression bias at the mean
    training target), on ``device``."""
    _seed_everything(config.seed)
    labels = load_labels(config.labels, task=config.task, val_frac=config.val_frac)
    n_outputs = 1 if labels.task == "regression" else len(labels.vocab)
    options = _head_options(config)
    proto = build_head_for(config.head, n_outputs, None, options)
    data = load_cache(config.features, labels, proto.inputs, proto.level, config.max_tokens, log,
                      cache_bytes=config.cache_mb << 20)
    torch.manual_seed(config.seed)
    head = build_head_for(config.head, n_outputs, data.dims, options)
    if config.grad_checkpoint and not head.set_grad_checkpointing(True):
        log(f"vtx: note: head {config.head!r} has no layer stack to checkpoint; "
            f"--grad-checkpoint changes nothing")
    if labels.task == "regression" and not config.resume:
        targets = [float(v.target) for v in data.videos if v.split == "train"]
        if targets:
            _init_output_bias(head, float(np.mean(targets)))
    if hasattr(head, "set_input_stats"):
        head.set_input_stats(input_stats(data, head.features))
    return data, head.to(device)


def _head_options(config: TrainConfig) -> dict:
    """The head's options: the ``--size`` preset, then ``head_options`` over it."""
    try:
        sized = preset(config.head, config.size)
    except ValueError as e:
        raise UsageError(f"--size {config.size}: {e}") from e
    return {**sized, **config.head_options}


def _resolve_batch_size(config: TrainConfig, head: nn.Module, train_set: TokenDataset,
                        device: torch.device, log: Callable[[str], None]) -> TrainConfig:
    """``--batch-size auto``: the largest batch whose training step fits the device, for the
    longest training video (:func:`vtx.train.memory.auto_batch_size`); other sizes unchanged."""
    if config.batch_size != "auto":
        return config
    from vtx.train.memory import GiB, auto_batch_size

    use_amp = config.amp and device.type == "cuda"
    longest = max(range(len(train_set)), key=lambda i: train_set.videos[i].length)
    length = train_set.videos[longest].length

    def try_step(size: int) -> bool:  # one real forward and backward at this size (CUDA)
        batch = head_inputs(collate([train_set[longest]] * size), head.features, device)
        try:
            with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                head.train()(batch).float().sum().backward()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            head.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    size, estimate, budget = auto_batch_size(
        config.head, head, length, len(train_set), device, amp=use_amp,
        grad_checkpoint=config.grad_checkpoint,
        try_step=try_step if device.type == "cuda" else None)
    log(f"vtx: --batch-size auto: {size} videos per step (estimated peak "
        f"{estimate.peak / GiB:.2f} GiB of {budget / GiB:.2f} GiB available on {device}, for "
        f"the longest training video: {length} tokens)")
    return dataclasses.replace(config, batch_size=size)


def _datasets(data: CacheData, log: Callable[[str], None]) -> tuple[TokenDataset, TokenDataset]:
    """The train and val datasets, after a line saying how many videos each split has."""
    sizes = data.split_sizes()
    log(f"vtx: {len(data.videos)} labelled videos in {data.cache} (train {sizes['train']}, "
        f"val {sizes['val']}, test {sizes['test']}); {data.n_unlabelled} cached videos "
        f"unlabelled, {data.n_unmatched} labelled videos not in the cache")
    train_set, val_set = data.dataset("train"), data.dataset("val")
    if len(train_set) == 0:
        raise UsageError(f"no labelled video of {data.cache} is in the train split (splits: "
                         f"{sizes}); label some videos 'train' or lower --val-frac")
    return train_set, val_set


def _selection(task: str, has_val: bool, log: Callable[[str], None]) -> _Selection:
    key, higher = primary_metric(task)
    if not has_val:
        log("vtx: note: no validation videos (no 'val' split in the labels and none hashed into "
            "it); best.pt is selected on the training loss, which says nothing about "
            "generalisation. Add a split column or raise --val-frac")
        higher = False
    return _Selection(key, higher, has_val)


def _loaders(config: TrainConfig, train_set: TokenDataset, val_set: TokenDataset,
             d: Dist) -> tuple[DataLoader, DataLoader]:
    """This rank's shuffled shard of the training videos, and all validation videos in order."""
    sampler = DistributedSampler(train_set, num_replicas=d.world, rank=d.rank, shuffle=True,
                                 seed=config.seed, drop_last=False)
    workers = config.loader_workers
    train_loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler,
                              collate_fn=collate, num_workers=workers,
                              persistent_workers=workers > 0,
                              generator=torch.Generator().manual_seed(config.seed))
    val_loader = DataLoader(val_set, batch_size=config.batch_size, shuffle=False,
                            collate_fn=collate, num_workers=workers,
                            persistent_workers=workers > 0,
                            generator=torch.Generator().manual_seed(config.seed))
    return train_loader, val_loader


def _optimizer(config: TrainConfig, head: nn.Module, steps_per_epoch: int, use_amp: bool):
    """AdamW over :func:`param_groups`, its per-step schedule, and the gradient scaler."""
    optimizer = torch.optim.AdamW(param_groups(head, config.weight_decay), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(config.warmup_epochs * steps_per_epoch,
                              config.epochs * steps_per_epoch))
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    return optimizer, scheduler, scaler


def _resume(run: _Run, d: Dist, log: Callable[[str], None]) -> None:
    """Load last.pt's weights, optimizer, schedule, RNG state and best metric into ``run``
    (after checking it was made with the same settings), and cut metrics.jsonl to its epoch."""
    files = run.files
    saved = read_checkpoint(files.last)
    _check_resume(saved, run.config, dataclasses.asdict(run.head.config), run.data, log)
    run.head.load_state_dict(saved["state_dict"])
    if saved.get("optimizer") is not None:
        run.optimizer.load_state_dict(saved["optimizer"])
    if saved.get("scheduler") is not None:
        run.scheduler.load_state_dict(saved["scheduler"])
    run.epoch, run.best = int(saved["epoch"]), saved.get("best_metric")
    if saved.get("rng") is not None:
        set_rng_state(saved["rng"])
    run.best_epoch = int(read_checkpoint(files.best)["epoch"]) if files.best.exists() else 0
    if d.main:
        run.records = read_records(files.metrics, run.epoch)
        write_records(files.metrics, run.records)  # drop lines of epochs after last.pt
    best = "n/a" if run.best is None else f"{run.best:.4f}"
    log(f"vtx: resuming {files.out} after epoch {run.epoch} (best {run.select.name} {best} at "
        f"epoch {run.best_epoch})")


def _accumulation_weights(loader: DataLoader, accumulate: int) -> list[float]:
    """Each batch's share of the videos of its optimizer step (``accumulate`` batches per step,
    the last step of an epoch possibly fewer): weighting each batch's mean loss by it makes the
    accumulated gradients those of the whole step's mean loss."""
    n, size = len(loader.sampler), loader.batch_size
    sizes = [min(size, n - i * size) for i in range(len(loader))]
    weights = []
    for i, b in enumerate(sizes):
        start = i - i % accumulate
        weights.append(b / sum(sizes[start:start + accumulate]))
    return weights


def _train_epoch(run: _Run, loader: DataLoader, d: Dist) -> tuple[float, float]:
    """One pass over this rank's shard of the training videos; an optimizer step every
    ``accumulate`` batches (gradient accumulation; under DDP, gradients are synchronised on the
    last batch of each step only).

    Returns:
        ``(training loss averaged over all ranks, learning rate of the epoch's last step)``.
    """
    config, head, optimizer, scaler = run.config, run.head, run.optimizer, run.scaler
    torch.manual_seed(epoch_seed(config.seed, run.epoch, d.rank))  # dropout of this epoch
    loader.sampler.set_epoch(run.epoch)
    run.model.train()
    loss_sum, count, lr = 0.0, 0, optimizer.param_groups[0]["lr"]
    accumulate = config.accumulate
    weights = _accumulation_weights(loader, accumulate)
    bar = progress(loader, desc=f"epoch {run.epoch}/{config.epochs}", unit="batch",
                   enabled=config.progress and d.main, nested=True, leave=False)
    for i, batch in enumerate(bar):
        step_ends = i % accumulate == accumulate - 1 or i == len(weights) - 1
        if i % accumulate == 0:
            optimizer.zero_grad(set_to_none=True)
        inputs = head_inputs(batch, head.features, run.device)
        target = batch["target"].to(run.device, non_blocking=True)
        sync = contextlib.nullcontext() if step_ends or not d.enabled else run.model.no_sync()
        with sync:
            with torch.autocast("cuda", dtype=torch.float16, enabled=run.use_amp):
                logits = run.model(inputs)
            loss = loss_fn(run.data.labels.task, logits, target)
            scaler.scale(loss * weights[i]).backward()
        if not step_ends:
            loss_sum += float(loss.detach()) * len(target)
            count += len(target)
            continue
        if config.grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(head.parameters(), config.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        scaler.step(optimizer)
        scaler.update()
        run.scheduler.step()
        loss_sum += float(loss.detach()) * len(target)
        count += len(target)
        bar.set_postfix(loss=f"{loss_sum / count:.4f}")
    bar.close()
    train_loss = all_mean(d, loss_sum, count, run.device)
    if not math.isfinite(train_loss):
        raise UsageError(f"the training loss became {train_loss} at epoch {run.epoch}; lower "
                         "--lr or check the features for NaN/inf")
    return train_loss, lr


def _evaluate_and_save(run: _Run, val_loader: DataLoader, train_loss: float, lr: float,
                       t0: float, log: Callable[[str], None]) -> dict:
    """Rank 0's end of an epoch: validate, update the best epoch, write the run files and log
    the epoch's line.

    Returns:
        The epoch's ``metrics.jsonl`` record.
    """
    select, task = run.select, run.data.labels.task
    record = {"epoch": run.epoch, "lr": lr, "train_loss": train_loss, "val_loss": None}
    metrics: dict[str, float] = {}
    if select.has_val:
        _, y, scores, record["val_loss"] = predict_scores(run.head, val_loader, task, run.device,
                                                          run.use_amp)
        metrics = compute_metrics(task, y, scores)
        record.update({f"val_{k}": v for k, v in metrics.items()})
        metrics["loss"] = record["val_loss"]
    value = record[select.name]
    record["best"] = select.improved(value, run.best)
    if record["best"]:
        run.best, run.best_epoch = value, run.epoch
    record["seconds"] = round(time.perf_counter() - t0, 3)

    saved = dict(head=run.head, head_name=run.config.head, task=task, vocab=run.data.labels.vocab,
                 features=run.data.feature_attrs, shot_config=run.data.shot_config,
                 frame_config=run.data.frame_config, epoch=run.epoch, metrics=metrics,
                 train_config=_plain_config(run.config), optimizer=run.optimizer,
                 scheduler=run.scheduler, best_metric=run.best, rng=get_rng_state())
    if record["best"]:
        save_checkpoint(run.files.best, **saved)
    run.records.append(record)
    write_records(run.files.metrics, run.records)
    save_checkpoint(run.files.last, **saved)
    render_curve(run.records, run.files.curve, select.metric if select.has_val else None)

    if run.config.progress:
        log(f"epoch {run.epoch}/{run.config.epochs}  lr {lr:.2e}  train_loss {train_loss:.4f}"
            + (f"  val_loss {record['val_loss']:.4f}  {select.name} {value:.4f}"
               if select.has_val else "")
            + ("  *best*" if record["best"] else "") + f"  {record['seconds']:.1f}s")
    return record
