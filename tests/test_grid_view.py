"""Spatially aligned modalities: every spatial grid of a cache (ViT patches, codec motion,
residuals) covers one image region in one orientation, by default the ViT's centre crop of the
display-rotated frame (vtx/pipeline/backbones.py FramePrep.region, vtx/pipeline/codec.py,
vtx/io/motion.py), recorded in the datasets' attrs; ``--full-frame-grids`` opts into the whole
frame for the grids and the ViT alike; one cache never mixes views."""

from __future__ import annotations

import json
from fractions import Fraction

import av
import cv2
import h5py
import numpy as np
import pytest

from vtx.errors import CacheMismatch
from vtx.features import FEATURES, grid_view
from vtx.io import motion as motion_io
from vtx.io.synth import Shot, scene_background, write_video
from vtx.pipeline.backbones import FramePrep, grid_prep, view_prep
from vtx.pipeline.extract import ExtractConfig, extract
from vtx.pipeline.sampling import FrameSampling

SIZE = (320, 180)  # 16:9


def run(videos, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("device", "cpu")
    kw.setdefault("frames", FrameSampling(frame_rate=25.0))
    kw.setdefault("precision", "fp32")  # compared with fp32 extractions to 2e-3
    return extract(ExtractConfig(videos=videos, out=out, **kw))


def write_left_motion(path, n=12, size=SIZE, speed=1.5):
    """A static background with a 40 x 40 textured square moving right, entirely inside the left
    fifth of the frame (x < 64 of 320), outside the ViT's centre crop (x from 81.6)."""
    w, h = size
    background = scene_background(1, size).astype(np.float32)
    rng = np.random.default_rng(0)
    tex = cv2.GaussianBlur(rng.random((40, 40, 3)).astype(np.float32), (0, 0), 1.5)
    tex = 30 + 200 * (tex - tex.min()) / (tex.max() - tex.min())
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"crf": "18", "preset": "veryfast", "threads": "1", "g": "250", "bf": "0"}
        for t in range(n):
            x = 4 + speed * t
            m = np.float32([[1, 0, x], [0, 1, 70]])
            patch = cv2.warpAffine(tex, m, (w, h), flags=cv2.INTER_LINEAR)
            alpha = cv2.warpAffine(np.ones((40, 40), np.float32), m, (w, h))[..., None]
            frame = np.clip(background * (1 - alpha) + patch, 0, 255).round().astype(np.uint8)
            assert not alpha[:, 64:].any()  # the motion stays in the left fifth
            f = av.VideoFrame.from_ndarray(frame, format="rgb24")
            f.pts, f.time_base = t, Fraction(1, 25)
            for pkt in s.encode(f):
                c.mux(pkt)
        for pkt in s.encode(None):
            c.mux(pkt)


@pytest.fixture(scope="module")
def left(tmp_path_factory):
    d = tmp_path_factory.mktemp("left")
    write_left_motion(d / "left.mp4")
    caches = {}
    for name, full in (("crop", False), ("full", True)):
        caches[name] = d / f"{name}.h5"
        s = run(d / "left.mp4", caches[name], features=("motion", "residual", "vit_patches"),
                weights="random", full_frame_grids=full,
                frames=FrameSampling(frames_per_video=4))  # frames 1, 4, 7, 10: P-frames
        assert s.done == 1
    return d, caches


def read(cache, name):
    with h5py.File(cache) as f:
        ds = f["videos"]["left.mp4"][name]
        return ds[()].astype(np.float32), dict(ds.attrs), json.loads(f.attrs["features"])


