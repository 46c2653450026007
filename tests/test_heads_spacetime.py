"""Tests of the patch-token heads (vtx/heads/timesformer.py, vtx/heads/mevit.py) and of shaped
(multi-dimensional) head inputs in vtx/heads/base.py and vtx/train/dataset.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from vtx.heads import HEADS, build_head
from vtx.heads.blocks import ClassAttention, MultiHeadSelfAttention, SpaceTimeBlock
from vtx.train.dataset import collate
from vtx.train.tokens import align_tokens

D, H, N, T, F_IN = 32, 2, 16, 4, 24  # width, heads, 4x4 patches, frames, cached token width
TINY = dict(n_outputs=3, d_model=D, n_heads=H, depth=2, feature_dim=F_IN, n_patches=N, n_frames=T)
CASES = [
    pytest.param("timesformer", dict(TINY), id="timesformer-divided"),
    pytest.param("timesformer", dict(TINY, attention="joint"), id="timesformer-joint"),
    pytest.param("timesformer", dict(TINY, attention="space"), id="timesformer-space"),
    pytest.param("mevit", dict(TINY), id="mevit-M2-ca1"),
    pytest.param("mevit", dict(TINY, block_size=3, class_attention_layers=0), id="mevit-M3-noca"),
    pytest.param("mevit", dict(TINY, depth=3, time_layers=1, class_attention_layers=2), id="mevit-Lt1-ca2"),
    pytest.param("mevit", dict(TINY, time_layers=0), id="mevit-space-only"),
]
LENGTHS = (4, 2, 1)


def perturb_zero_init(module: torch.nn.Module, seed: int = 0) -> None:
    """Give the zero-initialised ``temporal_fc`` and time embedding random values, so tests see through them."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if "temporal_fc" in name or "pos_time" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def tiny(name, cfg, seed=0):
    torch.manual_seed(seed)
    head = build_head(name, **cfg).eval()
    perturb_zero_init(head, seed)
    return head


