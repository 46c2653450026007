"""Damaged caches (vtx/io/check.py, the reader's and the writer's errors): the three kinds of damage
of the adversarial probe (bytes overwritten in the root-attribute area, on a dataset header, in
feature data) give a clear error from every command, `vtx check` lists the damaged videos, and
`vtx check --repair` removes them so that the next extract recomputes only those."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import copy_cache
from test_cache import assert_same_arrays
from vtx.cli.main import cli
from vtx.errors import CacheDamaged
from vtx.io.cache import CacheLock, CacheWriter
from vtx.io.check import check_cache
from vtx.io.reader import CacheReader
from vtx.io.synth import Shot, write_video
from vtx.pipeline.extract import ExtractConfig, extract

ROOT = Path(__file__).resolve().parents[1]
EXTRACT = ["--features", "all", "--weights", "random", "--batch-size", "2", "--no-progress",
           "--precision", "fp32"]  # recomputed videos are compared to 1e-3


def vtx(*args: str):
    """``vtx ARGS`` in this process: exit code, stdout and stderr (a traceback would show up as
    an exception other than SystemExit)."""
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    return r


def datasets(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path) as f:
        return {f"{k}/{n}": g[n][()] for k, g in f["videos"].items() for n in g}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict:
    """Three tiny videos, their cache (--features all --weights random), labels and a trained
    meanpool run."""
    root = tmp_path_factory.mktemp("pristine")
    videos = root / "videos"
    videos.mkdir()
    for i in range(3):
        write_video(videos / f"v{i}.mp4", [Shot(12, i), Shot(12, i + 3, (1, 0))],
                    size=(64, 48), fps=25, seed=i)
    cache = root / "feats.h5"
    extract(ExtractConfig(videos=videos, out=cache, features="all", weights="random",
                          batch_size=2, progress=False, device="cpu", precision="fp32"))
    labels = root / "labels.csv"
    labels.write_text("video,labels,split\nv0.mp4,a,train\nv1.mp4,b,train\nv2.mp4,a|b,test\n")
    run = root / "run"
    r = vtx("train-head", "meanpool", "--features", cache, "--labels", labels, "--out", run,
            "--epochs", "1", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    return {"videos": videos, "cache": cache, "labels": labels, "run": run}


def overwrite(path: Path, offset: int, n: int = 16) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        old = fh.read(n)
        fh.seek(offset)
        fh.write(bytes(b ^ 0xA5 for b in old))


def damage(path: Path, kind: str) -> None:
    """Overwrite bytes of the cache at ``path`` where the probe did."""
    if kind == "root":  # the global heap collection holding the root attrs' strings
        data = path.read_bytes()
        for m in re.finditer(b"GCOL", data):
            trial = path.with_name("trial.h5")
            shutil.copyfile(path, trial)
            overwrite(trial, m.start(), 4)
            with h5py.File(trial) as f:
                try:
                    f.attrs["features"]
                except OSError:
                    os.replace(trial, path)
                    return
        raise AssertionError("no global heap holds the root attrs")
    with h5py.File(path) as f:
        ds = f["videos"]["v0.mp4"]["resnet18"]
        header = h5py.h5o.get_info(ds.id).addr
        chunk = ds.id.get_chunk_info(0).byte_offset
        link = f["videos"].get("v0.mp4", getlink=True)
    if isinstance(link, h5py.ExternalLink):  # the index layout: the data is in the part
        path = path.parent / link.filename
    if kind == "header":
        overwrite(path, header)
    else:  # feature data: 8 bytes inside the first chunk
        overwrite(path, chunk + 16, 8)


@pytest.mark.parametrize("kind", ["root", "header", "data"])
def test_damage_gives_clear_errors_check_lists_it_and_repair_recomputes_only_it(
        kind, pristine, tmp_path):
    bad = copy_cache(pristine["cache"], tmp_path / "feats.h5")
    damage(bad, kind)

    # every command: a one-paragraph error naming the file (and the video and dataset), no
    # traceback; extract reads no feature data (nor, in the index layout, the parts of the
    # videos it skips: their records are in the index), so damaged data does not stop it
    extract_args = ["extract", "--videos", pristine["videos"], "--out", bad, *EXTRACT]
    r = vtx(*extract_args)
    if kind != "root":
        assert r.exit_code == 0, r.stderr
    else:
        assert r.exit_code == 6, r.stderr
        assert r.stderr.startswith(f"vtx: error: feature cache {bad} is damaged")
        assert f"vtx check {bad} --repair" in r.stderr
    commands = {
        "train-head": ["train-head", "meanpool", "--features", bad, "--labels",
                       pristine["labels"], "--out", tmp_path / "run", "--epochs", "1",
                       "--device", "cpu"],
        "evaluate": ["evaluate", pristine["run"], "--features", bad, "--labels",
                     pristine["labels"], "--split", "all", "--device", "cpu"],
    }
    for name, args in commands.items():
        r = vtx(*args)
        assert r.exit_code == 6, (name, r.stdout, r.stderr)
        assert f"feature cache {bad} is damaged" in r.stderr and "vtx check" in r.stderr, name
        if kind == "root":
            assert "root attribute" in r.stderr
        else:
            assert "video 'v0.mp4', dataset 'resnet18'" in r.stderr, (name, r.stderr)
        if kind == "data":
            assert "checksum mismatch" in r.stderr
    assert not (tmp_path / "run" / "last.pt").exists()
    if "info" in cli.commands:  # reads structure and attrs, no feature data
        r = vtx("info", bad)
        assert r.exit_code == (0 if kind == "data" else 6), r.stderr
        if kind != "data":
            assert f"feature cache {bad} is damaged" in r.stderr

    # vtx check lists the damage
    r = vtx("check", bad, "--json", "--no-progress")
    assert r.exit_code == 6, r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] is False and report["checksums"] == "all"
    if kind == "root":
        assert "features" in report["root"]
    else:
        assert [(v["path"], [p["dataset"] for p in v["problems"]]) for v in report["damaged"]] \
            == [("v0.mp4", ["resnet18"])]
        assert report["root"] == {}
    damaged = {v["key"] for v in report["damaged"]}
    r = vtx("check", bad, "--quiet")
    assert r.exit_code == 6 and "--repair" in r.stdout
    assert ("DAMAGED video 'v0.mp4': dataset 'resnet18'" in r.stdout) == (kind != "root")

    # --repair removes the damaged videos (and rebuilds the root attrs); the rest is kept
    r = vtx("check", bad, "--repair", "--json", "--no-progress")
    assert r.exit_code == 0, r.stderr
    repaired = json.loads(r.stdout)
    assert repaired["repaired"] and set(repaired["removed"]) == damaged
    assert ("features" in repaired["rebuilt"]) == (kind == "root")
    assert check_cache(bad, progress=False).ok
    before = datasets(pristine["cache"])
    kept = datasets(bad)
    assert {k.split("/")[0] for k in kept} == {"v0.mp4", "v1.mp4", "v2.mp4"} - damaged
    for k, v in kept.items():
        assert np.array_equal(v, before[k]), k

    # the next extract recomputes only what was removed
    r = vtx(*extract_args, "--json")
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert (summary["done"], summary["skipped"]) == (len(damaged), 3 - len(damaged))
    after = datasets(bad)
    assert after.keys() == before.keys()
    for k in after:
        assert_same_arrays(after[k], before[k], k)
    with h5py.File(bad) as a, h5py.File(pristine["cache"]) as b:
        assert dict(a.attrs) == dict(b.attrs)  # rebuilt root attrs equal the originals


def test_reader_reports_the_dataset_of_a_checksum_mismatch(pristine, tmp_path):
    bad = copy_cache(pristine["cache"], tmp_path / "feats.h5")
    damage(bad, "data")
    with CacheReader(bad) as r:
        assert r.read("v1.mp4", "resnet18").shape[1:] == (512,)  # other videos read
        with pytest.raises(CacheDamaged, match="checksum mismatch") as e:
            r.read("v0.mp4", "resnet18")
        assert (e.value.key, e.value.dataset) == ("v0.mp4", "resnet18")
        with pytest.raises(KeyError, match="no dataset 'nope'"):  # absent is not damaged
            r.read("v0.mp4", "nope")


def test_old_caches_without_checksums_read_and_check_says_so():
    old = ROOT / "tests" / "data" / "prev_version" / "feats.h5"
    r = vtx("check", old, "--json", "--no-progress")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] and report["checksums"] == "none" and report["with_checksums"] == 0
    assert report["videos"] == 4 and report["bytes_read"] > 0
    r = vtx("check", old, "--no-progress")
    assert "carries no checksums" in r.stdout and r.stdout.rstrip().endswith("no damage found")


def test_a_file_that_is_not_hdf5_cannot_be_repaired(tmp_path):
    bad = tmp_path / "feats.h5"
    bad.write_bytes(b"\x89HDF\r\n" + os.urandom(4096))
    r = vtx("check", bad, "--no-progress")
    assert r.exit_code == 6 and "UNREADABLE" in r.stdout
    r = vtx("check", bad, "--repair", "--no-progress")
    assert r.exit_code == 6 and "cannot be repaired" in r.stderr and "--overwrite" in r.stderr
    r = vtx("check", tmp_path / "missing.h5")
    assert r.exit_code == 2 and "does not exist" in r.stderr


def test_repair_waits_for_no_writer_and_keeps_the_cache_when_the_disk_is_full(
        pristine, tmp_path, monkeypatch):
    bad = copy_cache(pristine["cache"], tmp_path / "feats.h5")
    damage(bad, "header")
    before = bad.read_bytes()
    with CacheLock(bad):  # a merge (or compact) in progress
        r = vtx("check", bad, "--repair", "--no-progress")
        assert r.exit_code == 4 and "being merged" in r.stderr

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "posix_fallocate", full)
    r = vtx("check", bad, "--repair", "--no-progress")
    assert r.exit_code == 5, r.stderr
    assert "no space left" in r.stderr and "needs about" in r.stderr and str(tmp_path) in r.stderr
    assert bad.read_bytes() == before
    assert not list(tmp_path.glob("*.repair-tmp"))


@pytest.mark.parametrize("err,code,text", [
    (errno.ENOSPC, 5, "no space left on the device writing"),
    (errno.EROFS, 2, "cannot write"),
])
def test_a_full_or_read_only_disk_met_anywhere_is_an_error_not_a_traceback(
        pristine, tmp_path, monkeypatch, err, code, text):
    """Writes outside vtx's own checks (here evaluate's predictions CSV) get the same errors."""
    target = tmp_path / "preds.csv"

    def failing_write(path, *a, **k):
        raise OSError(err, os.strerror(err), str(path))
    monkeypatch.setattr("vtx.train.evaluate.write_predictions", failing_write)
    r = vtx("evaluate", pristine["run"], "--features", pristine["cache"], "--labels",
            pristine["labels"], "--split", "all", "--device", "cpu", "--predictions-out", target)
    assert r.exit_code == code, r.stderr
    assert r.stderr.startswith("vtx: error: " + text) and str(target) in r.stderr


def test_repair_rebuilds_root_attrs_as_extract_writes_them(tmp_path):
    """Root attrs rebuilt from the videos equal what extract wrote, --gop-normalise included."""
    from vtx.features import FEATURES
    from vtx.io.schema import RunSchema
    from vtx.pipeline.codec import codec_attrs
    from vtx.pipeline.sampling import FrameSampling
    from vtx.pipeline.shots import ShotConfig

    shots, frames = ShotConfig(max_shot_len=4.0), FrameSampling(frames_per_video=8)
    run = RunSchema(shot_config=shots.to_json(), frame_sampling=frames.describe(),
                    frame_config=frames.to_json())
    motion = codec_attrs(FEATURES["motion"], frames.describe(), True, {"motion_grid": 4},
                         view="crop=224/256")
    features = {"motion": FEATURES["motion"].identity(gop=True, view="crop=224/256"),
                "resnet18": "random"}
    out = tmp_path / "feats.h5"
    with CacheWriter(out) as w:
        w.write_video("a.mp4", {"path": "a.mp4"}, {
            "shots": (np.array([[0, 5]]), run.shot_attrs()),
            "frames": (np.array([2]), run.frame_attrs()),
            "motion": (np.zeros((1, 2, 4, 4), np.float32), motion),
            "resnet18": (np.zeros((1, 512), np.float16), {"model": "resnet18",
                                                          "weights": "random"}),
        }, replace=True)
    with CacheWriter(out) as w:  # a later merge: the root strings go to a heap of their own
        w.set_root_attrs(shot_config=shots.to_json(), frame_config=frames.to_json(),
                         features=json.dumps(features, sort_keys=True))
    with h5py.File(out) as f:
        original = dict(f.attrs)
        assert "+gop-normalised" in original["features"]
    damage(out, "root")
    r = vtx("check", out, "--repair", "--json", "--no-progress")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["removed"] == []
    with h5py.File(out) as f:
        assert dict(f.attrs) == original
