"""COCO-Stuff-10K (v1.1 zip): MATLAB label maps -> 171-class PNGs in mmseg's layout.

The zip stores each label map as field ``S`` of a MATLAB file, in COCO's 182 ids of which 11
(things removed from COCO before release) never occur. The remaining ids keep their order and
become 1..171; 0 (unlabeled) stays 0 and turns into the ignore index through the preset's
``reduce_zero_label``. Should one of the 11 unused ids appear anyway, its pixels become 0
(unlabeled) and the summary warns with the count: training on them would need a class that
does not exist. Ids above 182 are bad input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
from rich.console import Console

from ..errors import UserError
from .archives import Archive, Member, Staging, link_or_copy
from .common import (
    finish,
    guess_archive,
    guess_folder,
    raise_problems,
    refuse_foreign_target,
    safe_stem,
    same_path,
)
from .verify import MARKER, DatasetLayout, image_size, parallel_map

UNUSED_IDS: frozenset[int] = frozenset((12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91))
MAX_ID = 182
ANCHOR = "imageLists/train.txt"
LISTS = (("train", "imageLists/train.txt"), ("val", "imageLists/test.txt"))


def cocostuff171_lut() -> np.ndarray:
    """COCO id 0..182 -> 0..171: used ids keep their order, 0 and the unused ids give 0."""
    lut = np.zeros(MAX_ID + 1, dtype=np.uint8)
    used = [i for i in range(1, MAX_ID + 1) if i not in UNUSED_IDS]
    lut[used] = np.arange(1, len(used) + 1, dtype=np.uint8)
    return lut


def load_label_mat(path: str) -> np.ndarray:
    """Field ``S`` of a COCO-Stuff .mat file as an int64 (h, w) array; ValueError if unusable."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(path, variable_names=["S"])
    except NotImplementedError:
        raise ValueError("is a MATLAB v7.3 (HDF5) file; COCO-Stuff-10K v1.1 uses MATLAB v5") from None
    except Exception as e:  # noqa: BLE001 - scipy raises many types for damaged files
        raise ValueError(f"is not a readable MATLAB file ({e})") from None
    if "S" not in mat:
        raise ValueError("has no field S (the label map)")
    s = np.asarray(mat["S"])
    if s.ndim != 2 or not (np.issubdtype(s.dtype, np.integer) or np.issubdtype(s.dtype, np.floating)):
        raise ValueError(f"field S is not a 2-D label map (shape {s.shape}, {s.dtype})")
    if np.issubdtype(s.dtype, np.floating):
        if not np.all(np.isfinite(s)) or np.any(s != np.round(s)):
            raise ValueError("field S holds non-integer values")
    return s.astype(np.int64)


def convert_mat(args: tuple[str, str, str, str]) -> tuple[Optional[str], int, list[int]]:
    """One label map: (problem or None, pixels with an unused id, classes present)."""
    from PIL import Image

    name, mat, jpg, out_png = args
    try:
        s = load_label_mat(mat)
    except ValueError as e:
        return f"annotations/{name}.mat {e}", 0, []
    try:
        hw = image_size(Path(jpg))
    except Exception as e:  # noqa: BLE001
        return f"images/{name}.jpg cannot be read ({e})", 0, []
    if tuple(s.shape) != hw:
        return (
            f"annotations/{name}.mat is {s.shape[0]}x{s.shape[1]} but images/{name}.jpg is {hw[0]}x{hw[1]}",
            0,
            [],
        )
    lo, hi = int(s.min()), int(s.max())
    if lo < 0 or hi > MAX_ID:
        bad = [int(v) for v in np.unique(s) if v < 0 or v > MAX_ID][:5]
        return f"annotations/{name}.mat has label values {bad} outside the COCO ids 0..{MAX_ID}", 0, []
    unused = int(np.isin(s, list(UNUSED_IDS)).sum())
    lbl = cocostuff171_lut()[s]
    Image.fromarray(lbl, mode="L").save(out_png)
    return None, unused, [int(v) for v in np.unique(lbl) if v > 0]


def _parse_list(text: str, where: str) -> list[str]:
    names = []
    for ln in text.splitlines():
        n = ln.strip()
        if not n:
            continue
        for ext in (".jpg", ".mat", ".png"):
            if n.endswith(ext):
                n = n[: -len(ext)]
        names.append(safe_stem(n, where))
    return names


def _find_tree(folder: Path) -> Optional[Path]:
    for cand in (folder, folder / "cocostuff-10k-v1.1"):
        if (cand / ANCHOR).is_file():
            return cand
    return None


