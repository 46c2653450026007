"""MEViT: divided space-time attention whose temporal part spans blocks of patches, plus CaiT-style
class attention.

"Motion Enhanced Video Transformer" (``mevit.txt``), Section 3, on the cached ViT patch tokens
(``vit_patches``) as in ``vtx/heads/timesformer.py`` (same embedding, same blocks, both in
``vtx/heads/blocks.py``):

* "Motion self-attention" (Eq. 8): each frame is cut into non-overlapping ``M x M`` blocks of
  patches (``block_size``; 14 x 14 patches and M = 2 give 7 x 7 blocks of 4) and a patch's
  temporal attention spans every patch of its block in every frame (``T * M * M`` keys).
  ``block_size=1`` is TimeSformer's divided attention; a grid not divisible by M (M = 3 on 14)
  gets smaller blocks at the bottom and right edges. As in TimeSformer's code, the temporal
  attention leaves CLS out (Eq. 8 lists ``k_(0,0)`` too), goes through a zero-initialised
  ``temporal_fc`` and precedes the spatial attention (Eq. 6).
* "Depth of time-attention layer" (Section 4.2, Fig. 3a): only the last ``time_layers`` (L_t) of
  the ``depth`` self-attention blocks have temporal attention; earlier ones are spatial only.
* "Classification embedding" (Eq. 9-10): ``class_attention_layers`` CaiT layers follow the
  self-attention blocks; in them only CLS is updated, attending to every patch of every real
  frame (Eq. 10: keys are patches only), then an MLP (Eq. 5). With class-attention layers CLS is
  inserted at that point (CaiT; "inserted-layer" of Table 2), so the self-attention blocks see
  patches only; with ``class_attention_layers=0`` CLS runs through the self-attention blocks as
  in TimeSformer. The clip embedding is ``LN(z_CLS)``, then a linear classifier.

The paper's ablations (MEViT-B/16: ``d_model=768, n_heads=12``, 12 layers) as configs:

* Table 1 (block size): ``depth=12, block_size=M`` for M in 1, 2, 3, 7, 14 (with its other
  defaults ``time_layers=None, class_attention_layers=0`` to isolate M; M = 14 is joint
  attention among a frame's patches across frames, CLS excluded).
* Table 2 (SA + CA): ``depth=i, class_attention_layers=12 - i`` for 9+3, 10+2, 11+1, and
  ``depth=12, class_attention_layers=1`` for 12+1.
* Table 3 (L_t): ``depth=12, time_layers=L_t`` for L_t in 0, 2, 4, 8, 12 (0 is space-only).
* Section 4.3's final model: ``depth=11, time_layers=7, class_attention_layers=1, block_size=2``
  (11 SA layers of which the first four are space-only, then one CA layer).

This head's defaults are smaller (``depth=4``) because the cached tokens already went through a
ViT; ``--size paper`` (``MevitConfig.PRESETS``) is MEViT-B/16's width and depth: 12 blocks of
768 with 12 heads (Table 2's 12 + 1 adds ``class_attention_layers``, 1 by default).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .base import PatchTokenConfig, PatchTokenHead
from .blocks import VIT_LN_EPS, ClassAttention, Mlp, SpaceTimeBlock, SpaceTimeEmbedding, SpaceTimeStack, patch_grid

__all__ = ["ClassAttentionLayer", "Mevit", "MevitConfig"]


class ClassAttentionLayer(nn.Module):
    """CaiT class-attention layer (Eq. 10 then Eq. 5): only CLS is updated; patches are unchanged.

    ``cls = cls + CA(LN(cls), LN(patches))``, then ``cls = cls + MLP(LN(cls))``.

    Args:
        dim: Token width.
        n_heads: Attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        dropout: Dropout on residual branches and in the MLP.
    """

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=VIT_LN_EPS)
        self.attn = ClassAttention(dim, n_heads)
        self.norm2 = nn.LayerNorm(dim, eps=VIT_LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, cls: Tensor, x: Tensor, mask: Tensor, return_attention: bool = False
                ) -> tuple[Tensor, Tensor | None]:
        """Update CLS ``(B, D)`` from patches ``x`` ``(B, T, N, D)`` of real frames ``mask`` ``(B, T)``.

        Returns:
            ``(cls, frame_mass)``: ``frame_mass`` ``(B, T)`` is CLS's attention summed over each
            frame's patches and averaged over heads, or None.
        """
        B, T, N, D = x.shape
        tokens = self.norm1(x.reshape(B, T * N, D))  # frame-major, (B, T * N, D)
        key_mask = mask[:, :, None].expand(B, T, N).reshape(B, T * N)
        a, w = self.attn(self.norm1(cls[:, None]), tokens, key_mask, return_attention)  # (B, 1, D)
        cls = cls + self.drop(a[:, 0])
        cls = cls + self.drop(self.mlp(self.norm2(cls)))
        mass = None if w is None else w.mean(1).view(B, T, N).sum(-1)  # (B, T)
        return cls, mass


@dataclass
class MevitConfig(PatchTokenConfig):
    """Configuration of :class:`Mevit` (see the module docstring for the paper's settings): the
    fields of :class:`~vtx.heads.base.PatchTokenConfig` (``n_outputs``, ``feature``,
    ``feature_dim``, ``n_patches``, ``n_frames``, ``d_model``, ``n_heads``, ``depth``: the
    self-attention (SA) blocks), then:

    Attributes:
        block_size: M: temporal attention spans ``M x M`` patches in every frame (1 = TimeSformer).
        time_layers: L_t: only the last ``time_layers`` SA blocks have temporal attention (0:
            space only); None means all ``depth``.
        class_attention_layers: CaiT class-attention (CA) layers after the SA blocks (0: CLS goes
            through the SA blocks as in TimeSformer).
        mlp_ratio: MLP hidden width as a multiple of ``d_model``.
        dropout: Dropout on embeddings, residual branches and in the MLP.
    """

    PRESETS = {"paper": {"d_model": 768, "n_heads": 12, "depth": 12}}  # MEViT-B/16

    block_size: int = 2
    time_layers: int | None = None
    class_attention_layers: int = 1
    mlp_ratio: float = 4.0
    dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        self.check_positive("block_size")
        side = patch_grid(self.n_patches)[0]
        if self.block_size > side:
            raise ValueError(f"block_size={self.block_size} exceeds the {side} x {side} patch grid")
        if self.time_layers is not None and not 0 <= self.time_layers <= self.depth:
            raise ValueError(f"time_layers must be in [0, depth={self.depth}], got {self.time_layers}")
        if self.class_attention_layers < 0:
            raise ValueError(f"class_attention_layers must be >= 0, got {self.class_attention_layers}")


class Mevit(PatchTokenHead):
    """MEViT head over per-frame patch tokens; see the module docstring.

    Args:
        config: Head configuration.
    """

    Config = MevitConfig

    def __init__(self, config: MevitConfig):
        super().__init__()
        self.config = cfg = config
        d = cfg.d_model
        grid = patch_grid(cfg.n_patches)
        time_layers = cfg.depth if cfg.time_layers is None else cfg.time_layers
        self.embed = SpaceTimeEmbedding(cfg.feature_dim, d, cfg.n_patches, cfg.n_frames, dropout=cfg.dropout)
        self.blocks = SpaceTimeStack(
            SpaceTimeBlock(d, cfg.n_heads, "divided" if i >= cfg.depth - time_layers else "space", grid,
                           cfg.block_size, cfg.mlp_ratio, cfg.dropout)
            for i in range(cfg.depth)
        )
        self.class_layers = nn.ModuleList(
            ClassAttentionLayer(d, cfg.n_heads, cfg.mlp_ratio, cfg.dropout)
            for _ in range(cfg.class_attention_layers)
        )
        self.norm = nn.LayerNorm(d, eps=VIT_LN_EPS)
        self.head = nn.Linear(d, cfg.n_outputs)

    def forward_blocks(self, x: Tensor, cls: Tensor, mask: Tensor, return_attention: bool = False
                       ) -> tuple[Tensor, Tensor | None]:
        """Run the SA blocks, then the CA layers. ``mass`` is CLS's attention in the last layer
        that updates CLS (the last CA layer, or without CA layers the last SA block's spatial
        attention, as in TimeSformer), averaged over heads and summed over each frame's patches.
        See :meth:`PatchTokenHead.forward_blocks`."""
        if not self.class_layers:  # CLS runs through the SA blocks, as in TimeSformer
            _, cls, mass = self.blocks(x, cls, mask, return_attention)
            return cls, mass
        x, _, _ = self.blocks(x, None, mask)  # CaiT: CLS is inserted after the SA blocks
        mass = None
        for i, layer in enumerate(self.class_layers):
            cls, mass = layer(cls, x, mask, return_attention and i == len(self.class_layers) - 1)
        return cls, mass
