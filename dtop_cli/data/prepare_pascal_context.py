"""Pascal-Context 59 from the VOC2010 tar and PASCAL in Detail's trainval_merged.json.

Each image's class mask is painted from its segmentation annotations in file order (a later
annotation overwrites an earlier one where they overlap), then the 459 Detail categories are
reduced to the 59 most frequent ones plus background. The run-length masks are decoded with
pycocotools; their run lengths are checked against the image area first, because the decoder
writes without bounds checks and a damaged string would corrupt memory instead of failing.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
from rich.console import Console

from ..errors import UserError
from .archives import Archive, Member, Staging, copy_tree, is_archive
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

# The 59 classes + background as Detail category ids; position = Pascal-Context-59 label.
CONTEXT59_IDS: tuple[int, ...] = (
    0,
    2,
    9,
    18,
    19,
    22,
    23,
    25,
    31,
    33,
    34,
    44,
    45,
    46,
    59,
    65,
    68,
    72,
    80,
    85,
    98,
    104,
    105,
    113,
    115,
    144,
    158,
    159,
    162,
    187,
    189,
    207,
    220,
    232,
    258,
    259,
    260,
    284,
    295,
    296,
    308,
    324,
    326,
    347,
    349,
    354,
    355,
    360,
    366,
    368,
    397,
    415,
    416,
    420,
    424,
    427,
    440,
    445,
    454,
    458,
)
JSON_KEYS = ("images", "annos_segmentation", "categories")
VOC = "VOC2010"
ANCHOR = f"{VOC}/JPEGImages/"


def context59_lut(max_id: int) -> np.ndarray:
    """Detail category id -> 0..59; every id outside the 59 becomes 0 (background)."""
    lut = np.zeros(max(max_id, max(CONTEXT59_IDS)) + 1, dtype=np.uint8)
    for i, cid in enumerate(sorted(CONTEXT59_IDS)):
        lut[cid] = i
    return lut


def rle_counts(s: str) -> list[int]:
    """Run lengths of a compressed COCO RLE string (the format's LEB128-like coding).

    Used only to check a string before pycocotools decodes it; raises ValueError when the
    string is malformed.
    """
    out: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise ValueError("string ends inside a number")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {s[p]!r} is not part of the encoding")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        if x < 0:
            raise ValueError("negative run length")
        out.append(x)
    return out


def _decode(seg: Any, h: int, w: int) -> np.ndarray:
    """One annotation's (h, w) mask; compressed RLE as published, uncompressed RLE or polygons too."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, dict) and isinstance(seg.get("counts"), str):
        size = seg.get("size")
        if list(size or []) != [h, w]:
            raise ValueError(f"mask size {size} differs from the image's {[h, w]}")
        if sum(rle_counts(seg["counts"])) != h * w:
            raise ValueError("run lengths do not add up to the image area")
        rle = {"size": [h, w], "counts": seg["counts"].encode("ascii")}
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
        if (
            list(seg.get("size") or []) != [h, w]
            or sum(seg["counts"]) != h * w
            or min(seg["counts"], default=0) < 0
        ):
            raise ValueError("uncompressed run lengths do not match the image")
        rle = mask_utils.frPyObjects(seg, h, w)
    elif isinstance(seg, list) and seg and all(isinstance(p, list) for p in seg):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    else:
        raise ValueError("segmentation is neither a run-length mask nor polygons")
    with warnings.catch_warnings():  # pycocotools' own numpy-2 deprecation notice, not ours
        warnings.simplefilter("ignore", DeprecationWarning)
        m = mask_utils.decode(rle)
    return m[..., 0] if m.ndim == 3 else m


def convert_image(
    args: tuple[str, str, int, int, list[tuple[int, Any]], str, int],
) -> tuple[Optional[str], list[int]]:
    """Paint, reduce to 59 classes and write one label map; (problem or None, classes present)."""
    from PIL import Image

    file_name, jpg, h, w, anns, out_png, max_id = args
    try:
        ih, iw = image_size(Path(jpg))
    except Exception as e:  # noqa: BLE001 - a damaged JPEG is bad input
        return f"JPEGImages/{file_name} cannot be read ({e})", []
    if (ih, iw) != (h, w):
        return f"JPEGImages/{file_name} is {ih}x{iw} but trainval_merged.json says {h}x{w}", []
    canvas = np.zeros((h, w), dtype=np.int32)
    for i, (cat, seg) in enumerate(anns):
        try:
            m = _decode(seg, h, w)
        except Exception as e:  # noqa: BLE001
            return f"annotation {i + 1} of {file_name} in trainval_merged.json: {e}", []
        canvas[m > 0] = cat
    lbl = context59_lut(max_id)[canvas]
    Image.fromarray(lbl, mode="L").save(out_png)
    ids = np.unique(lbl)
    return None, [int(v) for v in ids if v > 0]


def _load_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path.name} is not valid JSON (truncated or corrupt?): {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path.name} is not trainval_merged.json (top level is not an object)")
    missing = [k for k in JSON_KEYS if k not in data]
    if missing:
        raise UserError(
            f"{path.name} lacks the key(s) {', '.join(missing)}; expected PASCAL in Detail's "
            f"trainval_merged.json with {', '.join(JSON_KEYS)}"
        )
    return data


