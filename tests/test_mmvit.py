"""Tests for vtx/heads/mmvit.py: MM-ViT (Chen and Ho 2022, Section 3) on tiny inputs.

The contract checks (shape, finite, gradients, padding, attention) run over a table of variants,
cross-modal mechanisms, attention orders and modality subsets; the semantic checks then pin down
which tokens each factorised attention may mix, so a wrong reshape fails them.
"""

from __future__ import annotations

import pytest
import torch

from vtx.heads.mmvit import Mmvit, MmvitConfig, ShiftMerge, flops_configs

# 4 frames, a 4 x 4 grid (N = 16), residuals of 16 px cut into 4 x 4 px patches.
TINY = dict(
    d_model=32, n_heads=2, depth=2, n_frames=4, n_patches=16, motion_grid=4, residual_size=16,
    vit_dim=24, vggish_dim=8, mlp_ratio=2.0,
)
N_OUT = 5
T, G, N = 4, 4, 16
LAST = TINY["depth"] - 1


def dead(*steps: str) -> tuple[str, ...]:
    """Last-layer parameters that never reach CLS: the attentions after its space attention ("T", "M"),
    and in variant 4 ("conv") the grid convolution, which only feeds the tokens after CLS has read them."""
    names = {
        "T": ("norm_time", "attn_time", "fc_time", "conv_time"),
        "M": ("norm_cross", "attn_cross", "fc_cross"),
        "conv": ("conv_space",),
    }
    return tuple(f"layers.{LAST}.{p}." for s in steps for p in names[s])


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors run fastest on one thread, the more so on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CASES = [
    pytest.param(dict(variant=1), (), id="I-joint"),
    pytest.param(dict(variant=1, modalities="IA"), (), id="I-joint-IA"),
    pytest.param(dict(variant=2), (), id="II"),
    pytest.param(dict(variant=2, modalities="MR"), (), id="II-MR"),
    pytest.param(dict(variant=3), (), id="III-merged-TMS"),
    pytest.param(dict(variant=3, cross="co"), (), id="III-co-TMS"),
    pytest.param(dict(variant=3, cross="shift-merge"), (), id="III-shift-TMS"),
    pytest.param(dict(variant=3, order="STM"), dead("T", "M"), id="III-merged-STM"),
    pytest.param(dict(variant=3, order="MST"), dead("T"), id="III-merged-MST"),
    pytest.param(dict(variant=3, order="TSM", cross="co", modalities="IA"), dead("M"), id="III-co-TSM-IA"),
    pytest.param(dict(variant=3, cross="shift-merge", modalities="IMR", d_model=48), (), id="III-shift-IMR"),
    pytest.param(dict(variant=3, modalities="I"), (), id="III-I"),
    pytest.param(dict(variant=3, modalities="A"), (), id="III-A"),
    pytest.param(dict(variant=4), dead("conv"), id="IV-merged-TMS"),
    pytest.param(dict(variant=4, cross="co"), dead("conv"), id="IV-co-TMS"),
    pytest.param(dict(variant=4, cross="shift-merge", modalities="IA"), dead("conv"), id="IV-shift-IA"),
    pytest.param(dict(variant=4, order="SMT"), dead("conv", "M", "T"), id="IV-merged-SMT"),
]


def shape_of(width) -> tuple[int, ...]:
    return (width,) if isinstance(width, int) else tuple(width)


