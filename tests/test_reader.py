"""Tests for vtx/io/reader.py (the cache reader) and vtx/train/tokens.py (token alignment).

The caches here are small hand-written HDF5 files in the layout of docs/FORMAT.md, written with
h5py directly (an independent check of the reader); the alignment tests use hand-made arrays
whose tokens are worked out by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from vtx.errors import UsageError
from vtx.io.reader import (
    CacheNotFoundError,
    CacheReader,
    CacheUnreadableError,
    infer_level,
)
from vtx.train.dataset import load_cache
from vtx.train.labels import load_labels
from vtx.train.tokens import CacheDataError, align_tokens

SHOT_CONFIG = json.dumps({"detector": "content", "threshold": 27.0, "min_shot_len": 15,
                          "max_shot_len": None})
FRAME_CONFIG = json.dumps({"frame_rate": 1.0, "frames_per_video": None})
FEATURES = {"resnet18": "ResNet18_Weights.IMAGENET1K_V1", "vit": "ViT_B_16_Weights.IMAGENET1K_V1",
            "vggish": "torchvggish-v0.1", "motion": "codec"}

# One video: 3 shots of 10 frames at 10 fps, frames sampled at 0, 5, 12, 25; audio examples of 1 s.
SHOTS = np.array([[0, 10], [10, 20], [20, 30]], dtype=np.int64)
SHOT_TIMES = SHOTS / 10.0
FRAMES = np.array([0, 5, 12, 25], dtype=np.int64)
FRAME_TIMES = FRAMES / 10.0
VGGISH_TIMES = np.array([[0.0, 1.0], [1.0, 2.0], [2.0, 3.0]])


def _feature(g: h5py.Group, name: str, x: np.ndarray, level: str | None, **attrs) -> None:
    ds = g.create_dataset(name, data=x)
    ds.attrs.update({"model": name, "weights": FEATURES.get(name, "random"),
                     "weights_file": "", "dim": int(np.prod(x.shape[1:])), "sampling": "test",
                     **attrs})
    if level is not None:
        ds.attrs["level"] = level


def write_cache(path: Path, levels: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """Two videos in the documented layout; ``levels`` writes the ``level`` attrs (caches of
    earlier versions lack them). Returns the first video's arrays."""
    rng = np.random.default_rng(seed)
    arrays = {"shots": SHOTS, "shot_times": SHOT_TIMES, "frames": FRAMES,
              "frame_times": FRAME_TIMES, "vggish_times": VGGISH_TIMES,
              "resnet18": rng.normal(size=(3, 4)).astype(np.float16),
              "vit": rng.normal(size=(4, 6)).astype(np.float16),
              "motion": rng.normal(size=(4, 2, 2, 2)).astype(np.float32),
              "vggish": rng.normal(size=(3, 5)).astype(np.float16)}
    lv = {"resnet18": "shot", "vit": "frame", "motion": "frame", "vggish": "audio"}
    with h5py.File(path, "w") as f:
        f.attrs.update({"vtx_version": "0.1.0", "schema_version": 1, "shot_config": SHOT_CONFIG,
                        "frame_config": FRAME_CONFIG,
                        "features": json.dumps(FEATURES, sort_keys=True)})
        videos = f.create_group("videos")
        for i, rel in enumerate(("clips/a.mp4", "clips/b.mp4")):
            g = videos.create_group(rel.replace("/", "%2F"))
            g.attrs.update({"path": rel, "size_bytes": 100 + i, "duration_s": 3.0, "fps": 10.0,
                            "n_frames": 30, "has_audio": True})
            for name in ("shots", "shot_times", "frames", "frame_times", "vggish_times"):
                g.create_dataset(name, data=arrays[name])
            for name in ("resnet18", "vit", "motion", "vggish"):
                x = arrays[name] if i == 0 else arrays[name] + 1
                _feature(g, name, x, lv[name] if levels else None)
        fail = f.create_group("failures").create_group("broken.mp4")
        fail.attrs.update({"path": "broken.mp4", "reason": "no video stream", "time": "T"})
    return arrays


@pytest.fixture()
def cache(tmp_path) -> tuple[Path, dict]:
    path = tmp_path / "feats.h5"
    return path, write_cache(path)


# --------------------------------------------------------------------------- CacheReader


