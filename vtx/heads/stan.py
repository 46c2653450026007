"""STAN: two-stream spatio-temporal attention over shot tokens.

Fish, Weinbren and Gilbert, "Two-Stream Transformer Architecture for Long Form Video
Understanding" (BMVC 2022), Section 3 ("Method"):

* Spatial tokens are ResNet18 features of each shot's central frame (``resnet18``), temporal
  tokens R(2+1)D features of 12 frames of the shot (``r2plus1d``); each is linearly projected to
  ``d_model``.
* Each stream prepends its own learnable CLS token and adds one shared sinusoidal positional
  embedding (Eq. 1-3); CLS sits at position 0 and shot i at position i + 1.
* One transformer encoder per stream (2 layers by default, post-LN as in the paper's
  description of [Vaswani et al.]).
* Each CLS output is normalised (one LayerNorm per stream) and passed through one MLP ``q(.)``
  with one hidden layer, shared by the streams.
* Fusion (Eq. 5): ``Norm(q(z_s) + lam * q(z_t))``, then a three-layer MLP ``f(.)`` with GLU
  non-linearities gives the logits. The loss (BCE in the paper) is not part of the head.

Beyond the paper, for ablations (Table 4): a single stream, a learned gate or concatenation as
the fusion, and an optional audio stream of VGGish features pooled per shot.

Size. The paper gives parameter counts, not widths: Table 4's one-stream models ("Spatial / Temporal
no backprop") have 16.5 M trainable parameters, STAN-Small 45 M (both streams plus the ResNet18
it fine-tunes, 11.2 M without its classifier). The default ``d_model=256`` gives 2.1 M per
stream. ``--size paper`` (``StanConfig.PRESETS``: ``d_model=768``, 2 layers, MLP ratio 4, 12
heads; the paper names no head count) gives 32.7 M for both streams with 20 genres, so 43.9 M
with ResNet18 against the paper's 45 M, and 18.1 M for one stream against 16.5 M (one stream keeps the shared ``q`` and
the classifier ``f`` whole; half the two-stream head is 16.4 M). docs/BENCHMARKS.md lists the
counts of every head at paper size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import DEFAULT_FEATURE_DIMS, Head, HeadConfig, cls_attention_to_tokens
from .blocks import GluMlp, Mlp, SinusoidalPositionalEmbedding, TransformerEncoder

__all__ = ["STREAM_FEATURES", "Stan", "StanConfig"]

STREAMS = ("spatial", "temporal", "both")
FUSIONS = ("sum", "gated", "concat")
#: Cache dataset each stream reads; its width is the config field ``<feature>_dim``.
STREAM_FEATURES = {"spatial": "resnet18", "temporal": "r2plus1d", "audio": "vggish"}


@dataclass
class StanConfig(HeadConfig):
    """Configuration of :class:`Stan`.

    Attributes:
        n_outputs: Number of logits (labels).
        streams: ``"spatial"`` (resnet18 only), ``"temporal"`` (r2plus1d only) or ``"both"``.
        fusion: ``"sum"`` is Eq. 5, ``Norm(q_s + lam * q_t)``; ``"gated"`` mixes the streams
            with a learned per-channel gate (sigmoid for two streams, softmax over streams for
            three); ``"concat"`` concatenates and projects back to ``d_model``. Ignored when
            only one stream is active.
        lam: Weight of the temporal stream in ``"sum"`` fusion (0.6 in the paper).
        audio: Add a third stream over ``vggish`` features pooled per shot by the data loader,
            with its own encoder and CLS; in ``"sum"`` fusion it is weighted by ``lam`` too, as
            a second context stream: ``Norm(q_s + lam * q_t + lam * q_a)``.
        resnet18_dim: Width of the ``resnet18`` feature.
        r2plus1d_dim: Width of the ``r2plus1d`` feature.
        vggish_dim: Width of the ``vggish`` feature.
        d_model: Common token width of all streams.
        n_heads: Attention heads per layer.
        n_layers: Encoder layers per stream (2 in the paper).
        mlp_ratio: Encoder MLP hidden width as a multiple of ``d_model``.
        dropout: Dropout in the encoders, ``q`` and ``f``.
        norm_first: Pre-LN encoders instead of the paper's post-LN.
    """

    PRESETS = {"paper": {"d_model": 768, "n_heads": 12, "n_layers": 2, "mlp_ratio": 4.0}}

    streams: str = "both"
    fusion: str = "sum"
    lam: float = 0.6
    audio: bool = False
    resnet18_dim: int = DEFAULT_FEATURE_DIMS["resnet18"]
    r2plus1d_dim: int = DEFAULT_FEATURE_DIMS["r2plus1d"]
    vggish_dim: int = DEFAULT_FEATURE_DIMS["vggish"]
    d_model: int = 256
    n_heads: int = 4
    n_layers: int = 2
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    norm_first: bool = False

    def __post_init__(self):
        super().__post_init__()
        self.check_choice("streams", STREAMS)
        self.check_choice("fusion", FUSIONS)
        self.check_positive("resnet18_dim", "r2plus1d_dim", "vggish_dim", "n_layers")

    @property
    def stream_names(self) -> tuple[str, ...]:
        """Active streams in order: spatial and/or temporal, then audio."""
        names = ("spatial", "temporal") if self.streams == "both" else (self.streams,)
        return names + (("audio",) if self.audio else ())

    def input_width_fields(self) -> dict[str, str]:
        return {STREAM_FEATURES[s]: f"{STREAM_FEATURES[s]}_dim" for s in self.stream_names}


class Stan(Head):
    """STAN head over shot tokens; see the module docstring for the architecture.

    Args:
        config: Head configuration.
    """

    Config = StanConfig

    def __init__(self, config: StanConfig):
        super().__init__()
        self.config = cfg = config
        d = cfg.d_model
        names = cfg.stream_names
        self.stream_names = names
        self.stream_features = {s: STREAM_FEATURES[s] for s in names}
        self.stream_weights = {s: 1.0 if s == "spatial" else cfg.lam for s in names}  # in "sum" fusion
        widths = self.inputs

        self.proj = nn.ModuleDict({s: nn.Linear(widths[STREAM_FEATURES[s]], d) for s in names})
        self.cls = nn.ParameterDict({s: nn.Parameter(torch.zeros(1, 1, d)) for s in names})
        for p in self.cls.values():
            nn.init.trunc_normal_(p, std=0.02)
        self.pos = SinusoidalPositionalEmbedding(d)  # one table, shared by every stream (Eq. 1 and 3)
        self.encoders = nn.ModuleDict({
            s: TransformerEncoder(
                d, cfg.n_layers, cfg.n_heads, cfg.mlp_ratio, cfg.dropout, cfg.dropout, cfg.norm_first
            )
            for s in names
        })
        self.cls_norm = nn.ModuleDict({s: nn.LayerNorm(d) for s in names})
        self.q = Mlp(d, d, d, cfg.dropout)  # shared by the streams
        n = len(names)
        self.gate = nn.Linear(n * d, n * d) if n > 1 and cfg.fusion == "gated" else None
        self.concat = nn.Linear(n * d, d) if n > 1 and cfg.fusion == "concat" else None
        self.fuse_norm = nn.LayerNorm(d)
        self.f = GluMlp(d, d, cfg.n_outputs, n_layers=3, dropout=cfg.dropout)

    @property
    def level(self) -> str:
        return "shot"

    def no_weight_decay(self) -> set[str]:
        return {f"cls.{s}" for s in self.stream_names}

    def forward_features(self, batch: dict[str, Tensor], return_attention: bool = False
                         ) -> tuple[dict[str, Tensor], Tensor | None]:
        """Each stream's ``q(Norm(CLS))``.

        Args:
            batch: ``{feature: (B, L, D)}`` for each of :attr:`features`, plus ``"mask"`` ``(B, L)``.
            return_attention: Also return CLS attention per shot.

        Returns:
            ``(q_out, attn)``: ``q_out`` ``{stream: (B, d_model)}``; ``attn`` ``(B, L)`` (or None)
            is the last layer's CLS attention averaged over heads and then over streams, CLS's
            weight on itself dropped and each row renormalised to sum to 1 over real shots (0 at
            padding).
        """
        feats, mask = self.read_batch(batch)
        B = mask.shape[0]
        mask_cls = torch.cat([mask.new_ones(B, 1), mask], dim=1)  # (B, 1 + L)

        q_out, attns = {}, []
        for s in self.stream_names:
            x = self.proj[s](feats[self.stream_features[s]])  # (B, L, d)
            x = torch.cat([self.cls[s].expand(B, -1, -1), x], dim=1)  # (B, 1 + L, d)
            x = self.pos(x)
            x, w = self.encoders[s](x, mask_cls, return_attention)  # w: (B, H, 1 + L, 1 + L)
            q_out[s] = self.q(self.cls_norm[s](x[:, 0]))  # (B, d)
            if return_attention:
                attns.append(cls_attention_to_tokens(w[:, :, 0], mask))  # (B, L)
        return q_out, (torch.stack(attns).mean(dim=0) if return_attention else None)  # (B, L)

    def forward_head(self, q_out: dict[str, Tensor]) -> Tensor:
        """Logits ``(B, n_outputs)``: ``f`` of the fused streams (Eq. 5)."""
        return self.f(self.fuse(q_out))

    def fuse(self, q_out: dict[str, Tensor]) -> Tensor:
        """Fuse the streams' ``q(CLS)`` outputs ``{stream: (B, d)}`` into one normalised ``(B, d)``."""
        zs = [q_out[s] for s in self.stream_names]
        if len(zs) == 1:
            return self.fuse_norm(zs[0])
        if self.config.fusion == "sum":
            return self.fuse_norm(sum(self.stream_weights[s] * q_out[s] for s in self.stream_names))
        cat = torch.cat(zs, dim=-1)  # (B, S * d)
        if self.config.fusion == "concat":
            return self.fuse_norm(self.concat(cat))
        B, d = zs[0].shape
        gate = self.gate(cat).view(B, len(zs), d).softmax(dim=1)  # (B, S, d); S=2: sigmoid and 1 - sigmoid
        return self.fuse_norm((gate * torch.stack(zs, dim=1)).sum(dim=1))  # (B, d)
