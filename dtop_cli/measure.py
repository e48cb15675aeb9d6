"""The one measurement path: validation images through a model, at one or more thresholds.

``eval``, ``sweep``, ``flops --ckpt`` and the quickstart's evaluation all call
:func:`measure`, so for the same checkpoint, threshold and images they report the same
mIoU, GFLOPs and exit shares. Each image is read and preprocessed once, however many
thresholds are measured. Per image and threshold:

* **accuracy** (``miou=True``): the preset's test protocol (mmseg's ``test_step``: whole
  image or sliding windows), scored with :class:`~dtop_cli.metrics.Confusion`;
* **cost** (``cost=True``), in the paper's convention: one crop-size window per image, the
  central window of the test-resized image (:func:`~dtop_cli.data.mmseg.paper_window`),
  only the tokens each stage really ran on, through the closed-form counter. That forward
  is the protocol's own when the resized image is exactly one crop (the demo), and an extra
  forward otherwise. The protocol's own total, summed over all its windows, is kept beside
  it as ``gflops_protocol``: on slide-mode presets it is about twice the paper's number.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from .cost import GIGA, FlopBreakdown, aux_heads_active, cost_from_counts, protocol_gflops
from .data.mmseg import paper_window
from .metrics import Confusion, token_shares
from .presets import Threshold, threshold_value

Progress = Callable[[int, int], None]


@dataclass
class Tally:
    """What one threshold accumulated over the images."""

    threshold: Threshold  # one number, or one per non-final stage
    num_classes: int
    num_stages: int
    images: int = 0
    confusion: Optional[Confusion] = None
    stage_confusion: dict[int, Confusion] = field(default_factory=dict)
    cost: FlopBreakdown = field(default_factory=lambda: FlopBreakdown(0.0, 0.0, 0.0))
    counts: Optional[np.ndarray] = None  # summed per-stage token counts of the paper windows
    protocol_flops: float = 0.0  # GFLOPs summed over every window of the test protocol

    def result(self) -> dict[str, Any]:
        """{threshold, images, miou, aacc, iou, stage_miou, gflops, gflops_protocol,
        breakdown, exit_share, active_share}, each present when it was measured."""
        n = max(self.images, 1)
        out: dict[str, Any] = {"threshold": threshold_value(self.threshold), "images": self.images}
        if self.confusion is not None:
            s = self.confusion.summary()
            out.update(miou=s["miou"], aacc=s["aacc"], iou=s["iou"],
                       gflops_protocol=self.protocol_flops / n)
            if self.stage_confusion:
                out["stage_miou"] = [self.stage_confusion[k].summary()["miou"]
                                     for k in sorted(self.stage_confusion)] + [s["miou"]]
        if self.counts is not None:
            avg = self.cost.scaled(1.0 / n)
            exit_share, active_share = token_shares(self.counts)
            out.update(gflops=avg.total / GIGA, breakdown=avg.gflops(), exit_share=exit_share,
                       active_share=active_share)
        return out


def _dist() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(tallies: list[Tally]) -> None:
    """Sum every tally's accumulators over the processes (in place, on every rank).

    Areas and FLOPs are integer counts held in float64 (exact far beyond a validation set's
    totals), so the sum is the single-process result to the last digit.
    """
    import torch.distributed as dist

    parts: list[np.ndarray] = []
    for t in tallies:
        parts.append(np.array([t.images, t.protocol_flops, t.cost.backbone, t.cost.heads, t.cost.resize],
                              dtype=np.float64))
        if t.counts is not None:
            parts.append(t.counts)
        if t.confusion is not None:
            parts.append(t.confusion.areas.ravel())
        parts.extend(t.stage_confusion[s].areas.ravel() for s in sorted(t.stage_confusion))
    flat = torch.from_numpy(np.concatenate(parts))
    if dist.get_backend() == "nccl":
        flat = flat.cuda()
    dist.all_reduce(flat)
    flat = flat.cpu().numpy()
    i = 0

    def take(n: int) -> np.ndarray:
        nonlocal i
        out = flat[i:i + n]
        i += n
        return out

    for t in tallies:
        images, protocol, bb, hd, rs = take(5)
        t.images, t.protocol_flops, t.cost = int(images), float(protocol), FlopBreakdown(bb, hd, rs)
        if t.counts is not None:
            t.counts = take(len(t.counts)).copy()
        if t.confusion is not None:
            t.confusion.areas = take(t.confusion.areas.size).reshape(t.confusion.areas.shape).copy()
        for s in sorted(t.stage_confusion):
            c = t.stage_confusion[s]
            c.areas = take(c.areas.size).reshape(c.areas.shape).copy()


def test_image(packed_inputs: torch.Tensor) -> np.ndarray:
    """The test-resized image of a packed sample (3xHxW uint8 tensor) as HxWx3 uint8 BGR."""
    return packed_inputs.permute(1, 2, 0).contiguous().cpu().numpy()


def paper_cost(model: torch.nn.Module, image: np.ndarray, windows: Optional[Sequence] = None
               ) -> tuple[FlopBreakdown, list[int]]:
    """Cost of one test-resized HxWx3 BGR image in the paper's convention, at the model's
    current settings: (FLOPs, tokens each stage ran on) of its central crop-size window.

    windows: the test protocol's windows of the same image at the same settings (their
    ``(h, w, counts)``), if it was already run: when the image is exactly one crop, that
    forward was the paper window, and its counts are used instead of a second forward.
    """
    p = model.dtop_preset
    crop = (int(p.data.crop[0]), int(p.data.crop[1]))
    if windows is not None and tuple(image.shape[:2]) == crop and len(windows) == 1:
        counts = [int(c) for c in windows[0][2]]
    else:
        out = model.forward_dtop(paper_window(model, image, crop))
        counts = out.active_counts[0].tolist()
    ps = model.backbone.patch_size
    grid = (-(-crop[0] // ps), -(-crop[1] // ps))
    return cost_from_counts(model, grid, counts, out_hw=crop, aux_heads=aux_heads_active(model)), counts


@torch.no_grad()
def measure(model: torch.nn.Module, dataset: Any, thresholds: Sequence[Threshold], *, miou: bool = True,
            cost: bool = True, stages: Sequence[int] = (), progress: Optional[Progress] = None,
            memo: Optional[Any] = None) -> list[Tally]:
    """Measure ``model`` on every image of ``dataset`` (test pipeline) at every threshold.

    stages: heads (1..S-1) also scored on their own (per-stage mIoU) at each threshold.
    memo: a :class:`~dtop_cli.model.memo.StageMemo` to reuse stage work across calls (a
    search measuring the same images at many thresholds). Returns one :class:`Tally` per threshold, in the order given.

    In a process group (``dtop eval --gpus N``) each process measures every N-th image and
    the tallies are summed over the processes: every rank returns the whole set's result.
    """
    from mmengine.dataset import pseudo_collate

    K, S = model.decode_head.num_classes, model.num_stages
    tallies = [Tally(model.checked_threshold(t), K, S, confusion=Confusion(K) if miou else None,
                     stage_confusion={s: Confusion(K) for s in stages} if miou else {},
                     counts=np.zeros(S) if cost else None) for t in thresholds]
    rank, world = _dist()
    mine = range(rank, len(dataset), world)
    n = len(mine)
    model.eval()
    for done, i in enumerate(mine):
        if progress is not None:
            progress(done, n)
        sample = dataset[i]
        batch = pseudo_collate([sample])
        for tally in tallies:
            with model.exit_mode(threshold=tally.threshold, memo=memo):
                windows = None
                if miou:
                    res = model.test_step(batch)[0]
                    tally.confusion.add(res.pred_sem_seg.data.squeeze(0), res.gt_sem_seg.data.squeeze(0))
                    windows = res.metainfo["dtop_windows"]
                    tally.protocol_flops += protocol_gflops(model, windows)
                    for s, conf in tally.stage_confusion.items():
                        with model.exit_mode(stage=s):
                            r = model.test_step(batch)[0]
                        conf.add(r.pred_sem_seg.data.squeeze(0), r.gt_sem_seg.data.squeeze(0))
                if cost:
                    flops, counts = paper_cost(model, test_image(sample["inputs"]), windows)
                    tally.cost = tally.cost + flops
                    tally.counts += np.asarray(counts, dtype=np.float64)
            tally.images += 1
    if progress is not None:
        progress(n, n)
    if world > 1:
        _all_reduce(tallies)
    return tallies