def test_motion_outside_the_vit_crop_is_not_in_the_stored_grid(left):
    _, caches = left
    crop, attrs, _ = read(caches["crop"], "motion")
    full, _, _ = read(caches["full"], "motion")
    # the opt-in sees it: a square moving right by 1.5 px per frame reads about -1.5 in x
    assert full[:, 0, :, :3].min() < -1.0 and np.abs(full[:, 0, :, 3:]).max() < 0.5
    # the default grid covers the ViT crop only: no motion at all
    assert np.abs(crop).max() < 0.25, np.abs(crop).max()
    acc, _, _ = read(caches["crop"], "motion_accumulated")
    assert np.abs(acc).max() < 0.25
    res_crop, _, _ = read(caches["crop"], "residual")
    res_full, _, _ = read(caches["full"], "residual")
    assert np.abs(res_full[:, :, :, :12]).mean() > 5 * np.abs(res_crop).mean()


def test_the_region_is_recorded_and_shared_by_every_grid(left):
    _, caches = left
    prep = grid_prep()
    want = np.round(prep.region(*SIZE), 3)
    for name in ("motion", "motion_accumulated", "residual", "vit_patches"):
        _, attrs, features = read(caches["crop"], name)
        np.testing.assert_allclose(attrs["region"], want, atol=1e-3)
        assert attrs["rotation"] == 0 and attrs["view"] == "crop=224/256"
        _, full_attrs, full_features = read(caches["full"], name)
        np.testing.assert_allclose(full_attrs["region"], [0, 0, *SIZE])
        assert full_attrs["view"] == "full-frame"
    assert features["motion"] == "codec+crop=224/256" and features["vit_patches"] == "random"
    assert full_features["motion"] == "codec+full-frame"
    assert full_features["vit_patches"] == "random+full-frame"
    # 320 x 180: the short side goes to 256, so the crop's 224 px are 157.5 coded px, centred
    np.testing.assert_allclose(want, [81.582, 11.25, 239.121, 168.75], atol=1e-3)


@pytest.mark.parametrize("rotation", [0, 90, 180, 270])
def test_the_region_is_what_the_vit_sees_in_every_orientation(rotation):
    """FramePrep's output is the region's area average of the displayed frame (up to the resize
    filter): the codec's grids and the patches cover the same place in the same orientation."""
    rng = np.random.default_rng(rotation)
    coded = cv2.GaussianBlur(rng.random((90, 160, 3)).astype(np.float32), (0, 0), 6)
    coded = (255 * (coded - coded.min()) / np.ptp(coded)).astype(np.uint8)  # (H, W, 3)
    for full in (False, True):
        prep = grid_prep(full_frame=full)
        seen = prep(coded, rotation).astype(np.float32)  # (224, 224, 3), displayed
        box = prep.region(160, 90, rotation)
        ours = motion_io.rotate_grid(motion_io.region_average(
            coded.transpose(2, 0, 1).astype(np.float32), box, 14, 160, 90), rotation)
        small = cv2.resize(seen, (14, 14), interpolation=cv2.INTER_AREA).transpose(2, 0, 1)
        assert np.abs(ours - small).mean() < 2.0, (rotation, full, np.abs(ours - small).mean())
        # and a wrong orientation would not match
        wrong = motion_io.rotate_grid(motion_io.region_average(
            coded.transpose(2, 0, 1).astype(np.float32), box, 14, 160, 90), rotation + 90)
        if rotation % 180 == 0 or full:
            assert np.abs(wrong - small).mean() > 3 * np.abs(ours - small).mean()


def test_area_weights_are_exact_area_averages():
    w = motion_io.area_weights(40, 5.0, 35.0, 3, cell=16)  # cells [0,16) [16,32) [32,40)
    np.testing.assert_allclose(w, [[1, 0, 0], [0.1, 0.9, 0], [0, 0.7, 0.3]])  # [5,15) [15,25) [25,35)
    x = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    np.testing.assert_allclose(motion_io.region_average(x, (0, 0, 4, 3), 1, 4, 3), [[[5.5]]])


