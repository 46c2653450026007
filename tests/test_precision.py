"""``--precision auto|fp32|bf16|fp16``: how it resolves per device, what it refuses, what it
records in the cache, and that bf16 features still agree with fp32 torchvision on real clips.

Agreement is the centred cosine of ``test_features`` (each row centred on the mean fp32
torchvision reference row), min over rows >= 0.99, with the suite's official-name weight files
(random values, ``conftest.torch_home``).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torchvision import models

from test_features import centred_cosine, decode_frames, reference_model
from vtx.cli.main import cli
from vtx.errors import UsageError
from vtx.features import FEATURES
from vtx.pipeline import backbones as B
from vtx.pipeline.backbones import sample_indices
from vtx.pipeline.extract import ExtractConfig, extract
from vtx.pipeline.shots import ShotConfig

NATIVE_BF16 = B.cpu_native_bf16()
needs_bf16 = pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16 "
                                                        "(AVX512_BF16 / AMX)")


def cpuinfo_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text()
    return {f for line in text.splitlines() if line.startswith("flags")
            for f in line.split(":", 1)[1].split()}


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="no /proc/cpuinfo")
def test_native_bf16_detection_agrees_with_cpuinfo():
    assert NATIVE_BF16 == bool(cpuinfo_flags() & {"avx512_bf16", "amx_bf16"})


@pytest.mark.parametrize("native,device,want", [
    (True, "cpu", "bf16"), (False, "cpu", "fp32"), (True, "cuda", "fp16"), (False, "cuda", "fp16"),
])
def test_auto_resolves_per_device(monkeypatch, native, device, want):
    monkeypatch.setattr(B, "cpu_native_bf16", lambda: native)
    assert B.resolve_precision("auto", device) == want
    assert B.resolve_precision("fp32", device) == "fp32"


def test_refused_precisions_say_what_to_use(monkeypatch):
    with pytest.raises(UsageError, match="CUDA only.*bf16"):
        B.resolve_precision("fp16", "cpu")
    monkeypatch.setattr(B, "cpu_native_bf16", lambda: False)
    with pytest.raises(UsageError, match="AVX512_BF16.*--precision fp32"):
        B.resolve_precision("bf16", "cpu")
    with pytest.raises(UsageError, match="one of auto, fp32, bf16, fp16"):
        B.resolve_precision("half", "cpu")


def test_cli_refuses_fp16_on_cpu_with_exit_2(synth_dir, tmp_path):
    out = tmp_path / "f.h5"
    r = CliRunner().invoke(cli, ["extract", "--videos", str(synth_dir), "--out", str(out),
                                 "--device", "cpu", "--precision", "fp16", "--no-progress"])
    assert r.exit_code == 2, r.output
    assert "fp16 is for CUDA only" in r.output and not out.exists()
    r = CliRunner().invoke(cli, ["extract", "--help"])
    assert "--precision" in r.output and "AVX512_BF16" in r.output
    r = CliRunner().invoke(cli, ["predict", "--help"])
    assert "--precision" in r.output


@needs_bf16
def test_bf16_backbone_runs_in_bf16_and_returns_float32():
    bb = B.load_backbone("resnet18", "random", precision="bf16")
    assert bb.precision == "bf16" and bb.attrs()["precision"] == "bf16"
    assert {p.dtype for p in bb.model.parameters()} == {torch.bfloat16}
    assert bb.mean.dtype == torch.float32  # normalisation stays fp32
    out = bb(torch.randint(0, 255, (2, 1, 224, 224, 3), dtype=torch.uint8))["resnet18"]
    assert out.dtype == torch.float32 and out.shape == (2, 512)
    fp32 = B.load_backbone("resnet18", "random")
    assert fp32.precision == "fp32" and fp32.attrs()["precision"] == "fp32"
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}


@needs_bf16
def test_precision_recorded_per_dataset_not_in_identity(synth_dir, tmp_path):
    """A cache made at fp32 is extended by a bf16 run: no settings clash, the root `features`
    identities do not mention precision, and each dataset says how it was computed."""
    out = tmp_path / "f.h5"
    base = dict(videos=synth_dir, out=out, weights="random", progress=False, device="cpu",
                shots=ShotConfig(max_shot_len=0.5))
    assert extract(ExtractConfig(features="resnet18", precision="fp32", **base)).failed == 0
    with h5py.File(out) as f:
        features_before = f.attrs["features"]
    s = extract(ExtractConfig(features="resnet18,tv:mobilenet_v3_small", precision="bf16", **base))
    assert s.failed == 0 and s.done == 3
    with h5py.File(out) as f:
        assert "precision" not in f.attrs["features"] and "fp32" not in features_before
        for g in f["videos"].values():
            assert g["resnet18"].attrs["precision"] == "fp32"
            assert g["tv:mobilenet_v3_small"].attrs["precision"] == "bf16"
            assert len(g["tv:mobilenet_v3_small"]) == len(g["shots"])


def torchvision_fp32(media: Path, video: str, shots: np.ndarray, frames: np.ndarray) -> dict:
    """fp32 torchvision features of one video, from full frames decoded once with PyAV and
    ``weights.transforms()``: resnet18 and r2plus1d per shot, vit per sampled frame."""
    clips = {name: [[int(i) for i in sample_indices(FEATURES[name].clip_len, s, e)]
                    for s, e in shots] for name in ("resnet18", "r2plus1d")}
    wanted = {i for c in clips.values() for idx in c for i in idx} | {int(i) for i in frames}
    decoded = decode_frames(media / video, wanted)  # index -> (H, W, 3) uint8

    def chw(i):
        return decoded[i].permute(2, 0, 1)

    vit_weights = models.ViT_B_16_Weights.IMAGENET1K_V1
    vit = models.vit_b_16()
    vit.load_state_dict(vit_weights.get_state_dict())
    vit.heads = torch.nn.Identity()
    resnet, resnet_tf = reference_model("resnet18")
    r21d, r21d_tf = reference_model("r2plus1d")
    with torch.no_grad():
        return {
            "resnet18": resnet(torch.stack([resnet_tf(chw(c[0])) for c in clips["resnet18"]])),
            "r2plus1d": r21d(torch.stack([r21d_tf(torch.stack([chw(i) for i in c]))
                                          for c in clips["r2plus1d"]])),
            "vit": vit.eval()(torch.stack([vit_weights.transforms()(chw(int(i)))
                                           for i in frames])),
        }


@needs_bf16
def test_bf16_features_agree_with_fp32_torchvision_on_real_clip(media, tmp_path):
    """resnet18, r2plus1d and vit extracted in bf16 from a real film clip (shots split to at
    most 1 s for more rows) agree with torchvision's fp32 models at centred cosine >= 0.99."""
    video = "goldeneye-vfr-drop3.mp4"
    out = tmp_path / "feats.h5"
    s = extract(ExtractConfig(videos=media / video, out=out, features="resnet18,r2plus1d,vit",
                              precision="bf16", device="cpu", dtype="float32", progress=False,
                              shots=ShotConfig(max_shot_len=1.0)))
    assert s.failed == 0, s.failures
    with h5py.File(out) as f:
        g = f["videos"][video]
        ours = {name: g[name][()] for name in ("resnet18", "r2plus1d", "vit")}
        assert all(g[name].attrs["precision"] == "bf16" for name in ours)
        shots, frames = g["shots"][()], g["frames"][()]
    assert len(shots) >= 10 and len(frames) >= 10
    refs = torchvision_fp32(media, video, shots, frames)
    for name, rows in ours.items():
        cos = centred_cosine(rows, refs[name].numpy())
        assert cos.min() >= 0.99, (name, cos)


