"""``vtx train-head`` and ``vtx evaluate``: stage 2 from the command line.

Each command parses its options into a config (``TrainConfig``, or ``evaluate_run``'s
arguments) and makes one library call (:func:`vtx.train.trainer.train_head`,
:func:`vtx.train.evaluate.evaluate_run`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import click

from vtx.cli.config_file import config_option
from vtx.errors import UsageError, VtxError

__all__ = ["HEAD_OPTIONS", "evaluate", "head_options", "train_head"]

#: Named head options: CLI option -> head config field. Applied only to heads that have it.
HEAD_OPTIONS = {
    "--streams": "streams",
    "--fusion": "fusion",
    "--lambda": "lam",
    "--audio": "audio",
    "--window": "window",
    "--pos": "pos",
    "--layers": "n_layers",
    "--d-model": "d_model",
    "--heads": "n_heads",
    "--dropout": "dropout",
    "--depth": "depth",
    "--attention": "attention",
    "--block-size": "block_size",
    "--time-layers": "time_layers",
    "--class-attention-layers": "class_attention_layers",
    "--variant": "variant",
    "--cross": "cross",
    "--order": "order",
    "--modalities": "modalities",
}

TRAIN_EXIT_CODES = """\b
Exit codes:
  0  trained (or the resumed run had already finished)
  1  unexpected internal error
  2  bad usage or setup: invalid options, unknown head or head option,
     unreadable labels, a feature missing from the cache, random and
     official features mixed, no labelled video in the cache, a run
     already in --out without --resume, or --resume with other settings,
     a read-only --out (refused before training)
  5  the disk of --out is full (checkpoints already written stay whole;
     rerun with --resume after freeing space)
  6  the feature cache is damaged (see vtx check)"""

EVALUATE_EXIT_CODES = """\b
Exit codes:
  0  evaluated
  1  unexpected internal error
  2  bad usage or setup: not a vtx checkpoint, labels or cache features
     that do not match the checkpoint, no labelled video in the split
  6  the feature cache is damaged (see vtx check)"""


def _fail(e: VtxError) -> None:
    """As ``vtx.cli.main._fail`` (not imported: ``python -m vtx.cli.main`` imports this module
    while ``vtx.cli.main`` is still loading). Under torchrun only rank 0 prints."""
    if os.environ.get("RANK", "0") == "0":
        click.echo(f"vtx: error: {e}", err=True)
    sys.exit(e.exit_code)


class _BatchSize(click.ParamType):
    """A positive int, or ``auto``."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        if value == "auto" or isinstance(value, int):
            return value
        try:
            return int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither a number nor 'auto'", param, ctx)


BATCH_SIZE = _BatchSize()


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def head_options(name: str, named: dict, sets: tuple[str, ...]) -> dict:
    """Map the CLI's head options onto head config fields.

    Args:
        name: the head.
        named: ``{"--layers": 2, ...}`` for the named options given (None means not given).
        sets: ``key=value`` strings from ``--set``; values are parsed as JSON when they can be.

    Raises:
        UsageError: unknown head, an option the head lacks (the head's valid options are
            listed), a malformed ``--set`` or a field given twice.
    """
    from vtx.heads import config_class

    try:
        fields = [f.name for f in dataclasses.fields(config_class(name)) if f.name != "n_outputs"]
    except ValueError as e:
        raise UsageError(str(e)) from e
    named_ok = [opt for opt, fld in HEAD_OPTIONS.items() if fld in fields]
    rest = [f for f in fields if f not in HEAD_OPTIONS.values()]
    valid = ", ".join(named_ok + [f"--set {f}=..." for f in rest])

    options: dict = {}
    for opt, value in named.items():
        if value is None:
            continue
        fld = HEAD_OPTIONS[opt]
        if fld not in fields:
            raise UsageError(f"head {name!r} has no option {opt}; its options are: {valid}")
        options[fld] = value
    for item in sets:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. --set hidden=128")
        if key not in fields:
            raise UsageError(f"head {name!r} has no config field {key!r} (--set {item}); its "
                             f"options are: {valid}")
        if key in options:
            raise UsageError(f"head option {key!r} is given twice")
        options[key] = _parse_value(text)
    return options


@click.command("train-head", epilog=TRAIN_EXIT_CODES)
@config_option(aliases={"head": "name"})
@click.argument("name")
@click.option("--features", required=True, type=click.Path(path_type=Path),
              help="Feature cache written by vtx extract (feats.h5).")
