"""Helpers shared by the stage-1 benchmarks: synthetic inputs, machine facts, small maths.

The benchmark videos are made with :func:`vtx.io.synth.write_video`: shots of 2 to 6 s (drawn
uniformly, seeded) cycling through the synthetic scenes 0..7, each with a moving textured
rectangle, encoded with libx264 (CRF 18, preset veryfast). :func:`shot_plan` of a longer video
starts with the shots of a shorter one, so a 1-minute and a 10-minute video share the same
shot-length distribution.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

FPS = 25
SIZE = (640, 360)
SEED = 0
MIN_SHOT_S, MAX_SHOT_S = 2.0, 6.0
MOTIONS = ((2.0, 1.0), (-1.5, 0.5), (0.0, -2.0), (3.0, 0.0), (0.0, 0.0))


def shot_plan(seconds: float, fps: int = FPS, seed: int = SEED) -> list:
    """Shots covering ``seconds`` of video: 2-6 s each, scenes 0..7 in turn.

    The lengths come from one seeded stream, so the plan of a longer video starts with the
    plan of a shorter one; only the last shot is trimmed to hit the duration (and, when that
    leaves it shorter than the minimum, the last two shots share their frames evenly).
    """
    import numpy as np

    from vtx.io.synth import Shot

    rng = np.random.default_rng(seed)
    total = int(round(seconds * fps))
    lo, hi = int(MIN_SHOT_S * fps), int(MAX_SHOT_S * fps)
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(int(rng.integers(lo, hi + 1)))
    lengths[-1] -= sum(lengths) - total
    if len(lengths) > 1 and lengths[-1] < lo:  # share the last two shots out evenly
        pair = lengths[-2] + lengths[-1]
        lengths[-2:] = [pair // 2, pair - pair // 2]
    return [Shot(n, scene=i % 8, motion=MOTIONS[i % len(MOTIONS)])
            for i, n in enumerate(lengths)]


def make_video(path: Path, seconds: float, size: tuple[int, int] = SIZE,
               log=None, audio: bool = False) -> dict:
    """Write the benchmark video of ``seconds`` to ``path`` (reused when already there).

    With ``audio``, the video gets an AAC track (48 kHz stereo, ``write_video``'s default) that
    plays a tone per shot, 220 to 1100 Hz (``tone_hz = 220 * (1 + i % 5)``, as
    ``feature_costs.py``).

    Returns a small description: path, seconds, size, fps, frames, shots, generation time.
    """
    from dataclasses import replace

    from vtx.io.synth import write_video

    path = Path(path)
    shots = shot_plan(seconds)
    if audio:
        shots = [replace(s, tone_hz=220.0 * (1 + i % 5)) for i, s in enumerate(shots)]
    meta_path = path.with_suffix(path.suffix + ".json")
    desc = {"path": str(path), "seconds": seconds, "size": list(size), "fps": FPS,
            "frames": sum(s.n_frames for s in shots), "shots": len(shots),
            "shot_len_s": [MIN_SHOT_S, MAX_SHOT_S], "seed": SEED}
    if audio:  # only then, so that the descriptions of videos made before stay valid
        desc["audio"] = "aac 48000 Hz stereo, a tone per shot"
    if path.exists() and meta_path.exists():
        old = json.loads(meta_path.read_text())
        if {k: old.get(k) for k in desc} == desc:
            return old
    if log:
        log(f"generating {seconds:g} s synthetic video {size[0]}x{size[1]} -> {path}")
    t0 = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".part" + path.suffix)
    write_video(tmp, shots, size=size, fps=FPS, seed=SEED, audio=audio)
    tmp.replace(path)
    desc["generate_s"] = round(time.perf_counter() - t0, 2)
    meta_path.write_text(json.dumps(desc))
    return desc


def x264_version(path: Path) -> str | None:
    """The libx264 build string that the encoder wrote into a video's SEI (None if absent)."""
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    m = re.search(rb"x264 - core (\d+)( r\d+ \w+)?", head)
    return m.group(0).decode() if m else None


def machine_info(video: Path | None = None) -> dict:
    """CPU, cores, RAM, OS and library versions, for the report."""
    import av
    import cv2
    import h5py
    import numpy
    import scenedetect
    import torch
    import torchvision

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    isa = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")
                       if f in flags]
                break
    except OSError:
        pass
    ram_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    os_name = platform.platform()
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = f"{line.split('=', 1)[1].strip(chr(34))} (kernel {platform.release()})"
    except OSError:
        pass
    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cpu_isa": isa,
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gib": ram_gib,
        "os": os_name,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torchvision": torchvision.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "pyav": av.__version__,
        "ffmpeg": getattr(av, "ffmpeg_version_info", None),
        "libav": {k: ".".join(map(str, v)) for k, v in av.library_versions.items()},
        "opencv": cv2.__version__,
        "numpy": numpy.__version__,
        "h5py": f"{h5py.__version__} (HDF5 {h5py.version.hdf5_version})",
        "scenedetect": scenedetect.__version__,
        "loadavg": os.getloadavg(),
    }
    if video is not None:
        info["x264"] = x264_version(Path(video))
    return info


class ForeignCpu:
    """CPU seconds that other processes used while a block ran (contention indicator).

    System-wide busy time from ``/proc/stat`` minus this process's own CPU time (all its
    threads) and its waited-for children's. ``None`` where ``/proc/stat`` is missing.
    """

    def __enter__(self) -> "ForeignCpu":
        self.seconds: float | None = None
        self._start = (_system_busy_s(), _own_cpu_s())
        return self

    def __exit__(self, *exc) -> None:
        busy, own = _system_busy_s(), _own_cpu_s()
        if busy is not None and self._start[0] is not None:
            self.seconds = max(0.0, (busy - self._start[0]) - (own - self._start[1]))


def wait_for_quiet(max_wait_s: float, max_cores: float = 0.15, window_s: float = 2.0,
                   log=None) -> float | None:
    """Wait up to ``max_wait_s`` for a ``window_s`` during which other processes used less than
    ``max_cores`` cores. Returns the cores they used in the last window (None without /proc)."""
    if max_wait_s <= 0:
        return None
    deadline = time.monotonic() + max_wait_s
    said = False
    while True:
        with ForeignCpu() as fc:
            time.sleep(window_s)
        if fc.seconds is None:
            return None
        cores = fc.seconds / window_s
        if cores < max_cores or time.monotonic() >= deadline:
            return cores
        if log and not said:
            log(f"waiting up to {max_wait_s:.0f} s for other processes to go quiet "
                f"({cores:.1f} cores busy)")
            said = True


def own_cpu_s() -> float:
    """CPU seconds used so far by this process (all threads) and its waited-for children."""
    return _own_cpu_s()


def _system_busy_s() -> float | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    import resource

    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def best(values: list[float]) -> float:
    return min(values)


def spread(values: list[float]) -> str:
    """'best / median / worst' of repeated timings, for the human summary."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def verdict(value: float, target: float) -> str:
    return "PASS" if value <= target else "MISS"
