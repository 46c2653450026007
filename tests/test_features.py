"""Per-shot features agree with torchvision's models applied through ``weights.transforms()``
to full-resolution frames decoded independently with PyAV.

Agreement is measured as cosine similarity after centring both vectors on the mean reference
feature: with random weights every input gives nearly the same raw feature direction, so raw
cosines cannot catch preprocessing errors (``test_centred_cosine_catches_rotation_error``).
"""

from __future__ import annotations

import av
import h5py
import numpy as np
import pytest
import torch
from torchvision import models
from torchvision.models import video as video_models

from vtx.errors import WeightsUnavailable
from vtx.features import FEATURES
from vtx.io.decode import rotate
from vtx.pipeline.backbones import FramePrep, load_backbone, sample_indices

REFS = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    "r2plus1d": (video_models.r2plus1d_18, video_models.R2Plus1D_18_Weights.KINETICS400_V1),
}


def reference_model(name):
    builder, weights = REFS[name]
    model = builder()
    model.load_state_dict(weights.get_state_dict())  # the same official file, via torch.hub
    model.fc = torch.nn.Identity()
    return model.eval(), weights.transforms()


def decode_frames(path, wanted):
    out = {}
    with av.open(str(path)) as c:
        for i, fr in enumerate(c.decode(video=0)):
            if i in wanted:
                out[i] = torch.from_numpy(rotate(fr.to_ndarray(format="rgb24"), fr.rotation))
    return out  # index -> (H, W, 3) uint8


def centred_cosine(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    mu = ref.mean(0)
    a, b = ours - mu, ref - mu
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def reference_features(cache, media, name):
    model, transforms = reference_model(name)
    ours, refs = [], []
    with h5py.File(cache) as f, torch.no_grad():
        for key, g in f["videos"].items():
            shots = g["shots"][()]
            idx = {s: [int(i) for i in sample_indices(FEATURES[name].clip_len, s, e)]
                   for s, e in shots}
            frames = decode_frames(media / g.attrs["path"], {i for v in idx.values() for i in v})
            for j, (s, _) in enumerate(shots):
                clip = torch.stack([frames[i] for i in idx[s]]).permute(0, 3, 1, 2)  # (T,C,H,W)
                x = transforms(clip[0]) if name == "resnet18" else transforms(clip)
                refs.append(model(x[None])[0].numpy())
                ours.append(g[name][j].astype(np.float32))
    return np.array(ours), np.array(refs)


@pytest.mark.parametrize("name", ["resnet18", "r2plus1d"])
def test_media_features_agree_with_torchvision(media_cache, media, name):
    ours, refs = reference_features(media_cache, media, name)
    assert len(ours) >= 10
    cos = centred_cosine(ours, refs)
    assert cos.min() >= 0.99, cos


def test_centred_cosine_catches_rotation_error(media):
    """The agreement metric is able to fail: an unrotated frame is caught once centred."""
    model, transforms = reference_model("resnet18")
    frames = []
    with av.open(str(media / "testvideo.mp4")) as c:
        for i, fr in enumerate(c.decode(video=0)):
            if i % 60 == 0:
                frames.append(torch.from_numpy(fr.to_ndarray(format="rgb24")).permute(2, 0, 1))
    with torch.no_grad():
        ref = model(torch.stack([transforms(f) for f in frames])).numpy()
        rot = model(torch.stack([transforms(torch.rot90(f, 1, (1, 2))) for f in frames])).numpy()
    raw = (ref * rot).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(rot, axis=1)
    assert raw.min() > 0.95  # raw cosine barely notices
    assert centred_cosine(rot, ref).min() < 0.98


def test_frame_prep_rotation_matches_rotating_first():
    rng = np.random.default_rng(0)
    frame = cv_smooth(rng.integers(0, 255, (90, 160, 3), dtype=np.uint8))
    prep = FramePrep(models.ResNet18_Weights.IMAGENET1K_V1.transforms())
    for rotation in (90, -90, 180):
        a = prep(frame, rotation).astype(float)
        b = prep(rotate(frame, rotation), 0).astype(float)
        assert a.shape == b.shape == (224, 224, 3)
        assert np.abs(a - b).mean() < 2.0


def cv_smooth(img):
    import cv2
    return cv2.GaussianBlur(img, (9, 9), 3)


def test_random_weights_are_seeded_and_marked():
    a = load_backbone("resnet18", weights="random", seed=3)
    b = load_backbone("resnet18", weights="random", seed=3)
    c = load_backbone("resnet18", weights="random", seed=4)
    x = torch.randint(0, 255, (2, 1, 224, 224, 3), dtype=torch.uint8)
    fa, fb, fc = (m(x)["resnet18"] for m in (a, b, c))
    assert torch.equal(fa, fb) and not torch.allclose(fa, fc)
    assert a.attrs()["weights"] == "random" and a.attrs()["weights_file"] == ""


def test_official_weights_load_from_hub_cache(torch_home):
    bb = load_backbone("r2plus1d", weights="official")
    ref, _ = reference_model("r2plus1d")
    for (k, v), (k2, v2) in zip(bb.model.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert bb.attrs()["weights"] == "R2Plus1D_18_Weights.KINETICS400_V1"
    assert bb.attrs()["weights_file"] == "r2plus1d_18-91a641e6.pth"


def test_missing_official_weights_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    with pytest.raises(WeightsUnavailable) as e:
        load_backbone("resnet18", weights="official", weights_dir=tmp_path / "empty")
    msg = str(e.value)
    assert "resnet18-f37072fd.pth" in msg
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
    assert str(tmp_path / "empty") in msg and "--weights random" in msg
    assert "\n" not in msg
