"""Files that are either complete or absent: atomic writes and writable work dirs.

A run killed at the wrong moment (preemption, Ctrl-C, a full disk) must never leave a
half-written checkpoint, picture or summary that a later command trusts. Every file dtop
writes goes through :func:`atomic_write` / :func:`atomic_save`: written under a hidden
temporary name in the target folder, flushed to disk, then renamed over the target, so
readers see the old file or the new one, never a part.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Union

from .errors import UserError

PathLike = Union[str, Path]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(path: PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, rename it into place.

    The temporary file is removed if ``write`` (or anything after it) fails, so an error
    leaves ``path`` as it was. Returns ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_save`)."""
    return atomic_save(path, lambda f: f.write(data))


def check_work_dir(work_dir: PathLike) -> Path:
    """Create the work dir and make sure we can write there (one line instead of a traceback later)."""
    wd = Path(work_dir).expanduser().resolve()
    try:
        wd.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".dtop-write-test-", dir=wd)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write to work dir {wd}: {e.strerror or e}") from None
    return wd


def check_out_dir(out_dir: PathLike) -> Path:
    """An output folder given by the user: it may exist (as a folder) or be made."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    return out
