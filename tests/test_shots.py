"""Shot segmentation: equal to PySceneDetect's own results, from vtx's single decode pass."""

from __future__ import annotations

import json


import av
import cv2
import h5py
import numpy as np
import pytest
import scenedetect
from scenedetect import AdaptiveDetector, ContentDetector, HashDetector, HistogramDetector

from conftest import golden, media_files
from vtx.errors import UsageError
from vtx.io.decode import RgbConverter, VideoReader
from vtx.io.synth import Shot, write_video
from vtx.pipeline.shots import DetectorInput, ShotBuffer, ShotConfig, ShotDetector, split_shot


def detect_with_vtx(path, config=ShotConfig()):
    """Cut indices and frame times from vtx's decode loop feeding the detector."""
    cuts, times = [], []
    with VideoReader(path) as r:
        det = ShotDetector(config, (r.info.width, r.info.height), r.frame_rate)
        for f in r.frames():
            times.append(f.time)
            cuts += det.push(f.index, f.pts, f.time_base, f.av_frame)  # as the decode thread
        cuts += det.finish()
    return sorted(cuts), times


def scenedetect_cut_times(path, detector):
    scenes = scenedetect.detect(str(path), detector, backend="pyav")
    return [s[0].seconds for s in scenes[1:]]


@pytest.mark.parametrize("name", media_files())
def test_media_cache_shots_equal_goldens(media_cache, name):
    g = golden(name)
    with h5py.File(media_cache) as f:
        v = f["videos"][name]
        shots, times = v["shots"][()], v["shot_times"][()]
        assert v.attrs["n_frames"] == g["decoded_frames"]
    assert shots.dtype == np.int64 and times.dtype == np.float64
    # Contiguous shots covering every decoded frame.
    assert shots[0, 0] == 0 and shots[-1, 1] == g["decoded_frames"]
    assert (shots[1:, 0] == shots[:-1, 1]).all() and (shots[:, 1] > shots[:, 0]).all()
    np.testing.assert_allclose(times[1:, 0], g["cut_times_s"], atol=1e-6)
    np.testing.assert_allclose(times[:-1, 1], times[1:, 0])
    assert len(shots) == len(g["cut_times_s"]) + 1  # no cut -> one shot covering all


def test_vfr_cut_is_decode_index_not_nominal_frame(media_cache):
    # goldeneye's cut at 3.75375 s is decode index 60, PySceneDetect's frame number 90.
    with h5py.File(media_cache) as f:
        shots = f["videos"]["goldeneye-vfr-drop3.mp4"]["shots"][()]
    assert shots[1, 0] == 60


@pytest.mark.parametrize("detector,cls", [
    pytest.param("content", ContentDetector, id="content"),
    pytest.param("adaptive", AdaptiveDetector, id="adaptive"),
    pytest.param("hash", HashDetector, id="hash"),
    pytest.param("histogram", HistogramDetector, id="histogram"),
])
def test_synthetic_cuts_equal_scenedetect(tmp_path, detector, cls):
    truth = write_video(tmp_path / "v.mp4", [Shot(20, 0, (2, 0)), Shot(17, 3, (0, 1)),
                                             Shot(25, 5, (1, 1)), Shot(16, 1)], size=(144, 80))
    cuts, times = detect_with_vtx(tmp_path / "v.mp4", ShotConfig(detector=detector))
    expected = scenedetect_cut_times(tmp_path / "v.mp4", cls())
    assert [times[c] for c in cuts] == pytest.approx(expected, abs=1e-9)
    if detector == "content":
        assert cuts == truth["cut_frames"]


def test_vfr_synthetic_equals_scenedetect(tmp_path):
    drop = {5, 6, 30, 31, 32, 50}
    truth = write_video(tmp_path / "vfr.mp4", [Shot(24, 0, (1, 0)), Shot(24, 2), Shot(20, 6)],
                        size=(128, 72), fps=24, vfr_drop=drop)
    cuts, times = detect_with_vtx(tmp_path / "vfr.mp4")
    assert np.diff(times).max() > 1.5 * np.diff(times).min()  # really variable
    assert cuts == truth["cut_frames"]
    assert [times[c] for c in cuts] == pytest.approx(
        scenedetect_cut_times(tmp_path / "vfr.mp4", ContentDetector()), abs=1e-9)


def reference_input(av_frame, size):
    """What scenedetect's SceneManager gives its detector (as RGB): PyAV's full-size
    conversion, then OpenCV's INTER_LINEAR to the detector's size."""
    full = av_frame.to_ndarray(format="rgb24")
    return cv2.resize(full, size, interpolation=cv2.INTER_LINEAR) if size else full


