"""The embedded demo dataset: procedural scenes that make early exit a real decision.

A demo where every class is a plain texture is useless for DToP: every token is easy, every
head scores the same and pruning looks free. So the scenes mix two kinds of classes:

* four *looks* (textures) that a single 16x16 patch identifies: their tokens should leave
  at the first exit;
* two further looks that each split into *twin* classes. Twins share the texture and are
  told apart only by small markers (light rings or dark squares), one per ~2000 pixels of
  their region. Most tokens of the region see no marker: they can only be classified by
  reading context elsewhere in their region, which is what the later stages are for.

Colours are drawn at random per region (and jittered by noise, blur and a light gradient),
so colour says nothing about the class: the texture does. Each look appears at most once
per image, but both twin looks may appear together, so "a ring somewhere in the image" is
not enough: the marker has to be tied to its own region.

The layout is ADE20K's (what the presets read through mmseg's ``ADE20KDataset``):
``images/{training,validation}/*.jpg`` and ``annotations/{training,validation}/*.png``,
uint8 labels with 0 = unlabelled (here: the thin seams between regions) and 1..8 the
classes, so ``reduce_zero_label`` turns them into 0..7 and the seams into 255 (ignored).
Every image comes from its own random stream seeded by (seed, split, index): the dataset is
identical on every machine and any image can be regenerated alone.

The training split has 2000 images by default: with a few hundred, the tiny demo model
memorises which training image holds which twin long before it learns to read the markers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from ..errors import UserError

#: Bump when the drawing changes: a folder made by another version is not "the same data".
GENERATOR_VERSION = 3
MANIFEST = "dtop-synthetic.json"
FOLDER = "synthetic"

#: Class names, index = label after reduce_zero_label (annotation value - 1).
CLASSES: tuple[str, ...] = (
    "stripes", "checker", "speckle", "plain",
    "dots+ring", "dots+square", "grid+ring", "grid+square",
)
#: Display colours (RGB) for overlays, one per class.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
    (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230),
)

# look index -> annotation values (1-based class ids). Looks 4 and 5 are twins: the first id
# is the ring-marked class, the second the square-marked one.
_LOOK_CLASSES: tuple[tuple[int, ...], ...] = ((1,), (2,), (3,), (4,), (5, 6), (7, 8))
_RING, _SQUARE = 0, 1
_SPLITS = {"training": 0, "validation": 1}
_PREFIX = {"training": "syn_train", "validation": "syn_val"}


# --------------------------------------------------------------------------- drawing


def _smooth_noise(rng: np.random.Generator, size: int, cell: int) -> np.ndarray:
    """Band-limited noise in [-1, 1]: random values on a coarse grid, upsampled bicubically."""
    n = max(2, size // cell + 2)
    coarse = rng.uniform(-1.0, 1.0, (n, n)).astype(np.float32)
    big = cv2.resize(coarse, (size + 2 * cell, size + 2 * cell), interpolation=cv2.INTER_CUBIC)
    return big[cell:cell + size, cell:cell + size]


def _region_map(rng: np.random.Generator, size: int, n_regions: int) -> np.ndarray:
    """Warped power-diagram cells: blob-like regions of clearly different sizes."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    amp = rng.uniform(0.03, 0.08) * size
    cell = max(8, size // 5)
    wx = xx + amp * _smooth_noise(rng, size, cell)
    wy = yy + amp * _smooth_noise(rng, size, cell)
    seeds = rng.uniform(0, size, (n_regions, 2)).astype(np.float32)
    weights = rng.uniform(0.0, 1.0, n_regions).astype(np.float32) * (0.3 * size) ** 2
    d = (wx[None] - seeds[:, 0, None, None]) ** 2 + (wy[None] - seeds[:, 1, None, None]) ** 2
    return np.argmin(d - weights[:, None, None], axis=0).astype(np.int32)


def _rotated_coords(rng: np.random.Generator, size: int, max_deg: float) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    a = np.deg2rad(rng.uniform(-max_deg, max_deg))
    return xx * np.cos(a) - yy * np.sin(a), xx * np.sin(a) + yy * np.cos(a)


def _tex_stripes(rng: np.random.Generator, size: int) -> np.ndarray:
    # Horizontal-ish bands (a horizontal flip keeps them horizontal).
    _, v = _rotated_coords(rng, size, 20)
    period = rng.uniform(5.0, 9.0)
    return np.clip(0.5 + 1.5 * np.sin(2 * np.pi * v / period + rng.uniform(0, 2 * np.pi)), 0, 1)


def _tex_checker(rng: np.random.Generator, size: int) -> np.ndarray:
    u, v = _rotated_coords(rng, size, 10)
    s = rng.uniform(3.0, 5.0)
    return ((np.floor(u / s) + np.floor(v / s)) % 2).astype(np.float32)


def _tex_speckle(rng: np.random.Generator, size: int) -> np.ndarray:
    # 2-3 px grains: still speckle after the training aug's 0.5x downscale, not grey mush
    grain = int(rng.integers(2, 4))
    n = size // grain + 1
    coarse = (rng.random((n, n)) < 0.5).astype(np.float32)
    return cv2.resize(coarse, (n * grain, n * grain), interpolation=cv2.INTER_NEAREST)[:size, :size]


def _tex_plain(rng: np.random.Generator, size: int) -> np.ndarray:
    # Nearly flat, gently shaded: its two colours are mixed only a little.
    return 0.5 + 0.15 * _smooth_noise(rng, size, max(8, size // 6))


def _tex_dots(rng: np.random.Generator, size: int) -> np.ndarray:
    g = rng.uniform(7.0, 10.0)
    r = rng.uniform(1.6, 2.6)
    u, v = _rotated_coords(rng, size, 15)
    du = (u + rng.uniform(0, g)) % g - g / 2
    dv = (v + rng.uniform(0, g)) % g - g / 2
    return (du * du + dv * dv <= r * r).astype(np.float32)


def _tex_grid(rng: np.random.Generator, size: int) -> np.ndarray:
    g = rng.uniform(7.0, 10.0)
    w = rng.uniform(1.2, 2.0)
    u, v = _rotated_coords(rng, size, 15)
    on = ((u + rng.uniform(0, g)) % g < w) | ((v + rng.uniform(0, g)) % g < w)
    return on.astype(np.float32)


_TEXTURES: tuple[Callable[[np.random.Generator, int], np.ndarray], ...] = (
    _tex_stripes, _tex_checker, _tex_speckle, _tex_plain, _tex_dots, _tex_grid,
)


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random BGR colours with enough luminance contrast for the texture to be visible."""
    lum = np.array([0.114, 0.587, 0.299], dtype=np.float32)
    for _ in range(100):
        a, b = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
        if abs(float(lum @ a - lum @ b)) >= 60:
            break
    return a, b


#: Marker geometry and density. Sized so that most tokens of a twin region still see no
#: marker (the class must be read from context) while the markers themselves are easy to
#: recognise: one marker per ``_MARKER_AREA`` pixels of region, at most ``_MAX_MARKERS``.
_MARKER_AREA = 2000
_MAX_MARKERS = 8
_RING_RADIUS, _RING_WIDTH = 8, 3
_SQUARE_HALF = 6
_MARKER_GAP = 28
_LIGHT, _DARK = (245, 245, 245), (20, 20, 20)


def _place_markers(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, shape: int) -> None:
    """Draw markers well inside ``mask``: light rings (dark rim) or dark squares (light rim).

    The two twins differ in shape *and* polarity. Shape alone (a thin ring against a filled
    square, in the region's contrast colour) made a cue that the demo's tiny ViT picked up
    only after thousands of iterations, and then not reliably; a light against a dark blob
    is found within a few hundred, and the far tokens of a region still need the context.
    The rim keeps a marker visible on any region colour.
    """
    area = int(mask.sum())
    count = int(np.clip(round(area / _MARKER_AREA), 1, _MAX_MARKERS))
    inside = mask.astype(np.uint8)
    inside[0, :] = inside[-1, :] = inside[:, 0] = inside[:, -1] = 0  # the image edge is a border too
    dist = cv2.distanceTransform(inside, cv2.DIST_L2, 5)
    margin = (_RING_RADIUS if shape == _RING else _SQUARE_HALF) + 4
    for _ in range(count):
        ys, xs = np.nonzero(dist >= margin)
        if len(ys) == 0:  # small region: the deepest point, even if the marker spills over
            y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
        else:
            k = int(rng.integers(len(ys)))
            y, x = int(ys[k]), int(xs[k])
        c = (int(x), int(y))
        if shape == _RING:
            cv2.circle(img, c, _RING_RADIUS + 1, _DARK, thickness=_RING_WIDTH + 2, lineType=cv2.LINE_AA)
            cv2.circle(img, c, _RING_RADIUS, _LIGHT, thickness=_RING_WIDTH, lineType=cv2.LINE_AA)
        else:
            h = _SQUARE_HALF
            cv2.rectangle(img, (c[0] - h - 1, c[1] - h - 1), (c[0] + h + 1, c[1] + h + 1), _LIGHT, thickness=-1)
            cv2.rectangle(img, (c[0] - h, c[1] - h), (c[0] + h, c[1] + h), _DARK, thickness=-1)
        # Keep the next marker away from this one.
        cv2.circle(dist, c, _MARKER_GAP, 0.0, thickness=-1)


def render_scene(rng: np.random.Generator, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (BGR uint8 image HxWx3, uint8 annotation HxW with 0 = seam, 1..8 classes)."""
    n_regions = int(rng.integers(3, 7))
    for _ in range(20):  # no slivers: every region must hold a few patches
        regions = _region_map(rng, size, n_regions)
        areas = np.bincount(regions.ravel(), minlength=n_regions)
        if areas.min() >= 0.02 * size * size:
            break
    looks = rng.permutation(len(_TEXTURES))[:n_regions]
    img = np.zeros((size, size, 3), np.float32)
    ann = np.zeros((size, size), np.uint8)
    marks: list[tuple[np.ndarray, int]] = []
    for r, look in enumerate(looks):
        mask = regions == r
        t = _TEXTURES[look](rng, size)[..., None]
        a, b = _colour_pair(rng)
        img[mask] = (a * (1 - t) + b * t)[mask]
        choices = _LOOK_CLASSES[look]
        which = int(rng.integers(len(choices)))
        ann[mask] = choices[which]
        if len(choices) > 1:
            marks.append((mask, which))
    # Markers after all regions, so that no later region paints over one near a seam.
    for mask, which in marks:
        _place_markers(rng, img, mask, _RING if which == 0 else _SQUARE)
    # Nuisances: a light illumination gradient, blur, sensor noise.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    gx, gy = rng.uniform(-0.25, 0.25, 2)
    img *= (1.0 + gx * (xx - 0.5) + gy * (yy - 0.5))[..., None]
    if rng.random() < 0.5:
        img = cv2.GaussianBlur(img, (3, 3), rng.uniform(0.3, 0.8))
    img += rng.normal(0.0, rng.uniform(3.0, 10.0), img.shape).astype(np.float32)
    # Seams: pixels touching another region are unlabelled (0), as region borders in ADE20K.
    seam = np.zeros_like(ann, dtype=bool)
    seam[1:, :] |= regions[1:, :] != regions[:-1, :]
    seam[:-1, :] |= regions[1:, :] != regions[:-1, :]
    seam[:, 1:] |= regions[:, 1:] != regions[:, :-1]
    seam[:, :-1] |= regions[:, 1:] != regions[:, :-1]
    ann[seam] = 0
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), ann


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLITS[split], index]))