@click.option("--labels", required=True, type=click.Path(path_type=Path),
              help="Label CSV (video,labels|value[,split]), LVU task file or LVU task folder.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Run folder: metrics.jsonl, last.pt, best.pt, learning_curve.png.")
@click.option("--epochs", type=int, default=30, show_default=True)
@click.option("--batch-size", type=BATCH_SIZE, default="16", show_default=True,
              help="Videos per forward pass (per process under torchrun), or 'auto': the "
                   "largest that fits the device's memory (estimated, then tried on CUDA).")
@click.option("--accumulate", type=click.IntRange(min=1), default=1, show_default=True,
              help="Gradient accumulation: one optimizer step per N batches (an effective "
                   "batch N times larger, the same gradients).")
@click.option("--grad-checkpoint", is_flag=True,
              help="Activation checkpointing: recompute each layer in the backward pass "
                   "instead of keeping its activations (less memory, ~1/3 more compute).")
@click.option("--size", type=click.Choice(["default", "paper"]), default="default",
              show_default=True,
              help="Head size: the head's defaults, or the paper's (stan, vtn, timesformer, "
                   "mevit, mmvit); explicit head options override it.")
@click.option("--lr", type=float, default=3e-4, show_default=True, help="Peak AdamW learning rate.")
@click.option("--weight-decay", type=float, default=0.05, show_default=True)
@click.option("--warmup-epochs", type=int, default=2, show_default=True,
              help="Linear warm-up, then cosine decay (stepped per batch).")
@click.option("--grad-clip", type=float, default=1.0, show_default=True,
              help="Max gradient norm; 0 turns clipping off.")
@click.option("--patience", type=int, default=10, show_default=True,
              help="Stop after this many epochs without a better validation metric.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--task", type=click.Choice(["multilabel", "multiclass", "regression"]), default=None,
              help="Label task [default: inferred from the labels].")
@click.option("--val-frac", type=float, default=0.2, show_default=True,
              help="Share of videos hashed into val when the labels give no split.")
@click.option("--max-tokens", type=int, default=None,
              help="Keep at most this many evenly spaced tokens per video [default: all].")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt.")
@click.option("--amp/--no-amp", default=True, show_default=True,
              help="fp16 autocast with gradient scaling (CUDA only).")
@click.option("--loader-workers", type=int, default=0, show_default=True,
              help="DataLoader processes reading tokens from the cache (0: read in the "
                   "training process).")
@click.option("--cache-mb", type=int, default=1024, show_default=True,
              help="Memory budget per process for recently read videos' tokens; tokens "
                   "stream from the cache, so memory does not grow with it.")
@click.option("--streams", type=click.Choice(["spatial", "temporal", "both"]), default=None,
              help="[stan] Streams to use.")
@click.option("--fusion", type=click.Choice(["sum", "gated", "concat"]), default=None,
              help="[stan] Fusion of the streams.")
@click.option("--lambda", "lam", type=float, default=None,
              help="[stan] Weight of the temporal stream in sum fusion (config lam).")
@click.option("--audio/--no-audio", default=None, help="[stan] Add the VGGish audio stream.")
@click.option("--window", type=int, default=None, help="[vtn] Sliding attention window (even).")
@click.option("--pos", type=click.Choice(["learned", "fixed", "none"]), default=None,
              help="[vtn] Positional embedding.")
@click.option("--layers", type=int, default=None, help="Encoder (or LSTM) layers (config n_layers).")
@click.option("--d-model", type=int, default=None, help="Token width inside the head.")
@click.option("--heads", type=int, default=None, help="Attention heads (config n_heads).")
@click.option("--dropout", type=float, default=None, help="Dropout inside the head.")
@click.option("--depth", type=int, default=None,
              help="[timesformer, mevit, mmvit] Number of space-time blocks.")
@click.option("--attention", type=click.Choice(["divided", "joint", "space"]), default=None,
              help="[timesformer] Attention type.")
@click.option("--block-size", type=int, default=None,
              help="[mevit] Side M of the patch blocks temporal attention spans.")
@click.option("--time-layers", type=int, default=None,
              help="[mevit] Only the last L_t blocks attend over time.")
@click.option("--class-attention-layers", type=int, default=None,
              help="[mevit] CaiT-style layers that update only CLS.")
