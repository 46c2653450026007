"""``vtx extract --engine ray``: a local Ray instance on 127.0.0.1, a worker killed mid-video.

The cache a Ray run writes must equal a plain local run's, dataset for dataset, with every
video written once and none lost, also when a worker is SIGKILLed while it holds a video.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import signal
import threading
import time
from pathlib import Path

import h5py
import pytest

# Ray reads these when it is imported: its local instance then binds and advertises 127.0.0.1
# only, and sends no usage report.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
ray = pytest.importorskip("ray")

from click.testing import CliRunner  # noqa: E402

from test_cache import assert_no_stray_parts, assert_same_cache, tiny_videos  # noqa: E402
from vtx.cli.main import cli  # noqa: E402
from vtx.io.cache import merge_cache  # noqa: E402
from vtx.pipeline.extract import ExtractConfig, extract  # noqa: E402

N_VIDEOS = 6
# fp32: a worker batches one video's shots, the plain run several videos'; bf16 (the CPU
# default with AVX512_BF16) would round differently per batch
SETTINGS = dict(features="resnet18", weights="random", device="cpu", precision="fp32",
                progress=False, batch_size=4)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path, int]:
    """(six tiny videos, their cache from a plain local run, its number of shots)."""
    root = tmp_path_factory.mktemp("ray")
    videos = tiny_videos(root / "videos", N_VIDEOS)
    ref = root / "ref.h5"
    s = extract(ExtractConfig(videos=videos, out=ref, **SETTINGS))
    assert (s.done, s.failed) == (N_VIDEOS, 0)
    return videos, ref, s.shots


@pytest.fixture(scope="module")
def local_ray():
    """A 2-CPU Ray instance on the loopback address, with a small object store."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 ** 2,
             _node_ip_address="127.0.0.1", logging_level=logging.WARNING)
    try:
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        yield ray
    finally:
        ray.shutdown()


def parts_by_key(out: Path) -> dict[str, list[str]]:
    """The finished part files of each video (and failure) key, unfinished ones apart."""
    found: dict[str, list[str]] = {}
    for p in sorted(Path(str(out) + ".parts").iterdir()):
        if p.suffix == ".h5" and not p.name.startswith("base-"):
            with h5py.File(p, "r") as f:
                found.setdefault(str(f.attrs["key"]), []).append(p.name)
        else:
            found.setdefault("<other files>", []).append(p.name)
    return found


def test_cli_ray_run_equals_a_plain_run(reference, tmp_path):
    """No Ray running: the CLI starts a local instance (127.0.0.1), one worker extracts every
    video, the summary line has a local run's format and the cache equals the plain run's."""
    assert not ray.is_initialized()
    videos, ref, shots = reference
    out = tmp_path / "feats.h5"
    r = CliRunner().invoke(cli, ["extract", "--videos", str(videos), "--out", str(out),
                                 "--features", "resnet18", "--weights", "random",
                                 "--device", "cpu", "--precision", "fp32", "--quiet",
                                 "--engine", "ray", "--ray-workers", "1"])
    assert r.exit_code == 0, r.output
    line = r.output.strip().splitlines()[-1]
    assert re.fullmatch(rf"videos: {N_VIDEOS} done, 0 skipped, 0 failed \| shots: "
                        rf"{shots} \| wall: [\d.]+ s \| throughput: [\d.]+ video-s/s \| "
                        rf"cache: {re.escape(str(out))}", line), line
    assert not ray.is_initialized()  # the instance it started is shut down
    assert_same_cache(ref, out)
    assert_no_stray_parts(out)
    # a rerun skips every video without starting Ray
    r = CliRunner().invoke(cli, ["extract", "--videos", str(videos), "--out", str(out),
                                 "--features", "resnet18", "--weights", "random",
                                 "--device", "cpu", "--precision", "fp32", "--quiet",
                                 "--engine", "ray"])
    assert r.exit_code == 0, r.output
    assert f"videos: 0 done, {N_VIDEOS} skipped, 0 failed" in r.output


