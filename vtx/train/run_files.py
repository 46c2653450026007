"""The files of a training run folder, other than the checkpoints' contents.

A run folder ``out`` holds ``last.pt`` and ``best.pt`` (written by
:func:`vtx.train.checkpoint.save_checkpoint`), ``metrics.jsonl`` (one JSON object per epoch)
and ``learning_curve.png`` (losses and the primary validation metric against the epoch). Files
are written to a temporary name and then renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from vtx.errors import ReadOnly, UsageError
from vtx.io.space import writable_reason

__all__ = ["RunFiles", "read_records", "render_curve", "write_records"]


@dataclass(frozen=True)
class RunFiles:
    """Where a run folder keeps each of its files."""

    out: Path

    @property
    def last(self) -> Path:
        return self.out / "last.pt"

    @property
    def best(self) -> Path:
        return self.out / "best.pt"

    @property
    def metrics(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def curve(self) -> Path:
        return self.out / "learning_curve.png"

    def check(self, resume: bool) -> None:
        """Refuse to resume a folder without ``last.pt``, to start a run over another one, or
        to run at all where the files cannot be written (checked before any training).

        Raises:
            UsageError: saying which flag to change.
            ReadOnly: ``out`` (or the folder it would be created in) cannot be written.
        """
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"--out {self.out} is a file; give a folder for the run")
        reason = writable_reason(self.out)
        if reason is not None:
            raise ReadOnly(f"--out {self.out}: the run's checkpoints and metrics cannot be "
                           f"written there: {reason}. Choose a writable folder for --out")
        if resume and not self.last.exists():
            raise UsageError(f"--resume: {self.last} does not exist, so there is nothing to "
                             "resume; drop --resume to start a new run")
        if not resume and (self.last.exists() or self.best.exists()):
            raise UsageError(f"{self.out} already holds a run (last.pt); pass --resume to "
                             "continue it, or choose another --out")


def read_records(path: Path, upto: int) -> list[dict]:
    """The ``metrics.jsonl`` records of epochs ``<= upto`` (none if the file is missing)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if r["epoch"] <= upto:
                records.append(r)
    return records


def write_records(path: Path, records: list[dict]) -> None:
    """Write ``records`` as ``metrics.jsonl``, one JSON object per line."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def render_curve(records: list[dict], path: Path, primary: str | None) -> None:
    """Losses (and the primary validation metric ``val_<primary>``) against the epoch, as a PNG.

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
