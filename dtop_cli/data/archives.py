"""Getting dataset archives onto disk safely: download, digest, extract, stage, install.

Dataset archives are big (ADE20K 923 MB, the VOC tar 1.3 GB) and come from servers that drop
connections, so a download resumes from its partial file with an HTTP Range request instead
of starting over. Archives are untrusted input: a member named ``../../.bashrc``, an absolute
path or a link could write outside the data folder, so every member is checked before a single
byte is written, and extraction writes plain files only. Everything a preparation makes goes
into a temporary folder beside its target (same filesystem) and is renamed into place at the
end, so an interrupted or failed run leaves nothing half-made and never touches files it did
not create.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import socket
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Callable, Iterator, Optional

from rich.console import Console

from ..console import Progress
from ..errors import UserError

CHUNK = 1 << 20
# Headroom kept free on top of what an extraction needs: filling a disk to the last byte
# breaks everything else running on the machine.
FREE_SPACE_MARGIN = 64 << 20
STAGING_PREFIX = ".dtop-tmp-"


# --------------------------------------------------------------------------- digests


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def normalize_sha256(text: str) -> str:
    """Lower-case hex digest, or UserError: a typo in a digest must not pass as 'no digest'."""
    h = text.strip().lower()
    if not _HEX64.match(h):
        raise UserError(f"--sha256 {text!r} is not a SHA-256 digest (64 hexadecimal characters)")
    return h


def sha256_file(path: Path, console: Optional[Console] = None, show: bool = True) -> str:
    """SHA-256 of a file, streamed (archives do not fit in memory on small machines)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with Progress(f"sha256 {path.name}", size, console=console, unit="bytes", enabled=show) as prog, \
            open(path, "rb") as f:
        while True:
            buf = f.read(CHUNK)
            if not buf:
                break
            h.update(buf)
            prog.advance(len(buf))
    return h.hexdigest()


def check_sha256(path: Path, expected: Optional[str], seen: str) -> None:
    """UserError when a digest was asked for and the file has another one."""
    if expected is not None and seen != expected:
        raise UserError(f"sha256 of {path.name} is {seen}, expected {expected}")


def write_digest_record(path: Path, digest: str) -> Path:
    """``<file>.sha256`` in the format `sha256sum -c` reads, so users can re-check by hand."""
    rec = path.with_name(path.name + ".sha256")
    tmp = rec.with_name(rec.name + ".tmp")
    tmp.write_text(f"{digest}  {path.name}\n")
    os.replace(tmp, rec)
    return rec


def read_digest_record(path: Path) -> Optional[str]:
    """The digest recorded next to a file by an earlier download, if any."""
    rec = path.with_name(path.name + ".sha256")
    try:
        first = rec.read_text().split()
    except OSError:
        return None
    return first[0] if first and _HEX64.match(first[0]) else None


# --------------------------------------------------------------------------- disk space


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def ensure_free_space(where: Path, need: int, what: str) -> None:
    """Refuse to start when the disk cannot hold the result: a full disk mid-way is worse."""
    free = shutil.disk_usage(_existing_ancestor(where)).free
    if free < need + FREE_SPACE_MARGIN:
        raise UserError(
            f"not enough free disk space for {what}: need {_gb(need + FREE_SPACE_MARGIN)}, "
            f"{_gb(free)} free under {_existing_ancestor(where)}"
        )


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


# --------------------------------------------------------------------------- download


def url_file_name(url: str) -> str:
    """The file name a URL serves, from its path ('' if the path names no file)."""
    return Path(urllib.parse.urlparse(url).path).name


class _Retry(Exception):
    """A transient failure: the next attempt resumes from what is on disk."""