@pytest.mark.parametrize("lost_node", [False, True], ids=["killed", "lost-node"])
def test_killed_worker_loses_nothing_and_writes_nothing_twice(reference, local_ray, tmp_path,
                                                              lost_node):
    """SIGKILL the worker that holds the first claimed video: its video is extracted again by
    another worker; every video is written once, and the cache equals the plain run's.

    lost-node: the dead worker's lock stays held (as when its machine is lost: this test takes
    the lock the moment the worker dies), so its claim frees only when its lease (2 s) has run
    out; until then the video is handed out again and comes back "claimed by another worker".
    """
    videos, ref, shots = reference
    out = tmp_path / "feats.h5"
    claims = Path(str(out) + ".claims")
    killed: list[dict] = []
    held = []  # the claim file, locked by this test after the worker died (lost-node)
    stop = threading.Event()

    def kill_first_claimant() -> None:
        while not stop.is_set():
            for claim in sorted(claims.iterdir()) if claims.is_dir() else []:
                try:
                    fh = open(claim)
                    info = json.loads(fh.read())
                except (OSError, ValueError):  # created, not written yet, or gone
                    continue
                assert info["pid"] != os.getpid()  # a worker's, never the driver's
                os.kill(info["pid"], signal.SIGKILL)
                killed.append(info)
                if lost_node:
                    fcntl.flock(fh, fcntl.LOCK_EX)  # granted when the worker is gone
                    held.append(fh)
                else:
                    fh.close()
                return
            time.sleep(0.002)

    watcher = threading.Thread(target=kill_first_claimant, daemon=True)
    watcher.start()
    notes: list[str] = []
    try:
        s = extract(ExtractConfig(videos=videos, out=out, engine="ray", ray_workers=2,
                                  merge=False, lease_s=2.0 if lost_node else 600.0,
                                  **SETTINGS), log=notes.append)
    finally:
        stop.set()
        watcher.join(5)
        for fh in held:
            fh.close()
    assert len(killed) == 1, "no worker was killed"
    assert any("died" in n and "handing it to another worker" in n for n in notes), notes
    took_over = [n for n in notes if "taking over the claim" in n]
    assert len(took_over) == (1 if lost_node else 0), notes
    assert len(held) == (1 if lost_node else 0)
    assert (s.done, s.skipped, s.failed, s.others) == (N_VIDEOS, 0, 0, 0), s.to_dict()
    assert s.shots == shots and s.pending == N_VIDEOS
    # each video written once: one finished part per video, no failure, no unfinished part
    parts = parts_by_key(out)
    assert sorted(parts) == sorted(f"v{i}.mp4" for i in range(N_VIDEOS)), parts
    assert all(len(p) == 1 for p in parts.values()), parts
    assert killed[0]["key"] in parts
    assert merge_cache(out).merged == N_VIDEOS
    assert_same_cache(ref, out)
    assert_no_stray_parts(out)
    assert ray.is_initialized()  # the caller's instance is left running


def test_worker_count_follows_the_cluster_and_the_videos():
    from vtx.errors import UsageError
    from vtx.pipeline.ray_engine import worker_count

    def n(resources, videos=10, **kw):
        return worker_count(ExtractConfig(videos=Path("."), out=Path("o.h5"), **kw),
                            resources, videos)

    assert n({"CPU": 2.0}) == 2
    assert n({"CPU": 2.0}, cpus_per_worker=0.5) == 4
    assert n({"CPU": 8.0}, videos=3) == 3  # never more workers than videos
    assert n({"CPU": 16.0, "GPU": 2.0}, gpus_per_worker=1.0) == 2
    assert n({"CPU": 16.0, "GPU": 2.0}, gpus_per_worker=0.5, cpus_per_worker=4) == 4
    assert n({"CPU": 2.0}, ray_workers=5) == 5  # asked for: the others wait for room
    with pytest.raises(UsageError, match="has 2 CPU.s. and 0 GPU"):
        n({"CPU": 2.0}, gpus_per_worker=1.0)


def test_without_ray_the_error_says_how_to_install_it(reference, tmp_path, monkeypatch):
    from vtx.errors import UsageError

    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # `import ray` fails
    videos, _, _ = reference
    with pytest.raises(UsageError, match=re.escape("pip install 'vtx[ray]'")):
        extract(ExtractConfig(videos=videos, out=tmp_path / "feats.h5", engine="ray",
                              **SETTINGS))
    assert not (tmp_path / "feats.h5").exists()
