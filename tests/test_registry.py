"""The feature registry (``vtx.features``): one description per feature, agreeing with
docs/FORMAT.md, with torchvision's own weight enums, and with what the backbones produce; any
torchvision classification model as a ``tv:`` feature, checked against torchvision."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import av
import h5py
import numpy as np
import pytest
import torch
from torchvision import models
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from conftest import ROOT, vtx_env
from vtx import features as F
from vtx.errors import UsageError
from vtx.io.decode import rotate
from vtx.pipeline.backbones import load_backbone, load_backbones
from vtx.pipeline.sampling import FrameSampling

ROW_AXIS = {"shot": "n", "frame": "m", "audio": "k"}
NAMED = {"motion_grid": "G", "residual_size": "S"}


def documented_shape(spec: F.FeatureSpec, d: F.DatasetSpec) -> str:
    """How FORMAT.md writes a dataset's shape: ``[n, 512]``, ``[m, 2, G, G]``."""
    dims = [ROW_AXIS[spec.level]]
    for s in d.shape:
        dims.append(NAMED.get(s) or str(spec.shape(d)[len(dims) - 1]) if isinstance(s, str)
                    else str(s))
    return "[" + ", ".join(dims) + "]"


def format_rows() -> dict[str, str]:
    text = (ROOT / "docs" / "FORMAT.md").read_text()
    return {m.group(1): m.group(0) for m in re.finditer(r"^\| `([^`]+)` \|.*$", text, re.M)}


@pytest.mark.parametrize("spec", list(F.FEATURES.values()), ids=list(F.FEATURES))
def test_format_md_tables_agree_with_registry(spec):
    rows = format_rows()
    for d in spec.datasets:
        assert d.name in rows, f"docs/FORMAT.md has no table row for dataset {d.name!r}"
        assert f"`{documented_shape(spec, d)}`" in rows[d.name], (d.name, rows[d.name])
        if d.dtype != "feature":
            assert d.dtype in rows[d.name], (d.name, d.dtype, rows[d.name])


def test_documented_shape_can_fail():
    spec = F.FEATURES["vit_patches"]
    assert documented_shape(spec, spec.datasets[0]) == "[m, 196, 768]"
    assert documented_shape(F.FEATURES["motion"], F.FEATURES["motion"].datasets[0]) == \
        "[m, 2, G, G]"
    assert "`[m, 196, 768]`" not in format_rows()["vit"]


@pytest.mark.parametrize("spec", [s for s in F.FEATURES.values() if s.kind in ("image", "video")],
                         ids=lambda s: s.name)
def test_builtin_identities_read_back_with_get_weight(spec):
    identity = spec.identity("official")
    member, flags = F.parse_identity(identity)
    assert member is models.get_weight(identity) and not flags
    assert models.get_model_weights(spec.builder)[spec.weights] is member
    assert F.penultimate_width(spec.builder) == spec.dim


def test_identities_of_weightless_and_random_features():
    assert F.FEATURES["motion"].identity(gop=True) == "codec+gop-normalised"
    assert F.is_weight_free("codec+gop-normalised") and not F.is_weight_free("random")
    assert F.FEATURES["vggish"].identity(pca=True) == "torchvggish-v0.1+pca"
    assert F.parse_identity("torchvggish-v0.1+pca") == (None, {"pca"})
    assert F.parse_identity("random")[1] == {"random"}
    with pytest.raises(UsageError, match="weights identity"):
        F.parse_identity("NoSuch_Weights.V1")


