"""Shared test helpers: run the CLI in-process and see what a user would see."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class CliResult:
    """Exit code and captured streams of one in-process `dtop` run."""

    code: int
    out: str
    err: str

    def json(self) -> dict:
        """The one JSON object a --json command must print (fails the test otherwise)."""
        lines = [ln for ln in self.out.splitlines() if ln.strip()]
        assert len(lines) == 1, f"expected exactly one JSON line on stdout, got {len(lines)}: {self.out!r}"
        obj = json.loads(lines[0])
        assert isinstance(obj, dict)
        return obj


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., CliResult]:
    """Call ``dtop_cli.cli.main(argv)`` as the console script would, catching its SystemExit.

    A wide terminal is pretended so rich tables are not wrapped in the captured text.
    """
    from dtop_cli.cli import main

    monkeypatch.setenv("COLUMNS", "250")

    def run(argv: list[str]) -> CliResult:
        capsys.readouterr()  # drop anything printed before
        code: int
        try:
            main(list(argv))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code=code, out=captured.out, err=captured.err)

    return run