def assert_inputs_exact(path, sampled: bool | None) -> int:
    """Every frame's detector input (and full-size RGB) equals the reference, taking the sampled
    path or not as ``sampled`` says (None: either); return the number of frames."""
    n = 0
    with VideoReader(path) as r:
        det = ShotDetector(ShotConfig(), (r.info.width, r.info.height), r.frame_rate)
        rgb = RgbConverter()
        for f in r.frames():
            if sampled is not None:
                assert det.wants_rgb(f.av_frame) is not sampled
            want = reference_input(f.av_frame, det.size)
            assert np.array_equal(det.input(f.av_frame), want), f"frame {f.index}"
            assert np.array_equal(rgb(f.av_frame), f.av_frame.to_ndarray(format="rgb24"))
            n += 1
        assert det.input.exact
    return n


@pytest.mark.parametrize("name", media_files())
def test_detector_input_equals_scenedetect_on_real_clips(media, name):
    # 1280x720 (testvideo) takes the sampled path; 1920x1080, 1280x544 and 704x576 shrink by a
    # fraction and take the full-size path (a clip added later: either).
    known = {"testvideo.mp4": True, "counter.mp4": False, "goldeneye-vfr-drop3.mp4": False,
             "issue-195-aspect-ratio.mp4": False}
    assert assert_inputs_exact(media / name, known.get(name)) > 0


