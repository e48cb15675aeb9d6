"""The numbers a run is judged by: mIoU with mmseg's semantics, and exit shares from counts.

mIoU is mmseg's own: per image ``IoUMetric.intersect_and_union`` (label 255 ignored) summed
over the validation set, then ``IoUMetric.total_area_to_metrics`` and the NaN-mean over the
classes that occur in the ground truth or the predictions. Every command that reports an
mIoU (eval, sweep, quickstart, training-time validation through mmseg itself) gets the same
number for the same predictions.

Token accounting: a forward reports, per stage, how many tokens its layers ran on
(``DToPOutput.active_counts``). Everything else is derived from those counts here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class Confusion:
    """Per-class intersection / union / prediction / label areas summed over images."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.areas = np.zeros((4, num_classes), dtype=np.float64)

    def add(self, pred: Any, label: Any) -> None:
        """One image: predicted and ground-truth label maps (tensors, same shape)."""
        from mmseg.evaluation.metrics import IoUMetric

        label = label.to(pred.device, pred.dtype)
        parts = IoUMetric.intersect_and_union(pred, label, self.num_classes, self.ignore_index)
        self.areas += np.stack([p.double().cpu().numpy() for p in parts])

    def summary(self) -> dict[str, Any]:
        """{miou, aacc (percent), iou: per class (None where the class never occurs)}."""
        import torch
        from mmseg.evaluation.metrics import IoUMetric

        inter, union, pred, label = (torch.as_tensor(a) for a in self.areas)
        m = IoUMetric.total_area_to_metrics(inter, union, pred, label, ["mIoU"])
        iou = np.asarray(m["IoU"], dtype=np.float64)
        miou = float(np.nanmean(iou)) * 100 if np.isfinite(iou).any() else float("nan")
        return {
            "miou": miou,
            "aacc": float(m["aAcc"]) * 100,
            "iou": [None if np.isnan(v) else float(v) * 100 for v in iou],
        }


def finalised(counts: Sequence[float]) -> np.ndarray:
    """Tokens finalised by each stage from the tokens each stage ran on: those that ran
    stage s but not stage s+1 left after stage s; the last stage finalises the rest."""
    c = np.asarray(counts, dtype=np.float64)
    return c - np.append(c[1:], 0.0)


def token_shares(counts: Sequence[float]) -> tuple[list[float], list[float]]:
    """(exit share, active share) per stage from per-stage token counts (summed over any
    number of forwards): the share of all tokens each stage finalised (sums to 1) and the
    share each stage's layers ran on (1 for the first stage)."""
    c = np.asarray(counts, dtype=np.float64)
    total = float(c[0]) if len(c) and c[0] else 1.0
    return [float(v) / total for v in finalised(c)], [float(v) / total for v in c]
