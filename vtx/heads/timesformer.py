"""TimeSformer: divided space-time attention over the cached ViT patch tokens of each frame.

Bertasius, Wang and Torresani, "Is Space-Time Attention All You Need for Video Understanding?"
(2021), Section 3:

* "Decomposition into patches" / "Linear embedding" (Eq. 1): the patch embedding ``E x`` is
  already done by the stage-1 ViT; its patch tokens (``vit_patches``, ``(196, 768)`` per sampled
  frame) are projected by ``proj`` (Linear ``feature_dim -> d_model``) instead. A learned space
  embedding (``N + 1`` rows, CLS first) and a learned time embedding (``n_frames`` rows; the
  first ``L`` are used for ``L`` frames) are added as in the authors' code, then a CLS token.
* "Query-Key-Value computation" (Eq. 2-4): pre-LayerNorm blocks, ``A`` heads of width ``D/A``.
* "Spatiotemporal self-attention models" (Eq. 5-8, Figure 1):
  ``attention="divided"`` (the paper's default, "T+S"): (a) temporal attention among the patches
  at the same position in every frame, CLS excluded; (b) its output goes through the
  zero-initialised ``temporal_fc`` before the residual add (``temporal_fc`` in the authors' code,
  ``temporal_dense`` in Hugging Face); (c) spatial attention within each frame, with CLS
  replicated into every frame and its outputs averaged over the (real) frames; (d) the MLP.
  ``"joint"`` ("ST"): one attention over all ``T * N + 1`` tokens. ``"space"`` ("S"): spatial
  attention only, frames independent except through CLS; as in the authors' code it adds no time
  embedding.
* "Classification embedding" (Eq. 9): ``y = LN(z_CLS)``, then a linear classifier.

One :class:`SpaceTimeBlock` matches Hugging Face's ``TimesformerLayer`` (tested). Its temporal
attention can also span ``M x M`` blocks of patches (``block_size``), which is MEViT's motion
self-attention (``vtx/heads/mevit.py``). Every attention is :class:`MultiHeadSelfAttention`.

Padding: frames whose mask is False are never keys, and CLS averages over real frames only, so
they cannot change the logits. Heads accept ``L <= n_frames`` frames; train with
``--max-tokens n_frames`` so every video gives at most ``n_frames``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Head
from .blocks import Mlp, MultiHeadSelfAttention

__all__ = [
    "ATTENTIONS",
    "SpaceTimeBlock",
    "SpaceTimeEmbedding",
    "TimeSformer",
    "TimeSformerConfig",
    "frame_attention",
    "patch_grid",
]

ATTENTIONS = ("divided", "joint", "space")
#: LayerNorm epsilon of TimeSformer (timm / the authors' code / Hugging Face).
LN_EPS = 1e-6


def patch_grid(n_patches: int) -> tuple[int, int]:
    """``(h, w)`` of a square patch grid, e.g. 196 -> (14, 14)."""
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise ValueError(f"n_patches={n_patches} is not a square grid; give h*w patches with h == w")
    return side, side


def frame_attention(scores: Tensor, mask: Tensor) -> Tensor:
    """Normalise per-frame CLS attention mass ``(B, T)`` to sum to 1 over real frames (0 at padding)."""
    w = scores.float().masked_fill(~mask, 0.0)
    return w / w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


class SpaceTimeEmbedding(nn.Module):
    """Project patch tokens, add learned space (``N + 1``) and time (``n_frames``) embeddings; make CLS.

    Args:
        feature_dim: Width of the cached patch tokens.
        dim: Model width.
        n_patches: Patches per frame ``N``.
        n_frames: Rows of the time embedding; inputs may have fewer frames (the first ``L`` rows
            are used), not more.
        time: Whether to add the time embedding.
        dropout: Dropout after adding the embeddings.
    """

    def __init__(self, feature_dim: int, dim: int, n_patches: int, n_frames: int, time: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        self.proj = nn.Linear(feature_dim, dim)
        self.cls = nn.Parameter(torch.zeros(1, dim))
        self.pos_space = nn.Parameter(torch.zeros(n_patches + 1, dim))  # CLS first
        self.pos_time = nn.Parameter(torch.zeros(n_frames, dim)) if time else None
        nn.init.trunc_normal_(self.cls, std=0.02)
        nn.init.trunc_normal_(self.pos_space, std=0.02)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Embed ``x`` ``(B, T, N, feature_dim)``; returns patches ``(B, T, N, D)`` and CLS ``(B, D)``."""
        B, T = x.shape[:2]
        x = self.proj(x) + self.pos_space[1:]  # (B, T, N, D)
        if self.pos_time is not None:
            if T > len(self.pos_time):
                raise ValueError(
                    f"{T} frames but the time embedding has {len(self.pos_time)}; build the head with "
                    f"n_frames >= {T} or train with --max-tokens {len(self.pos_time)}"
                )
            x = x + self.pos_time[:T, None, :]  # (B, T, N, D)
        cls = (self.cls + self.pos_space[:1]).expand(B, -1)  # (B, D)
        return self.drop(x), self.drop(cls)


