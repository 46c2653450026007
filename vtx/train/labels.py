"""Label files: which target each cached video has, and which split it belongs to.

Two formats are read (``vtx train --labels FILE``):

1. vtx CSV, with a header naming its columns::

       video,labels,split            video,value
       trailers/abc.mp4,Action|Drama,train     abc,7.5
       def,Comedy,val

   ``labels`` holds one class, or several separated by ``|`` (multi-label, e.g. the
   MMX-Trailer-20 genres of STAN, Section 4); ``value`` holds a number (regression).
   ``split`` (``train``/``val``/``test``) is optional. An empty ``labels`` field
   (``clip.mp4,,train``) is a video to which no class applies: in a multi-label task it is an
   all-negative target (dropping such videos would bias the training set towards positives);
   it makes the inferred task multi-label, and a multi-class task refuses it.

2. The LVU benchmark's task files (Wu & Kraehenbuehl, "Towards Long-Form Video
   Understanding", CVPR 2021; used by STAN, Table 2) as distributed: space-separated,
   with one of the headers

       class_id class_name youtube_id imdb_id        (relationship, scene, genre, ...)
       like_count dislike_count youtube_id imdb_id   (like_ratio)
       view_count youtube_id imdb_id                 (view_count)

   Videos are keyed by ``youtube_id``. Class ids give the vocabulary order. Regression
   targets follow LVU's reference code (``src/data/video_data_helper.py``):
   ``like = like_count / (like_count + dislike_count) * 10`` and ``view = ln(view_count)``.
   LVU additionally subtracts a training-set mean (9.1382 and 11.7643); that shift
   is left to the model, since it changes neither the ranking of models nor the MSE of a
   prediction made on the same scale.
   ``--labels`` may also name an LVU task folder holding ``train.csv``, ``val.csv`` and
   ``test.csv``; each row then takes its split from its file name.

A row's ``video`` is matched to a cached video by the cache's ``path`` attribute (the POSIX
path relative to the extracted folder), first in full, then by file stem, so ``abc`` and
``trailers/abc.mp4`` both label ``trailers/abc.mp4``.

Without a split column (and outside an LVU folder), each video goes to ``val`` when the
first 8 bytes of ``sha1(video)`` (the string as written, UTF-8), read as a big-endian
integer divided by 2**64, fall below ``val_frac``, and to ``train`` otherwise. The split
is the same on every run and machine, and adding rows never moves existing ones.
"""

from __future__ import annotations

import csv
import hashlib
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from vtx.errors import UsageError

TASKS = ("multilabel", "multiclass", "regression")
SPLITS = ("train", "val", "test")
CSV_COLUMNS = ("video", "labels", "value", "split")
LVU_CLASS_HEADER = ("class_id", "class_name", "youtube_id", "imdb_id")
LVU_LIKE_HEADER = ("like_count", "dislike_count", "youtube_id", "imdb_id")
LVU_VIEW_HEADER = ("view_count", "youtube_id", "imdb_id")
LVU_HEADERS = (LVU_CLASS_HEADER, LVU_LIKE_HEADER, LVU_VIEW_HEADER)
LVU_SPLIT_FILES = tuple(f"{s}.csv" for s in SPLITS)


class LabelError(UsageError, ValueError):
    """A label file cannot be used as it is; the message names the line and the fix."""


def _normalize(video: str) -> str:
    """Canonical POSIX form of a video reference: ``./a\\b.mp4`` -> ``a/b.mp4``."""
    return PurePosixPath(video.strip().replace("\\", "/")).as_posix()


def hash_split(key: str, val_frac: float) -> str:
    """``"val"`` for about ``val_frac`` of all keys, else ``"train"``; stable everywhere."""
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")
    return "val" if h / 2.0**64 < val_frac else "train"


