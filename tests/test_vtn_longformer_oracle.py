"""VTN's Longformer encoder against Hugging Face ``LongformerEncoder`` with copied weights.

Section 3.2 of the VTN paper uses a Longformer with global attention on [CLS]; Hugging Face's
implementation is the reference. Both encoders get the same hidden states (HF's embedding layer
is bypassed) and token 0 is the one global token. HF needs the length padded to a multiple of the
window, ours does not, so ours runs on the unpadded batch and only real tokens are compared.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vtx.heads import build_head

modeling = pytest.importorskip("transformers.models.longformer.modeling_longformer")
LongformerConfig = pytest.importorskip("transformers").LongformerConfig

# HF parameter name (inside ``layer.<i>.``) -> ours (inside ``layers.<i>.``)
RENAME = {
    "attention.self.query": "attn.query",
    "attention.self.key": "attn.key",
    "attention.self.value": "attn.value",
    "attention.self.query_global": "attn.query_global",
    "attention.self.key_global": "attn.key_global",
    "attention.self.value_global": "attn.value_global",
    "attention.output.dense": "attn.out",
    "attention.output.LayerNorm": "norm1",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "output.LayerNorm": "norm2",
}


def hf_to_ours(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        _, i, rest = key.split(".", 2)  # "layer", "<i>", "<module path>.<weight|bias>"
        module, param = rest.rsplit(".", 1)
        out[f"layers.{i}.{RENAME[module]}.{param}"] = value
    return out


@pytest.mark.parametrize(
    "window,n_layers,lengths",
    [
        pytest.param(8, 2, (20, 12), id="w8-2layers"),
        pytest.param(4, 1, (23, 9), id="w4-1layer"),
        pytest.param(6, 2, (18, 18), id="w6-2layers-no-padding"),
        pytest.param(32, 1, (13, 5), id="w32-longer-than-input"),
    ],
)
def test_vtn_encoder_matches_hf_longformer(window, n_layers, lengths):
    torch.manual_seed(0)
    hidden, heads = 32, 2
    config = LongformerConfig(
        hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=n_layers,
        intermediate_size=4 * hidden, attention_window=[window] * n_layers,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-5, hidden_act="gelu",
    )
    hf = modeling.LongformerEncoder(config).eval()
    for name, p in hf.named_parameters():  # make LayerNorms non-trivial and biases non-zero
        if "LayerNorm.weight" in name:
            nn.init.normal_(p, 1.0, 0.3)
        elif name.endswith("bias"):
            nn.init.normal_(p, 0.0, 0.3)
    head = build_head(
        "vtn", n_outputs=2, feature_dim=hidden, d_model=hidden, n_heads=heads, n_layers=n_layers,
        window=window, mlp_ratio=4.0, dropout=0.0, attn_dropout=0.0,
    ).eval()
    head.encoder.load_state_dict(hf_to_ours(hf.state_dict()), strict=True)

    B, N = len(lengths), max(lengths)  # lengths count CLS (token 0)
    padded = -(-N // window) * window
    x = torch.randn(B, padded, hidden)
    real = torch.arange(padded)[None, :] < torch.tensor(lengths)[:, None]  # (B, padded)
    # HF's encoder-level mask: < 0 no attention, 0 local, > 0 global.
    hf_mask = torch.where(real, 0.0, -10000.0)
    hf_mask[:, 0] = 10000.0
    with torch.no_grad():
        want = hf(x, attention_mask=hf_mask, output_attentions=True)
        got, cls_attn = head.encoder(x[:, :N], real[:, :N], return_attention=True)

    want_h = want.last_hidden_state[:, :N]
    assert torch.allclose(got[real[:, :N]], want_h[real[:, :N]], atol=1e-5), (
        (got - want_h)[real[:, :N]].abs().max()
    )
    want_cls = want.global_attentions[-1][:, :, :N, 0]  # (B, H, N): CLS's global attention, last layer
    assert torch.allclose(cls_attn, want_cls, atol=1e-6)
    assert torch.allclose(cls_attn.sum(-1), torch.ones(B, heads))
