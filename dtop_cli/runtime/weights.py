"""Pretrained backbone weights: downloaded once into a cache, or given as a local file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import UserError
from ..presets import PRESET_DIR, Preset


def cache_dir() -> Path:
    """Where downloaded pretrained weights live ($DTOP_CACHE, else ~/.cache/dtop)."""
    base = os.environ.get("DTOP_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                       os.path.expanduser("~/.cache"), "dtop")
    return Path(base) / "pretrained"


def preset_relative(preset: Preset, name: str) -> Optional[Path]:
    """An existing file named by a preset: as given (absolute, or relative to the current
    folder), else beside the preset's own file, else in the shipped presets folder (where
    the demo's backbone lives: ``weights/tiny-synthetic-vit.pth``). None if none exists."""
    p = Path(name).expanduser()
    candidates = [p]
    if not p.is_absolute():
        src = Path(preset.source) if preset.source else None
        if src is not None and src.is_file():
            candidates.append(src.parent / p)
        candidates.append(PRESET_DIR / p)
    for c in candidates:
        if c.is_file():
            return c.resolve()
    return None


def resolve_pretrained(preset: Preset, pretrained: Optional[Union[str, Path]],
                       console: Any = None) -> Optional[Path]:
    """The local file of the backbone's pretrained weights: ``--pretrained``, the cache, or a
    one-time download of the preset's URL (resumable, checksum recorded)."""
    if pretrained is not None:
        p = Path(pretrained).expanduser()
        if not p.is_file():
            raise UserError(f"--pretrained {p}: file not found")
        return p.resolve()
    url = preset.model.pretrained
    if not url:
        return None
    if "://" not in url:  # a path in the preset
        p = preset_relative(preset, url)
        if p is None:
            raise UserError(f"preset '{preset.name}' names pretrained weights {url}, which do not exist "
                            "(a relative path is looked up in the current folder, beside the preset file "
                            f"and in {PRESET_DIR})")
        return p
    from ..data.archives import download

    dest = cache_dir()
    name = Path(url.split("?")[0]).name
    try:
        path, _ = download(url, dest, retries=2, backoff=1.0, console=console)
    except UserError as e:
        raise UserError(f"pretrained weights unavailable ({e}); download {url} and put it at "
                        f"{dest / name}, or pass --pretrained PATH") from None
    return path