def make_batch(head, lengths=(T, 2, 3), seed=0, garbage=True):
    """Random inputs; padded frames hold NaN (``garbage``) or random values."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    batch = {}
    for key, width in head.inputs.items():
        x = torch.randn(len(lengths), L, *shape_of(width), generator=g)
        pad = ~mask.view(*mask.shape, *(1,) * len(shape_of(width)))
        batch[key] = x.masked_fill(pad, float("nan")) if garbage else x
    batch["mask"] = mask
    return batch


def tiny(seed=0, **cfg) -> Mmvit:
    torch.manual_seed(seed)
    return Mmvit(MmvitConfig(n_outputs=N_OUT, **dict(TINY, **cfg))).eval()


# --- contract ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg, unused", CASES)
def test_forward_shape_finite_and_gradients(cfg, unused):
    head = tiny(**cfg)
    batch = make_batch(head)
    logits = head(batch)
    assert logits.shape == (3, N_OUT)
    assert torch.isfinite(logits).all()
    logits.square().sum().backward()
    reached = {n for n, p in head.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    expected = {n for n, _ in head.named_parameters() if not n.startswith(unused)}
    assert reached == expected  # every parameter learns, except exactly the documented dead ones


@pytest.mark.parametrize("cfg, unused", CASES)
def test_padding_never_changes_logits_or_attention(cfg, unused):
    head = tiny(**cfg)
    batch = make_batch(head, lengths=(T, 2, 3))
    logits, attn = head(batch, return_attention=True)
    for i, n in enumerate((T, 2, 3)):
        alone = {k: v[i : i + 1, :n] for k, v in batch.items()}
        logits_i, attn_i = head(alone, return_attention=True)
        torch.testing.assert_close(logits[i : i + 1], logits_i, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(attn[i : i + 1, :n], attn_i, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg, unused", CASES)
def test_attention_is_a_distribution_over_real_frames(cfg, unused):
    head = tiny(**cfg)
    batch = make_batch(head, lengths=(T, 2, 1))
    _, attn = head(batch, return_attention=True)
    assert attn.shape == (3, T)
    assert (attn[~batch["mask"]] == 0).all()
    assert (attn[batch["mask"]] > 0).all()
    torch.testing.assert_close(attn.sum(1), torch.ones(3))


def test_default_inputs_are_the_cache_shapes():
    head = Mmvit(MmvitConfig(n_outputs=3, depth=1, d_model=24, n_heads=2))
    assert head.inputs == {
        "vit_patches": (196, 768), "motion": (2, 14, 14), "residual": (3, 56, 56), "vggish": 128,
    }
    assert head.features == ("vit_patches", "motion", "residual", "vggish")
    assert head.level == "frame"
    assert head.config.residual_patch == 4  # 56 px / 14 cells: 4 x 4 px patches, one per ViT cell


@pytest.mark.parametrize(
    "cfg, match",
    [
        pytest.param(dict(variant=5), "variant", id="variant"),
        pytest.param(dict(cross="sum"), "cross", id="cross"),
        pytest.param(dict(order="TTS"), "order", id="order"),
        pytest.param(dict(modalities="IX"), "modalities", id="modalities"),
        pytest.param(dict(modalities="II"), "modalities", id="modalities-repeat"),
        pytest.param(dict(n_patches=15), "motion_grid", id="grid"),
        pytest.param(dict(residual_size=18), "residual_size", id="residual"),
        pytest.param(dict(cross="co", modalities="I"), "at least 2", id="co-one-modality"),
        pytest.param(dict(cross="shift-merge", modalities="IMR"), "divisible", id="shift-width"),
        pytest.param(dict(variant=4, n_frames=3), "even", id="window-odd-frames"),
        pytest.param(dict(n_heads=3), "n_heads", id="heads"),
    ],
)
def test_invalid_config_raises_naming_the_field(cfg, match):
    with pytest.raises(ValueError, match=match):
        MmvitConfig(n_outputs=2, **dict(TINY, **cfg))


def test_more_frames_than_the_time_embedding_raises():
    head = tiny()
    batch = make_batch(head, lengths=(T + 1,))
    with pytest.raises(ValueError, match="n_frames"):
        head(batch)


# --- embedding -------------------------------------------------------------------------------------


def _embed(head, batch):
    feats, _ = head.read_batch(batch)
    return head.embed_tokens(feats)  # (B, T, S, N, D)


def _changed(a, b):
    return (a - b).abs().amax(dim=-1) > 1e-6  # (B, T, S, N)


def test_each_modality_is_tokenised_on_the_vit_grid():
    head = tiny()
    batch = make_batch(head, lengths=(T,), garbage=False)
    base = _embed(head, batch)
    I, M, R, A = range(4)
    # residual pixel (y=5, x=9) of frame 1 lies in the 4 x 4 px patch of cell (1, 2): token 6
    b = {k: v.clone() for k, v in batch.items()}
    b["residual"][0, 1, 2, 5, 9] += 1.0
    expected = torch.zeros(1, T, 4, N, dtype=torch.bool)
    expected[0, 1, R, 6] = True
    assert torch.equal(_changed(_embed(head, b), base), expected)
    # motion cell (2, 3) of frame 0, channel y: token 11
    b = {k: v.clone() for k, v in batch.items()}
    b["motion"][0, 0, 1, 2, 3] += 1.0
    expected = torch.zeros(1, T, 4, N, dtype=torch.bool)
    expected[0, 0, M, 11] = True
    assert torch.equal(_changed(_embed(head, b), base), expected)
    # audio of frame 3 is replicated over every position, identically (no space embedding)
    b = {k: v.clone() for k, v in batch.items()}
    b["vggish"][0, 3] += 1.0
    expected = torch.zeros(1, T, 4, N, dtype=torch.bool)
    expected[0, 3, A] = True
    assert torch.equal(_changed(_embed(head, b), base), expected)
    audio = base[0, :, A]  # (T, N, D)
    torch.testing.assert_close(audio, audio[:, :1].expand_as(audio))
    # ViT patch token 7 of frame 2
    b = {k: v.clone() for k, v in batch.items()}
    b["vit_patches"][0, 2, 7] += 1.0
    expected = torch.zeros(1, T, 4, N, dtype=torch.bool)
    expected[0, 2, I, 7] = True
    assert torch.equal(_changed(_embed(head, b), base), expected)


def test_i_frame_only_head_ignores_the_other_inputs_entirely():
    head = tiny(modalities="I")
    assert head.features == ("vit_patches",)
    batch = make_batch(head, lengths=(T, 2))
    only_i = head(batch)
    g = torch.Generator().manual_seed(3)
    extra = dict(
        batch,
        motion=torch.randn(2, T, 2, G, G, generator=g),
        residual=torch.full((2, T, 3, 16, 16), float("nan")),
        vggish=torch.randn(2, T, 8, generator=g),
    )
    torch.testing.assert_close(head(extra), only_i, rtol=0, atol=0)
    # ... while the full head does read audio, so the comparison above can fail
    full = tiny()
    batch = make_batch(full, lengths=(T, 2))
    louder = dict(batch, vggish=batch["vggish"] + 1.0)
    assert not torch.allclose(full(batch), full(louder))


# --- which tokens each attention mixes ---------------------------------------------------------------


def _tokens(head, seed=1):
    g = torch.Generator().manual_seed(seed)
    S = len(head.config.modalities)
    return torch.randn(1, T, S, N, head.config.d_model, generator=g)


def _perturb(x, t, s, n):
    """Change token (t, s, n) by a random vector (not a constant: LayerNorm would remove that)."""
    y = x.clone()
    y[0, t, s, n] += torch.randn(x.shape[-1], generator=torch.Generator().manual_seed(7))
    return y


ALL_REAL = torch.ones(1, T, dtype=torch.bool)


def test_variant_2_time_attention_mixes_one_position_across_frames_and_modalities():
    layer = tiny(variant=2).layers[0]
    x = _tokens(layer)
    changed = _changed(layer.time_mix(_perturb(x, 2, 1, 5), ALL_REAL), layer.time_mix(x, ALL_REAL))[0]  # (T, S, N)
    assert not changed[:, :, torch.arange(N) != 5].any()  # other positions: untouched, in every frame
    assert changed[0, 3, 5] and changed[3, 0, 5]  # same position, other frame and other modality (Eq. 9)


def test_variant_3_time_attention_mixes_one_modality_and_position_across_frames():
    layer = tiny(variant=3).layers[0]
    x = _tokens(layer)
    changed = _changed(layer.time_mix(_perturb(x, 2, 1, 5), ALL_REAL), layer.time_mix(x, ALL_REAL))[0]
    expected = torch.zeros(T, 4, N, dtype=torch.bool)
    expected[:, 1, 5] = True
    assert torch.equal(changed, expected)


@pytest.mark.parametrize("cross", ["merged", "co", "shift-merge"])
def test_variant_3_cross_modal_attention_mixes_modalities_at_one_frame_and_position(cross):
    layer = tiny(variant=3, cross=cross).layers[0]
    x = _tokens(layer)
    changed = _changed(layer.cross_mix(_perturb(x, 1, 0, 3)), layer.cross_mix(x))[0]
    expected = torch.zeros(T, 4, N, dtype=torch.bool)
    expected[1, :, 3] = True  # every modality at (t=1, n=3), and nothing else
    assert torch.equal(changed, expected)


def test_co_attention_excludes_the_query_modalitys_own_keys_and_values():
    layer = tiny(variant=3, cross="co", modalities="IA").layers[0]
    x = _tokens(layer)
    # with two modalities, modality 0 attends only to modality 1: changing modality 0 leaves its output alone
    torch.testing.assert_close(layer.cross_mix(_perturb(x, 1, 0, 3))[0, :, 0], layer.cross_mix(x)[0, :, 0])
    merged = tiny(variant=3, modalities="IA").layers[0]
    assert not torch.allclose(merged.cross_mix(_perturb(x, 1, 0, 3))[0, 1, 0, 3], merged.cross_mix(x)[0, 1, 0, 3])


def test_shift_merge_is_eqs_17_to_20():
    torch.manual_seed(0)
    sm = ShiftMerge(8, 4)
    x = torch.randn(3, 4, 8)  # (groups, I/M/R/A, D)
    v = sm.value(x)
    parts = v.split(2, dim=-1)  # four portions of D / 4
    r = torch.stack([torch.cat([parts[i][:, s] for s in range(4)], dim=-1) + v[:, i] for i in range(4)], dim=1)
    torch.testing.assert_close(sm(x), sm.proj(r))


def test_variant_3_space_attention_mixes_one_frame_and_modality():
    head = tiny(variant=3)
    layer = head.layers[0]
    x, cls = _tokens(layer), head.cls.detach()
    out, _, _ = layer.space_mix(x, cls, ALL_REAL)
    out2, _, _ = layer.space_mix(_perturb(x, 1, 2, 7), cls, ALL_REAL)
    expected = torch.zeros(T, 4, N, dtype=torch.bool)
    expected[1, 2] = True
    assert torch.equal(_changed(out2, out)[0], expected)


def test_variant_4_time_windows_are_local_and_the_convolution_links_them():
    head = tiny(variant=4)
    layer = head.layers[0]
    assert layer.time_window == 2 and layer.space_window == 2  # F = T / 2, M = N / 4 = 2 x 2
    x = _tokens(layer)
    changed = _changed(layer.time_mix(_perturb(x, 2, 1, 5), ALL_REAL), layer.time_mix(x, ALL_REAL))[0]
    expected = torch.zeros(T, 4, N, dtype=torch.bool)
    expected[2:, 1, 5] = True  # frames 2-3 form the second window; frames 0-1 never see frame 2
    assert torch.equal(changed, expected)
    # the kernel-F convolution after the attention connects frame 1 to frame 2
    cls = head.cls.detach()
    y, _, _ = layer(x, cls, ALL_REAL)
    y2, _, _ = layer(_perturb(x, 2, 1, 5), cls, ALL_REAL)
    assert _changed(y2, y)[0, 1, 1, 5]


def test_variant_4_space_windows_are_local_and_the_convolution_links_them():
    head = tiny(variant=4)
    layer = head.layers[0]
    x, cls = _tokens(layer), head.cls.detach()
    # cell (2, 2) = token 10 is in the bottom-right 2 x 2 window {10, 11, 14, 15}
    out, _, _ = layer.space_mix(x, cls, ALL_REAL)
    out2, _, _ = layer.space_mix(_perturb(x, 1, 2, 10), cls, ALL_REAL)
    expected = torch.zeros(T, 4, N, dtype=torch.bool)
    expected[1, 2, [10, 11, 14, 15]] = True
    assert torch.equal(_changed(out2, out)[0], expected)
    # with the (G/2) x (G/2) convolution, cell (1, 1) = token 5 of the top-left window sees it
    y, _, _ = layer(x, cls, ALL_REAL)
    y2, _, _ = layer(_perturb(x, 1, 2, 10), cls, ALL_REAL)
    assert _changed(y2, y)[0, 1, 2, 5]


@pytest.mark.parametrize("order", ["TMS", "STM", "MST"])
def test_order_sets_the_sequence_of_attentions(order):
    head = tiny(variant=3, order=order)
    layer = head.layers[0]
    assert layer.steps == order
    x, cls = _tokens(layer), head.cls.detach()
    steps = {"T": lambda z: z + layer.fc_time(layer.time_mix(layer.norm_time(z), ALL_REAL)),
             "M": lambda z: z + layer.fc_cross(layer.cross_mix(layer.norm_cross(z)))}
    z, c = x, cls.expand(1, 1, -1)
    for step in order:
        if step == "S":
            out, c_out, _ = layer.space_mix(layer.norm_space(z), layer.norm_space(c), ALL_REAL)
            z, c = z + out, c + c_out
        else:
            z = steps[step](z)
    z = z + layer.mlp(layer.norm_mlp(z))
    y, _, _ = layer(x, cls.expand(1, 1, -1), ALL_REAL)
    torch.testing.assert_close(y, z)


# --- Table 1 configurations --------------------------------------------------------------------------


# Table 1 parameter counts (M). Our I/M/R embeddings read cached tokens (768, 2 and 48 values)
# instead of 16 x 16 pixel patches, and the classifier has 101 outputs, so every count sits about
# 1.2 M lower; the differences between variants are the architecture's and must match.
TABLE_1_PARAMS = {"mmvit-I": 87.23, "mmvit-II": 122.69, "mmvit-III-merged": 158.14, "mmvit-III-co": 158.14,
                  "mmvit-III-shift-merge": 143.98, "mmvit-IV-merged": 158.60}


def test_flops_configs_are_table_1_at_vit_b_width():
    configs = dict(flops_configs())
    assert list(configs) == list(TABLE_1_PARAMS)
    counts = {}
    for name, kwargs in configs.items():
        cfg = MmvitConfig(**kwargs)
        assert (cfg.d_model, cfg.depth, cfg.n_heads, cfg.n_frames, cfg.n_patches, cfg.modalities) == (
            768, 12, 12, 8, 196, "IMRA")
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in Mmvit(cfg).parameters()) / 1e6
    for name, paper in TABLE_1_PARAMS.items():
        assert abs(counts[name] - paper) < 1.5, (name, counts[name], paper)
        delta, paper_delta = counts[name] - counts["mmvit-I"], paper - TABLE_1_PARAMS["mmvit-I"]
        assert abs(delta - paper_delta) < 0.06, (name, delta, paper_delta)
