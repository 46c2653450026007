"""The ``vtx`` command line. Each command parses its options into a config dataclass and makes
one library call, so everything here can also be done from Python."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from vtx import __version__
from vtx.cli.config_file import config_option
from vtx.errors import CacheDamaged, DiskFull, ReadOnly, VtxError

EXIT_CODES = """\b
Exit codes:
  0  every video was extracted (or was already in the cache; a
     read-only cache with nothing to do also exits 0)
  1  unexpected internal error
  2  bad usage or setup: invalid options, missing weights, cache made
     with other settings, a read-only --out that must be written
  3  some videos failed (each is listed on stderr and under /failures
     in the cache); all others were extracted
  4  --overwrite while other vtx processes extract into the cache
  5  disk full: the message names the path and the space needed; the
     cache is untouched and finished videos are kept for the rerun
  6  the cache is damaged (vtx check --repair removes damaged videos)"""

CHECK_EXIT_CODES = """\b
Exit codes:
  0  no damage found (or --repair removed it)
  2  bad usage: no such file, read-only folder with --repair
  4  --repair: the cache is in use by another vtx process
  5  --repair: disk full (the cache is untouched)
  6  damaged videos found (without --repair), or the cache cannot be
     repaired"""


MAINTENANCE_EXIT_CODES = """\b
Exit codes:
  0  done
  2  bad usage: no such cache, read-only folder
  5  disk full (the cache is untouched)
  6  the cache (or a finished part) is damaged"""


def _fail(e: VtxError) -> None:
    click.echo(f"vtx: error: {e}", err=True)
    sys.exit(e.exit_code)


class _Group(click.Group):
    """vtx's commands. A full disk or a read-only place met outside vtx's own checks (a
    checkpoint write, say) still gets its one-paragraph error and exit code, not a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except OSError as e:
            from vtx.io.space import is_disk_full, is_read_only

            where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
            if is_disk_full(e):
                _fail(DiskFull(f"no space left on the device{where} ({e.strerror or e}); free "
                               f"space there (or write to another disk) and rerun the same "
                               f"command"))
            if is_read_only(e):
                _fail(ReadOnly(f"cannot write{where} ({e.strerror or e}); make that folder "
                               f"writable or choose another output path"))
            raise


@click.group(cls=_Group,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="vtx")
def cli() -> None:
    """vtx: long-video understanding. Stage 1 caches shot features (`vtx extract`); stage 2
    trains small transformer heads over them."""


QUIET_HELP = "No progress on stderr (errors, warnings and the result still print)."
PRECISION_HELP = ("Model precision: auto (fp16 on CUDA; bf16 on a CPU with AVX512_BF16 or "
                  "AMX, else fp32), fp32, bf16 (CPU with native bf16, or CUDA) or fp16 (CUDA "
                  "only). Features agree with fp32 to a centred cosine >= 0.99; each dataset "
                  "records its precision (docs/FORMAT.md).")


