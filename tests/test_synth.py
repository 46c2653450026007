"""Tests for vtx.io.synth: the synthetic videos match the ground truth they report."""

from __future__ import annotations

import itertools
import os

import av
import cv2
import numpy as np
import pytest
from av.video.frame import PictureType
from scenedetect import ContentDetector, detect

from vtx.io.synth import (
    BAD_INPUTS,
    CORRUPT_MIDDLE,
    N_SCENES,
    Shot,
    object_sprite,
    scene_background,
    write_bad_inputs,
    write_video,
)

FOUR_SHOTS = [
    Shot(30, scene=0, motion=(2.0, 1.0), tone_hz=440.0),
    Shot(25, scene=1, motion=(-1.5, 0.5)),
    Shot(20, scene=2, motion=(3.0, -1.0), tone_hz=1000.0),
    Shot(25, scene=5, motion=(0.25, 0.0), tone_hz=2500.0),
]


def decode_frames(path):
    """All decoded video frames of ``path``."""
    with av.open(str(path)) as container:
        return list(container.decode(video=0))


def scene_starts(path):
    """(frame number, seconds) of every detected scene start after the first."""
    scenes = detect(str(path), ContentDetector(), backend="pyav")
    return [(start.frame_num, start.seconds) for start, _ in scenes[1:]]


def hsv_distance(rgb_a, rgb_b):
    """ContentDetector's default score: mean |delta| over H, S and V."""
    hsv_a = cv2.cvtColor(rgb_a, cv2.COLOR_RGB2HSV).astype(float)
    hsv_b = cv2.cvtColor(rgb_b, cv2.COLOR_RGB2HSV).astype(float)
    return np.abs(hsv_a - hsv_b).mean()


def test_frame_count_pts_and_size(tmp_path):
    path = tmp_path / "cfr.mp4"
    truth = write_video(path, FOUR_SHOTS, size=(128, 72), fps=25)
    frames = decode_frames(path)
    assert truth["n_frames"] == len(frames) == 100
    times = [float(f.pts * f.time_base) for f in frames]
    np.testing.assert_allclose(times, truth["frame_times"], atol=1e-9)
    np.testing.assert_allclose(np.diff(times), 1 / 25, atol=1e-9)
    assert truth["cut_frames"] == [30, 55, 75]
    assert truth["cut_times"] == pytest.approx([1.2, 2.2, 3.0])
    assert {(f.width, f.height) for f in frames} == {(128, 72)}
    assert truth["size"] == (128, 72)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="160x96-default-bframes"),
        pytest.param({"size": (96, 64), "bframes": 0, "gop": 12}, id="96x64-p-only"),
        pytest.param({"size": (99, 61), "fps": 30}, id="99x61-odd-444"),
    ],
)
def test_scenedetect_finds_exactly_the_cuts(tmp_path, kwargs):
    path = tmp_path / "cuts.mp4"
    truth = write_video(path, FOUR_SHOTS, **kwargs)
    found = scene_starts(path)
    assert [frame for frame, _ in found] == truth["cut_frames"]
    assert [seconds for _, seconds in found] == pytest.approx(truth["cut_times"], abs=1e-6)


@pytest.mark.parametrize("motion", [(4.0, 3.0), (-0.37, 0.21), (8.0, 0.0)])
def test_no_false_cut_inside_a_moving_shot(tmp_path, motion):
    path = tmp_path / "one_shot.mp4"
    write_video(path, [Shot(60, scene=4, motion=motion)])
    assert detect(str(path), ContentDetector(), backend="pyav") == []


def test_every_pair_of_scenes_is_a_strong_cut():
    backgrounds = [scene_background(i, (160, 96)) for i in range(N_SCENES)]
    for a, b in itertools.combinations(range(N_SCENES), 2):
        # ContentDetector's default threshold is 27; keep a wide margin.
        assert hsv_distance(backgrounds[a], backgrounds[b]) > 40, (a, b)
    assert np.array_equal(scene_background(N_SCENES + 2, (160, 96)), backgrounds[2])


