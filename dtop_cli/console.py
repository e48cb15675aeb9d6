"""Everything dtop prints while it works: progress, and keeping mmengine's console quiet.

Progress has one mechanism and two renderers. :class:`Progress` is fed ``update`` /
``advance`` calls by whatever does the work (a training hook, the measurement loop, a
download); it draws a rich bar when stderr is a terminal, and otherwise (CI logs,
``nohup``, ``| tee``) prints a plain line at least every 30 s or every 5% of the work,
with the rate and the time left, so a long run never goes silent in a log file.

All of it goes to stderr: stdout belongs to ``--json``.
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType
from typing import Any, Optional

from rich.console import Console

#: plain-line renderer: a line at least this often, or after this share of the work
PLAIN_INTERVAL_S = 30.0
PLAIN_FRACTION = 0.05


def stderr_console() -> Console:
    """The console for progress and messages: stderr, so `--json` keeps stdout to one object."""
    return Console(stderr=True)


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _amount(n: float, unit: str) -> str:
    if unit != "bytes":
        return f"{int(n)}"
    for scale, suffix in ((1 << 30, "GB"), (1 << 20, "MB"), (1 << 10, "kB")):
        if n >= scale:
            return f"{n / scale:.1f} {suffix}"
    return f"{int(n)} B"


class Progress:
    """Progress of one task; a context manager. See the module docstring.

    unit: "items" (images, iterations) or "bytes" (downloads, hashing). info: a short text
    shown after the counts (e.g. the current loss). transient: the terminal bar disappears
    when done. ``console`` None means stderr; ``enabled`` False shows nothing at all.
    """

    def __init__(self, title: str, total: Optional[float] = None, *, console: Optional[Console] = None,
                 unit: str = "items", transient: bool = False, enabled: bool = True,
                 completed: float = 0) -> None:
        self.title = title
        self.total = total
        self.unit = unit
        self.completed = float(completed)
        self.info = ""
        self.console = console if console is not None else stderr_console()
        self.enabled = enabled
        self.terminal = bool(self.console.is_terminal)
        self.transient = transient
        self._bar: Any = None
        self._task: Any = None
        self._t0 = time.monotonic()
        self._start_completed = self.completed
        self._last_line_t = self._t0
        self._last_line_done = self.completed

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "Progress":
        self.start()
        return self

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.stop(failed=exc_type is not None)

    def start(self) -> None:
        if not self.enabled:
            return
        self._t0 = self._last_line_t = time.monotonic()
        self._start_completed = self._last_line_done = self.completed
        if self.terminal:
            self._bar = self._rich_bar()
            self._bar.start()
            self._task = self._bar.add_task(self.title, total=self.total, completed=self.completed, info="")

    def stop(self, failed: bool = False) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        elif not failed and self.completed > self._last_line_done:
            self._line()

    # ------------------------------------------------------------------ feeding
    def update(self, completed: float, total: Optional[float] = None, info: Optional[str] = None) -> None:
        """The work done so far (absolute), optionally a new total and info text."""
        self.completed = float(completed)
        if total is not None:
            self.total = total
        if info is not None:
            self.info = info
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.completed, total=self.total, info=self.info)
        elif self._line_due():
            self._line()

    def advance(self, amount: float = 1) -> None:
        self.update(self.completed + amount)

    def __call__(self, done: float, total: Optional[float] = None) -> None:
        """Callback form ``progress(done, total)`` for code that only reports counts."""
        self.update(done, total)

    # ------------------------------------------------------------------ renderers
    def _rich_bar(self) -> Any:
        from rich import progress as rp

        counts = ([rp.DownloadColumn(), rp.TransferSpeedColumn()] if self.unit == "bytes"
                  else [rp.MofNCompleteColumn()])
        return rp.Progress(rp.TextColumn("[bold]{task.description}"), rp.BarColumn(), *counts,
                           rp.TextColumn("{task.fields[info]}"), rp.TimeElapsedColumn(),
                           rp.TimeRemainingColumn(), console=self.console, transient=self.transient)

    def _line_due(self) -> bool:
        now = time.monotonic()
        if now - self._last_line_t >= PLAIN_INTERVAL_S:
            return True
        return bool(self.total) and (self.completed - self._last_line_done) >= PLAIN_FRACTION * float(self.total)

    def _line(self) -> None:
        """One plain progress line: title, counts, share, info, rate, elapsed and time left."""
        now = time.monotonic()
        elapsed = now - self._t0
        done_here = self.completed - self._start_completed
        parts = [f"{self.title}:", _amount(self.completed, self.unit)]
        if self.total:
            parts[-1] += f"/{_amount(self.total, self.unit)} ({100 * self.completed / self.total:.0f}%)"
        if self.info:
            parts.append(self.info)
        parts.append(f"elapsed {_duration(elapsed)}")
        if self.total and done_here > 0 and self.completed < self.total:
            parts.append(f"ETA {_duration(elapsed / done_here * (self.total - self.completed))}")
        self.console.print(" ".join(parts), highlight=False, soft_wrap=True)
        self._last_line_t = now
        self._last_line_done = self.completed


# --------------------------------------------------------------------------- mmengine's console


#: mmengine/mmseg messages that every run prints and that say nothing about the user's run;
#: kept out of the console (not out of the log file) unless ``--verbose``.
KNOWN_NOISE = (
    "The prefix is not set in metric class",
    '"FileClient" will be deprecated',
    '"HardDiskBackend" is the alias',
)


def not_known_noise(record: logging.LogRecord) -> bool:
    """Logging filter: False for the messages in ``KNOWN_NOISE``."""
    msg = record.getMessage()
    return not any(n in msg for n in KNOWN_NOISE)


class LinesToLog:
    """A text stream that hands each complete line to ``logger.info`` (the log file)."""

    def __init__(self, logger: Any) -> None:
        self._logger = logger
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            if line.strip():
                self._logger.info(line)
        return len(text)

    def flush(self) -> None:
        """Nothing is buffered beyond an incomplete line, which waits for its end."""


class CurrentStderr:
    """A stream that writes to whatever ``sys.stderr`` is at the time of writing.

    MMLogger instances outlive their runs (quickstart builds two runners in one process, the
    tests many); a handler bound to one run's stderr object would write into a closed
    capture buffer later on.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def quiet_mmengine_console() -> None:
    """mmengine's console logs become warnings-only, on stderr; the full log stays in the work dir.

    mmengine binds its console handlers to the ``sys.stdout`` of the moment a logger is made;
    the Runner is built with stdout sent to a throw-away buffer (its environment dump, the
    config and the hook table would otherwise fill the terminal), so the handlers are pointed
    at stderr here. Every MMLogger instance is treated: mmengine's ``print_log`` writes to
    the most recent one, which need not be the runner's.
    """
    from mmengine.logging import MMLogger

    for logger in list(MMLogger._instance_dict.values()):
        for h in logger.handlers:
            if type(h) is logging.StreamHandler:
                if not isinstance(h.stream, CurrentStderr):
                    h.setStream(CurrentStderr())
                h.setLevel(logging.WARNING)
                if not_known_noise not in h.filters:
                    h.addFilter(not_known_noise)
