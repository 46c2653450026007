"""MM-ViT: a multi-modal video transformer over I-frame patches, motion, residuals and audio.

Chen and Ho, "MM-ViT: Multi-Modal Video Transformer for Compressed Video Action Recognition"
(2022), Section 3:

* Section 3.2, embedding. Every modality becomes ``N`` tokens per sampled frame on one spatial
  grid (``N = G x G``, the ViT patch grid), each linearly embedded to ``d_model`` (Eqs. 1-4):

  - I (``vit_patches`` ``(B, T, N, vit_dim)``): the cached ViT patch tokens, one per grid cell.
  - M (``motion`` ``(B, T, 2, G, G)``): the cache already holds one (x, y) vector per grid cell,
    so each cell is a token of 2 values.
  - R (``residual`` ``(B, T, 3, S, S)``): the paper cuts residuals into 16 x 16 pixel patches of
    the 224 px frame. The cache stores them at ``S = 56`` px, where 16 does not divide; we cut
    ``p x p`` pixel patches with ``p = S / G`` (4 px at the defaults: 14 x 14 = 196 tokens of
    3 * 4 * 4 = 48 values), which covers the same image region as one ViT patch, so the tokens
    of every visual modality align cell for cell.
  - A (``vggish`` ``(B, T, vggish_dim)``): one VGGish example per frame, embedded and replicated
    over the ``N`` positions (the text after Eq. 4).

  Each token gets a learned modality embedding, a learned time embedding (``n_frames`` rows) and,
  for the visual modalities, a learned space embedding; audio gets no space embedding, as in
  Eq. 4, so its ``N`` copies start identical. A CLS token is the representation (BERT-style).

* Section 3.3, the four variants, all Pre-LN with residual connections and an MLP (Eqs. 5-15):

  1. joint attention over all ``T * |S| * N`` tokens and CLS (Eq. 8);
  2. time attention over the ``T * |S|`` tokens at the same position (all modalities, all
     frames), then space attention over the ``|S| * N`` tokens of the same frame (Eqs. 9-11);
  3. time attention over the ``T`` tokens of the same (modality, position), cross-modal
     attention (MCA) over the ``|S|`` tokens at the same (frame, position) and space attention
     over the ``N`` tokens of the same (frame, modality), in the order ``order`` (Eqs. 12-15,
     Table 2). MCA is ``"merged"`` (Eq. 16, keys of all modalities), ``"co"`` (keys of the
     other modalities only) or ``"shift-merge"`` (Eqs. 17-20: no queries or keys; the value of
     each token is split into ``|S|`` portions and portion ``i`` of every modality is gathered
     into modality ``i``, plus a residual);
  4. variant 3 with time and space attention restricted to non-overlapping windows of
     ``F = n_frames / 2`` frames and ``M = N / 4`` patches (a ``G/2 x G/2`` square of the grid),
     each followed by a convolution whose kernel is the window (``F`` over time, ``G/2 x G/2``
     over the grid), stride 1, zero "same" padding, so neighbouring windows exchange
     information. The paper does not say whether the convolution is dense or depthwise; it is
     depthwise here (a dense one would add ~375 M parameters at ViT-B width, while Table 1 puts
     IV only 0.46 M above III; our two depthwise convolutions add 0.51 M).

  As in TimeSformer's divided attention (which MM-ViT builds on), CLS takes part in the space
  attention only: a copy of it joins every space group (every frame in variant 2, every (frame,
  modality) or (frame, modality, window) in variants 3-4), and its update is the mean of the
  copies over groups of real frames. In variant 1 it is one more token of the joint sequence.
  The attentions other than space (and joint) are followed by a linear layer, like
  TimeSformer's ``temporal_fc``; with it the parameter counts of Table 1 come out (each extra
  attention adds ``5 d^2`` per layer: II - I = III - II = 35.4 M).

Shapes below: ``B`` batch, ``T`` frames, ``S`` modalities, ``N`` grid positions, ``D`` width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import DEFAULT_FEATURE_DIMS, Head, HeadConfig, normalise_attention
from .blocks import Mlp, MultiHeadSelfAttention, SpaceTimeStack, masked_mean, time_embedding

__all__ = ["CROSS", "FEATURES", "Mmvit", "MmvitConfig", "MmvitLayer", "ShiftMerge", "flops_configs"]

#: Cache dataset of each modality letter.
FEATURES = {"I": "vit_patches", "M": "motion", "R": "residual", "A": "vggish"}
#: Cross-modal attention mechanisms of variants 3 and 4 (Section 3.3, Figure 2).
CROSS = ("merged", "co", "shift-merge")


@dataclass
class MmvitConfig(HeadConfig):
    """Configuration of :class:`Mmvit`.

    Attributes:
        n_outputs: Number of logits.
        variant: 1 joint, 2 factorised time-space, 3 factorised time/cross-modal/space,
            4 variant 3 in local windows plus window-size convolutions.
        cross: Cross-modal attention of variants 3-4: ``"merged"``, ``"co"`` or ``"shift-merge"``.
        order: Order of time (T), cross-modal (M) and space (S) attention in variants 3-4, a
            permutation of ``"TMS"`` (Table 2; the paper's best is ``"TMS"``). Variant 2 is always
            time then space (Eqs. 9-10); variant 1 has one attention.
        modalities: Subset of ``"IMRA"`` (I-frame patches, motion, residual, audio), Table 3.
        depth: Transformer layers (12 in the paper).
        d_model: Token width.
        n_heads: Attention heads.
        n_frames: Most frames per clip (rows of the time embedding); ``F = n_frames / 2`` is the
            temporal window of variant 4.
        n_patches: Grid positions ``N`` per frame, a square ``G * G``.
        motion_grid: ``G``; must satisfy ``G * G == n_patches`` (motion is cached on the ViT grid).
        residual_size: Side ``S`` of the cached residual; ``S / G`` px patches make one token.
        vit_dim: Width of the cached ViT patch tokens.
        vggish_dim: Width of the cached VGGish embedding.
        mlp_ratio: MLP hidden width as a multiple of ``d_model``.
        dropout: Dropout on the embeddings, the residual branches and inside the MLPs.
    """

    PRESETS = {"paper": {"d_model": 768, "n_heads": 12, "depth": 12}}  # Section 4.1: ViT-B

    variant: int = 3
    cross: str = "merged"
    order: str = "TMS"
    modalities: str = "IMRA"
    depth: int = 4
    d_model: int = 768
    n_heads: int = 12
    n_frames: int = 8
    n_patches: int = 196
    motion_grid: int = 14
    residual_size: int = 56
    vit_dim: int = DEFAULT_FEATURE_DIMS["vit_patches"]
    vggish_dim: int = DEFAULT_FEATURE_DIMS["vggish"]
    mlp_ratio: float = 4.0
    dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        self.check_choice("variant", (1, 2, 3, 4))  # MM-ViT I-IV
        self.check_choice("cross", CROSS)
        if sorted(self.order) != sorted("TMS"):
            raise ValueError(
                f"order must be a permutation of 'TMS' (time, cross-modal, space), got {self.order!r}"
            )
        mods = self.modalities
        if not mods or any(m not in FEATURES for m in mods) or len(set(mods)) != len(mods):
            raise ValueError(f"modalities must be a non-empty subset of 'IMRA' without repeats, got {mods!r}")
        self.check_positive("depth", "n_frames", "vit_dim", "vggish_dim")
        G = self.motion_grid
        if G < 1 or G * G != self.n_patches:
            raise ValueError(
                f"n_patches={self.n_patches} must be motion_grid**2 (motion_grid={G}): motion and residual "
                "tokens sit on the ViT patch grid"
            )
        if self.residual_size % G:
            raise ValueError(
                f"residual_size={self.residual_size} must be a multiple of motion_grid={G} so residual "
                "patches align with the ViT grid"
            )
        factorised_cross = self.variant in (3, 4)
        if factorised_cross and self.cross == "co" and len(mods) < 2:
            raise ValueError("cross='co' attends to the *other* modalities; use at least 2 modalities or 'merged'")
        if factorised_cross and self.cross == "shift-merge" and self.d_model % len(mods):
            raise ValueError(
                f"cross='shift-merge' splits each value into one portion per modality: d_model={self.d_model} "
                f"must be divisible by the number of modalities ({len(mods)})"
            )
        if self.variant == 4 and (self.n_frames % 2 or G % 2):
            raise ValueError(
                f"variant 4 uses windows of n_frames/2 frames and (G/2)x(G/2) patches: n_frames={self.n_frames} "
                f"and motion_grid={G} must be even"
            )

    @property
    def residual_patch(self) -> int:
        """Side in pixels of the residual patch that makes one token: ``residual_size / G``."""
        return self.residual_size // self.motion_grid

    def input_width_fields(self) -> dict[str, str]:
        """``vit_patches`` (last axis) and ``vggish`` have width fields; ``motion`` ``(2, G, G)``
        and ``residual`` ``(3, S, S)`` are shaped by ``motion_grid`` and ``residual_size``."""
        fields = {"I": "vit_dim", "A": "vggish_dim"}
        return {FEATURES[m]: fields[m] for m in self.modalities if m in fields}


class ShiftMerge(nn.Module):
    """Shift-merge attention, Eqs. 17-20: mix value portions across modalities, no queries or keys.

    Each token's value ``v = W_V x`` is split into ``S`` equal portions; modality ``i`` receives
    portion ``i`` of every modality, concatenated in modality order, plus its own value:
    ``r_i = v_i^(1) || ... || v_i^(S) + v^(i)``, then an output projection.

    Args:
        dim: Token width, divisible by ``n_modalities``.
        n_modalities: ``S``.
    """

    def __init__(self, dim: int, n_modalities: int):
        super().__init__()
        if dim % n_modalities:
            raise ValueError(f"dim={dim} is not divisible by n_modalities={n_modalities}")
        self.n_modalities = n_modalities
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Mix ``x`` ``(G, S, D)``, one group per (frame, position); returns ``(G, S, D)``."""
        G, S, D = x.shape
        v = self.value(x)  # (G, S, D)
        parts = v.view(G, S, S, D // S)  # (G, modality s', portion i, D/S)
        r = parts.transpose(1, 2).reshape(G, S, D) + v  # r[:, i] = concat over s' of portion i of v[:, s']
        return self.proj(r)


def _fill_empty_groups(mask: Tensor) -> Tensor:
    """Let groups whose keys are all padding attend to all of them (their output is never read).

    Without this a fully padded group softmaxes over nothing and makes NaN, which a later
    ``0 * NaN`` could carry into real tokens.
    """
    return mask | ~mask.any(dim=-1, keepdim=True)


def _pad_same(x: Tensor, kernel: int) -> Tensor:
    """Zero-pad the trailing spatial axes of ``x`` so a stride-1 convolution keeps their size.

    ``(kernel - 1) // 2`` before and ``kernel // 2`` after (PyTorch's ``padding="same"``), written
    out so even kernels need no warning-raising internal copy.
    """
    before, after = (kernel - 1) // 2, kernel // 2
    return F.pad(x, (before, after) * (x.dim() - 2))


class MmvitLayer(nn.Module):
    """One MM-ViT layer of the configured variant.

    Tokens are ``x`` ``(B, T, S, N, D)`` plus ``cls`` ``(B, 1, D)``. The ``*_mix`` methods return
    the raw output of one attention (before the window convolution, the linear layer and the
    residual); :meth:`forward` composes them.

    Args:
        config: Head configuration.
    """

    def __init__(self, config: MmvitConfig):
        super().__init__()
        self.config = cfg = config
        d, h, S = cfg.d_model, cfg.n_heads, len(cfg.modalities)
        self.variant = cfg.variant
        self.steps = {1: "J", 2: "TS"}.get(cfg.variant, cfg.order)
        self.drop = nn.Dropout(cfg.dropout)
        for step in self.steps:
            name = {"J": "space", "T": "time", "M": "cross", "S": "space"}[step]
            setattr(self, f"norm_{name}", nn.LayerNorm(d))
            if name == "cross" and cfg.cross == "shift-merge":
                self.attn_cross = ShiftMerge(d, S)
            else:
                setattr(self, f"attn_{name}", MultiHeadSelfAttention(d, h))
            if name != "space":  # TimeSformer's temporal_fc, Table 1's parameter counts
                setattr(self, f"fc_{name}", nn.Linear(d, d))
        if cfg.variant == 4:
            self.time_window = cfg.n_frames // 2  # F = T / 2
            self.space_window = cfg.motion_grid // 2  # M = N / 4 patches, a (G/2) x (G/2) square
            self.conv_time = nn.Conv1d(d, d, self.time_window, groups=d)
            self.conv_space = nn.Conv2d(d, d, self.space_window, groups=d)
        self.norm_mlp = nn.LayerNorm(d)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio), d, cfg.dropout)

    # ---------------------------------------------------------------------------- attentions
    def time_mix(self, h: Tensor, mask: Tensor) -> Tensor:
        """Time attention of ``h`` ``(B, T, S, N, D)``; returns ``(B, T, S, N, D)``.

        Variant 2: each position attends over all frames and modalities (``T * S`` tokens).
        Variant 3: each (modality, position) attends over the ``T`` frames. Variant 4: the same
        within non-overlapping windows of ``F`` frames. Padded frames are masked keys.
        """
        B, T, S, N, D = h.shape
        if self.variant == 2:
            seq = h.permute(0, 3, 1, 2, 4).reshape(B * N, T * S, D)  # (B N, T S, D)
            m = mask[:, None, :, None].expand(B, N, T, S).reshape(B * N, T * S)
            out, _ = self.attn_time(seq, _fill_empty_groups(m))
            return out.view(B, N, T, S, D).permute(0, 2, 3, 1, 4)  # (B, T, S, N, D)
        Fw = self.time_window if self.variant == 4 else T
        n_win = -(-T // Fw)
        pad = n_win * Fw - T
        seq = h.permute(0, 2, 3, 1, 4)  # (B, S, N, T, D)
        seq = F.pad(seq, (0, 0, 0, pad)).reshape(B * S * N * n_win, Fw, D)  # (B S N n, F, D)
        m = F.pad(mask, (0, pad), value=False)[:, None, None, :].expand(B, S, N, n_win * Fw)
        out, _ = self.attn_time(seq, _fill_empty_groups(m.reshape(B * S * N * n_win, Fw)))
        out = out.view(B, S, N, n_win * Fw, D)[:, :, :, :T]  # (B, S, N, T, D)
        return out.permute(0, 3, 1, 2, 4)  # (B, T, S, N, D)

    def cross_mix(self, h: Tensor) -> Tensor:
        """Cross-modal attention of ``h`` ``(B, T, S, N, D)`` over the ``S`` tokens of each (frame, position)."""
        B, T, S, N, D = h.shape
        seq = h.transpose(2, 3).reshape(B * T * N, S, D)  # (B T N, S, D)
        if self.config.cross == "merged":
            out, _ = self.attn_cross(seq)  # a frame's tokens are all real or all padding: no mask
        elif self.config.cross == "co":  # query s attends to the other modalities' keys s' != s
            others = ~torch.eye(S, dtype=torch.bool, device=h.device)  # (S, S)
            out, _ = self.attn_cross(seq, attn_mask=others)
        else:
            out = self.attn_cross(seq)
        return out.view(B, T, N, S, D).transpose(2, 3)  # (B, T, S, N, D)

    def space_mix(
        self, h: Tensor, cls: Tensor, mask: Tensor, return_attention: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Space (or, in variant 1, joint) attention with a copy of CLS in every group.

        Groups: variant 1 one per clip (all tokens); variant 2 one per frame (``S * N`` tokens);
        variant 3 one per (frame, modality) (``N`` tokens); variant 4 one per (frame, modality,
        ``G/2 x G/2`` window). Tokens of padded frames are masked keys; CLS always is a key.

        Args:
            h: Tokens ``(B, T, S, N, D)``.
            cls: CLS ``(B, 1, D)``.
            mask: Real frames ``(B, T)``.
            return_attention: Also return CLS's attention mass per frame.

        Returns:
            ``(out, cls_out, mass)``: ``out`` ``(B, T, S, N, D)``; ``cls_out`` ``(B, 1, D)``, the
            mean over groups of real frames of the CLS copies' outputs; ``mass`` ``(B, H, T)``, the
            summed attention of the CLS copies to each frame's tokens (or None).
        """
        B, T, S, N, D = h.shape
        G = self.config.motion_grid
        if self.variant == 1:
            groups = h.reshape(B, 1, T * S * N, D)
        elif self.variant == 2:
            groups = h.reshape(B, T, S * N, D)
        elif self.variant == 3:
            groups = h.reshape(B, T * S, N, D)
        else:
            w = self.space_window
            g = h.reshape(B, T, S, G // w, w, G // w, w, D)
            groups = g.permute(0, 1, 2, 3, 5, 4, 6, 7).reshape(B, -1, w * w, D)  # (B, T S nW, M, D)
        n_groups, n_tok = groups.shape[1:3]
        per_frame = n_groups // T if self.variant != 1 else 1  # groups per frame (variant 1: one group)
        seq = torch.cat([cls[:, None].expand(B, n_groups, 1, D), groups], dim=2)  # (B, n_groups, 1 + n, D)
        if self.variant == 1:
            key_real = mask[:, :, None].expand(B, T, S * N).reshape(B, 1, n_tok)
        else:
            key_real = mask.repeat_interleave(per_frame, dim=1)[:, :, None].expand(B, n_groups, n_tok)
        m = torch.cat([mask.new_ones(B, n_groups, 1), key_real], dim=2)  # (B, n_groups, 1 + n)
        out, w_att = self.attn_space(
            seq.reshape(B * n_groups, 1 + n_tok, D), m.reshape(B * n_groups, 1 + n_tok), return_attention
        )  # (B n_groups, 1 + n, D)
        out = out.view(B, n_groups, 1 + n_tok, D)
        if self.variant == 1:
            cls_out = out[:, :, 0]  # (B, 1, D)
        else:
            group_real = mask.repeat_interleave(per_frame, dim=1)  # (B, n_groups)
            cls_out = masked_mean(out[:, :, 0], group_real)[:, None]  # (B, 1, D)
        tokens = out[:, :, 1:]  # (B, n_groups, n, D)
        if self.variant == 4:
            w = self.space_window
            tokens = tokens.reshape(B, T, S, G // w, G // w, w, w, D).permute(0, 1, 2, 3, 5, 4, 6, 7)
        tokens = tokens.reshape(B, T, S, N, D)
        mass = None
        if return_attention:
            H = w_att.shape[1]
            row = w_att[:, :, 0, 1:].reshape(B, n_groups, H, n_tok)  # CLS copy -> tokens
            if self.variant == 1:
                mass = row.reshape(B, H, T, S * N).sum(-1)  # (B, H, T)
            else:
                mass = row.sum(-1).reshape(B, T, per_frame, H).sum(2).transpose(1, 2)  # (B, H, T)
        return tokens, cls_out, mass

    # ---------------------------------------------------------------------------- forward
    def forward(
        self, x: Tensor, cls: Tensor, mask: Tensor, return_attention: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Run the layer on ``x`` ``(B, T, S, N, D)``, ``cls`` ``(B, 1, D)``, real frames ``mask`` ``(B, T)``.

        Returns:
            ``(x, cls, mass)``; ``mass`` ``(B, H, T)`` as in :meth:`space_mix`, or None.
        """
        mass = None
        frame_real = mask[:, :, None, None, None]  # (B, T, 1, 1, 1)
        for step in self.steps:
            if step == "T":
                out = self.time_mix(self.norm_time(x), mask)
                if self.variant == 4:  # convolution over time, kernel F, zero at padded frames
                    B, T, S, N, D = out.shape
                    c = out.masked_fill(~frame_real, 0.0).permute(0, 2, 3, 4, 1).reshape(B * S * N, D, T)
                    c = self.conv_time(_pad_same(c, self.time_window))  # (B S N, D, T)
                    out = c.view(B, S, N, D, T).permute(0, 4, 1, 2, 3)  # (B, T, S, N, D)
                x = x + self.drop(self.fc_time(out))
            elif step == "M":
                x = x + self.drop(self.fc_cross(self.cross_mix(self.norm_cross(x))))
            else:  # "S" or "J"
                out, cls_out, mass = self.space_mix(
                    self.norm_space(x), self.norm_space(cls), mask, return_attention
                )
                if self.variant == 4:  # convolution over the grid, kernel (G/2) x (G/2)
                    B, T, S, N, D = out.shape
                    G = self.config.motion_grid
                    c = out.reshape(B * T * S, G, G, D).permute(0, 3, 1, 2)  # (B T S, D, G, G)
                    c = self.conv_space(_pad_same(c, self.space_window))  # (B T S, D, G, G)
                    out = c.permute(0, 2, 3, 1).reshape(B, T, S, N, D)
                x = x + self.drop(out)
                cls = cls + self.drop(cls_out)
        x = x + self.drop(self.mlp(self.norm_mlp(x)))
        cls = cls + self.drop(self.mlp(self.norm_mlp(cls)))
        return x, cls, mass


class Mmvit(Head):
    """MM-ViT head over frame-level compressed-domain tokens; see the module docstring.

    CLS is updated only in the space attention (as in TimeSformer), so whatever the last layer
    does to the tokens after it never reaches the logits and gets no gradient: the attentions that
    follow ``S`` in ``order`` (variants 3-4) and, in variant 4, the last grid convolution. They are
    kept so every layer has the same structure.

    Args:
        config: Head configuration.
    """

    Config = MmvitConfig

    def __init__(self, config: MmvitConfig):
        super().__init__()
        self.config = cfg = config
        d, p = cfg.d_model, cfg.residual_patch
        in_dims = {"I": cfg.vit_dim, "M": 2, "R": 3 * p * p, "A": cfg.vggish_dim}
        self.embed = nn.ModuleDict({m: nn.Linear(in_dims[m], d) for m in cfg.modalities})
        self.modality_pos = nn.Parameter(torch.empty(len(cfg.modalities), d))
        self.time_pos = nn.Parameter(torch.empty(cfg.n_frames, d))
        self.space_pos = nn.Parameter(torch.empty(cfg.n_patches, d)) if set(cfg.modalities) - {"A"} else None
        self.cls = nn.Parameter(torch.empty(1, 1, d))
        for param in (self.modality_pos, self.time_pos, self.space_pos, self.cls):
            if param is not None:
                nn.init.trunc_normal_(param, std=0.02)
        self.embed_drop = nn.Dropout(cfg.dropout)
        self.layers = SpaceTimeStack(MmvitLayer(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.n_outputs)

    @property
    def inputs(self) -> dict[str, int | tuple[int, ...]]:
        cfg = self.config
        G, S = cfg.motion_grid, cfg.residual_size
        shapes = {"I": (cfg.n_patches, cfg.vit_dim), "M": (2, G, G), "R": (3, S, S), "A": cfg.vggish_dim}
        return {FEATURES[m]: shapes[m] for m in cfg.modalities}

    @property
    def level(self) -> str:
        return "frame"

    def no_weight_decay(self) -> set[str]:
        return {"cls"}

    def embed_tokens(self, feats: dict[str, Tensor]) -> Tensor:
        """Embed the modalities (Eqs. 1-4) into ``(B, T, S, N, D)``, positions and modality added."""
        cfg = self.config
        G, p, N = cfg.motion_grid, cfg.residual_patch, cfg.n_patches
        tokens = []
        for i, m in enumerate(cfg.modalities):
            x = feats[FEATURES[m]]
            B, T = x.shape[:2]
            if m == "I":
                x = self.embed[m](x)  # (B, T, N, D)
            elif m == "M":
                x = self.embed[m](x.flatten(3).transpose(2, 3))  # (B, T, 2, N) -> (B, T, N, D)
            elif m == "R":
                x = x.reshape(B, T, 3, G, p, G, p).permute(0, 1, 3, 5, 2, 4, 6)  # (B, T, G, G, 3, p, p)
                x = self.embed[m](x.reshape(B, T, N, 3 * p * p))  # (B, T, N, D)
            else:
                x = self.embed[m](x)[:, :, None, :].expand(B, T, N, cfg.d_model)  # (B, T, N, D) replicated
            x = x + self.modality_pos[i]
            if m != "A":
                x = x + self.space_pos  # (N, D)
            tokens.append(x)
        x = torch.stack(tokens, dim=2)  # (B, T, S, N, D)
        return x + time_embedding(self.time_pos, x.shape[1])[:, None, None, :]  # (B, T, S, N, D)

    def forward_features(self, batch: dict[str, Tensor], return_attention: bool = False
                         ) -> tuple[Tensor, Tensor | None]:
        """CLS after the last layer.

        Args:
            batch: ``{feature: (B, T, *shape)}`` for each feature in :attr:`inputs`, plus
                ``"mask"`` ``(B, T)``.
            return_attention: Also return CLS attention per frame.

        Returns:
            ``(cls, attn)``: ``cls`` ``(B, d_model)``; ``attn`` ``(B, T)`` (or None) is the last
            layer's CLS attention to each frame, i.e. for every head the attention of the CLS
            copies to the frame's tokens summed over its space groups (modalities, windows) and
            positions, then averaged over heads, 0 at padded frames and renormalised to sum to 1
            over real frames (CLS's weight on itself is dropped).
        """
        feats, mask = self.read_batch(batch)
        x = self.embed_drop(self.embed_tokens(feats))  # (B, T, S, N, D)
        cls = self.cls.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x, cls, mass = self.layers(x, cls, mask, return_attention)  # mass: (B, H, T)
        return cls[:, 0], (normalise_attention(mass.mean(1), mask) if return_attention else None)

    def forward_head(self, cls: Tensor) -> Tensor:
        """Logits ``(B, n_outputs)`` from CLS ``(B, d_model)``."""
        return self.head(self.norm(cls))


def flops_configs() -> list[tuple[str, dict]]:
    """The model variants of Table 1 at ViT-B width: 12 layers, 8 frames, 196 patches, all four modalities.

    Returns:
        ``[(name, build kwargs)]`` for ``build_head("mmvit", **kwargs)``; ``n_outputs`` is 101 (UCF-101).
        Table 1 reports 1.26, 0.85, 0.82, 0.82, 0.78 and 0.72 TFLOPs and 87.23, 122.69, 158.14,
        158.14, 143.98 and 158.60 M parameters for them, in this order.
    """
    base = dict(n_outputs=101, depth=12, d_model=768, n_heads=12, n_frames=8, n_patches=196,
                motion_grid=14, residual_size=56, modalities="IMRA", order="TMS")
    return [
        ("mmvit-I", dict(base, variant=1)),
        ("mmvit-II", dict(base, variant=2)),
        ("mmvit-III-merged", dict(base, variant=3, cross="merged")),
        ("mmvit-III-co", dict(base, variant=3, cross="co")),
        ("mmvit-III-shift-merge", dict(base, variant=3, cross="shift-merge")),
        ("mmvit-IV-merged", dict(base, variant=4, cross="merged")),
    ]