@pytest.mark.parametrize("motion", [(2.0, 1.0), (1.5, -0.5)])
def test_object_follows_position_formula(tmp_path, motion):
    path = tmp_path / "motion.mp4"
    size = (160, 96)
    truth = write_video(path, [Shot(25, scene=1, motion=motion)], size=size, crf=10, seed=3)
    frames = decode_frames(path)
    shot = truth["shots"][0]
    template = object_sprite(size, seed=3)[1:-1, 1:-1, :3].astype(np.float32)  # (h, w, 3)
    assert template.shape[1::-1] == shot["object_size"]
    for t in (0, 12, 24):
        image = frames[t].to_ndarray(format="rgb24").astype(np.float32)
        scores = cv2.matchTemplate(image, template, cv2.TM_SQDIFF)
        _, _, best, _ = cv2.minMaxLoc(scores)  # best = (x, y) of the top-left corner
        x0, y0 = shot["object_start"]
        expected = (x0 + t * motion[0], y0 + t * motion[1])
        assert abs(best[0] - expected[0]) <= 0.51 and abs(best[1] - expected[1]) <= 0.51, (t, best)


def test_subpixel_motion_moves_the_object_centroid_exactly():
    from vtx.io.synth import render_frame

    size = (96, 64)
    background = np.zeros((size[1], size[0], 3), np.uint8)
    sprite = object_sprite(size, seed=0)
    sprite[..., :3] = 255.0 * sprite[..., 3:4]  # flat white rectangle
    ys, xs = np.mgrid[0 : size[1], 0 : size[0]]

    def centroid(top_left):
        mass = render_frame(background, sprite, top_left)[..., 0].astype(float)
        return (mass * xs).sum() / mass.sum(), (mass * ys).sum() / mass.sum()

    c0 = centroid((30.0, 20.0))
    c1 = centroid((30.0 + 0.37, 20.0 - 0.21))
    # warpAffine resamples in 1/32 px steps; rounding to uint8 adds a little more.
    assert c1[0] - c0[0] == pytest.approx(0.37, abs=0.04)
    assert c1[1] - c0[1] == pytest.approx(-0.21, abs=0.04)


def test_vfr_drop_gives_uneven_pts_and_shifted_cuts(tmp_path):
    path = tmp_path / "vfr.mp4"
    shots = [Shot(30, 0, (1.0, 0.0)), Shot(30, 1, (0.0, 1.0)), Shot(30, 2)]
    # 30 and 31 are the first frames of shot 2: its cut moves to CFR frame 32.
    drop = {3, 4, 5, 30, 31, 50, 51, 52, 53}
    truth = write_video(path, shots, vfr_drop=drop, bframes=2, gop=12)
    assert truth["n_frames"] == 90 - len(drop)
    assert truth["cut_frames"] == [30 - 3, 60 - 3 - 6]
    assert truth["cut_times"] == pytest.approx([32 / 25, 60 / 25])

    frames = decode_frames(path)
    assert len(frames) == truth["n_frames"]
    times = np.array([float(f.pts * f.time_base) for f in frames])
    np.testing.assert_allclose(times, truth["frame_times"], atol=1e-9)
    kept = [i for i in range(90) if i not in drop]
    np.testing.assert_allclose(times, np.array(kept) / 25, atol=1e-9)
    assert len(set(np.round(np.diff(times), 6))) > 1  # not evenly spaced
    assert frames[0].time_base.denominator >= 25_000  # fine time base

    found = scene_starts(path)
    assert [seconds for _, seconds in found] == pytest.approx(truth["cut_times"], abs=1e-6)


def test_vfr_drop_of_a_whole_shot_is_refused(tmp_path):
    with pytest.raises(ValueError, match="every frame"):
        write_video(tmp_path / "x.mp4", [Shot(15), Shot(15, 1)], vfr_drop=set(range(15, 30)))


def _spectrum_peak(samples, sample_rate):
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return np.fft.rfftfreq(len(samples), 1 / sample_rate)[spectrum.argmax()]


