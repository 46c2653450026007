"""Head checkpoints: one ``torch.save``'d dict that rebuilds a trained head with nothing else.

As in nanoGPT (which saves ``model_args`` and rebuilds ``GPTConfig(**model_args)``), the head's
name and ``dataclasses.asdict(head.config)`` travel with the weights, together with the label
vocabulary and the identity of the cache features it was trained on, so ``vtx predict`` and
``vtx evaluate`` need only the file. The contract (version 1)::

    {
      "format": "vtx-head", "version": 1, "vtx_version": str,
      "head": str,                       # key of vtx.heads.HEADS
      "head_config": dict,               # dataclasses.asdict(head.config); fields missing
                                         # from an older file take Config.LEGACY's values
      "state_dict": dict[str, Tensor],   # head.state_dict(), on the CPU
      "task": "multilabel" | "multiclass" | "regression",
      "vocab": list[str],                # output order; [] for regression
      "level": "shot" | "frame",
      "features": {name: {"model", "weights", "weights_file", "dim", "sampling"}},
      "shot_config": str | None,         # the cache's root shot_config attr (JSON)
      "frame_config": str | None,        # the cache's root frame_config attr (JSON)
      "epoch": int,                      # completed epochs (1-based)
      "metrics": dict[str, float],       # val metrics at that epoch (+ "loss")
      "train_config": dict,              # asdict(TrainConfig), paths as str
      "optimizer": dict | None, "scheduler": dict | None,   # state_dicts
      "best_metric": float | None,       # best selection metric so far
      "rng": dict | None,                # {"python", "numpy", "torch", "cuda"} states
    }

Every value is a plain Python type or a tensor, so ``torch.load(..., weights_only=True)``
reads it. Files are written atomically (temporary file, fsync, ``os.replace``).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import random
from collections.abc import Mapping
from pathlib import Path, PurePath

import numpy as np
import torch
from torch import nn

from vtx import __version__
from vtx.errors import UsageError
from vtx.heads import HEADS, build_head, saved_config

__all__ = ["FORMAT", "VERSION", "CheckpointError", "get_rng_state", "load_checkpoint",
           "read_checkpoint", "save_checkpoint", "set_rng_state", "to_plain"]

FORMAT = "vtx-head"
VERSION = 1


class CheckpointError(UsageError):
    """A file is not a usable vtx head checkpoint."""


def to_plain(value):
    """Paths to str, tuples to lists, recursively: what ``weights_only`` loading accepts."""
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def get_rng_state() -> dict:
    """The Python, NumPy, torch (and CUDA) RNG states, as plain types and tensors."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                       float(cached)],
             "torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    return state