def prepare_coco_stuff(
    paths: list[Path],
    target: Path,
    lay: DatasetLayout,
    *,
    workers: int,
    console: Optional[Console],
    sources: list[dict[str, Any]],
) -> dict[str, Any]:
    """Split the images by the official lists and convert every .mat to a 171-class PNG."""
    if len(paths) != 1:
        raise UserError(
            f"coco-stuff10k takes one --src (cocostuff-10k-v1.1.zip or its extracted folder), "
            f"got {len(paths)}"
        )
    src = paths[0]
    ar: Optional[Archive] = None
    tree: Optional[Path] = None
    in_place = False
    if src.is_dir():
        tree = _find_tree(src)
        if tree is None:
            raise UserError(
                f"{src} is not the extracted COCO-Stuff-10K folder (no {ANCHOR}); {guess_folder(src)}"
            )
        in_place = same_path(tree, target)
    else:
        ar = Archive(src)
    try:
        if target.exists() and not in_place:
            refuse_foreign_target(target, "coco-stuff10k")
        prefix = ""
        if ar is not None:
            found = ar.find_prefix(ANCHOR)
            if found is None:
                raise UserError(
                    f"{src.name} is not the COCO-Stuff-10K zip (no {ANCHOR} inside); {guess_archive(ar)}"
                )
            prefix = found

        # The split lists decide everything else: read them first, then check every file exists.
        split_of: dict[str, str] = {}
        names: dict[str, list[str]] = {}
        for key, rel in LISTS:
            if ar is not None:
                if not ar.has(prefix + rel):
                    raise UserError(f"{src.name} has no {rel}")
                text = ar.read_bytes(prefix + rel).decode("utf-8", "replace")
            else:
                if not (tree / rel).is_file():  # type: ignore[operator]
                    raise UserError(f"{src} has no {rel}")
                text = (tree / rel).read_text(errors="replace")  # type: ignore[operator]
            names[key] = sorted(set(_parse_list(text, rel)))
            for n in names[key]:
                if n in split_of:
                    raise UserError(
                        f"{src.name}: {n} is in both imageLists/train.txt and imageLists/test.txt"
                    )
                split_of[n] = key
        for n in split_of:
            for rel in (f"images/{n}.jpg", f"annotations/{n}.mat"):
                ok = ar.has(prefix + rel) if ar is not None else (tree / rel).is_file()  # type: ignore[operator]
                if not ok:
                    raise UserError(f"{src.name} lists {n} in imageLists but has no {rel}")

        split_dir = {s.key: s for s in lay.splits}
        with Staging(target) as st:
            work = st.path
            if ar is not None:

                def select(m: Member) -> Optional[str]:
                    rel = m.name[len(prefix) :] if m.name.startswith(prefix) else None
                    if rel is None:
                        return None
                    for folder, ext, dest in (("images/", ".jpg", "img"), ("annotations/", ".mat", "mat")):
                        if rel.startswith(folder) and rel.endswith(ext) and "/" not in rel[len(folder) :]:
                            key = split_of.get(rel[len(folder) : -len(ext)])
                            if key is None:
                                return None
                            stem = rel[len(folder) :]
                            return f"{split_dir[key].img}/{stem}" if dest == "img" else f"_mat/{stem}"
                    return rel if rel.startswith("imageLists/") else None

                ar.extract(work, select, console)
                mat_of = {n: work / "_mat" / f"{n}.mat" for n in split_of}
            else:
                for n, key in split_of.items():
                    link_or_copy(tree / "images" / f"{n}.jpg", work / split_dir[key].img / f"{n}.jpg")  # type: ignore[operator]
                if not in_place:
                    for _, rel in LISTS:
                        link_or_copy(tree / rel, work / rel)  # type: ignore[operator]
                mat_of = {n: tree / "annotations" / f"{n}.mat" for n in split_of}  # type: ignore[operator]

            counts: dict[str, int] = {}
            seen: dict[str, list[int]] = {}
            unused = 0
            for key in ("train", "val"):
                sd = split_dir[key]
                (work / sd.ann).mkdir(parents=True, exist_ok=True)
                (work / sd.img).mkdir(parents=True, exist_ok=True)
                jobs = [
                    (
                        n,
                        str(mat_of[n]),
                        str(work / sd.img / f"{n}.jpg"),
                        str(work / sd.ann / f"{n}{lay.seg_suffix}"),
                    )
                    for n in names[key]
                ]
                results = parallel_map(convert_mat, jobs, workers, f"coco-stuff10k {key}", console)
                raise_problems([p for p, _, _ in results if p], f"COCO-Stuff-10K input {src.name}")
                ids: set[int] = set()
                for _, u, present in results:
                    unused += u
                    ids.update(present)
                seen[key] = sorted(ids)
                counts[key] = len(names[key])
            warnings = []
            if unused:
                warnings.append(
                    f"{unused} pixels carried one of the unused COCO ids {sorted(UNUSED_IDS)}; "
                    f"they were set to 0 (unlabeled)"
                )
            if ar is not None:
                import shutil

                shutil.rmtree(work / "_mat")
            res = finish(work, "coco-stuff10k", counts, seen, sources, warnings)
            if in_place:
                st.install_into(
                    [
                        split_dir["train"].img,
                        split_dir["val"].img,
                        split_dir["train"].ann,
                        split_dir["val"].ann,
                        MARKER,
                    ]
                )
            else:
                st.install()
        return res
    finally:
        if ar is not None:
            ar.close()
