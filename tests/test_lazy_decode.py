"""A lighter decode thread: frames are reduced to model inputs only when a shot samples them.

The shot buffer holds decoded frames and reduces only the sampled ones (``ShotBuffer.get``);
``lazy_bytes=0`` reduces every frame on arrival, as vtx did before. The model inputs must be
identical, bit for bit, whatever the budget.
"""

from __future__ import annotations

import numpy as np
import pytest

from vtx.features import FEATURES, weights_member
from vtx.io.synth import Shot, write_video
from vtx.pipeline import shots as shots_mod
from vtx.pipeline.backbones import FramePrep, ThumbnailPrep
from vtx.pipeline.producer import DirectItem, ModelItem, VideoDone, VideoJob, VideoProducer
from vtx.pipeline.shots import ShotConfig

SPECS = (FEATURES["resnet18"], FEATURES["r2plus1d"])


def three_shots(tmp_path_factory, name: str, lengths: tuple[int, int, int]):
    """A 112x64 video of three shots of ``lengths`` frames."""
    path = tmp_path_factory.mktemp(name) / f"{name}.mp4"
    (n1, n2, n3) = lengths
    write_video(path, [Shot(n1, 0, (2, 0)), Shot(n2, 3, (1, 1)), Shot(n3, 5, (0, 2))],
                size=(112, 64), fps=25)
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """Three shots, the middle one longer than the buffer's capacity below (decimation)."""
    return three_shots(tmp_path_factory, "lazy", (20, 170, 26))


def preps() -> dict[str, FramePrep]:
    return {s.model_key: FramePrep(weights_member(s.builder, s.weights).transforms())
            for s in SPECS}


class CountingPrep:
    """A model's real FramePrep that counts the frames it reduces."""

    def __init__(self, prep):
        self.prep, self.calls = prep, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.prep(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.prep, name)


def produce(path, lazy_bytes: int, known_shots=None, thumbnails: bool = True,
            max_shot_len=None, counting: bool = False):
    """Every message of one producer run, and the producer (for its buffer's counters)."""
    msgs: list = []
    job = VideoJob(0, path, path.name, path.name, SPECS, replace=known_shots is None,
                   known_shots=known_shots)
    transforms = {k: CountingPrep(p) if counting else p for k, p in preps().items()}
    p = VideoProducer(job, transforms, ShotConfig(max_shot_len=max_shot_len), msgs.append,
                      thumbnail=ThumbnailPrep() if thumbnails else None, capacity=140,
                      lazy_bytes=lazy_bytes)
    p.run()
    return msgs, p


def inputs(msgs) -> dict:
    return {(m.model, m.index): m.data for m in msgs if isinstance(m, ModelItem)}


def thumbs(msgs) -> dict:
    return {m.index: m.data for m in msgs if isinstance(m, DirectItem)}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert isinstance(a[k], np.ndarray) or isinstance(a[k], dict)
        if isinstance(a[k], dict):
            assert_same(a[k], b[k])
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))


def test_lazy_reduction_gives_the_same_inputs_and_reduces_only_sampled_frames(video):
    eager, pe = produce(video, lazy_bytes=0)
    done = eager[-1]
    assert isinstance(done, VideoDone) and done.rows["shot"] == 3
    n_frames = done.attrs["n_frames"]
    assert pe.buffer.reduced == n_frames  # before: every frame, for every model
    frame_bytes = 112 * 64 * 3 // 2
    for budget in (shots_mod.LAZY_BYTES, 7 * frame_bytes):  # all held, or 7 held at a time
        lazy, pl = produce(video, lazy_bytes=budget)
        assert_same(inputs(lazy), inputs(eager))
        assert_same(thumbs(lazy), thumbs(eager))
        np.testing.assert_array_equal(lazy[-1].fixed["shots"], done.fixed["shots"])
        assert pl.buffer.lazy <= budget
        if budget == shots_mod.LAZY_BYTES:  # at most the centre frame and 12 clip frames a shot
            assert pl.buffer.reduced <= 3 * 13
        else:
            assert pl.buffer.reduced < n_frames