def set_rng_state(state: Mapping) -> None:
    """Restore what :func:`get_rng_state` returned."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda = list(state["cuda"])[: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)


def _head_name(head: nn.Module) -> str:
    for name, cls in HEADS.items():
        if type(head) is cls:
            return name
    raise CheckpointError(f"{type(head).__name__} is not a registered head "
                          f"({', '.join(sorted(HEADS))})")


def save_checkpoint(path: str | Path, *, head: nn.Module, task: str, vocab: list[str],
                    features: Mapping[str, Mapping], shot_config: str | None = None,
                    frame_config: str | None = None, epoch: int = 0,
                    metrics: Mapping | None = None, train_config=None,
                    optimizer: torch.optim.Optimizer | None = None, scheduler=None,
                    best_metric: float | None = None, rng: Mapping | None = None,
                    head_name: str | None = None) -> Path:
    """Write a checkpoint atomically.

    Args:
        path: the file to write (its folder must exist).
        head: the head (unwrapped from DDP); its class gives the name unless ``head_name``.
        task: the label task.
        vocab: class names in output order ([] for regression).
        features: ``{feature: cache dataset attrs}``.
        shot_config: the cache's root ``shot_config`` attr.
        frame_config: the cache's root ``frame_config`` attr (frame sampling).
        epoch: completed epochs.
        metrics: validation metrics at ``epoch``.
        train_config: a ``TrainConfig`` (or a dict); stored as a plain dict.
        optimizer: its ``state_dict()`` is stored.
        scheduler: its ``state_dict()`` is stored.
        best_metric: best selection metric so far.
        rng: RNG states (:func:`get_rng_state`).
        head_name: the key of :data:`vtx.heads.HEADS`.

    Returns:
        ``path``.
    """
    path = Path(path)
    if dataclasses.is_dataclass(train_config):
        train_config = dataclasses.asdict(train_config)
    ckpt = {
        "format": FORMAT,
        "version": VERSION,
        "vtx_version": __version__,
        "head": head_name or _head_name(head),
        "head_config": to_plain(dataclasses.asdict(head.config)),
        "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
        "task": task,
        "vocab": list(vocab),
        "level": head.level,
        "features": to_plain(dict(features)),
        "shot_config": shot_config,
        "frame_config": frame_config,
        "epoch": int(epoch),
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "train_config": to_plain(train_config) if train_config is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "best_metric": None if best_metric is None else float(best_metric),
        "rng": to_plain(rng) if rng is not None else None,
    }
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        try:
            with open(tmp, "wb") as fh:
                try:
                    torch.save(ckpt, fh)
                except RuntimeError as e:  # torch's zip writer hides the OSError of a full disk
                    raise _disk_full_or(e, tmp, path) from e
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as e:  # a buffered write that failed on flush or close names no file
            if e.filename is None:
                raise OSError(e.errno, e.strerror, str(path)) from e
            raise
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _disk_full_or(error: RuntimeError, tmp: Path, path: Path) -> Exception:
    """What a failed ``torch.save`` into ``tmp`` should raise: ``OSError(ENOSPC)`` naming
    ``path`` when the file system is (nearly) full, which the CLI reports as a full disk (exit
    5), else the error itself. PyTorch's writer turns a failed write into ``RuntimeError("...
    unexpected pos ...")`` and the errno is lost, so the free space decides."""
    import errno
    import shutil

    try:
        free = shutil.disk_usage(tmp.parent).free
    except OSError:
        return error
    if free < FULL_BELOW:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return error


FULL_BELOW = 1 << 20
"""Free bytes under which a failed checkpoint write is taken for a full disk."""


def read_checkpoint(path: str | Path) -> dict:
    """Load and check a checkpoint dict (tensors on the CPU) without building the head.

    Raises:
        CheckpointError: missing file, not a torch file, or not a vtx head checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError,
            KeyError, IndexError, TypeError, AttributeError) as e:  # garbage unpickles oddly
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a vtx head checkpoint (torch.load failed: "
                              f"{first}); pass a best.pt/last.pt written by vtx train-head, "
                              f"or its run folder") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a torch file but not a vtx head checkpoint (no "
                              f"format={FORMAT!r}); pass a best.pt/last.pt written by "
                              f"vtx train-head, or its run folder")
    if not isinstance(ckpt.get("version"), int) or ckpt["version"] > VERSION:
        raise CheckpointError(f"{path} has checkpoint version {ckpt.get('version')!r}, made by "
                              f"vtx {ckpt.get('vtx_version')}; this vtx ({__version__}) reads "
                              f"version {VERSION}; upgrade vtx")
    missing = [k for k in ("head", "head_config", "state_dict", "task", "vocab", "level",
                           "features") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}; it is not a complete vtx head checkpoint")
    return ckpt


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the head of a checkpoint and load its weights (on the CPU, in eval mode).

    Returns:
        ``(head, ckpt)``.

    Raises:
        CheckpointError: not a vtx checkpoint, an unknown head, or weights that do not fit.
    """
    ckpt = read_checkpoint(path)
    try:
        head = build_head(ckpt["head"], **saved_config(ckpt["head"], ckpt["head_config"]))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot rebuild head {ckpt['head']!r} ({e}); it was "
                              f"written by vtx {ckpt.get('vtx_version')}") from e
    try:
        head.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit head {ckpt['head']!r}: {e}") from e
    head.eval()
    return head, ckpt