@pytest.mark.parametrize("sample_rate,channels", [(48000, 2), (44100, 1)])
def test_audio_track_carries_each_shots_tone(tmp_path, sample_rate, channels):
    path = tmp_path / "audio.mp4"
    truth = write_video(
        path, FOUR_SHOTS, audio=True, sample_rate=sample_rate, audio_channels=channels
    )
    with av.open(str(path)) as container:
        (stream,) = container.streams.audio
        assert stream.codec_context.name == "aac"
        assert stream.rate == sample_rate
        assert stream.channels == channels
        samples = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)
    assert samples.shape[0] == channels
    mono = samples[0]  # (n,)
    for shot, info in zip(FOUR_SHOTS, truth["shots"]):
        # Skip 0.1 s at each end: AAC smears the tone switch over a frame or two.
        a = round((info["start_time"] + 0.1) * sample_rate)
        b = round((info["end_time"] - 0.1) * sample_rate)
        segment = mono[a:b]
        rms = np.sqrt(np.mean(segment**2))
        if shot.tone_hz is None:
            assert rms < 1e-3
        else:
            assert rms > 0.1
            bin_hz = sample_rate / len(segment)
            assert abs(_spectrum_peak(segment, sample_rate) - shot.tone_hz) <= bin_hz


def test_no_audio_stream_by_default(tmp_path):
    path = tmp_path / "silent.mp4"
    write_video(path, [Shot(5)])
    with av.open(str(path)) as container:
        assert len(container.streams.audio) == 0
        assert len(container.streams.video) == 1


@pytest.mark.parametrize(
    "size,pix_fmt",
    [
        pytest.param((98, 62), "yuv420p", id="98x62"),
        pytest.param((100, 58), "yuv420p", id="100x58"),
        pytest.param((130, 74), "yuv420p", id="130x74"),
        pytest.param((99, 61), "yuv444p", id="99x61"),
        pytest.param((64, 47), "yuv444p", id="64x47"),
    ],
)
def test_sizes_that_are_not_multiples_of_16_decode_at_that_size(tmp_path, size, pix_fmt):
    path = tmp_path / "odd.mp4"
    truth = write_video(path, [Shot(16), Shot(16, 3, (1.0, 1.0))], size=size)
    assert truth["pix_fmt"] == pix_fmt
    frames = decode_frames(path)
    assert len(frames) == 32
    assert {(f.width, f.height, f.format.name) for f in frames} == {(*size, pix_fmt)}
    assert frames[0].to_ndarray(format="rgb24").shape == (size[1], size[0], 3)


def test_odd_size_with_420_is_refused_with_a_fix(tmp_path):
    with pytest.raises(ValueError, match="yuv444p"):
        write_video(tmp_path / "x.mp4", [Shot(2)], size=(99, 61), pix_fmt="yuv420p")


@pytest.mark.parametrize("rotation,reported", [(None, 0), (90, 90), (270, -90)])
def test_rotation_metadata_is_reported_on_decode(tmp_path, rotation, reported):
    path = tmp_path / "rot.mp4"
    write_video(path, [Shot(3)], size=(64, 48), rotation=rotation)
    frame = decode_frames(path)[0]
    assert frame.rotation == reported
    assert (frame.width, frame.height) == (64, 48)  # pixels are not rotated


@pytest.mark.parametrize(
    "gop,bframes",
    [
        pytest.param(1000, 0, id="p-only"),
        pytest.param(5, 0, id="gop5"),
        pytest.param(30, 2, id="bframes"),
    ],
)
def test_gop_and_bframes_reach_the_encoder(tmp_path, gop, bframes):
    path = tmp_path / "gop.mp4"
    write_video(path, [Shot(40, 0, (1.0, 0.0))], gop=gop, bframes=bframes)
    types = [f.pict_type for f in decode_frames(path)]
    assert types[0] == PictureType.I
    assert (PictureType.B in types) == (bframes > 0)
    key_positions = [i for i, t in enumerate(types) if t == PictureType.I]
    if gop >= 40:
        assert key_positions == [0]
    else:
        assert max(np.diff(key_positions + [len(types)])) <= gop


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    shots = FOUR_SHOTS[:2]
    paths = [tmp_path / f"{name}.mp4" for name in ("a", "b", "c")]
    write_video(paths[0], shots, audio=True, seed=7)
    write_video(paths[1], shots, audio=True, seed=7)
    write_video(paths[2], shots, audio=True, seed=8)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    return folder, write_bad_inputs(folder)


