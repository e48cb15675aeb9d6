"""The glue between presets and mmseg's datasets: folders, pipelines, the validation set.

Every command that reads the preset's data goes through here, so that training-time
validation, ``eval``, ``sweep``, ``flops`` and ``bench`` all see the same images in the same
order (split lists included, e.g. Pascal-Context's ``val.txt``) prepared the same way.

Two views of a validation image exist:

* the **test protocol** (:func:`val_dataset`): the preset's test pipeline (keep-ratio resize
  to the test scale), then whole-image or sliding-window inference: what mIoU is scored on;
* the **paper window** (:func:`paper_window`): the same resized image, its central
  crop-size window, normalised and padded to the crop size. This is how the paper counts
  GFLOPs (one crop-size image, no sliding window), and what the bench times.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..errors import UserError
from ..presets import Preset

PathLike = Union[str, Path]


# --------------------------------------------------------------------------- configs


def _dataset_kind(preset: Preset) -> dict[str, Any]:
    """Dataset type and the arguments the preset's type needs beyond the folders."""
    d = preset.data
    if d.dataset == "synthetic":
        # mmseg's ADE20KDataset refuses class names outside its own 150, so the demo reads
        # the same ADE20K layout through the generic dataset with its own class list.
        from .synthetic import CLASSES, PALETTE

        return dict(type="BaseSegDataset", img_suffix=".jpg", seg_map_suffix=".png",
                    metainfo=dict(classes=list(CLASSES), palette=[list(c) for c in PALETTE]))
    return dict(type=d.type)


def pipelines(preset: Preset) -> tuple[list[dict], list[dict]]:
    """(train, test) mmseg pipelines of the preset."""
    d = preset.data
    train = [
        # LoadImageFromFile + LoadAnnotations; a bad pair is an error that names it
        dict(type="LoadSegPair", dataset=d.dataset),
        dict(type="RandomResize", scale=tuple(d.train_scale), ratio_range=tuple(d.resize_ratio), keep_ratio=True),
        dict(type="RandomCrop", crop_size=tuple(d.crop), cat_max_ratio=d.cat_max_ratio),
        dict(type="RandomFlip", prob=0.5),
        *([dict(type="PhotoMetricDistortion")] if d.photometric else []),
        dict(type="PackSegInputs"),
    ]
    test = [
        dict(type="LoadImageFromFile"),
        dict(type="Resize", scale=tuple(d.test_scale), keep_ratio=True),
        dict(type="LoadAnnotations"),  # reduce_zero_label comes from the dataset
        dict(type="PackSegInputs"),
    ]
    return train, test


def dataset_root(preset: Preset, data_root: PathLike) -> Path:
    """Where the preset's dataset lives under ``--data-root``."""
    return Path(data_root).expanduser().resolve() / preset.data.root


def dataset_config(preset: Preset, data_root: PathLike, split: str, pipeline: list[dict]) -> dict:
    """mmseg dataset config of one split ('train' or 'val')."""
    sp = getattr(preset.data, f"{split}_split")
    ds = dict(_dataset_kind(preset))
    ds.update(
        data_root=str(dataset_root(preset, data_root)),
        data_prefix=dict(img_path=sp.img, seg_map_path=sp.ann),
        reduce_zero_label=preset.data.reduce_zero_label,
        pipeline=pipeline,
    )
    if sp.list:
        ds["ann_file"] = sp.list
    return ds


def register_modules() -> None:
    """mmseg's transforms, datasets and models, dtop's model and runtime modules, and the
    safe checkpoint loader: everything a config built here refers to."""
    from mmseg.utils import register_all_modules

    from .. import model  # noqa: F401  (registers DToP modules)
    from ..safeload import install_safe_globals
    from . import transforms  # noqa: F401  (registers LoadSegPair)

    register_all_modules(init_default_scope=False)
    install_safe_globals()


# --------------------------------------------------------------------------- the validation set


def val_dataset(preset: Preset, data_root: PathLike, images: Optional[int] = None,
                pipeline: Optional[list[dict]] = None) -> Any:
    """The preset's validation set (its first ``images``), by default with the test pipeline.

    The one definition every command uses (see the module docstring).
    """
    from mmengine.registry import DefaultScope
    from mmseg.registry import DATASETS

    register_modules()
    if pipeline is None:
        _, pipeline = pipelines(preset)
    cfg = dataset_config(preset, data_root, "val", pipeline)
    img_dir = Path(cfg["data_root"]) / cfg["data_prefix"]["img_path"]
    if not img_dir.is_dir():
        raise UserError(f"no validation images at {img_dir}: prepare the dataset "
                        f"(`dtop prepare {preset.data.dataset}`) or pass --data-root")
    if images is not None:
        if images < 1:
            raise UserError(f"--images must be a positive integer (got {images})")
        cfg["indices"] = int(images)
    try:
        with DefaultScope.overwrite_default_scope("mmseg"):
            ds = DATASETS.build(cfg)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UserError(f"cannot read the validation set under {cfg['data_root']}: {e}") from None
    if len(ds) == 0:
        raise UserError(f"the validation set under {cfg['data_root']} is empty")
    return ds


