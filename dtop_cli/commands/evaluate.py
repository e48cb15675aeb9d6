"""`dtop eval`: mIoU / aAcc by the preset's test protocol, plus what early exit saved.

The numbers come from :func:`dtop_cli.measure.measure`, the path ``sweep`` and
``flops --ckpt`` share: mmseg's dataset, test pipeline and IoU definitions for accuracy;
with ``flops``, GFLOPs in the paper's convention (``gflops``: one crop-size window per
image, only active tokens) next to the test protocol's own total (``gflops_protocol``).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Optional, Union

from ..data.mmseg import check_dataset, val_dataset
from ..measure import Progress, measure
from ..presets import Preset, Threshold, check_threshold, threshold_value


def evaluate(
    preset: Preset,
    checkpoint: Union[str, Path],
    *,
    data_root: Union[str, Path],
    threshold: Optional[Threshold] = None,
    flops: bool = False,
    per_class: bool = False,
    stage_miou: bool = False,
    images: Optional[int] = None,
    device: Optional[str] = None,
    progress: Optional[Progress] = None,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on the preset's validation split.

    ``threshold`` None: the one the checkpoint was trained with (dtop checkpoints record it),
    else the preset's. ``stage_miou`` also scores every head on its own (how good each exit
    would be alone; for a base model the first heads should score below the last).
    """
    from .. import api

    data_root = Path(data_root).expanduser().resolve()
    check_dataset(preset, data_root)
    if threshold is not None:
        threshold = check_threshold(threshold, stages=preset.num_stages - 1)
    device = api.resolve_device(device)
    with contextlib.redirect_stdout(sys.stderr):  # mmengine logs to stdout; --json owns it
        model = api.load_model(preset, checkpoint, threshold=threshold, device=device)
        ds = val_dataset(preset, data_root, images)
    stages = list(range(1, model.num_stages)) if stage_miou else []
    (tally,) = measure(model, ds, [model.threshold], miou=True, cost=flops, stages=stages, progress=progress)
    res = tally.result()
    result: dict[str, Any] = {
        "miou": res["miou"],
        "aacc": res["aacc"],
        "threshold": threshold_value(model.threshold),
        "images": res["images"],
        "checkpoint": str(checkpoint),
    }
    if flops:
        result.update(gflops=res["gflops"], gflops_protocol=res["gflops_protocol"], breakdown=res["breakdown"],
                      exit_share=res["exit_share"], active_share=res["active_share"])
    if stage_miou:
        result["stage_miou"] = res["stage_miou"]
    if per_class:
        classes = list(ds.metainfo.get("classes", [str(i) for i in range(preset.data.num_classes)]))
        result["per_class"] = {c: v for c, v in zip(classes, res["iou"], strict=True)}
    return result