def test_bad_inputs_are_all_written(bad_inputs):
    folder, described = bad_inputs
    assert set(described) == set(BAD_INPUTS) == {
        "empty.mp4", "text.mp4", "truncated.mp4", "audio_only.mp4", "unreadable.mp4",
        "corrupt_middle.mp4",
    }
    assert all(os.path.lexists(folder / name) for name in described)
    assert (folder / "empty.mp4").stat().st_size == 0


@pytest.mark.parametrize("name", ["empty.mp4", "text.mp4", "truncated.mp4"])
def test_garbage_files_fail_to_open(bad_inputs, name):
    folder, _ = bad_inputs
    assert (folder / name).is_file() and not (folder / name).is_symlink()
    with pytest.raises(av.error.InvalidDataError):
        av.open(str(folder / name))


def test_truncated_is_a_prefix_of_a_real_mp4(bad_inputs):
    folder, _ = bad_inputs
    data = (folder / "truncated.mp4").read_bytes()
    assert data[4:8] == b"ftyp" and b"mdat" in data and b"moov" not in data


def test_unreadable_fails_to_open_even_as_root(bad_inputs):
    folder, _ = bad_inputs
    path = folder / "unreadable.mp4"
    assert os.path.lexists(path) and not os.path.exists(path)
    with pytest.raises(FileNotFoundError):
        open(path, "rb")
    with pytest.raises(av.error.FileNotFoundError):
        av.open(str(path))


def test_audio_only_has_no_video_stream(bad_inputs):
    folder, _ = bad_inputs
    with av.open(str(folder / "audio_only.mp4")) as container:
        assert len(container.streams.video) == 0
        (stream,) = container.streams.audio
        assert stream.codec_context.name == "aac"
        samples = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)
    assert samples.shape[0] == 2 and samples.shape[1] >= 48000
    assert _spectrum_peak(samples[0, 4800:43200], 48000) == pytest.approx(440, abs=2)


def test_corrupt_middle_opens_and_decodes_most_frames(bad_inputs):
    folder, _ = bad_inputs
    decoded, failed, corrupt = [], [], []
    with av.open(str(folder / "corrupt_middle.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.frames == CORRUPT_MIDDLE["n_frames"]
        step = 1 / float(stream.guessed_rate)
        for packet in container.demux(stream):
            try:
                frames = stream.decode(packet)
            except av.error.InvalidDataError:
                failed.append(round(float(packet.pts * packet.time_base) / step))
                continue
            for frame in frames:
                index = round(frame.time / step)
                decoded.append(index)
                if frame.is_corrupt:
                    corrupt.append(index)
    assert failed == list(CORRUPT_MIDDLE["lost"])
    assert corrupt == list(CORRUPT_MIDDLE["corrupt"])
    assert sorted(decoded) == [i for i in range(100) if i not in CORRUPT_MIDDLE["lost"]]


def test_corrupt_middle_stops_a_naive_decode_loop(bad_inputs):
    folder, _ = bad_inputs
    count = 0
    with av.open(str(folder / "corrupt_middle.mp4")) as container:
        with pytest.raises(av.error.InvalidDataError):
            for _ in container.decode(video=0):
                count += 1
    assert count == CORRUPT_MIDDLE["lost"][0]


def test_dropping_the_first_frame_keeps_its_pts_gap(tmp_path):
    path = tmp_path / "late_start.mp4"
    truth = write_video(path, [Shot(20), Shot(20, 1)], vfr_drop={0, 1}, bframes=2)
    times = [float(f.pts * f.time_base) for f in decode_frames(path)]
    assert times[0] == pytest.approx(2 / 25) == truth["frame_times"][0]
    assert truth["cut_frames"] == [18] and truth["cut_times"] == pytest.approx([20 / 25])
    # PySceneDetect rebases on the stream start time.
    assert [s for _, s in scene_starts(path)] == pytest.approx([18 / 25])


@pytest.mark.parametrize(
    "shots,drop",
    [
        pytest.param([], None, id="no-shots"),
        pytest.param([Shot(0)], None, id="empty-shot"),
        pytest.param([Shot(10)], {10}, id="drop-outside"),
    ],
)
def test_invalid_arguments_are_refused(tmp_path, shots, drop):
    with pytest.raises(ValueError):
        write_video(tmp_path / "x.mp4", shots, vfr_drop=drop)
