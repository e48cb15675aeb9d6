"""What a prepared dataset must look like, and the checks that say whether it does.

The folder layout is read from the presets (the one place that says where a run looks for
its images), so `dtop prepare` can never disagree with `dtop train` about a path. The
official pair counts are facts about the published datasets. The same per-pair scan serves
`prepare` (any problem is bad input: exit 2) and `prepare --verify` (problems are reported:
exit 1).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, TypeVar

import numpy as np
from rich.console import Console

from ..console import Progress
from ..errors import UserError

MARKER = ".dtop-prepared.json"
IGNORE_INDEX = 255

# Pairs per split in the published datasets (datasets.md).
OFFICIAL_PAIRS: dict[str, dict[str, int]] = {
    "ade20k": {"train": 20210, "val": 2000},
    "pascal-context": {"train": 4996, "val": 5104},
    "coco-stuff10k": {"train": 9000, "val": 1000},
}

# File naming of the mmseg dataset class each preset names (data.type).
_SUFFIXES: dict[str, tuple[str, str]] = {
    "ADE20KDataset": (".jpg", ".png"),
    "PascalContextDataset59": (".jpg", ".png"),
    "COCOStuffDataset": (".jpg", "_labelTrainIds.png"),
}


@dataclass(frozen=True)
class SplitLayout:
    key: str  # 'train' or 'val'
    img: str
    ann: str
    list: Optional[str]


@dataclass(frozen=True)
class DatasetLayout:
    """Where one dataset lives under --data-root, as the presets read it."""

    name: str
    root: str
    num_classes: int
    img_suffix: str
    seg_suffix: str
    splits: tuple[SplitLayout, ...]

    def path(self, data_root: Path) -> Path:
        return Path(data_root) / self.root

    def split(self, key: str) -> SplitLayout:
        return next(s for s in self.splits if s.key == key)


@lru_cache(maxsize=None)
def layout(dataset: str) -> DatasetLayout:
    """The layout of ``dataset`` from the first shipped preset that trains on it."""
    from .. import presets as P

    for name in P.available():
        p = P.load_preset(name)
        if p.data.dataset != dataset:
            continue
        d = p.data
        img_suffix, seg_suffix = _SUFFIXES.get(d.type, (".jpg", ".png"))
        return DatasetLayout(
            name=dataset,
            root=d.root,
            num_classes=d.num_classes,
            img_suffix=img_suffix,
            seg_suffix=seg_suffix,
            splits=(
                SplitLayout("train", d.train_split.img, d.train_split.ann, d.train_split.list),
                SplitLayout("val", d.val_split.img, d.val_split.ann, d.val_split.list),
            ),
        )
    raise UserError(f"no preset describes the dataset '{dataset}'")


# --------------------------------------------------------------------------- parallel map

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def parallel_map(
    fn: Callable[[T], R],
    items: Sequence[T],
    workers: int,
    desc: str,
    console: Optional[Console] = None,
) -> list[R]:
    """``[fn(x) for x in items]`` over ``workers`` processes, with a progress bar, in order.

    Processes are started with 'spawn': the parent may hold torch's thread pools, and forking
    those can deadlock. One worker runs in this process (no start-up cost for small jobs).
    """
    out: list[R] = []
    with Progress(desc, len(items), console=console) as prog:
        if workers <= 1 or len(items) < 2:
            for x in items:
                out.append(fn(x))
                prog.advance()
            return out
        chunk = max(1, min(64, len(items) // (workers * 8) or 1))
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as ex:
            for r in ex.map(fn, items, chunksize=chunk):
                out.append(r)
                prog.advance()
    return out


# --------------------------------------------------------------------------- pairs


@dataclass
class SplitPairs:
    key: str
    pairs: list[tuple[str, Path, Path]]  # (stem, image, label)
    problems: list[str] = field(default_factory=list)


def list_pairs(lay: DatasetLayout, root: Path, key: str) -> SplitPairs:
    """The (image, label) pairs of one split as the mmseg dataset class would find them."""
    s = lay.split(key)
    img_dir, ann_dir = root / s.img, root / s.ann
    out = SplitPairs(key, [])
    if s.list is not None:
        lst = root / s.list
        if not lst.is_file():
            out.problems.append(f"{key}: split list {s.list} is missing")
            return out
        stems = [ln.strip() for ln in lst.read_text().splitlines() if ln.strip()]
        for st in stems:
            img, lab = img_dir / (st + lay.img_suffix), ann_dir / (st + lay.seg_suffix)
            if not img.is_file():
                out.problems.append(
                    f"{key}: image {s.img}/{st}{lay.img_suffix} (listed in {s.list}) is missing"
                )
            elif not lab.is_file():
                out.problems.append(
                    f"{key}: label {s.ann}/{st}{lay.seg_suffix} (listed in {s.list}) is missing"
                )
            else:
                out.pairs.append((st, img, lab))
        return out
    if not img_dir.is_dir():
        out.problems.append(f"{key}: image folder {s.img} is missing")
        return out
    if not ann_dir.is_dir():
        out.problems.append(f"{key}: label folder {s.ann} is missing")
        return out
    imgs = {n[: -len(lay.img_suffix)] for n in os.listdir(img_dir) if n.endswith(lay.img_suffix)}
    labs = {n[: -len(lay.seg_suffix)] for n in os.listdir(ann_dir) if n.endswith(lay.seg_suffix)}
    for st in sorted(imgs - labs):
        out.problems.append(f"{key}: image {s.img}/{st}{lay.img_suffix} has no label")
    for st in sorted(labs - imgs):
        out.problems.append(f"{key}: label {s.ann}/{st}{lay.seg_suffix} has no image")
    out.pairs = [
        (st, img_dir / (st + lay.img_suffix), ann_dir / (st + lay.seg_suffix)) for st in sorted(imgs & labs)
    ]
    return out


def count_pairs(lay: DatasetLayout, root: Path) -> dict[str, int]:
    """Pairs per split from directory listings only: the seconds-fast check of a re-run."""
    return {s.key: len(list_pairs(lay, root, s.key).pairs) for s in lay.splits}


# --------------------------------------------------------------------------- per-pair scan


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header only: decoding 20k JPEGs just for sizes is waste."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
    return h, w


def read_label(path: Path) -> np.ndarray:
    """A label map as stored (8-bit grey or palette indices), never colour-converted."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"label image mode {im.mode} is not a single-channel index map")
        return np.asarray(im)


