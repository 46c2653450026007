"""Synthetic labelled "trailers" for ``vtx demo``: where a temporal head must beat mean pooling.

STAN (the shot-token transformer with positional embeddings) should win over mean pooling
on labels that depend on the *order* of shots. This module designs a multi-label data set of
:mod:`vtx.io.synth` videos with two bag-of-shots labels and one order label:

=====================  =============================================================
``has_city``           some shot shows scene :data:`CITY` (visual, per shot)
``fast_motion``        some shot's object moves >= :data:`FAST_SPEED` px/frame (motion)
``chase_before_crash`` a shot of scene :data:`CHASE` comes before a shot of scene
                       :data:`CRASH` (order-dependent)
=====================  =============================================================

Every video holds exactly one :data:`CHASE` shot and one :data:`CRASH` shot, and videos come
in *twins*: two videos with the same shots (and the same render seed) except that the chase
and crash shots swap places. A twin pair has one positive and one negative
``chase_before_crash``, so the label is exactly balanced and is no function of the bag of
shots: a permutation-invariant head (mean pooling) gives both twins the same score, while
an order-aware head can tell them apart. Twins always share a split.

The cues are deliberately strong, because the offline demo extracts features with randomly
initialised backbones: the scenes are distinct backgrounds, slow objects move by at most
0.5 px/frame and fast ones by 4-5 px/frame, and adjacent shots never share a scene (so every
designed shot is a hard cut that shot detection finds). The two bag labels follow a cycle of
the three non-empty combinations of (city, fast), so each is positive in about 2/3 of the
videos and every video has a label besides the order one.

Shots play tones (the videos have sound, as trailers do) but no label depends on them: the
demo's features (``resnet18``, ``r2plus1d``) carry no audio, and a label that no head can see
is only memorised video by video, which measurably delays learning the order label (an
earlier version had a ``high_tone`` label; see docs/BENCHMARKS.md, "vtx demo").

Videos are short (3 or 4 shots of 15 to 18 frames) because extraction costs one R(2+1)D clip
per shot: for the same time, more and shorter videos give the order label more training pairs
and val/test splits large enough (20 % each by default) to select and measure on.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path

import numpy as np

from vtx.io.synth import N_SCENES, Shot, write_video

CHASE, CITY, CRASH = 0, 2, 5
"""Scene ids with a meaning; the others are filler."""
FILLER_SCENES = tuple(s for s in range(N_SCENES) if s not in (CHASE, CITY, CRASH))
FAST_SPEED = 4.0
"""A shot whose object moves at least this many pixels per frame is fast."""
LABELS = ["has_city", "fast_motion", "chase_before_crash"]
"""The label vocabulary, in the order :func:`labels_of` lists a video's labels."""

SPLITS = ("train", "val", "test")
HELD_OUT_PREFIX = "heldout_"
"""Names of the extra test videos that :func:`design_dataset` adds for ``vtx predict``."""

_FAST_SPEEDS = (4.0, 5.0)
_SLOW_MOTIONS = ((0.0, 0.0), (0.5, 0.0), (-0.5, 0.0), (0.0, 0.5), (0.0, -0.5))
_TONES = (None, 220.0, 330.0, 440.0, 660.0, 1500.0, 2000.0, 3000.0)  # sound only, no label
_BAG_COMBOS = [c for c in product((False, True), repeat=2) if any(c)]  # (city, fast)
_MANIFEST = "demo_videos.json"


@dataclass
class DemoVideo:
    """One designed video.

    Attributes:
        name: File stem; the video is written as ``<name>.mp4``.
        shots: The shots, in order.
        labels: Its labels, a subset of :data:`LABELS` in that order; never empty.
        split: ``train``, ``val`` or ``test``.
        seed: Render seed (object texture, background grain); twins share it.
    """

    name: str
    shots: list[Shot]
    labels: list[str]
    split: str
    seed: int = 0


def labels_of(shots: list[Shot]) -> list[str]:
    """The labels that the rules in the module docstring give a list of shots."""
    scenes = [s.scene % N_SCENES for s in shots]
    chase_at = [i for i, s in enumerate(scenes) if s == CHASE]
    crash_at = [i for i, s in enumerate(scenes) if s == CRASH]
    has = {
        "has_city": CITY in scenes,
        "fast_motion": any(math.hypot(*s.motion) >= FAST_SPEED for s in shots),
        "chase_before_crash": bool(chase_at and crash_at and min(chase_at) < max(crash_at)),
    }
    return [name for name in LABELS if has[name]]