# --------------------------------------------------------------------------- writing


def _settings(seed: int, n_train: int, n_val: int, size: int) -> dict[str, Any]:
    return {"version": GENERATOR_VERSION, "seed": seed, "n_train": n_train, "n_val": n_val,
            "size": size}


def _write_images(img_dir: Path, ann_dir: Path, split: str, indices: range, seed: int, size: int) -> None:
    for i in indices:
        img, ann = render_scene(_image_rng(seed, split, i), size)
        stem = f"{_PREFIX[split]}_{i:08d}"
        ok_i, jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        ok_a, png = cv2.imencode(".png", ann)
        if not (ok_i and ok_a):  # pragma: no cover - encoder failure
            raise RuntimeError(f"could not encode {stem}")
        (img_dir / f"{stem}.jpg").write_bytes(jpg.tobytes())
        (ann_dir / f"{stem}.png").write_bytes(png.tobytes())


def _workers(n: int) -> int:
    """Processes for drawing n images: one per core, none for small sets (start-up costs
    more than it saves)."""
    if n < 200:
        return 1
    return max(1, min(os.cpu_count() or 1, 8))


def _write_split(root: Path, split: str, n: int, seed: int, size: int) -> None:
    """Draw and write one split. Every image has its own random stream, so the images are
    the same whatever the number of processes drawing them (the set takes a third of the
    demo's start otherwise)."""
    img_dir = root / "images" / split
    ann_dir = root / "annotations" / split
    img_dir.mkdir(parents=True)
    ann_dir.mkdir(parents=True)
    workers = _workers(n)
    if workers == 1:
        _write_images(img_dir, ann_dir, split, range(n), seed, size)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # fork: the drawing code is already imported, and the children touch no torch state
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(_write_images, img_dir, ann_dir, split, range(k, n, workers), seed, size)
                   for k in range(workers)]
        for f in futures:
            f.result()


