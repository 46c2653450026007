"""VTN: a Longformer over per-frame tokens, classifying from a global CLS token.

Neimark, Bar, Zohar and Asselmann, "Video Transformer Network" (2021), Section 3:

* Section 3.1: any 2D backbone gives one feature per frame; here that is a cached frame-level
  dataset (``vit`` by default), linearly projected to ``d_model``.
* Section 3.2: a [CLS] token is prepended and the sequence goes through a Longformer encoder
  (Beltagy et al. 2020): every frame attends to the frames within ``window // 2`` positions on
  each side and to CLS; CLS has global attention, i.e. attends to every token through separate
  ``query_global / key_global / value_global`` projections. Layers are post-LN with GELU, as in
  BERT, and their feed-forward block has no dropout between GELU and its second linear layer
  (Hugging Face's ``LongformerIntermediate`` / ``LongformerOutput``; dropout is on the residual
  branch only).
* Section 3.3: the classification MLP is LayerNorm, Linear, GELU, Dropout, Linear on CLS.
* Section 4 ("Training"): the Longformer and the classification MLP are initialised from
  normal(0, 0.02) (every ``Linear`` weight and the learned position table; biases 0, LayerNorms
  1 and 0, as Hugging Face's ``_init_weights``).
* Section 4 ("Positional embedding", Table 2b), ``pos``:

  - ``"learned"``: a table indexed by the frame's position **in the original video**: token
    ``i`` of a video takes row ``1 + positions[i]``, where ``batch["positions"]`` is the
    token's index among the video's sampled frames before ``--max-tokens`` subsampling (0..L-1
    when absent), so positions keep their meaning under subsampling; CLS takes row 0. A video
    whose positions run past the table (a film longer than ``max_len`` frames) has its
    positions scaled onto the table, rows interpolated linearly, instead of failing.
  - ``"fixed"``: DETR's normalised sine (Carion et al. 2020, ``PositionEmbeddingSine`` with
    ``normalize=True``), on the temporal axis only: a frame at position ``p`` of a video whose
    last position is ``P`` gets the sinusoid of ``e = (p + 1) / (P + 1) * 2 pi`` (sines on even
    channels, cosines on odd, wavelength base 10000); CLS gets ``e = 0``.
  - ``"none"``: no temporal information, but CLS's position is still marked: a learned vector
    (``cls_pos``) is added to CLS alone.

``revision`` 1 is this head as vtx had it before the points above (PyTorch's default
initialisation, positions ``0..L`` of the tokens given, the plain sinusoid of STAN Eq. 2 for
``"fixed"``, nothing for ``"none"``, dropout inside the feed-forward block). Checkpoints saved
without a ``revision`` load as revision 1 (``VtnConfig.LEGACY``) and give the numbers they gave;
new heads are revision 2.

The sliding-window attention matches Hugging Face ``LongformerSelfAttention`` with CLS as the only
global token (``window`` here is HF's ``attention_window``), but needs no padding to a multiple of
the window, and its time and memory grow linearly with the number of frames: scores are only
computed inside blocks of ``window // 2`` queries against their three neighbouring key blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import DEFAULT_FEATURE_DIMS, Head, HeadConfig, cls_attention_to_tokens
from .blocks import LearnedPositionalEmbedding, Mlp, TransformerEncoder, sinusoidal_embedding

__all__ = ["SlidingWindowAttention", "Vtn", "VtnConfig", "detr_sine", "interpolate_rows"]

POSITIONS = ("learned", "fixed", "none")
REVISIONS = (1, 2)
INIT_STD = 0.02  # VTN Section 4: normal(0, 0.02)


class SlidingWindowAttention(nn.Module):
    """Longformer self-attention with token 0 (CLS) as the one global token.

    Token ``i >= 1`` attends to tokens ``j >= 1`` with ``|i - j| <= window // 2`` and to CLS,
    with the ordinary ``query / key / value`` projections. CLS attends to every real token
    (itself included) with ``query_global / key_global / value_global``. Parameter names follow
    Hugging Face's ``LongformerSelfAttention``; ``out`` is its ``LongformerSelfOutput.dense``.

    Args:
        dim: Token width.
        n_heads: Attention heads.
        window: Full window, an even number >= 2 (HF's ``attention_window``).
        attn_dropout: Dropout on attention probabilities.
    """

    def __init__(self, dim: int, n_heads: int, window: int, attn_dropout: float = 0.0):
        super().__init__()
        if window < 2 or window % 2:
            raise ValueError(f"window must be an even number >= 2 (window/2 tokens each side), got {window}")
        if dim % n_heads:
            raise ValueError(f"dim={dim} is not divisible by n_heads={n_heads}")
        self.n_heads, self.head_dim, self.half = n_heads, dim // n_heads, window // 2
        self.attn_dropout = attn_dropout
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))
        self.query_global, self.key_global, self.value_global = (nn.Linear(dim, dim) for _ in range(3))
        self.out = nn.Linear(dim, dim)

    def _heads(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        return x.view(B, N, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, return_attention: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Attend.

        Args:
            x: Tokens ``(B, 1 + L, D)``, CLS first.
            mask: True for real tokens ``(B, 1 + L)``; CLS must be real.
            return_attention: Also return CLS's attention probabilities.

        Returns:
            ``(out, weights)``: ``out`` ``(B, 1 + L, D)``; ``weights`` ``(B, H, 1 + L)`` (CLS's
            global attention, before dropout, CLS key first) or None.
        """
        B, N, D = x.shape
        L, h, H, Dh = N - 1, self.half, self.n_heads, self.head_dim
        if mask is None:
            mask = x.new_ones(B, N, dtype=torch.bool)
        scale = 1.0 / math.sqrt(Dh)
        p_drop = self.attn_dropout if self.training else 0.0

        # Local part: frames attend to their window and to CLS.
        q = self._heads(self.query(x)) * scale  # (B, H, N, Dh)
        k = self._heads(self.key(x))
        v = self._heads(self.value(x))
        n_blk = -(-L // h)
        tail = n_blk * h - L
        q_blk = F.pad(q[:, :, 1:], (0, 0, 0, tail)).view(B, H, n_blk, h, Dh)  # (B, H, n, h, Dh)

        def neighbours(t: Tensor) -> Tensor:
            # (B, ..., L, C) -> (B, ..., n, 3h, C): for block c, frames of blocks c-1, c and c+1
            t = F.pad(t, (0, 0, h, tail + h)).unflatten(-2, (n_blk + 2, h))  # (B, ..., n + 2, h, C)
            return torch.cat([t[..., :-2, :, :], t[..., 1:-1, :, :], t[..., 2:, :, :]], dim=-2)

        k_win, v_win = neighbours(k[:, :, 1:]), neighbours(v[:, :, 1:])  # (B, H, n, 3h, Dh)
        key_real = neighbours(mask[:, 1:, None].float())[..., 0] > 0  # (B, n, 3h)
        # query a of a block sees key k of its 3h neighbours iff their distance k - h - a is in [-h, h]
        offset = torch.arange(3 * h, device=x.device)[None, :] - torch.arange(h, device=x.device)[:, None]
        in_band = (offset >= 0) & (offset <= 2 * h)  # (h, 3h)
        allowed = in_band & key_real[:, :, None, :]  # (B, n, h, 3h)

        s_win = torch.einsum("bhnqd,bhnkd->bhnqk", q_blk, k_win)  # (B, H, n, h, 3h)
        s_win = s_win.masked_fill(~allowed[:, None], float("-inf"))
        s_cls = torch.einsum("bhnqd,bhd->bhnq", q_blk, k[:, :, 0])[..., None]  # (B, H, n, h, 1)
        p = torch.cat([s_cls, s_win], dim=-1).softmax(dim=-1)  # (B, H, n, h, 1 + 3h)
        p = F.dropout(p, p_drop, self.training)
        o = p[..., :1] * v[:, :, 0, None, None, :] + torch.einsum("bhnqk,bhnkd->bhnqd", p[..., 1:], v_win)
        o_frames = o.reshape(B, H, n_blk * h, Dh)[:, :, :L]  # (B, H, L, Dh)

        # Global part: CLS attends to every real token.
        q_g = self._heads(self.query_global(x[:, :1])) * scale  # (B, H, 1, Dh)
        k_g = self._heads(self.key_global(x))  # (B, H, N, Dh)
        v_g = self._heads(self.value_global(x))
        s_g = q_g @ k_g.transpose(-2, -1)  # (B, H, 1, N)
        s_g = s_g.masked_fill(~mask[:, None, None, :], float("-inf"))
        p_g = s_g.softmax(dim=-1)
        o_cls = F.dropout(p_g, p_drop, self.training) @ v_g  # (B, H, 1, Dh)

        o = torch.cat([o_cls, o_frames], dim=2).transpose(1, 2).reshape(B, N, D)  # (B, N, H * Dh)
        return self.out(o), (p_g[:, :, 0] if return_attention else None)


@dataclass
class VtnConfig(HeadConfig):
    """Configuration of :class:`Vtn`.

    Attributes:
        n_outputs: Number of logits (labels).
        feature: Frame-level cache dataset to read.
        feature_dim: Its width.
        d_model: Encoder width (768 in the paper; smaller suits cached features).
        n_heads: Attention heads per layer.
        n_layers: Longformer layers (3 in the paper's default, Table 2a).
        window: Sliding window, even; each frame sees ``window // 2`` frames on each side. Same
            meaning as Hugging Face's ``attention_window``.
        mlp_ratio: Feed-forward width as a multiple of ``d_model``.
        pos: ``"learned"``, ``"fixed"`` (sinusoidal) or ``"none"``.
        max_len: Rows of the learned position table, besides CLS's (8192 covers 2 h 16 min at
            1 fps); longer videos are scaled onto it (see the module docstring).
        dropout: Dropout on embeddings, residual branches and in the classifier.
        attn_dropout: Dropout on attention probabilities.
        revision: 2 follows the paper (initialisation, positions, feed-forward dropout); 1 is
            the head of vtx before that, which checkpoints saved without this field get.
    """

    PRESETS = {"paper": {"d_model": 768, "n_heads": 12, "n_layers": 3, "window": 32,
                         "mlp_ratio": 4.0, "attn_dropout": 0.1}}  # ViT-B-VTN, Section 4
    LEGACY = {"revision": 1}

    feature: str = "vit"
    feature_dim: int = DEFAULT_FEATURE_DIMS["vit"]
    d_model: int = 256
    n_heads: int = 4
    n_layers: int = 3
    window: int = 32
    mlp_ratio: float = 4.0
    pos: str = "learned"
    max_len: int = 8192
    dropout: float = 0.1
    attn_dropout: float = 0.1
    revision: int = 2

    def __post_init__(self):
        super().__post_init__()
        self.check_choice("pos", POSITIONS)
        self.check_choice("revision", REVISIONS)
        if self.window < 2 or self.window % 2:
            raise ValueError(f"window must be an even number >= 2, got {self.window}")
        self.check_positive("feature_dim", "n_layers", "max_len")

    def input_width_fields(self) -> dict[str, str]:
        return {self.feature: "feature_dim"}


def interpolate_rows(table: Tensor, rows: Tensor) -> Tensor:
    """Rows of ``table`` ``(n, D)`` at fractional indices ``rows`` ``(...)``, linearly
    interpolated between neighbours (exact at integers); ``(..., D)``."""
    rows = rows.clamp(0, len(table) - 1)
    lo = rows.floor().long()
    hi = (lo + 1).clamp_max(len(table) - 1)
    w = (rows - lo.to(rows.dtype))[..., None]  # (..., 1)
    return torch.lerp(table[lo], table[hi], w)  # saves only the indices and w for backward


def detr_sine(positions: Tensor, mask: Tensor, dim: int) -> Tensor:
    """DETR's normalised sine on the temporal axis (``PositionEmbeddingSine``, normalize=True,
    scale 2 pi, temperature 10000): token at ``positions`` ``(B, L)`` of a video whose last real
    position is ``P`` gets the sinusoid of ``(p + 1) / (P + 1) * 2 pi``; ``(B, L, dim)``."""
    last = positions.masked_fill(~mask, 0).amax(dim=1, keepdim=True)  # (B, 1)
    e = (positions.double() + 1) / (last.double() + 1 + 1e-6) * (2 * math.pi)  # (B, L)
    return sinusoidal_embedding(e, dim)


class Vtn(Head):
    """VTN head over frame tokens; see the module docstring for the architecture.

    Only CLS leaves the last layer, so the last layer's sliding-window ``query``, ``key`` and
    ``value`` projections never reach the logits and get no gradient (as in Hugging Face's
    Longformer used for classification). They are kept so every layer is a full Longformer layer.

    Args:
        config: Head configuration.
    """

    Config = VtnConfig

    def __init__(self, config: VtnConfig):
        super().__init__()
        self.config = cfg = config
        d = cfg.d_model
        paper = cfg.revision >= 2
        self.proj = nn.Linear(cfg.feature_dim, d)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        nn.init.trunc_normal_(self.cls, std=0.02)
        if cfg.pos == "learned":  # pos.weight: row 0 is CLS, row 1 + p the frame at position p
            self.pos = LearnedPositionalEmbedding(cfg.max_len + 1, d)
        elif cfg.pos == "none" and paper:  # CLS's position, marked (Section 4)
            self.cls_pos = nn.Parameter(torch.zeros(1, d))
        self.embed_norm = nn.LayerNorm(d)
        self.embed_drop = nn.Dropout(cfg.dropout)
        self.encoder = TransformerEncoder(
            d, cfg.n_layers, cfg.n_heads, cfg.mlp_ratio, cfg.dropout, cfg.attn_dropout, norm_first=False,
            attn_factory=lambda: SlidingWindowAttention(d, cfg.n_heads, cfg.window, cfg.attn_dropout),
            mlp_dropout=0.0 if paper else None,
        )
        self.head = nn.Sequential(nn.LayerNorm(d), Mlp(d, d, cfg.n_outputs, cfg.dropout))
        if paper:
            self._init_paper()

    def _init_paper(self) -> None:
        """normal(0, 0.02) weights, zero biases (Section 4; Hugging Face's ``_init_weights``)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=INIT_STD)
                nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if name in ("pos.weight", "cls_pos"):
                nn.init.normal_(p, std=INIT_STD)

    def position_embedding(self, positions: Tensor, mask: Tensor) -> Tensor:
        """What is added to the tokens ``(B, 1 + L, d)``, CLS first (zeros for ``pos="none"``
        in revision 1). ``positions`` ``(B, L)``: each frame's index in the original video."""
        cfg = self.config
        B, L = positions.shape
        d = cfg.d_model
        if cfg.pos == "learned":
            rows = torch.cat([positions.new_full((B, 1), -1), positions], dim=1).double() + 1
            last = rows.masked_fill(~torch.cat([mask.new_ones(B, 1), mask], dim=1), 0)
            last = last.amax(dim=1, keepdim=True)  # (B, 1), the video's last row
            table = self.pos.weight  # (max_len + 1, d)
            n = table.shape[0] - 1
            rows = torch.where(last > n, rows * (n / last), rows)  # a longer film: scaled onto the table
            return interpolate_rows(table, rows.to(table.dtype))  # (B, 1 + L, d)
        if cfg.pos == "fixed":
            if cfg.revision >= 2:
                pe = detr_sine(positions, mask, d)  # (B, L, d)
                cls = sinusoidal_embedding(positions.new_zeros(B, 1), d)  # e = 0
                return torch.cat([cls, pe], dim=1)
            return sinusoidal_embedding(torch.arange(1 + L, device=positions.device), d)[None]
        out = torch.zeros(B, 1 + L, d, device=positions.device)
        if cfg.revision >= 2:
            out[:, 0] = self.cls_pos[0]
        return out

    @property
    def level(self) -> str:
        return "frame"

    def no_weight_decay(self) -> set[str]:
        if self.config.revision < 2:
            return {"cls"}
        return {"cls", "pos.weight", "cls_pos"} & {n for n, _ in self.named_parameters()}

    def forward_features(self, batch: dict[str, Tensor], return_attention: bool = False
                         ) -> tuple[Tensor, Tensor | None]:
        """CLS after the Longformer encoder.

        Args:
            batch: ``{feature: (B, L, feature_dim), "mask": (B, L)}``, optionally
                ``"positions"`` ``(B, L)`` int: each token's index among the video's sampled
                frames before subsampling (0..L-1 when absent; revision 2 only).
            return_attention: Also return CLS attention per frame.

        Returns:
            ``(cls, attn)``: ``cls`` ``(B, d_model)``; ``attn`` ``(B, L)`` (or None) is CLS's
            global attention in the last layer averaged over heads, CLS's weight on itself
            dropped and each row renormalised to sum to 1 over real frames (0 at padding).
        """
        feats, mask = self.read_batch(batch)
        x = self.proj(feats[self.config.feature])  # (B, L, d)
        B, L = mask.shape
        positions = batch.get("positions") if self.config.revision >= 2 else None
        if positions is None:
            positions = torch.arange(L, device=x.device).expand(B, L)
        x = torch.cat([self.cls.expand(B, -1, -1), x], dim=1)  # (B, 1 + L, d)
        mask_cls = torch.cat([mask.new_ones(B, 1), mask], dim=1)  # (B, 1 + L)
        x = x + self.position_embedding(positions.to(x.device), mask).to(x.dtype)
        x = self.embed_drop(self.embed_norm(x))
        x, w = self.encoder(x, mask_cls, return_attention)  # w: (B, H, 1 + L)
        return x[:, 0], (cls_attention_to_tokens(w, mask) if return_attention else None)

    def forward_head(self, cls: Tensor) -> Tensor:
        """Logits ``(B, n_outputs)`` from CLS ``(B, d_model)``: the classification MLP (Section 3.3)."""
        return self.head(cls)
