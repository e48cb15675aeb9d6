"""Shared test helpers: run the CLI in-process and see what a user would see."""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


_LOCAL_HOSTS = {None, "", "localhost", "127.0.0.1", "::1", "0.0.0.0", socket.gethostname()}


@pytest.fixture(autouse=True)
def no_internet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never touch the internet: resolving any host but this machine fails at once, in
    the test process (a download a test forgot to redirect to 127.0.0.1 fails loudly)."""
    real = socket.getaddrinfo

    def local_only(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name not in _LOCAL_HOSTS:
            raise socket.gaierror(f"tests do not touch the internet (asked for {name})")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", local_only)


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


# --------------------------------------------------------------------------- a Range-capable server


class _Handler(BaseHTTPRequestHandler):
    """Serves server.files; honours `Range: bytes=N-`; can drop connections mid-body."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        srv = self.server
        rng = self.headers.get("Range")
        srv.requests.append(rng)
        data = srv.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return
        start = 0
        if rng and srv.honor_range:
            m = re.fullmatch(r"bytes=(\d+)-", rng)
            assert m, rng
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.drops_left > 0:
            srv.drops_left -= 1
            self.wfile.write(body[: srv.drop_after])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        """Keep the test output clean: no access log on stderr."""


@pytest.fixture
def server():
    """A local HTTP server (127.0.0.1) for downloads: put bytes in ``server.files[name]``."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.requests, srv.drops_left, srv.drop_after, srv.honor_range = {}, [], 0, 0, True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/"
    yield srv
    srv.shutdown()
    srv.server_close()


