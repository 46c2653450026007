"""Shared transformer blocks for the stage-2 heads, written once and imported by every head.

Multi-head self-attention, the feed-forward MLP and the encoder layer follow Vaswani et al.,
"Attention Is All You Need" (2017), Section 3.2-3.3. The sinusoidal positional embedding is
Eq. 2 of STAN (Fish et al., "Two-Stream Transformer Architecture for Long Form Video
Understanding", Section 3), itself taken from Vaswani et al. Section 3.5. The gated MLP uses the
GLU of Dauphin et al., "Language Modeling with Gated Convolutional Networks" (2017), as STAN's
fusion classifier does (Section 3, "Fusion and Classification"). Class attention is CaiT's
(Touvron et al., "Going deeper with Image Transformers", 2021, Section 3).

The space-time pieces shared by the patch-token heads follow TimeSformer (Bertasius, Wang and
Torresani, "Is Space-Time Attention All You Need for Video Understanding?", 2021, Section 3):
the learned space and time embeddings with a CLS token (:class:`SpaceTimeEmbedding`), the divided,
joint and space-only block (:class:`SpaceTimeBlock`, whose temporal groups can also span ``M x M``
patches, MEViT's motion self-attention) and a stack of blocks that carry a CLS token
(:class:`SpaceTimeStack`, also used by MM-ViT's layers).

Conventions shared by every block:
    * Token tensors are batch-first, ``(B, L, D)``; space-time tokens are ``(B, T, N, D)``.
    * Masks are bool ``(B, L)``, True for real tokens and False for padding.
    * An attention module is called as ``attn(x, mask, return_attention)`` and returns
      ``(out, weights)``, where ``weights`` is None unless asked for. The weights are only ever
      the first query's row (token 0, the CLS token of every head that asks): ``(B, H, 1, L)``
      here, ``(B, H, L)`` for sliding windows and class attention. No attention module builds
      an ``L x L`` probability matrix for it, so ``--explain`` costs memory linear in ``L``.
      :class:`MultiHeadSelfAttention` also takes a general ``attn_mask`` (bool or additive,
      broadcastable to ``(B, H, L, L)``, as in ``F.scaled_dot_product_attention``).
    * Activation checkpointing: the stacks (:class:`TransformerEncoder`,
      :class:`SpaceTimeStack`) run each layer through :func:`checkpointed` when their
      ``grad_checkpointing`` is set (``Head.set_grad_checkpointing``), keeping only each layer's
      input for the backward pass and recomputing the rest.
    * A space-time block is called as ``block(x, cls, mask, return_attention)`` and returns
      ``(x, cls, mass)``: patches ``(B, T, N, D)``, CLS or None, and CLS's attention mass per frame
      or None.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SPACE_TIME_ATTENTIONS",
    "checkpointed",
    "VIT_LN_EPS",
    "ClassAttention",
    "GluMlp",
    "LearnedPositionalEmbedding",
    "Mlp",
    "MultiHeadSelfAttention",
    "SinusoidalPositionalEmbedding",
    "SpaceTimeBlock",
    "SpaceTimeEmbedding",
    "SpaceTimeStack",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "attend",
    "masked_mean",
    "merge_masks",
    "patch_grid",
    "sinusoidal_embedding",
    "time_embedding",
]

#: Attention layouts of :class:`SpaceTimeBlock` (TimeSformer's "T+S", "ST" and "S").
SPACE_TIME_ATTENTIONS = ("divided", "joint", "space")
#: LayerNorm epsilon of ViT and TimeSformer (timm, the authors' code, Hugging Face).
VIT_LN_EPS = 1e-6


def merge_masks(key_mask: Tensor | None, attn_mask: Tensor | None) -> Tensor | None:
    """Combine a key-padding mask and a general attention mask into one.

    Args:
        key_mask: True for real keys ``(B, Lk)``, or None.
        attn_mask: Bool (True: may attend) or additive float mask broadcastable to
            ``(B, H, Lq, Lk)``, or None.

    Returns:
        A mask broadcastable to ``(B, H, Lq, Lk)`` in ``attn_mask``'s kind (bool without it), or
        None when both are None.
    """
    if key_mask is None:
        return attn_mask
    keys = key_mask[:, None, None, :]  # (B, 1, 1, Lk)
    if attn_mask is None:
        return keys
    if attn_mask.dtype == torch.bool:
        return attn_mask & keys
    return attn_mask.masked_fill(~keys, float("-inf"))


def attend(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
    return_attention: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Scaled dot-product attention ``softmax(q k^T / sqrt(Dh) + mask) v``.

    The output is always ``F.scaled_dot_product_attention`` (fused kernels, which never hold
    the ``Lq x Lk`` probabilities on the GPU). With ``return_attention`` the probabilities of
    the **first query** alone are computed as well (before dropout): every head asks only for
    its CLS token's row, and the full matrix of a 2-hour film would not fit in memory.

    Args:
        q: Queries ``(..., Lq, Dh)``.
        k: Keys ``(..., Lk, Dh)``.
        v: Values ``(..., Lk, Dv)``.
        attn_mask: Bool (True: may attend) or additive float mask broadcastable to
            ``(..., Lq, Lk)``, or None. Every query needs one allowed key.
        dropout_p: Dropout on the probabilities (pass 0 in eval mode).
        return_attention: Also return the first query's probabilities.

    Returns:
        ``(out, weights)``: ``out`` ``(..., Lq, Dv)``; ``weights`` ``(..., 1, Lk)`` (query 0)
        or None.
    """
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    if not return_attention:
        return out, None
    q0 = q[..., :1, :]  # (..., 1, Dh)
    scores = (q0 @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (..., 1, Lk)
    if attn_mask is not None:
        m = attn_mask[..., :1, :] if attn_mask.dim() >= 2 else attn_mask  # query 0's row
        if m.dtype == torch.bool:
            scores = scores.masked_fill(~m, float("-inf"))
        else:
            scores = scores + m
    return out, scores.softmax(dim=-1)


class MultiHeadSelfAttention(nn.Module):
    """Scaled dot-product self-attention over all tokens, with a key-padding mask.

    Uses one fused ``qkv`` projection (laid out like ``nn.MultiheadAttention.in_proj_weight``:
    query rows, then key rows, then value rows) and an output projection ``proj``.

    Args:
        dim: Token width; split evenly across heads.
        n_heads: Number of attention heads.
        attn_dropout: Dropout on the attention probabilities.
        bias: Whether the projections have biases.
    """

    def __init__(self, dim: int, n_heads: int, attn_dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim={dim} is not divisible by n_heads={n_heads}; pick n_heads dividing dim")
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, return_attention: bool = False,
        attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend every token to every real token it may see.

        Args:
            x: Tokens ``(B, L, D)``.
            mask: True for real tokens ``(B, L)`` (a key-padding mask); None means all are real.
            return_attention: Also return the first token's attention probabilities (before
                dropout).
            attn_mask: A general mask on top of ``mask``: bool (True: query may attend to key)
                or additive float, broadcastable to ``(B, H, L, L)``, e.g. ``~torch.eye(L)``
                to keep each token from attending to itself.

        Returns:
            ``(out, weights)``: ``out`` is ``(B, L, D)``; ``weights`` is ``(B, H, 1, L)``, the
            first query's row (token 0, CLS), or None.
        """
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.n_heads, self.head_dim)  # (B, L, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, Dh)
        p_drop = self.attn_dropout if self.training else 0.0
        out, weights = attend(q, k, v, merge_masks(mask, attn_mask), p_drop, return_attention)  # (B, H, L, Dh)
        out = out.transpose(1, 2).reshape(B, L, D)  # (B, L, H * Dh)
        return self.proj(out), weights


def checkpointed(module: nn.Module, *args):
    """``module(*args)``, through activation checkpointing while training with gradients.

    Only the inputs are kept for the backward pass; the forward is run again during backward
    (non-reentrant ``torch.utils.checkpoint``, which restores the RNG state, so dropout draws
    the same masks and the gradients equal those without checkpointing).
    """
    if module.training and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


class Mlp(nn.Module):
    """Two linear layers with GELU and dropout between them: ``fc2(drop(gelu(fc1(x))))``.

    Args:
        in_dim: Input width.
        hidden_dim: Hidden width.
        out_dim: Output width; defaults to ``in_dim``.
        dropout: Dropout after the non-linearity.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, out_dim or in_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class GluMlp(nn.Module):
    """An MLP whose non-linearities are gated linear units: ``a * sigmoid(b)``.

    ``n_layers`` counts linear layers: the first ``n_layers - 1`` project to ``2 * hidden_dim``
    and are gated down to ``hidden_dim``; the last is a plain linear map to ``out_dim``. With
    ``n_layers=3`` this is STAN's fusion classifier ``f(.)``; with ``n_layers=2`` it is a GLU
    feed-forward block.

    Args:
        in_dim: Input width.
        hidden_dim: Width after each gate.
        out_dim: Output width.
        n_layers: Number of linear layers, at least 2.
        dropout: Dropout after each gate.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, n_layers: int = 3, dropout: float = 0.0):
        super().__init__()
        if n_layers < 2:
            raise ValueError(f"GluMlp needs n_layers >= 2 (one gate at least), got {n_layers}")
        dims = [in_dim] + [hidden_dim] * (n_layers - 1)
        self.gates = nn.ModuleList(nn.Linear(d_in, 2 * hidden_dim) for d_in in dims[:-1])
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        for gate in self.gates:
            x = self.drop(F.glu(gate(x), dim=-1))  # (..., hidden_dim)
        return self.out(x)


def sinusoidal_embedding(positions: Tensor, dim: int, base: float = 10000.0) -> Tensor:
    """Fixed sinusoidal positional embedding, Eq. 2 of STAN (Vaswani et al. Section 3.5).

    ``PE[pos, 2i] = sin(pos / base^(2i/dim))`` and ``PE[pos, 2i+1] = cos(pos / base^(2i/dim))``:
    sines on even channels, cosines on odd channels, interleaved.

    Args:
        positions: Positions of any shape ``(...)``, integer or float.
        dim: Embedding width (may be odd; the last cosine is then dropped).
        base: Wavelength base.

    Returns:
        Float32 tensor ``(..., dim)`` on the positions' device. Computed in float64 first so that
        positions in the thousands stay accurate.
    """
    two_i = torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64)  # (ceil(dim/2),)
    angles = positions.to(torch.float64)[..., None] / base ** (two_i / dim)  # (..., ceil(dim/2))
    pe = torch.empty(*positions.shape, dim, device=positions.device, dtype=torch.float64)
    pe[..., 0::2] = torch.sin(angles)
    pe[..., 1::2] = torch.cos(angles)[..., : dim // 2]
    return pe.float()


class SinusoidalPositionalEmbedding(nn.Module):
    """Adds :func:`sinusoidal_embedding` for positions ``0 .. L-1``; computed on the fly, so any L works.

    Args:
        dim: Token width.
        base: Wavelength base (10000 in the papers).
    """

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.dim = dim
        self.base = base

    def forward(self, x: Tensor) -> Tensor:
        """Return ``x`` ``(B, L, D)`` plus the embedding of positions ``0 .. L-1``."""
        positions = torch.arange(x.shape[1], device=x.device)
        return x + sinusoidal_embedding(positions, self.dim, self.base).to(x.dtype)  # (B, L, D)


class LearnedPositionalEmbedding(nn.Module):
    """Adds a learned vector per position ``0 .. L-1``, as in BERT and ViT.

    Args:
        max_len: Number of positions in the table; longer inputs raise ValueError.
        dim: Token width.
    """

    def __init__(self, max_len: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_len, dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        """Return ``x`` ``(B, L, D)`` plus the first L rows of the table."""
        length, max_len = x.shape[1], self.weight.shape[0]
        if length > max_len:
            raise ValueError(
                f"sequence of {length} tokens is longer than the learned positional table ({max_len}); "
                "build the head with a larger max_len or with fixed (sinusoidal) positions"
            )
        return x + self.weight[:length]  # (B, L, D)


class TransformerEncoderLayer(nn.Module):
    """Self-attention then MLP, each with a residual connection, pre- or post-LayerNorm.

    Post-LN (``norm_first=False``, the original transformer and BERT/Longformer):
    ``x = norm1(x + drop(attn(x)))``, ``x = norm2(x + drop(mlp(x)))``.
    Pre-LN (``norm_first=True``, ViT): ``x = x + drop(attn(norm1(x)))``, ``x = x + drop(mlp(norm2(x)))``.

    Args:
        dim: Token width.
        n_heads: Attention heads (ignored when ``attn`` is given).
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        dropout: Dropout on the residual branches (and inside the MLP, unless ``mlp_dropout``).
        attn_dropout: Dropout on attention probabilities (ignored when ``attn`` is given).
        norm_first: Pre-LN if True, post-LN if False.
        eps: LayerNorm epsilon.
        attn: Attention module with the ``attn(x, mask, return_attention) -> (out, weights)``
            interface; defaults to :class:`MultiHeadSelfAttention`.
        mlp_dropout: Dropout between the MLP's GELU and its second linear layer; None means
            ``dropout``. BERT and Longformer have none there (0.0).
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        norm_first: bool = True,
        eps: float = 1e-5,
        attn: nn.Module | None = None,
        mlp_dropout: float | None = None,
    ):
        super().__init__()
        self.norm_first = norm_first
        self.attn = attn if attn is not None else MultiHeadSelfAttention(dim, n_heads, attn_dropout)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim, dropout if mlp_dropout is None else mlp_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, return_attention: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Run one layer.

        Args:
            x: Tokens ``(B, L, D)``.
            mask: True for real tokens ``(B, L)``.
            return_attention: Ask the attention module for its weights.

        Returns:
            ``(x, weights)`` with ``x`` ``(B, L, D)``.
        """
        if self.norm_first:
            a, weights = self.attn(self.norm1(x), mask, return_attention)
            x = x + self.drop(a)
            x = x + self.drop(self.mlp(self.norm2(x)))
        else:
            a, weights = self.attn(x, mask, return_attention)
            x = self.norm1(x + self.drop(a))
            x = self.norm2(x + self.drop(self.mlp(x)))
        return x, weights


class TransformerEncoder(nn.Module):
    """A stack of :class:`TransformerEncoderLayer`; pre-LN stacks end with a final LayerNorm.

    Args:
        dim: Token width.
        depth: Number of layers.
        n_heads: Attention heads per layer.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        dropout: Residual and MLP dropout.
        attn_dropout: Attention-probability dropout.
        norm_first: Pre-LN if True, post-LN if False.
        eps: LayerNorm epsilon.
        attn_factory: Called once per layer to make its attention module (e.g. a sliding-window
            attention); defaults to full :class:`MultiHeadSelfAttention`.
        mlp_dropout: As in :class:`TransformerEncoderLayer`.

    Attributes:
        grad_checkpointing: Run each layer through :func:`checkpointed` (off by default).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        n_heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        norm_first: bool = True,
        eps: float = 1e-5,
        attn_factory: Callable[[], nn.Module] | None = None,
        mlp_dropout: float | None = None,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(
                dim, n_heads, mlp_ratio, dropout, attn_dropout, norm_first, eps,
                attn=attn_factory() if attn_factory is not None else None, mlp_dropout=mlp_dropout,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=eps) if norm_first else nn.Identity()

    def forward(
        self, x: Tensor, mask: Tensor | None = None, return_attention: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Run all layers on tokens ``x`` ``(B, L, D)`` with real tokens ``mask`` ``(B, L)``.

        Returns:
            ``(x, weights)``: ``x`` is ``(B, L, D)``; ``weights`` is the **last** layer's
            attention weights (the first token's row) if ``return_attention``, else None.
        """
        weights = None
        for i, layer in enumerate(self.layers):
            last = i == len(self.layers) - 1
            if self.grad_checkpointing and not (return_attention and last):
                x, weights = checkpointed(layer, x, mask)
            else:
                x, weights = layer(x, mask, return_attention and last)
        return self.norm(x), weights


class ClassAttention(MultiHeadSelfAttention):
    """Class attention (Touvron et al., "Going deeper with Image Transformers" (CaiT), Section 3):
    only the class token queries; the other tokens are keys and values and are not updated.

    The weights are laid out exactly as in :class:`MultiHeadSelfAttention` (fused ``qkv`` then
    ``proj``); only the first ``dim`` rows of ``qkv`` (the query) are applied to the class token
    alone, so no patch query or patch-to-patch score is ever computed.

    Args:
        dim: Token width; split evenly across heads.
        n_heads: Number of attention heads.
        attn_dropout: Dropout on the attention probabilities.
        bias: Whether the projections have biases.
    """

    def forward(
        self, cls: Tensor, x: Tensor, mask: Tensor | None = None, return_attention: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Attend the class token to the tokens ``x``.

        Args:
            cls: Class token ``(B, 1, D)`` (already normalised by the caller).
            x: Key/value tokens ``(B, L, D)``.
            mask: True for real tokens ``(B, L)``; None means all are real. Each row needs one.
            return_attention: Also return the attention probabilities (before dropout).

        Returns:
            ``(out, weights)``: ``out`` ``(B, 1, D)``; ``weights`` ``(B, H, L)`` or None.
        """
        B, L, D = x.shape
        H, Dh = self.n_heads, self.head_dim
        w, b = self.qkv.weight, self.qkv.bias
        q = F.linear(cls, w[:D], None if b is None else b[:D]).view(B, 1, H, Dh).transpose(1, 2)  # (B, H, 1, Dh)
        kv = F.linear(x, w[D:], None if b is None else b[D:]).view(B, L, 2, H, Dh)  # (B, L, 2, H, Dh)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, H, L, Dh)
        p_drop = self.attn_dropout if self.training else 0.0
        out, p = attend(q, k, v, merge_masks(mask, None), p_drop, return_attention)  # (B, H, 1, Dh)
        out = out.transpose(1, 2).reshape(B, 1, D)  # (B, 1, H * Dh)
        return self.proj(out), (p[:, :, 0] if return_attention else None)


# ------------------------------------------------------------------------------- space-time


def patch_grid(n_patches: int) -> tuple[int, int]:
    """``(h, w)`` of a square patch grid, e.g. 196 -> (14, 14)."""
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise ValueError(f"n_patches={n_patches} is not a square grid; give h*w patches with h == w")
    return side, side


def time_embedding(table: Tensor, n_frames: int) -> Tensor:
    """The first ``n_frames`` rows of a learned time embedding ``table`` ``(n_rows, D)``.

    Raises:
        ValueError: More frames than rows; the message says how to fix it.
    """
    rows = len(table)
    if n_frames > rows:
        raise ValueError(
            f"{n_frames} frames but the time embedding has n_frames={rows} rows; sample at most {rows} "
            f"frames (train with --max-tokens {rows}) or build the head with n_frames >= {n_frames}"
        )
    return table[:n_frames]  # (T, D)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` ``(B, K, D)`` over the ``K`` entries where ``mask`` ``(B, K)`` is True; ``(B, D)``."""
    w = mask.to(x.dtype)[..., None]  # (B, K, 1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)  # (B, D)


class SpaceTimeEmbedding(nn.Module):
    """Project patch tokens, add learned space (``N + 1``) and time (``n_frames``) embeddings; make CLS.

    TimeSformer Section 3, "Linear embedding" (Eq. 1), on patch tokens that a ViT already embedded.

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
            x = x + time_embedding(self.pos_time, T)[:, None, :]  # (B, T, N, D)
        cls = (self.cls + self.pos_space[:1]).expand(B, -1)  # (B, D)
        return self.drop(x), self.drop(cls)


class SpaceTimeBlock(nn.Module):
    """One TimeSformer block on patches ``(B, T, N, D)`` and an optional CLS ``(B, D)``.

    TimeSformer Section 3, "Spatiotemporal self-attention models" (Eq. 5-8, Figure 1).
    ``attention="divided"``: temporal attention (within groups of patches, see ``block_size``),
    ``temporal_fc``, residual; spatial attention per frame with CLS replicated and averaged over
    real frames, residual; MLP. ``"space"``: the same without the temporal part. ``"joint"``: one
    attention over CLS and every patch of every real frame. Matches Hugging Face's
    ``TimesformerLayer`` (tested).

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
        if attention not in SPACE_TIME_ATTENTIONS:
            raise ValueError(f"attention must be one of {SPACE_TIME_ATTENTIONS}, got {attention!r}")
        if block_size < 1 or (block_size > 1 and grid is None):
            raise ValueError(f"block_size={block_size} needs block_size >= 1 and, above 1, the patch grid")
        self.attention, self.grid, self.block_size = attention, grid, block_size
        if attention == "divided":
            self.temporal_norm = nn.LayerNorm(dim, eps=VIT_LN_EPS)
            self.temporal_attn = MultiHeadSelfAttention(dim, n_heads, attn_dropout)
            self.temporal_fc = nn.Linear(dim, dim)
            nn.init.zeros_(self.temporal_fc.weight)
            nn.init.zeros_(self.temporal_fc.bias)
        self.norm1 = nn.LayerNorm(dim, eps=VIT_LN_EPS)
        self.attn = MultiHeadSelfAttention(dim, n_heads, attn_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=VIT_LN_EPS)
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
            patches, averaged over heads and summed over the frame's patches (unnormalised), or None.
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
            cls = cls + masked_mean(a[:, 0].view(B, T, D), mask)  # mean over real frames, (B, D)
            a = a[:, 1:]
            if w is not None:
                mass = w[:, :, 0, 1:].mean(1).sum(-1).view(B, T)  # (B, T)
        x = x + a.reshape(B, T, N, D)
        x = x + self.drop(self.mlp(self.norm2(x)))
        if cls is not None:
            cls = cls + self.drop(self.mlp(self.norm2(cls)))
        return x, cls, mass

    def _joint(self, x: Tensor, cls: Tensor | None, mask: Tensor, return_attention: bool = False
              ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The ``"joint"`` block: one attention over CLS and every patch of every real frame."""
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


class SpaceTimeStack(nn.ModuleList):
    """Space-time blocks run in order, each ``block(x, cls, mask, return_attention) -> (x, cls, mass)``
    (:class:`SpaceTimeBlock`, MM-ViT's layers).

    A plain ``nn.ModuleList`` (so parameter names are ``<i>.…``) whose forward asks only the
    last block for CLS's attention mass. With ``grad_checkpointing`` set, each block runs
    through :func:`checkpointed`.
    """

    grad_checkpointing = False

    def forward(self, x: Tensor, cls: Tensor | None, mask: Tensor, return_attention: bool = False
                ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Run every block on tokens ``x``, CLS ``cls`` and real frames ``mask`` ``(B, T)``.

        Returns:
            ``(x, cls, mass)`` of the last block; ``mass`` (whatever that block measures, e.g.
            ``(B, T)`` for :class:`SpaceTimeBlock`) is None unless ``return_attention``.
        """
        mass = None
        for i, block in enumerate(self):
            want = return_attention and i == len(self) - 1
            if self.grad_checkpointing and not want:
                x, cls, mass = checkpointed(block, x, cls, mask)
            else:
                x, cls, mass = block(x, cls, mask, want)
        return x, cls, mass