def test_reader_root_videos_and_datasets(cache):
    path, arrays = cache
    with CacheReader(path) as r:
        assert r.shot_config == SHOT_CONFIG and r.frame_config == FRAME_CONFIG
        assert r.features == FEATURES
        assert r.root_attrs()["schema_version"] == 1
        assert r.keys() == ["clips%2Fa.mp4", "clips%2Fb.mp4"] and len(r) == 2
        infos = list(r.videos())
        assert [v.path for v in infos] == ["clips/a.mp4", "clips/b.mp4"]
        assert infos[1].attrs["size_bytes"] == 101 and infos[1].attrs["has_audio"] is True
        key = infos[0].key
        assert r.datasets(key) == tuple(sorted(arrays)) == infos[0].datasets
        assert r.has(key, "vit") and not r.has(key, "residual")
        for name, x in arrays.items():
            assert np.array_equal(r.read(key, name), x) and r.read(key, name).dtype == x.dtype
            assert r.shape(key, name) == x.shape
        assert r.storage_bytes(key, "vit") > 0
        assert r.dataset_attrs(key, "vit")["sampling"] == "test"
        assert r.identity(key, "vit") == {"model": "vit", "weights": FEATURES["vit"],
                                          "weights_file": "", "dim": 6, "sampling": "test"}
        assert r.identity(key, "motion")["dim"] == 8
        assert r.failures() == {"broken.mp4": {"path": "broken.mp4", "reason": "no video stream",
                                               "time": "T"}}
        view = r.arrays(key)
        assert "vit" in view and "residual" not in view and set(view) == set(arrays)
        assert np.array_equal(view["frames"], FRAMES)
        with pytest.raises(KeyError, match="residual"):
            view["residual"]
        with pytest.raises(KeyError, match="no video"):
            r.read("nope", "vit")


@pytest.mark.parametrize("levels", [pytest.param(True, id="level-attrs"),
                                    pytest.param(False, id="older-cache-without-level")])
def test_reader_levels(tmp_path, levels):
    path = tmp_path / "feats.h5"
    write_cache(path, levels=levels)
    with CacheReader(path) as r:
        key = r.keys()[0]
        got = {n: r.level(key, n) for n in ("resnet18", "vit", "motion", "vggish")}
    assert got == {"resnet18": "shot", "vit": "frame", "motion": "frame", "vggish": "audio"}


def test_level_attr_wins_and_unknown_names_follow_the_times_rule(tmp_path):
    path = tmp_path / "feats.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("videos").create_group("v.mp4")
        g["vit"] = np.zeros((2, 3))
        g["vit"].attrs["level"] = "shot"          # the attr overrides the registry
        g["resnet18"] = np.zeros((2, 3))
        g["resnet18"].attrs["level"] = "sideways"  # not a level: ignored
        g["beeps"] = np.zeros((2, 3))
        g["beeps_times"] = np.zeros((2, 2))
        g["other"] = np.zeros((2, 3))
    with CacheReader(path) as r:
        assert r.level("v.mp4", "vit") == "shot"
        assert r.level("v.mp4", "resnet18") == "shot"
        assert r.level("v.mp4", "beeps") == "audio"
        assert r.level("v.mp4", "other") == "shot"
        assert r.features == {} and r.shot_config is None and r.failures() == {}
    assert infer_level("motion_accumulated") == "frame"
    assert infer_level("beeps", {"beeps_times"}) == "audio" and infer_level("beeps") == "shot"


def test_reader_errors_say_what_to_do(tmp_path):
    with pytest.raises(CacheNotFoundError, match=r"does not exist; create it with vtx extract"):
        CacheReader(tmp_path / "missing.h5")
    with pytest.raises(CacheNotFoundError):
        CacheReader(tmp_path)  # a folder is not a cache
    bad = tmp_path / "notes.h5"
    bad.write_text("not hdf5")
    with pytest.raises(CacheUnreadableError, match="not a readable HDF5 feature cache"):
        CacheReader(bad)
    assert issubclass(CacheNotFoundError, UsageError)
    assert issubclass(CacheUnreadableError, UsageError)
    labels = tmp_path / "labels.csv"
    labels.write_text("video,labels\na.mp4,x\n")
    with pytest.raises(UsageError, match="does not exist"):
        load_cache(tmp_path / "missing.h5", load_labels(labels), ("resnet18",))


def test_an_empty_hdf5_file_holds_no_videos(tmp_path):
    path = tmp_path / "empty.h5"
    h5py.File(path, "w").close()
    with CacheReader(path) as r:
        assert r.keys() == [] and list(r.videos()) == [] and r.root_attrs() == {}


# --------------------------------------------------------------------------- align_tokens