def test_resume_converts_no_frame_it_does_not_sample(video, monkeypatch):
    """With the shots known (resume) and no codec residuals, no frame needs its RGB array
    unless a shot samples it: the detector's replacement is never given one."""
    first, _ = produce(video, lazy_bytes=0, thumbnails=False)
    shots = first[-1].fixed["shots"]
    given = []
    real_push = shots_mod.KnownShots.push

    def push(self, index, pts, time_base, av_frame, rgb=None):
        given.append(rgb is not None)
        return real_push(self, index, pts, time_base, av_frame, rgb)

    monkeypatch.setattr(shots_mod.KnownShots, "push", push)
    resumed, p = produce(video, lazy_bytes=shots_mod.LAZY_BYTES, known_shots=shots,
                         thumbnails=False)
    assert given and not any(given)
    assert p.buffer.reduced <= 3 * 13
    assert_same(inputs(resumed), inputs(first))


@pytest.fixture(scope="module")
def long_shot_video(tmp_path_factory):
    """A 400-frame shot between two short ones: past a small budget, and past the capacity."""
    return three_shots(tmp_path_factory, "lazy_long", (30, 400, 40))


def produce_counting(path, lazy_bytes: int, known_shots=None, max_shot_len=None):
    """As :func:`produce`, with the frames each model's transform reduced, by model."""
    msgs, p = produce(path, lazy_bytes, known_shots, max_shot_len=max_shot_len, counting=True)
    return msgs, p, {k: c.calls for k, c in p.preps.items()}


@pytest.mark.parametrize("resume", [False, True])
def test_a_long_shot_past_the_budget_lets_its_first_frames_go_for_the_centre_model(
        long_shot_video, resume):
    # Past the budget, a long shot's first frames can no longer be its centre frame: they are
    # reduced for the clip model (R(2+1)D) only and let go, instead of the newest frame being
    # reduced for every model. The inputs stay the same, bit for bit.
    eager, _, eager_calls = produce_counting(long_shot_video, lazy_bytes=0)
    shots = eager[-1].fixed["shots"]
    assert len(shots) == 3 and shots[1, 1] - shots[1, 0] == 400
    known = shots if resume else None
    frame_bytes = 112 * 64 * 3 // 2
    for budget in (20, 60):  # frames held decoded
        lazy, p, calls = produce_counting(long_shot_video, lazy_bytes=budget * frame_bytes,
                                          known_shots=known)
        assert_same(inputs(lazy), inputs(eager))
        assert_same(thumbs(lazy), thumbs(eager))
        assert p.buffer.lazy <= budget * frame_bytes
        assert p.buffer.let_go >= 15, (budget, p.buffer.let_go)
        if resume:  # the centre is known: the frames well after it go as well
            assert p.buffer.let_go >= 100, (budget, p.buffer.let_go)
        resnet, r21d = (s.model_key for s in SPECS)
        n_frames = eager[-1].attrs["n_frames"]
        assert eager_calls[resnet] == eager_calls[r21d] == n_frames
        # R(2+1)D still reduces the frames let go; ResNet-18 (centre frame) fewer
        assert calls[resnet] <= calls[r21d] - 15, (budget, calls)


def test_split_shots_let_no_frame_go(long_shot_video):
    # with --max-shot-len any frame can be a part's centre frame: nothing is let go
    eager, _, _ = produce_counting(long_shot_video, lazy_bytes=0, max_shot_len=4.0)
    frame_bytes = 112 * 64 * 3 // 2
    lazy, p, _ = produce_counting(long_shot_video, lazy_bytes=20 * frame_bytes,
                                  max_shot_len=4.0)
    assert eager[-1].rows["shot"] > 3  # the 16 s shot was split
    assert p.buffer.let_go == 0
    assert_same(inputs(lazy), inputs(eager))
    assert_same(thumbs(lazy), thumbs(eager))


@pytest.fixture(scope="module")
def testvideo_eager(media):
    """The real 720p clip, and its producer's messages with every frame reduced on arrival."""
    path = media / "testvideo.mp4"
    return path, produce(path, lazy_bytes=0)[0]


@pytest.mark.parametrize("resume", [False, True])
def test_letting_go_keeps_the_inputs_of_a_real_clip(testvideo_eager, resume):
    # testvideo.mp4 (1280x720, shots of 150 to 326 frames) with 5 frames held decoded: most of
    # every shot's frames go through the let-go path; the inputs stay the same, bit for bit
    path, eager = testvideo_eager
    known = eager[-1].fixed["shots"] if resume else None
    lazy, p = produce(path, lazy_bytes=5 * 1280 * 720 * 3 // 2, known_shots=known)
    assert p.buffer.let_go >= (200 if resume else 10)
    assert_same(inputs(lazy), inputs(eager))
    assert_same(thumbs(lazy), thumbs(eager))
