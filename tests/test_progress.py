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


def test_lines_every_interval_and_a_last_one():
    out = io.StringIO()
    bar = LineProgress(total=4, desc="extract", unit="video", stream=out, interval=0)
    for _ in range(4):
        bar.update()
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("extract: 1/4 videos (25%), 0 s elapsed, about 0 s left")
    assert lines[-1].startswith("extract: 4/4 videos (100%)")
    assert len(lines) == 4  # one per unit at most, and no repeat at close


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
