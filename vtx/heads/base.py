"""What every stage-2 head shares: the config base, the head skeleton, batch checking and the
attention summaries.

The head contract (see ``vtx/heads/__init__.py``) is the same for every paper's head, so the
pieces that enforce it live here once:

* :class:`HeadConfig`, the base of every head's config dataclass: the checks the configs share
  (``n_outputs``, ``d_model`` / ``n_heads``, dropout, positive sizes, choices),
  :meth:`HeadConfig.with_input_widths`, which sets the widths of the features a config reads,
  the size presets (``PRESETS``, ``--size paper``) and ``LEGACY``, the values that fields added
  later take when a checkpoint saved before them is loaded.
* :class:`Head`, the timm-style skeleton: ``forward = forward_head(forward_features(batch))``,
  batch reading and checking, input standardisation, ``no_weight_decay()`` and
  ``set_grad_checkpointing()``.
* :class:`PatchTokenConfig` and :class:`PatchTokenHead`, the part TimeSformer and MEViT share:
  one frame-level feature of patch tokens, a CLS token in ``embed.cls``, ``head(norm(cls))``.
* :func:`cls_attention_to_tokens` and :func:`normalise_attention`, which turn CLS attention into
  one weight per token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vtx.features import default_dims

__all__ = [
    "DEFAULT_FEATURE_DIMS",
    "LEVELS",
    "Head",
    "HeadConfig",
    "PatchTokenConfig",
    "PatchTokenHead",
    "cls_attention_to_tokens",
    "input_shape",
    "normalise_attention",
    "uniform_attention",
]

#: Feature width of each built-in stage-1 feature (from the registry), used as config defaults.
DEFAULT_FEATURE_DIMS: dict[str, int] = default_dims()

#: Token axes a head can run on: one token per shot, or one per sampled frame.
LEVELS = ("shot", "frame")


def input_shape(width: int | tuple[int, ...]) -> tuple[int, ...]:
    """Token shape of an :attr:`Head.inputs` entry: ``D`` -> ``(D,)``, a tuple unchanged."""
    return (int(width),) if isinstance(width, int) else tuple(int(w) for w in width)


@dataclass
class HeadConfig:
    """Base of the heads' config dataclasses.

    ``__post_init__`` runs the checks every config shares, found by field name: ``n_outputs >= 1``;
    with ``d_model`` and ``n_heads``, both >= 1 and ``d_model`` divisible by ``n_heads``; every
    field whose name ends in ``dropout`` in ``[0, 1)``. A subclass calls ``super().__post_init__()``
    and adds its own checks, using :meth:`check_positive` and :meth:`check_choice` for the common
    kinds.

    Class attributes:
        PRESETS: Named sizes, ``{"paper": {field: value}}``: the paper's model size
            (``vtx train-head --size paper``); options given explicitly win over a preset.
        LEGACY: ``{field: value}`` for fields added after checkpoints already existed: the value
            that reproduces the behaviour of a config saved without the field (the field's
            default is the paper's behaviour, for new configs). Applied by
            :func:`vtx.heads.saved_config` when a checkpoint is loaded.

    Attributes:
        n_outputs: Number of logits (labels).
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    LEGACY: ClassVar[dict[str, Any]] = {}

    n_outputs: int

    def __post_init__(self):
        self.check_positive("n_outputs")
        names = [f.name for f in dataclasses.fields(self)]
        if "d_model" in names and "n_heads" in names:
            self.check_positive("d_model", "n_heads")
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        for name in names:
            if name.endswith("dropout") and not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    def check_positive(self, *names: str) -> None:
        """Raise ValueError naming the first of the int fields ``names`` that is below 1."""
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def check_choice(self, name: str, choices: tuple) -> None:
        """Raise ValueError, listing ``choices``, if field ``name`` is not one of them."""
        if getattr(self, name) not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")

    # ------------------------------------------------------------------ input widths
    def input_width_fields(self) -> dict[str, str]:
        """The config field that holds the width of each feature this config reads.

        ``{feature: field}``, in reading order. The field holds an int, or a dict keyed by
        feature (the baselines' ``feature_dims``). Features whose token shape follows from the
        architecture alone (MM-ViT's ``motion`` and ``residual``) have no entry. For a shaped
        feature such as ``vit_patches`` ``(n_patches, D)`` the field is the last axis, ``D``.
        """
        return {}

    def with_input_widths(self, widths: Mapping[str, int]) -> HeadConfig:
        """A copy of this config with the width of every feature it reads taken from ``widths``.

        Features this config does not read, or whose token shape is fixed by the architecture
        (see :meth:`input_width_fields`), are ignored. For a shaped feature (``vit_patches``
        ``(n_patches, D)``) the width is the last axis ``D``; the other axes are architecture
        (``n_patches``) and stay as they are.

        Args:
            widths: ``{feature: D}``, e.g. the cache's ``dim`` attributes.

        Returns:
            A config of the same type, checked again (``dataclasses.replace``).
        """
        changes: dict[str, Any] = {}
        for feature, name in self.input_width_fields().items():
            if feature not in widths:
                continue
            current = changes.get(name, getattr(self, name))
            width = int(widths[feature])
            changes[name] = {**current, feature: width} if isinstance(current, Mapping) else width
        return dataclasses.replace(self, **changes)


class Head(nn.Module):
    """Base class of the heads: the contract's properties, batch reading and the forward skeleton.

    Subclasses set the class attribute ``Config`` (a :class:`HeadConfig`), store their config as
    ``self.config``, implement :attr:`level`, :meth:`forward_features` and :meth:`forward_head`,
    and override :attr:`inputs` for shaped features and :meth:`no_weight_decay` for parameters
    such as a CLS token. ``forward`` is not overridden: it is the contract.
    """

    Config: ClassVar[type[HeadConfig]]
    config: HeadConfig

    def forward(self, batch: dict[str, Tensor], return_attention: bool = False):
        """Classify a batch (the contract in ``vtx/heads/__init__.py``).

        Args:
            batch: ``{feature: (B, L, *shape)}`` for each of :attr:`features`, plus ``"mask"`` ``(B, L)``.
            return_attention: Also return how much the head attends to each token.

        Returns:
            Logits ``(B, n_outputs)``; with ``return_attention``, ``(logits, attn)``, ``attn``
            ``(B, L)``: 0 at padding, each row summing to 1 over real tokens (see the head's
            :meth:`forward_features` for what it measures).
        """
        features, attn = self.forward_features(batch, return_attention)
        logits = self.forward_head(features)
        return (logits, attn) if return_attention else logits

    def forward_features(self, batch: dict[str, Tensor], return_attention: bool = False) -> tuple[Any, Tensor | None]:
        """Read the batch and run the body of the head up to the pooled representation.

        Returns:
            ``(features, attn)``: what :meth:`forward_head` takes (CLS output, pooled tokens, or
            one per stream), and ``attn`` ``(B, L)`` as in :meth:`forward`, or None without
            ``return_attention``.
        """
        raise NotImplementedError

    def forward_head(self, features: Any) -> Tensor:
        """Logits ``(B, n_outputs)`` from what :meth:`forward_features` returned."""
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        """Names (as in ``named_parameters()``) of parameters with ``ndim >= 2`` that must not get
        weight decay, such as CLS tokens; 1-d parameters (biases, norms) never get it anyway."""
        return set()

    def set_grad_checkpointing(self, enable: bool = True) -> bool:
        """Turn activation checkpointing of the head's layer stacks on or off (timm's name).

        While training, each layer of a :class:`~vtx.heads.blocks.TransformerEncoder` or
        :class:`~vtx.heads.blocks.SpaceTimeStack` then keeps only its input for the backward
        pass and is recomputed there: the gradients are the same, the saved activations are
        about one layer's instead of all of them, for about a third more compute.

        Returns:
            Whether the head has a stack to checkpoint (the baselines have none).
        """
        found = False
        for m in self.modules():
            if hasattr(m, "grad_checkpointing"):
                m.grad_checkpointing = bool(enable)
                found = True
        return found

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
        ``(B, L, D)``, or a tuple for shaped tokens, e.g. ``(196, 768)`` for ``(B, L, 196, 768)``.

        By default the widths named by the config's :meth:`HeadConfig.input_width_fields`;
        heads with shaped tokens override this.
        """
        cfg = self.config
        out = {}
        for feature, name in cfg.input_width_fields().items():
            value = getattr(cfg, name)
            out[feature] = value[feature] if isinstance(value, Mapping) else value
        return out

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


def normalise_attention(weights: Tensor, mask: Tensor) -> Tensor:
    """Attention mass per token ``(B, L)`` -> 0 at padding, each row summing to 1 over real tokens."""
    w = weights.float().masked_fill(~mask, 0.0)  # (B, L)
    return w / w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


def cls_attention_to_tokens(cls_row: Tensor, mask: Tensor) -> Tensor:
    """Average CLS attention over heads, drop CLS's weight on itself and renormalise.

    Args:
        cls_row: Attention probabilities from CLS ``(B, H, 1 + L)``, CLS key first.
        mask: True for real tokens ``(B, L)``.

    Returns:
        ``(B, L)``: 0 at padding, each row summing to 1 over real tokens.
    """
    return normalise_attention(cls_row[:, :, 1:].mean(dim=1), mask)  # (B, L)


def uniform_attention(mask: Tensor) -> Tensor:
    """Uniform weights over real tokens ``(B, L)``, for heads without attention."""
    w = mask.float()
    return w / w.sum(dim=1, keepdim=True)


@dataclass
class PatchTokenConfig(HeadConfig):
    """Fields shared by the heads over one frame-level feature of patch tokens (TimeSformer, MEViT).

    Attributes:
        feature: Frame-level cache dataset of patch tokens, ``(n_patches, feature_dim)`` per frame.
        feature_dim: Width of each patch token.
        n_patches: Patches per frame, a square grid (196 = 14 x 14 for ViT-B/16 at 224 px).
        n_frames: Rows of the learned time embedding: the most frames a video may give
            (train with ``--max-tokens n_frames``; 8 in the papers).
        d_model: Block width (768 = ViT-B).
        n_heads: Attention heads (12 = ViT-B).
        depth: Blocks (12 in the papers; the cached tokens already went through a ViT, so a few
            suffice here).
    """

    feature: str = "vit_patches"
    feature_dim: int = DEFAULT_FEATURE_DIMS["vit_patches"]
    n_patches: int = 196
    n_frames: int = 8
    d_model: int = 768
    n_heads: int = 12
    depth: int = 4

    def __post_init__(self):
        super().__post_init__()
        self.check_positive("feature_dim", "n_patches", "n_frames", "depth")

    def input_width_fields(self) -> dict[str, str]:
        return {self.feature: "feature_dim"}


class PatchTokenHead(Head):
    """Heads over one frame-level patch-token feature (``config.feature``, ``(n_patches, dim)``):
    read, embed, blocks, norm, head.

    Subclasses build ``embed`` (a ``SpaceTimeEmbedding``, whose CLS token is ``embed.cls``), their
    blocks, then ``norm`` and ``head``, and implement :meth:`forward_blocks`. The CLS output is
    classified as ``head(norm(cls))`` (TimeSformer Eq. 9, MEViT Eq. 10).
    """

    config: PatchTokenConfig

    @property
    def inputs(self) -> dict[str, tuple[int, int]]:
        return {self.config.feature: (self.config.n_patches, self.config.feature_dim)}

    @property
    def level(self) -> str:
        return "frame"

    def no_weight_decay(self) -> set[str]:
        return {"embed.cls"}

    def forward_blocks(self, x: Tensor, cls: Tensor, mask: Tensor, return_attention: bool = False
                       ) -> tuple[Tensor, Tensor | None]:
        """Run the blocks on embedded patches ``x`` ``(B, T, N, D)`` and CLS ``(B, D)``.

        Returns:
            ``(cls, mass)``: CLS ``(B, D)`` after the last layer; ``mass`` ``(B, T)``, CLS's
            attention in the last layer that updates it, averaged over heads and summed over each
            frame's patches (unnormalised), or None without ``return_attention``.
        """
        raise NotImplementedError

    def forward_features(self, batch: dict[str, Tensor], return_attention: bool = False
                         ) -> tuple[Tensor, Tensor | None]:
        """CLS after the blocks, and CLS attention per frame.

        Args:
            batch: ``{feature: (B, L, n_patches, feature_dim), "mask": (B, L)}``, ``L <= n_frames``.
            return_attention: Also return CLS attention per frame.

        Returns:
            ``(cls, attn)``: ``cls`` ``(B, d_model)``; ``attn`` ``(B, L)`` (or None) is the ``mass``
            of :meth:`forward_blocks` normalised to sum to 1 over real frames (0 at padding).
        """
        feats, mask = self.read_batch(batch)
        x, cls = self.embed(feats[self.config.feature])  # (B, L, N, d), (B, d)
        cls, mass = self.forward_blocks(x, cls, mask, return_attention)
        return cls, (normalise_attention(mass, mask) if return_attention else None)

    def forward_head(self, cls: Tensor) -> Tensor:
        """Logits ``(B, n_outputs)`` from CLS ``(B, D)``."""
        return self.head(self.norm(cls))
