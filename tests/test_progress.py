"""Progress output (vtx.progress): bars on a terminal, a few plain lines in a log, none quiet."""

from __future__ import annotations

import io
import json

import pytest
from click.testing import CliRunner

from vtx.cli.main import cli
from vtx.progress import LineProgress, progress, progress_mode


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def no_forced_mode(monkeypatch):
    monkeypatch.delenv("VTX_PROGRESS", raising=False)
    monkeypatch.delenv("VTX_PROGRESS_INTERVAL", raising=False)


def test_mode_follows_the_terminal_and_quiet(monkeypatch):
    assert progress_mode(True, Terminal()) == "bar"
    assert progress_mode(True, io.StringIO()) == "lines"
    assert progress_mode(False, Terminal()) == "off"
    monkeypatch.setenv("VTX_PROGRESS", "lines")
    assert progress_mode(True, Terminal()) == "lines"
    assert progress_mode(False, io.StringIO()) == "off"  # --quiet wins over the variable


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lines_every_interval_with_the_time_left_and_a_last_one(monkeypatch):
    """A line at most every 10 s; the time left comes from the rate after the first unit (a
    slow start, such as loading models, does not count)."""
    clock = Clock()
    monkeypatch.setattr("vtx.progress.time.monotonic", clock)
    out = io.StringIO()
    bar = LineProgress(total=10, desc="extract", unit="video", stream=out, interval=10)
    for t in (60, 64, 68, 72, 76, 80, 84, 88, 92, 93):  # first video after a 60 s start
        clock.now = 1000.0 + t
        bar.update()
    bar.close()
    assert "\r" not in out.getvalue()
    assert out.getvalue().splitlines() == [
        "extract: 1/10 videos (10%), 1 min 00 s elapsed",
        "extract: 4/10 videos (40%), 1 min 12 s elapsed, about 24 s left",
        "extract: 7/10 videos (70%), 1 min 24 s elapsed, about 12 s left",
        "extract: 10/10 videos (100%), 1 min 33 s elapsed",
    ]


def test_a_job_shorter_than_the_interval_prints_nothing():
    out = io.StringIO()
    for _ in LineProgress(range(50), desc="evaluate", unit="batch", stream=out, interval=3600):
        pass
    assert out.getvalue() == ""


def test_in_a_log_nested_bars_are_silent_and_quiet_is_silent():
    out = io.StringIO()
    inner = progress(range(3), desc="epoch 1/2", unit="batch", nested=True, stream=out)
    assert list(inner) == [0, 1, 2]
    inner.set_postfix(loss="0.1")
    inner.close()
    quiet = progress(total=3, desc="extract", enabled=False, stream=Terminal())
    quiet.update(3)
    quiet.close()
    assert out.getvalue() == ""
    assert isinstance(progress(total=3, desc="extract", stream=out), LineProgress)


def test_on_a_terminal_a_bar_redraws_in_place():
    term = Terminal()
    bar = progress(total=2, desc="extract", unit="video", stream=term)
    bar.update(2)
    bar.close()
    assert "\r" in term.getvalue() and "2/2" in term.getvalue()


def test_extract_log_is_plain_lines_and_quiet_is_silent(synth_dir, tmp_path, monkeypatch):
    """CliRunner's stderr is not a terminal: a log. With lines allowed every 0 s, extract writes
    at most one line per video and no carriage return; --quiet writes none."""
    monkeypatch.setenv("VTX_PROGRESS_INTERVAL", "0")
    r = CliRunner().invoke(cli, ["extract", "--videos", str(synth_dir), "--out",
                                 str(tmp_path / "f.h5"), "--features", "resnet18", "--json"])
    assert r.exit_code == 0, r.output
    assert "\r" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("extract:")]
    assert 1 <= len(lines) <= 3 and lines[-1].startswith("extract: 3/3 videos (100%)")
    assert json.loads(r.stdout)["done"] == 3
    r = CliRunner().invoke(cli, ["extract", "--videos", str(synth_dir / "c.mp4"), "--out",
                                 str(tmp_path / "g.h5"), "--features", "resnet18", "--quiet"])
    assert r.exit_code == 0, r.output
    assert r.stderr == ""
    assert "1 done" in r.stdout
