"""Pieces the three dataset converters share: recognising inputs, safe names, finishing."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from ..errors import UserError
from .archives import Archive
from .verify import write_marker

# A member path fragment that only one of the official archives has, and what to call it.
ANCHORS: tuple[tuple[str, str], ...] = (
    ("ADEChallengeData2016/images/", "the ADE20K zip (ADEChallengeData2016.zip)"),
    ("VOC2010/JPEGImages/", "the VOC2010 tar (VOCtrainval_03-May-2010.tar)"),
    ("imageLists/train.txt", "the COCO-Stuff-10K zip (cocostuff-10k-v1.1.zip)"),
)

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")


def guess_archive(ar: Archive) -> str:
    """What an archive looks like, for the 'wrong archive' message."""
    for anchor, what in ANCHORS:
        if ar.find_prefix(anchor) is not None:
            return f"it looks like {what}"
    return "it is none of the official dataset archives"


def guess_folder(folder: Path) -> str:
    for anchor, what in ANCHORS:
        first = anchor.split("/")[0]
        if (folder / first).exists() or (folder.name == first):
            return f"it looks like {what}, extracted"
    return "it is none of the official dataset folders"


def safe_stem(name: str, where: str) -> str:
    """An image name from a list or JSON becomes a path: allow plain file names only."""
    if not _SAFE_NAME.match(name) or ".." in name:
        raise UserError(f"{where}: refusing image name {name!r} (not a plain file name)")
    return name


def same_path(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def refuse_foreign_target(target: Path, name: str) -> None:
    """A folder at the target that dtop did not make is the user's: never replace it."""
    raise UserError(
        f"{target} already exists and was not made by `dtop prepare`; pass it as --src to convert "
        f"it in place, check it with `dtop prepare {name} --verify`, or move it away"
    )


def raise_problems(problems: list[str], what: str) -> None:
    """Bad input found while converting: the first problem, and how many more, as one line."""
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise UserError(f"{what}: {problems[0]}{more}")


def finish(
    root: Path,
    dataset: str,
    splits: dict[str, int],
    classes_seen: dict[str, list[int]],
    sources: list[dict[str, Any]],
    warnings: list[str],
) -> dict[str, Any]:
    """Write the marker that lets a re-run recognise the finished dataset, return the result."""
    payload = {
        "dataset": dataset,
        "format": 1,
        "splits": splits,
        "classes_seen": classes_seen,
        "sources": sources,
        "warnings": warnings,
        "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_marker(root, payload)
    return {"splits": splits, "classes_seen": classes_seen, "warnings": warnings}


def single_source(paths: list[Path], dataset: str, what: str) -> Path:
    if len(paths) != 1:
        raise UserError(f"{dataset} takes one --src ({what}), got {len(paths)}")
    return paths[0]
