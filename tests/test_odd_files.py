"""A corpus of odd but valid video files through `vtx extract --features all`.

The corpus is generated with PyAV (encoders the machine lacks are skipped): VP9/WebM with Opus,
AV1, HEVC/MKV, MJPEG/AVI, ProRes/MOV; 10-bit, interlaced, 321x241, 16x16, a single frame; a
resolution change mid-stream, two video streams, 5.1 audio, audio longer than the video, a start
on a non-keyframe; unicode, a space and ``%`` in names. Every file is a few frames of a tiny
size, so one extraction (random weights) stays quick. Each must be extracted, none may fail, and
its attrs must say what the file is: the codec's name (``av1``, never the decoder ``libdav1d``),
its size, its frame count and whether it has audio.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import h5py
import numpy as np
import pytest

from vtx.features import ALL_FEATURES, FEATURES
from vtx.io.cache import video_key
from vtx.pipeline.extract import ExtractConfig, extract

FPS = 25


def _rgb(n: int, size: tuple[int, int], seed: int) -> list[np.ndarray]:
    """``n`` frames of a textured background with a square moving right (RGB uint8)."""
    w, h = size
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    frames = []
    for t in range(n):
        img = base.copy()
        s = max(2, min(w, h) // 4)
        x = (2 * t) % max(1, w - s)
        img[h // 2 - s // 2: h // 2 - s // 2 + s, x: x + s] = (250, 40, 40)
        frames.append(img)
    return frames


def _add_video(container, codec: str, size, pix_fmt: str, options: dict | None = None):
    stream = container.add_stream(codec, rate=FPS)
    stream.width, stream.height = size
    stream.pix_fmt = pix_fmt
    stream.codec_context.time_base = Fraction(1, FPS)
    opts = {"threads": "1"} if codec in ("libx264", "libx265") else {}
    if codec == "libx265":
        opts["x265-params"] = "log-level=error"
    stream.options = {**opts, **(options or {})}
    return stream


def _encode_video(container, stream, frames, first_pts: int = 0) -> None:
    for i, rgb in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = first_pts + i
        frame.time_base = Fraction(1, FPS)
        for packet in stream.encode(frame):
            container.mux(packet)


def _flush(container, *streams) -> None:
    for stream in streams:
        for packet in stream.encode(None):
            container.mux(packet)


def _add_audio(container, codec: str, layout: str, rate: int = 48000):
    stream = container.add_stream(codec, rate=rate, layout=layout)
    stream.time_base = Fraction(1, rate)
    return stream


def _encode_audio(container, stream, seconds: float) -> None:
    """A 440 Hz tone on every channel, fed in 1024-sample frames (PyAV re-frames and converts
    them to what the encoder takes)."""
    rate, layout = stream.rate, stream.layout.name
    channels = len(stream.layout.channels)
    total = int(seconds * rate)
    for start in range(0, total, 1024):
        n = min(1024, total - start)
        t = (np.arange(start, start + n) / rate).astype(np.float32)
        tone = 0.3 * np.sin(2 * np.pi * 440 * t, dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(np.repeat(tone[None], channels, 0), format="fltp",
                                           layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
        for packet in stream.encode(frame):
            container.mux(packet)


def _simple(path: Path, codec="libx264", size=(64, 48), n=10, pix_fmt="yuv420p",
            options=None, audio=None, audio_seconds=0.0, fmt=None) -> None:
    with av.open(str(path), "w", format=fmt) as c:
        v = _add_video(c, codec, size, pix_fmt, options)
        a = _add_audio(c, *audio) if audio else None
        _encode_video(c, v, _rgb(n, size, seed=len(path.name)))
        if a is not None:
            _encode_audio(c, a, audio_seconds)
        _flush(c, v, *([a] if a is not None else []))


def _resolution_change(path: Path) -> None:
    """Two MPEG-TS segments (64x48, then 96x64, timestamps continuing) joined byte for byte, as
    `cat a.ts b.ts` makes them: one H.264 stream whose size changes mid-stream."""
    parts = []
    for i, (size, first) in enumerate((((64, 48), 0), ((96, 64), 10))):
        part = path.with_name(f".part{i}.ts")
        with av.open(str(part), "w") as c:  # no B-frames: both segments start at their PTS
            v = _add_video(c, "libx264", size, "yuv420p", {"bf": "0"})
            _encode_video(c, v, _rgb(10, size, seed=i), first_pts=first)
            _flush(c, v)
        parts.append(part)
    path.write_bytes(b"".join(p.read_bytes() for p in parts))
    for p in parts:
        p.unlink()


def _two_video_streams(path: Path) -> None:
    with av.open(str(path), "w") as c:
        first = _add_video(c, "libx264", (64, 48), "yuv420p")
        second = _add_video(c, "libx264", (32, 32), "yuv420p")
        _encode_video(c, first, _rgb(10, (64, 48), 1))
        _encode_video(c, second, _rgb(10, (32, 32), 2))
        _flush(c, first, second)


def _non_keyframe_start(path: Path) -> None:
    """20 frames, GOP 5, no B-frames, remuxed without its first two packets: the file starts on
    a P-frame whose reference is missing."""
    full = path.with_name(".full.mp4")
    _simple(full, n=20, options={"g": "5", "bf": "0", "keyint_min": "5", "sc_threshold": "0"})
    with av.open(str(full)) as src, av.open(str(path), "w") as dst:
        s = src.streams.video[0]
        out = dst.add_stream_from_template(s)
        for i, packet in enumerate(p for p in src.demux(s) if p.dts is not None):
            if i < 2:
                assert packet.is_keyframe if i == 0 else not packet.is_keyframe
                continue
            packet.stream = out
            dst.mux(packet)
    full.unlink()


# name -> (encoders needed, writer, expected attrs: codec, width, height, n_frames, has_audio)
CORPUS = {
    "vp9_opus.webm": (("libvpx-vp9", "libopus"), lambda p: _simple(
        p, "libvpx-vp9", options={"deadline": "realtime", "cpu-used": "8"},
        audio=("libopus", "stereo"), audio_seconds=1.2), ("vp9", 64, 48, 10, True)),
    "av1.mp4": (("libsvtav1",), lambda p: _simple(
        p, "libsvtav1", size=(64, 64), options={"preset": "12"}), ("av1", 64, 64, 10, False)),
    "hevc.mkv": (("libx265",), lambda p: _simple(p, "libx265"), ("hevc", 64, 48, 10, False)),
    "mjpeg.avi": (("mjpeg",), lambda p: _simple(p, "mjpeg", pix_fmt="yuvj420p"),
                  ("mjpeg", 64, 48, 10, False)),
    "prores.mov": (("prores_ks",), lambda p: _simple(p, "prores_ks", pix_fmt="yuv422p10le"),
                   ("prores", 64, 48, 10, False)),
    "10bit.mp4": (("libx264",), lambda p: _simple(p, pix_fmt="yuv420p10le"),
                  ("h264", 64, 48, 10, False)),
    "interlaced.mp4": (("libx264",), lambda p: _simple(p, options={"flags": "+ildct+ilme"}),
                       ("h264", 64, 48, 10, False)),
    "odd_321x241.mp4": (("libx264",), lambda p: _simple(p, size=(321, 241), pix_fmt="yuv444p"),
                        ("h264", 321, 241, 10, False)),
    "tiny_16x16.mp4": (("libx264",), lambda p: _simple(p, size=(16, 16)),
                       ("h264", 16, 16, 10, False)),
    "one_frame.mp4": (("libx264",), lambda p: _simple(p, n=1), ("h264", 64, 48, 1, False)),
    "resolution_change.ts": (("libx264",), _resolution_change, ("h264", 64, 48, 20, False)),
    "two_video_streams.mkv": (("libx264",), _two_video_streams, ("h264", 64, 48, 10, False)),
    "surround_5.1.mp4": (("libx264", "aac"), lambda p: _simple(
        p, n=30, audio=("aac", "5.1"), audio_seconds=1.2), ("h264", 64, 48, 30, True)),
    "audio_longer.mp4": (("libx264", "aac"), lambda p: _simple(
        p, audio=("aac", "stereo"), audio_seconds=2.5), ("h264", 64, 48, 10, True)),
    "non_keyframe_start.mp4": (("libx264",), _non_keyframe_start, ("h264", 64, 48, None, False)),
    "ünïcödé 東京.mp4": (("libx264",), lambda p: _simple(p), ("h264", 64, 48, 10, False)),
    "with space.mp4": (("libx264",), lambda p: _simple(p), ("h264", 64, 48, 10, False)),
    "100% sure.mp4": (("libx264",), lambda p: _simple(p), ("h264", 64, 48, 10, False)),
}


def write_corpus(folder: Path) -> dict[str, tuple]:
    """Write the corpus files whose encoders PyAV has; returns name -> expected attrs."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, (encoders, write, expected) in CORPUS.items():
        if not all(e in av.codecs_available for e in encoders):
            continue
        write(folder / name)
        written[name] = expected
    return written


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict, object]:
    root = tmp_path_factory.mktemp("odd")
    truth = write_corpus(root / "videos")
    if len(truth) < 10:
        pytest.skip(f"PyAV lacks most encoders (wrote only {sorted(truth)})")
    summary = extract(ExtractConfig(videos=root / "videos", out=root / "feats.h5",
                                    features="all", weights="random", batch_size=8,
                                    progress=False, device="cpu"))
    return root / "feats.h5", truth, summary