class SpaceTimeBlock(nn.Module):
    """One TimeSformer block on patches ``(B, T, N, D)`` and an optional CLS ``(B, D)``.

    ``attention="divided"``: temporal attention (within groups of patches, see ``block_size``),
    ``temporal_fc``, residual; spatial attention per frame with CLS replicated and averaged over
    real frames, residual; MLP. ``"space"``: the same without the temporal part. ``"joint"``: one
    attention over CLS and every patch of every real frame.

    Parameter names: ``temporal_norm``, ``temporal_attn``, ``temporal_fc`` (HF
    ``temporal_layernorm``, ``temporal_attention``, ``temporal_dense``), ``norm1``, ``attn`` (HF
    ``layernorm_before``, ``attention``), ``norm2``, ``mlp`` (HF ``layernorm_after``,
    ``intermediate`` + ``output``).

    Args:
        dim: Token width.
        n_heads: Attention heads.
        attention: ``"divided"``, ``"joint"`` or ``"space"``.
        grid: ``(h, w)`` patch grid; needed when ``block_size > 1``.
        block_size: Temporal attention groups: 1 is TimeSformer (one patch position across frames);
            ``M`` is MEViT's motion self-attention (all patches of an ``M x M`` block in every frame;
            a grid not divisible by ``M`` gets smaller blocks at its bottom and right edges).
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        dropout: Dropout on residual branches and in the MLP.
        attn_dropout: Dropout on attention probabilities.
    """

    def __init__(self, dim: int, n_heads: int, attention: str = "divided", grid: tuple[int, int] | None = None,
                 block_size: int = 1, mlp_ratio: float = 4.0, dropout: float = 0.0, attn_dropout: float = 0.0):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if block_size < 1 or (block_size > 1 and grid is None):
            raise ValueError(f"block_size={block_size} needs block_size >= 1 and, above 1, the patch grid")
        self.attention, self.grid, self.block_size = attention, grid, block_size
        if attention == "divided":
            self.temporal_norm = nn.LayerNorm(dim, eps=LN_EPS)
            self.temporal_attn = MultiHeadSelfAttention(dim, n_heads, attn_dropout)
            self.temporal_fc = nn.Linear(dim, dim)
            nn.init.zeros_(self.temporal_fc.weight)
            nn.init.zeros_(self.temporal_fc.bias)
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = MultiHeadSelfAttention(dim, n_heads, attn_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim, dropout)
        self.drop = nn.Dropout(dropout)

    # ----------------------------------------------------------------- temporal groups
    def _group(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, T, N, D)`` -> groups ``(B * G, T * M * M, D)`` and their key mask ``(B * G, T * M * M)``."""
        B, T, N, D = x.shape
        M = self.block_size
        if M == 1:
            g = x.transpose(1, 2).reshape(B * N, T, D)  # (B * N, T, D)
            return g, mask[:, None, :].expand(B, N, T).reshape(B * N, T)
        h, w = self.grid
        gh, gw = -(-h // M), -(-w // M)
        x = F.pad(x.view(B, T, h, w, D), (0, 0, 0, gw * M - w, 0, gh * M - h))  # (B, T, gh*M, gw*M, D)
        x = x.view(B, T, gh, M, gw, M, D).permute(0, 2, 4, 1, 3, 5, 6)  # (B, gh, gw, T, M, M, D)
        real = torch.zeros(gh * M, gw * M, dtype=torch.bool, device=x.device)
        real[:h, :w] = True
        real = real.view(gh, M, gw, M).permute(0, 2, 1, 3)  # (gh, gw, M, M)
        m = mask[:, None, None, :, None, None] & real[None, :, :, None]  # (B, gh, gw, T, M, M)
        return x.reshape(B * gh * gw, T * M * M, D), m.reshape(B * gh * gw, T * M * M)

    def _ungroup(self, g: Tensor, B: int, T: int, N: int) -> Tensor:
        """Inverse of :meth:`_group`: ``(B * G, T * M * M, D)`` -> ``(B, T, N, D)``."""
        D, M = g.shape[-1], self.block_size
        if M == 1:
            return g.view(B, N, T, D).transpose(1, 2)  # (B, T, N, D)
        h, w = self.grid
        gh, gw = -(-h // M), -(-w // M)
        x = g.view(B, gh, gw, T, M, M, D).permute(0, 3, 1, 4, 2, 5, 6)  # (B, T, gh, M, gw, M, D)
        x = x.reshape(B, T, gh * M, gw * M, D)[:, :, :h, :w]  # (B, T, h, w, D)
        return x.reshape(B, T, N, D)

    def temporal(self, x: Tensor, mask: Tensor) -> Tensor:
        """Steps (a) and (b) of a divided block: ``x + temporal_fc(temporal_attn(LN(x)))`` within
        each temporal group; patches ``(B, T, N, D)`` in and out, real frames ``mask`` ``(B, T)``."""
        B, T, N, _ = x.shape
        g, key_mask = self._group(x, mask)
        a, _ = self.temporal_attn(self.temporal_norm(g), key_mask)  # (B * G, T * M * M, D)
        return x + self.temporal_fc(self.drop(self._ungroup(a, B, T, N)))  # (B, T, N, D)

    # ----------------------------------------------------------------- forward
    def forward(self, x: Tensor, cls: Tensor | None, mask: Tensor, return_attention: bool = False
                ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Run the block.

        Args:
            x: Patches ``(B, T, N, D)``.
            cls: CLS ``(B, D)`` or None (no class token in this block).
            mask: True for real frames ``(B, T)``; every row needs one.
            return_attention: Also return CLS's attention mass per frame (needs ``cls``).

        Returns:
            ``(x, cls, frame_mass)``: ``frame_mass`` ``(B, T)`` is CLS's attention to each frame's
            patches, averaged over heads and summed over the frame's patches (unnormalised; see
            :func:`frame_attention`), or None.
        """
        B, T, N, D = x.shape
        if self.attention == "joint":
            return self._joint(x, cls, mask, return_attention)
        if self.attention == "divided":
            x = self.temporal(x, mask)

        tokens = x.reshape(B * T, N, D)  # (B * T, N, D)
        if cls is not None:
            tokens = torch.cat([cls[:, None, None].expand(B, T, 1, D).reshape(B * T, 1, D), tokens], dim=1)
        a, w = self.attn(self.norm1(tokens), None, return_attention and cls is not None)
        a = self.drop(a)  # (B * T, [1 +] N, D)
        mass = None
        if cls is not None:
            real = mask[..., None].to(a.dtype)  # (B, T, 1)
            cls_a = a[:, 0].view(B, T, D)
            cls = cls + (cls_a * real).sum(1) / real.sum(1)  # mean over real frames, (B, D)
            a = a[:, 1:]
            if w is not None:
                mass = w[:, :, 0, 1:].mean(1).sum(-1).view(B, T)  # (B, T)
        x = x + a.reshape(B, T, N, D)
        x = x + self.drop(self.mlp(self.norm2(x)))
        if cls is not None:
            cls = cls + self.drop(self.mlp(self.norm2(cls)))
        return x, cls, mass

    def _joint(self, x: Tensor, cls: Tensor | None, mask: Tensor, return_attention: bool):
        B, T, N, D = x.shape
        tokens = x.reshape(B, T * N, D)  # frame-major, (B, T * N, D)
        key_mask = mask[:, :, None].expand(B, T, N).reshape(B, T * N)
        if cls is not None:
            tokens = torch.cat([cls[:, None], tokens], dim=1)  # (B, 1 + T * N, D)
            key_mask = torch.cat([mask.new_ones(B, 1), key_mask], dim=1)
        a, w = self.attn(self.norm1(tokens), key_mask, return_attention and cls is not None)
        tokens = tokens + self.drop(a)
        tokens = tokens + self.drop(self.mlp(self.norm2(tokens)))
        mass = None
        if cls is not None:
            cls, tokens = tokens[:, 0], tokens[:, 1:]
            if w is not None:
                mass = w[:, :, 0, 1:].mean(1).view(B, T, N).sum(-1)  # (B, T)
        return tokens.reshape(B, T, N, D), cls, mass


