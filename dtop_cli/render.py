"""Every table dtop prints: results in, rich tables out (no computing here).

The commands return plain data; ``cli.py`` hands it to one of these and prints the table on
stdout (or the JSON instead, with ``--json``). Tables name their units: ``GFLOPs`` is always
the paper's convention (one crop-size window per image, only active tokens); the test
protocol's total over all sliding windows is labelled as such.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from rich.table import Table

from .presets import format_threshold


def _f(v: Optional[float], fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def _shares(values: Sequence[float]) -> str:
    return " / ".join(f"{v:.1%}" for v in values)


def presets_table(items: Sequence[Any]) -> Table:
    """`dtop presets`: backbone, dataset, crop, stage ends, exit settings, the paper's numbers."""
    t = Table(title="dtop presets")
    for col in ("name", "backbone", "dataset", "crop", "stage ends", "thresh", "top-k",
                "base mIoU", "base GFLOPs", "pruned mIoU", "pruned GFLOPs"):
        t.add_column(col, justify="right" if "mIoU" in col or "GFLOPs" in col else "left")
    for p in items:
        pp = p.paper
        nums = [f"{pp.base_miou:.1f}", f"{pp.base_gflops:.1f}", f"{pp.pruned_miou:.1f}", f"{pp.pruned_gflops:.1f}"] \
            if pp else ["-"] * 4
        t.add_row(p.name, p.model.backbone, p.data.dataset, "x".join(map(str, p.data.crop)),
                  ",".join(map(str, p.model.stage_ends)), format_threshold(p.exit.threshold), str(p.exit.keep_topk), *nums)
    t.columns[0].min_width = max(len(p.name) for p in items)  # a preset name is never cut short
    return t


def key_value_table(title: str, info: dict) -> Table:
    """Two columns, one row per key (env, the synthetic dataset's summary)."""
    t = Table(title=title, show_header=False)
    for k, v in info.items():
        t.add_row(str(k), v if isinstance(v, str) else json.dumps(v))
    return t


def splits_table(title: str, splits: dict) -> Table:
    """Pairs per split next to the official count: the first thing to look at after a prepare."""
    t = Table(title=title)
    for col in ("split", "pairs", "official", "classes seen"):
        t.add_column(col, justify="left" if col == "split" else "right")
    for k, v in splits.items():
        t.add_row(k, str(v.get("pairs")), str(v.get("official") or "-"), str(v.get("classes_seen", "-")))
    return t


def train_table(command: str, preset: str, res: dict) -> Table:
    """`dtop train` / `dtop prune`: where the checkpoint is, and the last validation metrics."""
    t = Table(title=f"dtop {command} {preset}", show_header=False)
    for k in ("work_dir", "checkpoint", "iters", "threshold", "seconds"):
        t.add_row(k, format_threshold(res[k]) if k == "threshold" else str(res[k]))
    for k, v in res["metrics"].items():
        t.add_row(f"val {k}", f"{v:.2f}")
    return t


def eval_tables(preset: str, ckpt: Path, res: dict) -> list[Table]:
    """`dtop eval`: mIoU, aAcc, per-stage mIoU and cost; with --per-class a second table."""
    t = Table(title=f"dtop eval {preset}: {Path(ckpt).name} @ thresh {format_threshold(res['threshold'])} ({res['images']} images)")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("mIoU", f"{res['miou']:.2f}")
    t.add_row("aAcc", f"{res['aacc']:.2f}")
    if "stage_miou" in res:
        t.add_row("mIoU per stage", " / ".join(f"{v:.2f}" for v in res["stage_miou"]))
    if "gflops" in res:
        t.add_row("GFLOPs / image (one crop-size window, paper convention)", f"{res['gflops']:.3f}")
        t.add_row("GFLOPs / image (test protocol, all windows)", f"{res['gflops_protocol']:.3f}")
        t.add_row("exit share per stage", _shares(res["exit_share"]))
    tables = [t]
    if "per_class" in res:
        pc = Table(title="IoU per class")
        pc.add_column("class")
        pc.add_column("IoU", justify="right")
        for name, v in res["per_class"].items():
            pc.add_row(name, _f(v, ".2f"))
        tables.append(pc)
    return tables


def quickstart_table(s: dict) -> Table:
    """`dtop quickstart`: base against pruned, mIoU per head and exits per stage."""
    b, q = s["base"], s["pruned"]
    t = Table(title=f"dtop quickstart ({s['seconds']:.0f} s): tiny-synthetic, base vs pruned")
    for col in ("model", "mIoU", "GFLOPs", "per stage"):
        t.add_column(col, justify="left" if col in ("model", "per stage") else "right")
    t.add_row("base (thresh 1.0)", f"{b['miou']:.2f}", _f(b["gflops"]),
              "mIoU " + " / ".join(f"{v:.1f}" for v in b["stage_miou"]))
    t.add_row(f"pruned (thresh {format_threshold(q['threshold'])})", f"{q['miou']:.2f}", _f(q["gflops"]),
              "exits " + " / ".join(f"{v:.0%}" for v in q["exit_share"]))
    return t


def sweep_table(preset: str, ckpt: Path, res: dict) -> Table:
    """`dtop sweep`: one row per threshold."""
    t = Table(title=f"dtop sweep {preset}: {Path(ckpt).name} ({res['images']} val images)")
    for col in ("threshold", "mIoU", "aAcc", "GFLOPs", "exit share per stage"):
        t.add_column(col, justify="right")
    for r in res["rows"]:
        t.add_row(format_threshold(r["threshold"]), f"{r['miou']:.2f}", f"{r['aacc']:.2f}", _f(r["gflops"]),
                  _shares(r["exit_share"]))
    return t