def val_image_paths(preset: Preset, data_root: PathLike, images: Optional[int] = None) -> list[str]:
    """Paths of the validation images, in the validation set's order."""
    ds = val_dataset(preset, data_root, images, pipeline=[])
    return [ds.get_data_info(i)["img_path"] for i in range(len(ds))]


def read_test_image(preset: Preset, path: PathLike) -> np.ndarray:
    """A BGR image resized as the test pipeline resizes it (keep ratio to the test scale)."""
    import mmcv

    img = mmcv.imread(str(path))
    if img is None:
        raise UserError(f"cannot read image {path}")
    return mmcv.imrescale(img, tuple(preset.data.test_scale), interpolation="bilinear", backend="cv2")


def central_window(img: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    """The central crop-size window of an HxWxC image (smaller sides are kept whole)."""
    h, w = img.shape[:2]
    ch, cw = min(crop[0], h), min(crop[1], w)
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    return img[y0:y0 + ch, x0:x0 + cw]


def paper_window(model: Any, img: np.ndarray, crop: tuple[int, int]) -> Any:
    """The model input of the paper's cost convention from a test-resized HxWx3 uint8 BGR
    image: its central crop-size window, normalised by the model's preprocessor and padded
    bottom/right to the crop size with the preprocessor's pad value (as mmseg pads).
    Returns a (1, 3, H, W) tensor on the preprocessor's device."""
    import torch
    import torch.nn.functional as F

    window = central_window(img, crop)
    t = torch.from_numpy(np.ascontiguousarray(window)).permute(2, 0, 1).contiguous()
    pre = model.data_preprocessor
    x = pre({"inputs": [t.to(pre.mean.device)]}, training=False)["inputs"]
    h, w = x.shape[-2:]
    if (h, w) != tuple(crop):
        x = F.pad(x, (0, crop[1] - w, 0, crop[0] - h), value=float(getattr(pre, "pad_val", 0)))
    return x


# --------------------------------------------------------------------------- checks


def prepare_hint(preset: Preset, data_root: PathLike) -> str:
    """The command that makes the preset's dataset."""
    return f"`dtop prepare {preset.data.dataset} --data-root {data_root}`"


def _known_class_count(preset: Preset) -> Optional[int]:
    if preset.data.dataset == "synthetic":
        from .synthetic import CLASSES

        return len(CLASSES)
    try:
        from mmseg.registry import DATASETS
        from mmseg.utils import register_all_modules

        register_all_modules(init_default_scope=False)
        cls = DATASETS.get(preset.data.type)
    except Exception:  # noqa: BLE001 - an unknown type is reported by the dataset build itself
        return None
    classes = getattr(cls, "METAINFO", {}).get("classes") if cls is not None else None
    return len(classes) if classes else None


def check_dataset(preset: Preset, data_root: PathLike) -> Path:
    """Fail early, in one line, when the preset's dataset is missing or is not what it expects."""
    data_root = Path(data_root)
    root = dataset_root(preset, data_root)
    hint = prepare_hint(preset, data_root)
    if not root.is_dir():
        raise UserError(f"dataset folder {root} not found: run {hint} first")
    known = _known_class_count(preset)
    if known is not None and known != preset.data.num_classes:
        raise UserError(f"preset '{preset.name}' has data.num_classes {preset.data.num_classes} but "
                        f"{preset.data.dataset} ({preset.data.type}) has {known} classes")
    if preset.data.dataset == "synthetic":
        from .synthetic import MANIFEST

        if not (root / MANIFEST).is_file():
            raise UserError(f"{root} was not made by `dtop prepare synthetic`: run {hint}")
    for split in ("train", "val"):
        sp = getattr(preset.data, f"{split}_split")
        for what, rel in (("images", sp.img), ("annotations", sp.ann), ("image list", sp.list)):
            if rel is None:
                continue
            path = root / rel
            ok = path.is_file() if what == "image list" else path.is_dir()
            if not ok:
                raise UserError(f"{split} {what} {path} not found: run {hint} first")
        ann_dir = root / sp.ann
        sample = sorted(p for p in ann_dir.iterdir() if p.suffix == ".png")[:4]
        if not sample:
            raise UserError(f"no annotations in {ann_dir}: run {hint} first")
        _check_labels(preset, sample)
    return root


def _check_labels(preset: Preset, files: list[Path]) -> None:
    """Label values beyond the preset's classes mean the folder holds another dataset."""
    import cv2

    top = preset.data.num_classes if preset.data.reduce_zero_label else preset.data.num_classes - 1
    for f in files:
        lab = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
        if lab is None:
            raise UserError(f"annotation {f} is not a readable image")
        vals = np.unique(lab)
        vals = vals[vals != 255]
        if vals.size and int(vals.max()) > top:
            raise UserError(f"annotation {f} holds label {int(vals.max())}, beyond the "
                            f"{preset.data.num_classes} "
                            f"classes of preset '{preset.name}': preset and dataset do not match")
