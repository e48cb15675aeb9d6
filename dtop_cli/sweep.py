"""`dtop sweep`: the accuracy/cost trade-off of one checkpoint across exit thresholds.

DToP's one knob is the exit threshold. The sweep loads the model once and, for every
validation image, runs the preset's test protocol at every threshold (so each image is read
and preprocessed once). Per threshold it accumulates

* mIoU exactly as mmseg's ``IoUMetric`` defines it (its own ``intersect_and_union`` and
  ``total_area_to_metrics``: label 255 ignored, IoU per class, NaN-mean over the classes
  present in the ground truth or the prediction);
* GFLOPs per image and the share of tokens each stage finalised, from
  ``flops.dataset_gflops`` (the paper's way of counting: one crop-size window per image,
  only the tokens each stage really ran on), so the curve is comparable with the paper's
  points drawn next to it. Without that counter the test-protocol windows' own token counts
  give the shares (and GFLOPs through ``flops.windows_gflops`` when it alone exists).

Results go to ``sweep.csv`` and ``sweep.png`` (mIoU against GFLOPs), both written atomically.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from . import viz
from .errors import UserError
from .presets import Preset


def parse_thresholds(text: str) -> list[float]:
    """'0.8,0.9,1.0' -> [1.0, 0.9, 0.8]: unique, each in (0, 1], highest (the base) first."""
    vals: list[float] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = float(part)
        except ValueError:
            raise UserError(f"--thresholds: '{part}' is not a number") from None
        if not 0.0 < v <= 1.0:
            raise UserError(f"--thresholds: {v:g} is outside (0, 1]")
        if v not in vals:
            vals.append(v)
    if not vals:
        raise UserError("--thresholds: give at least one threshold, e.g. 0.8,0.9,1.0")
    return sorted(vals, reverse=True)


def finalised_per_stage(windows: Sequence) -> np.ndarray:
    """Tokens finalised by each stage, summed over forward windows.

    windows: (h, w, counts) with counts[s] = tokens stage s's layers ran on. Tokens that ran
    through stage s but not s+1 left after stage s; the last stage finalises the rest.
    """
    total = None
    for _, _, counts in windows:
        c = np.asarray(counts, dtype=np.float64)
        fin = c - np.append(c[1:], 0.0)
        total = fin if total is None else total + fin
    return np.zeros(0) if total is None else total


def miou_from_areas(inter: np.ndarray, union: np.ndarray, pred: np.ndarray,
                    label: np.ndarray) -> tuple[float, float]:
    """(mIoU %, aAcc %) with mmseg's own definitions (IoUMetric.total_area_to_metrics)."""
    import torch
    from mmseg.evaluation.metrics import IoUMetric

    m = IoUMetric.total_area_to_metrics(torch.as_tensor(inter), torch.as_tensor(union), torch.as_tensor(pred),
                                        torch.as_tensor(label), ["mIoU"])
    iou = np.asarray(m["IoU"], dtype=np.float64)
    miou = float(np.nanmean(iou)) * 100 if np.isfinite(iou).any() else float("nan")
    return miou, float(m["aAcc"]) * 100


def _val_dataset(preset: Preset, data_root: Path, images: int | None):
    """The preset's validation set with the test pipeline (engine's definition, so the sweep
    evaluates exactly what `dtop eval` and training-time validation do)."""
    from mmengine.registry import DefaultScope
    from mmseg.registry import DATASETS
    from mmseg.utils import register_all_modules

    from .engine import dataset_config, pipelines

    register_all_modules(init_default_scope=False)
    _, test_pipeline = pipelines(preset)
    cfg = dataset_config(preset, Path(data_root), "val", test_pipeline)
    img_dir = Path(cfg["data_root"]) / cfg["data_prefix"]["img_path"]
    if not img_dir.is_dir():
        raise UserError(f"no validation images at {img_dir}: prepare the dataset "
                        f"(`dtop prepare {preset.data.dataset} ...`) or pass --data-root")
    if images is not None:
        if images < 1:
            raise UserError(f"--images must be a positive integer (got {images})")
        cfg["indices"] = int(images)
    try:
        with DefaultScope.overwrite_default_scope("mmseg"):
            ds = DATASETS.build(cfg)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"cannot read the validation set under {cfg['data_root']}: {e}") from None
    if len(ds) == 0:
        raise UserError(f"the validation set under {cfg['data_root']} is empty")
    return ds


