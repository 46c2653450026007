"""Tests of the shared head skeleton in vtx/heads/base.py and vtx/heads/blocks.py.

Every head keeps the state_dict keys and outputs of the version before the skeleton refactor
(golden values in ``tests/data/heads_golden.json``), splits ``forward`` into ``forward_features``
and ``forward_head``, declares ``no_weight_decay()`` and sets its feature widths through
``Config.with_input_widths``. Attention takes a general mask, and no module imports another
module's private names.
"""

from __future__ import annotations

import ast
import json
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch
from torch import nn

from vtx.heads import HEADS, build_head, config_class, saved_config
from vtx.heads.base import HeadConfig, input_shape
from vtx.heads.blocks import merge_masks

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((ROOT / "tests" / "data" / "heads_golden.json").read_text())["cases"]
CASES = [pytest.param(case["head"], case["config"], id=cid) for cid, case in GOLDEN.items()]
N_OUT = 5
LENGTHS = (5, 3, 1)
ZERO_INIT = ("temporal_fc", "pos_time", "fc_time", "fc_cross")


def golden_head(name: str, config: dict) -> nn.Module:
    """The head as the golden values were made: seed 0, zero-initialised layers set at random.

    The golden configs are the previous version's, so they are read as a checkpoint's are
    (:func:`vtx.heads.saved_config`: fields added since take their legacy values)."""
    torch.manual_seed(0)
    head = build_head(name, n_outputs=N_OUT, **saved_config(name, config)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in head.named_parameters():
            if any(z in pname for z in ZERO_INIT):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return head


def golden_batch(head: nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    L = max(LENGTHS)
    batch = {k: torch.randn(len(LENGTHS), L, *input_shape(d), generator=g) for k, d in head.inputs.items()}
    batch["mask"] = torch.arange(L)[None] < torch.tensor(LENGTHS)[:, None]
    return batch


def test_cases_cover_every_head():
    assert {case["head"] for case in GOLDEN.values()} == set(HEADS)


# --- checkpoints and outputs of the previous version -------------------------------------------


@pytest.mark.parametrize("name,config", CASES)
def test_state_dict_keys_are_those_of_the_previous_version(name, config, request):
    head = build_head(name, n_outputs=N_OUT, **saved_config(name, config))
    assert sorted(head.state_dict()) == GOLDEN[request.node.callspec.id]["state_dict_keys"]


@pytest.mark.parametrize("name,config", CASES)
def test_outputs_are_those_of_the_previous_version(name, config, request):
    head = golden_head(name, config)
    want = GOLDEN[request.node.callspec.id]
    with torch.no_grad():
        logits, attn = head(golden_batch(head), return_attention=True)
    torch.testing.assert_close(logits, torch.tensor(want["logits"]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(attn, torch.tensor(want["attn"]), atol=1e-5, rtol=1e-4)


# --- forward_features / forward_head -------------------------------------------------------------


@pytest.mark.parametrize("name,config", CASES)
def test_forward_is_forward_head_of_forward_features(name, config):
    head = golden_head(name, config)
    batch = golden_batch(head)
    with torch.no_grad():
        features, no_attn = head.forward_features(batch)
        logits = head.forward_head(features)
        features_a, attn = head.forward_features(batch, return_attention=True)
        torch.testing.assert_close(head(batch), logits, atol=0, rtol=0)
        torch.testing.assert_close(head.forward_head(features_a), logits, atol=1e-6, rtol=1e-5)
    assert no_attn is None
    assert attn.shape == batch["mask"].shape
    torch.testing.assert_close(attn.sum(1), torch.ones(len(LENGTHS)))


# --- no_weight_decay -------------------------------------------------------------------------------


@pytest.mark.parametrize("name,config", CASES)
def test_no_weight_decay_is_exactly_the_cls_tokens(name, config):
    head = build_head(name, n_outputs=N_OUT, **saved_config(name, config))
    params = dict(head.named_parameters())
    cls_tokens = {n for n, p in params.items() if p.ndim >= 2 and "cls" in n}  # the trainer's old rule
    assert head.no_weight_decay() == cls_tokens
    has_cls = name not in ("meanpool", "lstm")
    assert bool(cls_tokens) == has_cls
    if has_cls:  # the CLS token(s) themselves
        cls_params = {n for n, p in params.items() if n.split(".")[-1] == "cls" or n.startswith("cls.")}
        assert cls_params and cls_params == head.no_weight_decay()


# --- with_input_widths -----------------------------------------------------------------------------


@pytest.mark.parametrize("name,config", CASES)
def test_with_input_widths_sets_the_width_of_every_feature_read(name, config):
    cfg = config_class(name)(n_outputs=N_OUT, **config)
    before = build_head(name, **asdict(cfg)).inputs
    widths = {f: input_shape(w)[-1] + 3 for f, w in before.items()}
    new = cfg.with_input_widths({**widths, "not_read_by_this_head": 11})
    assert type(new) is type(cfg) and isinstance(new, HeadConfig)
    assert asdict(cfg) == asdict(config_class(name)(n_outputs=N_OUT, **config))  # a copy, not a change
    head = build_head(name, **asdict(new))
    assert head.features == tuple(before)
    shaped_by_architecture = {"motion", "residual"} if name == "mmvit" else set()
    for f, w in head.inputs.items():
        if f in shaped_by_architecture:  # MM-ViT's (2, G, G) and (3, S, S): kept
            assert w == before[f]
        else:  # an int width, or the last axis of a shaped one (vit_patches (N, D))
            assert input_shape(w)[-1] == widths[f], f
            assert input_shape(w)[:-1] == input_shape(before[f])[:-1], f
    with torch.no_grad():
        assert head.eval()(golden_batch(head)).shape == (len(LENGTHS), N_OUT)


def test_with_input_widths_ignores_features_not_read():
    cfg = config_class("stan")(n_outputs=2, streams="spatial")
    new = cfg.with_input_widths({"r2plus1d": 7, "vggish": 9})
    assert new == cfg
    both = config_class("lstm")(n_outputs=2, features=("vit",), level="frame")
    assert both.with_input_widths({"vit": 5, "resnet18": 6}).feature_dims == {"vit": 5}


# --- the config checks every head shares -----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(HEADS))
def test_shared_config_checks_name_the_field(name):
    cfg_cls = config_class(name)
    names = {f.name for f in fields(cfg_cls)}
    with pytest.raises(ValueError, match="n_outputs"):
        cfg_cls(n_outputs=0)
    with pytest.raises(ValueError, match="dropout"):
        cfg_cls(n_outputs=2, dropout=1.0)
    if {"d_model", "n_heads"} <= names:
        with pytest.raises(ValueError, match="divisible by n_heads"):
            cfg_cls(n_outputs=2, d_model=30, n_heads=4)
        with pytest.raises(ValueError, match="n_heads must be >= 1"):
            cfg_cls(n_outputs=2, n_heads=0)
    for depth in ("depth", "n_layers"):
        if depth in names:
            with pytest.raises(ValueError, match=f"{depth} must be >= 1"):
                cfg_cls(n_outputs=2, **{depth: 0})


# --- attention with a general mask (the comparison with torch is in test_heads.py) -----------------


def test_merge_masks_keeps_the_kind_of_the_general_mask():
    keys = torch.tensor([[True, False, True]])
    assert merge_masks(None, None) is None
    assert merge_masks(keys, None).shape == (1, 1, 1, 3)
    others = ~torch.eye(3, dtype=torch.bool)
    both = merge_masks(keys, others)
    assert both.dtype == torch.bool and both[0, 0].tolist() == [[False, False, True], [True, False, True],
                                                                [True, False, False]]
    additive = merge_masks(keys, torch.zeros(3, 3))
    assert additive.dtype == torch.float32 and torch.isinf(additive[0, 0, :, 1]).all()


def test_co_attention_is_the_layers_own_attention_with_a_mask():
    from vtx.heads.mmvit import Mmvit, MmvitConfig

    torch.manual_seed(0)
    head = Mmvit(MmvitConfig(n_outputs=2, d_model=16, n_heads=2, depth=1, n_frames=2, n_patches=4,
                             motion_grid=2, residual_size=4, vit_dim=8, vggish_dim=4, cross="co")).eval()
    layer = head.layers[0]
    h = torch.randn(1, 2, 4, 4, 16)  # (B, T, S, N, D)
    seq = h.transpose(2, 3).reshape(8, 4, 16)  # (B T N, S, D)
    want, _ = layer.attn_cross(seq, attn_mask=~torch.eye(4, dtype=torch.bool))
    torch.testing.assert_close(layer.cross_mix(h), want.view(1, 2, 4, 4, 16).transpose(2, 3))


# --- no private imports ----------------------------------------------------------------------------

OWN_FILES = sorted((ROOT / "vtx" / "heads").glob("*.py")) + [
    ROOT / "tests" / f for f in ("test_heads.py", "test_heads_spacetime.py", "test_mmvit.py",
                                 "test_vtn_longformer_oracle.py", "test_spacetime_train.py",
                                 "test_head_skeleton.py")
]


@pytest.mark.parametrize("path", OWN_FILES, ids=lambda p: p.name)
def test_no_module_imports_private_names(path):
    private = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            private += [f"{module}.{a.name}" for a in node.names if a.name.startswith("_")]
            private += [module] if any(part.startswith("_") and part != "__future__"
                                       for part in module.split(".")) else []
        elif isinstance(node, ast.Import):
            private += [a.name for a in node.names if any(p.startswith("_") for p in a.name.split("."))]
    assert private == []
