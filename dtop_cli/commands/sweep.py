"""`dtop sweep`: the accuracy/cost trade-off of one checkpoint across exit thresholds.

DToP's one knob is the exit threshold. The sweep loads the model once and measures every
threshold through :func:`dtop_cli.measure.measure` (each validation image read and
preprocessed once): mIoU exactly as ``dtop eval`` reports it, GFLOPs per image and the
share of tokens each stage finalised in the paper's convention (one crop-size window per
image, only the tokens each stage really ran on), so the curve is comparable with the
paper's points drawn next to it. Results go to ``sweep.csv`` and ``sweep.png`` (mIoU
against GFLOPs), both written atomically.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from .. import viz
from ..data.mmseg import val_dataset
from ..errors import UserError
from ..fsutil import atomic_write, check_out_dir
from ..measure import Progress, measure
from ..presets import Preset, Threshold, check_threshold, format_threshold, from_stage_values


def parse_thresholds(text: str) -> list[float]:
    """'0.8,0.9,1.0' -> [1.0, 0.9, 0.8]: unique, each in (0, 1], highest (the base) first."""
    vals: list[float] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        v = check_threshold(part, "--thresholds")
        if v not in vals:
            vals.append(v)
    if not vals:
        raise UserError("--thresholds: give at least one threshold, e.g. 0.8,0.9,1.0")
    return sorted(vals, reverse=True)


def per_stage_grid(thresholds: Sequence[float], stages: int) -> list[Threshold]:
    """Every combination of the thresholds over the non-final stages (highest first); a
    combination with one value at every stage is that plain number."""
    return [from_stage_values(combo) for combo in itertools.product(sorted(thresholds, reverse=True),
                                                                    repeat=stages)]


def read_calibration(path: Path) -> dict:
    """The point a `dtop calibrate` run chose ({threshold, gflops, miou}), from its JSON."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--calibration {path}: not a readable calibration.json ({e})") from None
    if not isinstance(data, dict) or not all(k in data for k in ("threshold", "gflops", "miou")):
        raise UserError(f"--calibration {path}: expected the JSON `dtop calibrate` writes "
                        "(threshold, gflops, miou)")
    return {k: data[k] for k in ("threshold", "gflops", "miou")}


def run_sweep(
    preset: Preset,
    ckpt: Path,
    thresholds: Sequence[float],
    data_root: Path,
    out_dir: Path,
    images: Optional[int] = None,
    progress: Optional[Progress] = None,
    device: str = "cpu",
    per_stage: bool = False,
    calibration: Optional[Path] = None,
) -> dict:
    """Evaluate every threshold on the (first `images`) validation images; write CSV + plot.

    per_stage: every combination of the thresholds over the non-final stages. calibration:
    a ``dtop calibrate`` result (calibration.json) to mark on the plot. Returns {preset,
    images, rows: [{threshold, miou, aacc, gflops, exit_share}], csv, plot}.
    """
    from .. import api
    from ..model.memo import StageMemo

    out_dir = check_out_dir(out_dir)
    with contextlib.redirect_stdout(sys.stderr):  # mmengine logs to stdout; --json owns it
        ds = val_dataset(preset, data_root, images)
        model = api.load_model(preset, ckpt, device=device)
    marked = read_calibration(calibration) if calibration is not None else None
    if per_stage:
        thresholds = per_stage_grid(thresholds, model.num_stages - 1)
    # the memo shares each image's first stage (and common prefixes) among the thresholds
    tallies = measure(model, ds, thresholds, miou=True, cost=True, progress=progress, memo=StageMemo())
    rows = []
    for tally in tallies:
        r = tally.result()
        rows.append({k: r[k] for k in ("threshold", "miou", "aacc", "gflops", "exit_share")})
    n = len(ds)
    csv_path, png_path = out_dir / "sweep.csv", out_dir / "sweep.png"
    title = f"{preset.name}: mIoU vs GFLOPs over exit thresholds ({n} val images)"
    csv_bytes = to_csv(rows, model.num_stages)
    png_bytes = viz.sweep_plot(rows, title, preset.paper, calibrated=marked)
    atomic_write(csv_path, csv_bytes)
    atomic_write(png_path, png_bytes)
    return {"preset": preset.name, "images": n, "rows": rows, "csv": str(csv_path), "plot": str(png_path)}


def to_csv(rows: Sequence[dict], num_stages: int) -> bytes:
    """threshold, miou, aacc, gflops, exit_share_stage1..S."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    shares = [f"exit_share_stage{s + 1}" for s in range(num_stages)]
    w.writerow(["threshold", "miou", "aacc", "gflops", *shares])
    for r in rows:
        w.writerow([format_threshold(r["threshold"]), f"{r['miou']:.4f}", f"{r['aacc']:.4f}", f"{r['gflops']:.6g}",
                    *(f"{s:.6f}" for s in r["exit_share"])])
    return buf.getvalue().encode()