def download(
    url: str,
    dest_dir: Path,
    *,
    expected_sha256: Optional[str] = None,
    retries: int = 5,
    timeout: float = 60.0,
    backoff: float = 1.0,
    console: Optional[Console] = None,
) -> tuple[Path, str]:
    """Fetch ``url`` into ``dest_dir``, resuming a partial file; returns (path, sha256).

    The bytes go to ``<name>.part``; an interrupted transfer (dropped connection, timeout,
    Ctrl-C) leaves that file, and the next attempt, in this call or a later run, asks the
    server for the rest with ``Range: bytes=<size>-``. Only a complete file is renamed to its
    final name, and its digest is recorded in ``<name>.sha256``. A digest that differs from
    ``expected_sha256`` removes the download (it is ours and it is wrong) and raises UserError.
    """
    name = url_file_name(url)
    if not name:
        raise UserError(f"cannot tell a file name from the URL {url}")
    made = [d for d in (dest_dir, *dest_dir.parents) if not d.exists()]
    dest_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _download_into(url, dest_dir, name, expected_sha256, retries, timeout, backoff, console)
    except BaseException:
        # a failed first attempt leaves no empty folders behind (a partial file stays, to resume)
        for d in made:
            try:
                d.rmdir()
            except OSError:
                break
        raise


def _download_into(url: str, dest_dir: Path, name: str, expected_sha256: Optional[str], retries: int,
                   timeout: float, backoff: float, console: Optional[Console]) -> tuple[Path, str]:
    """The body of :func:`download`, into an existing ``dest_dir``."""
    final = dest_dir / name
    part = dest_dir / (name + ".part")

    if final.is_file():
        digest = read_digest_record(final) or sha256_file(final, console)
        if expected_sha256 is not None and digest != expected_sha256:
            # The record may be stale (file replaced by hand): hash what is really there.
            digest = sha256_file(final, console)
        check_sha256(final, expected_sha256, digest)
        write_digest_record(final, digest)
        return final, digest

    attempt = 0
    while True:
        try:
            _fetch_once(url, part, timeout=timeout, console=console)
            break
        except _Retry as e:
            attempt += 1
            if attempt > retries:
                raise UserError(
                    f"download of {url} failed after {attempt} tries ({e}); run the same command "
                    f"again to resume from {part}"
                ) from None
            time.sleep(min(backoff * 2 ** (attempt - 1), 30.0))

    digest = sha256_file(part, console)
    if expected_sha256 is not None and digest != expected_sha256:
        part.unlink()
        raise UserError(
            f"sha256 of the downloaded {name} is {digest}, expected {expected_sha256}; "
            f"the download was removed"
        )
    os.replace(part, final)
    write_digest_record(final, digest)
    return final, digest


def _fetch_once(url: str, part: Path, *, timeout: float, console: Optional[Console]) -> None:
    """One HTTP request appending to ``part``; raises _Retry on a transient failure."""
    offset = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "dtop-prepare"})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            total = _total_from_content_range(e.headers.get("Content-Range"))
            if total == offset:
                return  # the partial file is already complete
            part.unlink()  # larger than the file on the server: ours is garbage
            raise _Retry("partial file did not match the server's file, starting over") from None
        if 500 <= e.code < 600:
            raise _Retry(f"HTTP {e.code}") from None
        raise UserError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, (socket.timeout, ConnectionError, OSError)):
            raise _Retry(str(reason)) from None
        raise UserError(f"download of {url} failed: {reason}") from None
    except (socket.timeout, ConnectionError, http.client.HTTPException) as e:
        raise _Retry(str(e) or type(e).__name__) from None

    with resp:
        status = resp.status
        length = resp.headers.get("Content-Length")
        if status == 206:
            start = _start_from_content_range(resp.headers.get("Content-Range"))
            total = _total_from_content_range(resp.headers.get("Content-Range"))
            if start != offset:
                part.unlink(missing_ok=True)
                raise _Retry("server answered a different range, starting over")
            mode = "ab"
        else:  # 200: the server ignores Range, so the whole file comes again
            offset = 0
            total = int(length) if length is not None else None
            mode = "wb"
        if total is not None:
            ensure_free_space(part.parent, total - offset, f"downloading {part.name[:-5]}")
        received = offset
        name = part.name[:-5]
        size = "unknown size" if total is None else f"{total / 2**20:.1f} MB"
        (console or Console(stderr=True)).print(
            f"downloading {name} ({size}{f', resuming at {offset / 2**20:.1f} MB' if offset else ''}) from {url}",
            highlight=False, soft_wrap=True)
        with Progress(f"download {name}", total, console=console, unit="bytes", completed=offset) as prog, \
                open(part, mode) as f:
            while True:
                try:  # only network errors are worth a retry; a failing disk write is not
                    buf = resp.read(CHUNK)
                except (socket.timeout, ConnectionError, http.client.HTTPException, OSError) as e:
                    raise _Retry(f"connection lost after {received} bytes: {e or type(e).__name__}") from None
                if not buf:
                    break
                f.write(buf)
                received += len(buf)
                prog.update(received)
        if total is not None and received < total:
            raise _Retry(f"connection closed after {received} of {total} bytes")
        if total is not None and received > total:
            part.unlink()
            raise _Retry("server sent more bytes than announced, starting over")


