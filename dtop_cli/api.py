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

from .cost import GIGA, protocol_gflops
from .errors import UserError
from .measure import paper_cost, test_image
from .presets import Preset, Threshold, check_threshold, load_preset


@dataclass
class Prediction:
    """labels: (H, W) class ids 0..C-1 at the image's size. exit_stage: token grid of the
    model input (after the test resize), 1..S = stage whose head finalised each token.
    gflops: FLOPs of this image in the paper's convention (its central crop-size window,
    only active tokens; None with ``cost=False``). gflops_protocol: FLOPs the test protocol
    spent on it (every sliding window). exit_share: share of tokens finalised by each stage."""

    labels: np.ndarray
    exit_stage: np.ndarray
    gflops: Optional[float] = None
    exit_share: list = field(default_factory=list)
    gflops_protocol: Optional[float] = None


def resolve_device(device: Optional[str] = None) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``; default: cuda when a GPU is visible."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not (device == "cpu" or device.startswith("cuda")):
        raise UserError(f"--device must be cpu or cuda (got {device})")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible here")
    return device


def _as_preset(preset: Union[str, Path, Preset]) -> Preset:
    return preset if isinstance(preset, Preset) else load_preset(str(preset))


def load_model(preset: Optional[Union[str, Path, Preset]], checkpoint: Optional[Union[str, Path]] = None, *,
               threshold: Optional[Threshold] = None, device: str = "cpu") -> torch.nn.Module:
    """Build the preset's model in eval mode, optionally with a checkpoint (strict, safe load).

    preset: a name, YAML path or Preset; None takes the one a dtop checkpoint records.
    threshold: exit threshold, one number or one per non-final stage (``0.9``, ``"0.97,0.9"``,
    ``[0.97, 0.9]``); default: the one recorded in a dtop checkpoint (a calibrated one when
    ``dtop calibrate --apply`` wrote it), else the preset's. 1.0 turns pruning off.
    """
    from .model.build import build_model
    from .model.checkpoint import load_weights

    if preset is None or checkpoint is not None and not isinstance(preset, Preset):
        from .runtime.checkpoints import resolve_preset

        p = resolve_preset(None if preset is None else str(preset), None, checkpoint)
    else:
        p = _as_preset(preset)
    stages = p.num_stages - 1
    if threshold is not None:
        threshold = check_threshold(threshold, stages=stages)
    model = build_model(p, threshold=threshold)
    if checkpoint is not None:
        meta = load_weights(model, checkpoint)
        recorded = (meta.get("dtop") or {}).get("threshold")
        if threshold is None and recorded is not None:
            t = check_threshold(recorded, f"{checkpoint}: recorded threshold", stages=stages)
            model.threshold = model.checked_threshold(t)
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
def predict(model: torch.nn.Module, image: np.ndarray, *, cost: bool = True) -> Prediction:
    """Segment one HxWx3 uint8 BGR image with the preset's test protocol.

    cost: also count the image's FLOPs in the paper's convention (``gflops``); on
    slide-mode presets that takes one more crop-size forward unless the image is one crop.
    """
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
    windows = result.metainfo["dtop_windows"]
    gflops = None
    if cost:
        flops, _ = paper_cost(model, test_image(data["inputs"][0]), windows)
        gflops = flops.total / GIGA
    return Prediction(labels=labels, exit_stage=grid, gflops=gflops, exit_share=share,
                      gflops_protocol=protocol_gflops(model, windows))