def _summary(root: Path, settings: dict[str, Any], created: bool, seconds: float) -> dict[str, Any]:
    return {"dataset": "synthetic", "root": str(root), "created": created, "seconds": round(seconds, 2),
            "train": settings["n_train"], "val": settings["n_val"], "seed": settings["seed"],
            "size": settings["size"], "classes": list(CLASSES)}


def make_synthetic(data_root: Path, seed: int = 0, n_train: int = 2000, n_val: int = 64,
                   size: int = 256, overwrite: bool = False) -> dict[str, Any]:
    """Write ``data_root/synthetic`` (ADE20K layout) and return a summary dict.

    Idempotent: a folder already made with the same settings is left as it is
    (``created`` False). A folder made with other settings is replaced only with
    ``overwrite``; a folder dtop did not make is never touched. The set is built in a hidden
    temporary folder next to the target and renamed into place, so an interrupted run leaves
    either nothing or the complete dataset.
    """
    if n_train < 1 or n_val < 1:
        raise UserError(f"synthetic dataset: need at least one image per split "
                        f"(got train={n_train}, val={n_val})")
    if size < 32 or size % 16:
        raise UserError(f"synthetic dataset: size must be a multiple of 16 and >= 32 (got {size})")
    data_root = Path(data_root)
    target = data_root / FOLDER
    settings = _settings(seed, n_train, n_val, size)
    t0 = time.perf_counter()
    if target.exists():
        manifest = target / MANIFEST
        if not manifest.is_file():
            raise UserError(f"{target} exists and was not made by `dtop prepare synthetic`; "
                            "move it away or choose another --data-root")
        try:
            old = json.loads(manifest.read_text())
        except (OSError, ValueError):
            old = None
        if old == settings:
            return _summary(target, settings, False, time.perf_counter() - t0)
        if not overwrite:
            raise UserError(f"{target} holds a synthetic set made with other settings ({old}); "
                            "pass --force to replace it or choose another --data-root")
    try:
        data_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER}-tmp-", dir=data_root))
    except OSError as e:
        raise UserError(f"cannot write to {data_root}: {e.strerror}") from None
    try:
        for split, n in (("training", n_train), ("validation", n_val)):
            _write_split(tmp, split, n, seed, size)
        (tmp / MANIFEST).write_text(json.dumps(settings, indent=1) + "\n")
        (tmp / "classes.txt").write_text("\n".join(CLASSES) + "\n")
        if target.exists():  # ours (checked above) and overwrite was asked for
            trash = Path(tempfile.mkdtemp(prefix=f".{FOLDER}-old-", dir=data_root))
            os.replace(target, trash / FOLDER)
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _summary(target, settings, True, time.perf_counter() - t0)
