"""Progress on stderr, one rule for every command: bars on a terminal, a few lines in a log.

* stderr is a terminal: a tqdm bar, redrawn in place (nested bars, such as ``vtx extract``'s
  one per decode thread, stack below the main one).
* stderr is not a terminal (a log file, a pipe, CI): plain lines such as
  ``extract: 12/65 videos (18%), 34 s elapsed, about 2 min 30 s left``, at most one every
  :data:`LINE_INTERVAL_S` seconds and a last one when such a job ends (a job shorter than that
  prints nothing); nested bars and per-batch bars print nothing (their job's own lines say
  enough). No carriage returns, ever.
* disabled (``--quiet``): nothing.

``VTX_PROGRESS=bar|lines|off`` forces a mode (``lines`` also on a terminal), and
``VTX_PROGRESS_INTERVAL`` sets the seconds between lines.

Everything that shows progress asks :func:`progress`; the objects it returns share tqdm's
interface as far as vtx uses it: iteration, ``update``, ``reset``, ``set_description``,
``set_postfix`` and ``close``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TextIO

__all__ = ["LINE_INTERVAL_S", "LineProgress", "progress", "progress_mode"]

LINE_INTERVAL_S = 10.0
"""Least seconds between two progress lines when stderr is not a terminal."""

MODES = ("bar", "lines", "off")


def progress_mode(enabled: bool = True, stream: TextIO | None = None) -> str:
    """``bar`` (stderr is a terminal), ``lines`` (it is not) or ``off`` (``enabled`` False).

    ``VTX_PROGRESS`` (``bar``, ``lines`` or ``off``) overrides the terminal test, not
    ``enabled``.
    """
    if not enabled:
        return "off"
    forced = os.environ.get("VTX_PROGRESS", "").strip().lower()
    if forced in MODES:
        return forced
    stream = sys.stderr if stream is None else stream
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return "lines"


def _interval() -> float:
    try:
        return max(0.0, float(os.environ["VTX_PROGRESS_INTERVAL"]))
    except (KeyError, ValueError):
        return LINE_INTERVAL_S


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", enabled: bool = True, nested: bool = False, position: int = 0,
             leave: bool = True, stream: TextIO | None = None):
    """A progress bar, line printer or no-op for a job, by :func:`progress_mode`.

    Args:
        iterable: iterate through the returned object to advance it (or call ``update``).
        total: the number of units (``len(iterable)`` when it has one).
        desc: what the job is (``extract``, ``evaluate``...): the start of every line.
        unit: what one unit is (``video``, ``batch``).
        enabled: False (``--quiet``) silences it.
        nested: a bar inside another job's bar (a decode thread's frames, an epoch's batches):
            drawn on a terminal, silent in a log.
        position: the terminal row of a nested bar (0 is the main bar).
        leave: keep the bar on the terminal when it closes.
        stream: where to write [default: stderr].
    """
    from tqdm import tqdm

    stream = sys.stderr if stream is None else stream
    mode = progress_mode(enabled, stream)
    if mode == "bar":
        return tqdm(iterable, total=total, desc=desc or None, unit=unit, position=position,
                    leave=leave, dynamic_ncols=True, file=stream)
    if mode == "off" or nested:
        return tqdm(iterable, total=total, disable=True)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, stream=stream,
                        interval=_interval())


def _duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class LineProgress:
    """Progress as plain lines, at most one every ``interval`` seconds and one at the end.

    Args:
        iterable: as :func:`progress`.
        total: the number of units, if known.
        desc: the start of every line.
        unit: the unit's name (pluralised with an ``s``).
        stream: where lines go.
        interval: least seconds between lines (the last line is always written).
    """

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None,
                 desc: str = "", unit: str = "it", stream: TextIO | None = None,
                 interval: float = LINE_INTERVAL_S):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.stream = sys.stderr if stream is None else stream
        self.interval = interval
        self.n = 0
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.first: tuple[float, int] | None = None  # (time, n) of the first update
        self.printed_n: int | None = None  # n of the last line written
        self.closed = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ tqdm's interface
    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.total or 0

    def update(self, n: int = 1) -> None:
        with self._lock:
            now = time.monotonic()
            self.n += n
            if self.first is None:
                self.first = (now, self.n)
            if now - self.last >= self.interval:
                self._write(now)

    def reset(self, total: int | None = None) -> None:
        with self._lock:
            self.n, self.total, self.printed_n, self.first = 0, total, None, None
            self.start = self.last = time.monotonic()

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k} {v}" for k, v in items.items())

    def close(self) -> None:
        """Write the last line, when a line was written before (a job shorter than ``interval``
        prints nothing) and something happened since."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self.printed_n is not None and self.n != self.printed_n:
                self._write(time.monotonic())

    # ------------------------------------------------------------------ the line
    def line(self, now: float | None = None) -> str:
        """``desc: n/total units (p%), E elapsed, about R left[, postfix]``.

        The time left is estimated from the rate after the first update, so a slow start
        (loading models, filling the pipeline) does not inflate it; it is shown once two
        units have passed since then.
        """
        now = time.monotonic() if now is None else now
        elapsed = now - self.start
        units = self.unit if self.n == 1 and not self.total else f"{self.unit}s"
        done = f"{self.n}/{self.total} {units}" if self.total else f"{self.n} {units}"
        parts = [done + (f" ({100 * self.n / self.total:.0f}%)" if self.total else ""),
                 f"{_duration(elapsed)} elapsed"]
        if self.total and self.first is not None and self.n < self.total:
            t_first, n_first = self.first
            if self.n - n_first >= 2 and now > t_first:
                rate = (self.n - n_first) / (now - t_first)
                parts.append(f"about {_duration((self.total - self.n) / rate)} left")
        if self.postfix:
            parts.append(self.postfix)
        return f"{self.desc}: " * bool(self.desc) + ", ".join(parts)

    def _write(self, now: float) -> None:
        print(self.line(now), file=self.stream, flush=True)
        self.last, self.printed_n = now, self.n