def plan_images(data: dict[str, Any], name: str) -> tuple[dict[str, list[dict]], dict[int, list], int]:
    """Images per phase and each image's (category, segmentation) list in file order.

    Raises UserError for entries without the expected keys and for category ids the file's own
    category list does not know.
    """

    def need(entry: Any, keys: tuple[str, ...], what: str, i: int) -> None:
        if not isinstance(entry, dict) or any(k not in entry for k in keys):
            raise UserError(f"{name}: {what} entry {i} lacks one of the keys {', '.join(keys)}")

    known: set[int] = {0}
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not isinstance(c.get("category_id", c.get("id")), int):
            raise UserError(f"{name}: categories entry {i} has no integer category_id")
        known.add(int(c.get("category_id", c.get("id"))))
    phases: dict[str, list[dict]] = {"train": [], "val": []}
    by_id: dict[int, dict] = {}
    for i, im in enumerate(data["images"]):
        need(im, ("image_id", "file_name", "phase", "height", "width"), "images", i)
        if im["phase"] in phases:
            fn = safe_stem(str(im["file_name"]), name)
            if not fn.endswith(".jpg"):
                raise UserError(f"{name}: images entry {i} names {fn!r}, expected a .jpg file name")
            if any(not isinstance(im[k], int) or im[k] <= 0 for k in ("height", "width")):
                raise UserError(f"{name}: images entry {i} ({fn}) has no positive integer height/width")
            phases[im["phase"]].append(im)
            by_id[im["image_id"]] = im
    anns: dict[int, list] = {iid: [] for iid in by_id}
    for i, a in enumerate(data["annos_segmentation"]):
        need(a, ("image_id", "category_id", "segmentation"), "annos_segmentation", i)
        if a["image_id"] not in anns:
            continue
        cat = a["category_id"]
        if not isinstance(cat, int) or cat not in known:
            fn = by_id[a["image_id"]]["file_name"]
            raise UserError(
                f"{name}: annotation {a.get('id', i)} of {fn} has category_id {cat!r}, "
                f"not one of the {len(known) - 1} categories the file lists"
            )
        anns[a["image_id"]].append((cat, a["segmentation"]))
    if not phases["train"] and not phases["val"]:
        raise UserError(f"{name}: no images with phase 'train' or 'val'")
    return phases, anns, max(known)


def _split_sources(paths: list[Path]) -> tuple[Path, Path]:
    jsons = [p for p in paths if p.is_file() and (p.suffix.lower() == ".json" or _starts_like_json(p))]
    others = [p for p in paths if p not in jsons]
    if len(jsons) != 1 or len(others) != 1:
        raise UserError(
            "pascal-context takes two --src: the VOC2010 tar (VOCtrainval_03-May-2010.tar, "
            "or its extracted VOCdevkit folder) and trainval_merged.json"
        )
    return others[0], jsons[0]


def _starts_like_json(p: Path) -> bool:
    if is_archive(p):
        return False
    with open(p, "rb") as f:
        return f.read(64).lstrip()[:1] in (b"{", b"[")


def _find_voc(folder: Path) -> Optional[Path]:
    for cand in (folder / "VOCdevkit" / VOC, folder / VOC, folder):
        if (cand / "JPEGImages").is_dir():
            return cand
    return None