def scan_pair(args: tuple[str, str, str, int, str]) -> tuple[Optional[str], list[int]]:
    """Check one pair: readable, same size, label values in 0..num_classes or 255.

    Returns (problem or None, sorted class ids present, 0 and 255 excluded). Problems name
    files relative to the dataset root, which is where the user will look for them.
    """
    img, lab, split, num_classes, root = args
    rimg, rlab = os.path.relpath(img, root), os.path.relpath(lab, root)
    try:
        hw = image_size(Path(img))
    except Exception as e:  # noqa: BLE001 - any decoder error is a damaged file
        return f"{split}: image {rimg} cannot be read ({e})", []
    try:
        lbl = read_label(Path(lab))
    except Exception as e:  # noqa: BLE001
        return f"{split}: label {rlab} cannot be read ({e})", []
    if lbl.ndim != 2:
        return f"{split}: label {rlab} has {lbl.ndim} dimensions, expected a 2-D map", []
    if tuple(lbl.shape) != hw:
        return f"{split}: label {rlab} is {lbl.shape[0]}x{lbl.shape[1]} but its image is {hw[0]}x{hw[1]}", []
    ids = np.unique(lbl)
    bad = [int(v) for v in ids if v > num_classes and v != IGNORE_INDEX]
    present = [int(v) for v in ids if 0 < v <= num_classes]
    if bad:
        return (
            f"{split}: label {rlab} has values {bad[:5]} outside 0..{num_classes} "
            f"(and {IGNORE_INDEX} = ignore)",
            present,
        )
    return None, present


@dataclass
class ScanReport:
    counts: dict[str, int]
    classes_seen: dict[str, list[int]]
    problems: list[str]


def scan_dataset(
    lay: DatasetLayout,
    root: Path,
    workers: int,
    console: Optional[Console] = None,
    splits: Iterable[str] = ("train", "val"),
) -> ScanReport:
    """Every pair of every split: pairing, sizes, label values, classes present."""
    counts: dict[str, int] = {}
    seen: dict[str, list[int]] = {}
    problems: list[str] = []
    for key in splits:
        sp = list_pairs(lay, root, key)
        problems += sp.problems
        counts[key] = len(sp.pairs)
        args = [(str(i), str(lb), key, lay.num_classes, str(root)) for _, i, lb in sp.pairs]
        results = parallel_map(scan_pair, args, workers, f"check {lay.name} {key}", console)
        ids: set[int] = set()
        for prob, present in results:
            if prob:
                problems.append(prob)
            ids.update(present)
        seen[key] = sorted(ids)
    return ScanReport(counts, seen, problems)


# --------------------------------------------------------------------------- marker


def read_marker(root: Path) -> Optional[dict[str, Any]]:
    try:
        data = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_marker(root: Path, data: dict[str, Any]) -> None:
    tmp = root / (MARKER + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, root / MARKER)


# --------------------------------------------------------------------------- --verify


def verify_dataset(
    dataset: str,
    data_root: Path,
    *,
    workers: int = 0,
    allow_partial: bool = False,
    console: Optional[Console] = None,
) -> dict[str, Any]:
    """The `prepare --verify` report: counts vs official, sizes, label values.

    Size and value problems, missing files and empty splits are errors. A pair count that
    differs from the published one is an error too (a full dataset that lost files must not
    pass), unless ``allow_partial``: then it is a warning, for deliberate subsets.
    """
    lay = layout(dataset)
    root = lay.path(data_root)
    if not root.is_dir():
        raise UserError(f"{root} does not exist; run `dtop prepare {dataset} --src ...` first")
    rep = scan_dataset(lay, root, workers or default_workers(), console)
    problems = list(rep.problems)
    warnings: list[str] = []
    splits = {}
    for key, n in rep.counts.items():
        official = OFFICIAL_PAIRS.get(dataset, {}).get(key)  # the generated demo has none
        splits[key] = {"pairs": n, "official": official, "classes_seen": len(rep.classes_seen[key])}
        if n == 0:
            problems.append(f"{key}: no pairs found")
        elif official is not None and n != official:
            msg = f"{key}: {n} pairs, the official dataset has {official}"
            (warnings if allow_partial else problems).append(msg)
    marker = read_marker(root)
    return {
        "dataset": dataset,
        "root": str(root),
        "ok": not problems,
        "splits": splits,
        "problems": problems,
        "warnings": warnings,
        "prepared_by_dtop": marker is not None,
    }
