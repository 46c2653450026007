"""The papers' details in the heads (issue: "the papers' details"): VTN's initialisation, DETR
positions, CLS marker, positions in the original video, long films and feed-forward dropout
(``vtn.txt`` Sections 3-4); TimeSformer's MLP classifier; the ``--size paper`` presets and their
parameter counts against the papers; old checkpoints keeping their behaviour."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from vtx.heads import HEADS, build_head, preset, saved_config
from vtx.heads.blocks import Mlp
from vtx.heads.vtn import detr_sine, interpolate_rows
from vtx.train.checkpoint import load_checkpoint

PREV = Path(__file__).resolve().parent / "data" / "prev_version"
VTN = dict(n_outputs=3, feature_dim=20, d_model=32, n_heads=4, n_layers=2, window=4, max_len=64,
           dropout=0.0, attn_dropout=0.0)


def n_params(head: nn.Module) -> float:
    return sum(p.numel() for p in head.parameters()) / 1e6


def batch(L: int = 9, lengths=(9, 6), seed: int = 0, positions=None) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {"vit": torch.randn(len(lengths), L, 20, generator=g),
           "mask": torch.arange(L)[None] < torch.tensor(lengths)[:, None]}
    if positions is not None:
        out["positions"] = positions
    return out


# --- VTN, Section 4 ------------------------------------------------------------------------------


def test_vtn_longformer_and_head_start_from_normal_0_02():
    torch.manual_seed(0)
    head = build_head("vtn", **dict(VTN, d_model=256, feature_dim=256))
    weights = torch.cat([m.weight.flatten() for m in head.modules() if isinstance(m, nn.Linear)])
    biases = [m.bias for m in head.modules() if isinstance(m, nn.Linear)]
    assert weights.std().item() == pytest.approx(0.02, rel=0.02)
    assert weights.mean().abs() < 1e-3
    assert all(b.eq(0).all() for b in biases)
    assert head.pos.weight.std().item() == pytest.approx(0.02, rel=0.05)
    # revision 1 (checkpoints of before) keeps PyTorch's default: uniform, std 1 / sqrt(3 fan_in)
    torch.manual_seed(0)
    old = build_head("vtn", **dict(VTN, d_model=256, feature_dim=256, revision=1))
    w = old.encoder.layers[0].mlp.fc1.weight
    assert w.std().item() == pytest.approx(1 / math.sqrt(3 * 256), rel=0.05)


def detr_reference(not_mask: torch.Tensor, num_pos_feats: int, temperature: float = 10000.0):
    """DETR's ``PositionEmbeddingSine(normalize=True)`` on one axis, as in its code."""
    x_embed = not_mask.cumsum(1, dtype=torch.float32)
    eps, scale = 1e-6, 2 * math.pi
    x_embed = x_embed / (x_embed[:, -1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos_x = x_embed[:, :, None] / dim_t
    return torch.stack((pos_x[:, :, 0::2].sin(), pos_x[:, :, 1::2].cos()), dim=3).flatten(2)


def test_fixed_positions_are_detrs_normalised_sine():
    lengths = torch.tensor([7, 4])
    mask = torch.arange(7)[None] < lengths[:, None]
    positions = torch.arange(7).expand(2, 7)
    ours = detr_sine(positions, mask, 32)
    for b, n in enumerate(lengths.tolist()):
        ref = detr_reference(torch.ones(1, n), 32)[0]
        torch.testing.assert_close(ours[b, :n], ref, atol=1e-5, rtol=1e-5)
    head = build_head("vtn", **dict(VTN, pos="fixed"))
    pe = head.position_embedding(positions, mask)  # CLS first: the sine at 0
    assert torch.equal(pe[:, 0, 0::2], torch.zeros(2, 16)) and torch.equal(pe[:, 0, 1::2], torch.ones(2, 16))
    torch.testing.assert_close(pe[:, 1:], ours)


@pytest.mark.parametrize("pos", ["learned", "fixed"])
def test_positions_keep_their_meaning_under_subsampling(pos):
    """A token takes the position of its frame in the original video: the embedding of a
    subsample (``--max-tokens``, positions from the dataset) is the full video's at those rows."""
    head = build_head("vtn", **dict(VTN, pos=pos)).eval()
    full = head.position_embedding(torch.arange(20)[None], torch.ones(1, 20, dtype=torch.bool))
    keep = torch.tensor([0, 5, 10, 14, 19])  # numpy.linspace(0, 19, 5).round()
    sub = head.position_embedding(keep[None], torch.ones(1, 5, dtype=torch.bool))
    torch.testing.assert_close(sub[0, 1:], full[0, 1 + keep])
    torch.testing.assert_close(sub[0, 0], full[0, 0])
    # and the head reads them from the batch: other positions, other logits
    b = batch(L=5, lengths=(5,))
    with torch.no_grad():
        plain = head(b)
        moved = head({**b, "positions": keep[None]})
    assert not torch.allclose(plain, moved, atol=1e-7)


def test_no_positions_still_mark_cls():
    head = build_head("vtn", **dict(VTN, pos="none")).eval()
    pe = head.position_embedding(torch.arange(6)[None], torch.ones(1, 6, dtype=torch.bool))
    assert torch.equal(pe[0, 1:], torch.zeros(6, 32))
    assert torch.equal(pe[0, 0], head.cls_pos[0]) and head.cls_pos.abs().sum() > 0
    b = batch()
    with torch.no_grad():
        before = head(b)
        head.cls_pos.add_(torch.randn(1, 32))  # not a constant: LayerNorm would remove it
        assert not torch.allclose(head(b), before, atol=1e-7)
    assert "cls_pos" in head.no_weight_decay() and "pos.weight" not in dict(head.named_parameters())


@pytest.mark.parametrize("revision", [1, 2])
def test_a_film_longer_than_the_position_table_is_scaled_onto_it(revision):
    head = build_head("vtn", **dict(VTN, max_len=16, revision=revision)).eval()
    b = batch(L=40, lengths=(40, 25))
    with torch.no_grad():
        logits = head(b)
    assert torch.isfinite(logits).all()
    table = head.pos.weight
    pe = head.position_embedding(torch.arange(40).expand(2, 40), b["mask"])
    # the 40 frames of video 0 span rows 0..16 (CLS at 0, the last frame at the last row)
    rows = torch.cat([torch.zeros(1), torch.arange(1, 41) * 16 / 40])
    torch.testing.assert_close(pe[0], interpolate_rows(table, rows))
    # video 1 (25 frames) is scaled on its own; a video within the table uses exact rows
    torch.testing.assert_close(pe[1, 25], table[16])
    short = head.position_embedding(torch.arange(10)[None], torch.ones(1, 10, dtype=torch.bool))
    assert torch.equal(short[0], table[:11])


def test_feed_forward_has_no_dropout_between_gelu_and_the_second_linear():
    head = build_head("vtn", **dict(VTN, dropout=0.5)).train()
    old = build_head("vtn", **dict(VTN, dropout=0.5, revision=1)).train()
    x = torch.randn(4, 32)
    for layer in head.encoder.layers:
        assert layer.mlp.drop.p == 0.0 and layer.drop.p == 0.5  # residual-branch dropout stays
        torch.testing.assert_close(layer.mlp(x), layer.mlp.eval()(x).detach())
    assert all(layer.mlp.drop.p == 0.5 for layer in old.encoder.layers)
    assert head.head[1].drop.p == 0.5  # the classification MLP keeps it (Section 3.3)


def test_old_checkpoints_keep_revision_1():
    head, ckpt = load_checkpoint(PREV / "vtn" / "best.pt")
    assert "revision" not in ckpt["head_config"] and head.config.revision == 1
    assert saved_config("vtn", {"d_model": 8})["revision"] == 1
    assert build_head("vtn", n_outputs=2).config.revision == 2  # new heads follow the paper


# --- TimeSformer: the paper's MLP classifier -------------------------------------------------------


def test_timesformer_mlp_classifier():
    cfg = dict(n_outputs=3, d_model=16, n_heads=2, depth=1, feature_dim=12, n_patches=4, n_frames=3)
    head = build_head("timesformer", **cfg, classifier="mlp").eval()
    assert isinstance(head.head, Mlp) and head.head.fc1.out_features == 16
    assert isinstance(build_head("timesformer", **cfg).head, nn.Linear)
    x = {"vit_patches": torch.randn(2, 3, 4, 12), "mask": torch.ones(2, 3, dtype=torch.bool)}
    with torch.no_grad():
        cls, _ = head.forward_features(x)
        want = head.head.fc2(nn.functional.gelu(head.head.fc1(head.norm(cls))))
        torch.testing.assert_close(head(x), want)
    with pytest.raises(ValueError, match="classifier must be one of"):
        build_head("timesformer", **cfg, classifier="svm")


# --- sizes ----------------------------------------------------------------------------------------


def test_paper_presets_and_parameter_counts_against_the_papers():
    def at_paper(name, **kw):
        return build_head(name, **{**preset(name, "paper"), **kw})

    # TimeSformer, Table 1: divided space-time attention, 121.4 M
    assert n_params(at_paper("timesformer", n_outputs=400)) == pytest.approx(121.4, rel=0.005)
    # MM-ViT III (merged), Table 1: 158.14 M on UCF-101
    assert n_params(at_paper("mmvit", n_outputs=101)) == pytest.approx(158.14, rel=0.01)
    # STAN-Small, Table 4: 45 M = both streams + the fine-tuned ResNet18 (11.2 M without its fc)
    assert n_params(at_paper("stan", n_outputs=20)) + 11.18 == pytest.approx(45, rel=0.03)
    # VTN, Table 3: ViT-B-VTN with 3 layers 114 M, with 1 layer 96 M: 9 M per Longformer layer
    per_layer = n_params(at_paper("vtn", n_outputs=400)) - n_params(at_paper("vtn", n_outputs=400,
                                                                             n_layers=2))
    assert per_layer == pytest.approx((114 - 96) / 2, rel=0.03)
    for name in ("timesformer", "mevit", "mmvit"):  # the depth 12, width 768
        cfg = at_paper(name, n_outputs=2).config
        assert (cfg.depth, cfg.d_model, cfg.n_heads) == (12, 768, 12)
    assert at_paper("stan", n_outputs=2).config.d_model == 768


def test_presets_are_named_and_checked():
    assert preset("vtn") == {}
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        preset("vtn", "huge")
    with pytest.raises(ValueError, match="has no 'paper' size"):
        preset("meanpool", "paper")
    for name, cls in HEADS.items():  # every preset names real fields
        for fields in cls.Config.PRESETS.values():
            build_head(name, n_outputs=2, **fields)


def test_the_dataset_gives_each_token_its_position_before_subsampling(tmp_path):
    from test_train import make_cache
    from vtx.train.dataset import collate, load_cache, subsample_indices
    from vtx.train.labels import load_labels

    cache, labels, _ = make_cache(tmp_path, n_videos=4, dims={}, frame_dims={"vit": 8})
    ls = load_labels(labels)
    full = load_cache(cache, ls, {"vit": 8}, "frame", None, log=lambda m: None)
    sub = load_cache(cache, ls, {"vit": 8}, "frame", 3, log=lambda m: None)
    for a, b in zip(full.videos, sub.videos):
        assert b.positions.tolist() == subsample_indices(a.length, 3).tolist()
    items = [sub.dataset()[i] for i in range(len(sub.videos))]
    positions = collate(items)["positions"]
    assert positions.shape == (len(items), 3)
    assert positions[:, -1].tolist() == [v.length - 1 for v in full.videos]
