"""VGGish with ``vtx extract`` against video_features' ``vggish`` on a 3-minute 720p trailer.

The peer is `video_features <https://github.com/v-iashin/video_features>`_ (``feature_type=
vggish``). Every side runs as a child process, timed from spawn to exit (interpreter start,
imports and model load included, as a user sees it), best of ``--repeats``; each child also
reports its own split.

vtx, cached shots (target: at least as fast as the peer)
    ``vtx extract --features resnet18`` fills a cache once (untimed, its time is printed), then
    each repeat copies that cache to a fresh folder and times ``vtx extract --features vggish``
    into it: the video's shots are known, so vtx decodes the audio stream alone.
vtx, fresh cache (target: at most 1.3 times the peer)
    ``vtx extract --features vggish`` into an empty folder: vtx decodes the video frames too,
    for the shot table every cache holds (the peer finds no shots).
peer
    Where video_features is installed (``--peer-dir`` = a checkout, or an importable
    ``video_features`` package that has its ``main.py``) its CLI runs: ``python main.py
    feature_type=vggish device=cpu video_paths=[VIDEO] on_extraction=save_numpy ...``, with
    ``--peer-python`` as its interpreter (a command: ``"env PYTHONPATH=SITE python"`` for the
    packages ``bench/setup_peer.py`` installs, or a conda environment's python).
    ``bench/setup_peer.py`` makes a checkout runnable (its extra packages, a check for ``ffmpeg``,
    and on offline machines random checkpoints under the official names). Elsewhere the peer's
    steps run instead, in a child process: decode the audio to a 16 kHz mono 16-bit WAV file (the peer
    calls the ``ffmpeg`` CLI; the ``ffmpeg`` on ``PATH`` is used where there is one, else PyAV
    does the same decode + resample + PCM write in process), read the WAV back, log-mel
    examples (vtx's front end, ``vtx.io.audio.waveform_to_examples``, the reference framing the
    peer's ``vggish_input`` also computes), and VGGish in one batch of all examples, fp32 as the
    peer, with vtx's own model (``load_backbones([FEATURES["vggish"]], "random", ...,
    precision="fp32")``) so that the model costs the same; the embeddings are saved with
    ``np.save`` and the WAV removed, as the peer does.

    The emulation is *cheaper than the peer's code*, so the comparison is conservative: the
    peer's ``extract_wav_from_mp4`` runs ``ffmpeg`` twice (``-acodec copy`` to an ``.aac`` file,
    then that to a WAV at the source rate and channels), and its ``vggish_input`` then downmixes
    in NumPy and resamples to 16 kHz with ``resampy`` in Python; here one decode resamples in
    FFmpeg.

All vtx runs use ``--weights random`` (the machine is offline; same compute as the official
weights) and ``--precision`` (default ``auto``: bf16 on CPUs with AVX512-BF16).

Usage::

    python bench/vggish_vs_peer.py --workdir /tmp/vtx-bench-13 --repeats 3 --quiet-wait 60
    python bench/setup_peer.py /tmp/video_features --site /tmp/peer-site --random-weights
    python bench/vggish_vs_peer.py --peer-dir /tmp/video_features \
        --peer-python "env PYTHONPATH=/tmp/peer-site $(which python)" --json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (ForeignCpu, machine_info, make_video, spread, verdict,  # noqa: E402
                     wait_for_quiet)

TARGET_CACHED = 1.0  # vtx (cached shots) / peer
TARGET_FRESH = 1.3  # vtx (fresh cache) / peer


def log(msg: str) -> None:
    print(f"[vggish_vs_peer] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- peer's steps


def peer_steps(video: Path, tmp: Path, use_ffmpeg: bool) -> dict:
    """The peer's work on one video, in this (child) process; returns its split in seconds."""
    t0 = time.perf_counter()
    import numpy as np
    import torch

    from vtx.features import FEATURES
    from vtx.io import audio as audio_io
    from vtx.pipeline.backbones import load_backbones
    t_import = time.perf_counter()
    spec = FEATURES["vggish"]
    bb = load_backbones([spec], "random", device="cpu", precision="fp32")[spec.model_key]
    t_load = time.perf_counter()

    tmp.mkdir(parents=True, exist_ok=True)
    wav = tmp / f"{video.stem}.wav"
    ffmpeg = shutil.which("ffmpeg") if use_ffmpeg else None
    if ffmpeg:
        subprocess.run([ffmpeg, "-hide_banner", "-loglevel", "panic", "-y", "-i", str(video),
                        "-vn", "-ac", "1", "-ar", str(audio_io.SAMPLE_RATE), "-acodec",
                        "pcm_s16le", str(wav)], check=True)
    else:
        wav_with_pyav(video, wav)
    t_wav = time.perf_counter()

    samples = read_wav_s16(wav) / 32768.0  # as the peer's wavfile_to_examples
    examples = audio_io.waveform_to_examples(samples)  # (n, 96, 64)
    x = torch.tensor(examples).float()
    t_mel = time.perf_counter()

    with torch.no_grad():
        emb = bb(x)["vggish"].numpy()  # (n, 128), fp32, one batch
    t_model = time.perf_counter()
    np.save(tmp / f"{video.stem}_vggish.npy", emb)
    wav.unlink()
    t_end = time.perf_counter()
    return {"import_s": t_import - t0, "load_s": t_load - t_import, "wav_s": t_wav - t_load,
            "read_logmel_s": t_mel - t_wav, "model_s": t_model - t_mel,
            "save_s": t_end - t_model, "examples": int(len(emb)),
            "samples": int(len(samples)), "audio_decoder": "ffmpeg CLI" if ffmpeg else "PyAV"}