@dataclass
class LabelSet:
    """Targets and splits of the labeled videos.

    Targets are stored readably: a tuple of class names (multilabel), one class name
    (multiclass) or a float (regression). ``target_array`` turns them into arrays.
    """

    task: str
    vocab: list[str]
    targets: dict[str, object]
    splits: dict[str, str]
    _by_path: dict[str, str] = field(init=False, repr=False, compare=False)
    _by_stem: dict[str, list[str]] = field(init=False, repr=False, compare=False)
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.task not in TASKS:
            raise LabelError(f"unknown task {self.task!r}; valid tasks: {', '.join(TASKS)}")
        if self.task == "regression" and self.vocab:
            raise LabelError("a regression label set has no class vocabulary")
        if len(set(self.vocab)) != len(self.vocab):
            raise LabelError(f"the class vocabulary repeats names: {self.vocab}")
        if set(self.targets) != set(self.splits):
            raise LabelError("targets and splits must name the same videos")
        bad = sorted({s for s in self.splits.values() if s not in SPLITS})
        if bad:
            raise LabelError(f"unknown split(s) {bad}; valid splits: {', '.join(SPLITS)}")
        self._index = {name: i for i, name in enumerate(self.vocab)}
        self._by_path, self._by_stem = {}, {}
        for key in self.targets:
            norm = _normalize(key)
            if norm in self._by_path:
                raise LabelError(f"videos {self._by_path[norm]!r} and {key!r} name the same file")
            self._by_path[norm] = key
            self._by_stem.setdefault(PurePosixPath(norm).stem, []).append(key)

    def match(self, path: str) -> str | None:
        """The key labeling a cached video, or None when the video is unlabeled.

        Args:
            path: the cache's ``path`` attribute, e.g. ``trailers/abc.mp4``.

        Raises:
            LabelError: only the stem matches, and it matches several keys.
        """
        norm = _normalize(path)
        if norm in self._by_path:
            return self._by_path[norm]
        stem = PurePosixPath(norm).stem
        if stem in self._by_path:                     # the key is the bare stem
            return self._by_path[stem]
        keys = self._by_stem.get(stem, [])
        if len(keys) > 1:
            raise LabelError(f"cached video {path!r} matches several labeled videos by its "
                             f"stem {stem!r}: {keys}; write the full relative path "
                             f"{norm!r} in the label file")
        return keys[0] if keys else None

    def target_array(self, key: str) -> np.ndarray:
        """Multi-hot float32 (C,) (all zeros for a video with no class), int64 class index
        (), or float32 value ()."""
        target = self.targets[key]
        if self.task == "multilabel":
            out = np.zeros(len(self.vocab), dtype=np.float32)   # (C,)
            out[[self._index[name] for name in target]] = 1.0
            return out
        if self.task == "multiclass":
            return np.asarray(self._index[target], dtype=np.int64)
        return np.asarray(target, dtype=np.float32)

    def keys(self, split: str | None = None) -> list[str]:
        """Keys in file order, all of them or those of one split."""
        if split is not None and split not in SPLITS:
            raise LabelError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        return [k for k, s in self.splits.items() if split is None or s == split]


# --------------------------------------------------------------------------- parsing


@dataclass
class _Row:
    where: str            # "file:line", for messages
    key: str
    target: object        # label name(s) or float
    split: str | None


@dataclass
class _Parsed:
    kind: str             # "csv-labels", "csv-value", "lvu-class", "lvu-like", "lvu-view"
    rows: list[_Row]
    lvu_classes: dict[int, tuple[str, str]] = field(default_factory=dict)  # id -> (name, where)


def _first_line(path: Path) -> tuple[int, str] | None:
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                return lineno, line
    return None


def _parse_file(path: Path) -> _Parsed:
    try:
        first = _first_line(path)
    except UnicodeDecodeError as e:
        raise LabelError(f"{path}: not a UTF-8 text file ({e}); save the labels as UTF-8 CSV")
    if first is None:
        raise LabelError(f"{path} is empty; it needs a header line such as 'video,labels' "
                         "or 'video,value', then one row per video")
    lineno, line = first
    tokens = tuple(t.lower() for t in line.split())
    if "," not in line and "youtube_id" in tokens:
        if tokens not in LVU_HEADERS:
            known = "; ".join(" ".join(h) for h in LVU_HEADERS)
            raise LabelError(f"{path}:{lineno}: unrecognized LVU header {line.strip()!r}; "
                             f"supported LVU headers: {known}")
        return _parse_lvu(path, tokens)
    return _parse_csv(path)


