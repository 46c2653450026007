"""``vtx info``: what a feature cache or a training run holds, without writing h5py code.

* A cache (``feats.h5``, read through :class:`vtx.io.reader.CacheReader`): its videos, their
  total duration and shots, each feature with its weights identity, row level, row shape, rows
  and bytes (features named by :mod:`vtx.features`, which knows every dataset a feature
  writes), the other datasets, the shot and frame settings, and the failures with their
  reasons.
* A run folder (or one of its checkpoints, read with :func:`vtx.train.checkpoint.read_checkpoint`
  and ``metrics.jsonl``): the head and its config, the data it was trained on, the best epoch
  and its metric, and the files.

:func:`describe` picks by what the path is; :func:`format_info` prints the result for people
(``--json`` prints the dict).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vtx.errors import UsageError

__all__ = ["cache_info", "describe", "format_info", "run_info"]

#: Datasets every video has whatever the features (the shot and frame axes).
AXES = ("shots", "shot_times", "frames", "frame_times")


def describe(path: str | os.PathLike) -> dict:
    """:func:`cache_info` for an HDF5 file, :func:`run_info` for a run folder or a checkpoint.

    Raises:
        UsageError: nothing at ``path``, or neither a cache, a run folder nor a checkpoint.
    """
    import h5py

    path = Path(path)
    if path.is_dir():
        return run_info(path)
    if not path.exists():
        raise UsageError(f"{path} does not exist; give a feature cache (feats.h5), a run folder "
                         f"(runs/NAME) or a checkpoint (.pt)")
    if h5py.is_hdf5(path):
        return cache_info(path)
    return run_info(path)


# --------------------------------------------------------------------------- caches
def cache_info(path: str | os.PathLike) -> dict:
    """Summary of a feature cache.

    Returns:
        ``{"kind": "cache", "path", "file_bytes", "layout", "index_bytes", "parts",
        "not_merged", "vtx_version", "schema_version", "videos", "duration_s", "shots", "sampled_frames", "shot_config", "frame_config", "features",
        "other_datasets", "failures"}``. ``features`` has one entry per feature: ``name``,
        ``identity`` (the root ``features`` attr), ``model``, ``level``, ``row_shape``,
        ``dtype``, ``videos`` (how many have it), ``rows``, ``bytes`` (HDF5 storage of all its
        datasets) and ``datasets``; ``other_datasets`` the same counts for the shot and frame
        axes; ``failures`` ``{"path", "reason", "time"}`` per failed video. ``layout`` is
        ``index`` (``feats.h5`` links into ``parts`` part files; ``file_bytes`` counts the
        index and those parts, ``not_merged`` the finished parts no merge linked yet) or
        ``one file``.
    """
    from vtx.features import resolve
    from vtx.io.reader import CacheReader

    path = Path(path)
    stats: dict[str, dict] = {}  # dataset -> videos, rows, bytes, row_shape, level, attrs
    n_videos, duration, shots, frames = 0, 0.0, 0, 0
    with CacheReader(path) as cache:
        root = cache.root_attrs()
        identities = cache.features
        shot_config, frame_config = cache.shot_config, cache.frame_config
        for video in cache.videos():
            n_videos += 1
            duration += float(video.attrs.get("duration_s", 0.0))
            for name in video.datasets:
                shape = cache.shape(video.key, name)
                s = stats.get(name)
                if s is None:
                    s = stats[name] = {"videos": 0, "rows": 0, "bytes": 0,
                                       "row_shape": list(shape[1:]),
                                       "level": cache.level(video.key, name),
                                       "attrs": cache.dataset_attrs(video.key, name)}
                s["videos"] += 1
                s["rows"] += shape[0] if shape else 1
                s["bytes"] += cache.storage_bytes(video.key, name)
                if name == "shots":
                    shots += shape[0]
                elif name == "frames":
                    frames += shape[0]
        failures = [{"path": str(f.get("path", key)), "reason": str(f.get("reason", "")),
                     "time": str(f.get("time", ""))} for key, f in cache.failures().items()]

    # Each feature owns the datasets the registry says it writes; unknown ones own themselves.
    names = list(identities) + sorted(n for n, s in stats.items()
                                      if n not in identities and "model" in s["attrs"])
    features, owned = [], set()
    for name in names:
        spec = resolve(name)
        datasets = [d for d in (spec.dataset_names if spec else (name,)) if d in stats]
        owned.update(datasets)
        main = stats.get(name, {"videos": 0, "rows": 0, "row_shape": [], "level": None,
                                "attrs": {}})
        features.append({
            "name": name,
            "identity": identities.get(name, main["attrs"].get("weights", "unknown")),
            "model": main["attrs"].get("model", spec.builder if spec else None),
            "level": main["level"] or (spec.level if spec else None),
            "row_shape": main["row_shape"],
            "dtype": main["attrs"].get("dtype"),
            "videos": main["videos"],
            "rows": main["rows"],
            "bytes": sum(stats[d]["bytes"] for d in datasets),
            "datasets": datasets,
        })
    other = [{"name": n, "level": s["level"], "row_shape": s["row_shape"], "videos": s["videos"],
              "rows": s["rows"], "bytes": s["bytes"]}
             for n, s in sorted(stats.items()) if n not in owned]
    layout = _layout(path)
    return {
        "kind": "cache", "path": str(path), **layout,
        "vtx_version": root.get("vtx_version"), "schema_version": root.get("schema_version"),
        "videos": n_videos, "duration_s": round(duration, 3), "shots": shots,
        "sampled_frames": frames, "shot_config": _json_or_none(shot_config),
        "frame_config": _json_or_none(frame_config), "features": features,
        "other_datasets": other, "failures": failures,
    }


def _layout(path: Path) -> dict:
    """``file_bytes``, ``layout``, ``index_bytes``, ``parts`` and ``not_merged`` of a cache."""
    import h5py

    from vtx.io import index

    with h5py.File(path, "r") as f:
        videos, failures = index.read_index(f, records=False)
    files = {e.file for e in (*videos.values(), *failures.values()) if e.file}
    parts = path.with_name(path.name + ".parts")
    linked = sum((parts / n).stat().st_size for n in files if (parts / n).exists())
    waiting = [p for p in parts.glob("*.h5") if p.name not in files
               and not p.name.startswith("base-")] if parts.is_dir() else []
    size = path.stat().st_size
    return {"file_bytes": size + linked, "layout": "index" if files else "one file",
            "index_bytes": size, "parts": len(files), "not_merged": len(waiting)}


def _json_or_none(text: str | None):
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# --------------------------------------------------------------------------- runs
def run_info(path: str | os.PathLike) -> dict:
    """Summary of a training run folder (its ``best.pt``, else ``last.pt``) or of a checkpoint.

    Returns:
        ``{"kind": "run", "path", "checkpoint", "checkpoint_epoch", "head", "head_config", "parameters", "task",
        "classes", "trained_on": {"features", "labels", "feature_identities", "shot_config",
        "frame_config", "level"}, "train_config", "best": {"epoch", "metric", "value",
        "val_metrics"}, "epochs_run", "epochs", "stopped_early", "files"}``: ``best`` from ``metrics.jsonl`` (the
        checkpoint's own epoch and metrics without it); ``files`` lists ``{"name", "bytes"}``
        of the run folder.

    Raises:
        UsageError: not a run folder or a vtx checkpoint.
    """
    from vtx.train.checkpoint import read_checkpoint
    from vtx.train.metrics import primary_metric
    from vtx.train.run_files import RunFiles, read_records

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    files = RunFiles(folder)
    if path.is_dir():
        ckpt_path = files.best if files.best.is_file() else files.last
        if not ckpt_path.is_file():
            raise UsageError(f"{path} holds no best.pt or last.pt; give a vtx train-head --out "
                             f"folder, a checkpoint or a feature cache")
    else:
        ckpt_path = path
    ckpt = read_checkpoint(ckpt_path)
    records = read_records(files.metrics, 10**9) if files.metrics.is_file() else []
    train_config = ckpt.get("train_config") or {}
    has_val = any(r.get("val_loss") is not None for r in records) or bool(ckpt.get("metrics"))
    key, _ = primary_metric(ckpt["task"])
    metric = f"val_{key}" if has_val else "train_loss"
    best = next((r for r in reversed(records) if r.get("best")), None)  # the best.pt epoch
    best_epoch = best["epoch"] if best else ckpt["epoch"]
    value = best.get(metric) if best else ckpt.get("best_metric")
    val_metrics = ({k[4:]: v for k, v in best.items() if k.startswith("val_") and v is not None}
                   if best else ckpt.get("metrics") or {})
    epochs_run = max((r["epoch"] for r in records), default=ckpt["epoch"])
    epochs = train_config.get("epochs")
    return {
        "kind": "run", "path": str(path), "checkpoint": str(ckpt_path),
        "head": ckpt["head"], "head_config": ckpt["head_config"],
        "parameters": int(sum(t.numel() for t in ckpt["state_dict"].values())),
        "task": ckpt["task"], "classes": list(ckpt["vocab"]),
        "trained_on": {
            "features": train_config.get("features"), "labels": train_config.get("labels"),
            "feature_identities": {n: a.get("weights") for n, a in ckpt["features"].items()},
            "level": ckpt.get("level"), "shot_config": _json_or_none(ckpt.get("shot_config")),
            "frame_config": _json_or_none(ckpt.get("frame_config")),
        },
        "train_config": train_config,
        "checkpoint_epoch": ckpt["epoch"],
        "best": {"epoch": best_epoch, "metric": metric, "value": value,
                 "val_metrics": val_metrics},
        "epochs_run": epochs_run, "epochs": epochs,
        "stopped_early": bool(epochs and epochs_run < epochs),
        "files": [{"name": p.name, "bytes": p.stat().st_size}
                  for p in sorted(folder.iterdir()) if p.is_file()
                  and not p.name.startswith(".")] if path.is_dir() or records else
                 [{"name": path.name, "bytes": path.stat().st_size}],
    }


# --------------------------------------------------------------------------- text
def _bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _table(rows: list[tuple[str, ...]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _config_text(config) -> str:
    if isinstance(config, dict):
        return ", ".join(f"{k} {v}" for k, v in config.items())
    return "none" if config is None else str(config)


def format_info(info: dict) -> str:
    """The result of :func:`describe` as text for people."""
    return (_format_cache if info["kind"] == "cache" else _format_run)(info)


def _format_cache(c: dict) -> str:
    lines = [f"{c['path']}: {c['videos']} videos, {c['duration_s'] / 60:.1f} min of video, "
             f"{c['shots']} shots"
             + (f", {c['sampled_frames']} sampled frames" if c["sampled_frames"] else "")
             + f"; {len(c['failures'])} failed; {_bytes(c['file_bytes'])} "
             f"(vtx {c['vtx_version']}, schema {c['schema_version']})",
             (f"layout: index of {c['parts']} part file(s) ({_bytes(c['index_bytes'])} index)"
              if c["layout"] == "index" else "layout: one file")
             + (f"; {c['not_merged']} finished part(s) not merged yet (vtx merge)"
                if c["not_merged"] else ""),
             f"shots: {_config_text(c['shot_config'])}"]
    if c["frame_config"] is not None:
        lines.append(f"frames: {_config_text(c['frame_config'])}")
    if c["features"]:
        lines.append("features:")
        rows = [("name", "level", "row shape", "videos", "rows", "bytes", "identity")]
        rows += [(f["name"], str(f["level"]), "x".join(map(str, f["row_shape"])) or "-",
                  str(f["videos"]), str(f["rows"]), _bytes(f["bytes"]), str(f["identity"]))
                 for f in c["features"]]
        lines += _table(rows)
    if c["other_datasets"]:
        lines.append("other datasets: " + ", ".join(
            f"{d['name']} ({d['rows']} rows, {_bytes(d['bytes'])})" for d in c["other_datasets"]))
    if c["failures"]:
        lines.append("failures:")
        lines += [f"  {f['path']}: {f['reason']}" for f in c["failures"]]
    return "\n".join(lines)


def _format_run(r: dict) -> str:
    on, best = r["trained_on"], r["best"]
    value = "n/a" if best["value"] is None else f"{best['value']:.4f}"
    stop = ", stopped early" if r["stopped_early"] else ""
    lines = [f"{r['path']}: head {r['head']} ({r['parameters']:,} parameters), {r['task']}"
             + (f", {len(r['classes'])} classes: {', '.join(r['classes'])}" if r["classes"]
                else ""),
             f"head config: {_config_text(r['head_config'])}",
             f"trained on: {on['features']} ({on['level']} tokens: " + ", ".join(
                 f"{n} {w}" for n, w in on["feature_identities"].items()) + f"), labels "
             f"{on['labels']}",
             f"best: epoch {best['epoch']}, {best['metric']} {value} ({r['epochs_run']} of "
             f"{r['epochs']} epochs run{stop})",
             f"checkpoint: {r['checkpoint']} (epoch {r['checkpoint_epoch']})"]
    if best["val_metrics"]:
        lines.append("val at best: " + ", ".join(f"{k} {v:.4f}"
                                                   for k, v in best["val_metrics"].items()))
    settings = {k: v for k, v in r["train_config"].items()
                if k not in ("head", "features", "labels", "out", "head_options")}
    if settings:
        lines.append(f"training: {_config_text(settings)}")
    lines.append("files: " + ", ".join(f"{f['name']} ({_bytes(f['bytes'])})" for f in r["files"]))
    return "\n".join(lines)
