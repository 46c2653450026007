"""Tests for vtx.train.demo_data: the demo's labels follow their rules and need shot order."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import replace

import av
import pytest

from vtx.train import demo_data
from vtx.train.demo_data import CHASE, CITY, CRASH, LABELS, design_dataset, write_dataset
from vtx.train.labels import load_labels

N = 64


@pytest.fixture(scope="module")
def videos():
    return design_dataset(N, seed=0)


def expected_labels(shots):
    """The label rules, written out independently of the module."""
    out = []
    if any(s.scene == 2 for s in shots):
        out.append("has_city")
    if any(abs(complex(*s.motion)) >= 4 for s in shots):
        out.append("fast_motion")
    scenes = [s.scene for s in shots]
    if any(a == 0 and b == 5 for i, a in enumerate(scenes) for b in scenes[i + 1:]):
        out.append("chase_before_crash")
    return out


def has_both(video):
    scenes = {s.scene for s in video.shots}
    return CHASE in scenes and CRASH in scenes


def bag(video):
    """The video as an unordered multiset of shots: all that a mean-pool head sees."""
    return tuple(sorted(Counter(repr(s) for s in video.shots).items()))


def test_scene_constants_match_the_rules():
    assert (CHASE, CITY, CRASH) == (0, 2, 5)
    assert LABELS == ["has_city", "fast_motion", "chase_before_crash"]


def test_labels_follow_the_rules(videos):
    assert len(videos) == N + 1
    for v in videos:
        assert v.labels == expected_labels(v.shots), v.name
        assert v.labels, f"{v.name} has an empty label set, which the CSV cannot hold"


def test_shot_sizes_and_cuts(videos):
    for v in videos:
        assert 3 <= len(v.shots) <= 4
        assert all(15 <= s.n_frames <= 18 for s in v.shots)
        scenes = [s.scene for s in v.shots]
        assert all(a != b for a, b in zip(scenes, scenes[1:])), f"{v.name}: no cut between shots"
        speeds = [math.hypot(*s.motion) for s in v.shots]
        assert all(x <= 0.5 or x >= 4 for x in speeds), "motion cues must be far apart"


@pytest.mark.parametrize("label", LABELS)
def test_every_label_is_balanced_in_every_split(videos, label):
    share = sum(label in v.labels for v in videos) / len(videos)
    assert 0.3 <= share <= 0.7, f"{label}: {share:.0%} positive"
    for split in ("train", "val", "test"):
        got = {label in v.labels for v in videos if v.split == split}
        assert got == {True, False}, f"{label} has one class only in {split}"


def test_order_label_is_balanced_among_videos_with_chase_and_crash(videos):
    both = [v for v in videos if has_both(v)]
    assert len(both) >= len(videos) // 2
    share = sum("chase_before_crash" in v.labels for v in both) / len(both)
    assert 0.4 <= share <= 0.6, share


def test_order_label_is_not_a_function_of_the_bag_of_shots(videos):
    by_bag = defaultdict(set)
    for v in videos:
        by_bag[bag(v)].add("chase_before_crash" in v.labels)
    # Every positive shares its exact multiset of shots with a negative (its twin), so
    # a permutation-invariant head cannot beat chance on the order label.
    ambiguous = [v for v in videos if has_both(v) and by_bag[bag(v)] == {True, False}]
    assert len(ambiguous) >= 0.9 * sum(has_both(v) for v in videos)
    a, b = (v for v in videos if bag(v) == bag(ambiguous[0]))
    assert sorted(s.scene for s in a.shots) == sorted(s.scene for s in b.shots)
    assert ("chase_before_crash" in a.labels) != ("chase_before_crash" in b.labels)
    assert a.seed == b.seed and a.split == b.split
    # The other labels are functions of the bag: twins agree on them.
    assert set(a.labels) - {"chase_before_crash"} == set(b.labels) - {"chase_before_crash"}


def test_splits_and_held_out(videos):
    counts = Counter(v.split for v in videos if not v.name.startswith("heldout_"))
    assert counts["train"] + counts["val"] + counts["test"] == N
    assert 0.5 <= counts["train"] / N <= 0.7
    assert 0.15 <= counts["val"] / N <= 0.25 and 0.15 <= counts["test"] / N <= 0.25
    held = [v for v in videos if v.name.startswith("heldout_")]
    assert [v.name for v in held] == ["heldout_00"] and held[0].split == "test"
    assert len({v.name for v in design_dataset(24, held_out=3)}) == 27
    odd = design_dataset(25, held_out=0)
    assert len(odd) == 25 and all(v.labels == expected_labels(v.shots) for v in odd)


def test_deterministic_given_the_seed(videos):
    assert design_dataset(N, seed=0) == videos
    assert design_dataset(N, seed=1) != videos


@pytest.mark.parametrize("kwargs", [
    pytest.param({"n_videos": 20}, id="too-few-videos"),
    pytest.param({"n_videos": 24, "shots_per_video": (2, 4)}, id="too-few-shots"),
    pytest.param({"n_videos": 24, "frames_per_shot": (8, 12)}, id="shots-too-short"),
    pytest.param({"n_videos": 24, "eval_frac": 0.5}, id="eval-frac-too-large"),
])
def test_rejects_bad_designs(kwargs):
    with pytest.raises(ValueError):
        design_dataset(**kwargs)


def test_csv_loads_as_multilabel_with_the_vocab_and_splits(videos, tmp_path, monkeypatch):
    written = []
    monkeypatch.setattr(demo_data, "write_video",
                        lambda path, *a, **k: (written.append(path), path.write_bytes(b"x")))
    csv_path = write_dataset(tmp_path, videos)
    assert len(written) == len(videos)
    labels = load_labels(csv_path)
    assert labels.task == "multilabel"
    assert labels.vocab == sorted(LABELS)
    assert load_labels(csv_path, vocab=LABELS).vocab == LABELS
    assert labels.targets == {f"{v.name}.mp4": tuple(sorted(v.labels)) for v in videos}
    assert labels.splits == {f"{v.name}.mp4": v.split for v in videos}


def test_written_videos_decode_and_are_not_rewritten(videos, tmp_path):
    pair = [v for v in videos if v.name in ("trailer_000", "trailer_001")]
    write_dataset(tmp_path, pair)
    for v in pair:
        with av.open(str(tmp_path / f"{v.name}.mp4")) as container:
            assert container.streams.video[0].width == 112
            assert len(container.streams.audio) == 1
            n = sum(1 for _ in container.decode(video=0))
        assert n == sum(s.n_frames for s in v.shots)
    before = {v.name: (tmp_path / f"{v.name}.mp4").stat().st_mtime_ns for v in pair}
    changed = replace(pair[1], shots=pair[1].shots[:-1])
    write_dataset(tmp_path, [pair[0], changed])
    after = {v.name: (tmp_path / f"{v.name}.mp4").stat().st_mtime_ns for v in pair}
    assert after[pair[0].name] == before[pair[0].name], "an unchanged video was rewritten"
    assert after[pair[1].name] != before[pair[1].name], "a changed video was not rewritten"


def test_eval_frac_sizes_val_and_test():
    videos = design_dataset(100, eval_frac=0.3, held_out=0)
    counts = Counter(v.split for v in videos)
    assert 26 <= counts["val"] <= 32 and 26 <= counts["test"] <= 32


def test_label_subset_and_stale_videos(videos, tmp_path, monkeypatch):
    """write_dataset keeps only the labels asked for (an empty field when none is left) and
    deletes the videos of an earlier, larger design that it wrote itself."""
    monkeypatch.setattr(demo_data, "write_video",
                        lambda path, *a, **k: path.write_bytes(b"x"))
    write_dataset(tmp_path, videos)
    (tmp_path / "mine.mp4").write_bytes(b"not the demo's")
    csv_path = write_dataset(tmp_path, videos[:30], labels=["chase_before_crash"])
    assert sorted(p.name for p in tmp_path.glob("*.mp4")) == sorted(
        [f"{v.name}.mp4" for v in videos[:30]] + ["mine.mp4"])
    rows = csv_path.read_text().splitlines()[1:]
    assert len(rows) == 30
    for v, row in zip(videos[:30], rows):
        field = row.split(",")[1]
        assert field == ("chase_before_crash" if "chase_before_crash" in v.labels else "")
    with pytest.raises(ValueError, match="unknown demo labels"):
        write_dataset(tmp_path, videos[:2], labels=["high_tone"])