@pytest.mark.parametrize("text, name, level, kind, clip, weights", [
    pytest.param("tv:mobilenet_v3_small@frame", "tv:mobilenet_v3_small@frame", "frame", "image",
                 1, "IMAGENET1K_V1", id="image-frame"),
    pytest.param("tv:convnext_tiny", "tv:convnext_tiny", "shot", "image", 1, "IMAGENET1K_V1",
                 id="image-shot-default"),
    pytest.param("tv:efficientnet_b0:IMAGENET1K_V1@shot", "tv:efficientnet_b0", "shot", "image",
                 1, "IMAGENET1K_V1", id="explicit-weights"),
    pytest.param("tv:vit_b_16:DEFAULT@frame", "tv:vit_b_16@frame", "frame", "image", 1,
                 "IMAGENET1K_V1", id="default-member"),
    pytest.param("tv:r3d_18", "tv:r3d_18", "shot", "video", 16, "KINETICS400_V1", id="video"),
    pytest.param("tv:r3d_18@shot:8", "tv:r3d_18@shot:8", "shot", "video", 8, "KINETICS400_V1",
                 id="video-clip-len"),
])
def test_parse_tv_feature(text, name, level, kind, clip, weights):
    spec = F.parse_feature(text)
    assert (spec.name, spec.level, spec.kind, spec.clip_len, spec.weights) == \
        (name, level, kind, clip, weights)
    assert F.parse_feature(spec.name) == spec  # the stored name parses back to the same feature
    assert not spec.builtin and spec.dataset_names == (spec.name,)


@pytest.mark.parametrize("text, match", [
    pytest.param("tv:fcn_resnet50", "no classification model", id="segmentation"),
    pytest.param("tv:resnet18:NOPE", "ResNet18_Weights has no 'NOPE'", id="bad-weights"),
    pytest.param("tv:r3d_18@frame", "video model", id="video-at-frame"),
    pytest.param("tv:resnet18@clip", "not a level", id="bad-level"),
    pytest.param("tv:resnet18@shot:4", "clip length of a video model", id="clip-on-image"),
    pytest.param("tv:squeezenet1_0", "no Linear classifier", id="no-linear"),
    pytest.param("resnet", "valid features: resnet18", id="unknown"),
])
def test_bad_feature_specs_are_clear(text, match):
    with pytest.raises(UsageError, match=re.escape(match) if "'" in match else match):
        F.parse_features(f"resnet18,{text}")


def test_parse_features_all_and_dedup():
    names = [s.name for s in F.parse_features("all,resnet18,tv:resnet18")]
    assert names == list(F.ALL_FEATURES) + ["tv:resnet18"]
    assert [s.name for s in F.parse_features(F.DEFAULT_FEATURES)] == ["resnet18", "r2plus1d"]


def test_dataset_levels_for_caches_without_level_attrs():
    assert F.dataset_level("motion_accumulated") == "frame"
    assert F.dataset_level("vggish") == "audio"
    assert F.dataset_level("r2plus1d") == "shot"
    assert F.dataset_level("tv:mobilenet_v3_small@frame") == "frame"
    assert F.dataset_level("something_else") is None


def test_bytes_per_minute_from_row_shapes():
    assert F.bytes_per_minute(F.FEATURES["vit_patches"]) == 60 * 196 * 768 * 2  # FORMAT: 18.1 MB
    assert F.bytes_per_minute(F.FEATURES["resnet18"], "float32") == 20 * 512 * 4
    vggish = F.bytes_per_minute(F.FEATURES["vggish"])
    assert vggish == round(60 / 0.96 * (128 * 2 + 2 * 8))


def test_backbone_outputs_match_registry_shapes():
    specs = F.parse_features("resnet18,vit,vit_patches,tv:mobilenet_v3_small@frame")
    backbones = load_backbones(specs, "random")
    assert len(backbones) == 3  # vit and vit_patches share one ViT run
    for bb in backbones.values():
        x = torch.randint(0, 255, (2, bb.clip_len, 224, 224, 3), dtype=torch.uint8)
        out = bb(x)
        for spec in bb.specs:
            assert tuple(out[spec.name].shape) == (2, *spec.shape(spec.datasets[0]))
            attrs = bb.attrs(spec.name)
            assert attrs["level"] == spec.level and attrs["dim"] == spec.dim
            assert attrs["weights"] == "random"


