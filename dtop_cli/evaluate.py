"""`dtop eval`: mIoU / aAcc by the preset's test protocol, plus what early exit saved.

The numbers are mmseg's: the same dataset, test pipeline and ``IoUMetric.intersect_and_union``
as mmseg's own test loop, accumulated over the whole validation set (mIoU is the mean over
classes that occur in the ground truth or the predictions). Next to them, from the token
counts the model reports for every window it ran: the share of tokens each stage finalised
and, with ``flops``, the average GFLOPs actually spent per image.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from .errors import UserError
from .presets import Preset


def _val_dataset(preset: Preset, data_root: Path) -> Any:
    from mmengine.registry import DefaultScope
    from mmseg.registry import DATASETS
    from mmseg.utils import register_all_modules

    from .engine import dataset_config, pipelines

    register_all_modules(init_default_scope=False)
    _, test_pipeline = pipelines(preset)
    with DefaultScope.overwrite_default_scope("mmseg"):
        return DATASETS.build(dataset_config(preset, data_root, "val", test_pipeline))


class _Confusion:
    """Per-class intersection / union / prediction / label areas summed over images."""

    def __init__(self, num_classes: int) -> None:
        self.k = num_classes
        self.areas = torch.zeros(4, num_classes, dtype=torch.float64)

    def add(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        from mmseg.evaluation.metrics import IoUMetric

        parts = IoUMetric.intersect_and_union(pred, label, self.k, 255)
        self.areas += torch.stack([p.double().cpu() for p in parts])

    def summary(self) -> dict[str, Any]:
        inter, union, _, label = self.areas.numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = inter / union
        valid = ~np.isnan(iou)
        return {
            "miou": round(float(np.nanmean(iou)) * 100, 2) if valid.any() else float("nan"),
            "aacc": round(float(inter.sum() / max(label.sum(), 1)) * 100, 2),
            "iou": [None if np.isnan(v) else round(float(v) * 100, 2) for v in iou],
        }


def _token_shares(counts: np.ndarray) -> tuple[list[float], list[float]]:
    """(exit share per stage, active share per stage) from summed per-stage token counts."""
    total = float(counts[0]) if counts[0] else 1.0
    S = len(counts)
    exit_share = [float(counts[s] - counts[s + 1]) / total for s in range(S - 1)]
    exit_share.append(float(counts[-1]) / total)
    return [round(v, 4) for v in exit_share], [round(float(c) / total, 4) for c in counts]


def evaluate(
    preset: Preset,
    checkpoint: Union[str, Path],
    *,
    data_root: Union[str, Path],
    threshold: Optional[float] = None,
    flops: bool = False,
    per_class: bool = False,
    stage_miou: bool = False,
    images: Optional[int] = None,
    device: Optional[str] = None,
    console: Any = None,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on the preset's validation split.

    ``threshold`` None: the one the checkpoint was trained with (dtop checkpoints record it),
    else the preset's. ``stage_miou`` also scores every head on its own (how good each exit
    would be alone; for a base model the first heads should score below the last).
    """
    from mmengine.dataset import pseudo_collate

    from . import api
    from .engine import _register_all, check_dataset

    data_root = Path(data_root).expanduser().resolve()
    check_dataset(preset, data_root)
    if images is not None and images < 1:
        raise UserError(f"--images must be >= 1 (got {images})")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible here")
    if not (device == "cpu" or device.startswith("cuda")):
        raise UserError(f"--device must be cpu or cuda (got {device})")
    _register_all()
    with contextlib.redirect_stdout(sys.stderr):
        model = api.load_model(preset, checkpoint, threshold=threshold, device=device)
        ds = _val_dataset(preset, data_root)
    n = len(ds) if images is None else min(images, len(ds))
    if n == 0:
        raise UserError(f"the validation split of {preset.data.dataset} is empty")
    windows_gflops = None
    if flops:
        try:
            from .flops import windows_gflops
        except ImportError:
            raise RuntimeError("FLOP counting (dtop_cli.flops) is not available in this installation") \
                from None

    S = model.num_stages
    stages = list(range(1, S)) if stage_miou else []
    final = _Confusion(preset.data.num_classes)
    per_stage = {s: _Confusion(preset.data.num_classes) for s in stages}
    counts = np.zeros(S, dtype=np.float64)
    gflops_sum = 0.0
    n_windows = 0
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(n)), batch_size=1, shuffle=False,
                                         num_workers=min(2, os.cpu_count() or 1), collate_fn=pseudo_collate)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=console, disable=console is None)
    with prog, torch.no_grad():
        task = prog.add_task(f"eval {Path(checkpoint).name} @ thresh {model.threshold:g}", total=n)
        for batch in loader:
            model.eval_stage = None
            for out in model.test_step(batch):
                label = out.gt_sem_seg.data.squeeze(0)
                final.add(out.pred_sem_seg.data.squeeze(0), label)
                wins = out.metainfo.get("dtop_windows", [])
                for _h, _w, c in wins:
                    counts += np.asarray(c, dtype=np.float64)
                if windows_gflops is not None:
                    gflops_sum += float(windows_gflops(model, wins))
                    n_windows += len(wins)
            for s in stages:
                model.eval_stage = s
                for out in model.test_step(batch):
                    per_stage[s].add(out.pred_sem_seg.data.squeeze(0), out.gt_sem_seg.data.squeeze(0))
            model.eval_stage = None
            prog.advance(task)

    res = final.summary()
    exit_share, active_share = _token_shares(counts)
    result: dict[str, Any] = {
        "miou": res["miou"],
        "aacc": res["aacc"],
        "threshold": float(model.threshold),
        "images": n,
        "checkpoint": str(checkpoint),
        "exit_share": exit_share,
        "active_share": active_share,
    }
    if flops:
        # per image under the test protocol (all its sliding windows), and per crop-size
        # window: the latter is the paper's convention (one image at crop size)
        result["gflops"] = round(gflops_sum / n, 4)
        result["gflops_per_window"] = round(gflops_sum / max(n_windows, 1), 4)
    if stage_miou:
        result["stage_miou"] = [per_stage[s].summary()["miou"] for s in stages] + [res["miou"]]
    if per_class:
        classes = list(ds.metainfo.get("classes", [str(i) for i in range(preset.data.num_classes)]))
        result["per_class"] = {c: v for c, v in zip(classes, res["iou"], strict=True)}
    return result
