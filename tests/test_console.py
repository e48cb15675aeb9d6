"""Progress without a terminal: plain lines often enough to follow a run in a log file."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from dtop_cli import console as C


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _plain_console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=False, width=200), buf


def test_plain_lines_every_five_percent_with_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(C.time, "monotonic", clock)
    con, buf = _plain_console()
    with C.Progress("base tiny", 200, console=con) as p:
        for it in range(1, 201):
            clock.t += 0.1  # fast iterations: the 5% rule decides
            p.update(it, info=f"loss {1.0 / it:.3f}")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 20  # every 10 of 200 iterations, the last one included
    assert lines[0].startswith("base tiny: 10/200 (5%) loss 0.100 elapsed 0:01 ETA 0:19")
    assert lines[-1].startswith("base tiny: 200/200 (100%)")


def test_plain_lines_at_least_every_thirty_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(C.time, "monotonic", clock)
    con, buf = _plain_console()
    with C.Progress("prune", 10_000, console=con) as p:
        for it in range(1, 101):  # 1% of the work, 10 s per iteration: the time rule decides
            clock.t += 10
            p.update(it)
    lines = buf.getvalue().splitlines()
    assert 30 <= len(lines) <= 35 and all(ln.startswith("prune: ") for ln in lines)
    assert "ETA" in lines[0]


def test_terminal_gets_a_bar_and_disabled_prints_nothing() -> None:
    buf = io.StringIO()
    con = Console(file=buf, force_terminal=True, width=120)
    with C.Progress("eval", 4, console=con, transient=True) as p:
        assert p.terminal and p._bar is not None
        for i in range(4):
            p.advance()
    con2, buf2 = _plain_console()
    with C.Progress("x", 3, console=con2, enabled=False) as p:
        p.update(3)
    assert buf2.getvalue() == ""


def test_byte_progress_reads_in_megabytes(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(C.time, "monotonic", clock)
    con, buf = _plain_console()
    with C.Progress("download x.zip", 100 << 20, console=con, unit="bytes") as p:
        clock.t += 1
        p.update(50 << 20)
    assert buf.getvalue().splitlines()[0].startswith("download x.zip: 50.0 MB/100.0 MB (50%)")