def test_vectors_turn_with_the_display_rotation(tmp_path):
    """An object moving right in the coded frame of a video displayed rotated by 90 degrees
    moves up on screen: its stored (x, y) motion reads (0, +speed) (src = dst + motion)."""
    write_video(tmp_path / "rot.mp4", [Shot(20, 2, (3, 0))], size=(224, 160), fps=25, gop=250,
                bframes=0, rotation=90)
    run(tmp_path / "rot.mp4", tmp_path / "f.h5", features=("motion",), full_frame_grids=True)
    m, attrs, _ = read_one(tmp_path / "f.h5", "rot.mp4", "motion")
    assert attrs["rotation"] == 90
    moving = m[2:].transpose(0, 2, 3, 1).reshape(-1, 2)
    moving = moving[np.abs(moving).max(1) > 1.0]
    assert len(moving) > 10
    # cells inside the object read +3 in y; cells on its edges average in the still background
    assert np.percentile(moving[:, 1], 90) == pytest.approx(3.0, abs=0.6)
    assert (moving[:, 1] > 0).mean() > 0.9
    assert np.percentile(np.abs(moving[:, 0]), 90) < 0.6


def read_one(cache, video, name):
    with h5py.File(cache) as f:
        ds = f["videos"][video][name]
        return ds[()].astype(np.float32), dict(ds.attrs), json.loads(f.attrs["features"])


def test_one_cache_never_mixes_views(left, tmp_path):
    d, caches = left
    import functools

    from vtx.io.cache import compact_cache
    run4 = functools.partial(run, frames=FrameSampling(frames_per_video=4))
    cache = tmp_path / "c.h5"
    compact_cache(caches["crop"], cache, progress=False)  # a one-file copy
    with pytest.raises(CacheMismatch, match="feature settings differ"):  # same feature
        run4(d / "left.mp4", cache, features=("motion",), weights="random", full_frame_grids=True)
    compact_cache(caches["crop"], cache, progress=False)  # a one-file copy to edit by hand
    with h5py.File(cache, "a") as f:  # only motion cached: residual asked for full-frame
        for name in ("residual", "vit_patches"):
            del f["videos"]["left.mp4"][name]
        f.attrs["features"] = json.dumps({"motion": "codec+crop=224/256"})
    with pytest.raises(CacheMismatch, match=r"one image region.*motion: crop=224/256 \(cached\)"
                                            r".*residual: full-frame"):
        run4(d / "left.mp4", cache, features=("residual",), weights="random",
            full_frame_grids=True)
    # a cache of before grid views: its motion covers the whole coded frame ("legacy")
    with h5py.File(cache, "a") as f:
        f.attrs["features"] = json.dumps({"motion": "codec"})
    with pytest.raises(CacheMismatch, match=r"motion: legacy \(cached\).*'legacy' grids"):
        run4(d / "left.mp4", cache, features=("vit_patches",), weights="random")
    s = run4(d / "left.mp4", cache, features=("resnet18",), weights="random")  # not a grid: fine
    assert s.done == 1


def test_grid_views_read_back_from_identities():
    vp, mo = FEATURES["vit_patches"], FEATURES["motion"]
    assert grid_view(vp, "ViT_B_16_Weights.IMAGENET1K_V1") == "crop=224/256"
    assert grid_view(vp, "ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1") == "crop=384/384"
    assert grid_view(vp, "random+full-frame") == "full-frame"
    assert grid_view(mo, "codec") == "legacy"
    assert grid_view(mo, "codec+gop-normalised+crop=224/256") == "crop=224/256"
    assert grid_view(FEATURES["vit"], "ViT_B_16_Weights.IMAGENET1K_V1") is None
    assert view_prep("crop=384/384").region(320, 180) == FramePrep(
        __import__("torchvision").models.ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1.transforms()
    ).region(320, 180)


