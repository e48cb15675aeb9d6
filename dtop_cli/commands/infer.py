"""`dtop infer`: segment photos and draw which tokens left the network at which stage.

For every readable image four PNGs land in the output folder (``NAME`` = the image's stem):

* ``NAME_labels.png``  palette PNG, pixel value = class id (0..C-1), dataset colours;
* ``NAME_overlay.png`` the photo with the prediction blended in;
* ``NAME_exits.png``   flat exit-stage map (one colour per stage, token grid, class borders)
  at the photo's size, with a legend strip below naming each stage and its share of tokens;
* ``NAME_panel.png``   photo | prediction | exit stages over the photo, side by side.

A file that cannot be read is reported and skipped; only when *no* input could be read is it
a usage error. Each picture is written atomically (temporary name, then rename).
"""

from __future__ import annotations

import contextlib
import glob
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .. import viz
from ..errors import UserError
from ..fsutil import atomic_write, check_out_dir
from ..presets import Threshold, format_threshold, threshold_value

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
OUTPUT_KINDS = ("labels", "overlay", "exits", "panel")


@dataclass
class Inputs:
    """Image files found, and the arguments/files that could not be used (with why)."""

    files: list[Path] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)


def find_images(args: Iterable[str], exclude: Path | None = None) -> Inputs:
    """Files, folders (their images, not recursive) and glob patterns -> image files, in order.

    `exclude`: a folder whose files are never inputs (the output folder, so re-running into
    a folder of photos does not segment the previous run's pictures).
    """
    found = Inputs()
    seen: set[Path] = set()
    skip = exclude.resolve() if exclude is not None else None

    def add(p: Path) -> None:
        rp = p.resolve()
        if rp not in seen and (skip is None or rp.parent != skip):
            seen.add(rp)
            found.files.append(p)

    for arg in args:
        p = Path(arg).expanduser()
        if p.is_dir():
            imgs = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not imgs:
                found.problems.append((arg, "folder holds no images"))
            for q in imgs:
                add(q)
        elif p.is_file():
            add(p)
        elif glob.has_magic(arg):
            hits = sorted(Path(h) for h in glob.glob(os.path.expanduser(arg)))
            hits = [h for h in hits if h.is_file()]
            if not hits:
                found.problems.append((arg, "pattern matches no files"))
            for h in hits:
                add(h)
        else:
            found.problems.append((arg, "no such file or folder"))
    return found


def read_image(path: Path) -> np.ndarray | None:
    """HxWx3 uint8 BGR, or None when the file is not an image OpenCV can decode."""
    try:
        raw = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return None
    if raw.size == 0:
        return None
    img = cv2.imdecode(raw, cv2.IMREAD_COLOR)
    if img is None or img.ndim != 3 or img.shape[0] == 0 or img.shape[1] == 0:
        return None
    return img


def _output_stem(path: Path, used: set[str]) -> str:
    """The image's stem, made unique within this run (two folders may both hold 'a.jpg')."""
    stem, n = path.stem, 2
    while stem in used:
        stem, n = f"{path.stem}_{n}", n + 1
    used.add(stem)
    return stem


def render(model, image: np.ndarray, pred, title: str) -> dict[str, bytes]:
    """The four pictures of one prediction, as PNG bytes keyed by OUTPUT_KINDS."""
    p = model.dtop_preset
    names, palette = viz.dataset_meta(p)
    S = model.num_stages
    colours = viz.stage_colours(S)
    H, W = image.shape[:2]
    resized = viz.model_input_shape(p, H, W)
    stage_img, rows, cols = viz.stage_pixels(pred.exit_stage, H, W, resized, model.backbone.patch_size)
    legend = viz.stage_legend(S, pred.exit_share, model.backbone.stage_bounds())
    return {
        "labels": viz.label_png(pred.labels, palette),
        "overlay": viz.encode_png(viz.overlay(image, pred.labels, palette)),
        "exits": viz.encode_png(viz.exit_map(pred.labels, stage_img, rows, cols, legend, colours)),
        "panel": viz.panel(image, pred.labels, stage_img, rows, cols, palette, names, legend, colours, title),
    }


def run_infer(
    images: list[str],
    preset,
    ckpt: Path,
    out_dir: Path,
    threshold: Threshold | None = None,
    device: str = "cpu",
    on_result: Callable[[dict], None] | None = None,
    on_skip: Callable[[str, str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Segment every readable image, write its pictures, return {images, skipped, out, ...}.

    on_result(record) is called as soon as each image is done (the CLI streams JSON lines),
    on_skip(name, why) for every input that could not be used.
    """
    from .. import api

    out_dir = check_out_dir(out_dir)
    found = find_images(images, exclude=out_dir if out_dir.is_dir() else None)
    skipped: list[dict] = []

    def skip(name: str, why: str) -> None:
        skipped.append({"image": name, "reason": why})
        if on_skip is not None:
            on_skip(name, why)

    for name, why in found.problems:
        skip(name, why)
    if not found.files:
        raise UserError("no input images: " + "; ".join(f"{n}: {w}" for n, w in found.problems)
                        if found.problems else "no input images given")
    with contextlib.redirect_stdout(sys.stderr):  # mmengine may log to stdout, which carries results
        model = api.load_model(preset, ckpt, threshold=threshold, device=device)
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out_dir}: {e.strerror}") from None
    used: set[str] = set()
    results: list[dict] = []
    for i, path in enumerate(found.files):
        if progress is not None:
            progress(i, len(found.files))
        image = read_image(path)
        if image is None:
            skip(str(path), "not a readable image")
            continue
        pred = api.predict(model, image)
        stem = _output_stem(path, used)
        gf = "n/a" if pred.gflops is None else f"{pred.gflops:.3g}"
        title = f"{path.name}: threshold {format_threshold(model.threshold)}, {gf} GFLOPs"
        outputs = {}
        for kind, data in render(model, image, pred, title).items():
            target = out_dir / f"{stem}_{kind}.png"
            atomic_write(target, data)
            outputs[kind] = str(target)
        record = {
            "image": str(path),
            "height": int(image.shape[0]),
            "width": int(image.shape[1]),
            "threshold": threshold_value(model.threshold),
            "gflops": None if pred.gflops is None else float(pred.gflops),
            "gflops_protocol": float(pred.gflops_protocol),
            "exit_share": [float(s) for s in pred.exit_share],
            "tokens": [int(n) for n in pred.exit_stage.shape],
            "outputs": outputs,
        }
        results.append(record)
        if on_result is not None:
            on_result(record)
    if progress is not None:
        progress(len(found.files), len(found.files))
    if not results:
        if created:  # leave no empty folder behind when nothing could be made
            try:
                out_dir.rmdir()
            except OSError:
                pass
        total = len(found.files) + len(found.problems)
        raise UserError(f"none of the {total} inputs could be read as an image")
    return {"images": results, "skipped": skipped, "out": str(out_dir), "threshold": threshold_value(model.threshold)}
