"""Stage-2 heads: small transformers (and baselines) over cached shot or frame tokens.

One file per paper: ``stan.py`` (STAN, Fish et al. 2022, Section 3), ``vtn.py`` (VTN, Neimark et
al. 2021, Section 3), ``timesformer.py`` (TimeSformer, Bertasius et al. 2021, Section 3),
``mevit.py`` (MEViT, Section 3), ``mmvit.py`` (MM-ViT, Chen and Ho 2022, Section 3) and
``baselines.py`` (STAN's Table 1); shared layers, the space-time ones included, live in
``blocks.py``, and the config base and the head skeleton in ``base.py``.

The head contract, the same for every head:

* ``build_head(name, **config)`` builds ``HEADS[name].Config(**config)`` and returns
  ``HEADS[name](config)``; the head keeps the config as ``head.config``, so a checkpoint needs
  only the name and ``dataclasses.asdict(head.config)``.
* ``head.features`` names the cache datasets it reads, ``head.inputs`` maps them to widths and
  ``head.level`` is ``"shot"`` or ``"frame"``. A width is an int ``D`` (tokens ``(B, L, D)``)
  or a tuple for shaped tokens (``vit_patches``: ``(196, 768)``, tokens ``(B, L, 196, 768)``).
* ``head(batch)`` takes ``{feature: float (B, L, D), "mask": bool (B, L)}``, all features aligned
  on one token axis, True for real tokens (padding trailing, every row with a real token), and
  returns logits ``(B, n_outputs)``. Padding never changes the logits. An optional
  ``"positions"`` int64 ``(B, L)`` gives each token's index in its video before subsampling
  (VTN's positions index it; the other heads ignore it).
* ``head(batch, return_attention=True)`` returns ``(logits, attn)``, ``attn`` ``(B, L)``: how much
  CLS attends to each token in the last layer, averaged over heads, 0 at padding, rows summing
  to 1 over real tokens.
* ``head(batch)`` is ``head.forward_head(head.forward_features(batch)[0])`` (timm style):
  ``forward_features(batch, return_attention)`` returns ``(features, attn)``, the pooled
  representation (CLS output, pooled tokens, or one per stream) and ``attn`` or None.
* ``head.no_weight_decay()`` names the parameters with ``ndim >= 2`` that get no weight decay
  (the CLS tokens).
* ``config.with_input_widths({feature: D})`` returns a copy of a head config whose features
  take the given widths (e.g. the cache's); for shaped tokens ``D`` is the last axis.
* ``head.set_grad_checkpointing()`` turns activation checkpointing of its layer stacks on.
* Sizes: ``preset(name, "paper")`` gives the paper's model size as config fields
  (``vtx train-head --size paper``); ``saved_config(name, head_config)`` completes a config
  saved by an older vtx with the values that keep its behaviour (``Config.LEGACY``).
* Losses are not part of a head.
"""

from __future__ import annotations

from dataclasses import fields

from .base import Head, HeadConfig
from .baselines import LstmHead, MeanPool
from .mevit import Mevit
from .mmvit import Mmvit
from .stan import Stan
from .timesformer import TimeSformer
from .vtn import Vtn

__all__ = ["HEADS", "SIZES", "build_head", "config_class", "preset", "saved_config"]

#: ``--size`` values: the heads' own defaults, or the paper's model size.
SIZES = ("default", "paper")

HEADS: dict[str, type[Head]] = {
    "lstm": LstmHead,
    "meanpool": MeanPool,
    "mevit": Mevit,
    "mmvit": Mmvit,
    "stan": Stan,
    "timesformer": TimeSformer,
    "vtn": Vtn,
}


def config_class(name: str) -> type[HeadConfig]:
    """Return the config dataclass of head ``name``.

    Raises:
        ValueError: ``name`` is not in :data:`HEADS`; the message lists the valid names.
    """
    if name not in HEADS:
        valid = ", ".join(repr(n) for n in sorted(HEADS))
        raise ValueError(f"unknown head {name!r}; valid heads are {valid}")
    return HEADS[name].Config


def build_head(name: str, **config) -> Head:
    """Build head ``name`` from config keyword arguments.

    Args:
        name: A key of :data:`HEADS`.
        **config: Fields of the head's ``Config``; ``n_outputs`` is required.

    Returns:
        The head, with its config dataclass as ``head.config``.

    Raises:
        ValueError: Unknown head name (the valid names are listed) or an invalid config value.
        TypeError: Unknown config keys (named, with the valid ones) or ``n_outputs`` missing.
    """
    cfg_cls = config_class(name)
    valid = [f.name for f in fields(cfg_cls)]
    unknown = sorted(set(config) - set(valid))
    if unknown:
        raise TypeError(f"head {name!r} has no config key(s) {unknown}; valid keys are {valid}")
    return HEADS[name](cfg_cls(**config))


def preset(name: str, size: str = "default") -> dict:
    """Config fields of head ``name`` at ``size``: ``{}`` for ``"default"`` (the config's own
    defaults), the paper's model size for ``"paper"`` (``Config.PRESETS``).

    Raises:
        ValueError: unknown head or size.
    """
    cfg_cls = config_class(name)
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid sizes are {', '.join(SIZES)}")
    if size == "default":
        return {}
    if size not in cfg_cls.PRESETS:
        raise ValueError(f"head {name!r} has no {size!r} size; heads with one: "
                         f"{', '.join(n for n in sorted(HEADS) if size in HEADS[n].Config.PRESETS)}")
    return dict(cfg_cls.PRESETS[size])


def saved_config(name: str, head_config: dict) -> dict:
    """A head config as saved in a checkpoint, completed for this vtx: fields added since keep
    the value that reproduces the saved head's behaviour (``Config.LEGACY``), not the new
    default.
    """
    return {**config_class(name).LEGACY, **head_config}
