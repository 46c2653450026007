"""No pixels where none are needed: adding audio features to cached videos decodes no frame."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from vtx.io import audio as audio_io
from vtx.io import decode as decode_mod
from vtx.io.synth import Shot, write_video
from vtx.pipeline.extract import ExtractConfig, extract


def run(videos, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("device", "cpu")
    kw.setdefault("weights", "random")
    return extract(ExtractConfig(videos=videos, out=out, **kw))


@pytest.fixture(scope="module")
def av_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("av_only")
    write_video(d / "sound.mp4", [Shot(30, 0, (2, 0), tone_hz=440.0),
                                  Shot(35, 3, (0, 1), tone_hz=2000.0)],
                size=(128, 96), fps=25, audio=True)
    write_video(d / "silent.mp4", [Shot(30, 2, (1, 1)), Shot(20, 5)], size=(96, 64), fps=25)
    return d


def resampled(reader_call) -> np.ndarray:
    """The 16 kHz mono samples of every audio frame ``reader_call(on_audio)`` passes."""
    resample = audio_io.AudioResampler()
    chunks = []
    reader_call(lambda frame: chunks.append(resample(frame)))
    return np.concatenate(chunks)


def test_audio_alone_gives_the_same_samples(av_dir):
    path = av_dir / "sound.mp4"
    with decode_mod.VideoReader(path) as r:
        both = resampled(lambda on_audio: [None for _ in r.frames(on_audio=on_audio)])
        assert r.info.n_frames == 65
    with decode_mod.VideoReader(path) as r:
        alone = resampled(r.audio)
        assert r.info.n_frames == 0  # no video frame was decoded
    assert len(alone) > 16000 * 2
    np.testing.assert_array_equal(alone, both)
    with decode_mod.VideoReader(av_dir / "silent.mp4") as r:  # no audio: only the final None
        got = []
        r.audio(got.append)
        assert got == [None]


def test_adding_vggish_to_cached_videos_decodes_no_frame(av_dir, tmp_path, monkeypatch):
    out = tmp_path / "feats.h5"
    s = run(av_dir, out, features=("resnet18",))
    assert (s.done, s.failed) == (2, 0)
    with h5py.File(out) as f:
        before = {k: (dict(f["videos"][k].attrs), f["videos"][k]["shots"][()])
                  for k in f["videos"]}
    # a reference: both features from scratch, in one pass
    ref = tmp_path / "ref.h5"
    run(av_dir, ref, features=("resnet18", "vggish"))

    decoded = []
    real_frames = decode_mod.VideoReader.frames

    def counting_frames(self, *a, **k):
        for frame in real_frames(self, *a, **k):
            decoded.append(frame.index)
            yield frame

    monkeypatch.setattr(decode_mod.VideoReader, "frames", counting_frames)
    s = run(av_dir, out, features=("resnet18", "vggish"))
    assert (s.done, s.skipped, s.failed) == (2, 0, 0)
    assert decoded == []  # the audio stream alone was decoded
    assert s.shots == sum(len(shots) for _, shots in before.values())
    assert s.video_seconds == pytest.approx(sum(float(a["duration_s"])
                                                for a, _ in before.values()), abs=0.1)
    with h5py.File(out) as f, h5py.File(ref) as r:
        for key, (attrs, shots) in before.items():
            g, want = f["videos"][key], r["videos"][key]
            np.testing.assert_array_equal(g["shots"][()], shots)
            for name in ("n_frames", "duration_s", "rotation", "resized_frames", "width",
                         "height", "decode_errors", "corrupt_frames"):
                assert g.attrs[name] == attrs[name], name  # the frame counts were kept
            assert g.attrs["has_audio"] == want.attrs["has_audio"]
            np.testing.assert_array_equal(g["vggish_times"][()], want["vggish_times"][()])
            for name in ("vggish", "resnet18"):  # float16, batches of other compositions
                np.testing.assert_allclose(g[name][()].astype(np.float32),
                                           want[name][()].astype(np.float32),
                                           rtol=2e-3, atol=2e-3)
        assert f["videos"]["sound.mp4"]["vggish"].shape == (2, 128)
        assert f["videos"]["silent.mp4"]["vggish"].shape == (0, 128)
        assert not f["videos"]["silent.mp4"].attrs["has_audio"]


def test_first_audio_only_run_still_finds_the_shots(av_dir, tmp_path):
    """Without cached shots the frames are decoded for the shot detector only; the shots are
    the same as a run with image features."""
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    run(av_dir, a, features=("vggish",))
    run(av_dir, b, features=("resnet18",))
    with h5py.File(a) as fa, h5py.File(b) as fb:
        for key in fb["videos"]:
            np.testing.assert_array_equal(fa["videos"][key]["shots"][()],
                                          fb["videos"][key]["shots"][()])
            assert len(fa["videos"][key]["shots"]) == 2
            assert fa["videos"][key].attrs["n_frames"] == fb["videos"][key].attrs["n_frames"]


def test_audio_only_run_does_not_import_torchvision(av_dir, tmp_path):
    # A run that needs no image model skips importing torchvision (about 1 s of torch._dynamo
    # at start-up): a first vggish run (shots found on the way) and vggish added to cached shots.
    import subprocess
    import sys

    code = ("import sys\nfrom vtx.cli.main import cli\n"
            "try:\n    cli(sys.argv[1:], standalone_mode=False)\n"
            "finally:\n    print('torchvision imported:', 'torchvision' in sys.modules)")

    def imports_torchvision(out, features) -> bool:
        r = subprocess.run([sys.executable, "-c", code, "extract", "--videos", str(av_dir),
                            "--out", str(out), "--features", features, "--weights", "random",
                            "--quiet", "--no-progress"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return {"torchvision imported: True": True,
                "torchvision imported: False": False}[r.stdout.strip().splitlines()[-1]]

    assert not imports_torchvision(tmp_path / "a.h5", "vggish")
    assert imports_torchvision(tmp_path / "a.h5", "resnet18")  # an image model needs it
    run(av_dir, tmp_path / "b.h5", features=("resnet18",))
    assert not imports_torchvision(tmp_path / "b.h5", "vggish")
    with h5py.File(tmp_path / "b.h5") as f:
        assert "vggish" in f["videos"]["sound.mp4"] and "resnet18" in f["videos"]["sound.mp4"]