def flops_table(result: dict):
    """Rich table of a flops report: breakdown, exit shares and the paper's number."""
    g = result["gflops"]
    title = (f"dtop flops {result['preset']}: {result['mode']}, {result['images']} image(s) at "
             f"{result['shape'][0]}x{result['shape'][1]}, threshold {format_threshold(result['threshold'])}")
    t = Table(title=title)
    t.add_column("part")
    t.add_column("GFLOPs", justify="right")
    t.add_column("share", justify="right")
    for part, v in result["breakdown"].items():
        t.add_row(part, f"{v:.3f}", f"{100 * v / g:.1f}%" if g else "-")
    t.add_row("[bold]total[/]", f"[bold]{g:.3f}[/]", "100.0%")
    paper = result.get("paper_gflops")
    if paper:
        t.add_row("paper", f"{paper:.1f}", f"{100 * (g - paper) / paper:+.2f}%")
    for s, share in enumerate(result["exit_share"], start=1):
        t.add_row(f"tokens finalised by stage {s}", "", f"{100 * share:.1f}%")
    return t


def bench_table(r: dict):
    """Rich table of a bench result: times, ratios, memory."""
    what = (f"exits {','.join(f'{f:g}' for f in r['exits'])}" if r["mode"] == "forced"
            else f"threshold {format_threshold(r['threshold'])}")
    t = Table(title=f"dtop bench {r['preset']}: {r['device_name']}, {r['dtype']}, batch {r['batch']}, "
                    f"{r['shape'][0]}x{r['shape'][1]}, {what}, {r['inputs']} inputs"
                    f"{', CUDA graphs' if r['graphs'] else ''}")
    t.add_column("")
    t.add_column("dense", justify="right")
    t.add_column("pruned", justify="right")
    t.add_column("dense / pruned", justify="right")
    t.add_row("median ms", f"{r['dense_ms']:.2f}", f"{r['pruned_ms']:.2f}", f"[bold]{r['speedup']:.3f}x[/]")
    t.add_row("GFLOPs / image", f"{r['dense_gflops']:.2f}", f"{r['pruned_gflops']:.2f}", f"{r['flop_ratio']:.3f}x")
    t.add_row("tokens per stage", " / ".join([str(r["tokens"])] * len(r["active_counts"])),
              " / ".join(f"{c:g}" for c in r["active_counts"]), f"ideal {r['ideal_ratio']:.3f}x")
    if r["dense_peak_mb"] is not None:
        ratio = f"{r['dense_peak_mb'] / r['pruned_peak_mb']:.3f}x" if r["pruned_peak_mb"] else "-"
        t.add_row("peak MB", f"{r['dense_peak_mb']:.1f}", f"{r['pruned_peak_mb']:.1f}", ratio)
    t.caption = (f"speed-up / FLOP ratio = {r['speedup_over_flop_ratio']:.3f}; median of per-round ratios "
                 f"{r['speedup_paired']:.3f}x; medians of {r['repeats']} interleaved runs after {r['warmup']} "
                 f"warm-up, {r['threads']} thread(s)")
    return t


def calibrate_table(res: dict) -> Table:
    """`dtop calibrate`: every candidate evaluated, in order; the answer marked."""
    t = Table(title=f"dtop calibrate {res['preset']}: {Path(res['checkpoint']).name}, {res['images']} images, "
                    f"budget {res['target']['kind']} <= {res['target']['value']:g}")
    ms = res["target"]["kind"] == "ms"
    for col in ("#", "threshold", "mIoU", "GFLOPs", "ratio", *(["ms"] if ms else []), "fits", "step"):
        t.add_column(col)
    for i, c in enumerate(res["candidates"], 1):
        chosen = c["threshold"] == res["threshold"]
        t.add_row(str(i), format_threshold(c["threshold"]) + (" *" if chosen else ""), f"{c['miou']:.2f}",
                  _f(c["gflops"]), f"{c['gflops_ratio']:.3f}", *([_f(c["ms"])] if ms else []),
                  "yes" if c["meets"] else "no", c["step"])
    return t


def calibrate_summary(res: dict) -> str:
    """The answer in one paragraph: setting, accuracy, cost, evaluations, time, files."""
    lines = [f"threshold {format_threshold(res['threshold'])}: mIoU {res['miou']:.2f}, {res['gflops']:.4g} GFLOPs "
             f"(ratio {res['gflops_ratio']:.3f} of {res['base_gflops']:.4g} at threshold 1.0), exit share "
             + ", ".join(f"{100 * s:.1f}%" for s in res["exit_share"])]
    if res["per_stage"]:
        s = res["single"]
        lines.append(f"best single threshold {format_threshold(s['threshold'])}: mIoU {s['miou']:.2f}, "
                     f"ratio {s['gflops_ratio']:.3f} (per-stage {res['miou'] - s['miou']:+.2f} mIoU)")
    lines.append(f"{res['evaluations']} candidates evaluated in {res['seconds']:.1f} s; wrote {res['calibration']}"
                 + (f" and {res['applied']}" if res.get("applied") else ""))
    return "\n".join(lines)