def _base(**extra) -> dict[str, np.ndarray]:
    return {"shots": SHOTS, "shot_times": SHOT_TIMES, "frames": FRAMES,
            "frame_times": FRAME_TIMES, **extra}


def test_frame_rows_pool_per_shot():
    vit = np.array([[0.0, 0.0], [2.0, 4.0], [6.0, 6.0], [1.0, 3.0]], dtype=np.float32)
    # frames 0 and 5 fall in shot 0, 12 in shot 1, 25 in shot 2
    tok = align_tokens(_base(vit=vit), ("vit",), "shot")["vit"]
    assert np.allclose(tok, [[1.0, 2.0], [6.0, 6.0], [1.0, 3.0]]) and tok.dtype == np.float32
    # a shot no sampled frame falls in takes the row nearest its centre frame:
    # shot [10, 12) has centre 10.5, nearer frame 15 (row 2) than frame 5 (row 1)
    shots = np.array([[0, 10], [10, 12], [12, 30]])
    arrays = {"shots": shots, "frames": np.array([0, 5, 15, 25]), "vit": vit}
    tok = align_tokens(arrays, ("vit",), "shot")["vit"]
    assert np.allclose(tok, [[1.0, 2.0], [6.0, 6.0], [3.5, 4.5]])


def test_frame_rows_keep_or_flatten_their_shape():
    motion = np.arange(4 * 8, dtype=np.float32).reshape(4, 2, 2, 2)
    flat = align_tokens(_base(motion=motion), ("motion",), "frame")["motion"]
    assert flat.shape == (4, 8) and np.array_equal(flat, motion.reshape(4, 8))
    shaped = align_tokens(_base(motion=motion), ("motion",), "frame",
                          shapes={"motion": (2, 2, 2)})["motion"]
    assert np.array_equal(shaped, motion)
    pooled = align_tokens(_base(motion=motion), ("motion",), "shot",
                          shapes={"motion": (2, 2, 2)})["motion"]
    assert pooled.shape == (3, 2, 2, 2) and np.allclose(pooled[0], motion[:2].mean(0))


def test_audio_pools_per_shot_and_covers_each_frame():
    audio = np.array([[1.0], [3.0], [8.0]], dtype=np.float32)  # examples [0,1), [1,2), [2,3)
    arrays = _base(vggish=audio, vggish_times=VGGISH_TIMES)
    shot_times = np.array([[0.0, 1.5], [1.5, 2.0], [2.0, 3.0]])
    tok = align_tokens({**arrays, "shot_times": shot_times}, ("vggish",), "shot")["vggish"]
    assert np.allclose(tok[:, 0], [2.0, 3.0, 8.0])  # overlapping examples averaged
    # frames at 0.0, 0.5, 1.2, 2.5 s are covered by examples 0, 0, 1, 2
    at = {**arrays, "frame_times": np.array([0.0, 0.5, 1.2, 2.5])}
    assert np.array_equal(align_tokens(at, ("vggish",), "frame")["vggish"][:, 0], [1, 1, 3, 8])
    # a frame past the last example takes the nearest one
    late = {**arrays, "frame_times": np.array([0.5, 1.2, 2.5, 7.0])}
    assert np.array_equal(align_tokens(late, ("vggish",), "frame")["vggish"][:, 0], [1, 3, 8, 8])


def test_no_audio_gives_zero_tokens_and_a_note():
    arrays = _base(vggish=np.zeros((0, 5), np.float16), vggish_times=np.zeros((0, 2)))
    notes: dict[str, int] = {}
    shot = align_tokens(arrays, ("vggish",), "shot", notes=notes)["vggish"]
    frame = align_tokens(arrays, ("vggish",), "frame", notes=notes)["vggish"]
    assert shot.shape == (3, 5) and frame.shape == (4, 5)
    assert not shot.any() and not frame.any()
    assert notes == {"videos without vggish rows (no audio) got zero vggish tokens": 2}


def test_levels_given_override_the_names():
    x = np.array([[1.0], [2.0], [3.0], [4.0]])
    # "clip" is no known feature: without a level it is a shot feature, with "frame" it pools
    with pytest.raises(CacheDataError, match="'clip' has 4 rows but 'shots' has 3"):
        align_tokens(_base(clip=x), ("clip",), "shot")
    tok = align_tokens(_base(clip=x), ("clip",), "shot", levels={"clip": "frame"})["clip"]
    assert np.allclose(tok[:, 0], [1.5, 3.0, 4.0])


