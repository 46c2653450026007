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
* "Classification embedding" (Eq. 9): ``y = LN(z_CLS)``, then the classifier. The paper appends
  "a 1-hidden-layer MLP" (``classifier="mlp"``: Linear ``d_model -> d_model``, GELU, dropout,
  Linear); the authors' code (timm's ``VisionTransformer.head``) and Hugging Face use a single
  Linear, which stays the default (``classifier="linear"``).

The embedding and the block (:class:`~vtx.heads.blocks.SpaceTimeEmbedding`,
:class:`~vtx.heads.blocks.SpaceTimeBlock`) live in ``vtx/heads/blocks.py``, shared with MEViT
(``vtx/heads/mevit.py``), whose motion self-attention is the same block with temporal groups of
``M x M`` patches. One block matches Hugging Face's ``TimesformerLayer`` (tested).

Padding: frames whose mask is False are never keys, and CLS averages over real frames only, so
they cannot change the logits. Heads accept ``L <= n_frames`` frames; train with
``--max-tokens n_frames`` so every video gives at most ``n_frames``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .base import PatchTokenConfig, PatchTokenHead
from .blocks import SPACE_TIME_ATTENTIONS, VIT_LN_EPS, Mlp, SpaceTimeBlock, SpaceTimeEmbedding, SpaceTimeStack

__all__ = ["CLASSIFIERS", "TimeSformer", "TimeSformerConfig"]

#: Classifiers on ``LN(z_CLS)``: one Linear, or the paper's 1-hidden-layer MLP.
CLASSIFIERS = ("linear", "mlp")


@dataclass
class TimeSformerConfig(PatchTokenConfig):
    """Configuration of :class:`TimeSformer`: the fields of :class:`~vtx.heads.base.PatchTokenConfig`
    (``n_outputs``, ``feature``, ``feature_dim``, ``n_patches``, ``n_frames``, ``d_model``,
    ``n_heads``, ``depth``), then:

    Attributes:
        mlp_ratio: MLP hidden width as a multiple of ``d_model``.
        attention: ``"divided"`` (T+S), ``"joint"`` (ST) or ``"space"`` (S).
        dropout: Dropout on embeddings, residual branches and in the MLP.
        classifier: ``"linear"`` (the authors' code) or ``"mlp"``, the paper's 1-hidden-layer
            MLP on ``LN(z_CLS)`` (Section 3, "Classification embedding").
    """

    PRESETS = {"paper": {"d_model": 768, "n_heads": 12, "depth": 12}}  # TimeSformer (ViT-B)

    mlp_ratio: float = 4.0
    attention: str = "divided"
    dropout: float = 0.0
    classifier: str = "linear"

    def __post_init__(self):
        super().__post_init__()
        self.check_choice("attention", SPACE_TIME_ATTENTIONS)
        self.check_choice("classifier", CLASSIFIERS)


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
        self.blocks = SpaceTimeStack(
            SpaceTimeBlock(d, cfg.n_heads, cfg.attention, mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout)
            for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(d, eps=VIT_LN_EPS)
        self.head = (Mlp(d, d, cfg.n_outputs, cfg.dropout) if cfg.classifier == "mlp"
                     else nn.Linear(d, cfg.n_outputs))

    def forward_blocks(self, x: Tensor, cls: Tensor, mask: Tensor, return_attention: bool = False
                       ) -> tuple[Tensor, Tensor | None]:
        """Run the blocks; ``mass`` is, in the last block, CLS's attention probability on each
        frame's patches (divided/space: CLS's query in that frame's spatial attention; joint: the
        joint attention row), averaged over heads and summed over the frame's patches (CLS's
        weight on itself dropped). See :meth:`PatchTokenHead.forward_blocks`."""
        _, cls, mass = self.blocks(x, cls, mask, return_attention)
        return cls, mass
