"""``--shard K/N``: a stable subset of the videos for one of N workers (Slurm arrays, torchrun).

A video belongs to shard ``sha1(relative path) mod N``: the same video always lands in the same
shard, whatever the listing order, the other videos or the machine. ``--shard auto`` takes K
and N from torchrun's ``RANK`` and ``WORLD_SIZE`` (one shard when they are not set), and its
``LOCAL_RANK`` picks the GPU (``cuda:LOCAL_RANK``) when ``--device auto`` finds CUDA.
"""

from __future__ import annotations

import hashlib
import os
from typing import NamedTuple

from vtx.errors import UsageError


class Shard(NamedTuple):
    """Shard ``index`` of ``count`` (0-based)."""

    index: int
    count: int

    def owns(self, relpath: str) -> bool:
        """Whether the video with this relative path belongs to this shard."""
        return self.count == 1 or shard_of(relpath, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_of(relpath: str, count: int) -> int:
    """The shard (0 .. count-1) of a video's relative POSIX path."""
    digest = hashlib.sha1(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def parse_shard(text: str | None, environ: dict | None = None) -> Shard | None:
    """``K/N``, ``auto`` or None.

    Raises:
        UsageError: a malformed value, or K outside 0..N-1.
    """
    if text is None or text == "":
        return None
    env = os.environ if environ is None else environ
    if text == "auto":
        try:
            rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
        except ValueError as e:
            raise UsageError(f"--shard auto: RANK/WORLD_SIZE are not integers ({e})") from e
        return _checked(rank, world, f"auto (RANK={rank}, WORLD_SIZE={world})")
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: give K/N (e.g. 0/4, or "
                         f"$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT) or auto") from None
    return _checked(k, n, text)


def _checked(k: int, n: int, given: str) -> Shard:
    if n < 1 or not 0 <= k < n:
        raise UsageError(f"--shard {given}: K must be in 0..N-1 and N at least 1")
    return Shard(k, n)


def auto_device(device: str, environ: dict | None = None) -> str:
    """``--device auto`` under torchrun: ``cuda:LOCAL_RANK`` when CUDA is there."""
    env = os.environ if environ is None else environ
    if device != "auto" or "LOCAL_RANK" not in env:
        return device
    import torch
    if not torch.cuda.is_available():
        return device
    return f"cuda:{int(env['LOCAL_RANK']) % torch.cuda.device_count()}"