def make_batch(lengths=LENGTHS, L=T, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    return {"vit_patches": torch.randn(len(lengths), L, N, F_IN, generator=g), "mask": mask}


# --- the head contract -------------------------------------------------------------------------


def test_registered():
    assert {"timesformer", "mevit"} <= set(HEADS)


@pytest.mark.parametrize("name,cfg", CASES)
def test_contract_shapes_attention_and_gradients(name, cfg):
    head = tiny(name, cfg)
    assert head.level == "frame" and head.features == ("vit_patches",)
    assert head.inputs == {"vit_patches": (N, F_IN)}
    batch = make_batch()
    logits, attn = head(batch, return_attention=True)
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()
    assert attn.shape == (3, T)
    assert torch.allclose(attn.sum(1), torch.ones(3), atol=1e-5)
    assert (attn[~batch["mask"]] == 0).all() and (attn[batch["mask"]] > 0).all()
    head.train()
    head(batch).sum().backward()
    no_grad = [n for n, p in head.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


@pytest.mark.parametrize("name,cfg", CASES)
def test_padding_frames_never_change_the_output(name, cfg):
    head = tiny(name, cfg)
    batch = make_batch()
    garbage = dict(batch, vit_patches=batch["vit_patches"].clone())
    garbage["vit_patches"][~batch["mask"]] = float("nan")
    out, attn = head(batch, return_attention=True)
    out_nan, attn_nan = head(garbage, return_attention=True)
    assert torch.equal(out, out_nan) and torch.equal(attn, attn_nan)
    for b, n in enumerate(LENGTHS):  # alone, without padding, and with fewer frames than n_frames
        alone = {"vit_patches": batch["vit_patches"][b:b + 1, :n], "mask": batch["mask"][b:b + 1, :n]}
        assert torch.allclose(head(alone), out[b:b + 1], atol=1e-5)


@pytest.mark.parametrize("name,cfg", CASES[:1] + CASES[3:4])
def test_frame_order_matters_and_too_many_frames_refused(name, cfg):
    head = tiny(name, cfg)
    batch = make_batch(lengths=(T,))
    flipped = dict(batch, vit_patches=batch["vit_patches"].flip(1))
    assert not torch.allclose(head(batch), head(flipped), atol=1e-4)
    with pytest.raises(ValueError, match="n_frames"):
        head(make_batch(lengths=(T + 1,), L=T + 1))


def test_wrong_token_shape_is_refused_with_expected_shape():
    head = tiny("timesformer", TINY)
    batch = make_batch()
    batch["vit_patches"] = batch["vit_patches"].flatten(2)
    with pytest.raises(ValueError, match=r"expected \(3, 4, 16, 24\)"):
        head(batch)


@pytest.mark.parametrize("name,cfg", CASES[:1])
def test_config_round_trips(name, cfg):
    head = tiny(name, cfg)
    again = build_head(name, **dataclasses.asdict(head.config))
    assert again.config == head.config


def test_invalid_configs_raise():
    with pytest.raises(ValueError, match="attention"):
        build_head("timesformer", **dict(TINY, attention="axial"))
    with pytest.raises(ValueError, match="square"):
        build_head("mevit", **dict(TINY, n_patches=15))
    with pytest.raises(ValueError, match="time_layers"):
        build_head("mevit", **dict(TINY, time_layers=3))


# --- input standardisation of shaped inputs ----------------------------------------------------


def test_input_stats_broadcast_over_patches():
    head = tiny("timesformer", TINY)
    batch = make_batch()
    ref = head(batch)
    mean, std = torch.randn(F_IN), torch.rand(F_IN) + 0.5
    head.set_input_stats({"vit_patches": (mean, std)}, eps=0.0)
    manual = dict(batch, vit_patches=(batch["vit_patches"] - mean) / std)
    head_plain = tiny("timesformer", TINY)
    assert torch.allclose(head(batch), head_plain(manual), atol=1e-5)
    assert not torch.allclose(head(batch), ref, atol=1e-3)
    head.set_input_stats({"vit_patches": (torch.zeros(N, F_IN), torch.ones(N, F_IN))}, eps=0.0)
    assert torch.allclose(head(batch), ref, atol=1e-6)
    with pytest.raises(ValueError, match="broadcast"):
        head.set_input_stats({"vit_patches": (torch.zeros(N), torch.ones(N))})
    state = head.state_dict()
    fresh = build_head("timesformer", **TINY)
    fresh.load_state_dict(state)
    assert fresh.state_dict()["_norm_mean__vit_patches"].shape == (N, F_IN)


# --- the Hugging Face oracle -------------------------------------------------------------------


def _copy_hf_layer(hf, block: SpaceTimeBlock) -> None:
    pairs = {
        "temporal_norm": hf.temporal_layernorm, "temporal_attn.qkv": hf.temporal_attention.attention.qkv,
        "temporal_attn.proj": hf.temporal_attention.output.dense, "temporal_fc": hf.temporal_dense,
        "norm1": hf.layernorm_before, "attn.qkv": hf.attention.attention.qkv,
        "attn.proj": hf.attention.output.dense, "norm2": hf.layernorm_after,
        "mlp.fc1": hf.intermediate.dense, "mlp.fc2": hf.output.dense,
    }
    mods = dict(block.named_modules())
    with torch.no_grad():
        for ours, theirs in pairs.items():
            mods[ours].weight.copy_(theirs.weight)
            mods[ours].bias.copy_(theirs.bias)


def test_divided_block_matches_huggingface_timesformer_layer():
    transformers = pytest.importorskip("transformers")
    from transformers.models.timesformer.modeling_timesformer import TimesformerLayer

    torch.manual_seed(0)
    frames = 3
    cfg = transformers.TimesformerConfig(
        hidden_size=D, num_attention_heads=H, intermediate_size=4 * D, image_size=16, patch_size=4,
        num_frames=frames, attention_type="divided_space_time", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, hidden_act="gelu", layer_norm_eps=1e-6,
    )
    hf = TimesformerLayer(cfg, 0).eval()
    for p in hf.parameters():  # non-trivial LayerNorms and biases
        with torch.no_grad():
            p.add_(torch.randn_like(p) * 0.1)
    block = SpaceTimeBlock(D, H, "divided").eval()
    _copy_hf_layer(hf, block)

    B = 2
    hidden = torch.randn(B, 1 + N * frames, D)  # HF layout: CLS, then patch-major (p * T + t)
    (expected,) = hf(hidden)
    x = hidden[:, 1:].reshape(B, N, frames, D).transpose(1, 2)  # (B, T, N, D)
    out, cls, _ = block(x, hidden[:, 0], torch.ones(B, frames, dtype=torch.bool))
    assert torch.allclose(cls, expected[:, 0], atol=1e-5)
    assert torch.allclose(out.transpose(1, 2).reshape(B, N * frames, D), expected[:, 1:], atol=1e-5)


# --- MEViT: motion self-attention, time layers, class attention ---------------------------------


@pytest.mark.parametrize("M", [1, 2, 3])
def test_temporal_attention_is_local_to_the_block(M):
    torch.manual_seed(0)
    block = SpaceTimeBlock(D, H, "divided", grid=(4, 4), block_size=M).eval()
    perturb_zero_init(block)
    x = torch.randn(1, 3, N, D)
    mask = torch.ones(1, 3, dtype=torch.bool)
    ref = block.temporal(x, mask)
    p = 5  # row 1, col 1
    rows, cols = torch.arange(N) // 4, torch.arange(N) % 4
    same_block = (rows // M == 1 // M) & (cols // M == 1 // M)
    for q in range(N):
        y = x.clone()
        y[0, 2, q] += torch.randn(D)  # another frame
        changed = not torch.allclose(block.temporal(y, mask)[0, 0, p], ref[0, 0, p], atol=1e-6)
        assert changed == bool(same_block[q]), (M, q)


def test_block_size_one_is_timesformer_divided():
    """MEViT with M = 1 (no class-attention layers, every block temporal) is TimeSformer's divided
    attention: the same weights, copied into both heads, give the same logits and attention.
    With M = 2 the same weights give other logits, so the comparison can fail."""
    cfg = dict(TINY, depth=3)
    tsf = tiny("timesformer", cfg)
    mevit = build_head("mevit", **cfg, block_size=1, class_attention_layers=0).eval()
    mevit2 = build_head("mevit", **cfg, block_size=2, class_attention_layers=0).eval()
    assert set(mevit.state_dict()) == set(tsf.state_dict())
    mevit.load_state_dict(tsf.state_dict())
    mevit2.load_state_dict(tsf.state_dict())
    batch = make_batch()
    with torch.no_grad():
        want, want_attn = tsf(batch, return_attention=True)
        got, got_attn = mevit(batch, return_attention=True)
        other = mevit2(batch)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_attn, want_attn, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(other, want, atol=1e-4)


def test_time_layers_are_the_last_ones_and_early_frames_stay_apart():
    head = tiny("mevit", dict(TINY, depth=3, time_layers=1))
    assert [b.attention for b in head.blocks] == ["space", "space", "divided"]
    assert [hasattr(b, "temporal_attn") for b in head.blocks] == [False, False, True]
    seen = []
    head.blocks[1].register_forward_hook(lambda m, i, o: seen.append(o[0]))
    batch = make_batch(lengths=(T,))
    head(batch)
    batch["vit_patches"][0, 2] += 1.0
    head(batch)
    before, after = seen  # after the space-only blocks, frames have not mixed (no CLS there)
    assert torch.allclose(before[0, [0, 1, 3]], after[0, [0, 1, 3]], atol=1e-6)
    assert not torch.allclose(before[0, 2], after[0, 2], atol=1e-4)


def test_class_attention_is_the_cls_row_of_self_attention_without_cls_key():
    torch.manual_seed(0)
    ca = ClassAttention(D, H).eval()
    sa = MultiHeadSelfAttention(D, H).eval()
    sa.load_state_dict(ca.state_dict())
    cls, x = torch.randn(2, 1, D), torch.randn(2, 7, D)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3]).bool()
    out, w = ca(cls, x, mask, return_attention=True)
    full, w_full = sa(torch.cat([cls, x], 1), torch.cat([torch.zeros(2, 1).bool(), mask], 1), True)
    assert torch.allclose(out, full[:, :1], atol=1e-6)
    assert torch.allclose(w, w_full[:, :, 0, 1:], atol=1e-6)


def test_class_attention_layers_update_cls_only_and_cls_enters_late():
    head = tiny("mevit", dict(TINY, class_attention_layers=2))
    seen = []
    head.blocks[-1].register_forward_hook(lambda m, i, o: seen.append(o))
    batch = make_batch()
    out = head(batch)
    assert seen[0][1] is None  # no CLS in the self-attention blocks
    with torch.no_grad():
        head.embed.cls.add_(torch.randn(D))
    out2 = head(batch)
    assert torch.allclose(seen[0][0], seen[1][0])  # patches do not see CLS ...
    assert not torch.allclose(out, out2, atol=1e-4)  # ... the logits do
    # CA layers leave the patches unchanged: the logits depend on the patches only via CLS.
    x = seen[1][0]
    _, cls = head.embed(head.read_batch(batch)[0]["vit_patches"])
    for layer in head.class_layers:
        cls, _ = layer(cls, x, batch["mask"])
    assert torch.allclose(head.head(head.norm(cls)), out2, atol=1e-5)


# --- shaped tokens in the dataset ----------------------------------------------------------------


def test_dataset_keeps_patch_rows_shaped_and_collate_pads_them():
    arrays = {"frames": np.arange(5) * 10,
              "vit_patches": np.random.rand(5, 6, 8).astype(np.float16),
              "motion": np.random.rand(5, 2, 3, 3).astype(np.float32)}
    dims = {"vit_patches": 8, "motion": 18}  # the cache's dim attrs
    tok = align_tokens(arrays, ("vit_patches", "motion"), "frame", dims=dims, video="v.mp4")
    assert tok["vit_patches"].shape == (5, 6, 8) and tok["motion"].shape == (5, 18)
    shaped = align_tokens(arrays, ("motion",), "frame", dims=dims, shapes={"motion": (2, 3, 3)})
    assert shaped["motion"].shape == (5, 2, 3, 3)
    with pytest.raises(Exception, match=r"rows of shape \(2, 3, 3\) but the head reads \(18, 1\)"):
        align_tokens(arrays, ("motion",), "frame", dims=dims, shapes={"motion": (18, 1)})
    arrays["shots"] = np.array([[0, 25], [25, 50]])
    pooled = align_tokens(arrays, ("vit_patches",), "shot", dims=dims)["vit_patches"]
    rows = arrays["vit_patches"]
    assert pooled.shape == (2, 6, 8)
    assert np.allclose(pooled[0], rows[:3].astype(np.float64).mean(0), atol=1e-3)
    items = [{"tokens": {"vit_patches": torch.from_numpy(tok["vit_patches"][:n])}, "target": torch.zeros(2),
              "index": i} for i, n in enumerate((5, 2))]
    batch = collate(items)
    assert batch["vit_patches"].shape == (2, 5, 6, 8) and batch["mask"].tolist()[1] == [1, 1, 0, 0, 0]
    assert (batch["vit_patches"][1, 2:] == 0).all()