@needs_bf16
def test_bf16_vggish_agrees_with_fp32_on_real_audio(media):
    """VGGish in bf16 against the same weights in fp32, on the log-mel examples of a real clip's
    soundtrack (the model is vtx's own port, so fp32 vtx is the reference)."""
    import av

    from vtx.io import audio as audio_io

    resample = audio_io.AudioResampler()
    with av.open(str(media / "issue-195-aspect-ratio.mp4")) as c:
        chunks = [resample(fr) for fr in c.decode(audio=0)] + [resample(None)]
    examples = torch.from_numpy(audio_io.waveform_to_examples(np.concatenate(chunks))).float()
    fp32 = B.load_backbone("vggish", "official")
    bf16 = B.load_backbone("vggish", "official", precision="bf16")
    assert len(examples) >= 10
    a, b = fp32(examples)["vggish"].numpy(), bf16(examples)["vggish"].numpy()
    cos = centred_cosine(b, a)
    assert cos.min() >= 0.99, cos
    assert FEATURES["vggish"].dim == a.shape[1]
    # --vggish-pca quantises to 0..255: bf16 moves a rare value by one level, never more
    # (the fixture's PCA gives near-constant rows, so a cosine would only count those flips)
    a = B.load_backbone("vggish", "official", pca=True)(examples)["vggish"].numpy()
    b = B.load_backbone("vggish", "official", pca=True, precision="bf16")(examples)["vggish"]
    diff = np.abs(a - b.numpy())
    assert diff.max() <= 1.0 and (diff > 0).mean() < 0.01