def _parse_csv(path: Path) -> _Parsed:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = None
        for cells in reader:
            if any(c.strip() for c in cells):
                header = [c.strip().lower() for c in cells]
                break
        where = f"{path}:{reader.line_num}"
        if header is None:
            raise LabelError(f"{path} is empty; it needs a header line such as 'video,labels'")
        _check_csv_header(header, where)
        col = {name: i for i, name in enumerate(header)}
        kind = "csv-labels" if "labels" in col else "csv-value"
        rows = []
        for cells in reader:
            where = f"{path}:{reader.line_num}"
            if not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                raise LabelError(f"{where}: {len(cells)} fields, but the header names "
                                 f"{len(header)} ({','.join(header)}); quote fields that "
                                 "contain commas")
            video = cells[col["video"]].strip()
            if not video:
                raise LabelError(f"{where}: empty 'video' field; give the video's path "
                                 "relative to the extracted folder, or its file stem")
            if kind == "csv-labels":
                target = _parse_label_field(cells[col["labels"]], where)
            else:
                target = _parse_number(cells[col["value"]], "value", where)
            split = None
            if "split" in col:
                split = cells[col["split"]].strip().lower()
                if split not in SPLITS:
                    raise LabelError(f"{where}: split {cells[col['split']].strip()!r} is not "
                                     f"one of {', '.join(SPLITS)}")
            rows.append(_Row(where, video, target, split))
    return _Parsed(kind, rows)


def _check_csv_header(header: list[str], where: str) -> None:
    if not set(header) & set(CSV_COLUMNS):
        hint = ("; columns are separated by commas"
                if len(header) == 1 and len(header[0].split()) > 1 else "")
        raise LabelError(f"{where}: missing header; the first line must name the columns, "
                         f"e.g. 'video,labels' or 'video,value' (got {','.join(header)!r}), "
                         "or be an LVU header such as 'class_id class_name youtube_id "
                         f"imdb_id'{hint}")
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise LabelError(f"{where}: column(s) {dup} appear more than once in the header")
    unknown = [h for h in header if h not in CSV_COLUMNS]
    if unknown:
        hint = " (rename 'label' to 'labels')" if "label" in unknown else ""
        raise LabelError(f"{where}: unknown column(s) {unknown}{hint}; valid columns: "
                         f"video, then labels or value, then optionally split")
    if "video" not in header:
        raise LabelError(f"{where}: the header has no 'video' column; add one holding each "
                         "video's relative path or file stem")
    if ("labels" in header) == ("value" in header):
        raise LabelError(f"{where}: the header needs exactly one of 'labels' (classes) and "
                         "'value' (regression targets)")


def _parse_label_field(text: str, where: str) -> tuple[str, ...]:
    """The classes of a ``labels`` field; ``()`` for an empty field (no class applies)."""
    if not text.strip():
        return ()
    names = [n.strip() for n in text.split("|")]
    if any(not n for n in names):
        raise LabelError(f"{where}: empty class name in {text.strip()!r}; separate "
                         "classes with a single '|' and no trailing '|'")
    return tuple(dict.fromkeys(names))           # drop repeats, keep order