def _start_from_content_range(value: Optional[str]) -> Optional[int]:
    m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", value or "")
    return int(m.group(1)) if m else None


def _total_from_content_range(value: Optional[str]) -> Optional[int]:
    m = re.search(r"/(\d+)\s*$", value or "")
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- archives


@dataclass(frozen=True)
class Member:
    """One regular file or directory of an archive, with its checked relative path."""

    name: str  # posix, relative, no '.', '..' or empty parts
    size: int
    is_dir: bool


def safe_member_name(raw: str, archive: str) -> str:
    """The member's path made relative and clean, or UserError if it could leave the target.

    Absolute paths (``/x``, ``C:\\x``, ``\\\\server``) and any ``..`` component are refused
    rather than rewritten: an archive that contains them was made to attack, or is broken.
    """
    if "\x00" in raw:
        raise UserError(f"{archive}: refusing member with a NUL byte in its name: {raw!r}")
    if raw.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", raw):
        raise UserError(f"{archive}: refusing member with an absolute path: {raw}")
    parts = [p for p in re.split(r"[/\\]", raw) if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UserError(f"{archive}: refusing member that points outside the target ('..'): {raw}")
    return "/".join(parts)


class Archive:
    """A zip or tar opened read-only, every member checked before anything is extracted.

    Links (symbolic or hard), devices and fifos are refused for the whole archive: none of the
    official dataset archives has one, and a link is how a later member escapes the target.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.label = self.path.name
        if not self.path.is_file():
            raise UserError(f"file not found: {self.path}")
        self._zip: Optional[zipfile.ZipFile] = None
        self._tar: Optional[tarfile.TarFile] = None
        self._tar_infos: dict[str, tarfile.TarInfo] = {}
        self._zip_infos: dict[str, zipfile.ZipInfo] = {}
        try:
            if zipfile.is_zipfile(self.path):
                self._zip = zipfile.ZipFile(self.path)
                self.kind = "zip"
                self.members = self._zip_members()
            elif _looks_like_zip(self.path):
                raise UserError(f"{self.label} is a truncated or corrupt zip archive (no central directory)")
            else:
                self._tar = self._open_tar()
                self.kind = "tar"
                self.members = self._tar_members()
        except UserError:
            self.close()
            raise
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as e:
            self.close()
            raise UserError(f"{self.label} is a truncated or corrupt archive ({e})") from None
        self._by_name = {m.name: m for m in self.members}

    # ---- opening

    def _open_tar(self) -> tarfile.TarFile:
        try:
            return tarfile.open(self.path, "r:*")
        except tarfile.ReadError:
            raise UserError(f"{self.label} is neither a zip nor a tar archive (or it is corrupt)") from None

    def _zip_members(self) -> list[Member]:
        assert self._zip is not None
        out = []
        for info in self._zip.infolist():
            name = safe_member_name(info.filename, self.label)
            mode = (info.external_attr >> 16) & 0xFFFF
            kind = stat.S_IFMT(mode)
            if kind == stat.S_IFLNK:
                raise UserError(f"{self.label}: refusing symbolic link member: {info.filename}")
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise UserError(f"{self.label}: refusing special-file member: {info.filename}")
            if not name:
                continue
            out.append(Member(name, info.file_size, info.is_dir()))
            self._zip_infos[name] = info
        return out

    def _tar_members(self) -> list[Member]:
        assert self._tar is not None
        out = []
        size = self.path.stat().st_size
        compressed = not self._is_plain_tar()
        for info in self._tar.getmembers():
            name = safe_member_name(info.name, self.label)
            if info.issym() or info.islnk():
                raise UserError(f"{self.label}: refusing link member: {info.name} -> {info.linkname}")
            if not (info.isfile() or info.isdir()):
                raise UserError(f"{self.label}: refusing special-file member: {info.name}")
            if not compressed and info.isfile() and info.offset_data + info.size > size:
                raise UserError(f"{self.label} is truncated (member {info.name} runs past the end)")
            if not name:
                continue
            out.append(Member(name, info.size, info.isdir()))
            self._tar_infos[name] = info
        if not out:
            raise UserError(f"{self.label} is an empty or unreadable tar archive")
        self._check_tar_end()
        return out

    def _check_tar_end(self) -> None:
        """A tar cut at a member boundary reads as a shorter valid archive: look for the end marker.

        Every tar writer ends the archive with zero blocks; a plain (uncompressed) file that
        stops right after the last member's data was cut short.
        """
        assert self._tar is not None
        if not self._is_plain_tar():
            return  # compressed tars: the decompressor reports truncation itself
        end = self._tar.offset
        size = self.path.stat().st_size
        if size - end < tarfile.BLOCKSIZE:
            raise UserError(f"{self.label} is truncated (no end-of-archive marker)")

    def _is_plain_tar(self) -> bool:
        with open(self.path, "rb") as f:
            head = f.read(6)
        return not (head.startswith(b"\x1f\x8b") or head.startswith(b"BZh") or head.startswith(b"\xfd7zXZ"))

    # ---- queries

    def names(self) -> list[str]:
        return [m.name for m in self.members]

    def find_prefix(self, anchor: str) -> Optional[str]:
        """The folder prefix under which ``anchor`` (e.g. 'ADEChallengeData2016/images/') sits."""
        for m in self.members:
            full = m.name + ("/" if m.is_dir else "")
            i = full.find(anchor)
            if i == 0 or (i > 0 and full[i - 1] == "/"):
                return full[:i]
        return None

    def has(self, name: str) -> bool:
        return name in self._by_name

    def read_bytes(self, name: str) -> bytes:
        """One small member into memory (lists, JSON), with corruption reported as UserError."""
        try:
            with self._open_member(name) as f:
                return f.read()
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise UserError(f"{self.label} is truncated or corrupt (reading {name}: {e})") from None

    def _open_member(self, name: str):
        if self._zip is not None:
            return self._zip.open(self._zip_infos[name])
        assert self._tar is not None
        f = self._tar.extractfile(self._tar_infos[name])
        if f is None:
            raise UserError(f"{self.label}: {name} is not a regular file")
        return f

    # ---- extraction

    def extract(
        self,
        dest: Path,
        select: Callable[[Member], Optional[str]],
        console: Optional[Console] = None,
    ) -> int:
        """Write the selected members under ``dest``; returns the number of files written.

        ``select`` maps a member to its relative output path, or None to skip it. Free space is
        checked for the selected bytes first. Output paths are checked once more against
        ``dest`` after resolving, so no bug in ``select`` can write outside it.
        """
        chosen = [(m, select(m)) for m in self.members if not m.is_dir]
        chosen = [(m, rel) for m, rel in chosen if rel is not None]
        need = sum(m.size for m, _ in chosen)
        ensure_free_space(dest, need, f"extracting {self.label}")
        root = dest.resolve()
        n = 0
        with Progress(f"extract {self.label}", need, console=console, unit="bytes") as prog:
            for m, rel in chosen:
                out = (root / safe_member_name(rel, self.label)).resolve()
                if root != out and root not in out.parents:
                    raise UserError(f"{self.label}: refusing member that lands outside the target: {m.name}")
                written = 0
                try:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with self._open_member(m.name) as src, open(out, "xb") as dst:
                        while True:
                            buf = src.read(CHUNK)
                            if not buf:
                                break
                            written += len(buf)
                            if written > m.size:  # a member that lies about its size (zip bomb)
                                raise UserError(
                                    f"{self.label}: member {m.name} is larger than its header says"
                                )
                            dst.write(buf)
                            prog.advance(len(buf))
                except (FileExistsError, NotADirectoryError):
                    raise UserError(
                        f"{self.label}: member appears twice or clashes with a folder: {m.name}"
                    ) from None
                except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as e:
                    raise UserError(f"{self.label} is truncated or corrupt ({m.name}: {e})") from None
                n += 1
        return n

    # ---- lifetime

    def close(self) -> None:
        for h in (self._zip, self._tar):
            if h is not None:
                h.close()
        self._zip = self._tar = None

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _looks_like_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) in (b"PK\x03\x04", b"PK\x05\x06")


def is_archive(path: Path) -> bool:
    """A file we would open as an archive (zip by content, tar by content or name)."""
    if not path.is_file():
        return False
    if _looks_like_zip(path) or zipfile.is_zipfile(path):
        return True
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


# --------------------------------------------------------------------------- staging


class Staging:
    """A temporary folder beside ``target`` that becomes ``target`` on success, or vanishes.

    Used as a context manager: on an exception the folder (ours) is removed, together with
    any parent folders this run created that are still empty. ``install`` renames it into
    place; the same filesystem makes that a single atomic rename.
    """

    def __init__(self, target: Path) -> None:
        self.target = Path(target).absolute()
        self._made_parents: list[Path] = []
        p = self.target.parent
        missing = []
        while not p.exists():
            missing.append(p)
            p = p.parent
        for q in reversed(missing):
            q.mkdir()
            self._made_parents.append(q)
        self.path = Path(
            tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{self.target.name}-", dir=self.target.parent)
        )
        self.installed = False

    def install(self, sub: Optional[str] = None) -> Path:
        """Rename the staged tree (or its ``sub`` folder) to the target, then drop the rest."""
        src = self.path / sub if sub else self.path
        if self.target.exists():
            raise UserError(f"{self.target} appeared while preparing; leaving it alone")
        os.rename(src, self.target)
        self.installed = True
        if sub:
            shutil.rmtree(self.path, ignore_errors=True)
        return self.target

    def install_into(self, entries: list[str]) -> None:
        """Move staged top-level entries into an existing target (which is not ours to replace)."""
        for e in entries:
            if (self.target / e).exists():
                raise UserError(f"{self.target / e} already exists and was not made by this run")
        for e in entries:
            (self.target / e).parent.mkdir(parents=True, exist_ok=True)
            os.rename(self.path / e, self.target / e)
        self.installed = True
        shutil.rmtree(self.path, ignore_errors=True)

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if not self.installed:
            for q in reversed(self._made_parents):
                try:
                    q.rmdir()
                except OSError:
                    break

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, et: Optional[type], ev: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.cleanup()


def copy_tree(src: Path, dst: Path, console: Optional[Console] = None) -> int:
    """Bring a user's folder into our tree without touching it: hard links when possible.

    Hard links cost no space and leave the user's files as they are (removing our link never
    removes their file); across filesystems the files are copied, after a free-space check.
    Returns the number of files.
    """
    files = list(iter_files(src))
    sizes = [f.stat().st_size for f in files]
    total = sum(sizes)
    linking = True
    with Progress(f"copy {src.name}", total, console=console, unit="bytes") as prog:
        for f, n in zip(files, sizes, strict=True):
            out = dst / f.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            if linking:
                try:
                    os.link(f, out)
                except OSError:
                    linking = False
                    ensure_free_space(dst, total, f"copying {src}")
            if not linking:
                shutil.copy2(f, out)
            prog.advance(n)
    return len(files)


def link_or_copy(src: Path, dst: Path) -> None:
    """One file of a user's folder into our tree (see copy_tree)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def iter_files(root: Path) -> Iterator[Path]:
    """Files under ``root``; folder links are not followed, so a tree cannot loop.

    Our own staging folders are skipped: a source folder may contain the target's parent.
    """
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(STAGING_PREFIX))
        for fn in filenames:
            p = Path(dirpath) / fn
            if p.is_file():
                yield p
