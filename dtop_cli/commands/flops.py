"""`dtop flops`: GFLOPs per image in the paper's convention, for a preset or a checkpoint.

Without a checkpoint the count is static: one crop-size image traced once with nothing
exiting (the paper's base GFLOPs). With one, it is the dynamic average over validation
images through :func:`dtop_cli.measure.measure`. The counter itself lives in
:mod:`dtop_cli.cost`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from ..cost import GIGA, trace_flops
from ..data.mmseg import val_dataset
from ..errors import UserError
from ..measure import Progress, measure
from ..presets import Preset, Threshold, check_threshold, load_preset, prunes, threshold_value


def _as_preset(preset: str | Path | Preset) -> Preset:
    return preset if isinstance(preset, Preset) else load_preset(str(preset))


def _check_shape(p: Preset, shape: Sequence[int] | None) -> tuple[int, int]:
    if shape is None:
        return int(p.data.crop[0]), int(p.data.crop[1])
    if len(shape) != 2 or any(int(s) < 1 for s in shape):
        raise UserError(f"--shape takes two positive integers H W (got {' '.join(map(str, shape))})")
    return int(shape[0]), int(shape[1])


def _paper_gflops(p: Preset, threshold: Threshold, shape: tuple[int, int], dynamic: bool) -> float | None:
    """The paper's number this measurement is comparable with, if any: the base GFLOPs at
    threshold 1.0, the pruned average only for a dataset run at the preset's threshold;
    crop size only."""
    if p.paper is None or tuple(shape) != tuple(p.data.crop):
        return None
    if not prunes(threshold):
        return float(p.paper.base_gflops)
    same = threshold_value(threshold) == threshold_value(p.exit.threshold)
    return float(p.paper.pruned_gflops) if dynamic and same else None


@contextlib.contextmanager
def _skip_weight_init() -> Iterator[None]:
    """Build a model without drawing random weights: the count only depends on shapes and
    a ViT-L's random init costs ~20 s on 2 cores. Weights are zeroed afterwards."""
    names = ("trunc_normal_", "normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_",
             "xavier_uniform_", "xavier_normal_", "ones_", "zeros_", "constant_")
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda t, *a, **k: t)
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def static_gflops(preset: str | Path | Preset, shape: Sequence[int] | None = None,
                  threshold: Threshold = 1.0) -> dict:
    """Cost of one image at crop size (or ``shape``) with nothing exiting; no checkpoint.

    threshold 1.0 (default) is the base model: the paper's base GFLOPs. A threshold < 1
    counts a pruned model on an image where no token happens to exit (the auxiliary heads
    run on all tokens): the most a pruned model can cost. Traced once with zero weights.
    """
    from ..model.build import build_model

    p = _as_preset(preset)
    H, W = _check_shape(p, shape)
    thr = check_threshold(threshold, stages=p.num_stages - 1)
    with _skip_weight_init():
        model = build_model(p, threshold=thr)
    with torch.no_grad():
        for t in model.parameters():
            t.zero_()
    model.eval()
    ps = model.backbone.patch_size
    gh, gw = -(-H // ps), -(-W // ps)
    S = model.num_stages
    forced = None if not prunes(thr) else [torch.zeros(1, gh * gw, dtype=torch.bool) for _ in range(S - 1)]
    br = trace_flops(model, torch.zeros(1, 3, H, W), forced)
    return {
        "preset": p.name,
        "mode": "static",
        "gflops": br.total / GIGA,
        "images": 1,
        "exit_share": [0.0] * (S - 1) + [1.0],
        "breakdown": br.gflops(),
        "threshold": threshold_value(thr),
        "shape": [H, W],
        "tokens": gh * gw,
        "paper_gflops": _paper_gflops(p, thr, (H, W), dynamic=False),
    }


def flops_report(preset: str | Preset, ckpt: str | Path | None = None, threshold: Threshold | None = None,
                 images: int | None = None, shape: Sequence[int] | None = None,
                 data_root: str | Path = "data", overrides: list[str] | None = None,
                 device: str | None = None, progress: Progress | None = None) -> dict:
    """What `dtop flops` reports. Without a checkpoint: one crop-size image, nothing exits
    (static, threshold 1.0 unless given). With one: the dynamic average over the
    validation images (the first ``images`` of them), in the paper's convention, through
    the measurement path ``eval`` and ``sweep`` use."""
    p = preset if isinstance(preset, Preset) else load_preset(str(preset), overrides)
    if ckpt is None:
        if images is not None:
            raise UserError("--images needs --ckpt: which tokens exit depends on trained weights")
        return static_gflops(p, shape, threshold=1.0 if threshold is None else threshold)
    from .. import api

    if shape is not None and tuple(int(v) for v in shape) != tuple(p.data.crop):
        raise UserError("--shape applies without --ckpt; the dataset measurement uses the preset's crop")
    if threshold is not None:
        threshold = check_threshold(threshold, stages=p.num_stages - 1)
    with contextlib.redirect_stdout(sys.stderr):  # mmengine logs to stdout; --json owns it
        model = api.load_model(p, ckpt, threshold=threshold, device=api.resolve_device(device))
        ds = val_dataset(p, data_root, images)
    (tally,) = measure(model, ds, [model.threshold], miou=False, cost=True, progress=progress)
    r = tally.result()
    size = (int(p.data.crop[0]), int(p.data.crop[1]))
    return {
        "preset": p.name,
        "mode": "dataset",
        "gflops": r["gflops"],
        "images": r["images"],
        "exit_share": r["exit_share"],
        "breakdown": r["breakdown"],
        "threshold": r["threshold"],
        "shape": list(size),
        "tokens": model_tokens(model, size),
        "paper_gflops": _paper_gflops(p, r["threshold"], size, dynamic=True),
    }


def model_tokens(model: nn.Module, size: Sequence[int]) -> int:
    """Tokens of one image of ``size`` (the patch grid, rounded up)."""
    ps = model.backbone.patch_size
    return (-(-int(size[0]) // ps)) * (-(-int(size[1]) // ps))
