"""Pipeline steps dtop's configs name (registered with mmseg on import).

`LoadSegPair` loads a training image and its label map, as mmcv's ``LoadImageFromFile`` and
mmseg's ``LoadAnnotations`` do, and turns what they make of a damaged pair (an assertion
deep in the loader, ``'NoneType' object has no attribute 'squeeze'``, or no error at all for a
label map of another size) into one line that names both files and the dataset folder: the
one bad image in 20k should not cost a day of guessing.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from mmcv.transforms import BaseTransform, LoadImageFromFile
from mmseg.datasets.transforms import LoadAnnotations
from mmseg.registry import TRANSFORMS

from ..errors import UserError


def bad_pair_message(img: str, seg: str, problem: str, dataset: Optional[str] = None) -> str:
    """``<problem>: pair IMG + SEG in dataset folder ROOT (...how to find every such pair)``."""
    try:
        root = os.path.commonpath([img, seg])
    except ValueError:
        root = os.path.dirname(img)
    rel_img, rel_seg = os.path.relpath(img, root), os.path.relpath(seg, root)
    hint = (f"; `dtop prepare {dataset} --verify` lists every such pair" if dataset else "")
    return f"{problem}: pair {rel_img} + {rel_seg} in dataset folder {root}{hint}"


@TRANSFORMS.register_module(force=True)
class LoadSegPair(BaseTransform):
    """Load an image and its label map; a pair that cannot be used is a :class:`UserError`
    naming it (see the module docstring). ``dataset``: the name `dtop prepare` knows it by."""

    def __init__(self, dataset: Optional[str] = None) -> None:
        self.dataset = dataset
        self.load_image = LoadImageFromFile()
        self.load_label = LoadAnnotations()  # reduce_zero_label comes from the dataset

    def transform(self, results: dict) -> Any:
        img, seg = str(results.get("img_path")), str(results.get("seg_map_path"))
        try:
            out = self.load_image(results)
            if out is None or out.get("img") is None:
                raise ValueError("no image data")
        except Exception as e:  # noqa: BLE001 - whatever the decoder says, the file is damaged
            raise UserError(bad_pair_message(img, seg, f"image cannot be read ({_one_line(e)})",
                                             self.dataset)) from None
        try:
            out = self.load_label(out)
            if out is None or out.get("gt_seg_map") is None:
                raise ValueError("no label data")
        except Exception as e:  # noqa: BLE001
            raise UserError(bad_pair_message(img, seg, f"label map cannot be read ({_one_line(e)})",
                                             self.dataset)) from None
        ih, iw = out["img"].shape[:2]
        lh, lw = out["gt_seg_map"].shape[:2]
        if (ih, iw) != (lh, lw):
            raise UserError(bad_pair_message(img, seg, f"label map is {lh}x{lw} but its image is {ih}x{iw}",
                                             self.dataset))
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dataset={self.dataset!r})"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