def run_sweep(
    preset: Preset,
    ckpt: Path,
    thresholds: Sequence[float],
    data_root: Path,
    out_dir: Path,
    images: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    device: str = "cpu",
) -> dict:
    """Evaluate every threshold on the (first `images`) validation images; write CSV + plot.

    Returns {rows: [{threshold, miou, aacc, gflops, exit_share}], images, csv, plot}.
    """
    import contextlib
    import sys

    import torch
    from mmengine.dataset import pseudo_collate
    from mmseg.evaluation.metrics import IoUMetric

    from . import api

    try:
        from . import flops as flops_mod
    except ImportError:  # the counter is optional: the sweep still reports mIoU
        flops_mod = None
    dataset_gflops = getattr(flops_mod, "dataset_gflops", None)
    windows_gflops = getattr(flops_mod, "windows_gflops", None)

    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a folder")
    with contextlib.redirect_stdout(sys.stderr):  # mmengine logs to stdout; --json owns it
        ds = _val_dataset(preset, data_root, images)
        model = api.load_model(preset, ckpt, device=device)
    K = preset.data.num_classes
    T = len(thresholds)
    areas = np.zeros((T, 4, K), dtype=np.float64)  # intersect, union, pred, label
    win_flops = np.zeros(T)
    finals = np.zeros((T, model.num_stages))
    n = len(ds)
    steps = n + (T if dataset_gflops is not None else 0)
    with torch.no_grad():
        for i in range(n):
            if progress is not None:
                progress(i, steps)
            batch = pseudo_collate([ds[i]])
            for t, thr in enumerate(thresholds):
                model.threshold = float(thr)
                res = model.test_step(batch)[0]
                pred = res.pred_sem_seg.data.squeeze(0).cpu()
                gt = res.gt_sem_seg.data.squeeze(0).cpu().to(pred.dtype)
                for j, a in enumerate(IoUMetric.intersect_and_union(pred, gt, K, 255)):
                    areas[t, j] += a.double().numpy()
                windows = res.metainfo["dtop_windows"]
                finals[t] += finalised_per_stage(windows)
                if windows_gflops is not None and dataset_gflops is None:
                    win_flops[t] += windows_gflops(model, windows)
    rows = []
    for t, thr in enumerate(thresholds):
        miou, aacc = miou_from_areas(*areas[t])
        share = finals[t] / finals[t].sum() if finals[t].sum() else finals[t]
        gflops: float | None = None
        if dataset_gflops is not None:
            if progress is not None:
                progress(n + t, steps)
            with contextlib.redirect_stdout(sys.stderr):
                cost = dataset_gflops(model, preset, data_root, images=n, threshold=float(thr),
                                      progress=False)
            gflops, share = float(cost["gflops"]), np.asarray(cost["exit_share"], dtype=np.float64)
        elif windows_gflops is not None:
            gflops = float(win_flops[t] / n)
        rows.append({
            "threshold": float(thr),
            "miou": round(miou, 4),
            "aacc": round(aacc, 4),
            "gflops": None if gflops is None else round(gflops, 6),
            "exit_share": [round(float(s), 6) for s in share],
        })
    if progress is not None:
        progress(steps, steps)
    csv_path, png_path = out_dir / "sweep.csv", out_dir / "sweep.png"
    title = f"{preset.name}: mIoU vs GFLOPs over exit thresholds ({n} val images)"
    csv_bytes = to_csv(rows, model.num_stages)
    png_bytes = viz.sweep_plot(rows, title, preset.paper)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out_dir}: {e.strerror}") from None
    viz.write_atomic(csv_path, csv_bytes)
    viz.write_atomic(png_path, png_bytes)
    return {"preset": preset.name, "images": n, "rows": rows, "csv": str(csv_path), "plot": str(png_path)}


def to_csv(rows: Sequence[dict], num_stages: int) -> bytes:
    """threshold, miou, aacc, gflops, exit_share_stage1..S (empty gflops: no FLOP counter)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    shares = [f"exit_share_stage{s + 1}" for s in range(num_stages)]
    w.writerow(["threshold", "miou", "aacc", "gflops", *shares])
    for r in rows:
        gflops = "" if r["gflops"] is None else f"{r['gflops']:.6g}"
        w.writerow([f"{r['threshold']:g}", f"{r['miou']:.4f}", f"{r['aacc']:.4f}", gflops,
                    *(f"{s:.6f}" for s in r["exit_share"])])
    return buf.getvalue().encode()