@pytest.mark.parametrize("arrays, features, level, message", [
    pytest.param(_base(resnet18=np.zeros((3, 4))), ("resnet18",), "frame",
                 "'resnet18' is a shot-level feature .* use a frame-level feature "
                 r"\(vit, vit_patches, motion, residual\)", id="shot-rows-for-frame-head"),
    pytest.param({"shots": SHOTS, "vit": np.zeros((4, 2))}, ("vit",), "shot",
                 "v.mp4: reading 'vit' for a shot-level head needs the video's 'frames'",
                 id="frames-missing"),
    pytest.param(_base(vit=np.zeros((5, 2))), ("vit",), "frame",
                 "'vit' has 5 rows but 'frames' has 4", id="frame-rows-misaligned"),
    pytest.param(_base(vggish=np.zeros((2, 2))), ("vggish",), "shot",
                 "needs the video's 'vggish_times'", id="audio-times-missing"),
    pytest.param(_base(vit=np.zeros((4, 2)), resnet18=np.zeros((3, 2))), ("vit", "resnet18"),
                 "frame", "shot-level", id="mixed-levels"),
    pytest.param(_base(), ("vit",), "frame", "has no 'vit' dataset", id="feature-missing"),
    pytest.param(_base(vit=np.zeros((4, 2))), ("vit",), "clip", "unknown token level",
                 id="bad-level"),
])
def test_alignment_refusals(arrays, features, level, message):
    with pytest.raises(CacheDataError, match=message):
        align_tokens(arrays, features, level, video="v.mp4")


def test_features_must_share_one_token_axis():
    # without a 'shots' dataset shot rows cannot be checked one by one, only against each other
    arrays = {"resnet18": np.zeros((3, 2)), "r2plus1d": np.zeros((2, 2))}
    with pytest.raises(CacheDataError, match="do not share one token axis: "
                                             r"\{'resnet18': 3, 'r2plus1d': 2\}"):
        align_tokens(arrays, ("resnet18", "r2plus1d"), "shot")


# --------------------------------------------------------------------------- load_cache


@pytest.mark.parametrize("level", ["shot", "frame"])
def test_load_cache_reads_through_the_reader_the_same_with_or_without_level_attrs(tmp_path,
                                                                                  level):
    new, old = tmp_path / "new.h5", tmp_path / "old.h5"
    arrays = write_cache(new, levels=True)
    write_cache(old, levels=False)
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("video,labels,split\nclips/a.mp4,x,train\nclips/b.mp4,y,test\n")
    labels = load_labels(labels_csv)
    features = ("vit", "motion", "vggish") + (("resnet18",) if level == "shot" else ())
    a = load_cache(new, labels, features, level, log=lambda m: None)
    b = load_cache(old, labels, features, level, log=lambda m: None)
    want = align_tokens(arrays, features, level, dims={"vit": 6, "motion": 8, "vggish": 5,
                                                       "resnet18": 4})
    for data in (a, b):
        assert [v.path for v in data.videos] == ["clips/a.mp4", "clips/b.mp4"]
        assert data.shot_config == SHOT_CONFIG and data.frame_config == FRAME_CONFIG
        assert data.feature_attrs["vit"]["weights"] == FEATURES["vit"]
        for ft in features:
            assert np.array_equal(data.videos[0].tokens[ft], want[ft])
    for va, vb in zip(a.videos, b.videos):
        for ft in features:
            assert np.array_equal(va.tokens[ft], vb.tokens[ft])


@pytest.mark.parametrize("level", ["shot", "frame"])
def test_predict_aligns_in_memory_arrays_as_training_aligns_the_cache(tmp_path, level):
    from types import SimpleNamespace

    from vtx.train.predict import head_tokens

    path = tmp_path / "feats.h5"
    arrays = write_cache(path, levels=False)
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("video,labels\nclips/a.mp4,x\n")
    inputs = {"vit": 6, "motion": 8, "vggish": 5, **({"resnet18": 4} if level == "shot" else {})}
    data = load_cache(path, load_labels(labels_csv), inputs, level, log=lambda m: None)
    head = SimpleNamespace(features=tuple(inputs), level=level, inputs=inputs)
    structure = ("shots", "shot_times", "frames", "frame_times", "vggish_times")
    feats = SimpleNamespace(fixed={n: arrays[n] for n in structure},
                            features={n: arrays[n].astype(np.float32) for n in inputs})
    got = head_tokens(head, feats)
    for ft in inputs:
        assert np.allclose(got[ft], data.videos[0].tokens[ft].astype(np.float32), atol=1e-2)
        assert got[ft].shape == data.videos[0].tokens[ft].shape
