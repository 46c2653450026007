"""Shared transformer blocks for the stage-2 heads, written once and imported by every head.

Multi-head self-attention, the feed-forward MLP and the encoder layer follow Vaswani et al.,
"Attention Is All You Need" (2017), Section 3.2-3.3. The sinusoidal positional embedding is
Eq. 2 of STAN (Fish et al., "Two-Stream Transformer Architecture for Long Form Video
Understanding", Section 3), itself taken from Vaswani et al. Section 3.5. The gated MLP uses the
GLU of Dauphin et al., "Language Modeling with Gated Convolutional Networks" (2017), as STAN's
fusion classifier does (Section 3, "Fusion and Classification").

Conventions shared by every block:
    * Token tensors are batch-first, ``(B, L, D)``.
    * Masks are bool ``(B, L)``, True for real tokens and False for padding.
    * An attention module is called as ``attn(x, mask, return_attention)`` and returns
      ``(out, weights)``, where ``weights`` is None unless asked for. What the weights hold is
      the module's own business (full ``(B, H, L, L)`` here, CLS row only for sliding windows).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ClassAttention",
    "GluMlp",
    "LearnedPositionalEmbedding",
    "Mlp",
    "MultiHeadSelfAttention",
    "SinusoidalPositionalEmbedding",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "sinusoidal_embedding",
]


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
        self, x: Tensor, mask: Tensor | None = None, return_attention: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Attend every token to every real token.

        Args:
            x: Tokens ``(B, L, D)``.
            mask: True for real tokens ``(B, L)``; None means all tokens are real.
            return_attention: Also return the attention probabilities (before dropout).

        Returns:
            ``(out, weights)``: ``out`` is ``(B, L, D)``; ``weights`` is ``(B, H, L, L)`` (query,
            key) or None.
        """
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.n_heads, self.head_dim)  # (B, L, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, Dh)
        key_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, L)
        p_drop = self.attn_dropout if self.training else 0.0

        weights = None
        if return_attention:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, L, L)
            if key_mask is not None:
                scores = scores.masked_fill(~key_mask, float("-inf"))
            weights = scores.softmax(dim=-1)
            out = F.dropout(weights, p_drop, self.training) @ v  # (B, H, L, Dh)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p_drop)
        out = out.transpose(1, 2).reshape(B, L, D)  # (B, L, H * Dh)
        return self.proj(out), weights


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
        dropout: Dropout on the residual branches and inside the MLP.
        attn_dropout: Dropout on attention probabilities (ignored when ``attn`` is given).
        norm_first: Pre-LN if True, post-LN if False.
        eps: LayerNorm epsilon.
        attn: Attention module with the ``attn(x, mask, return_attention) -> (out, weights)``
            interface; defaults to :class:`MultiHeadSelfAttention`.
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
    ):
        super().__init__()
        self.norm_first = norm_first
        self.attn = attn if attn is not None else MultiHeadSelfAttention(dim, n_heads, attn_dropout)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim, dropout)
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
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(
                dim, n_heads, mlp_ratio, dropout, attn_dropout, norm_first, eps,
                attn=attn_factory() if attn_factory is not None else None,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=eps) if norm_first else nn.Identity()

    def forward(
        self, x: Tensor, mask: Tensor | None = None, return_attention: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Run all layers.

        Args:
            x: Tokens ``(B, L, D)``.
            mask: True for real tokens ``(B, L)``.
            return_attention: Return the **last** layer's attention weights.

        Returns:
            ``(x, weights)``: ``x`` is ``(B, L, D)``; ``weights`` is the last layer's or None.
        """
        weights = None
        for i, layer in enumerate(self.layers):
            last = i == len(self.layers) - 1
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
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(Dh)  # (B, H, 1, L)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        p = scores.softmax(dim=-1)
        out = F.dropout(p, self.attn_dropout if self.training else 0.0, self.training) @ v  # (B, H, 1, Dh)
        out = out.transpose(1, 2).reshape(B, 1, D)  # (B, 1, H * Dh)
        return self.proj(out), (p[:, :, 0] if return_attention else None)