def yuv_video(path, size, pix_fmt, n=12, color_range=None, colorspace=None):
    """Noise frames (every pixel differs) plus a moving ramp: no chroma is flat."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = size[0], size[1], pix_fmt
        s.options = {"crf": "10"}
        if color_range is not None:
            s.codec_context.color_range = color_range
        if colorspace is not None:
            s.codec_context.colorspace = colorspace
        ramp = np.linspace(0, 255, size[0])[None, :, None]
        for i in range(n):
            img = rng.integers(0, 256, (size[1], size[0], 3)).astype(np.float64) * 0.5
            img += 0.5 * np.roll(ramp, 7 * i, axis=1) * np.array([1.0, 0.4, 0.8])
            frame = av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.mark.parametrize("size,pix_fmt,extra,sampled", [
    pytest.param((768, 432), "yuv420p", {}, True, id="768x432-f3"),
    pytest.param((1280, 720), "yuvj420p", {}, True, id="720p-full-range"),
    pytest.param((1280, 720), "yuv420p", {"colorspace": 1}, True, id="720p-bt709"),
    pytest.param((1024, 576), "yuv420p", {}, False, id="1024x576-even-factor"),
    pytest.param((1280, 720), "yuv444p", {}, False, id="720p-444"),
])
def test_detector_input_sampled_path_is_exact(tmp_path, size, pix_fmt, extra, sampled):
    yuv_video(tmp_path / "v.mp4", size, pix_fmt, **extra)
    assert assert_inputs_exact(tmp_path / "v.mp4", sampled) == 12


def test_detector_input_falls_back_when_the_sampled_path_disagrees(media):
    # A swscale that converted the small frame differently would be caught on the frames checked
    # and the video finished on the full-size path.
    with VideoReader(media / "testvideo.mp4") as r:
        inp = DetectorInput((r.info.width, r.info.height), (256, 144))
        real = inp._sampled
        inp._sampled = lambda fr: real(fr) ^ 1
        for f, _ in zip(r.frames(), range(5)):
            assert np.array_equal(inp(f.av_frame), reference_input(f.av_frame, (256, 144)))
        assert not inp.exact and not inp.takes_sampled(f.av_frame)


def test_min_shot_len_in_seconds_and_threshold(tmp_path):
    write_video(tmp_path / "v.mp4", [Shot(20, 0), Shot(12, 2), Shot(25, 4)], size=(128, 72),
                fps=25)
    cuts, times = detect_with_vtx(tmp_path / "v.mp4", ShotConfig(min_shot_len="1.0s"))
    expected = scenedetect_cut_times(tmp_path / "v.mp4", ContentDetector(min_scene_len="1.0s"))
    assert [times[c] for c in cuts] == pytest.approx(expected)
    # A threshold above every cut score finds no cut at all.
    assert detect_with_vtx(tmp_path / "v.mp4", ShotConfig(threshold=255.0))[0] == []


def test_bad_shot_options_are_usage_errors():
    with pytest.raises(UsageError, match="valid"):
        ShotConfig(detector="nope")
    with pytest.raises(UsageError, match="min-shot-len"):
        ShotConfig(min_shot_len="abc")
    with pytest.raises(UsageError, match="max-shot-len"):
        ShotConfig(max_shot_len=0)


@pytest.mark.parametrize("start,end,t0,t1,max_len,expected", [
    pytest.param(0, 100, 0.0, 4.0, None, [(0, 100)], id="off"),
    pytest.param(0, 100, 0.0, 4.0, 5.0, [(0, 100)], id="short-enough"),
    pytest.param(0, 100, 0.0, 4.0, 2.0, [(0, 50), (50, 100)], id="two"),
    pytest.param(10, 110, 1.0, 5.0, 1.5, [(10, 43), (43, 77), (77, 110)], id="three"),
])
def test_split_shot(start, end, t0, t1, max_len, expected):
    assert split_shot(start, end, t0, t1, max_len) == expected


def test_shot_buffer_exact_when_short_and_bounded_when_long():
    buf = ShotBuffer(capacity=40, lookback=8)
    for i in range(30):
        buf.add(i, i / 10, {"x": np.full(1, i)})
    targets = np.linspace(0, 29, 12).round().astype(int)
    assert [buf.index[p] for p in buf.nearest(targets, 30)] == targets.tolist()
    for i in range(30, 5000):
        buf.add(i, i / 10, {"x": np.full(1, i)})
        assert len(buf.index) <= 40
    targets = np.linspace(0, 4999, 12).round().astype(int)
    got = np.array([buf.index[p] for p in buf.nearest(targets, 5000)])
    spacing = np.diff(buf.index[:-8]).max()
    assert np.abs(got - targets).max() <= spacing // 2 + 1
    assert buf.index[0] == 0  # the shot's first frame is always kept
    buf.release(4990)
    assert buf.index[0] >= 4990 and buf.time_of(4995) == pytest.approx(499.5)


def test_shot_buffer_reduces_a_held_frame_only_for_the_models_that_sample_it():
    calls = []

    def reduce(frame, rgb, keys):
        calls.append((frame, None if keys is None else sorted(keys)))
        return {k: np.full(1, frame) for k in (keys or ("a", "b"))}

    buf = ShotBuffer(capacity=40, lookback=8, reduce=reduce, lazy_bytes=100)
    for i in range(5):
        buf.add_lazy(i, i / 10, i, nbytes=10)
    assert buf.get(2, {"a"}) == {"a": np.full(1, 2)} and calls == [(2, ["a"])]
    assert buf.get(2, {"a", "b"})["b"] == 2 and calls[-1] == (2, ["b"])  # only the missing
    assert buf.get(2, {"a", "b"}).keys() == {"a", "b"} and len(calls) == 2
    assert buf.reduced == 1 and buf.lazy == 50  # still held as decoded until released
    assert buf.get(3).keys() == {"a", "b"} and calls[-1] == (3, None)  # all: no longer held
    assert buf.reduced == 2 and buf.lazy == 40
    buf.add_lazy(5, 0.5, 5, nbytes=70)  # over the budget: reduced at once, for every model
    assert calls[-1] == (5, None) and buf.lazy == 40


def test_shot_buffer_lets_go_the_oldest_frames_for_the_keys_still_wanted():
    calls = []

    def reduce(frame, rgb, keys):
        calls.append((frame, None if keys is None else sorted(keys)))
        return {k: np.full(1, frame) for k in (keys or ("a", "b"))}

    def wanted(index, newest, gap):  # "b" (a centre model) can no longer sample frames < 2
        return {"a"} if index < 2 else None

    buf = ShotBuffer(capacity=40, lookback=8, reduce=reduce, lazy_bytes=50, wanted=wanted)
    for i in range(5):
        buf.add_lazy(i, i / 10, i, nbytes=10)
    assert not calls and buf.lazy == 50
    buf.add_lazy(5, 0.5, 5, nbytes=15)  # 15 over: frames 0 and 1 go, reduced for "a" only
    assert calls == [(0, ["a"]), (1, ["a"])] and buf.let_go == 2 and buf.lazy == 45
    buf.add_lazy(6, 0.6, 6, nbytes=10)  # frame 2 is still wanted by every key: 6 is reduced
    assert calls[-1] == (6, None) and buf.let_go == 2 and buf.lazy == 45
    assert buf.get(0, {"a"}) == {"a": np.full(1, 0)}
    with pytest.raises(RuntimeError, match="internal error: frame 1 was let go without"):
        buf.get(1, {"a", "b"})  # never silently without the input a shot asks for


def test_shot_config_json_is_stable():
    a = json.loads(ShotConfig().to_json())
    assert a == {"detector": "content", "threshold": 27.0, "min_shot_len": "15",
                 "max_shot_len": None}
    assert ShotConfig(threshold=27.0).to_json() == ShotConfig().to_json()