def test_vtx_features_json_lists_builtins_and_tv_models():
    out = subprocess.run([sys.executable, "-m", "vtx.cli.main", "features", "--json"],
                         capture_output=True, text=True, env=vtx_env(), cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert set(F.FEATURES) <= set(rows)
    mob = rows["tv:mobilenet_v3_small@frame"]
    assert mob["level"] == "frame" and mob["row_shape"] == [1024]
    assert mob["model"] == "mobilenet_v3_small"
    assert mob["weights"] == "MobileNet_V3_Small_Weights.IMAGENET1K_V1"
    assert mob["bytes_per_minute"] == 60 * 1024 * 2
    assert rows["vit_patches"]["row_shape"] == [196, 768]
    assert rows["tv:r3d_18"]["clip_len"] == 16 and "tv:r3d_18@frame" not in rows
    assert "tv:squeezenet1_0" not in rows


# ------------------------------------------------------------------ tv: features vs torchvision
def centred_cosine(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    mu = ref.mean(0)
    a, b = ours - mu, ref - mu
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def torchvision_penultimate(builder: str, weights):
    """torchvision's model with the official file, cut before its last node (the classifier's
    output layer) by torchvision's own feature extraction: independent of vtx's backbones."""
    model = models.get_model(builder, weights=None, num_classes=len(weights.meta["categories"]))
    model.load_state_dict(weights.get_state_dict())
    nodes = get_graph_node_names(model.eval())[1]
    return create_feature_extractor(model, return_nodes={nodes[-2]: "x"}).eval()


def decode_all(path):
    with av.open(str(path)) as c:
        return [torch.from_numpy(rotate(f.to_ndarray(format="rgb24"), f.rotation))
                for f in c.decode(video=0)]


@pytest.fixture(scope="module")
def tv_cache(tv_weights, synth_dir, tmp_path_factory):
    from vtx.pipeline.extract import ExtractConfig, extract

    out = tmp_path_factory.mktemp("tv") / "feats.h5"
    summary = extract(ExtractConfig(
        videos=synth_dir, out=out, progress=False, device="cpu",
        features=("resnet18", "tv:mobilenet_v3_small@frame", "tv:r3d_18@shot:4"),
        dtype="float32",  # random MobileNet weights give ~1e-9 activations, below float16
        frames=FrameSampling(frame_rate=4.0)))
    assert summary.failed == 0 and summary.done == 3, summary.failures
    return out


def test_tv_image_feature_at_frame_level_equals_torchvision(tv_cache, synth_dir):
    weights = models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    ref_model, transforms = torchvision_penultimate("mobilenet_v3_small", weights), \
        weights.transforms()
    name = "tv:mobilenet_v3_small@frame"
    ours, refs = [], []
    with h5py.File(tv_cache) as f, torch.no_grad():
        assert json.loads(f.attrs["features"])[name] == \
            "MobileNet_V3_Small_Weights.IMAGENET1K_V1"
        for g in f["videos"].values():
            ds = g[name]
            assert ds.attrs["level"] == "frame" and ds.shape == (len(g["frames"]), 1024)
            assert ds.attrs["weights_file"] == "mobilenet_v3_small-047dcff4.pth"
            frames = decode_all(synth_dir / g.attrs["path"])
            for row, i in enumerate(g["frames"][()]):
                x = transforms(frames[int(i)].permute(2, 0, 1))
                refs.append(ref_model(x[None])["x"][0].numpy())
                ours.append(ds[row].astype(np.float32))
            assert "resnet18" in g and len(g["resnet18"]) == len(g["shots"])
    assert len(ours) >= 8
    assert centred_cosine(ours, refs).min() >= 0.99


def test_tv_video_feature_per_shot_equals_torchvision(tv_cache, synth_dir):
    weights = models.video.R3D_18_Weights.KINETICS400_V1
    ref_model, transforms = torchvision_penultimate("r3d_18", weights), weights.transforms()
    name = "tv:r3d_18@shot:4"
    ours, refs = [], []
    with h5py.File(tv_cache) as f, torch.no_grad():
        for g in f["videos"].values():
            ds = g[name]
            assert ds.attrs["level"] == "shot" and "4 frames per shot" in ds.attrs["sampling"]
            frames = decode_all(synth_dir / g.attrs["path"])
            for row, (s, e) in enumerate(g["shots"][()]):
                idx = np.linspace(s, e - 1, 4).round().astype(int)
                clip = torch.stack([frames[i] for i in idx]).permute(0, 3, 1, 2)  # (T, C, H, W)
                refs.append(ref_model(transforms(clip)[None])["x"][0].numpy())
                ours.append(ds[row].astype(np.float32))
    assert len(ours) >= 5
    assert centred_cosine(ours, refs).min() >= 0.99


def test_tv_feature_cli_extracts_both(tv_weights, synth_dir, tmp_path):
    """The issue's command line, through the real CLI."""
    out = tmp_path / "feats.h5"
    proc = subprocess.run(
        [sys.executable, "-m", "vtx.cli.main", "extract", "--videos", str(synth_dir / "c.mp4"),
         "--out", str(out), "--features", "resnet18,tv:mobilenet_v3_small@frame",
         "--no-progress", "--json", "--device", "cpu"],
        capture_output=True, text=True, env=vtx_env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["done"] == 1
    with h5py.File(out) as f:
        g = f["videos"]["c.mp4"]
        assert g["resnet18"].shape[1] == 512 and g["tv:mobilenet_v3_small@frame"].shape[1] == 1024


def test_tv_backbone_uses_weights_interpolation():
    """EfficientNet's transform resizes bicubically; the frame reducer follows it."""
    bb = load_backbone("tv:efficientnet_b0", "random")
    assert bb.prep.interpolation == models.EfficientNet_B0_Weights.DEFAULT.transforms().interpolation
    frame = np.random.default_rng(0).integers(0, 255, (120, 200, 3), dtype=np.uint8)
    ref = models.EfficientNet_B0_Weights.DEFAULT.transforms()
    # torchvision's transform up to the crop, on uint8: resize + centre crop
    from torchvision.transforms.v2 import functional as TF

    t = TF.center_crop(TF.resize(torch.from_numpy(frame).permute(2, 0, 1), ref.resize_size,
                                 interpolation=ref.interpolation, antialias=True), ref.crop_size)
    assert np.array_equal(bb.prep(frame), t.permute(1, 2, 0).numpy())


def test_vtn_trains_evaluates_and_predicts_on_tv_feature(tv_cache, synth_dir, tmp_path):
    """Stage 2 takes a tv: feature like any other: train-head, evaluate, and predict (which
    extracts the same torchvision model on the fly) agree."""
    from vtx.train.evaluate import evaluate_run
    from vtx.train.predict import PredictConfig, predict

    labels = tmp_path / "labels.csv"
    labels.write_text("video,labels,split\na,warm,train\nsub/b,cold|fast,train\nc,fast,test\n")
    run = tmp_path / "vtn"
    proc = subprocess.run(
        [sys.executable, "-m", "vtx.cli.main", "train-head", "vtn", "--features", str(tv_cache),
         "--labels", str(labels), "--out", str(run), "--epochs", "2", "--batch-size", "2",
         "--device", "cpu", "--d-model", "32", "--layers", "1", "--window", "4",
         "--set", "feature=tv:mobilenet_v3_small@frame"],
        capture_output=True, text=True, env=vtx_env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    ckpt = torch.load(run / "best.pt", weights_only=True)
    assert ckpt["head_config"]["feature"] == "tv:mobilenet_v3_small@frame"
    assert ckpt["head_config"]["feature_dim"] == 1024  # the cache's width, not VTN's default
    assert ckpt["features"]["tv:mobilenet_v3_small@frame"]["weights"] == \
        "MobileNet_V3_Small_Weights.IMAGENET1K_V1"
    preds_csv = tmp_path / "preds.csv"
    evaluate_run(run / "best.pt", tv_cache, labels, split="test", predictions_out=preds_csv,
                 device="cpu", log=lambda m: None)
    import csv

    with open(preds_csv) as f:
        expected = {r["video"]: r for r in csv.DictReader(f)}
    (pred,) = predict(PredictConfig(videos=(synth_dir / "c.mp4",), model=run / "best.pt",
                                    device="cpu", top_k=3))
    assert pred.error is None
    row = expected["c.mp4"]
    for label, prob in pred.labels:
        assert prob == pytest.approx(float(row[label]), abs=1e-3)
