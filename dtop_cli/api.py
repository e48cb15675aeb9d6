"""Python API (a contract, see the README): load a model, predict one image.

    from dtop_cli import api
    model = api.load_model("segvit-base-ade", "ckpt.pth")
    pred = api.predict(model, cv2.imread("img.jpg"))   # pred.labels, pred.exit_stage, pred.gflops
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .errors import UserError
from .presets import Preset, load_preset


@dataclass
class Prediction:
    """labels: (H, W) class ids 0..C-1 at the image's size. exit_stage: token grid of the
    model input (after the test resize), 1..S = stage whose head finalised each token.
    gflops: FLOPs spent on this image (None where the counter is unavailable).
    exit_share: share of tokens finalised by each stage."""

    labels: np.ndarray
    exit_stage: np.ndarray
    gflops: Optional[float] = None
    exit_share: list = field(default_factory=list)


def _as_preset(preset: Union[str, Path, Preset]) -> Preset:
    return preset if isinstance(preset, Preset) else load_preset(str(preset))


def load_model(preset: Union[str, Path, Preset], checkpoint: Optional[Union[str, Path]] = None, *,
               threshold: Optional[float] = None, device: str = "cpu") -> torch.nn.Module:
    """Build the preset's model in eval mode, optionally with a checkpoint (strict, safe load).

    threshold: exit threshold; default: the one recorded in a dtop checkpoint, else the
    preset's. 1.0 turns pruning off (the base model).
    """
    from .model.build import build_model
    from .model.checkpoint import load_weights

    p = _as_preset(preset)
    if threshold is not None and not 0 < threshold <= 1:
        raise UserError(f"threshold must be in (0, 1], got {threshold}")
    model = build_model(p, threshold=threshold)
    if checkpoint is not None:
        meta = load_weights(model, checkpoint)
        recorded = (meta.get("dtop") or {}).get("threshold")
        if threshold is None and recorded is not None:
            model.threshold = float(recorded)
    model.dtop_preset = p
    return model.to(device).eval()


def _test_pipeline(p: Preset):
    from mmcv.transforms import Compose
    from mmseg.registry import TRANSFORMS  # noqa: F401  (registers mmseg transforms)
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    return Compose([
        dict(type="LoadImageFromNDArray"),
        dict(type="Resize", scale=tuple(p.data.test_scale), keep_ratio=True),
        dict(type="PackSegInputs"),
    ])


@torch.no_grad()
def predict(model: torch.nn.Module, image: np.ndarray) -> Prediction:
    """Segment one HxWx3 uint8 BGR image with the preset's test protocol."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise UserError("image must be an HxWx3 uint8 BGR array (as cv2.imread returns)")
    from mmengine.dataset import pseudo_collate

    p: Preset = model.dtop_preset
    data = pseudo_collate([_test_pipeline(p)(dict(img=image))])
    result = model.test_step(data)[0]
    labels = result.pred_sem_seg.data[0].cpu().numpy().astype(np.int64)
    ps = model.backbone.patch_size
    stage_pix = result.exit_stage.data[0]
    H, W = stage_pix.shape
    rows = (torch.arange(-(-H // ps)) * ps + ps // 2).clamp(max=H - 1)
    cols = (torch.arange(-(-W // ps)) * ps + ps // 2).clamp(max=W - 1)
    grid = stage_pix.cpu()[rows][:, cols].numpy()  # token centres
    S = model.num_stages
    share = [float((grid == s).mean()) for s in range(1, S + 1)]
    gflops = None
    try:
        from .flops import windows_gflops
    except ImportError:
        windows_gflops = None
    if windows_gflops is not None:
        gflops = windows_gflops(model, result.metainfo["dtop_windows"])
    return Prediction(labels=labels, exit_stage=grid, gflops=gflops, exit_share=share)