def design_dataset(n_videos: int, seed: int = 0, shots_per_video: tuple[int, int] = (3, 4),
                   frames_per_shot: tuple[int, int] = (15, 18), held_out: int = 1,
                   eval_frac: float = 0.2) -> list[DemoVideo]:
    """Design ``n_videos`` labelled videos split into train, val and test (``eval_frac`` of
    them in each of val and test), plus ``held_out`` extra test videos.

    Deterministic given the arguments. Twin pairs (see the module docstring) are split
    together, and the split is redrawn until each of train, val and test holds a positive
    and a negative of every label.

    Args:
        n_videos: Videos in the train/val/test pool; at least 24, so that val and test
            each get two twin pairs or more.
        seed: Seeds every choice.
        shots_per_video: Inclusive range of shots per video; the low end is at least 3
            (chase, crash and one shot for the bag labels).
        frames_per_shot: Inclusive range of frames per shot; at least 15 so that shot
            detection (ContentDetector's default ``min_scene_len``) keeps every shot.
        held_out: Extra videos named ``heldout_NN``, split ``test``, for ``vtx predict``.
        eval_frac: Share of the videos in val, and in test (at least 4 videos each); between
            0.05 and 0.4.

    Raises:
        ValueError: a range or count is out of bounds, or no split satisfies the above.
    """
    lo, hi = shots_per_video
    if not 3 <= lo <= hi:
        raise ValueError(f"shots_per_video must be an inclusive range (lo, hi) with "
                         f"3 <= lo <= hi; got {shots_per_video}")
    if not 15 <= frames_per_shot[0] <= frames_per_shot[1]:
        raise ValueError(f"frames_per_shot must be an inclusive range (lo, hi) with "
                         f"15 <= lo <= hi (shorter shots merge in shot detection); "
                         f"got {frames_per_shot}")
    if n_videos < 24:
        raise ValueError(f"n_videos={n_videos} is too small to give val and test both classes "
                         f"of every label; use at least 24")
    if held_out < 0:
        raise ValueError(f"held_out must be >= 0; got {held_out}")
    if not 0.05 <= eval_frac <= 0.4:
        raise ValueError(f"eval_frac must be between 0.05 and 0.4; got {eval_frac}")
    rng = np.random.default_rng(seed)
    n_units = (n_videos + 1) // 2
    combos = _balanced_combos(rng, n_units)
    units = [_twins(rng, combo, shots_per_video, frames_per_shot) for combo in combos]
    if n_videos % 2:                      # the last unit keeps one twin, chosen at random
        units[-1] = [units[-1][rng.integers(2)]]
    splits = _assign_splits(rng, units, eval_frac)

    videos = []
    for unit, split in zip(units, splits):
        for shots, unit_seed in unit:
            name = f"trailer_{len(videos):03d}"
            videos.append(DemoVideo(name, shots, labels_of(shots), split, unit_seed))
    extra = [_twins(rng, combo, shots_per_video, frames_per_shot)
             for combo in _balanced_combos(rng, (held_out + 1) // 2)]
    if held_out % 2:
        extra[-1] = [extra[-1][rng.integers(2)]]
    for i, (shots, unit_seed) in enumerate(twin for unit in extra for twin in unit):
        videos.append(DemoVideo(f"{HELD_OUT_PREFIX}{i:02d}", shots, labels_of(shots), "test",
                                unit_seed))
    return videos


def _balanced_combos(rng: np.random.Generator, n: int) -> list[tuple[bool, bool]]:
    """``n`` (city, fast) combinations cycling through a shuffle of the 3 non-empty ones."""
    combos = []
    while len(combos) < n:
        combos += [_BAG_COMBOS[i] for i in rng.permutation(len(_BAG_COMBOS))]
    return combos[:n]


def _twins(rng: np.random.Generator, combo: tuple[bool, bool],
           shots_per_video: tuple[int, int],
           frames_per_shot: tuple[int, int]) -> list[tuple[list[Shot], int]]:
    """Two (shots, seed): chase before crash, then the same shots with those two swapped."""
    city, fast = combo
    k = int(rng.integers(shots_per_video[0], shots_per_video[1] + 1))
    slots = [int(i) for i in rng.permutation(k)]
    i_chase, i_crash = sorted(slots[:2])
    scenes: list[int | None] = [None] * k
    scenes[i_chase], scenes[i_crash] = CHASE, CRASH
    if city:
        scenes[slots[2]] = CITY
    for i in range(k):                    # fillers never repeat their left neighbour
        if scenes[i] is None:
            left = scenes[i - 1] if i else None
            scenes[i] = int(rng.choice([s for s in FILLER_SCENES if s != left]))

    motions = [_SLOW_MOTIONS[rng.integers(len(_SLOW_MOTIONS))] for _ in range(k)]
    if fast:
        for i in rng.choice(k, size=int(rng.integers(1, 3)), replace=False):
            motions[i] = (float(rng.choice((-1.0, 1.0)) * rng.choice(_FAST_SPEEDS)), 0.0)
    tones = [_TONES[rng.integers(len(_TONES))] for _ in range(k)]

    frames = rng.integers(frames_per_shot[0], frames_per_shot[1] + 1, size=k)
    shots = [Shot(int(n), s, m, t) for n, s, m, t in zip(frames, scenes, motions, tones)]
    swapped = list(shots)
    swapped[i_chase], swapped[i_crash] = shots[i_crash], shots[i_chase]
    unit_seed = int(rng.integers(2**31))
    return [(shots, unit_seed), (swapped, unit_seed)]


def _assign_splits(rng: np.random.Generator, units: list[list[tuple[list[Shot], int]]],
                   eval_frac: float, tries: int = 1000) -> list[str]:
    """A split per unit, ``eval_frac`` of the videos in each of val and test, with both classes
    of every label in each split."""
    sizes = [len(u) for u in units]
    total = sum(sizes)
    held = max(4, round(eval_frac * total))   # videos in each of val and test
    unit_labels = [[set(labels_of(shots)) for shots, _ in u] for u in units]
    for _ in range(tries):
        order = rng.permutation(len(units))
        splits = [""] * len(units)
        counts = dict.fromkeys(SPLITS, 0)
        for i in order:                   # fill test, then val, then train
            target = next((s for s in ("test", "val")
                           if counts[s] + sizes[i] <= held), "train")
            splits[i] = target
            counts[target] += sizes[i]
        if all(_has_both_classes([lab for labs, s in zip(unit_labels, splits) if s == split
                                  for lab in labs]) for split in SPLITS):
            return splits
    raise ValueError(f"found no split of {total} videos with both classes of every label in "
                     f"train, val and test; design more videos")


def _has_both_classes(label_sets: list[set[str]]) -> bool:
    return all(any(n in s for s in label_sets) and any(n not in s for s in label_sets)
               for n in LABELS)


def write_dataset(folder: Path, videos: list[DemoVideo], size: tuple[int, int] = (112, 64),
                  fps: float = 25, labels: list[str] | tuple[str, ...] | None = None) -> Path:
    """Write the videos as ``<folder>/<name>.mp4`` (with audio) and ``<folder>/labels.csv``.

    A video whose file and recorded design (shots, size, fps, seed, in
    ``<folder>/demo_videos.json``) are unchanged is not written again; videos that file
    records but ``videos`` lacks (an earlier, larger design) are deleted. The CSV has the
    columns ``video,labels,split`` that :func:`vtx.train.labels.load_labels` reads.

    Args:
        labels: The labels the CSV keeps [default: all of :data:`LABELS`]; a video left with
            none gets an empty field (no class applies).

    Returns:
        The path of ``labels.csv``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / _MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    wanted = {f"{v.name}.mp4" for v in videos}
    for stale in [name for name in manifest if name not in wanted]:  # of an earlier design
        (folder / stale).unlink(missing_ok=True)
        del manifest[stale]
    for video in videos:
        if not video.labels:
            raise ValueError(f"video {video.name} has no labels, which a vtx label CSV cannot "
                             "hold; give it at least one")
        path = folder / f"{video.name}.mp4"
        design = {"shots": [asdict(s) for s in video.shots], "size": list(size),
                  "fps": str(fps), "seed": video.seed}
        design = json.loads(json.dumps(design))          # tuples -> lists, as read back
        known = manifest.get(path.name)
        if (known and known["design"] == design and path.exists()
                and path.stat().st_size == known["bytes"]):
            continue
        write_video(path, video.shots, size=size, fps=fps, audio=True, seed=video.seed)
        manifest[path.name] = {"design": design, "bytes": path.stat().st_size}
        manifest_path.write_text(json.dumps(manifest, indent=1))
    manifest_path.write_text(json.dumps(manifest, indent=1))

    keep = LABELS if labels is None else list(labels)
    unknown = sorted(set(keep) - set(LABELS))
    if unknown:
        raise ValueError(f"unknown demo labels {unknown}; the labels are {LABELS}")
    csv_path = folder / "labels.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "labels", "split"])
        for video in videos:
            writer.writerow([f"{video.name}.mp4",
                             "|".join(n for n in video.labels if n in keep), video.split])
    return csv_path
