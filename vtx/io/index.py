"""The cache's index layout: ``feats.h5`` is a small index of links into immutable part files.

A cache is two things side by side (see docs/FORMAT.md, "Layout"):

* ``feats.h5``, the *index*: the root attributes (the cache's settings); under ``/videos``
  and ``/failures``, one HDF5 *external link* per video into the part file that holds it; and
  ``/catalog``, a table of those entries with each video's summary (:func:`read_catalog`), so
  that planning a run or a merge opens no link and no part;
* ``feats.h5.parts/``, the *parts*: one small HDF5 file per finished video (or failure record),
  written once and never modified (:meth:`vtx.io.cache.CacheWriter.write_video`).

``h5py.File("feats.h5")["videos/<key>/resnet18"]`` follows the link, so a plain reader sees
one file. A merge (:func:`write_index`) writes a new index holding the old links plus those
of the new parts (patching a byte copy of the old index) and atomically replaces the old one:
it copies no feature data, and its cost grows with the number of entries (about 9 µs each),
not with the bytes cached.

A part file's name is ``<claim>-<time>-<random>.h5``: ``claim`` is
:func:`vtx.io.claims.claim_name` of the video's key (so a worker finds a video's parts by
name), ``time`` the nanoseconds since the epoch when it was written, which orders the versions
of one video. A part that an index no longer links (an older version of a video, a failure
record a later success replaced) is deleted by the merge that replaced it.

A cache written before this layout (``feats.h5`` holding the groups themselves) is converted by
its first merge without copying: the file is hard-linked into the parts folder as a *base*
part (``base-<time>-<random>.h5``, older than every other part), and the new index links into
it. :func:`compact` does the reverse on demand: one self-contained file.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

VIDEOS = "videos"
FAILURES = "failures"
LAYOUT_ATTR = "layout"
CATALOG = "catalog"
"""The index's table of its entries (datasets ``key``, ``group`` (0 videos, 1 failures),
``part``, ``obj`` and ``record``, the video's summary as JSON), so that finding what a cache
holds reads five datasets, no link and no part."""
INDEX = "index"
PARTS_ATTR = "parts"
"""Index root attr: the parts folder's name its links point into."""
"""Value of the index's ``layout`` root attribute (a self-contained cache has none)."""


@dataclass(frozen=True)
class Entry:
    """Where one video (or failure record) of a cache lives.

    Attributes:
        file: the part file's name, relative to the parts folder; ``None`` for a group stored
            in the cache file itself (a self-contained cache).
        obj: the group's path inside that file.
        time: the part's time (nanoseconds; 0 for a base part or the cache file itself).
    """

    file: str | None
    obj: str
    time: int
    record: dict | None = None
    """The video's summary (:func:`group_record`), from the index's ``/catalog``."""
    raw: str | None = field(default=None, compare=False, repr=False)
    """The record's JSON as the catalog holds it (written back as it is when the entry is
    kept; ``record`` is None when the catalog was read without parsing the records)."""
    cataloged: bool = field(default=False, compare=False, repr=False)
    """Read from the catalog (so the link is known to be as the entry says)."""


def part_name(claim: str) -> str:
    """A new part file name (without suffix) for a video whose claim name is ``claim``."""
    return f"{claim}-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"


def part_time(name: str) -> int:
    """The time in a part file's name (0 for a base part; names of older vtx releases,
    ``<time>-<random>``, are understood too)."""
    stem = name.rsplit("/", 1)[-1].split(".", 1)[0]
    if len(stem) >= 41 and stem[20] == "-" and stem[21:41].isdigit():  # <claim>-<time>-...
        return int(stem[21:41])
    if stem.startswith("base-"):
        return 0
    fields = stem.split("-")
    for f in fields:
        if len(f) == 20 and f.isdigit():
            return int(f)
    return int(fields[0]) if fields and fields[0].isdigit() else 0


