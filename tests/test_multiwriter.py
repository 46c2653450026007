"""Many writers on one cache (issue 9): claims, --shard, --no-merge + vtx merge, merges that
read and copy none of the other videos, old one-file caches converted without a copy, and
vtx compact."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import vtx_env
from test_cache import assert_no_stray_parts, assert_same_cache, cli_run, run, tiny_videos
from vtx.io.cache import compact_cache
from vtx.io.claims import LocksUnsupported
from vtx.pipeline import extract as extract_mod
from vtx.pipeline.sharding import Shard, parse_shard, shard_of

VTX = [sys.executable, "-m", "vtx.cli.main"]
ARGS = ["--features", "resnet18", "--weights", "random", "--batch-size", "2", "--no-progress",
        "--device", "cpu", "--precision", "fp32", "--json"]
# fp32: bf16 (the CPU default where the CPU has it) rounds differently with the batch
# composition, which partial batches make depend on timing; fp32 compares to 1e-3 in float16
FP32 = {"features": "resnet18", "weights": "random", "precision": "fp32"}
N = 6


@pytest.fixture(scope="module")
def videos_and_ref(tmp_path_factory) -> tuple[Path, Path]:
    """(six tiny videos, the cache one plain process writes of them)."""
    root = tmp_path_factory.mktemp("mw")
    videos = tiny_videos(root / "videos", N)
    ref = root / "ref.h5"
    s = run(videos, ref, batch_size=2, **FP32)
    assert (s.done, s.failed) == (N, 0)
    return videos, ref


def linked_parts(cache: Path) -> dict[str, str]:
    """key -> part file name the index links."""
    with h5py.File(cache) as f:
        return {k: Path(f["videos"].get(k, getlink=True).filename).name for k in f["videos"]}


def test_two_processes_share_a_cache_and_compute_each_video_once(videos_and_ref, tmp_path):
    videos, ref = videos_and_ref
    out = tmp_path / "feats.h5"
    cmd = VTX + ["extract", "--videos", str(videos), "--out", str(out), "--workers", "1"] + ARGS
    procs = [subprocess.Popen(cmd, env=vtx_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr  # no exit 4: a second writer is welcome
    summaries = [json.loads(stdout) for stdout, _ in results]
    # each video computed exactly once; what one did, the other skipped or left to it
    assert sum(s["done"] for s in summaries) == N
    for s, other in zip(summaries, summaries[::-1]):
        assert s["done"] + s["skipped"] + s["other_workers"] == N
    assert_same_cache(ref, out)
    assert len(linked_parts(out)) == N
    assert_no_stray_parts(out)
    assert not any(Path(str(out) + ".claims").iterdir())  # every claim released


def test_shards_with_no_merge_then_vtx_merge_equal_one_process(videos_and_ref, tmp_path):
    videos, ref = videos_and_ref
    out = tmp_path / "feats.h5"
    done = []
    for k in range(2):
        r = cli_run(["extract", "--videos", str(videos), "--out", str(out), "--shard", f"{k}/2",
                     "--no-merge"] + ARGS)
        assert r.exit_code == 0, r.stderr
        s = json.loads(r.stdout)
        assert s["shard"] == f"{k}/2" and s["skipped"] == 0
        assert s["not_merged"] == sum(x["done"] for x in done) + s["done"]
        done.append(s)
    assert sum(s["done"] for s in done) == N and all(s["done"] for s in done)
    assert not out.exists()  # nothing merged yet
    r = cli_run(["merge", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert (report["merged"], report["videos"], report["failures"]) == (N, N, 0)
    assert_same_cache(ref, out)
    assert_no_stray_parts(out)
    r = cli_run(["merge", str(out)])  # idempotent
    assert r.exit_code == 0 and "merged 0 finished part(s)" in r.stdout


def test_shards_are_stable_and_cover_everything():
    paths = [f"dir{i % 7}/clip {i}.mp4" for i in range(300)]
    shards = [Shard(k, 4) for k in range(4)]
    owners = [[s for s in shards if s.owns(p)] for p in paths]
    assert all(len(o) == 1 for o in owners)  # every video in exactly one shard
    counts = [sum(o[0] == s for o in owners) for s in shards]
    assert min(counts) > 50  # a hash spreads them
    # independent of listing order and of the other videos: a function of the path alone
    assert [shard_of(p, 4) for p in reversed(paths)] == [shard_of(p, 4) for p in paths][::-1]
    assert shard_of("a/b.mp4", 4) == shard_of("a/b.mp4", 4) == 0  # pinned: sha1, not hash()
    assert parse_shard("auto", {"RANK": "1", "WORLD_SIZE": "3"}) == Shard(1, 3)
    assert parse_shard("auto", {}) == Shard(0, 1)
    for bad in ("2/2", "x", "1/0", "-1/3"):
        with pytest.raises(Exception, match="--shard"):
            parse_shard(bad)


def test_adding_a_video_reads_and_copies_none_of_the_others(videos_and_ref, tmp_path):
    """The merge links the new part: the other videos' parts are not opened (here they are
    made unreadable garbage, and the run still succeeds) nor rewritten."""
    videos, ref = videos_and_ref
    some = tmp_path / "some"
    some.mkdir()
    for i in range(N - 1):
        shutil.copy(videos / f"v{i}.mp4", some / f"v{i}.mp4")
    out = tmp_path / "feats.h5"
    run(some, out, batch_size=2, **FP32)
    before = linked_parts(out)
    parts = Path(str(out) + ".parts")
    saved = {}
    for name in before.values():
        saved[name] = (parts / name).read_bytes()
        (parts / name).write_bytes(b"not HDF5: a merge that opened this would fail")
    shutil.copy(videos / f"v{N - 1}.mp4", some / f"v{N - 1}.mp4")
    s = run(some, out, batch_size=2, **FP32)
    assert (s.done, s.skipped, s.failed) == (1, N - 1, 0)
    after = linked_parts(out)
    assert {k: v for k, v in after.items() if k in before} == before
    for name, data in saved.items():
        assert (parts / name).read_bytes().startswith(b"not HDF5")  # untouched
        (parts / name).write_bytes(data)
    assert_same_cache(ref, out)


def test_added_feature_makes_a_new_part_holding_the_whole_video(videos_and_ref, tmp_path):
    videos, _ = videos_and_ref
    out = tmp_path / "feats.h5"
    run(videos / "v0.mp4", out, features="resnet18", weights="random")
    first = linked_parts(out)
    run(videos / "v0.mp4", out, features="resnet18,motion", weights="random")
    second = linked_parts(out)
    assert first.keys() == second.keys() and first != second
    parts = Path(str(out) + ".parts")
    assert not (parts / first["v0.mp4"]).exists()  # the older version is deleted
    with h5py.File(parts / second["v0.mp4"]) as f:
        assert {"shots", "resnet18", "motion"} <= set(f["video"])  # one self-contained part


def test_one_file_cache_is_converted_without_a_copy_and_compact_reverses_it(
        videos_and_ref, tmp_path):
    videos, ref = videos_and_ref
    out = tmp_path / "feats.h5"  # a renamed copy: ref.h5 -> feats.h5 (and its parts folder)
    shutil.copytree(Path(str(ref) + ".parts"), Path(str(out) + ".parts"))
    shutil.copyfile(ref, out)
    with pytest.raises(KeyError):  # the links still name ref.h5.parts/ ...
        h5py.File(out)["videos/v0.mp4"]
    r = cli_run(["merge", str(out)])  # ... until a merge rewrites them
    assert r.exit_code == 0, r.stderr
    assert_same_cache(ref, out)
    r = cli_run(["compact", str(out), "--json", "--quiet"])
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["videos"] == N and report["compacted_to"] == str(out)
    assert not list(Path(str(out) + ".parts").iterdir())  # folded and deleted
    with h5py.File(out) as f:
        assert "layout" not in f.attrs
        assert all(isinstance(f["videos"].get(k, getlink=True), h5py.HardLink)
                   for k in f["videos"])
    assert_same_cache(ref, out)
    inode = out.stat().st_ino
    # a later run adds a feature to one video: the one-file cache becomes a base part (a hard
    # link to the same bytes, not a copy) and the new index links into it
    s = run(videos / "v0.mp4", out, features="resnet18,motion", weights="random")
    assert s.done == 1
    bases = list(Path(str(out) + ".parts").glob("base-*.h5"))
    assert len(bases) == 1 and bases[0].stat().st_ino == inode
    links = linked_parts(out)
    assert sum(name == bases[0].name for name in links.values()) == N - 1
    with h5py.File(out) as f:
        assert "motion" in f["videos/v0.mp4"] and "motion" not in f["videos/v1.mp4"]
    # compact --out writes a one-file copy and leaves the cache as it is
    single = tmp_path / "single.h5"
    compact_cache(out, single, progress=False)
    assert bases[0].exists()
    with h5py.File(single) as a, h5py.File(out) as b:
        assert np.array_equal(a["videos/v0.mp4/motion"][()], b["videos/v0.mp4/motion"][()])


def test_moved_cache_reads_and_a_missing_part_is_damage_not_a_traceback(videos_and_ref,
                                                                       tmp_path):
    _, ref = videos_and_ref
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copyfile(ref, moved / "ref.h5")
    shutil.copytree(Path(str(ref) + ".parts"), moved / "ref.h5.parts")
    assert_same_cache(ref, moved / "ref.h5")  # links are relative to the index's folder
    lone = tmp_path / "lone.h5"
    shutil.copyfile(ref, lone)  # the index without its parts
    r = cli_run(["check", str(lone), "--json", "--quiet"])
    assert r.exit_code == 6
    report = json.loads(r.stdout)
    assert len(report["damaged"]) == N
    assert "feats.h5.parts/ folder" in json.dumps(report)


def test_without_working_locks_only_shards_without_merging_may_share(videos_and_ref,
                                                                     tmp_path, monkeypatch):
    videos, _ = videos_and_ref

    def no_locks(folder):
        raise LocksUnsupported(f"file locks do not work in {folder}; use --shard K/N and "
                               f"--no-merge, then vtx merge")
    monkeypatch.setattr(extract_mod, "check_locks", no_locks)
    with pytest.raises(LocksUnsupported, match="--shard"):
        run(videos / "v0.mp4", tmp_path / "a.h5", features="resnet18", weights="random")
    s = run(videos / "v0.mp4", tmp_path / "b.h5", features="resnet18", weights="random",
            shard="0/1", merge=False)
    assert (s.done, s.pending) == (1, 1)


@pytest.mark.skipif(shutil.which("torchrun") is None and
                    not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_torchrun_shard_auto(videos_and_ref, tmp_path):
    """``--shard auto`` under torchrun (2 local processes, loopback): RANK/WORLD_SIZE."""
    videos, ref = videos_and_ref
    out = tmp_path / "feats.h5"
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**vtx_env(), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "vtx.cli.main",
                        "extract", "--videos", str(videos), "--out", str(out), "--shard", "auto"]
                       + ARGS, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    summaries = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert sorted(s["shard"] for s in summaries) == ["0/2", "1/2"]
    assert sum(s["done"] for s in summaries) == N
    assert_same_cache(ref, out)
    assert_no_stray_parts(out)
    assert os.path.exists(out)
