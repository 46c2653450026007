"""``vtx check``: read every byte of a feature cache, list the damaged videos, and remove them.

:func:`check_cache` opens the cache read-only and reads, video by video, every attr and every
dataset (chunk by chunk, so memory stays small). HDF5 verifies each chunk's Fletcher-32
checksum as it reads it (vtx writes every dataset with one, see :func:`vtx.io.cache.write_dataset`),
so a changed byte in feature data is found, and so is any broken structure (an object header, a
heap, a B-tree) that HDF5 stumbles over. The report lists the damaged videos with the dataset
and the reason, the state of the root attributes (the cache's settings) and of ``/failures``,
and how many datasets carry checksums: caches written before vtx wrote them read as before, but
damage in their data cannot be detected, and the report says so.

:func:`repair_cache` (``vtx check --repair``) writes a new cache holding everything that read
back intact, under the cache's lock and with its space reserved first, and then atomically
replaces the old file: the damaged videos are gone, so the next ``vtx extract`` recomputes only
those. Root attributes that cannot be read are rebuilt from the intact videos (the shot table's
detector settings, the sampled frames' ``config`` and each feature's ``weights`` attr), so that
a later extract is still refused when its settings differ. A cache whose list of videos cannot
be read at all cannot be repaired; the error says to extract it again with ``--overwrite``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py

from vtx import SCHEMA_VERSION, __version__
from vtx.errors import CacheDamaged, DiskFull, ReadOnly
from vtx.features import dataset_spec
from vtx.io import index
from vtx.io.cache import FAILURES, VIDEOS, CacheLock
from vtx.io.reader import DAMAGE_ERRORS, CacheNotFoundError, damage_reason, key_path
from vtx.io.space import (create_reserved, free_bytes, human, is_read_only,
                          replaced_atomically, writable_reason)
from vtx.progress import progress as progress_bar

__all__ = ["CheckReport", "VideoDamage", "check_cache", "repair_cache"]

ROOT_ATTRS = ("vtx_version", "schema_version", "shot_config", "frame_config", "features")
"""The root attrs vtx writes (docs/FORMAT.md)."""


@dataclass
class VideoDamage:
    """One damaged video.

    Attributes:
        key: its group name under ``/videos``.
        path: its relative path (from the key).
        problems: ``(dataset, reason)``; dataset is None for the group itself (its header or
            attrs).
    """

    key: str
    path: str
    problems: list[tuple[str | None, str]] = field(default_factory=list)


@dataclass
class CheckReport:
    """What :func:`check_cache` found (and :func:`repair_cache` did).

    Attributes:
        path: the cache file.
        videos: videos listed under ``/videos``.
        datasets: datasets read.
        bytes_read: bytes of data read and verified.
        with_checksums: datasets written with a Fletcher-32 checksum.
        without_checksums: datasets without one (written before vtx added them).
        unreadable: why the file or its list of videos cannot be read at all (then nothing
            can be repaired), else None.
        root: root attrs that cannot be read, with the reason.
        damaged: the damaged videos.
        failures_damaged: ``/failures`` records that cannot be read.
        removed: keys of the videos a repair removed.
        rebuilt: root attrs a repair rebuilt from the intact videos.
        repaired: a repair replaced the file.
    """

    path: str
    videos: int = 0
    datasets: int = 0
    bytes_read: int = 0
    with_checksums: int = 0
    without_checksums: int = 0
    unreadable: str | None = None
    root: dict[str, str] = field(default_factory=dict)
    damaged: list[VideoDamage] = field(default_factory=list)
    failures_damaged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    rebuilt: list[str] = field(default_factory=list)
    repaired: bool = False

    @property
    def ok(self) -> bool:
        """Nothing damaged was found."""
        return (self.unreadable is None and not self.root and not self.damaged
                and not self.failures_damaged)

    @property
    def checksums(self) -> str:
        """``all``, ``none`` or ``some``: which datasets carry a Fletcher-32 checksum."""
        if not self.without_checksums:
            return "all"
        return "none" if not self.with_checksums else "some"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["damaged"] = [{"key": v.key, "path": v.path,
                         "problems": [{"dataset": n, "reason": r} for n, r in v.problems]}
                        for v in self.damaged]
        d["ok"] = self.ok
        d["checksums"] = self.checksums
        return d

    def lines(self) -> list[str]:
        """The report in words, one finding per line."""
        out = [f"{self.path}: {self.videos} videos, {self.datasets} datasets, "
               f"{human(self.bytes_read)} of data read"]
        if self.unreadable:
            out.append(f"UNREADABLE: {self.unreadable}")
        for name, reason in self.root.items():
            out.append(f"DAMAGED root attribute {name!r}: {reason}")
        for v in self.damaged:
            for name, reason in v.problems:
                where = f"dataset {name!r}" if name else "the video's group"
                out.append(f"DAMAGED video {v.path!r}: {where}: {reason}")
        for key in self.failures_damaged:
            out.append(f"DAMAGED failure record {key_path(key)!r}")
        if self.checksums == "none" and self.datasets:
            out.append("note: this cache carries no checksums (written before vtx added them): "
                       "damaged feature data cannot be detected, only broken structure. "
                       "Re-extract it with --overwrite to add them")
        elif self.checksums == "some":
            out.append(f"note: {self.without_checksums} of {self.datasets} datasets carry no "
                       f"checksum (written before vtx added them); damage in their data cannot "
                       f"be detected")
        if self.repaired:
            done = []
            if self.removed:
                done.append(f"removed {len(self.removed)} damaged video(s) "
                            f"({', '.join(key_path(k) for k in self.removed)})")
            if self.rebuilt:
                done.append(f"rebuilt the root attribute(s) {', '.join(self.rebuilt)} from the "
                            f"intact videos")
            if self.failures_damaged:
                done.append(f"dropped {len(self.failures_damaged)} unreadable failure record(s)")
            out.append("repaired: " + "; ".join(done or ["rewrote the cache"])
                       + ("; rerun the same vtx extract to recompute the removed videos"
                          if self.removed else ""))
        elif self.ok:
            out.append("ok: no damage found")
        elif self.unreadable:
            out.append("cannot be repaired: extract the videos again with vtx extract --overwrite")
        else:
            found = [f"{len(self.damaged)} damaged video(s)"] if self.damaged else []
            if self.root:
                found.append(f"{len(self.root)} damaged root attribute(s)")
            if self.failures_damaged:
                found.append(f"{len(self.failures_damaged)} damaged failure record(s)")
            out.append(f"{', '.join(found)}; run vtx check {self.path} --repair to remove the "
                       f"damaged videos (and rebuild the root attributes from the intact ones), "
                       f"then rerun the same vtx extract to recompute what was removed")
        return out


def _read_attrs(obj) -> dict:
    return {k: obj.attrs[k] for k in obj.attrs}


def _check_dataset(ds: h5py.Dataset, report: CheckReport) -> None:
    """Read every attr and every chunk of ``ds`` (HDF5 verifies the checksums)."""
    _read_attrs(ds)
    report.datasets += 1
    if ds.fletcher32:
        report.with_checksums += 1
    else:
        report.without_checksums += 1
    if ds.chunks is None or ds.size == 0:
        data = ds[()]
        report.bytes_read += getattr(data, "nbytes", 0)
        return
    for sel in ds.iter_chunks():
        report.bytes_read += ds[sel].nbytes


def _check_video(videos: h5py.Group, key: str, report: CheckReport) -> VideoDamage | None:
    damage = VideoDamage(key=key, path=key_path(key))
    try:
        g = videos[key]
        _read_attrs(g)
        names = list(g)
    except DAMAGE_ERRORS as e:
        damage.problems.append((None, damage_reason(e)))
        return damage
    for name in names:
        try:
            _check_dataset(g[name], report)
        except DAMAGE_ERRORS as e:
            damage.problems.append((name, damage_reason(e)))
    return damage if damage.problems else None


def check_cache(path: str | os.PathLike, progress: bool = True) -> CheckReport:
    """Read every attr and dataset of the cache at ``path`` and report what is damaged.

    Raises:
        CacheNotFoundError: no file at ``path``.
    """
    path = Path(path)
    if not path.is_file():
        raise CacheNotFoundError(f"feature cache {path} does not exist")
    report = CheckReport(path=str(path))
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        report.unreadable = f"HDF5 cannot open the file ({damage_reason(e)})"
        return report
    with f:
        _check_root(f, report)
        try:
            videos = f.get(VIDEOS)
            keys = sorted(videos) if videos is not None else []
        except DAMAGE_ERRORS as e:
            report.unreadable = f"the list of videos under /{VIDEOS}: {damage_reason(e)}"
            return report
        report.videos = len(keys)
        for key in progress_bar(keys, desc="check", unit="video", enabled=progress):
            damage = _check_video(videos, key, report)
            if damage is not None:
                report.damaged.append(damage)
        report.failures_damaged = _check_failures(f)
    return report


def _check_root(f: h5py.File, report: CheckReport) -> None:
    try:
        names = list(f.attrs)
    except DAMAGE_ERRORS as e:
        report.root = {"(all)": damage_reason(e)}
        return
    for name in names:
        try:
            value = f.attrs[name]
            if name == "features":
                json.loads(value)
        except DAMAGE_ERRORS as e:
            report.root[name] = damage_reason(e)


def _check_failures(f: h5py.File) -> list[str]:
    try:
        groups = f.get(FAILURES)
        keys = sorted(groups) if groups is not None else []
    except DAMAGE_ERRORS:
        return [f"/{FAILURES}"]
    bad = []
    for key in keys:
        try:
            _read_attrs(groups[key])
        except DAMAGE_ERRORS:
            bad.append(key)
    return bad


# ----------------------------------------------------------------------------- repair
def repair_cache(path: str | os.PathLike, progress: bool = True) -> CheckReport:
    """Check the cache, and if anything is damaged, replace it by a copy without the damaged
    videos (see the module docstring). Holds the cache's lock throughout.

    Raises:
        CacheInUse: a vtx extract is writing the cache.
        CacheDamaged: the cache cannot be repaired (its list of videos cannot be read).
        ReadOnly: the cache's folder cannot be written.
        DiskFull: the repaired copy does not fit; the cache is untouched.
    """
    path = Path(path)
    if not path.is_file():
        raise CacheNotFoundError(f"feature cache {path} does not exist")
    reason = writable_reason(path.parent)
    if reason is not None:
        raise ReadOnly(f"--repair rewrites {path}, but {reason}; copy the cache to a writable "
                       f"folder and repair the copy")
    try:
        lock = CacheLock(path)
    except OSError as e:
        if is_read_only(e):
            raise ReadOnly(f"--repair rewrites {path}, but {path.parent} cannot be written "
                           f"({e.strerror or e})") from e
        raise
    with lock:
        report = check_cache(path, progress)
        if report.ok:
            return report
        if report.unreadable:
            raise CacheDamaged(
                f"feature cache {path} cannot be repaired: {report.unreadable}. Extract the "
                f"videos again into a new cache (vtx extract ... --overwrite)")
        _rewrite(path, report)
    return report


def _rewrite(path: Path, report: CheckReport) -> None:
    with h5py.File(path, "r") as f:
        try:
            linked = index.is_index(f)
        except DAMAGE_ERRORS:
            linked = False  # the list of videos cannot be read: a copy tells what can
    if linked:
        _rewrite_index(path, report)
        return
    size = path.stat().st_size
    need = size + size // 50 + (4 << 20)
    free = free_bytes(path.parent)
    if free < need:
        raise DiskFull(_full_message(path, need, free))
    tmp = path.with_name(path.name + ".repair-tmp")
    tmp.unlink(missing_ok=True)
    damaged = {v.key for v in report.damaged}
    with replaced_atomically(tmp, path, lambda: _full_message(path, need,
                                                              free_bytes(path.parent))):
        with h5py.File(path, "r") as src:
            keys = [k for k in sorted(src[VIDEOS]) if k not in damaged] if VIDEOS in src else []
            root, rebuilt = _root_attrs(src, report, keys)
            create_reserved(tmp, need, root)
            with h5py.File(tmp, "r+") as dst:
                videos, failures = dst.create_group(VIDEOS), dst.create_group(FAILURES)
                for key in keys:
                    src.copy(src[VIDEOS][key], videos, name=key)
                if "/" + FAILURES not in report.failures_damaged and FAILURES in src:
                    for key in sorted(src[FAILURES]):
                        if key not in report.failures_damaged:
                            src.copy(src[FAILURES][key], failures, name=key)
    report.removed = sorted(damaged)
    report.rebuilt = rebuilt
    report.repaired = True


def _rewrite_index(path: Path, report: CheckReport) -> None:
    """Repair an index-layout cache: a new index without the damaged videos' links (no data is
    copied), then their part files are deleted."""
    parts = path.with_name(path.name + ".parts")
    tmp = path.with_name(path.name + ".repair-tmp")
    tmp.unlink(missing_ok=True)
    damaged = {v.key for v in report.damaged}
    with h5py.File(path, "r") as src:
        videos = index.read_entries(src, VIDEOS)
        failures = ({} if "/" + FAILURES in report.failures_damaged else
                    {k: e for k, e in index.read_entries(src, FAILURES).items()
                     if k not in report.failures_damaged})
        keep = {k: e for k, e in videos.items() if k not in damaged}
        root, rebuilt = _root_attrs(src, report, sorted(keep))
    root.pop(index.LAYOUT_ATTR, None)
    need = index.index_bytes(len(keep) + len(failures))
    free = free_bytes(path.parent)
    if free < need:
        raise DiskFull(_full_message(path, need, free))
    with replaced_atomically(tmp, path, lambda: _full_message(path, need,
                                                              free_bytes(path.parent))):
        create_reserved(tmp, need)
        index.write_index(tmp, parts.name, root, keep, failures)
    linked = {e.file for e in (*keep.values(), *failures.values())}
    for e in videos.values():
        if e.file and e.file not in linked:
            (parts / e.file).unlink(missing_ok=True)
    report.removed = sorted(damaged)
    report.rebuilt = rebuilt
    report.repaired = True


def _full_message(path: Path, need: int, free: int) -> str:
    return (f"no space left on the device of {path.parent}: --repair writes a repaired copy of "
            f"{path} first, which needs about {human(need)}, and {human(free)} is free. Nothing "
            f"was changed. Free at least {human(max(need - free, 1))} more there and run vtx "
            f"check --repair again")


def _root_attrs(src: h5py.File, report: CheckReport, keys: Iterable[str]
                ) -> tuple[dict, list[str]]:
    """The root attrs of the repaired cache: those that read back, the others rebuilt from the
    intact videos ``keys``. Returns ``(attrs, names rebuilt)``."""
    attrs = {}
    try:
        names = list(src.attrs)
    except DAMAGE_ERRORS:
        names = list(ROOT_ATTRS)
    for name in names:
        if name in report.root:
            continue
        try:
            attrs[name] = _plain(src.attrs[name])
        except DAMAGE_ERRORS:
            pass
    lost = "(all)" in report.root
    missing = [n for n in ROOT_ATTRS if n not in attrs and (lost or n in report.root)]
    rebuilt: list[str] = []
    if not missing:
        return attrs, rebuilt
    found = _settings_from_videos(src, keys)
    found["vtx_version"], found["schema_version"] = __version__, SCHEMA_VERSION
    for name in missing:
        if name in found:
            attrs[name] = found[name]
            rebuilt.append(name)
    return attrs, rebuilt


def _settings_from_videos(src: h5py.File, keys: Iterable[str]) -> dict:
    """``shot_config``, ``frame_config`` and ``features`` as the intact videos record them."""
    out: dict = {}
    features: dict[str, str] = {}
    for key in keys:
        g = src[VIDEOS][key]
        if "shot_config" not in out and "shots" in g:
            a = g["shots"].attrs
            if all(k in a for k in ("detector", "threshold", "min_shot_len", "max_shot_len")):
                max_len = float(a["max_shot_len"])
                out["shot_config"] = json.dumps(
                    {"detector": _plain(a["detector"]), "max_shot_len": max_len or None,
                     "min_shot_len": _plain(a["min_shot_len"]),
                     "threshold": float(a["threshold"])}, sort_keys=True)
        if "frame_config" not in out and "frames" in g and "config" in g["frames"].attrs:
            out["frame_config"] = _plain(g["frames"].attrs["config"])
        for name in g:
            found = dataset_spec(name)
            if found is None or found[1].name != found[0].datasets[0].name:
                continue
            a = g[name].attrs
            if "weights" not in a:
                continue
            identity = str(_plain(a["weights"]))
            gop = "+gop-normalised"
            if found[0].kind == "codec" and bool(a.get("gop_normalised", False)) \
                    and gop not in identity:  # codec attrs keep --gop-normalise apart
                identity = identity.replace("codec", "codec" + gop, 1)
            features.setdefault(found[0].name, identity)
    if features:
        out["features"] = json.dumps(features, sort_keys=True)
    return out


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    return value.item() if hasattr(value, "item") else value