def _parse_number(text: str, column: str, where: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise LabelError(f"{where}: {column} {text.strip()!r} is not a number; regression "
                         "targets must be plain numbers such as 7.5") from None
    if not math.isfinite(value):
        raise LabelError(f"{where}: {column} {text.strip()!r} is not a finite number")
    return value


def _parse_lvu(path: Path, header: tuple[str, ...]) -> _Parsed:
    kind = {LVU_CLASS_HEADER: "lvu-class", LVU_LIKE_HEADER: "lvu-like",
            LVU_VIEW_HEADER: "lvu-view"}[header]
    parsed = _Parsed(kind, [])
    with open(path, encoding="utf-8-sig") as f:
        lines = list(enumerate(f, 1))
    seen_header = False
    for lineno, line in lines:
        fields = line.split()
        if not fields:
            continue
        if not seen_header:
            seen_header = True
            continue
        where = f"{path}:{lineno}"
        if len(fields) != len(header):
            raise LabelError(f"{where}: {len(fields)} fields, but the LVU header names "
                             f"{len(header)} ({' '.join(header)}); LVU class names use "
                             "underscores, not spaces")
        video = fields[-2]
        if kind == "lvu-class":
            try:
                class_id = int(fields[0])
            except ValueError:
                raise LabelError(f"{where}: class_id {fields[0]!r} is not an integer") from None
            if class_id < 0:
                raise LabelError(f"{where}: class_id {class_id} is negative")
            name = fields[1]
            _note_lvu_class(parsed.lvu_classes, class_id, name, where)
            target = (name,)
        elif kind == "lvu-like":
            like = _parse_count(fields[0], "like_count", where)
            dislike = _parse_count(fields[1], "dislike_count", where)
            if like + dislike == 0:
                raise LabelError(f"{where}: like_count + dislike_count is 0, so the like "
                                 "ratio is undefined; drop the row")
            target = like / (like + dislike) * 10.0
        else:
            views = _parse_count(fields[0], "view_count", where)
            if views <= 0:
                raise LabelError(f"{where}: view_count must be positive to take its log")
            target = math.log(views)
        parsed.rows.append(_Row(where, video, target, None))
    return parsed


def _parse_count(text: str, column: str, where: str) -> float:
    value = _parse_number(text, column, where)
    if value < 0:
        raise LabelError(f"{where}: {column} {text!r} is negative")
    return value


def _note_lvu_class(classes: dict, class_id: int, name: str, where: str) -> None:
    if class_id in classes and classes[class_id][0] != name:
        raise LabelError(f"{where}: class_id {class_id} is {name!r} here but "
                         f"{classes[class_id][0]!r} at {classes[class_id][1]}")
    for other_id, (other_name, other_where) in classes.items():
        if other_name == name and other_id != class_id:
            raise LabelError(f"{where}: class {name!r} has id {class_id} here but "
                             f"{other_id} at {other_where}")
    classes.setdefault(class_id, (name, where))


# --------------------------------------------------------------------------- assembly


_KIND_TASKS = {                  # the tasks a file kind can be read as; the first is inferred
    "csv-value": ("regression",),
    "lvu-like": ("regression",),
    "lvu-view": ("regression",),
    "lvu-class": ("multiclass", "multilabel"),
}


def _resolve_task(parsed: _Parsed, task: str | None, source: Path) -> str:
    if task is not None and task not in TASKS:
        raise LabelError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if parsed.kind == "csv-labels":
        multi = next((r for r in parsed.rows if len(r.target) > 1), None)
        empty = next((r for r in parsed.rows if not r.target), None)
        if task == "regression":
            raise LabelError(f"{source} has a 'labels' column (classes), but the task is "
                             "regression; use a 'value' column for numeric targets or "
                             "pass --task multiclass/multilabel")
        if task == "multiclass" and multi is not None:
            raise LabelError(f"{multi.where}: several classes ({'|'.join(multi.target)}) but "
                             "the task is multiclass; use --task multilabel or give one "
                             "class per video")
        if task == "multiclass" and empty is not None:
            raise LabelError(f"{empty.where}: empty 'labels' field, but the task is multiclass "
                             "(exactly one class per video); give the video its class, or use "
                             "--task multilabel, where an empty field means that no class "
                             "applies")
        if task is not None:
            return task
        return "multilabel" if multi is not None or empty is not None else "multiclass"
    allowed = _KIND_TASKS[parsed.kind]
    if task is not None and task not in allowed:
        what = {"csv-value": "a 'value' column (regression targets)",
                "lvu-like": "an LVU like_ratio header (regression targets)",
                "lvu-view": "an LVU view_count header (regression targets)",
                "lvu-class": "an LVU class header (one class per video)"}[parsed.kind]
        raise LabelError(f"{source} has {what}, but the task is {task}; "
                         f"use --task {allowed[0]} or leave --task out")
    return task or allowed[0]


def _build_vocab(parsed: _Parsed, task: str, vocab: list[str] | None, source: Path) -> list[str]:
    if task == "regression":
        if vocab:
            raise LabelError(f"{source} holds regression targets; a class vocabulary does not "
                             "apply")
        return []
    if parsed.kind == "lvu-class":
        ids = parsed.lvu_classes
        if vocab is not None:
            for class_id, (name, where) in sorted(ids.items()):
                if class_id >= len(vocab) or vocab[class_id] != name:
                    got = vocab[class_id] if class_id < len(vocab) else "nothing"
                    raise LabelError(f"{where}: class_id {class_id} is {name!r}, but the given "
                                     f"vocabulary has {got!r} at index {class_id}")
            return list(vocab)
        size = max(ids) + 1 if ids else 0
        missing = [i for i in range(size) if i not in ids]
        if missing:
            warnings.warn(f"{source}: class ids {missing} never occur, so their names are "
                          "unknown; they are called class_<id>. Load the whole LVU task "
                          "folder to see every class", UserWarning, stacklevel=3)
        return [ids[i][0] if i in ids else f"class_{i}" for i in range(size)]
    names = {n for r in parsed.rows for n in r.target}
    if vocab is None:
        if not names:
            raise LabelError(f"{source}: every 'labels' field is empty, so there is no class to "
                             "learn; name each video's classes (separated by '|')")
        return sorted(names)
    known = set(vocab)
    for r in parsed.rows:
        unknown = [n for n in r.target if n not in known]
        if unknown:
            raise LabelError(f"{r.where}: class(es) {unknown} are not in the given vocabulary "
                             f"({len(vocab)} classes: {', '.join(vocab[:8])}"
                             f"{', ...' if len(vocab) > 8 else ''})")
    return list(vocab)


def load_labels(path, task: str | None = None, val_frac: float = 0.2, *,
                vocab: list[str] | None = None) -> LabelSet:
    """Read a vtx CSV, an LVU task file, or an LVU task folder.

    Args:
        path: the label file, or a folder holding LVU's ``train.csv``/``val.csv``/``test.csv``.
        task: ``multilabel``, ``multiclass`` or ``regression``; inferred when None (``|``
            anywhere means multilabel, numeric targets mean regression, else multiclass).
        val_frac: share of videos hashed into ``val`` when the file gives no splits.
        vocab: a fixed class order, e.g. from a checkpoint; labels outside it are errors.
            When None, CSV classes are sorted by name and LVU classes ordered by id.

    Raises:
        LabelError: the file, its rows, or the task given contradict each other.
    """
    source = Path(path)
    if not 0.0 <= val_frac < 1.0:
        raise LabelError(f"val_frac must be in [0, 1); got {val_frac}")
    if not source.exists():
        raise LabelError(f"label file {source} does not exist")

    if source.is_dir():
        files = [source / name for name in LVU_SPLIT_FILES if (source / name).is_file()]
        if not files:
            raise LabelError(f"{source} is a folder without {', '.join(LVU_SPLIT_FILES)}; "
                             "pass a label file, or an LVU task folder")
        parts = [_parse_file(f) for f in files]
        kinds = {p.kind for p in parts}
        if len(kinds) > 1:
            raise LabelError(f"the files in {source} have different headers; an LVU task "
                             "folder holds one task")
        parsed = _Parsed(parts[0].kind, [])
        for f, part in zip(files, parts):
            for row in part.rows:
                if row.split is not None:
                    raise LabelError(f"{row.where}: files of a split folder take their split "
                                     f"from the file name; drop the 'split' column")
                row.split = f.stem
            parsed.rows += part.rows
            for class_id, (name, where) in sorted(part.lvu_classes.items()):
                _note_lvu_class(parsed.lvu_classes, class_id, name, where)
    else:
        parsed = _parse_file(source)

    if not parsed.rows:
        raise LabelError(f"{source} has a header but no rows; add one row per video")
    task = _resolve_task(parsed, task, source)
    vocab = _build_vocab(parsed, task, vocab, source)
    index = {name: i for i, name in enumerate(vocab)}
    for r in parsed.rows:
        if task == "multiclass":
            r.target = r.target[0]
        elif task == "multilabel":
            r.target = tuple(sorted(r.target, key=index.__getitem__))

    targets: dict[str, object] = {}
    splits: dict[str, str] = {}
    first_seen: dict[str, _Row] = {}
    for r in parsed.rows:
        norm = _normalize(r.key)
        if norm in first_seen:
            prev = first_seen[norm]
            if prev.target != r.target:
                raise LabelError(f"{r.where}: video {r.key!r} is labeled again with a different "
                                 f"target ({_show(r.target)} here, {_show(prev.target)} at "
                                 f"{prev.where}); keep one row per video")
            if prev.split != r.split:
                raise LabelError(f"{r.where}: video {r.key!r} is put in split {r.split!r} "
                                 f"here but {prev.split!r} at {prev.where}")
            continue
        first_seen[norm] = r
        targets[r.key] = r.target
        splits[r.key] = r.split if r.split is not None else hash_split(r.key, val_frac)
    return LabelSet(task=task, vocab=vocab, targets=targets, splits=splits)


def _show(target: object) -> str:
    if isinstance(target, tuple):
        return "|".join(target) or "no class"
    return repr(target)