@click.option("--variant", type=click.IntRange(1, 4), default=None,
              help="[mmvit] 1 joint, 2 factorised, 3 time/cross-modal/space, 4 windowed 3.")
@click.option("--cross", type=click.Choice(["merged", "co", "shift-merge"]), default=None,
              help="[mmvit] Cross-modal attention of variants 3 and 4.")
@click.option("--order", default=None, help="[mmvit] Order of the attentions, e.g. TMS.")
@click.option("--modalities", default=None,
              help="[mmvit] Subset of I (patches), M (motion), R (residual), A (audio).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Any other head config field, e.g. --set hidden=128 (repeatable; values "
                   "parsed as JSON when possible).")
@click.option("--quiet", "-q", is_flag=True,
              help="No progress bar and no line per epoch (notes, warnings and the result "
                   "still print).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def train_head(name, features, labels, out, epochs, batch_size, lr, weight_decay, warmup_epochs,
               grad_clip, patience, device, seed, task, val_frac, max_tokens, resume, amp,
               accumulate, grad_checkpoint, size, loader_workers, cache_mb, streams, fusion, lam, audio, window, pos, layers, d_model, heads, dropout, depth,
               attention, block_size, time_layers, class_attention_layers, variant, cross, order,
               modalities, sets, quiet, as_json) -> None:
    """Train head NAME (stan, vtn, timesformer, mevit, mmvit, meanpool, lstm) on the cached
    features of labelled videos.

    Feature widths and the number of outputs come from the cache and the labels. Head options
    apply only to heads that have them. Under torchrun --nproc_per_node N the run uses
    distributed data parallel; rank 0 writes the files.

    Options can also come from --config head.toml (one key per option, plus head = "stan"
    for NAME; flags given here win); the run records the resolved settings in its checkpoints
    (train_config).
    """
    from vtx.train.trainer import TrainConfig, train_head as run_train

    named = {"--streams": streams, "--fusion": fusion, "--lambda": lam, "--audio": audio,
             "--window": window, "--pos": pos, "--layers": layers, "--d-model": d_model,
             "--heads": heads, "--dropout": dropout, "--depth": depth, "--attention": attention,
             "--block-size": block_size, "--time-layers": time_layers,
             "--class-attention-layers": class_attention_layers, "--variant": variant,
             "--cross": cross, "--order": order, "--modalities": modalities}
    try:
        config = TrainConfig(
            head=name, features=features, labels=labels, out=out, epochs=epochs,
            batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
            grad_clip=grad_clip, patience=patience, device=device, seed=seed, task=task,
            val_frac=val_frac, max_tokens=max_tokens, resume=resume, amp=amp,
            progress=not quiet, accumulate=accumulate, grad_checkpoint=grad_checkpoint,
            size=size,
            loader_workers=loader_workers, cache_mb=cache_mb, head_options=head_options(name, named, sets),
        )
        result = run_train(config)
    except VtxError as e:
        _fail(e)
    if os.environ.get("RANK", "0") != "0":
        return
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        click.echo(result.line())


@click.command("evaluate", epilog=EVALUATE_EXIT_CODES)
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--features", required=True, type=click.Path(path_type=Path),
              help="Feature cache holding the videos to evaluate.")
@click.option("--labels", required=True, type=click.Path(path_type=Path),
              help="Label file (read with the checkpoint's task and classes).")
@click.option("--split", type=click.Choice(["test", "val", "train", "all"]), default="test",
              show_default=True, help="Videos to evaluate; an empty split falls back to another.")
@click.option("--predictions-out", type=click.Path(path_type=Path), default=None,
              help="Write per-video probabilities (or values) to this CSV.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--quiet", "-q", is_flag=True,
              help="No progress on stderr (notes, warnings and the result still print).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def evaluate(run, features, labels, split, predictions_out, device, batch_size, quiet,
             as_json) -> None:
    """Evaluate RUN (a train-head run folder, which uses its best.pt, or a .pt checkpoint).

    Prints the task's metrics: mAP_weighted, mAP_macro, precision/recall/f1_weighted and a
    per-class table (multilabel), top1 and top5 (multiclass), or mse (regression).
    """
    from vtx.train.evaluate import evaluate_run, format_result

    try:
        result = evaluate_run(run, features, labels, split=split, predictions_out=predictions_out,
                              device=device, batch_size=batch_size, progress=not quiet)
    except VtxError as e:
        _fail(e)
    click.echo(json.dumps(result) if as_json else format_result(result))