@cli.command(epilog=EXIT_CODES)
@config_option()
@click.option("--videos", required=True, multiple=True, type=click.Path(path_type=Path),
              help="A folder of videos (searched recursively), a video file, a list file "
                   "(.txt/.lst/.list: one path per line, relative to the list file; # starts a "
                   "comment line) or - to read such a list from stdin. Repeatable. Cache keys "
                   "are paths relative to the folder holding every input (docs/FORMAT.md); a "
                   "listed file that does not exist is a failed video.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="HDF5 cache to create or complete, e.g. feats.h5.")
@click.option("--features", default="resnet18,r2plus1d", show_default=True,
              help="Comma list of features: resnet18, r2plus1d (per shot); vit, vit_patches, "
                   "motion, residual (per sampled frame); vggish (audio); or all. Any "
                   "torchvision classification model: tv:<builder>[:<WEIGHTS>][@shot|@frame], "
                   "e.g. tv:convnext_tiny, tv:efficientnet_b0@frame, tv:r3d_18 (16-frame "
                   "clips; tv:r3d_18@shot:8 for 8). `vtx features` lists them all.")
@click.option("--device", default="auto", show_default=True,
              help="auto (CUDA when available), cpu, cuda or cuda:N.")
@click.option("--precision", default="auto", show_default=True,
              type=click.Choice(["auto", "fp32", "bf16", "fp16"]), help=PRECISION_HELP)
@click.option("--detector", default="content", show_default=True,
              type=click.Choice(["content", "adaptive", "threshold", "histogram", "hash"]),
              help="PySceneDetect detector used to cut shots.")
@click.option("--threshold", type=float, default=None,
              help="Detector threshold [default: the detector's own: content 27, adaptive 3, "
                   "threshold 12, histogram 0.05, hash 0.395].")
@click.option("--min-shot-len", default="15", show_default=True,
              help="Minimum shot length: frames (15) or seconds (0.6s).")
@click.option("--max-shot-len", type=float, default=None,
              help="Split shots longer than this many seconds into equal parts [default: off].")
@click.option("--frame-rate", type=float, default=1.0, show_default=True,
              help="Frame-level features: sample this many frames per second (by PTS).")
@click.option("--frames-per-video", type=int, default=None,
              help="Frame-level features: sample N frames uniformly over the whole video "
                   "instead (VTN uses 250).")
@click.option("--vit-weights", default="IMAGENET1K_V1", show_default=True,
              help="Member of torchvision's ViT_B_16_Weights, e.g. IMAGENET1K_SWAG_E2E_V1.")
@click.option("--vggish-pca", is_flag=True,
              help="Apply VGGish's official PCA, whitening and 0..255 quantisation.")
@click.option("--motion-grid", type=int, default=14, show_default=True,
              help="Side of the grid motion fields are resized to.")
@click.option("--residual-size", type=int, default=56, show_default=True,
              help="Side of the stored motion-compensated residuals.")
@click.option("--gop-normalise", is_flag=True,
              help="For motion/residual: re-encode a temporary copy to MPEG-4 Part 2, GOP 12, "
                   "no B-frames (as CoViAR and MM-ViT) before extracting.")
@click.option("--full-frame-grids", is_flag=True,
              help="Spatial grids (vit_patches, motion, residual) and the ViT cover the whole "
                   "frame, resized to a square, instead of the ViT's centre crop (default).")
@click.option("--weights", default="official", show_default=True,
              type=click.Choice(["official", "random"]),
              help="official: torchvision weights via the torch hub cache; random: seeded "
                   "random init, marked as such in the cache.")
@click.option("--weights-dir", type=click.Path(path_type=Path), default=None,
              help="Folder with the official weight files [default: $TORCH_HOME/hub/checkpoints].")
@click.option("--overwrite", is_flag=True, help="Discard an existing cache and start afresh.")
@click.option("--batch-size", type=int, default=16, show_default=True,
              help="Shots per model batch (batches span videos).")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Videos decoded in parallel.")
@click.option("--glob", "globs", multiple=True,
              help="Recursive glob(s) relative to each --videos folder (and each folder in a "
                   "list), e.g. '**/*.mp4' (repeatable) [default: common video extensions]; "
                   "video files given or listed are taken whatever their extension.")
@click.option("--dtype", default="float16", show_default=True,
              type=click.Choice(["float16", "float32"]), help="Storage type of features.")
@click.option("--shard", default=None, metavar="K/N|auto",
              help="Extract only shard K of N (0-based), picked by a hash of each video's "
                   "relative path: stable whatever the listing order. For Slurm arrays: "
                   "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; auto: torchrun's "
                   "RANK/WORLD_SIZE, and LOCAL_RANK picks cuda:N.")
@click.option("--merge/--no-merge", "merge", default=True, show_default=True,
              help="Link finished videos into the cache's index at the start and end of the "
                   "run. With --no-merge they wait in feats.h5.parts/ until `vtx merge`.")
@click.option("--lease", "lease_s", type=float, default=600.0, show_default=True,
              help="Seconds after which a claim on a video whose worker stopped refreshing it "
                   "(a lost machine) is taken over.")
@click.option("--engine", default="local", show_default=True,
              type=click.Choice(["local", "ray"]),
              help="local: this process; ray: workers (actors) on a Ray cluster, each loading "
                   "the models once (pip install 'vtx[ray]').")
@click.option("--address", default=None,
              help="--engine ray: the cluster (auto, ray://HOST:PORT) [default: a local Ray "
                   "instance on 127.0.0.1].")
@click.option("--ray-workers", type=int, default=None,
              help="--engine ray: workers to start [default: as many as the cluster's CPUs "
                   "(GPUs) allow for --cpus-per-worker (--gpus-per-worker)]; each decodes one "
                   "video at a time (--workers applies to local runs).")
@click.option("--cpus-per-worker", type=float, default=1.0, show_default=True,
              help="--engine ray: CPUs each worker reserves (also its torch threads).")
@click.option("--gpus-per-worker", type=float, default=0.0, show_default=True,
              help="--engine ray: GPUs each worker reserves (0: CPU workers).")
@click.option("--quiet", "-q", is_flag=True, help=QUIET_HELP)
@click.option("--progress/--no-progress", default=True, hidden=True,
              help="Old spelling: --no-progress is --quiet.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def extract(videos, out, features, device, precision, detector, threshold, min_shot_len,
            max_shot_len, frame_rate, frames_per_video, vit_weights, vggish_pca, motion_grid,
            residual_size, gop_normalise, full_frame_grids, weights, weights_dir, overwrite,
            batch_size, workers, globs, dtype, shard, merge, lease_s, engine, address, ray_workers,
            cpus_per_worker, gpus_per_worker, quiet, progress, as_json) -> None:
    """Decode each video once, cut it into shots and cache per-shot features in HDF5.

    Rerunning the same command resumes: finished videos are skipped, and only missing
    features are computed. Any number of extract processes (or --shard K/N workers, or
    --engine ray) may write one cache at once: each video is claimed by one of them, and
    merges only link the new parts into the index (see docs/FORMAT.md). Every dataset carries a Fletcher-32 checksum (verify a cache with
    `vtx check`). A full disk stops the run with exit code 5 and loses nothing finished; a
    read-only cache with nothing to do exits 0. See docs/FORMAT.md for the cache layout.

    Progress is a bar on a terminal and a line every few seconds in a log (--quiet: none).
    Options can also come from --config extract.toml.
    """
    from vtx.pipeline.extract import ExtractConfig, extract as run_extract, parse_features
    from vtx.pipeline.sampling import FrameSampling
    from vtx.pipeline.shots import ShotConfig

    try:
        config = ExtractConfig(
            videos=tuple(videos), out=out, features=parse_features(features), device=device,
            precision=precision,
            shots=ShotConfig(detector=detector, threshold=threshold, min_shot_len=min_shot_len,
                             max_shot_len=max_shot_len),
            frames=FrameSampling(frame_rate=frame_rate, frames_per_video=frames_per_video),
            vit_weights=vit_weights, vggish_pca=vggish_pca, motion_grid=motion_grid,
            residual_size=residual_size, gop_normalise=gop_normalise,
            full_frame_grids=full_frame_grids, weights=weights, weights_dir=weights_dir, overwrite=overwrite,
            batch_size=batch_size, workers=workers, globs=tuple(globs), dtype=dtype,
            progress=progress and not quiet, shard=shard, merge=merge, lease_s=lease_s,
            engine=engine, address=address, ray_workers=ray_workers,
            cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
        )
        summary = run_extract(config)
    except VtxError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(summary.to_dict()))
    else:
        click.echo(summary.line())
    sys.exit(3 if summary.failed else 0)


