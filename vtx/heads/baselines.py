"""Baseline heads of STAN's Table 1: average pooling and an LSTM over cached tokens.

Fish, Weinbren and Gilbert, "Two-Stream Transformer Architecture for Long Form Video
Understanding" (BMVC 2022), Section 4 ("Compared Methods", Table 1): "extracting convolutional
image features from a ResNet18 for each scene and simply using average pooling for
classification", and "a vanilla LSTM to model the temporal relationship between the feature
representations". Here both read any cached features (the shot features ``resnet18`` and
``r2plus1d`` concatenated by default) and end in an MLP.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from vtx.features import feature_width

from .base import DEFAULT_FEATURE_DIMS, LEVELS, Head, HeadConfig, uniform_attention
from .blocks import Mlp

__all__ = ["BaselineConfig", "LstmConfig", "LstmHead", "MeanPool", "MeanPoolConfig"]


@dataclass
class BaselineConfig(HeadConfig):
    """Fields shared by the baselines' configs.

    Attributes:
        n_outputs: Number of logits (labels).
        features: Cache datasets to read; their features are concatenated per token.
        feature_dims: Width of each feature; defaults cover resnet18, r2plus1d, vit and vggish.
            Stored restricted to ``features``.
        level: Token axis, ``"shot"`` or ``"frame"`` (e.g. ``features=("vit",)``).
        hidden: Hidden width of the MLP (and, in :class:`LstmConfig`, of the LSTM per direction).
    """

    features: tuple[str, ...] = ("resnet18", "r2plus1d")
    feature_dims: dict[str, int] = field(default_factory=dict)
    level: str = "shot"
    hidden: int = 256

    def __post_init__(self):
        super().__post_init__()
        self.features = tuple(self.features)  # lists come back from JSON checkpoints
        if not self.features:
            raise ValueError("features is empty; name at least one cache dataset, e.g. ('resnet18',)")
        dims = {**DEFAULT_FEATURE_DIMS, **self.feature_dims}
        dims.update({f: feature_width(f) for f in self.features if f not in dims})
        missing = [f for f in self.features if dims[f] is None]
        if missing:
            raise ValueError(
                f"no width known for features {missing}; pass feature_dims={{{missing[0]!r}: D, ...}}"
            )
        self.feature_dims = {f: int(dims[f]) for f in self.features}
        self.check_choice("level", LEVELS)
        self.check_positive("hidden")

    def input_width_fields(self) -> dict[str, str]:
        return {f: "feature_dims" for f in self.features}


class BaselineHead(Head):
    """The baselines read ``config.feature_dims`` on ``config.level``."""

    config: BaselineConfig

    @property
    def level(self) -> str:
        return self.config.level


@dataclass
class MeanPoolConfig(BaselineConfig):
    """Configuration of :class:`MeanPool`: the fields of :class:`BaselineConfig`, then:

    Attributes:
        dropout: MLP dropout.
    """

    dropout: float = 0.1


class MeanPool(BaselineHead):
    """Masked mean of the concatenated features over real tokens, then an MLP.

    With ``return_attention`` the weights are uniform over real tokens: that is exactly how much
    each token contributes to the mean.

    Args:
        config: Head configuration.
    """

    Config = MeanPoolConfig

    def __init__(self, config: MeanPoolConfig):
        super().__init__()
        self.config = cfg = config
        self.norm = nn.LayerNorm(sum(cfg.feature_dims.values()))
        self.mlp = Mlp(sum(cfg.feature_dims.values()), cfg.hidden, cfg.n_outputs, cfg.dropout)

    def forward_features(self, batch: dict[str, Tensor], return_attention: bool = False
                         ) -> tuple[Tensor, Tensor | None]:
        """The masked mean ``(B, sum D)`` of the concatenated features, and the (uniform) weight of
        each real token ``(B, L)`` (or None)."""
        feats, mask = self.read_batch(batch)
        x = torch.cat([feats[f] for f in self.features], dim=-1)  # (B, L, sum D), padding zeroed
        pooled = x.sum(dim=1) / mask.sum(dim=1, keepdim=True).to(x.dtype)  # (B, sum D)
        return pooled, (uniform_attention(mask).to(x.dtype) if return_attention else None)

    def forward_head(self, pooled: Tensor) -> Tensor:
        """Logits ``(B, n_outputs)`` from the mean ``(B, sum D)``."""
        return self.mlp(self.norm(pooled))


@dataclass
class LstmConfig(BaselineConfig):
    """Configuration of :class:`LstmHead`: the fields of :class:`BaselineConfig` (``hidden`` is the
    LSTM hidden width per direction, also the MLP hidden width), then:

    Attributes:
        n_layers: Stacked LSTM layers.
        bidirectional: Run a backward LSTM too and concatenate both final states.
        dropout: Dropout between LSTM layers and in the MLP.
    """

    n_layers: int = 1
    bidirectional: bool = True
    dropout: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        self.check_positive("n_layers")


class LstmHead(BaselineHead):
    """A (bi)LSTM over the real tokens in order; the last layer's final states feed an MLP.

    Padding may sit anywhere: real tokens are moved to the front (keeping their order) and the
    sequences are packed, so the LSTM never sees padding. With ``return_attention`` the weights
    are uniform over real tokens: an LSTM has no attention, and this says so rather than invent one.

    Args:
        config: Head configuration.
    """

    Config = LstmConfig

    def __init__(self, config: LstmConfig):
        super().__init__()
        self.config = cfg = config
        self.lstm = nn.LSTM(
            sum(cfg.feature_dims.values()), cfg.hidden, cfg.n_layers, batch_first=True,
            dropout=cfg.dropout if cfg.n_layers > 1 else 0.0, bidirectional=cfg.bidirectional,
        )
        n_dir = 2 if cfg.bidirectional else 1
        self.mlp = Mlp(n_dir * cfg.hidden, cfg.hidden, cfg.n_outputs, cfg.dropout)

    def forward_features(self, batch: dict[str, Tensor], return_attention: bool = False
                         ) -> tuple[Tensor, Tensor | None]:
        """The last layer's final states ``(B, n_dir * hidden)``, and uniform weights over real
        tokens ``(B, L)`` (or None)."""
        feats, mask = self.read_batch(batch)
        x = torch.cat([feats[f] for f in self.features], dim=-1)  # (B, L, sum D)
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # real tokens first, in order
        x = torch.gather(x, 1, order[..., None].expand_as(x))  # (B, L, sum D)
        lengths = mask.sum(dim=1).cpu()
        _, (h_n, _) = self.lstm(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        n_dir = 2 if self.config.bidirectional else 1
        last = h_n[-n_dir:].transpose(0, 1).reshape(x.shape[0], -1)  # (B, n_dir * hidden)
        return last, (uniform_attention(mask).to(x.dtype) if return_attention else None)

    def forward_head(self, last: Tensor) -> Tensor:
        """Logits ``(B, n_outputs)`` from the final states."""
        return self.mlp(last)
