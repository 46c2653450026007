"""The HDF5 cache: layout, resume, locking, crash safety (kill -9) and bad input."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from vtx import SCHEMA_VERSION, __version__
from conftest import copy_cache, mounted_tmpfs, vtx_env
from vtx.errors import CacheMismatch, ReadOnly
from vtx.features import FEATURES
from vtx.io import cache as cache_mod
from vtx.io.cache import CacheWriter, video_key
from vtx.io.index import part_time
from vtx.io.synth import Shot, write_bad_inputs, write_video
from vtx.pipeline import extract as extract_mod
from vtx.pipeline import producer as producer_mod
from vtx.pipeline.extract import ExtractConfig, extract
from vtx.pipeline.shots import ShotConfig

VTX = [sys.executable, "-m", "vtx.cli.main"]


def run(videos, out, **kw) -> extract_mod.ExtractSummary:
    kw.setdefault("progress", False)
    kw.setdefault("device", "cpu")
    kw.setdefault("precision", "fp32")  # runs are compared to 1e-3 (see FP32_ARGS)
    return extract(ExtractConfig(videos=videos, out=out, **kw))


def datasets(path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path) as f:
        for key, g in f["videos"].items():
            for name, d in g.items():
                out[f"{key}/{name}"] = d[()]
    return out


@pytest.fixture(scope="module")
def synth_cache(synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_cache") / "feats.h5"
    s = run(synth_dir, out, batch_size=4)
    assert (s.done, s.failed) == (3, 0)
    return out


def test_layout(synth_cache, synth_dir):
    truth = json.loads((synth_dir / "truth.json").read_text())
    with h5py.File(synth_cache) as f:
        assert f.attrs["vtx_version"] == __version__
        assert f.attrs["schema_version"] == SCHEMA_VERSION
        assert sorted(f["videos"]) == sorted(video_key(p) for p in truth)
        assert "sub%2Fb.mp4" in f["videos"]
        for rel, t in truth.items():
            g = f["videos"][video_key(rel)]
            assert g.attrs["path"] == rel
            assert g.attrs["size_bytes"] == (synth_dir / rel).stat().st_size
            assert g.attrs["n_frames"] == t["n_frames"]
            assert (g.attrs["width"], g.attrs["height"]) == tuple(t["size"])
            for attr in ("duration_s", "fps", "codec", "rotation", "has_audio", "decode_errors"):
                assert attr in g.attrs
            assert g["shots"][:, 0].tolist() == [0] + t["cut_frames"]
            assert g["shots"].dtype == np.int64 and g["shot_times"].dtype == np.float64
            for name in ("resnet18", "r2plus1d"):
                d = g[name]
                assert d.shape == (len(t["cut_frames"]) + 1, 512) and d.dtype == np.float16
                assert d.chunks is not None
                assert d.attrs["weights"] in ("ResNet18_Weights.IMAGENET1K_V1",
                                              "R2Plus1D_18_Weights.KINETICS400_V1")
                for attr in ("model", "weights_file", "dim", "sampling"):
                    assert attr in d.attrs
                assert np.isfinite(d[()]).all()
    # the index layout: one external link per video into its part, every part linked once
    parts = Path(str(synth_cache) + ".parts")
    with h5py.File(synth_cache) as f:
        assert f.attrs["layout"] == "index"
        links = [f["videos"].get(k, getlink=True) for k in f["videos"]]
        assert all(isinstance(link, h5py.ExternalLink) for link in links)
        assert sorted(Path(link.filename).name for link in links) == \
            sorted(p.name for p in parts.iterdir())
        assert {link.filename.split("/")[0] for link in links} == {parts.name}  # relative
    assert not Path(str(synth_cache) + ".lock").exists()
    assert not list(parts.glob("*.tmp"))


def test_rerun_skips_finished_videos(synth_cache, synth_dir, tmp_path):
    out = tmp_path / "feats.h5"
    copy_cache(synth_cache, out)
    before = datasets(out)
    s = run(synth_dir, out)
    assert (s.done, s.skipped, s.failed) == (0, 3, 0)
    after = datasets(out)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_added_feature_is_computed_alone_in_one_pass(synth_dir, tmp_path, monkeypatch):
    out = tmp_path / "feats.h5"
    run(synth_dir, out, features=("resnet18",), dtype="float32")
    first = datasets(out)
    assert not any(k.endswith("r2plus1d") for k in first)

    opened, detectors, preps = [], [], []
    real_reader, real_detector, real_run = (producer_mod.VideoReader, producer_mod.ShotDetector,
                                            producer_mod.VideoProducer.run)

    def counting_reader(path, *a, **k):
        opened.append(Path(path).name)
        return real_reader(path, *a, **k)

    def counting_detector(*a, **k):
        detectors.append(1)
        return real_detector(*a, **k)

    def spy_run(producer):
        preps.append(sorted(producer.preps))
        return real_run(producer)

    monkeypatch.setattr(producer_mod, "VideoReader", counting_reader)
    monkeypatch.setattr(producer_mod, "ShotDetector", counting_detector)
    monkeypatch.setattr(producer_mod.VideoProducer, "run", spy_run)
    s = run(synth_dir, out, features=("resnet18", "r2plus1d"), dtype="float32")
    assert s.done == 3
    assert sorted(opened) == ["a.mp4", "b.mp4", "c.mp4"]  # one decode per video
    assert detectors == []  # stored shots are reused, not re-detected
    assert preps == [[FEATURES["r2plus1d"].model_key]] * 3  # only the missing feature
    second = datasets(out)
    for k, v in first.items():
        assert np.array_equal(second[k], v), k
    assert sum(k.endswith("/r2plus1d") for k in second) == 3


def test_changed_video_is_extracted_again(synth_dir, tmp_path):
    videos = tmp_path / "v"
    videos.mkdir()
    write_video(videos / "x.mp4", [Shot(20, 0), Shot(20, 1)], size=(96, 64))
    out = tmp_path / "feats.h5"
    run(videos, out, features=("resnet18",))
    write_video(videos / "x.mp4", [Shot(20, 0), Shot(20, 1), Shot(20, 2)], size=(96, 64))
    s = run(videos, out, features=("resnet18",))
    assert s.done == 1
    with h5py.File(out) as f:
        assert len(f["videos"]["x.mp4"]["shots"]) == 3


def test_settings_mismatch_is_refused(synth_cache, synth_dir, tmp_path):
    out = tmp_path / "feats.h5"
    copy_cache(synth_cache, out)
    with pytest.raises(CacheMismatch, match="--overwrite"):
        run(synth_dir, out, shots=ShotConfig(detector="adaptive"))
    with pytest.raises(CacheMismatch, match="random"):
        run(synth_dir, out, weights="random")
    s = run(synth_dir, out, weights="random", overwrite=True, features=("resnet18",))
    assert s.done == 3
    with h5py.File(out) as f:
        assert all(g["resnet18"].attrs["weights"] == "random" for g in f["videos"].values())
        assert all("r2plus1d" not in g for g in f["videos"].values())


def test_writers_share_a_cache_and_overwrite_waits_for_none(tmp_path, synth_dir):
    """A second writer is no longer refused (exit 4 is gone); --overwrite is refused while
    another worker holds a claim on a video of the cache."""
    from vtx.io.claims import Claims
    out = tmp_path / "feats.h5"
    with CacheWriter(out) as w1, CacheWriter(out) as w2:
        w1.write_video("a.mp4", {"path": "a.mp4", "size_bytes": 1},
                       {"shots": (np.array([[0, 5]]), {})}, replace=True)
        w2.write_video("b.mp4", {"path": "b.mp4", "size_bytes": 1},
                       {"shots": (np.array([[0, 7]]), {})}, replace=True)
        assert w1.merge() == 2 and w2.merge() == 0
    with h5py.File(out) as f:
        assert sorted(f["videos"]) == ["a.mp4", "b.mp4"]
        assert f["videos/b.mp4/shots"][()].tolist() == [[0, 7]]
    claims_dir = Path(str(out) + ".claims")
    with Claims(claims_dir) as claims:
        assert claims.acquire("a.mp4")
        r = subprocess.run(VTX + ["extract", "--videos", str(synth_dir), "--out", str(out),
                                  "--overwrite", "--no-progress"], env=vtx_env(),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 4, r.stderr
        assert "other vtx processes are extracting 1 video(s)" in r.stderr
    assert out.exists()  # nothing was deleted


def test_interrupted_merge_leaves_cache_intact(synth_cache, tmp_path, monkeypatch):
    out = tmp_path / "feats.h5"
    copy_cache(synth_cache, out)
    before = datasets(out)
    w = CacheWriter(out)
    w.write_video("new.mp4", {"path": "new.mp4", "size_bytes": 1},
                  {"shots": (np.array([[0, 5]]), {})}, replace=True)

    def boom(*a, **k):
        raise KeyboardInterrupt("killed during merge")

    monkeypatch.setattr(cache_mod.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        w.merge()
    monkeypatch.undo()
    w.abandon()  # the process "died": its lock goes with it, its parts stay
    after = datasets(out)
    assert before.keys() == after.keys()  # the old file is untouched
    with CacheWriter(out):  # the next run merges the finished shard
        pass
    with h5py.File(out) as f:
        assert "new.mp4" in f["videos"] and len(f["videos"]) == 4


def _wait_for(predicate, proc, timeout=120.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate() or proc.poll() is not None:
            return
        time.sleep(0.02)


def test_kill_9_then_resume_equals_uninterrupted_run(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(5):
        write_video(videos / f"v{i}.mp4", [Shot(16, i), Shot(16 + i, i + 3, (1, 0))],
                    size=(96, 64), fps=25, seed=i)
    args = ["extract", "--videos", str(videos), "--batch-size", "1", "--no-progress",
            "--features", "resnet18,r2plus1d", "--precision", "fp32"]
    ref = tmp_path / "ref.h5"
    subprocess.run(VTX + args + ["--out", str(ref)], env=vtx_env(), check=True, timeout=300,
                   capture_output=True)
    out = tmp_path / "feats.h5"
    parts = Path(str(out) + ".parts")
    n_shards = lambda: len(list(parts.glob("*.h5"))) if parts.exists() else 0  # noqa: E731
    kill_points = [
        lambda: parts.exists(),  # writer opened, nothing finished yet
        lambda: n_shards() >= 1,  # some videos finished
        lambda: n_shards() >= 2,
    ]
    for when in kill_points:
        proc = subprocess.Popen(VTX + args + ["--out", str(out)], env=vtx_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(when, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():  # never corrupt: it opens and every group in it is complete
            with h5py.File(out) as f:
                for g in f["videos"].values():
                    assert {"shots", "resnet18", "r2plus1d"} <= set(g)
    r = subprocess.run(VTX + args + ["--out", str(out), "--json"], env=vtx_env(), timeout=300,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["done"] + summary["skipped"] == 5 and summary["skipped"] >= 1
    assert_same_cache(ref, out)
    assert_no_stray_parts(out)


def test_bad_inputs_next_to_good_ones(tmp_path):
    videos = tmp_path / "videos"
    bad = write_bad_inputs(videos)
    write_video(videos / "good.mp4", [Shot(20, 0, (1, 0)), Shot(20, 2)], size=(96, 64))
    out = tmp_path / "feats.h5"
    r = subprocess.run(VTX + ["extract", "--videos", str(videos), "--out", str(out),
                              "--no-progress", "--json"],
                       env=vtx_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stderr
    failed = {"empty.mp4", "text.mp4", "truncated.mp4", "audio_only.mp4", "unreadable.mp4"}
    assert failed <= set(bad)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("vtx: failed: ")]
    assert sorted(ln.split(": ")[2] for ln in lines) == sorted(failed)
    summary = json.loads(r.stdout)
    assert summary["failed"] == 5 and summary["done"] == 2
    with h5py.File(out) as f:
        assert set(f["videos"]) == {"good.mp4", "corrupt_middle.mp4"}
        assert set(f["failures"]) == failed
        for name in failed:
            assert f["failures"][name].attrs["path"] == name
            assert f["failures"][name].attrs["reason"]
        assert "no video stream" in f["failures"]["audio_only.mp4"].attrs["reason"]
        assert "empty" in f["failures"]["empty.mp4"].attrs["reason"]
        assert "symbolic link" in f["failures"]["unreadable.mp4"].attrs["reason"]
        corrupt = f["videos"]["corrupt_middle.mp4"]
        assert corrupt.attrs["decode_errors"] == 2  # two packets skipped, counted
        assert corrupt.attrs["n_frames"] == 98
        assert np.isfinite(corrupt["resnet18"][()]).all()
    # Fixing a file and rerunning retries failures only, and clears their records.
    (videos / "empty.mp4").unlink()
    write_video(videos / "empty.mp4", [Shot(20, 1)], size=(96, 64))
    s = run(videos, out)
    assert (s.done, s.skipped, s.failed) == (1, 2, 4)
    with h5py.File(out) as f:
        assert "empty.mp4" in f["videos"] and "empty.mp4" not in f["failures"]


def test_too_many_consecutive_decode_errors_fail_the_video(tmp_path, monkeypatch):
    videos = tmp_path / "videos"
    write_bad_inputs(videos)
    monkeypatch.setattr("vtx.io.decode.MAX_CONSECUTIVE_ERRORS", 2)
    s = run(videos / "corrupt_middle.mp4", tmp_path / "feats.h5")
    assert s.failed == 1 and "consecutive packets failed" in s.failures[0][1]



# ----------------------------------------------------------------------------- faults
# Disk full, read-only places, the kill point inside a shard's .tmp file, checksums.

FP32_ARGS = ["--precision", "fp32"]
"""Runs compared with each other to 1e-3 use fp32: bf16 (the default on a CPU that has it)
rounds differently with the batch composition, which partial batches make timing-dependent."""
ALL_RANDOM = ["--features", "all", "--weights", "random", "--batch-size", "2", "--no-progress",
              *FP32_ARGS]



def cli_run(args: list[str], **env: str):
    """``vtx ARGS`` in this process (click's runner): exit code, stdout and stderr."""
    from click.testing import CliRunner

    from vtx.cli.main import cli
    return CliRunner().invoke(cli, args, env=env or None)


def tiny_videos(folder: Path, n: int) -> Path:
    """``n`` small two-shot videos of one design (so their features take the same space)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_video(folder / f"v{i}.mp4", [Shot(12, i), Shot(12, i + 3, (1, 0))], size=(64, 48),
                    fps=25, seed=i)
    return folder


@pytest.fixture
def tmpfs(tmp_path):
    """A fresh 16 MB tmpfs (Linux, root only); skips elsewhere."""
    with mounted_tmpfs(tmp_path / "tmpfs", "16m") as mnt:
        yield mnt


@pytest.fixture
def freeze(tmp_path):
    """``freeze(folder)``: a read-only copy of ``folder`` (a read-only tmpfs mount as root, where
    permissions do not stop writes; a folder without write permission otherwise)."""
    frozen = []

    def make(src: Path) -> Path:
        dst = tmp_path / f"ro{len(frozen)}"
        dst.mkdir()
        if os.geteuid() == 0:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(dst)],
                               capture_output=True, text=True)
            if r.returncode:
                pytest.skip(f"root, and cannot mount a tmpfs to make read-only: {r.stderr}")
            frozen.append(("mount", dst))
            shutil.copytree(src, dst, dirs_exist_ok=True)
            subprocess.run(["mount", "-o", "remount,ro", str(dst)], check=True)
        else:
            shutil.copytree(src, dst, dirs_exist_ok=True)
            for p in [dst, *dst.rglob("*")]:
                p.chmod(p.stat().st_mode & ~0o222)
            frozen.append(("chmod", dst))
        return dst

    yield make
    for how, dst in frozen:
        if how == "mount":
            subprocess.run(["umount", "-l", str(dst)], capture_output=True)
        else:
            for p in [dst, *dst.rglob("*")]:
                p.chmod(p.stat().st_mode | 0o200)


def group_datasets(cache: Path, key: str) -> tuple[dict, dict]:
    """A cached video's (group attrs, {name: (array, attrs)}), as ``write_video`` takes them."""
    with h5py.File(cache) as f:
        g = f["videos"][key]
        return dict(g.attrs), {n: (g[n][()], dict(g[n].attrs)) for n in g}


def assert_same_arrays(x: np.ndarray, y: np.ndarray, name: str) -> None:
    """Equal, or for floats from separate fp32 runs within 1e-3 plus one step of the stored
    dtype: two runs batch the same inputs differently (partial batches depend on timing), which
    moves fp32 results in their last bits, and a float16 dataset (ViT patches) then rounds one
    value in 10^5 or so to the neighbouring float16, 0.002 away at 2.0."""
    if x.dtype.kind not in "fc":
        assert np.array_equal(x, y), name
        return
    step = np.spacing(np.maximum(np.abs(x), np.abs(y)).astype(x.dtype)).astype(float)
    diff = np.abs(x.astype(float) - y.astype(float))
    bad = diff > 1e-3 + step
    assert not bad.any(), (f"{name}: {bad.sum()} of {bad.size} values differ by more than "
                           f"1e-3 + one {x.dtype} step (largest {diff.max():.3g})")


def assert_same_cache(a: Path, b: Path) -> None:
    x, y = datasets(a), datasets(b)
    assert x.keys() == y.keys()
    for k in x:
        assert_same_arrays(x[k], y[k], k)


def test_every_dataset_carries_a_fletcher32_checksum(synth_cache):
    with h5py.File(synth_cache) as f:
        names = [f"{k}/{n}" for k, g in f["videos"].items() for n in g]
        assert len(names) > 10
        for n in names:
            assert f["videos"][n].fletcher32, n


def test_shard_space_reservation_covers_what_hdf5_writes(tmp_path):
    """HDF5 must never write past the reserved bytes (there a full disk would hit HDF5)."""
    cases = {
        "many chunks": {"x": (np.ones((5000, 512), np.float16), {"model": "m", "dim": 512})},
        "many datasets": {f"d{i}": (np.full((3, 7), i, np.float32), {"level": "shot"})
                          for i in range(60)},
        "empty": {"shots": (np.zeros((0, 2), np.int64), {})},
        "tiny chunks": {"t": (np.ones((20000, 8), np.float16), {}, 1)},
    }
    w = CacheWriter(tmp_path / "feats.h5")
    for i, (what, ds) in enumerate(cases.items()):
        attrs = {"path": f"{i}.mp4", "codec": "h264"}
        w.write_video(f"{i}.mp4", attrs, ds, replace=True)
        shard = max(w.parts.glob("*.h5"), key=lambda p: part_time(p.name))
        assert shard.stat().st_size <= cache_mod.part_bytes(ds, attrs), what
    w.close()
    with h5py.File(tmp_path / "feats.h5") as f:
        assert f["videos"]["0.mp4"]["x"][()].astype(np.float64).sum() == 5000 * 512


def assert_no_stray_parts(out: Path) -> None:
    """Every part file is linked by the index, and none is unfinished."""
    parts = Path(str(out) + ".parts")
    with h5py.File(out) as f:
        linked = {Path(f[g].get(k, getlink=True).filename).name
                  for g in ("videos", "failures") if g in f for k in f[g]}
    assert {p.name for p in parts.iterdir()} == linked


@pytest.fixture(scope="module")
def three_videos(tmp_path_factory) -> tuple[Path, Path]:
    """(three tiny videos, their cache with --features all --weights random)."""
    root = tmp_path_factory.mktemp("three")
    videos = tiny_videos(root / "videos", 3)
    run(videos, root / "ref.h5", features="all", weights="random", batch_size=2)
    return videos, root / "ref.h5"


def fake_full_disk(monkeypatch, budget: int) -> None:
    """``posix_fallocate`` fails with ENOSPC after ``budget`` more calls, as on a full disk."""
    real, left = os.posix_fallocate, [budget]

    def fallocate(fd, offset, length):
        if left[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        left[0] -= 1
        return real(fd, offset, length)
    monkeypatch.setattr(os, "posix_fallocate", fallocate)


@pytest.mark.parametrize("how", ["tmpfs", "injected"])
def test_disk_full_is_a_clear_error_that_loses_nothing(how, three_videos, tmp_path, request,
                                                       monkeypatch):
    """A tmpfs that fills up (as root on Linux, so in CI), else an ENOSPC injected where a full
    disk reports it: the cache stays untouched, finished videos are kept, a rerun completes."""
    videos, ref = three_videos
    disk = request.getfixturevalue("tmpfs") if how == "tmpfs" else tmp_path / "disk"
    disk.mkdir(exist_ok=True)
    out = disk / "feats.h5"
    parts = Path(str(out) + ".parts")
    run(videos / "v0.mp4", out, features="all", weights="random", batch_size=2)
    before = out.read_bytes()
    args = ["extract", "--videos", str(videos), "--out", str(out), *ALL_RANDOM]

    # 1. the disk fills while a video's shard is written (a real process: no crash, exit 5)
    filler = disk / "filler"
    if how == "tmpfs":  # room for one more video's shard, not for two
        attrs, ds = group_datasets(ref, "v1.mp4")
        data = sum(a.nbytes for a, _ in ds.values())
        leave = cache_mod.part_bytes(ds, attrs) + int(0.4 * data)
        fd = os.open(filler, os.O_CREAT | os.O_WRONLY)
        os.posix_fallocate(fd, 0, shutil.disk_usage(disk).free - leave)
        os.close(fd)
        p = subprocess.run(VTX + args, env=vtx_env(), capture_output=True, text=True,
                           timeout=300)
        code, err = p.returncode, p.stderr
    else:  # the second shard's reservation fails as on a full disk
        fake_full_disk(monkeypatch, 1)
        r = cli_run(args)
        code, err = r.exit_code, r.stderr
        assert isinstance(r.exception, SystemExit), r.exception
    assert code == 5, err
    assert "Traceback" not in err and err.startswith("vtx: error: no space left")
    assert f"{parts}" in err and "needs about" in err and "is free" in err
    assert "v2.mp4" in err and "rerun the same command" in err
    assert out.read_bytes() == before  # the cache is untouched
    assert len(CacheWriter(out, merge=False).pending_parts()) == 1  # the finished video is kept
    assert not list(parts.glob("*.tmp")) and not Path(str(out) + ".merge-tmp").exists()
    assert not Path(str(out) + ".lock").exists()

    # 2. a rerun while still full: the merge checks (or reserves) its space before writing
    if how == "injected":
        fake_full_disk(monkeypatch, 0)
    r = cli_run(args)
    assert r.exit_code == 5 and isinstance(r.exception, SystemExit), r.stderr
    assert "merging 1 finished video(s)" in r.stderr and "needs about" in r.stderr
    assert str(disk) in r.stderr
    assert out.read_bytes() == before and len(CacheWriter(out, merge=False).pending_parts()) == 1
    assert not Path(str(out) + ".merge-tmp").exists()

    # 3. space freed: the rerun merges the kept video and computes only the last one
    filler.unlink(missing_ok=True)
    monkeypatch.undo()
    r = cli_run(args + ["--json"])
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert (summary["done"], summary["skipped"]) == (1, 2)
    assert_same_cache(ref, out)
    assert_no_stray_parts(out)


def test_kill_while_a_shard_tmp_file_is_written_then_resume_equals_uninterrupted_run(tmp_path):
    videos = tiny_videos(tmp_path / "videos", 3)
    args = ["extract", "--videos", str(videos), "--batch-size", "1", "--no-progress",
            "--features", "resnet18,motion", "--weights", "random", "--precision", "fp32"]
    ref = tmp_path / "ref.h5"
    run(videos, ref, features="resnet18,motion", weights="random", batch_size=1)
    out = tmp_path / "feats.h5"
    parts = Path(str(out) + ".parts")
    env = {**vtx_env(), cache_mod.KILL_IN_PART_ENV: "2"}  # inside the second video's shard
    r = subprocess.run(VTX + args + ["--out", str(out)], env=env, capture_output=True,
                       timeout=300)
    assert r.returncode == -signal.SIGKILL
    assert not out.exists()  # never merged
    assert len(list(parts.glob("*.h5"))) == 1  # the first video finished
    torn = list(parts.glob("*.tmp"))
    assert len(torn) == 1 and torn[0].stat().st_size > 0  # killed mid-write
    r = cli_run(args + ["--out", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert (summary["done"], summary["skipped"]) == (2, 1)
    assert_same_cache(ref, out)
    assert_no_stray_parts(out)


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> tuple[Path, Path]:
    """(videos folder, folder holding feats.h5 of those videos with resnet18)."""
    root = tmp_path_factory.mktemp("small")
    videos = tiny_videos(root / "videos", 2)
    (root / "cache").mkdir()
    run(videos, root / "cache" / "feats.h5", features="resnet18", weights="random")
    return videos, root / "cache"


def test_read_only_cache_with_nothing_to_do_exits_0_and_says_so(small_cache, freeze):
    videos, folder = small_cache
    ro = freeze(folder)
    before = (ro / "feats.h5").read_bytes()
    r = cli_run(["extract", "--videos", str(videos), "--out", str(ro / "feats.h5"),
                 "--features", "resnet18", "--weights", "random", "--no-progress", "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["skipped"] == 2
    assert "read-only" in r.stderr and "nothing to do" in r.stderr
    assert (ro / "feats.h5").read_bytes() == before


@pytest.mark.parametrize("extra", [["--features", "resnet18,vit"], ["--overwrite"]],
                         ids=["new-feature", "overwrite"])
def test_read_only_cache_that_must_be_written_names_the_path(small_cache, freeze, extra):
    videos, folder = small_cache
    ro = freeze(folder)
    args = ["extract", "--videos", str(videos), "--out", str(ro / "feats.h5"), "--weights",
            "random", "--no-progress"]
    if "--features" not in extra:
        args += ["--features", "resnet18"]
    r = cli_run(args + extra)
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.stderr
    assert f"{ro / 'feats.h5'} must be written" in r.stderr and str(ro) in r.stderr
    assert ("read-only" in r.stderr) or ("no permission" in r.stderr)


def test_new_cache_in_a_read_only_folder_is_refused_before_any_work(tmp_path, freeze):
    ro = freeze(tiny_videos(tmp_path / "videos", 1))
    with pytest.raises(ReadOnly, match="does not exist yet"):
        run(ro, ro / "feats.h5", features="resnet18", weights="random")


def test_train_head_out_in_a_read_only_folder_is_refused_before_training(small_cache, freeze,
                                                                         tmp_path):
    _, folder = small_cache
    ro = freeze(folder)
    # the labels file does not exist: the run folder is checked before anything is read
    r = cli_run(["train-head", "meanpool", "--features", str(ro / "feats.h5"), "--labels",
                 str(tmp_path / "missing.csv"), "--out", str(ro / "runs" / "a"), "--epochs", "1"])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.stderr
    assert f"--out {ro / 'runs' / 'a'}" in r.stderr and str(ro) in r.stderr
    assert "cannot be written" in r.stderr and "epoch" not in r.stdout + r.stderr
    assert not (ro / "runs").exists()