def wav_with_pyav(video: Path, wav: Path) -> None:
    """What ``ffmpeg -i VIDEO -vn -ac 1 -ar 16000 -acodec pcm_s16le OUT.wav`` does, with PyAV:
    decode the first audio stream, resample to 16 kHz mono s16, write a WAV file."""
    import av

    from vtx.io.audio import SAMPLE_RATE

    with av.open(str(video)) as src, av.open(str(wav), "w", format="wav") as dst:
        stream = src.streams.audio[0]
        out = dst.add_stream("pcm_s16le", rate=SAMPLE_RATE, layout="mono")
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        for frame in src.decode(stream):
            for r in resampler.resample(frame):
                dst.mux(out.encode(r))
        for r in resampler.resample(None):
            dst.mux(out.encode(r))
        dst.mux(out.encode(None))


def read_wav_s16(path: Path):
    """int16 samples of a mono 16-bit PCM WAV file (the peer reads it with soundfile)."""
    import wave

    import numpy as np

    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise SystemExit(f"{path}: expected 16-bit mono PCM")
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


# --------------------------------------------------------------------------- children


def run_child(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> dict:
    """Run a child process; its wall time (spawn to exit) and the CPU it and others used."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with ForeignCpu() as fc:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    # ForeignCpu leaves out this process's CPU and its waited-for children's: the child's too
    return {"wall_s": wall, "cpu_s": cpu, "foreign_cpu_s": fc.seconds, "stdout": proc.stdout}


VTX_CMD: list[str] | None = None  # --vtx-cmd


def vtx_cmd() -> list[str]:
    if VTX_CMD:
        return list(VTX_CMD)
    exe = Path(sys.executable).parent / "vtx"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "vtx.cli.main"]


def vtx_extract(video: Path, out: Path, features: str, precision: str) -> dict:
    r = run_child(vtx_cmd() + ["extract", "--videos", str(video), "--out", str(out),
                               "--features", features, "--weights", "random",
                               "--precision", precision, "--no-progress", "--quiet", "--json"])
    summary = json.loads(r.pop("stdout").strip().splitlines()[-1])
    if summary["failed"] or summary["done"] != 1:
        raise SystemExit(f"vtx extract did not extract {video}: {summary}")
    r["summary"] = summary
    return r


def find_peer(peer_dir: Path | None) -> Path | None:
    """A video_features checkout (the folder with its main.py), or None."""
    if peer_dir is not None:
        if not (peer_dir / "main.py").is_file():
            raise SystemExit(f"--peer-dir {peer_dir} has no main.py (a video_features checkout?)")
        return peer_dir
    spec = importlib.util.find_spec("video_features")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (Path(loc) / "main.py").is_file():
                return Path(loc)
    return None


PEER_PYTHON: list[str] | None = None  # --peer-python


def peer_version(peer: Path) -> str:
    """The checkout's commit where git knows it, else its folder."""
    try:
        head = subprocess.run(["git", "-C", str(peer), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        head = None
    if head is not None and head.returncode == 0 and head.stdout.strip():
        return f"commit {head.stdout.strip()} at {peer}"
    return f"at {peer}"


def peer_run(video: Path, tmp: Path, peer: Path | None, use_ffmpeg: bool) -> dict:
    if peer is not None:  # the real peer, through its CLI
        r = run_child((PEER_PYTHON or [sys.executable])
                      + ["main.py", "feature_type=vggish", "device=cpu",
                         f"video_paths=[{video.resolve()}]", "on_extraction=save_numpy",
                         f"output_path={tmp.resolve() / 'out'}",
                         f"tmp_path={tmp.resolve() / 'tmp'}"], cwd=peer)
        r.pop("stdout")
        r["split"] = None
        out = tmp / "out" / "vggish" / f"{video.stem}_vggish.npy"
        if not out.is_file():
            raise SystemExit(f"the peer wrote no features ({out} missing)")
        return r
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path.cwd()), env.get("PYTHONPATH")]))
    r = run_child([sys.executable, __file__, "--peer-steps", str(video), "--workdir", str(tmp)]
                  + ([] if use_ffmpeg else ["--no-ffmpeg"]), env=env)
    r["split"] = json.loads(r.pop("stdout").strip().splitlines()[-1])
    return r


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("video", nargs="?", type=Path,
                   help="video with sound [default: generate a 180 s 1280x720 trailer with a "
                        "tone track under --workdir]")
    p.add_argument("--seconds", type=float, default=180.0, help="length of the generated video")
    p.add_argument("--size", default="1280x720", help="WxH of the generated video")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/vtx-bench-vggish"),
                   help="folder for the generated video (reused) and the caches")
    p.add_argument("--precision", default="auto", help="vtx extract --precision [default: auto]")
    p.add_argument("--repeats", type=int, default=3, help="runs of each side; best reported")
    p.add_argument("--quiet-wait", type=float, default=0.0, metavar="SECONDS",
                   help="before each run wait up to this long for other processes to use "
                        "< 0.15 cores [default: 0]")
    p.add_argument("--peer-dir", type=Path, default=None,
                   help="a video_features checkout to run as the peer [default: an importable "
                        "video_features package, else the peer's steps]")
    p.add_argument("--peer-python", default=None, metavar="CMD",
                   help="the interpreter that runs the peer's main.py, split like a shell "
                        "would, e.g. \"env PYTHONPATH=SITE python\" [default: this python]")
    p.add_argument("--no-ffmpeg", action="store_true",
                   help="peer's steps: decode the audio with PyAV even if ffmpeg is on PATH")
    p.add_argument("--vtx-cmd", default=None, metavar="CMD",
                   help="the vtx command to time, split like a shell would (to compare another "
                        "checkout) [default: this environment's vtx]")
    p.add_argument("--skip-fresh", action="store_true", help="leave out the fresh-cache runs")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--peer-steps", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.vtx_cmd:
        global VTX_CMD
        VTX_CMD = shlex.split(args.vtx_cmd)
    if args.peer_python:
        global PEER_PYTHON
        PEER_PYTHON = shlex.split(args.peer_python)

    if args.peer_steps is not None:  # child: the peer's steps on one video
        print(json.dumps(peer_steps(args.peer_steps, args.workdir, not args.no_ffmpeg)))
        return None

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    if args.video is None:
        w, h = (int(v) for v in args.size.lower().split("x"))
        desc = make_video(work / f"trailer_{args.seconds:g}s_{w}x{h}.mp4", args.seconds, (w, h),
                          log=log, audio=True)
        video = Path(desc["path"])
    else:
        video, desc = args.video, {"path": str(args.video)}
        if not video.is_file():
            raise SystemExit(f"no such video: {video}")
    peer = find_peer(args.peer_dir)
    log(f"peer: {'video_features at ' + str(peer) if peer else 'the peer steps (not installed)'}")

    base = fresh_dir(work / "cache_resnet18") / "feats.h5"
    log("filling the cache with resnet18 (shots), untimed")
    seed_run = vtx_extract(video, base, "resnet18", args.precision)

    runs: dict[str, list[dict]] = {"peer": [], "vtx_cached": [], "vtx_fresh": []}
    for r in range(args.repeats):
        wait_for_quiet(args.quiet_wait, log=log)
        log(f"run {r + 1}/{args.repeats}: peer")
        runs["peer"].append(peer_run(video, fresh_dir(work / "peer"), peer, not args.no_ffmpeg))

        cached = work / "cache_cached"
        shutil.rmtree(cached, ignore_errors=True)
        shutil.copytree(base.parent, cached)  # feats.h5 + feats.h5.parts/: relative links
        wait_for_quiet(args.quiet_wait, log=log)
        log(f"run {r + 1}/{args.repeats}: vtx, vggish added to cached shots")
        runs["vtx_cached"].append(vtx_extract(video, cached / "feats.h5", "vggish",
                                              args.precision))
        if not args.skip_fresh:
            out = fresh_dir(work / "cache_fresh") / "feats.h5"
            wait_for_quiet(args.quiet_wait, log=log)
            log(f"run {r + 1}/{args.repeats}: vtx, vggish into a fresh cache")
            runs["vtx_fresh"].append(vtx_extract(video, out, "vggish", args.precision))

    def best(side: str) -> dict | None:
        return min(runs[side], key=lambda x: x["wall_s"]) if runs[side] else None

    peer_best = best("peer")
    result = {
        "benchmark": "vggish_vs_peer",
        "video": desc,
        "peer": (f"video_features CLI ({peer_version(peer)})" if peer
                 else "peer steps (video_features not installed)"),
        "precision": args.precision,
        "repeats": args.repeats,
        "resnet18_seed_run": seed_run,
        "runs": runs,
        "best_wall_s": {k: (best(k) or {}).get("wall_s") for k in runs},
        "machine": machine_info(video),
    }
    ratios = {}
    for side, target in (("vtx_cached", TARGET_CACHED), ("vtx_fresh", TARGET_FRESH)):
        b = best(side)
        if b is not None:
            ratio = b["wall_s"] / peer_best["wall_s"]
            ratios[side] = {"ratio": ratio, "target": target,
                            "verdict": verdict(ratio, target)}
    result["ratios_over_peer"] = ratios
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(summary(result))
    return result