def test_every_odd_file_is_extracted_with_every_feature(corpus):
    cache, truth, summary = corpus
    assert summary.failures == [] and summary.done == len(truth)
    names = [d.name for s in (FEATURES[f] for f in ALL_FEATURES) for d in s.datasets]
    with h5py.File(cache) as f:
        assert sorted(f["videos"]) == sorted(video_key(n) for n in truth)
        assert len(f["failures"]) == 0
        for name in truth:
            g = f["videos"][video_key(name)]
            assert g.attrs["path"] == name
            assert set(names) <= set(g), (name, set(names) - set(g))
            n_shots, n_frames = len(g["shots"]), len(g["frames"])
            assert n_shots >= 1 and n_frames >= 1, name
            for ds in names:
                x = g[ds][()]
                if x.dtype.kind == "f":
                    assert np.isfinite(x).all(), (name, ds)
                level = g[ds].attrs.get("level")
                if level == "shot":
                    assert len(x) == n_shots, (name, ds)
                elif level == "frame":
                    assert len(x) == n_frames, (name, ds)


@pytest.mark.parametrize("name", list(CORPUS))
def test_odd_file_attrs_say_what_the_file_is(corpus, name):
    cache, truth, _ = corpus
    if name not in truth:
        pytest.skip(f"PyAV on this machine lacks an encoder of {name}: {CORPUS[name][0]}")
    codec, width, height, n_frames, has_audio = truth[name]
    with h5py.File(cache) as f:
        a = f["videos"][video_key(name)].attrs
        g = f["videos"][video_key(name)]
        assert a["codec"] == codec  # the codec, never the decoder library (libdav1d)
        assert (a["width"], a["height"]) == (width, height)
        if n_frames is not None:
            assert a["n_frames"] == n_frames
        else:  # starts on a P-frame: the frames before the next keyframe may be dropped
            assert 1 <= a["n_frames"] <= 18
        assert bool(a["has_audio"]) == has_audio
        if has_audio:  # audio of 1.2 s or more gives at least one 0.96 s example
            assert len(g["vggish"]) >= 1 and len(g["vggish_times"]) == len(g["vggish"])
        if name == "audio_longer.mp4":  # examples stop where the audio does, not the video
            assert len(g["vggish"]) == 2
        # the 96x64 half of the resolution change is scaled to the 64x48 it starts with
        assert a["resized_frames"] == (10 if name == "resolution_change.ts" else 0)