@cli.command("features")
@click.argument("names", nargs=-1)
@click.option("--dtype", default="float16", show_default=True,
              type=click.Choice(["float16", "float32"]),
              help="Storage type assumed for the bytes per video-minute.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list on stdout.")
def features_(names, dtype, as_json) -> None:
    """List every feature `vtx extract --features` takes: the built-ins, then each torchvision
    classification model as tv:<builder>[@frame]. With NAMES, describe just those.

    Columns: name, row level (shot, frame or audio), row shape, model, weights identity, and
    uncompressed bytes per video-minute (20 shots a minute, 1 frame per second, one audio
    example per 0.96 s).
    """
    from vtx.features import catalogue, describe, parse_feature

    try:
        specs = [parse_feature(n) for n in names] if names else catalogue()
    except VtxError as e:
        _fail(e)
    rows = [describe(s, dtype) for s in specs]
    if as_json:
        click.echo(json.dumps(rows))
        return
    head = ("name", "level", "row shape", "model", "weights", "bytes/min")
    table = [head] + [(r["name"], r["level"], "x".join(map(str, r["row_shape"])),
                       str(r["model"] or "codec"), r["weights"], f"{r['bytes_per_minute']:,}")
                      for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


@cli.command()
@click.option("--out", default="demo-out", show_default=True, type=click.Path(path_type=Path),
              help="Folder for the synthetic videos, the cache, the runs and the explanation.")
@click.option("--videos", "n_videos", default=128, show_default=True,
              help="Labelled videos to synthesise (at least 24), plus one held out.")
@click.option("--epochs", default=80, show_default=True, help="Training epochs per head.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--seed", default=0, show_default=True,
              help="Seeds the synthetic videos, the random weights, the splits and training.")
@click.option("--quiet", "-q", is_flag=True, help="No progress; the [demo] lines still print.")
@click.option("--progress/--no-progress", default=True, hidden=True,
              help="Old spelling: --no-progress is --quiet.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
def demo(out, n_videos, epochs, device, seed, quiet, progress, as_json) -> None:
    """Run the whole job end to end on synthetic trailers, offline: synthesise labelled videos,
    extract, train STAN and mean pooling, evaluate both, and explain a held-out prediction.

    Falls back to --weights random (and says so loudly) when official weights are unavailable.
    """
    from vtx.demo import DemoConfig, run_demo

    try:
        result = run_demo(DemoConfig(out=out, n_videos=n_videos, epochs=epochs, device=device,
                                     progress=progress and not quiet, seed=seed))
    except VtxError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(result.to_dict()))


@cli.command(epilog="""\b
Exit codes:
  0  every video got a prediction
  1  unexpected internal error
  2  bad usage: unreadable checkpoint, missing weights, ...
  3  some videos could not be predicted: not decodable, or no token for
     the head (the others were predicted)""")
@click.argument("videos", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", required=True, type=click.Path(path_type=Path),
              help="A checkpoint written by vtx train-head (runs/NAME/best.pt).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--precision", default="auto", show_default=True,
              type=click.Choice(["auto", "fp32", "bf16", "fp16"]), help=PRECISION_HELP)
@click.option("--top-k", default=5, show_default=True, help="Labels to print per video.")
@click.option("--explain", type=click.Path(path_type=Path), default=None,
              help="Write a PNG: shot thumbnails with the CLS attention each received, and the "
                   "top labels (one file per video when several are given).")
@click.option("--weights-dir", type=click.Path(path_type=Path), default=None,
              help="Folder with the official backbone weights [default: torch hub cache].")
@click.option("--quiet", "-q", is_flag=True, help=QUIET_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per video.")
def predict(videos, model, device, precision, top_k, explain, weights_dir, quiet, as_json) -> None:
    """Print the top labels of each VIDEO, extracting the features the model needs on the fly
    (same stage-1 code, no cache file)."""
    from vtx.train.predict import PredictConfig, format_predictions, predict as run_predict

    try:
        preds = run_predict(PredictConfig(videos=tuple(videos), model=model, device=device,
                                          precision=precision,
                                          top_k=top_k, explain=explain,
                                          weights_dir=weights_dir, progress=not quiet))
    except VtxError as e:
        _fail(e)
    if as_json:
        for p in preds:
            click.echo(json.dumps(p.to_dict()))
    else:
        click.echo(format_predictions(preds))
    for p in preds:
        if p.error:
            click.echo(f"vtx: failed: {p.video}: {p.error}", err=True)
    sys.exit(3 if any(p.error for p in preds) else 0)


@cli.command(epilog=MAINTENANCE_EXIT_CODES)
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def merge(cache, as_json) -> None:
    """Link every finished video in CACHE.parts/ into the index CACHE (after workers ran with
    --no-merge, or were killed), and delete the unfinished parts of workers that died.

    Safe while workers are still extracting: a merge in progress elsewhere is waited for, and
    parts finished later are merged by the next merge. Copies no feature data: the cost grows
    with the number of videos linked, not with their bytes.
    """
    from vtx.io.cache import merge_cache

    try:
        report = merge_cache(cache)
    except VtxError as e:
        _fail(e)
    click.echo(json.dumps(report.to_dict()) if as_json else report.line())


@cli.command(epilog=MAINTENANCE_EXIT_CODES)
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Write the self-contained file here and leave CACHE as it is [default: "
                   "replace CACHE and delete the parts it folded].")
@click.option("--quiet", "-q", is_flag=True, help=QUIET_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def compact(cache, out, quiet, as_json) -> None:
    """Fold CACHE's index and every part it links into one self-contained HDF5 file, e.g. to
    copy or publish it as a single file (docs/FORMAT.md, "Copying or moving a cache").

    Finished parts are merged first. Reads and writes every byte of the cache once; later
    extracts into a compacted cache add parts again as usual.
    """
    from vtx.io.cache import compact_cache

    try:
        report = compact_cache(cache, out, progress=not quiet)
    except VtxError as e:
        _fail(e)
    click.echo(json.dumps(report.to_dict()) if as_json else report.line())


@cli.command(epilog=CHECK_EXIT_CODES)
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--repair", is_flag=True,
              help="Remove the damaged videos (the others are kept), so that the next vtx "
                   "extract recomputes only those.")
@click.option("--quiet", "-q", is_flag=True, help=QUIET_HELP)
@click.option("--progress/--no-progress", default=True, hidden=True,
              help="Old spelling: --no-progress is --quiet.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def check(cache, repair, quiet, progress, as_json) -> None:
    """Read every attribute and dataset of CACHE (a feats.h5), verifying each chunk's
    Fletcher-32 checksum, and list the damaged videos with the dataset and the reason.

    Caches written before vtx stored checksums still read; the report says they carry none
    (damaged data in them cannot be detected, only broken structure). --repair writes a copy
    without the damaged videos and atomically replaces the cache (unreadable root attributes
    are rebuilt from the intact videos).
    """
    from vtx.io.check import check_cache, repair_cache

    try:
        report = (repair_cache if repair else check_cache)(cache, progress=progress and not quiet)
    except VtxError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        for line in report.lines():
            click.echo(line)
    sys.exit(0 if report.ok or report.repaired else CacheDamaged.exit_code)


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def info(path, as_json) -> None:
    """Show what PATH holds: a feature cache (feats.h5) or a training run (runs/NAME, or one of
    its .pt checkpoints).

    \b
    A cache: videos, total duration, shots, each feature with its weights
    identity, row level, row shape, rows and bytes, the shot and frame
    settings, and the failed videos with their reasons.
    A run: the head and its config, the data it was trained on, the best
    epoch and its metric, and the files.
    """
    from vtx.info import describe, format_info

    try:
        result = describe(path)
    except VtxError as e:
        _fail(e)
    click.echo(json.dumps(result) if as_json else format_info(result))


from vtx.cli.train import train_head, evaluate  # noqa: E402
cli.add_command(train_head); cli.add_command(evaluate)


def main() -> None:  # pragma: no cover
    cli()


if __name__ == "__main__":  # pragma: no cover
    main()
