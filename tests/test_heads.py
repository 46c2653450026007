"""Tests for vtx/heads: every registered head on tiny input, then blocks, STAN, VTN and baselines.

Modelled on timm's ``tests/test_models.py``: one table of tiny configs, each run through the same
contract checks. The Hugging Face Longformer oracle for VTN is in ``test_vtn_longformer_oracle.py``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from vtx.heads import HEADS, build_head, config_class
from vtx.heads.base import input_shape
from vtx.heads.blocks import (
    GluMlp,
    LearnedPositionalEmbedding,
    MultiHeadSelfAttention,
    SinusoidalPositionalEmbedding,
    TransformerEncoderLayer,
    sinusoidal_embedding,
)

STAN_TINY = dict(
    d_model=16, n_heads=2, n_layers=2, dropout=0.0, resnet18_dim=24, r2plus1d_dim=20, vggish_dim=12
)
VTN_TINY = dict(
    feature_dim=20, d_model=16, n_heads=2, n_layers=2, window=4, max_len=64, dropout=0.0, attn_dropout=0.0
)
SMALL_DIMS = {"resnet18": 24, "r2plus1d": 20, "vit": 28, "vggish": 12}
BASE_TINY = dict(feature_dims=SMALL_DIMS, hidden=16, dropout=0.0)
# The last VTN layer's sliding-window projections never reach the logits (documented in Vtn).
VTN_UNUSED = tuple(f"encoder.layers.1.attn.{p}." for p in ("query", "key", "value"))

# Space-time heads: 18 frames (>= the longest rows below) of a 2 x 2 patch grid.
ST_TINY = dict(feature_dim=20, d_model=16, n_heads=2, depth=2, n_patches=4, n_frames=18)
MM_TINY = dict(d_model=16, n_heads=2, depth=2, n_frames=18, n_patches=4, motion_grid=2,
               residual_size=4, vit_dim=20, vggish_dim=12, mlp_ratio=2.0)

CASES = [
    pytest.param("stan", dict(STAN_TINY), (), id="stan-sum"),
    pytest.param("stan", dict(STAN_TINY, fusion="gated"), (), id="stan-gated"),
    pytest.param("stan", dict(STAN_TINY, fusion="concat"), (), id="stan-concat"),
    pytest.param("stan", dict(STAN_TINY, audio=True), (), id="stan-audio"),
    pytest.param("stan", dict(STAN_TINY, audio=True, fusion="gated"), (), id="stan-audio-gated"),
    pytest.param("stan", dict(STAN_TINY, streams="spatial"), (), id="stan-spatial"),
    pytest.param("stan", dict(STAN_TINY, streams="temporal", norm_first=True), (), id="stan-temporal-preln"),
    pytest.param("vtn", dict(VTN_TINY), VTN_UNUSED, id="vtn-learned"),
    pytest.param("vtn", dict(VTN_TINY, pos="fixed", window=2), VTN_UNUSED, id="vtn-fixed-w2"),
    pytest.param("vtn", dict(VTN_TINY, pos="none", window=32), VTN_UNUSED, id="vtn-none-w32"),
    pytest.param("meanpool", dict(BASE_TINY), (), id="meanpool-shot"),
    pytest.param("meanpool", dict(BASE_TINY, features=("vit",), level="frame"), (), id="meanpool-frame"),
    pytest.param("lstm", dict(BASE_TINY), (), id="lstm-bi"),
    pytest.param("lstm", dict(BASE_TINY, bidirectional=False, n_layers=2), (), id="lstm-uni-2layer"),
    pytest.param("lstm", dict(BASE_TINY, features=("vit", "vggish"), level="frame"), (), id="lstm-frame"),
    pytest.param("timesformer", dict(ST_TINY), (), id="timesformer-divided"),
    pytest.param("timesformer", dict(ST_TINY, attention="joint"), (), id="timesformer-joint"),
    pytest.param("mevit", dict(ST_TINY), (), id="mevit-M2"),
    pytest.param("mmvit", dict(MM_TINY), (), id="mmvit-3-merged"),
    pytest.param("mmvit", dict(MM_TINY, variant=1), (), id="mmvit-1"),
    pytest.param("mmvit", dict(MM_TINY, variant=4, cross="co"), ("layers.1.conv_space.",),
                 id="mmvit-4-co"),
]
N_OUT = 5
LENGTHS = (11, 7, 1)  # includes a one-token row


def make_batch(head, lengths=LENGTHS, L=None, seed=0):
    """Random features for ``head`` with trailing padding holding random values."""
    g = torch.Generator().manual_seed(seed)
    L = L or max(lengths)
    batch = {k: torch.randn(len(lengths), L, *input_shape(d), generator=g)
             for k, d in head.inputs.items()}
    batch["mask"] = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    return batch


ZERO_INIT = ("temporal_fc", "pos_time", "fc_time", "fc_cross")


def tiny(name, cfg, seed=0):
    """A tiny head; zero-initialised layers (TimeSformer's temporal_fc, ...) get random values
    so that gradients and perturbations can be seen through them."""
    torch.manual_seed(seed)
    head = build_head(name, n_outputs=N_OUT, **cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in head.named_parameters():
            if any(z in pname for z in ZERO_INIT):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return head


# --- contract, for every registered head ------------------------------------------------------


def test_cases_cover_every_head():
    assert {p.values[0] for p in CASES} == set(HEADS)


def test_heads_is_a_plain_dict_of_modules_with_config_dataclasses():
    assert type(HEADS) is dict
    for name, cls in HEADS.items():
        assert issubclass(cls, nn.Module)
        assert config_class(name) is cls.Config
        assert "n_outputs" in cls.Config.__dataclass_fields__


@pytest.mark.parametrize("name,cfg,unused", CASES)
def test_forward_shape_finite_and_gradients(name, cfg, unused):
    head = tiny(name, cfg).train()  # dropout is 0 in the tiny configs
    assert isinstance(head.config, type(head).Config)
    assert head.level in ("shot", "frame")
    assert head.features == tuple(head.inputs) and len(head.features) >= 1
    logits = head(make_batch(head))
    assert logits.shape == (len(LENGTHS), N_OUT)
    assert torch.isfinite(logits).all()
    logits.pow(2).sum().backward()
    for pname, p in head.named_parameters():
        if pname.startswith(unused):
            assert p.grad is None or not p.grad.any(), f"{pname} is documented unused but got a gradient"
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {pname}"
            assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name,cfg,unused", CASES)
def test_padding_with_garbage_does_not_change_output(name, cfg, unused):
    head = tiny(name, cfg)
    batch = make_batch(head)
    long = make_batch(head, L=max(LENGTHS) + 6, seed=1)
    for k in head.inputs:
        garbage = long[k]
        garbage[0::2] = float("nan")
        garbage[1::2] = 1e6
        m = batch["mask"].reshape(*batch["mask"].shape, *[1] * (batch[k].dim() - 2))
        garbage[:, : batch[k].shape[1]] = torch.where(m, batch[k], torch.full_like(batch[k], -3e5))
    with torch.no_grad():
        ref, ref_attn = head(batch, return_attention=True)
        out, attn = head(long, return_attention=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn[:, : ref_attn.shape[1]], ref_attn, atol=1e-6, rtol=1e-5)
    assert (attn[~long["mask"]] == 0).all()


@pytest.mark.parametrize("name,cfg,unused", CASES)
def test_return_attention_is_a_distribution_over_real_tokens(name, cfg, unused):
    head = tiny(name, cfg)
    batch = make_batch(head)
    with torch.no_grad():
        plain = head(batch)
        logits, attn = head(batch, return_attention=True)
    torch.testing.assert_close(logits, plain, atol=1e-6, rtol=1e-5)
    assert attn.shape == batch["mask"].shape
    assert (attn >= 0).all() and (attn[~batch["mask"]] == 0).all()
    torch.testing.assert_close(attn.sum(dim=1), torch.ones(len(LENGTHS)))
    assert attn[2, 0] == pytest.approx(1.0)  # the one-token row


@pytest.mark.parametrize("name,cfg,unused", CASES)
def test_config_round_trips_through_json(name, cfg, unused):
    head = tiny(name, cfg)
    saved = json.loads(json.dumps(asdict(head.config)))  # what a checkpoint holds
    clone = build_head(name, **saved).eval()
    assert clone.config == head.config
    clone.load_state_dict(head.state_dict())
    batch = make_batch(head)
    with torch.no_grad():
        torch.testing.assert_close(clone(batch), head(batch))


@pytest.mark.parametrize("name,cfg,unused", CASES)
def test_missing_feature_is_named(name, cfg, unused):
    head = tiny(name, cfg)
    batch = make_batch(head)
    missing = head.features[-1]
    del batch[missing]
    with pytest.raises(ValueError, match=repr(missing)):
        head(batch)


# --- build_head -------------------------------------------------------------------------------


def test_unknown_head_lists_valid_names_sorted():
    with pytest.raises(ValueError) as err:
        build_head("nope", n_outputs=2)
    msg = str(err.value)
    assert "'nope'" in msg
    positions = [msg.index(repr(n)) for n in sorted(HEADS)]
    assert positions == sorted(positions)
    with pytest.raises(ValueError, match="'stan'"):
        config_class("nope")


@pytest.mark.parametrize("name", sorted(HEADS))
def test_unknown_config_key_is_named(name):
    with pytest.raises(TypeError, match="bogus_key"):
        build_head(name, n_outputs=2, bogus_key=1)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_n_outputs_is_required(name):
    with pytest.raises(TypeError, match="n_outputs"):
        build_head(name)


@pytest.mark.parametrize(
    "name,cfg,match",
    [
        pytest.param("stan", dict(fusion="max"), "fusion", id="stan-fusion"),
        pytest.param("stan", dict(streams="audio"), "streams", id="stan-streams"),
        pytest.param("stan", dict(d_model=30, n_heads=4), "divisible", id="stan-heads"),
        pytest.param("vtn", dict(window=7), "even", id="vtn-odd-window"),
        pytest.param("vtn", dict(pos="rotary"), "pos", id="vtn-pos"),
        pytest.param("meanpool", dict(features=("clip",)), "feature_dims", id="meanpool-unknown-dim"),
        pytest.param("lstm", dict(level="scene"), "level", id="lstm-level"),
        pytest.param("meanpool", dict(n_outputs=0), "n_outputs", id="zero-outputs"),
    ],
)
def test_invalid_config_values_raise_with_the_field(name, cfg, match):
    cfg = {"n_outputs": 2, **cfg}
    with pytest.raises(ValueError, match=match):
        build_head(name, **cfg)


SHOT_DIMS = {"resnet18": 512, "r2plus1d": 512}


@pytest.mark.parametrize(
    "name,cfg,inputs,level",
    [
        pytest.param("stan", {}, SHOT_DIMS, "shot", id="stan"),
        pytest.param("stan", dict(streams="spatial"), {"resnet18": 512}, "shot", id="stan-spatial"),
        pytest.param("stan", dict(streams="temporal"), {"r2plus1d": 512}, "shot", id="stan-temporal"),
        pytest.param("stan", dict(audio=True), {**SHOT_DIMS, "vggish": 128}, "shot", id="stan-av"),
        pytest.param("stan", dict(streams="spatial", audio=True), {"resnet18": 512, "vggish": 128}, "shot",
                     id="stan-spatial-audio"),
        pytest.param("vtn", {}, {"vit": 768}, "frame", id="vtn"),
        pytest.param("vtn", dict(feature="vggish", feature_dim=128), {"vggish": 128}, "frame",
                     id="vtn-vggish"),
        pytest.param("meanpool", {}, SHOT_DIMS, "shot", id="meanpool"),
        pytest.param("lstm", dict(features=["vit", "vggish"], level="frame"), {"vit": 768, "vggish": 128},
                     "frame", id="lstm-frame"),
    ],
)
def test_default_features_dims_and_level(name, cfg, inputs, level):
    head = build_head(name, n_outputs=3, **cfg)
    assert head.inputs == inputs
    assert head.features == tuple(inputs)
    assert head.level == level


# --- shared blocks ----------------------------------------------------------------------------


def attention_and_torch_reference() -> tuple[MultiHeadSelfAttention, nn.MultiheadAttention]:
    """Our attention and ``nn.MultiheadAttention`` with the same weights."""
    torch.manual_seed(0)
    ours = MultiHeadSelfAttention(16, 4).eval()
    ref = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    ref.in_proj_weight.data.copy_(ours.qkv.weight)
    ref.in_proj_bias.data.copy_(ours.qkv.bias)
    ref.out_proj.weight.data.copy_(ours.proj.weight)
    ref.out_proj.bias.data.copy_(ours.proj.bias)
    return ours, ref


def test_attention_matches_torch_multihead_attention():
    ours, ref = attention_and_torch_reference()
    x = torch.randn(2, 9, 16)
    mask = torch.arange(9)[None] < torch.tensor([[9], [4]])
    want, want_w = ref(x, x, x, key_padding_mask=~mask, average_attn_weights=False)
    fast, _ = ours(x, mask)
    slow, weights = ours(x, mask, return_attention=True)
    torch.testing.assert_close(fast, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slow, want, atol=1e-5, rtol=1e-5)
    assert weights.shape == (2, 4, 1, 9)  # only the first query's (CLS's) row
    torch.testing.assert_close(weights, want_w[:, :, :1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_attention_takes_a_general_mask_like_torch(kind):
    ours, ref = attention_and_torch_reference()
    x = torch.randn(2, 6, 16)
    keys = torch.tensor([[1] * 6, [1] * 4 + [0] * 2]).bool()
    causal = ~torch.eye(6).bool()  # True: may attend; nobody attends to itself
    want, want_w = ref(x, x, x, key_padding_mask=~keys, attn_mask=~causal, average_attn_weights=False)
    mask = causal if kind == "bool" else torch.zeros(6, 6).masked_fill(~causal, float("-inf"))
    fast, _ = ours(x, keys, attn_mask=mask)
    slow, weights = ours(x, keys, return_attention=True, attn_mask=mask)
    torch.testing.assert_close(fast, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slow, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, want_w[:, :, :1], atol=1e-6, rtol=1e-5)
    assert weights[:, :, 0, 0].eq(0).all()  # the general mask reached the returned row


@pytest.mark.parametrize("norm_first", [pytest.param(False, id="post-ln"), pytest.param(True, id="pre-ln")])
def test_encoder_layer_matches_torch_transformer_encoder_layer(norm_first):
    torch.manual_seed(0)
    ours = TransformerEncoderLayer(16, 4, mlp_ratio=2.0, norm_first=norm_first).eval()
    ref = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, activation="gelu", batch_first=True,
                                     norm_first=norm_first).eval()
    for layer in (ours.norm1, ours.norm2):
        nn.init.normal_(layer.weight, 1.0, 0.2)
        nn.init.normal_(layer.bias, 0.0, 0.2)
    rename = {"attn.qkv.weight": "self_attn.in_proj_weight", "attn.qkv.bias": "self_attn.in_proj_bias",
              "attn.proj.weight": "self_attn.out_proj.weight", "attn.proj.bias": "self_attn.out_proj.bias",
              "mlp.fc1.weight": "linear1.weight", "mlp.fc1.bias": "linear1.bias",
              "mlp.fc2.weight": "linear2.weight", "mlp.fc2.bias": "linear2.bias"}
    ref.load_state_dict({rename.get(k, k): v for k, v in ours.state_dict().items()})
    x = torch.randn(2, 7, 16)
    mask = torch.arange(7)[None] < torch.tensor([[7], [3]])
    out, _ = ours(x, mask)
    want = ref(x, src_key_padding_mask=~mask)
    torch.testing.assert_close(out[mask], want[mask], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dim", [pytest.param(16, id="even"), pytest.param(7, id="odd")])
def test_sinusoidal_embedding_is_eq2(dim):
    got = SinusoidalPositionalEmbedding(dim)(torch.zeros(1, 60, dim))[0]
    for pos in range(60):
        for c in range(dim):
            i = c // 2
            angle = pos / 10000 ** (2 * i / dim)
            want = math.sin(angle) if c % 2 == 0 else math.cos(angle)
            assert got[pos, c].item() == pytest.approx(want, abs=1e-6), (pos, c)
    far = sinusoidal_embedding(torch.tensor([7000]), 4)[0]
    assert far[0].item() == pytest.approx(math.sin(7000), abs=1e-6)
    assert far[3].item() == pytest.approx(math.cos(70), abs=1e-6)


def test_glu_mlp_gates_with_sigmoid():
    torch.manual_seed(0)
    mlp = GluMlp(6, 4, 3, n_layers=3)
    x = torch.randn(5, 6)
    h = x
    for gate in mlp.gates:
        a, b = gate(h).chunk(2, dim=-1)
        h = a * torch.sigmoid(b)
    torch.testing.assert_close(mlp(x), mlp.out(h))
    assert len(mlp.gates) == 2  # three linear layers in all


def test_learned_positions_refuse_too_long_input():
    pe = LearnedPositionalEmbedding(4, 8)
    with pytest.raises(ValueError, match="max_len"):
        pe(torch.zeros(1, 5, 8))


# --- STAN -------------------------------------------------------------------------------------


def _changed(batch, key, seed=5):
    out = dict(batch)
    out[key] = torch.randn(batch[key].shape, generator=torch.Generator().manual_seed(seed))
    return out


@pytest.mark.parametrize(
    "cfg,ignored,used",
    [
        pytest.param(dict(streams="spatial"), "r2plus1d", "resnet18", id="spatial"),
        pytest.param(dict(streams="temporal"), "resnet18", "r2plus1d", id="temporal"),
        pytest.param(dict(lam=0.0), "r2plus1d", "resnet18", id="lam0-ignores-temporal"),
        pytest.param(dict(lam=0.0, audio=True), "vggish", "resnet18", id="lam0-ignores-audio"),
        pytest.param(dict(lam=0.6), "resnet18", None, id="lam0.6-uses-spatial"),
        pytest.param(dict(lam=0.6), "r2plus1d", None, id="lam0.6-uses-temporal"),
    ],
)
def test_stan_stream_selection_and_lambda(cfg, ignored, used):
    head = tiny("stan", dict(STAN_TINY, **cfg))
    batch = make_batch(build_head("stan", n_outputs=1, **dict(STAN_TINY, audio=True)))  # all 3 streams
    with torch.no_grad():
        ref = head(batch)
        if used is None:  # ``ignored`` names a stream that must matter here
            assert not torch.allclose(head(_changed(batch, ignored)), ref, atol=1e-4)
            return
        torch.testing.assert_close(head(_changed(batch, ignored)), ref, atol=0, rtol=0)
        assert not torch.allclose(head(_changed(batch, used)), ref, atol=1e-4)


def test_stan_sum_fusion_is_eq5():
    head = tiny("stan", dict(STAN_TINY, lam=0.6))
    a, b = torch.randn(3, 16), torch.randn(3, 16)
    nn.init.normal_(head.fuse_norm.weight)
    torch.testing.assert_close(head.fuse({"spatial": a, "temporal": b}), head.fuse_norm(a + 0.6 * b))


@pytest.mark.parametrize("audio", [pytest.param(False, id="2-streams"), pytest.param(True, id="3-streams")])
def test_stan_gated_fusion_is_a_convex_mix(audio):
    head = tiny("stan", dict(STAN_TINY, fusion="gated", audio=audio))
    nn.init.normal_(head.gate.weight, std=3.0)
    z = torch.randn(3, 16)
    same = {s: z for s in head.stream_names}
    torch.testing.assert_close(head.fuse(same), head.fuse_norm(z))  # gate weights sum to 1 per channel
    other = dict(same, spatial=torch.randn(3, 16))
    assert not torch.allclose(head.fuse(other), head.fuse_norm(z))


@pytest.mark.parametrize("audio", [pytest.param(False, id="2-streams"), pytest.param(True, id="3-streams")])
def test_stan_streams_share_one_sinusoidal_table(audio):
    head = tiny("stan", dict(STAN_TINY, audio=audio))
    pos_types = (SinusoidalPositionalEmbedding, LearnedPositionalEmbedding)
    pos_modules = [m for m in head.modules() if isinstance(m, pos_types)]
    assert pos_modules == [head.pos]
    seen = []
    head.pos.register_forward_hook(lambda mod, args, out: seen.append(out - args[0]))
    batch = make_batch(head)
    with torch.no_grad():
        head(batch)
    assert len(seen) == len(head.stream_names)
    want = sinusoidal_embedding(torch.arange(max(LENGTHS) + 1), 16)  # CLS at 0, shot i at i + 1
    for added in seen:
        torch.testing.assert_close(added, want.expand_as(added))


@pytest.mark.parametrize(
    "name,cfg,sensitive",
    [
        pytest.param("stan", STAN_TINY, True, id="stan"),
        pytest.param("vtn", VTN_TINY, True, id="vtn-learned"),
        pytest.param("vtn", dict(VTN_TINY, pos="fixed"), True, id="vtn-fixed"),
        pytest.param("vtn", dict(VTN_TINY, pos="none", window=64), False, id="vtn-no-pos-full-window"),
        pytest.param("vtn", dict(VTN_TINY, revision=1), True, id="vtn-learned-rev1"),
        pytest.param("lstm", BASE_TINY, True, id="lstm"),
        pytest.param("meanpool", BASE_TINY, False, id="meanpool"),
    ],
)
def test_token_order_sensitivity(name, cfg, sensitive):
    head = tiny(name, cfg)
    batch = make_batch(head, lengths=(9, 9))
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    shuffled = {k: (v if k == "mask" else v[:, perm]) for k, v in batch.items()}
    other = {k: (v if k == "mask" else torch.randn_like(v)) for k, v in batch.items()}
    with torch.no_grad():
        ref = head(batch)
        # "same" up to float error, measured against what other inputs change (VTN's
        # normal(0, 0.02) initialisation keeps its outputs small)
        scale = (head(other) - ref).abs().max()
        same = (head(shuffled) - ref).abs().max() <= 1e-4 * scale
    assert bool(same) is not sensitive


def test_meanpool_is_mlp_of_masked_mean():
    head = tiny("meanpool", BASE_TINY)
    batch = make_batch(head)
    x = torch.cat([batch["resnet18"], batch["r2plus1d"]], dim=-1)
    mean = torch.stack([x[i, :n].mean(0) for i, n in enumerate(LENGTHS)])
    with torch.no_grad():
        torch.testing.assert_close(head(batch), head.mlp(head.norm(mean)))


def test_lstm_ignores_where_padding_sits():
    head = tiny("lstm", BASE_TINY)
    batch = make_batch(head, lengths=(6, 4))
    spread = {"mask": torch.tensor([[1, 1, 0, 1, 1, 0, 1, 1], [0, 1, 1, 0, 0, 1, 1, 0]], dtype=torch.bool)}
    for k in head.inputs:
        v = torch.full((2, 8, batch[k].shape[2]), float("nan"))
        v[spread["mask"]] = batch[k][batch["mask"]]
        spread[k] = v
    with torch.no_grad():
        torch.testing.assert_close(head(spread), head(batch))


# --- VTN --------------------------------------------------------------------------------------


def _vtn_encoder_outputs(n_layers, x, mask):
    torch.manual_seed(0)
    head = build_head("vtn", n_outputs=2, **dict(VTN_TINY, n_layers=n_layers, window=4)).eval()
    with torch.no_grad():
        for p in head.encoder.parameters():  # larger than normal(0, 0.02), so changes show
            if p.ndim == 2:
                p.normal_(0.0, 0.3)
        return head.encoder(x, mask)[0]


@pytest.mark.parametrize("n_layers", [pytest.param(1, id="1-layer"), pytest.param(2, id="2-layers")])
def test_vtn_window_is_local_and_cls_is_global(n_layers):
    torch.manual_seed(1)
    x = torch.randn(1, 25, 16)  # CLS + 24 frames; window 4 -> frames see 2 neighbours each side
    mask = torch.ones(1, 25, dtype=torch.bool)
    x2 = x.clone()
    x2[0, 21] += 1.0  # change one frame token (sequence index 21)
    a, b = _vtn_encoder_outputs(n_layers, x, mask)[0], _vtn_encoder_outputs(n_layers, x2, mask)[0]
    changed = ~torch.isclose(a, b, atol=1e-6, rtol=0).all(dim=-1)  # (25,)
    assert changed[0], "CLS attends globally, so it must see every frame"
    if n_layers == 1:
        assert changed.nonzero().flatten().tolist() == [0, 19, 20, 21, 22, 23]  # |i - 21| <= 2, and CLS
    else:
        assert changed.all(), "after two layers every frame hears the change through CLS"


def _vtn_cost(L):
    """Forward+backward FLOPs and the biggest tensor any forward op makes, at L frames."""
    torch.manual_seed(0)
    head = build_head("vtn", n_outputs=2, feature_dim=8, d_model=16, n_heads=2, n_layers=2, window=32,
                      pos="fixed", dropout=0.0, attn_dropout=0.0)
    batch = make_batch(head, lengths=(L, L // 2 + 3))
    biggest = 0

    class Biggest(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            nonlocal biggest
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    biggest = max(biggest, t.numel())
            return out

    with FlopCounterMode(display=False) as flops, Biggest():
        head(batch).sum().backward()
    return flops.get_total_flops(), biggest


def test_vtn_cost_grows_linearly_with_frames():
    f1, m1 = _vtn_cost(1024)
    f4, m4 = _vtn_cost(4096)
    assert 3.5 < f4 / f1 < 4.4, "FLOPs must grow linearly (dense attention would grow 16x)"
    assert m4 / m1 < 4.4, "the biggest intermediate must grow linearly"
    assert m4 < 4096 * 4096 // 8, "no (L, L) tensor anywhere, masks included"


def test_vtn_two_hour_film_at_one_fps_trains_in_seconds():
    torch.manual_seed(0)
    head = build_head("vtn", n_outputs=10, d_model=32, n_heads=2, dropout=0.0, attn_dropout=0.0).train()
    batch = make_batch(head, lengths=(7200,))
    start = time.perf_counter()
    logits = head(batch)
    logits.sum().backward()
    elapsed = time.perf_counter() - start
    assert torch.isfinite(logits).all() and torch.isfinite(head.proj.weight.grad).all()
    assert elapsed < 10.0, f"7,200 frames took {elapsed:.1f} s for forward+backward"
