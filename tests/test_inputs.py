"""``--videos`` inputs (vtx.pipeline.extract.discover_videos): folders, files, list files, stdin,
several roots, and the cache keys they give."""

from __future__ import annotations

import io
import json
import shutil

import h5py
import pytest
from click.testing import CliRunner

from vtx.cli.main import cli
from vtx.errors import UsageError
from vtx.io.cache import video_key
from vtx.pipeline.extract import discover_videos


def rel(videos):
    return [(v.relpath, v.error) for v in videos]


@pytest.fixture
def tree(tmp_path):
    """a/x.mp4, b/x.mp4, b/sub/y.mkv, a/notes.txt (not a video) and lists/ for list files."""
    for name in ("a/x.mp4", "b/x.mp4", "b/sub/y.mkv", "a/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "lists").mkdir()
    return tmp_path


def test_one_folder_keeps_the_keys_relative_to_it(synth_dir):
    """Caches extracted from one folder keep their keys: paths relative to that folder."""
    expected = sorted(p.relative_to(synth_dir).as_posix() for p in synth_dir.rglob("*.mp4"))
    assert sorted(v.relpath for v in discover_videos(synth_dir)) == expected
    assert rel(discover_videos(synth_dir / "sub" / "b.mp4")) == [("b.mp4", None)]


def test_several_roots_keep_equal_names_apart(tree):
    videos = discover_videos([tree / "a", tree / "b"])
    assert rel(videos) == [("a/x.mp4", None), ("b/sub/y.mkv", None), ("b/x.mp4", None)]
    assert len({video_key(v.relpath) for v in videos}) == 3
    # Two files given directly: keyed from their common folder, not by bare name.
    assert rel(discover_videos([tree / "a" / "x.mp4", tree / "b" / "x.mp4"])) == [
        ("a/x.mp4", None), ("b/x.mp4", None)]
    # The same file twice is one video.
    assert len(discover_videos([tree / "a", tree / "a" / "x.mp4"])) == 1


def test_list_file_paths_are_relative_to_it_with_comments(tree):
    (tree / "lists" / "clips.txt").write_text(
        "# my clips\n\n../a/x.mp4\n   # an indented comment\n../b/x.mp4\n"
        f"{tree / 'b' / 'sub'}\n../b/gone.mp4\n")
    videos = discover_videos(tree / "lists" / "clips.txt")
    assert rel(videos) == [
        ("a/x.mp4", None),
        ("b/gone.mp4", f"does not exist (listed in {tree / 'lists' / 'clips.txt'} line 7)"),
        ("b/sub/y.mkv", None),   # a listed folder is searched like a folder input
        ("b/x.mp4", None)]
    assert videos[0].path.resolve() == (tree / "a" / "x.mp4").resolve()
    # Entries below the list's folder are keyed as listed, even when they share one folder.
    (tree / "a" / "list.lst").write_text("x.mp4\n")
    assert rel(discover_videos(tree / "a" / "list.lst")) == [("x.mp4", None)]


def test_stdin_list_is_relative_to_the_current_folder(tree, monkeypatch):
    monkeypatch.chdir(tree)
    videos = discover_videos("-", stdin=io.StringIO("a/x.mp4\n# skip\nb/x.mp4\n"))
    assert rel(videos) == [("a/x.mp4", None), ("b/x.mp4", None)]


def test_missing_input_is_a_usage_error(tree):
    with pytest.raises(UsageError, match="does not exist.*list file"):
        discover_videos([tree / "a", tree / "nope"])


def test_lists_stdin_and_roots_share_keys_and_missing_files_fail(synth_dir, tmp_path,
                                                                 monkeypatch):
    """One cache, three ways to name the same two videos (same file name in two folders): a list
    file with a missing entry (a failed video, exit 3), two --videos roots, and stdin."""
    for folder, src in (("r1", "a.mp4"), ("r2", "c.mp4")):
        (tmp_path / folder).mkdir()
        shutil.copy(synth_dir / src, tmp_path / folder / "clip.mp4")
    (tmp_path / "clips.txt").write_text("# two clips and a missing one\nr1/clip.mp4\n"
                                        "r2/clip.mp4\nr2/gone.mp4\n")
    out = tmp_path / "f.h5"
    base = ["extract", "--out", str(out), "--features", "resnet18", "--quiet", "--json"]

    r = CliRunner().invoke(cli, base + ["--videos", str(tmp_path / "clips.txt")])
    assert r.exit_code == 3, r.output
    summary = json.loads(r.stdout)
    assert (summary["done"], summary["failed"]) == (2, 1)
    assert summary["failures"] == [{"path": "r2/gone.mp4", "reason":
                                    f"does not exist (listed in {tmp_path / 'clips.txt'} line 4)"}]
    assert "vtx: failed: r2/gone.mp4: does not exist" in r.stderr
    with h5py.File(out) as f:
        assert sorted(f["videos"]) == ["r1%2Fclip.mp4", "r2%2Fclip.mp4"]
        assert f["videos"]["r2%2Fclip.mp4"].attrs["path"] == "r2/clip.mp4"
        assert "does not exist" in f["failures"]["r2%2Fgone.mp4"].attrs["reason"]

    r = CliRunner().invoke(cli, base + ["--videos", str(tmp_path / "r1"),
                                        "--videos", str(tmp_path / "r2")])
    assert r.exit_code == 0, r.output
    assert (json.loads(r.stdout)["skipped"], json.loads(r.stdout)["done"]) == (2, 0)

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, base + ["--videos", "-"], input="r1/clip.mp4\nr2/clip.mp4\n")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["skipped"] == 2