def summary(r: dict) -> str:
    lines = [f"video: {Path(r['video']['path']).name} | peer: {r['peer']} | vtx precision "
             f"{r['precision']} | best of {r['repeats']}, process wall seconds (spawn to exit)"]
    for side, name in (("peer", "peer (fp32)"), ("vtx_cached", "vtx, vggish added to cached shots"),
                       ("vtx_fresh", "vtx, vggish into a fresh cache")):
        runs = r["runs"][side]
        if not runs:
            continue
        b = min(runs, key=lambda x: x["wall_s"])
        extra = ""
        if "summary" in b:
            extra = f"extract wall_s {b['summary']['wall_s']:.2f}"
        elif b.get("split"):
            s = b["split"]
            extra = (f"import {s['import_s']:.2f}, load {s['load_s']:.2f}, wav {s['wav_s']:.2f} "
                     f"({s['audio_decoder']}), read+log-mel {s['read_logmel_s']:.2f}, model "
                     f"{s['model_s']:.2f} ({s['examples']} examples)")
        foreign = ", ".join("?" if x["foreign_cpu_s"] is None else f"{x['foreign_cpu_s']:.1f}"
                            for x in runs)
        lines.append(f"  {name:36s} {b['wall_s']:7.2f}  runs {spread([x['wall_s'] for x in runs])}"
                     f"  CPU-s {b['cpu_s']:.2f}  | {extra} | foreign CPU-s: {foreign}")
    for side, v in r["ratios_over_peer"].items():
        lines.append(f"{side} / peer: {v['ratio']:.3f}  target <= {v['target']:.2f}: "
                     f"{v['verdict']}")
    seed = r["resnet18_seed_run"]
    lines.append(f"(resnet18 run that filled the cache: {seed['wall_s']:.1f} s)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