def test_predict_extracts_the_view_the_head_was_trained_on(tmp_path):
    """A head trained on full-frame grids predicts from full-frame grids (its checkpoint's
    identities say so): predict's probabilities equal evaluate's on the cached features."""
    import csv

    from vtx.train.evaluate import evaluate_run
    from vtx.train.predict import PredictConfig, _grid_settings, predict
    from vtx.train.trainer import TrainConfig, train_head

    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(3):
        # no B-frames: FFmpeg's frame-threaded decoder does not always export the same vectors
        # for a B-frame at the start of a stream (in vtx before grid views too)
        write_video(videos / f"g{i}.mp4", [Shot(12, i, (2, 1))], size=(96, 64), fps=12, seed=i,
                    rotation=90 if i == 1 else None, bframes=0)
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("video", "labels"), ("g0", "a"), ("g1", "b"), ("g2", "a|b")])
    cache = tmp_path / "feats.h5"
    run(videos, cache, features=("vit_patches", "motion"), weights="random",
        full_frame_grids=True, frames=FrameSampling(frames_per_video=3))
    r = train_head(TrainConfig(head="mmvit", features=cache, labels=tmp_path / "labels.csv",
                               out=tmp_path / "run", epochs=1, batch_size=3, device="cpu",
                               val_frac=0.0, head_options={"modalities": "M", "d_model": 16,
                                                           "n_heads": 2, "depth": 1}),
                   log=lambda m: None)
    evaluate_run(r.best_path, cache, tmp_path / "labels.csv", split="all",
                 predictions_out=tmp_path / "preds.csv", device="cpu", log=lambda m: None)
    with open(tmp_path / "preds.csv") as f:
        want = {row["video"]: row for row in csv.DictReader(f)}
    for pred in predict(PredictConfig(videos=tuple(sorted(videos.iterdir())), model=r.best_path,
                                      device="cpu", precision="fp32"), log=lambda m: None):
        assert pred.error is None
        for label, p in pred.labels:
            assert p == pytest.approx(float(want[pred.video.split("/")[-1]][label]), abs=1e-4)

    # the ViT run too: predict's extraction of a full-frame checkpoint gives the cached patches
    from vtx.features import FEATURES
    from vtx.pipeline.backbones import load_backbones
    from vtx.pipeline.extract import FrameSettings, extract_video

    class Head:
        inputs = {"motion": (2, 7, 7), "residual": (3, 28, 28)}

    backbones = load_backbones([FEATURES["vit_patches"]], "random", full_frame=True)
    settings = FrameSettings(FrameSampling(frames_per_video=3), **_grid_settings(
        type("H", (), {"inputs": {}}), {"full-frame"}))
    got = extract_video(videos / "g1.mp4", backbones, settings=settings,
                        features=("vit_patches", "motion")).features
    crop = extract_video(videos / "g1.mp4", {}, settings=FrameSettings(
        FrameSampling(frames_per_video=3)), features=("motion",)).features
    with h5py.File(cache) as f:
        for name in ("vit_patches", "motion"):
            stored = f["videos"]["g1.mp4"][name][()].astype(np.float32)
            assert np.abs(got[name] - stored).max() <= 2e-3 * max(1.0, np.abs(stored).max())
        assert not np.allclose(crop["motion"], f["videos"]["g1.mp4"]["motion"][()], atol=0.1)

    legacy = _grid_settings(Head, {"legacy"})
    assert legacy == {"motion_grid": 7, "residual_size": 28, "legacy_grids": True}
    assert _grid_settings(Head, {"full-frame"})["view"].full_frame


def test_training_notes_grids_of_different_regions(tmp_path):
    """A cache of before grid views (legacy motion beside cropped patches) still trains, with a
    note that its grids do not align; one with one view gets no note."""
    from test_train import make_cache
    from vtx.train.dataset import load_cache
    from vtx.train.labels import load_labels

    inputs = {"vit_patches": (4, 8), "motion": (2, 2, 2)}
    for motion, noted in (("codec", True), ("codec+crop=224/256", False)):
        folder = tmp_path / motion.replace("/", "_")
        cache, labels, _ = make_cache(folder, n_videos=4, dims={}, frame_dims=inputs,
                                      weights={"vit_patches": "ViT_B_16_Weights.IMAGENET1K_V1",
                                               "motion": motion})
        logs = []
        load_cache(cache, load_labels(labels), inputs, "frame", log=logs.append)
        assert any("cover different image regions" in m and "motion: legacy" in m
                   for m in logs) == noted
