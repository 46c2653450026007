"""Frame-level streams (ViT, codec motion and residuals) and audio (VGGish), from the same
single decode pass as shots."""

from __future__ import annotations

import av
import h5py
import numpy as np
import pytest
import torch
from torchvision import models

from test_features import centred_cosine, decode_frames
from vtx.io import audio as audio_io
from vtx.io import decode as decode_mod
from vtx.io.synth import Shot, object_size, object_start, write_video
from vtx.pipeline.backbones import load_backbone
from vtx.pipeline.extract import ExtractConfig, extract
from vtx.pipeline.sampling import FrameSampler, FrameSampling


def run(videos, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("device", "cpu")
    return extract(ExtractConfig(videos=videos, out=out, **kw))


# --------------------------------------------------------------------------- sampling
def test_frame_rate_sampling_by_pts():
    s = FrameSampler(FrameSampling(frame_rate=2.0), expected_duration=10)
    times = np.arange(0, 3, 1 / 25)
    taken = [t for i, t in enumerate(times) if s.take(i, t)]
    np.testing.assert_allclose(taken, [0, 0.52, 1.0, 1.52, 2.0, 2.52], atol=0.021)
    # Gaps in PTS (VFR): one sample per target interval, never two for the same frame.
    s = FrameSampler(FrameSampling(frame_rate=1.0), expected_duration=10)
    assert [t for i, t in enumerate([0.0, 0.4, 2.6, 2.7, 3.05]) if s.take(i, t)] == [0.0, 2.6,
                                                                                      3.05]


def test_frames_per_video_uniform():
    s = FrameSampler(FrameSampling(frames_per_video=5), expected_duration=10.0)
    times = np.arange(0, 10, 0.04)
    taken = [t for i, t in enumerate(times) if s.take(i, t)]
    np.testing.assert_allclose(taken, [1, 3, 5, 7, 9], atol=0.041)


# --------------------------------------------------------------------------- audio front end
def test_logmel_framing_and_tone_band():
    sr = audio_io.SAMPLE_RATE
    t = np.arange(int(2.5 * sr)) / sr
    ex = audio_io.waveform_to_examples(0.5 * np.sin(2 * np.pi * 1000.0 * t))
    # 2.5 s -> 248 STFT frames -> 2 examples of 96 x 64 (reference framing)
    assert ex.shape == (2, 96, 64)
    # The band whose centre is nearest 1 kHz (HTK mel) carries the most energy.
    edges = np.linspace(audio_io.hertz_to_mel(125), audio_io.hertz_to_mel(7500), 66)
    centres_hz = 700.0 * (np.exp(edges[1:-1] / 1127.0) - 1.0)
    expected = int(np.argmin(np.abs(centres_hz - 1000.0)))
    assert np.bincount(ex.argmax(axis=2).ravel()).argmax() == expected
    silence = audio_io.waveform_to_examples(np.zeros(sr))
    np.testing.assert_allclose(silence, np.log(0.01))  # log(0 + 0.01)


def test_mel_matrix_matches_reference_definition():
    m = audio_io.mel_matrix()
    assert m.shape == (257, 64)
    assert (m[0] == 0).all()  # DC bin zeroed
    # Triangles: each band peaks at 1 (or close) and is zero outside its neighbours' centres.
    hz = np.linspace(0, 8000, 257)
    assert (m[hz > 7600] == 0).all() and (m[(hz > 0) & (hz < 120)] == 0).all()
    assert np.isclose(audio_io.hertz_to_mel(700.0), 1127.0 * np.log(2.0))
    assert np.allclose(audio_io.periodic_hann(4), [0.0, 0.5, 1.0, 0.5])


def test_streaming_logmel_equals_batch():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(3 * audio_io.SAMPLE_RATE)
    stream = audio_io.LogMelStream()
    got = []
    for chunk in np.array_split(x, 37):
        got += stream.push(chunk)
    np.testing.assert_allclose(np.stack(got), audio_io.waveform_to_examples(x), atol=1e-10)


# --------------------------------------------------------------------------- VGGish weights
PUBLISHED_KEYS = {
    "features.0": (64, 1), "features.3": (128, 64), "features.6": (256, 128),
    "features.8": (256, 256), "features.11": (512, 256), "features.13": (512, 512),
    "embeddings.0": (4096, 12288), "embeddings.2": (4096, 4096), "embeddings.4": (128, 4096),
}


def test_vggish_loads_published_key_names(tmp_path):
    # A state dict built independently from the published port's names and shapes.
    torch.manual_seed(0)
    state = {}
    for prefix, (out, inp) in PUBLISHED_KEYS.items():
        shape = (out, inp, 3, 3) if prefix.startswith("features") else (out, inp)
        state[f"{prefix}.weight"] = torch.randn(shape) * 0.01
        state[f"{prefix}.bias"] = torch.randn(out) * 0.01
    torch.save(state, tmp_path / "vggish-10086976.pth")
    bb = load_backbone("vggish", "official", weights_dir=tmp_path)
    for k, v in bb.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    out = bb(torch.randn(4, 96, 64))["vggish"]
    assert out.shape == (4, 128)
    assert (out < 0).any()  # no ReLU after the last layer, as the TensorFlow reference


def test_vggish_pca_postprocess(torch_home):
    bb = load_backbone("vggish", "official", pca=True)
    raw = load_backbone("vggish", "official")
    x = torch.randn(3, 96, 64)
    q = bb(x)["vggish"]
    assert ((q >= 0) & (q <= 255)).all() and torch.equal(q, q.floor())
    params = torch.load(torch_home / "hub" / "checkpoints" / "vggish_pca_params-970ea276.pth",
                        weights_only=False)
    e = raw(x)["vggish"].double().numpy()
    pca = (params["pca_eigen_vectors"] @ (e.T - params["pca_means"])).T
    expected = np.floor((np.clip(pca, -2, 2) + 2) * 255 / 4)
    assert np.abs(q.numpy() - expected).max() <= 1.0  # float32 vs float64 at bin edges


# --------------------------------------------------------------------------- motion
@pytest.fixture(scope="module")
def moving(tmp_path_factory):
    d = tmp_path_factory.mktemp("moving")
    shot = Shot(30, 1, (3, 0))
    write_video(d / "move.mp4", [shot], size=(224, 224), fps=25, gop=250, bframes=0)
    out = d / "feats.h5"
    # full-frame grids: on a 224 x 224 frame, 14 x 14 cells are exactly the macroblocks
    s = run(d / "move.mp4", out, features=("motion", "residual"),
            frames=FrameSampling(frame_rate=25.0), residual_size=56, full_frame_grids=True)
    assert s.done == 1
    return out, shot


def interior_cells(shot, t, size=(224, 224), cell=16):
    x0, y0 = object_start(shot, size)
    w, h = object_size(size)
    x0, x1 = x0 + shot.motion[0] * t, x0 + shot.motion[0] * t + w
    y0, y1 = y0 + shot.motion[1] * t, y0 + shot.motion[1] * t + h
    return [(r, c) for r in range(size[1] // cell) for c in range(size[0] // cell)
            if c * cell >= x0 + 2 and (c + 1) * cell <= x1 - 2
            and r * cell >= y0 + 2 and (r + 1) * cell <= y1 - 2]


def test_motion_vectors_recover_known_displacement(moving):
    out, shot = moving
    with h5py.File(out) as f:
        g = f["videos"]["move.mp4"]
        motion, types, frames = g["motion"][()], g["frame_types"][()], g["frames"][()]
        acc = g["motion_accumulated"][()]
    assert motion.shape == (30, 2, 14, 14) and types[0] == b"I" and set(types[1:]) == {b"P"}
    assert np.abs(motion[0]).max() == 0  # I-frame: no vectors
    values = []
    for t in range(2, 29):
        cells = interior_cells(shot, int(frames[t]))
        assert cells
        values += [motion[t, :, r, c] for r, c in cells]
    values = np.array(values)
    # src = dst + motion: content moving right by 3 px/frame reads -3.
    assert np.median(values[:, 0]) == pytest.approx(-3.0, abs=0.5)
    assert np.mean(np.abs(values[:, 0] + 3.0) <= 1.0) > 0.9
    assert np.mean(np.abs(values[:, 1]) <= 1.0) > 0.9
    # Accumulated motion grows back to the I-frame: about -3 px per frame since frame 0.
    r, c = interior_cells(shot, int(frames[10]))[0]
    assert acc[10, 0, r, c] == pytest.approx(-30.0, abs=4.0)


def test_residual_is_small_inside_the_moving_object(moving, tmp_path):
    out, shot = moving
    with h5py.File(out) as f:
        res = f["videos"]["move.mp4"]["residual"][()].astype(np.float32)
        frames = f["videos"]["move.mp4"]["frames"][()]
    assert res.shape == (30, 3, 56, 56)
    # Plain frame differences inside the object, for comparison (no motion compensation).
    decoded = decode_frames(out.parent / "move.mp4", set(range(30)))
    comp, plain = [], []
    for t in range(2, 29):
        for r, c in interior_cells(shot, int(frames[t])):
            comp.append(np.abs(res[t, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4]).mean())
            a = decoded[t].numpy()[16 * r:16 * r + 16, 16 * c:16 * c + 16].astype(float)
            b = decoded[t - 1].numpy()[16 * r:16 * r + 16, 16 * c:16 * c + 16].astype(float)
            plain.append(np.abs(a - b).mean() / 255)
    assert np.mean(comp) < 0.03
    assert np.mean(plain) > 4 * np.mean(comp)


# --------------------------------------------------------------------------- all in one pass
@pytest.fixture(scope="module")
def av_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("av")
    write_video(d / "sound.mp4", [Shot(25, 0, (2, 0), tone_hz=440.0),
                                  Shot(30, 3, (0, 1), tone_hz=2000.0)],
                size=(128, 96), fps=25, audio=True)
    write_video(d / "silent.mp4", [Shot(40, 2, (1, 1))], size=(96, 64), fps=25)
    return d


def test_all_features_in_one_decode_pass(av_dir, tmp_path, monkeypatch):
    opened = []
    real_open = decode_mod.av.open

    def counting_open(path, *a, **k):
        opened.append(str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(decode_mod.av, "open", counting_open)
    out = tmp_path / "feats.h5"
    s = run(av_dir, out, features=("all",), frames=FrameSampling(frame_rate=4.0))
    assert (s.done, s.failed) == (2, 0)
    assert sorted(opened) == sorted(str(av_dir / n) for n in ("silent.mp4", "sound.mp4"))
    with h5py.File(out) as f:
        g = f["videos"]["sound.mp4"]
        n = len(g["frames"])
        assert n == 9  # 2.2 s at 4 fps
        lag = g["frame_times"][()] - np.arange(n) * 0.25  # first frame at or after k / 4 s
        assert (lag > -1e-9).all() and (lag < 0.04).all()
        assert g["vit"].shape == (n, 768) and g["vit_patches"].shape == (n, 196, 768)
        assert g["vit_patches"].dtype == np.float16 and g["vit_patches"].chunks[0] == 1
        assert g["motion"].shape == (n, 2, 14, 14) and g["residual"].shape == (n, 3, 56, 56)
        assert g["frame_types"].shape == (n,)
        assert g.attrs["has_audio"]
        assert g["vggish"].shape == (2, 128) and g["vggish_times"].shape == (2, 2)
        np.testing.assert_allclose(g["vggish_times"][()], [[0, 0.96], [0.96, 1.92]], atol=0.03)
        assert {"resnet18", "r2plus1d", "shots"} <= set(g)
        silent = f["videos"]["silent.mp4"]
        assert not silent.attrs["has_audio"]
        assert silent["vggish"].shape == (0, 128) and silent["vggish_times"].shape == (0, 2)
        for name in ("vit", "vit_patches", "vggish", "motion", "residual"):
            assert "sampling" in g[name].attrs and "weights" in g[name].attrs


def test_adding_a_frame_feature_computes_only_it(av_dir, tmp_path, monkeypatch):
    out = tmp_path / "feats.h5"
    run(av_dir, out, features=("resnet18", "motion"), frames=FrameSampling(frame_rate=2.0))
    with h5py.File(out) as f:
        before = {k: f["videos"][k]["motion"][()] for k in f["videos"]}
        frames = {k: f["videos"][k]["frames"][()] for k in f["videos"]}
    from vtx.pipeline.producer import VideoProducer
    jobs = []
    real = VideoProducer.run
    monkeypatch.setattr(VideoProducer, "run", lambda p: (
        jobs.append(tuple(s.name for s in p.job.features)), real(p))[1])
    s = run(av_dir, out, features=("resnet18", "motion", "vit"),
            frames=FrameSampling(frame_rate=2.0))
    assert s.done == 2 and jobs == [("vit",), ("vit",)]
    with h5py.File(out) as f:
        for k in f["videos"]:
            g = f["videos"][k]
            assert np.array_equal(g["motion"][()], before[k])
            assert np.array_equal(g["frames"][()], frames[k])
            assert g["vit"].shape == (len(frames[k]), 768)


def test_vit_agrees_with_torchvision(media, tmp_path):
    out = tmp_path / "feats.h5"
    run(media / "goldeneye-vfr-drop3.mp4", out, features=("vit",),
        frames=FrameSampling(frame_rate=1.0), dtype="float32")
    weights = models.ViT_B_16_Weights.IMAGENET1K_V1
    model = models.vit_b_16()
    model.load_state_dict(weights.get_state_dict())
    model.heads = torch.nn.Identity()
    model.eval()
    transforms = weights.transforms()
    with h5py.File(out) as f:
        g = f["videos"]["goldeneye-vfr-drop3.mp4"]
        idx = [int(i) for i in g["frames"][()]]
        ours = g["vit"][()]
    frames = decode_frames(media / "goldeneye-vfr-drop3.mp4", set(idx))
    with torch.no_grad():
        ref = model(torch.stack([transforms(frames[i].permute(2, 0, 1)) for i in idx])).numpy()
    assert len(idx) == 10
    cos = centred_cosine(ours, ref)
    assert cos.min() >= 0.99, cos


def test_real_audio_48k_stereo(media, tmp_path):
    out = tmp_path / "feats.h5"
    run(media / "issue-195-aspect-ratio.mp4", out, features=("vggish",))
    with av.open(str(media / "issue-195-aspect-ratio.mp4")) as c:
        a = c.streams.audio[0]
        assert (a.rate, a.channels) == (48000, 2)
        seconds = float(a.duration * a.time_base)
    with h5py.File(out) as f:
        g = f["videos"]["issue-195-aspect-ratio.mp4"]
        assert g.attrs["has_audio"]
        n = len(g["vggish"])
        assert n == int((seconds * 16000 - 400 - 95 * 160) // (96 * 160)) + 1
        assert np.isfinite(g["vggish"][()]).all() and g["vggish"][()].std() > 0


def test_gop_normalise_gives_p_frames_only(tmp_path):
    write_video(tmp_path / "b.mp4", [Shot(40, 0, (2, 0)), Shot(30, 4, (1, 0))], size=(128, 96),
                fps=25, bframes=2, gop=100)
    out = tmp_path / "feats.h5"
    run(tmp_path / "b.mp4", out, features=("motion",), frames=FrameSampling(frame_rate=25.0))
    run(tmp_path / "b.mp4", tmp_path / "gop.h5", features=("motion",),
        frames=FrameSampling(frame_rate=25.0), gop_normalise=True)
    with h5py.File(out) as f, h5py.File(tmp_path / "gop.h5") as g:
        plain = f["videos"]["b.mp4"]["frame_types"][()]
        norm = g["videos"]["b.mp4"]["frame_types"][()]
        assert g["videos"]["b.mp4"]["motion"].attrs["gop_normalised"]
        assert g.attrs["features"] != f.attrs["features"]
    assert b"B" in set(plain)
    assert set(norm) == {b"I", b"P"} and len(norm) == 70
    assert [i for i, t in enumerate(norm) if t == b"I"] == list(range(0, 70, 12))