def read_index(f: h5py.File, records: bool = True
               ) -> tuple[dict[str, Entry], dict[str, Entry]]:
    """The video and failure entries of an open cache file: from the index's ``/catalog`` when
    it is intact (a few dataset reads, no link opened), else from the links or groups.

    Args:
        records: parse the videos' records (``Entry.record``); a merge keeps them as read.
    """
    catalog = read_catalog(f, records)
    out = []
    for i, group in enumerate((VIDEOS, FAILURES)):
        g = f.get(group)
        if g is None:
            out.append({})
            continue
        mine = catalog[i] if catalog is not None else {}
        if catalog is not None and len(mine) == len(g):  # the catalog covers the group
            out.append(mine)
            continue
        entries = {}
        for key in g:
            link = g.get(key, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                name = link.filename.split("/", 1)[-1]
                entries[key] = Entry(name, link.path, part_time(name))
            else:
                entries[key] = Entry(None, f"/{group}/{key}", 0)
        out.append(entries)
    return out[0], out[1]


def read_entries(f: h5py.File, group: str) -> dict[str, Entry]:
    """The entries under ``/videos`` or ``/failures`` (:func:`read_index`)."""
    videos, failures = read_index(f)
    return videos if group == VIDEOS else failures


def link_folders(f: h5py.File) -> set[str]:
    """The folder names the index's links point into (one, the parts folder, unless the cache
    was renamed): the ``parts`` root attr of an index, else read from the links."""
    if PARTS_ATTR in f.attrs:
        return {str(_plain(f.attrs[PARTS_ATTR]))}
    out = set()
    for group in (VIDEOS, FAILURES):
        g = f.get(group)
        for key in g if g is not None else ():
            link = g.get(key, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                out.add(link.filename.rsplit("/", 1)[0] if "/" in link.filename else "")
    return out


def group_record(g: h5py.Group) -> dict:
    """A video group's summary: ``path``, ``size_bytes``, ``datasets`` (every name) and
    ``features`` (the datasets a model wrote: those with a ``model`` attr)."""
    names = sorted(g)
    return {"path": str(g.attrs.get("path", "")), "size_bytes": int(g.attrs.get("size_bytes", -1)),
            "datasets": names, "features": [n for n in names if "model" in g[n].attrs]}


def read_catalog(f: h5py.File, records: bool = True
                 ) -> tuple[dict[str, Entry], dict[str, Entry]] | None:
    """The index's ``/catalog`` as (video entries, failure entries); None when it is absent or
    damaged (the caller reads the links instead)."""
    try:
        if CATALOG not in f or not isinstance(f[CATALOG], h5py.Group):
            return None
        c = f[CATALOG]
        keys, parts, objs, raws = (list(c[n].asstr()[()]) for n in ("key", "part", "obj",
                                                                     "record"))
        groups = c["group"][()]
        parsed = (json.loads("[" + ",".join(r or "null" for r in raws) + "]") if records
                  else [None] * len(raws))  # one parse for every record
    except (OSError, KeyError, ValueError, RuntimeError, TypeError):
        return None  # a damaged catalog: the links are read instead
    out: tuple[dict, dict] = ({}, {})
    for key, grp, part, obj, raw, rec in zip(keys, groups, parts, objs, raws, parsed):
        out[int(grp)][key] = Entry(part, obj, part_time(part), rec, raw or None, True)
    return out


def is_index(f: h5py.File) -> bool:
    """Whether an open cache file is an index (its groups are links into parts); decided by
    its links when the ``layout`` attribute cannot be read (damaged root attributes)."""
    try:
        return str(_plain(f.attrs.get(LAYOUT_ATTR, ""))) == INDEX
    except (OSError, KeyError, ValueError, RuntimeError, TypeError):
        g = f.get(VIDEOS)
        return g is not None and any(
            isinstance(g.get(k, getlink=True), h5py.ExternalLink) for k in g)


def _plain(value):
    return value.decode() if isinstance(value, bytes) else value


def link_base(cache: Path, parts: Path) -> str:
    """Hard-link a self-contained cache file into ``parts`` as a base part; returns its name.

    Falls back to a copy on a filesystem without hard links (once per cache).
    """
    name = f"base-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.h5"
    target = parts / name
    try:
        os.link(cache, target)
    except OSError:
        import shutil
        tmp = parts / (name + ".tmp")
        shutil.copyfile(cache, tmp)
        os.replace(tmp, target)
    return name


def write_index(tmp: Path, parts_dir: str, root: dict, videos: dict[str, Entry],
                failures: dict[str, Entry], old: tuple[dict, dict] | None = None) -> None:
    """Write an index at ``tmp``: ``root`` attrs, one external link per entry (relative to the
    index's folder; ``parts_dir`` is the parts folder's name) and the catalog.

    Args:
        tmp: an empty HDF5 file (space reserved), or, with ``old``, a byte copy of the current
            index to patch.
        old: the current index's (videos, failures) entries: only the links that changed are
            removed or created, so the cost of a merge hardly grows with the links kept.
    """
    with h5py.File(tmp, "a") as f:
        for k, v in root.items():
            f.attrs[k] = v
        f.attrs[LAYOUT_ATTR] = INDEX
        f.attrs[PARTS_ATTR] = parts_dir
        columns: dict[str, list] = {n: [] for n in ("key", "group", "part", "obj", "record")}
        for i, (group, entries) in enumerate(((VIDEOS, videos), (FAILURES, failures))):
            g = f.require_group(group)
            links, lcpl, lapl = g.id.links, g._lcpl, g._lapl  # h5py's own link properties
            before = old[i] if old is not None else {}
            for key in sorted(set(before) - set(entries)):
                g.id.unlink(key.encode())
            for key in sorted(entries):
                e = entries[key]
                if e.file is None:
                    raise ValueError(f"entry {key} has no part file")
                was = before.get(key)
                if was is None or (was.file, was.obj) != (e.file, e.obj):
                    if was is not None:
                        g.id.unlink(key.encode())
                    links.create_external(key.encode(), f"{parts_dir}/{e.file}".encode(),
                                          e.obj.encode(), lcpl=lcpl, lapl=lapl)
                columns["key"].append(key)
                columns["group"].append(i)
                columns["part"].append(e.file)
                columns["obj"].append(e.obj)
                columns["record"].append(e.raw if e.raw is not None else
                                         json.dumps(e.record, sort_keys=True)
                                         if e.record is not None else "")
        if CATALOG in f:
            del f[CATALOG]
        c = f.create_group(CATALOG)
        for name, values in columns.items():
            dtype = np.uint8 if name == "group" else h5py.string_dtype()
            c.create_dataset(name, data=np.array(values, dtype=dtype), shape=(len(values),))


def patchable(index_file: Path, n_entries: int) -> bool:
    """Whether a merge may patch a copy of ``index_file`` rather than write a fresh one: the
    space of each replaced catalog stays in the file, so once it is over three times what a
    fresh index of ``n_entries`` takes, the next merge writes a fresh one (amortised)."""
    return index_file.stat().st_size <= 3 * ((64 << 10) + 700 * n_entries)


def index_bytes(n_entries: int) -> int:
    """Bytes to reserve for an index of ``n_entries`` links (generous)."""
    return (1 << 20) + 1024 * n_entries