def prepare_pascal_context(
    paths: list[Path],
    target: Path,
    lay: DatasetLayout,
    *,
    workers: int,
    console: Optional[Console],
    sources: list[dict[str, Any]],
) -> dict[str, Any]:
    """VOC2010 images + Detail masks -> VOC2010/SegmentationClassContext and the split lists."""
    voc_src, json_src = _split_sources(paths)
    name = json_src.name
    tr, va = lay.split("train"), lay.split("val")
    ann_dir = tr.ann
    if va.ann != ann_dir or va.img != tr.img:
        raise UserError("presets disagree on the Pascal-Context layout")  # pragma: no cover

    in_place_voc: Optional[Path] = None
    ar: Optional[Archive] = None
    if voc_src.is_dir():
        voc_dir = _find_voc(voc_src)
        if voc_dir is None:
            raise UserError(
                f"{voc_src} is not the extracted VOC2010 folder (no JPEGImages); {guess_folder(voc_src)}"
            )
        if same_path(voc_dir, target):
            in_place_voc = voc_dir
    else:
        ar = Archive(voc_src)
    try:
        if target.exists() and in_place_voc is None:
            refuse_foreign_target(target, "pascal-context")
        voc_prefix = ""
        if ar is not None:
            found = ar.find_prefix(ANCHOR)
            if found is None:
                raise UserError(
                    f"{voc_src.name} is not the VOC2010 tar (no {ANCHOR} inside); {guess_archive(ar)}"
                )
            voc_prefix = found + VOC + "/"

        data = _load_json(json_src)
        phases, anns, max_id = plan_images(data, name)
        del data
        # Every listed image must be there before anything is written.
        for ims in phases.values():
            for im in ims:
                rel = f"{tr.img}/{im['file_name']}"
                ok = (
                    ar.has(voc_prefix + rel)
                    if ar is not None
                    else ((in_place_voc or _find_voc(voc_src)) / rel).is_file()
                )  # type: ignore[operator]
                if not ok:
                    raise UserError(
                        f"{name} lists {im['file_name']} but the VOC input {voc_src.name} has no "
                        f"{rel} (is it the VOC2010 trainval tar?)"
                    )

        with Staging(target) as st:
            work = st.path
            if in_place_voc is not None:
                img_root = in_place_voc
            elif ar is not None:

                def select(m: Member) -> Optional[str]:
                    return m.name[len(voc_prefix) :] if m.name.startswith(voc_prefix) else None

                ar.extract(work, select, console)
                img_root = work
            else:
                copy_tree(_find_voc(voc_src), work, console)  # type: ignore[arg-type]
                img_root = work
            (work / ann_dir).mkdir(parents=True, exist_ok=False)
            counts: dict[str, int] = {}
            seen: dict[str, list[int]] = {}
            for key, phase in (("train", "train"), ("val", "val")):
                ims = sorted(phases[phase], key=lambda im: str(im["file_name"]))
                jobs = [
                    (
                        str(im["file_name"]),
                        str(img_root / tr.img / im["file_name"]),
                        int(im["height"]),
                        int(im["width"]),
                        anns[im["image_id"]],
                        str(work / ann_dir / (Path(im["file_name"]).stem + lay.seg_suffix)),
                        max_id,
                    )
                    for im in ims
                ]
                results = parallel_map(convert_image, jobs, workers, f"pascal-context {key}", console)
                raise_problems([p for p, _ in results if p], f"Pascal-Context input {voc_src.name} + {name}")
                ids: set[int] = set()
                for _, present in results:
                    ids.update(present)
                seen[key] = sorted(ids)
                counts[key] = len(ims)
                lst = work / lay.split(key).list  # type: ignore[operator]
                lst.parent.mkdir(parents=True, exist_ok=True)
                lst.write_text("".join(Path(im["file_name"]).stem + "\n" for im in ims))
            res = finish(work, "pascal-context", counts, seen, sources, [])
            if in_place_voc is not None:
                list_dir = str(Path(tr.list).parent)  # type: ignore[arg-type]
                st.install_into([ann_dir, list_dir, MARKER])
            else:
                st.install()
        return res
    finally:
        if ar is not None:
            ar.close()