@dataclass
class TimeSformerConfig:
    """Configuration of :class:`TimeSformer`.

    Attributes:
        n_outputs: Number of logits (labels).
        feature: Frame-level cache dataset of patch tokens, ``(n_patches, feature_dim)`` per frame.
        feature_dim: Width of each patch token.
        n_patches: Patches per frame (196 = 14 x 14 for ViT-B/16 at 224 px).
        n_frames: Rows of the learned time embedding: the most frames a video may give
            (train with ``--max-tokens n_frames``; 8 in the paper).
        d_model: Block width (768 = ViT-B).
        n_heads: Attention heads (12 = ViT-B).
        depth: Blocks (12 in the paper; the cached tokens already went through a ViT, so a few
            suffice here).
        mlp_ratio: MLP hidden width as a multiple of ``d_model``.
        attention: ``"divided"`` (T+S), ``"joint"`` (ST) or ``"space"`` (S).
        dropout: Dropout on embeddings, residual branches and in the MLP.
    """

    n_outputs: int
    feature: str = "vit_patches"
    feature_dim: int = 768
    n_patches: int = 196
    n_frames: int = 8
    d_model: int = 768
    n_heads: int = 12
    depth: int = 4
    mlp_ratio: float = 4.0
    attention: str = "divided"
    dropout: float = 0.0

    def __post_init__(self):
        if self.n_outputs < 1:
            raise ValueError(f"n_outputs must be >= 1, got {self.n_outputs}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        for name in ("feature_dim", "n_patches", "n_frames", "depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")


class PatchTokenHead(Head):
    """Heads over one frame-level patch-token feature (``config.feature``, ``(n_patches, dim)``)."""

    @property
    def inputs(self) -> dict[str, tuple[int, int]]:
        return {self.config.feature: (self.config.n_patches, self.config.feature_dim)}

    @property
    def level(self) -> str:
        return "frame"


class TimeSformer(PatchTokenHead):
    """TimeSformer head over per-frame patch tokens; see the module docstring.

    Args:
        config: Head configuration.
    """

    Config = TimeSformerConfig

    def __init__(self, config: TimeSformerConfig):
        super().__init__()
        self.config = cfg = config
        d = cfg.d_model
        self.embed = SpaceTimeEmbedding(cfg.feature_dim, d, cfg.n_patches, cfg.n_frames,
                                        time=cfg.attention != "space", dropout=cfg.dropout)
        self.blocks = nn.ModuleList(
            SpaceTimeBlock(d, cfg.n_heads, cfg.attention, mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout)
            for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(d, eps=LN_EPS)
        self.head = nn.Linear(d, cfg.n_outputs)

    def forward(self, batch: dict[str, Tensor], return_attention: bool = False):
        """Classify a batch of frame sequences.

        Args:
            batch: ``{feature: (B, L, n_patches, feature_dim), "mask": (B, L)}``, ``L <= n_frames``.
            return_attention: Also return CLS attention per frame.

        Returns:
            Logits ``(B, n_outputs)``; with ``return_attention``, ``(logits, attn)``: ``attn``
            ``(B, L)`` is, in the last block, CLS's attention probability on each frame's patches
            (divided/space: CLS's query in that frame's spatial attention; joint: the joint
            attention row), averaged over heads, summed over the frame's patches (CLS's weight
            on itself dropped), then normalised to sum to 1 over real frames (0 at padding).
        """
        feats, mask = self.read_batch(batch)
        x, cls = self.embed(feats[self.config.feature])  # (B, L, N, d), (B, d)
        mass = None
        for i, block in enumerate(self.blocks):
            x, cls, mass = block(x, cls, mask, return_attention and i == len(self.blocks) - 1)
        logits = self.head(self.norm(cls))
        if not return_attention:
            return logits
        return logits, frame_attention(mass, mask)
