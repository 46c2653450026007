"""Tests for vtx.train.labels: CSV and LVU parsing, task inference, splits, matching, errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vtx.errors import UsageError
from vtx.train.labels import LabelError, LabelSet, hash_split, load_labels

DATA = Path(__file__).resolve().parents[1] / "data"


def write(tmp_path: Path, text: str, name: str = "labels.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- CSV


def test_multilabel_csv(tmp_path):
    path = write(tmp_path, "video,labels,split\n"
                           "trailers/abc.mp4,Drama|Action,train\n"
                           "def, Comedy ,val\n"
                           "\n"
                           "ghi,Action|Comedy|Drama,test\n")
    ls = load_labels(path)
    assert ls.task == "multilabel"
    assert ls.vocab == ["Action", "Comedy", "Drama"]
    assert ls.targets == {"trailers/abc.mp4": ("Action", "Drama"), "def": ("Comedy",),
                          "ghi": ("Action", "Comedy", "Drama")}
    assert ls.splits == {"trailers/abc.mp4": "train", "def": "val", "ghi": "test"}
    np.testing.assert_array_equal(ls.target_array("trailers/abc.mp4"), [1, 0, 1])
    assert ls.target_array("def").dtype == np.float32
    assert ls.keys("test") == ["ghi"]


def test_multiclass_csv_inferred(tmp_path):
    path = write(tmp_path, "video,labels\na.mp4,office\nb.mp4,school\nc.mp4,airport\n")
    ls = load_labels(path)
    assert ls.task == "multiclass"
    assert ls.vocab == ["airport", "office", "school"]
    assert ls.targets["a.mp4"] == "office"
    idx = ls.target_array("b.mp4")
    assert idx.dtype == np.int64 and idx.shape == () and int(idx) == 2


def test_single_label_rows_may_be_read_as_multilabel(tmp_path):
    path = write(tmp_path, "video,labels\na,Action\nb,Drama\n")
    ls = load_labels(path, task="multilabel")
    assert ls.task == "multilabel"
    np.testing.assert_array_equal(ls.target_array("b"), [0, 1])


def test_empty_labels_field_is_an_all_negative_multilabel_target(tmp_path):
    path = write(tmp_path, "video,labels,split\n"
                           "clip.mp4,,train\n"
                           "a.mp4,Drama,train\n"
                           "b.mp4,Action,val\n"
                           "c.mp4,   ,test\n")
    ls = load_labels(path)
    assert ls.task == "multilabel"  # no row has two classes: the empty ones decide
    assert ls.vocab == ["Action", "Drama"]
    assert ls.targets["clip.mp4"] == () and ls.targets["c.mp4"] == ()
    assert ls.splits["clip.mp4"] == "train"
    np.testing.assert_array_equal(ls.target_array("clip.mp4"), [0, 0])
    np.testing.assert_array_equal(ls.target_array("a.mp4"), [0, 1])
    # with the checkpoint's vocabulary (evaluate, predict) too
    ls = load_labels(path, task="multilabel", vocab=["Drama", "Action", "Comedy"])
    np.testing.assert_array_equal(ls.target_array("clip.mp4"), [0, 0, 0])


def test_empty_labels_field_is_refused_by_a_multiclass_task(tmp_path):
    path = write(tmp_path, "video,labels\na,X\nb,\n")
    with pytest.raises(LabelError, match=r"labels.csv:3: empty 'labels' field, but the task is "
                                         r"multiclass.*--task multilabel"):
        load_labels(path, task="multiclass")


def test_regression_csv(tmp_path):
    path = write(tmp_path, "video,value\na,7.5\nb,-1e-3\n")
    ls = load_labels(path)
    assert ls.task == "regression" and ls.vocab == []
    assert ls.targets == {"a": 7.5, "b": -0.001}
    arr = ls.target_array("a")
    assert arr.dtype == np.float32 and float(arr) == 7.5


def test_header_case_bom_and_quoting(tmp_path):
    path = tmp_path / "l.csv"
    path.write_bytes('\ufeffVideo,Labels\n"dir,with,commas/x.mp4",A|B\n'.encode("utf-8"))
    ls = load_labels(path)
    assert ls.targets == {"dir,with,commas/x.mp4": ("A", "B")}


def test_given_vocab_fixes_order_and_rejects_unknown(tmp_path):
    path = write(tmp_path, "video,labels\na,Drama\nb,Action\n")
    ls = load_labels(path, vocab=["Drama", "Horror", "Action"])
    assert ls.vocab == ["Drama", "Horror", "Action"]
    assert int(ls.target_array("b")) == 2
    with pytest.raises(LabelError, match=r"labels.csv:3: class\(es\) \['Action'\] are not in"):
        load_labels(path, vocab=["Drama", "Horror"])


def test_identical_duplicates_are_merged(tmp_path):
    path = write(tmp_path, "video,labels\na,X|Y\nb,Y\n./a,Y|X\n")
    ls = load_labels(path)
    assert list(ls.targets) == ["a", "b"]


# --------------------------------------------------------------------------- task checks


@pytest.mark.parametrize("text, task, match", [
    pytest.param("video,labels\na,X|Y\n", "multiclass", r"labels.csv:2: several classes \(X\|Y\)",
                 id="pipe-vs-multiclass"),
    pytest.param("video,labels\na,X\n", "regression", "'labels' column.*task is regression",
                 id="labels-vs-regression"),
    pytest.param("video,value\na,1\n", "multiclass", "'value' column.*--task regression",
                 id="value-vs-multiclass"),
    pytest.param("video,value\na,1\n", "multilabel", "'value' column", id="value-vs-multilabel"),
    pytest.param("like_count dislike_count youtube_id imdb_id\n1 2 y1 tt1\n", "multiclass",
                 "like_ratio header.*--task regression", id="lvu-like-vs-multiclass"),
    pytest.param("class_id class_name youtube_id imdb_id\n0 a y1 tt1\n", "regression",
                 "LVU class header.*--task multiclass", id="lvu-class-vs-regression"),
    pytest.param("video,labels\na,X\n", "ranking", "valid tasks: multilabel, multiclass",
                 id="unknown-task"),
])
def test_task_contradicting_file_is_an_error(tmp_path, text, task, match):
    with pytest.raises(LabelError, match=match):
        load_labels(write(tmp_path, text), task=task)


# --------------------------------------------------------------------------- LVU


LVU_REL = ("class_id class_name youtube_id imdb_id\n"
           "2 Wife-Husband aaaaaaaaaaa tt0000001\n"
           "0 Friends bbbbbbbbbbb tt0000002\n"
           "3 Boyfriend_Girlfriend ccccccccccc tt0000003\n"
           "1 Family ddddddddddd tt0000004\n"
           "0 Friends eeeeeeeeeee tt0000005\n")


def test_lvu_classification_file(tmp_path):
    ls = load_labels(write(tmp_path, LVU_REL, "train.csv"))
    assert ls.task == "multiclass"
    assert ls.vocab == ["Friends", "Family", "Wife-Husband", "Boyfriend_Girlfriend"]
    assert ls.targets["ccccccccccc"] == "Boyfriend_Girlfriend"
    assert int(ls.target_array("aaaaaaaaaaa")) == 2
    assert ls.match("lvu/videos/ccccccccccc.mp4") == "ccccccccccc"
    # A single file gets hash splits, like any file without a split column.
    assert set(ls.splits.values()) <= {"train", "val"}


def test_lvu_like_and_view_targets(tmp_path):
    like = load_labels(write(tmp_path, "like_count dislike_count youtube_id imdb_id\n"
                                       "90 10 aaaaaaaaaaa tt1\n3 1 bbbbbbbbbbb tt2\n"))
    assert like.task == "regression"
    assert like.targets == {"aaaaaaaaaaa": pytest.approx(9.0), "bbbbbbbbbbb": pytest.approx(7.5)}
    view = load_labels(write(tmp_path, "view_count youtube_id imdb_id\n"
                                       "1000 aaaaaaaaaaa tt1\n", "v.csv"))
    assert view.task == "regression"
    assert view.targets["aaaaaaaaaaa"] == pytest.approx(math.log(1000))


def test_lvu_task_folder_takes_splits_from_file_names(tmp_path):
    header = "class_id class_name youtube_id imdb_id\n"
    write(tmp_path, header + "0 office v0 tt0\n1 school v1 tt1\n", "train.csv")
    write(tmp_path, header + "2 prison v2 tt2\n", "val.csv")
    write(tmp_path, header + "0 office v3 tt3\n", "test.csv")
    ls = load_labels(tmp_path)
    assert ls.splits == {"v0": "train", "v1": "train", "v2": "val", "v3": "test"}
    assert ls.vocab == ["office", "school", "prison"]


def test_lvu_missing_class_id_gets_placeholder(tmp_path):
    path = write(tmp_path, "class_id class_name youtube_id imdb_id\n0 a v0 t\n2 c v2 t\n")
    with pytest.warns(UserWarning, match=r"class ids \[1\] never occur"):
        ls = load_labels(path)
    assert ls.vocab == ["a", "class_1", "c"]
    ls = load_labels(path, vocab=["a", "b", "c"])
    assert int(ls.target_array("v2")) == 2


@pytest.mark.parametrize("text, match", [
    pytest.param("class_id class_name youtube_id imdb_id\n0 a v0 t0\n1 a v1 t1\n",
                 r":3: class 'a' has id 1 here but 0 at .*:2", id="name-two-ids"),
    pytest.param("class_id class_name youtube_id imdb_id\n0 a v0 t0\n0 b v1 t1\n",
                 r":3: class_id 0 is 'b' here but 'a'", id="id-two-names"),
    pytest.param("class_id class_name youtube_id imdb_id\n0 Romantic Comedy v0 t0\n",
                 r":2: 5 fields, but the LVU header names 4.*underscores", id="space-in-name"),
    pytest.param("class_id class_name youtube_id imdb_id\nx a v0 t0\n",
                 r":2: class_id 'x' is not an integer", id="bad-id"),
    pytest.param("like_count dislike_count youtube_id imdb_id\n0 0 v0 t0\n",
                 r":2: like_count \+ dislike_count is 0", id="no-votes"),
    pytest.param("view_count youtube_id imdb_id\nmany v0 t0\n",
                 r":2: view_count 'many' is not a number", id="bad-views"),
    pytest.param("view_count youtube_id imdb_id\n0 v0 t0\n",
                 r":2: view_count must be positive", id="zero-views"),
    pytest.param("views youtube_id imdb_id\n5 v0 t0\n",
                 r":1: unrecognized LVU header.*view_count youtube_id imdb_id", id="lvu-header"),
])
def test_lvu_errors(tmp_path, text, match):
    with pytest.raises(LabelError, match=match):
        load_labels(write(tmp_path, text))


# --------------------------------------------------------------------------- splits


def test_hash_split_is_deterministic_and_near_val_frac(tmp_path):
    keys = [f"video_{i:04d}" for i in range(1000)]
    path = write(tmp_path, "video,labels\n" + "".join(f"{k},A\n" for k in keys))
    first = load_labels(path).splits
    assert first == load_labels(path).splits
    n_val = sum(s == "val" for s in first.values())
    assert 150 <= n_val <= 250                                    # 200 expected, sd ~13
    assert set(first.values()) == {"train", "val"}
    # Stable across processes (no PYTHONHASHSEED dependence) and fixed for all time.
    code = ("from vtx.train.labels import hash_split; "
            "print(''.join('v' if hash_split(f'video_{i:04d}', 0.2) == 'val' else 't' "
            "for i in range(1000)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "123"}, cwd=DATA.parent)
    assert out.stdout.strip() == "".join("v" if first[k] == "val" else "t" for k in keys)
    assert [hash_split(k, 0.2) for k in ("abc", "trailers/abc.mp4", "x")] == \
        ["train", "train", "val"]


def test_val_frac_extremes(tmp_path):
    path = write(tmp_path, "video,labels\n" + "".join(f"v{i},A\n" for i in range(50)))
    assert set(load_labels(path, val_frac=0.0).splits.values()) == {"train"}
    assert sum(s == "val" for s in load_labels(path, val_frac=0.5).splits.values()) > 10
    with pytest.raises(LabelError, match=r"val_frac must be in \[0, 1\)"):
        load_labels(path, val_frac=1.0)


def test_split_column_wins_over_hash(tmp_path):
    path = write(tmp_path, "video,labels,split\na,X,TEST\nb,X,train\n")
    assert load_labels(path, val_frac=0.9).splits == {"a": "test", "b": "train"}


# --------------------------------------------------------------------------- matching


def test_match_full_path_then_stem():
    ls = LabelSet(task="multiclass", vocab=["A", "B"],
                  targets={"trailers/abc.mp4": "A", "abc2": "B", "x/dup.mp4": "A",
                           "y/dup.mp4": "B", "my.clip": "A"},
                  splits={"trailers/abc.mp4": "train", "abc2": "val", "x/dup.mp4": "train",
                          "y/dup.mp4": "train", "my.clip": "train"})
    assert ls.match("trailers/abc.mp4") == "trailers/abc.mp4"
    assert ls.match("other/abc.mkv") == "trailers/abc.mp4"        # by stem
    assert ls.match("deep/dir/abc2.mp4") == "abc2"
    assert ls.match("x/dup.mp4") == "x/dup.mp4"                   # full path beats stem
    assert ls.match("my.clip.mp4") == "my.clip"                   # key written as a bare stem
    assert ls.match("unlabeled.mp4") is None
    with pytest.raises(LabelError, match="matches several labeled videos.*write the full"):
        ls.match("z/dup.mp4")


def test_labelset_validates_itself():
    with pytest.raises(LabelError, match="unknown split"):
        LabelSet("regression", [], {"a": 1.0}, {"a": "dev"})
    with pytest.raises(LabelError, match="same videos"):
        LabelSet("regression", [], {"a": 1.0}, {"b": "train"})


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("text, match", [
    pytest.param("", r"is empty; it needs a header line", id="empty-file"),
    pytest.param("abc.mp4,Action\n", r":1: missing header.*'video,labels'", id="no-header"),
    pytest.param("video labels\na X\n", r"missing header.*separated by commas", id="spaces"),
    pytest.param("video,labels,title\na,X,t\n", r":1: unknown column\(s\) \['title'\]",
                 id="unknown-column"),
    pytest.param("video,label\na,X\n", r"rename 'label' to 'labels'", id="label-singular"),
    pytest.param("name,labels\na,X\n", r"unknown column\(s\) \['name'\]", id="no-video"),
    pytest.param("labels,split\nX,train\n", r"no 'video' column", id="video-missing"),
    pytest.param("video,labels,value\na,X,1\n", r"exactly one of 'labels'", id="both"),
    pytest.param("video,labels\n", r"has a header but no rows", id="no-rows"),
    pytest.param("video,labels\na,\nb,\n", r"every 'labels' field is empty", id="all-empty"),
    pytest.param("video,labels\na,X||Y\n", r":2: empty class name in 'X\|\|Y'", id="empty-part"),
    pytest.param("video,labels\na,X\n,Y\n", r":3: empty 'video' field", id="empty-video"),
    pytest.param("video,labels\na,X,extra\n", r":2: 3 fields, but the header names 2",
                 id="extra-field"),
    pytest.param("video,labels\na,X\nb,Y\na,Z\n",
                 r":4: video 'a' is labeled again with a different target "
                 r"\('Z' here, 'X' at .*labels.csv:2\)", id="dup-conflict"),
    pytest.param("video,labels,split\na,X,train\na,X,val\n",
                 r":3: video 'a' is put in split 'val' here but 'train'", id="dup-split"),
    pytest.param("video,labels,split\na,X,validation\n",
                 r":2: split 'validation' is not one of train, val, test", id="bad-split"),
    pytest.param("video,labels,split\na,X,\n", r":2: split '' is not one of", id="empty-split"),
    pytest.param("video,value\na,1.5\nb,high\n",
                 r":3: value 'high' is not a number", id="non-numeric"),
    pytest.param("video,value\na,nan\n", r":2: value 'nan' is not a finite number", id="nan"),
])
def test_errors_name_the_line_and_fix(tmp_path, text, match):
    with pytest.raises(LabelError, match=match) as info:
        load_labels(write(tmp_path, text))
    assert isinstance(info.value, ValueError) and isinstance(info.value, UsageError)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(LabelError, match="does not exist"):
        load_labels(tmp_path / "nope.csv")
    with pytest.raises(LabelError, match="folder without train.csv, val.csv, test.csv"):
        load_labels(tmp_path)


# --------------------------------------------------------------------------- shipped data


def test_shipped_genre_vocabulary():
    lines = (DATA / "mmx_trailer20_genres.txt").read_text(encoding="utf-8").splitlines()
    comments = [line for line in lines if line.startswith("#")]
    genres = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert len(set(genres)) == len(genres)
    if len(genres) != 20:
        assert any(f"{len(genres)} genres" in c for c in comments)
    assert len(genres) == 19
    assert genres[:3] == ["Action", "Adventure", "Animation"] and genres[-1] == "War"
    # The vocabulary can fix the class order of a genre label file.
    ls = LabelSet("multilabel", genres, {"t": ("Action", "War")}, {"t": "train"})
    assert ls.target_array("t").sum() == 2 and ls.target_array("t")[-1] == 1


def test_shipped_lvu_tasks():
    tasks = json.loads((DATA / "lvu_tasks.json").read_text(encoding="utf-8"))["tasks"]
    assert list(tasks) == ["relationship", "way_speaking", "scene", "director", "genre",
                           "writer", "year", "like", "view"]
    for name, t in tasks.items():
        if t["type"] == "multiclass":
            assert t["metric"] == "top1" and t["higher_is_better"] is True
            assert isinstance(t["num_classes"], int) and t["num_classes"] > 1
        else:
            assert t["type"] == "regression" and t["metric"] == "mse"
            assert t["higher_is_better"] is False and t["num_classes"] is None
    assert {n: t["num_classes"] for n, t in tasks.items() if t["num_classes"]} == {
        "relationship": 4, "way_speaking": 5, "scene": 6, "director": 10, "genre": 4,
        "writer": 10, "year": 9}
    assert {t["category"] for t in tasks.values()} == {
        "content understanding", "metadata prediction", "user engagement"}
