"""What every stage-2 head shares: the feature table, batch checking and the CLS-attention summary.

The head contract (see ``vtx/heads/__init__.py``) is the same for every paper's head, so the
pieces that enforce it live here once: :class:`Head` reads and checks a batch, and
:func:`cls_attention_to_tokens` turns per-head CLS attention into one weight per token.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

__all__ = ["DEFAULT_FEATURE_DIMS", "LEVELS", "Head", "cls_attention_to_tokens", "input_shape", "uniform_attention"]

#: Feature width of each stage-1 cache dataset, used as config defaults.
DEFAULT_FEATURE_DIMS: dict[str, int] = {"resnet18": 512, "r2plus1d": 512, "vit": 768, "vggish": 128}

#: Token axes a head can run on: one token per shot, or one per sampled frame.
LEVELS = ("shot", "frame")


def input_shape(width: int | tuple[int, ...]) -> tuple[int, ...]:
    """Token shape of an :attr:`Head.inputs` entry: ``D`` -> ``(D,)``, a tuple unchanged."""
    return (int(width),) if isinstance(width, int) else tuple(int(w) for w in width)


class Head(nn.Module):
    """Base class of the heads: the contract's properties and batch reading.

    Subclasses set the class attribute ``Config`` (a dataclass), store their config as
    ``self.config`` and implement :attr:`features`, :attr:`inputs` and :attr:`level`.
    """

    Config: ClassVar[type]

    # ------------------------------------------------------------ input standardisation
    # Each input feature can be standardised per dimension with the mean and std of the
    # training split (``vtx train-head`` sets them). They are buffers, so they travel in the
    # checkpoint's state_dict; a head without them reads its inputs unchanged.
    _NORM_MEAN, _NORM_STD = "_norm_mean__", "_norm_std__"

    def set_input_stats(self, stats: dict[str, tuple[Tensor, Tensor]], eps: float = 1e-5) -> None:
        """Standardise feature ``name`` as ``(x - mean) / (std + eps)`` from now on.

        Args:
            stats: ``{name: (mean, std)}`` for features this head reads. For a feature of width
                ``D`` they are ``(D,)``; for a shaped feature (``inputs[name]`` a tuple such as
                ``(196, 768)``) any shape that broadcasts to it, usually ``(D,)`` for the last
                axis (statistics over all tokens and patches) or the full token shape.
        """
        for name, (mean, std) in stats.items():
            if name not in self.inputs:
                raise ValueError(f"{type(self).__name__} does not read {name!r}")
            shape = input_shape(self.inputs[name])
            device = next(self.parameters()).device
            mean = torch.as_tensor(mean, dtype=torch.float32, device=device)
            std = torch.as_tensor(std, dtype=torch.float32, device=device)
            for what, t in (("mean", mean), ("std", std)):
                try:
                    fits = torch.broadcast_shapes(t.shape, shape) == shape
                except RuntimeError:
                    fits = False
                if not fits:
                    raise ValueError(
                        f"{type(self).__name__}: {what} of {name!r} has shape {tuple(t.shape)}, which does "
                        f"not broadcast to its token shape {shape}; give ({shape[-1]},) or {shape}"
                    )
            self.register_buffer(self._NORM_MEAN + name, mean)
            self.register_buffer(self._NORM_STD + name, std + eps)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key, value in state_dict.items():  # recreate the standardisation buffers
            for stem in (self._NORM_MEAN, self._NORM_STD):
                if key.startswith(prefix + stem) and "." not in key[len(prefix):]:
                    self.register_buffer(key[len(prefix):], torch.empty_like(value))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _standardise(self, name: str, x: Tensor) -> Tensor:
        mean = getattr(self, self._NORM_MEAN + name, None)
        if mean is None:
            return x
        return (x - mean) / getattr(self, self._NORM_STD + name)

    @property
    def features(self) -> tuple[str, ...]:
        """Cache dataset names this head reads, in a fixed order."""
        return tuple(self.inputs)

    @property
    def inputs(self) -> dict[str, int | tuple[int, ...]]:
        """Feature width of each cache dataset this head reads: an int ``D`` for token vectors
        ``(B, L, D)``, or a tuple for shaped tokens, e.g. ``(196, 768)`` for ``(B, L, 196, 768)``."""
        raise NotImplementedError

    @property
    def level(self) -> str:
        """Token axis: ``"shot"`` or ``"frame"``."""
        raise NotImplementedError

    def read_batch(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """Check a batch against :attr:`inputs` and zero its padded tokens.

        Zeroing padding means garbage there (even NaN or inf) cannot leak through a
        ``0 * NaN`` in a later matrix product.

        Args:
            batch: ``{name: (B, L, *shape)}`` for each feature (``shape`` is ``(D,)`` for an int
                in :attr:`inputs`, the tuple itself otherwise) plus ``"mask"``: bool ``(B, L)``.

        Returns:
            ``({name: (B, L, *shape) standardised, padding zeroed}, mask)``.

        Raises:
            ValueError: A feature or the mask is missing, or shapes disagree.
        """
        name = type(self).__name__
        if "mask" not in batch:
            raise ValueError(f"{name}: batch has no 'mask'; add a bool (B, L) tensor, True for real tokens")
        mask = batch["mask"]
        if mask.dtype != torch.bool or mask.dim() != 2:
            raise ValueError(
                f"{name}: batch['mask'] must be a bool (B, L) tensor, got {mask.dtype} {tuple(mask.shape)}"
            )
        feats = {}
        for key, dim in self.inputs.items():
            if key not in batch:
                raise ValueError(
                    f"{name} reads {list(self.inputs)} but the batch has no {key!r} "
                    f"(it has {sorted(batch)}); extract that feature in stage 1 or change the head config"
                )
            x = batch[key]
            shape = input_shape(dim)
            if x.shape != (*mask.shape, *shape):
                raise ValueError(
                    f"{name}: batch[{key!r}] has shape {tuple(x.shape)}, expected {(*mask.shape, *shape)} "
                    f"(mask (B, L) and the configured token shape {shape})"
                )
            x = self._standardise(key, x.float())
            pad = ~mask.view(*mask.shape, *(1,) * len(shape))  # (B, L, 1, ...)
            feats[key] = x.masked_fill(pad, 0.0)  # (B, L, *shape)
        return feats, mask


def cls_attention_to_tokens(cls_row: Tensor, mask: Tensor) -> Tensor:
    """Average CLS attention over heads, drop CLS's weight on itself and renormalise.

    Args:
        cls_row: Attention probabilities from CLS ``(B, H, 1 + L)``, CLS key first.
        mask: True for real tokens ``(B, L)``.

    Returns:
        ``(B, L)``: 0 at padding, each row summing to 1 over real tokens.
    """
    w = cls_row[:, :, 1:].mean(dim=1).masked_fill(~mask, 0.0)  # (B, L)
    return w / w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


def uniform_attention(mask: Tensor) -> Tensor:
    """Uniform weights over real tokens ``(B, L)``, for heads without attention."""
    w = mask.float()
    return w / w.sum(dim=1, keepdim=True)
