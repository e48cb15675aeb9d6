"""`dtop calibrate`: the exit threshold(s) with the best mIoU inside a cost budget.

A user has a budget (GFLOPs per image, a share of the dense model's GFLOPs, or milliseconds
per batch on a device) and wants the most accurate setting that fits it. The search
measures candidates on the first N validation images through the one measurement path
(:func:`dtop_cli.measure.measure`: mIoU as ``dtop eval`` reports it, GFLOPs in the paper's
convention), so the answer is what ``dtop eval --flops`` measures on the same images.

Evaluations are cheap to repeat because the images are read once and the stage work is
memoised (:mod:`dtop_cli.model.memo`): the first stage of an image is computed once for
the whole search, and a candidate that changes only a later stage's threshold recomputes
only the stages after the earlier ones' decisions.

The search, in thousandths of a threshold (0.001 .. 1.0):

* single threshold: cost grows with the threshold (fewer tokens exit). The most aggressive
  setting (0.001) must fit, else the budget is unreachable. A bracketed search (secant
  steps, bisection when they stall) finds the highest threshold that fits; a pattern of
  lower thresholds below it (steps 0.005, 0.01, 0.02, ...) guards against mIoU that does
  not rise monotonically with the threshold.
* per stage (``--per-stage``): starts from the single answer and moves the earlier stages'
  thresholds by a pattern search (step 0.04, halved when neither direction helps), each
  time refilling the budget with the last non-final stage's threshold (the cheapest to
  re-evaluate) by the same bracketed search. ``--max-evals`` caps the evaluations.

The answer is the best-mIoU candidate that met the budget among all evaluated.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..cost import GIGA, cost_from_counts
from ..data.mmseg import check_dataset, val_dataset
from ..errors import UserError
from ..fsutil import atomic_save, atomic_write
from ..measure import Progress, measure
from ..model.memo import StageMemo
from ..presets import (
    Preset,
    Threshold,
    format_threshold,
    from_stage_values,
    stage_thresholds,
    threshold_value,
)

SCALE = 1000  # thresholds are searched in thousandths
LOWEST = 1  # 0.001: the most aggressive setting tried
TARGETS = {"gflops": "GFLOPs per image", "ratio": "GFLOPs ratio to threshold 1.0", "ms": "ms per batch"}


@dataclass(frozen=True)
class Target:
    """The budget: kind in TARGETS, the value an average cost must not exceed."""

    kind: str
    value: float

    def describe(self) -> str:
        return f"{TARGETS[self.kind]} <= {self.value:g}"


def target_from_options(gflops: Optional[float], ratio: Optional[float], ms: Optional[float]) -> Target:
    """Exactly one of --target-gflops / --target-ratio / --target-ms, a positive number."""
    given = [(k, v) for k, v in (("gflops", gflops), ("ratio", ratio), ("ms", ms)) if v is not None]
    if len(given) != 1:
        raise UserError("give exactly one budget: --target-gflops G, --target-ratio R or --target-ms T")
    kind, value = given[0]
    if not value > 0:
        raise UserError(f"--target-{kind} must be a positive number (got {value})")
    return Target(kind, float(value))


@dataclass
class Candidate:
    """One setting measured on the calibration images."""

    threshold: Threshold
    miou: float
    aacc: float
    gflops: float
    gflops_ratio: float
    exit_share: list
    ms: Optional[float]
    cost: float
    meets: bool
    step: str  # which part of the search asked for it

    def row(self) -> dict[str, Any]:
        return {"threshold": threshold_value(self.threshold), "miou": self.miou, "aacc": self.aacc,
                "gflops": self.gflops, "gflops_ratio": self.gflops_ratio, "exit_share": self.exit_share,
                "ms": self.ms, "meets": self.meets, "step": self.step}


class Search:
    """Measures settings on fixed images, each setting once (memoised by its per-stage values).

    A setting is a tuple of integers, the thresholds of the non-final stages in thousandths.
    """

    def __init__(self, model: torch.nn.Module, samples: list, target: Target, base_gflops: float,
                 timer: Optional[Callable[[Threshold], float]] = None, max_evals: int = 30,
                 memo: Optional[StageMemo] = None, on_eval: Optional[Callable[[Candidate], None]] = None) -> None:
        self.model, self.samples, self.target = model, samples, target
        self.base_gflops, self.timer, self.max_evals = base_gflops, timer, int(max_evals)
        self.memo = memo if memo is not None else StageMemo()
        self.on_eval = on_eval
        self.stages = model.num_stages - 1
        self.tried: dict[tuple, Candidate] = {}

    @property
    def evaluations(self) -> int:
        return len(self.tried)

    def budget_left(self) -> bool:
        return self.evaluations < self.max_evals

    def threshold(self, key: tuple) -> Threshold:
        return from_stage_values([k / SCALE for k in key])

    def evaluate(self, key: tuple, step: str) -> Candidate:
        key = tuple(int(min(max(k, LOWEST), SCALE)) for k in key)
        if key in self.tried:
            return self.tried[key]
        t = self.threshold(key)
        (tally,) = measure(self.model, self.samples, [t], miou=True, cost=True, memo=self.memo)
        r = tally.result()
        ms = self.timer(t) if self.timer is not None else None
        ratio = r["gflops"] / self.base_gflops
        cost = {"gflops": r["gflops"], "ratio": ratio, "ms": ms}[self.target.kind]
        c = Candidate(t, r["miou"], r["aacc"], r["gflops"], ratio, r["exit_share"], ms, cost,
                      cost <= self.target.value, step)
        self.tried[key] = c
        if self.on_eval is not None:
            self.on_eval(c)
        return c

    def best(self) -> Optional[Candidate]:
        ok = [c for c in self.tried.values() if c.meets]
        # ties: the cheaper one, then the higher (more conservative) thresholds
        return max(ok, key=lambda c: (c.miou, -c.cost, stage_thresholds(c.threshold, self.stages))) if ok else None

    # ------------------------------------------------------------------ 1-D search
    def highest_fitting(self, make: Callable[[int], tuple], lo: int, hi: int, step: str,
                        cost_hi: Optional[float] = None, tol: int = 1) -> Optional[int]:
        """The highest x in [lo, hi) whose setting make(x) meets the budget, assuming cost
        grows with x; hi is taken as not meeting it (``cost_hi`` its cost when known).
        Secant steps on the cost, bisection when an interval does not halve. None when not
        even lo fits."""
        c_lo = self.evaluate(make(lo), step)
        if not c_lo.meets:
            return None
        goal = self.target.value
        halve = False
        while hi - lo > tol and self.budget_left():
            if cost_hi is not None and cost_hi > c_lo.cost and not halve:
                x = lo + (hi - lo) * (goal - c_lo.cost) / (cost_hi - c_lo.cost)
                mid = int(round(min(max(x, lo + 1), hi - 1)))
            else:
                mid = (lo + hi) // 2
            width = hi - lo
            c = self.evaluate(make(mid), step)
            if c.meets:
                lo, c_lo = mid, c
            else:
                hi, cost_hi = mid, c.cost
            halve = not halve and (hi - lo) > width / 2  # a secant step that stalled: bisect next
        return lo

    def fill_budget(self, make: Callable[[int], tuple], x0: int, step: int, label: str,
                    tol: int = 2) -> Optional[int]:
        """The highest x whose make(x) meets the budget, searched from x0: steps of ``step``
        (doubling) to bracket the boundary, then :meth:`highest_fitting` inside the bracket.
        None when not even the lowest threshold fits."""
        c = self.evaluate(make(x0), label)
        x, cost = x0, c.cost
        if c.meets:
            while self.budget_left():
                up = min(x + step, SCALE)
                if up == x:
                    return x
                c = self.evaluate(make(up), label)
                if not c.meets:
                    return self.highest_fitting(make, x, up, label, cost_hi=c.cost, tol=tol)
                x, step = up, step * 2
            return x
        while self.budget_left():
            down = max(x - step, LOWEST)
            c_down = self.evaluate(make(down), label)
            if c_down.meets:
                return self.highest_fitting(make, down, x, label, cost_hi=cost, tol=tol)
            if down == LOWEST:
                return None
            x, cost, step = down, c_down.cost, step * 2
        return None


def single_search(search: Search) -> Candidate:
    """The best single threshold within the budget (see the module doc)."""
    n = search.stages

    def make(x: int) -> tuple:
        return (x,) * n

    cost_top = {"gflops": search.base_gflops, "ratio": 1.0, "ms": None}[search.target.kind]
    x = search.highest_fitting(make, LOWEST, SCALE, "single: bracket", cost_hi=cost_top)
    if x is None:
        c = search.tried[make(LOWEST)]
        raise UserError(f"budget unreachable: even threshold {LOWEST / SCALE:g} at every stage costs "
                        f"{_cost_text(search.target, c)} (target: {search.target.describe()})")
    if search.target.kind != "ms" and cost_top <= search.target.value:
        search.evaluate(make(SCALE), "single: no exits")  # the dense model fits too
    step = 5
    while x - step >= LOWEST and search.budget_left():  # lower thresholds may score higher
        search.evaluate(make(x - step), "single: pattern")
        step *= 2
    return search.best()


def per_stage_search(search: Search, start: Candidate) -> Candidate:
    """Coordinate pattern search over the earlier stages' thresholds; the last non-final
    stage's threshold fills the budget (see the module doc)."""
    n = search.stages
    if n < 2:
        return start
    here = list(round(t * SCALE) for t in stage_thresholds(start.threshold, n))
    best = start
    step = 40
    while step >= 5 and search.budget_left():
        moved = False
        for j in range(n - 1):
            for sign in (1, -1):
                trial = list(here)
                trial[j] = min(max(here[j] + sign * step, LOWEST), SCALE)
                if trial[j] == here[j] or not search.budget_left():
                    continue
                prefix = tuple(trial[:-1])

                def make(x: int, prefix: tuple = prefix) -> tuple:
                    return (*prefix, x)

                label = f"per-stage: stage {j + 1} {'+' if sign > 0 else '-'}{step / SCALE:g}"
                x = search.fill_budget(make, here[-1], step, label)
                if x is None:
                    continue
                c = search.tried[make(x)]
                if c.miou > best.miou:
                    best, here, moved = c, [*prefix, x], True
                    break
            if moved:
                break
        if not moved:
            step //= 2
    return search.best()


def _cost_text(target: Target, c: Candidate) -> str:
    if target.kind == "ms":
        return f"{c.ms:.2f} ms"
    if target.kind == "ratio":
        return f"GFLOPs ratio {c.gflops_ratio:.3f}"
    return f"{c.gflops:.4g} GFLOPs"


def base_gflops(model: torch.nn.Module) -> float:
    """GFLOPs of the same model at threshold 1.0 (no exits, no auxiliary heads) on one
    crop-size window: the denominator of ``gflops_ratio``."""
    p = model.dtop_preset
    crop = (int(p.data.crop[0]), int(p.data.crop[1]))
    ps = model.backbone.patch_size
    grid = (-(-crop[0] // ps), -(-crop[1] // ps))
    n = grid[0] * grid[1]
    return cost_from_counts(model, grid, [n] * model.num_stages, out_hw=crop, aux_heads=False).total / GIGA


def make_timer(preset: Preset, ckpt: Path, data_root: Path, device: str, batch: int, dtype: str,
               repeats: int) -> Callable[[Threshold], float]:
    """Wall time of the pruned forward at a threshold, by `dtop bench`'s method (interleaved
    with the dense forward after a warm-up; the median), on its own copy of the model."""
    from .. import api
    from .bench import BenchOptions, run_bench

    with contextlib.redirect_stdout(sys.stderr):
        model = api.load_model(preset, ckpt)
    opts = dict(device=device, batch=batch, dtype=dtype, ckpt=ckpt, data_root=data_root, repeats=repeats,
                warmup=2, memory=False)
    BenchOptions(preset, **opts).checked()

    def timer(t: Threshold) -> float:
        res = run_bench(BenchOptions(preset, thresh=format_threshold(t), **opts), model=model)
        return float(res["pruned_ms"])

    return timer


@dataclass
class CalibrateOptions:
    """What `dtop calibrate` was asked for."""

    target: Target
    images: int = 200
    per_stage: bool = False
    max_evals: int = 30
    apply: bool = False
    out_dir: Optional[Path] = None
    device: Optional[str] = None
    batch: int = 1
    dtype: str = "fp32"
    repeats: int = 5
    extra: dict = field(default_factory=dict)


def calibrate(preset: Preset, ckpt: Union[str, Path], data_root: Union[str, Path], opts: CalibrateOptions,
              progress: Optional[Progress] = None, log: Callable[[str], None] = lambda msg: None) -> dict:
    """Search the threshold(s); write calibration.json (and with ``apply`` a calibrated copy of
    the checkpoint). Returns {threshold, miou, gflops, gflops_ratio, exit_share, candidates,
    evaluations, seconds, ...}."""
    from .. import api

    t0 = time.perf_counter()
    ckpt, data_root = Path(ckpt), Path(data_root).expanduser().resolve()
    if opts.images < 1:
        raise UserError(f"--images must be a positive integer (got {opts.images})")
    if opts.max_evals < 2:
        raise UserError(f"--max-evals must be at least 2 (got {opts.max_evals})")
    check_dataset(preset, data_root)
    out_dir = Path(opts.out_dir) if opts.out_dir is not None else ckpt.parent
    device = api.resolve_device(opts.device)
    timer = None
    if opts.target.kind == "ms":
        timer = make_timer(preset, ckpt, data_root, device, opts.batch, opts.dtype, opts.repeats)
    with contextlib.redirect_stdout(sys.stderr):  # mmengine logs to stdout; --json owns it
        model = api.load_model(preset, ckpt, device=device)
        ds = val_dataset(preset, data_root, opts.images)
    log(f"reading {len(ds)} validation image(s)")
    samples = []
    for i in range(len(ds)):
        if progress is not None:
            progress(i, len(ds))
        samples.append(ds[i])
    trained = threshold_value(model.threshold)

    def on_eval(c: Candidate) -> None:
        log(f"eval {len(search.tried)}: threshold {format_threshold(c.threshold)}: mIoU {c.miou:.2f}, "
            f"{_cost_text(opts.target, c)} ({'fits' if c.meets else 'over budget'})")

    search = Search(model, samples, opts.target, base_gflops(model), timer=timer, max_evals=opts.max_evals,
                    on_eval=on_eval)
    single = single_search(search)
    single_evals = search.evaluations
    best = per_stage_search(search, single) if opts.per_stage else single
    seconds = time.perf_counter() - t0
    result: dict[str, Any] = {
        "threshold": threshold_value(best.threshold),
        "miou": best.miou,
        "aacc": best.aacc,
        "gflops": best.gflops,
        "gflops_ratio": best.gflops_ratio,
        "base_gflops": search.base_gflops,
        "exit_share": best.exit_share,
        "ms": best.ms,
        "target": {"kind": opts.target.kind, "value": opts.target.value},
        "per_stage": opts.per_stage,
        "single": single.row(),
        "single_evaluations": single_evals,
        "evaluations": search.evaluations,
        "candidates": [c.row() for c in search.tried.values()],
        "images": len(samples),
        "checkpoint": str(ckpt),
        "preset": preset.name,
        "trained_threshold": trained,
        "memo": {"hits": search.memo.hits, "misses": search.memo.misses},
        "seconds": seconds,
    }
    if opts.target.kind == "ms":
        result["timing"] = {"device": device, "batch": opts.batch, "dtype": opts.dtype, "repeats": opts.repeats}
    result["calibration"] = str(atomic_write(out_dir / "calibration.json",
                                             (json.dumps(result, indent=2) + "\n").encode()))
    if opts.apply:
        result["applied"] = str(apply_calibration(ckpt, preset, result, out_dir))
    return result


def apply_calibration(ckpt: Path, preset: Preset, result: dict, out_dir: Path) -> Path:
    """Write ``CKPT_STEM.calibrated.pth``: the same checkpoint whose ``meta['dtop']`` records the
    calibrated threshold (what eval/infer use by default) and how it was found."""
    from ..safeload import load_checkpoint

    data = load_checkpoint(ckpt, map_location="cpu")
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    info = dict(meta.get("dtop") or {})
    info.setdefault("preset", preset.name)
    info.setdefault("preset_yaml", preset.to_yaml())
    info["trained_threshold"] = info.get("threshold", result["trained_threshold"])
    info["threshold"] = result["threshold"]
    info["calibration"] = {k: result[k] for k in ("target", "miou", "gflops", "gflops_ratio", "exit_share",
                                                  "images", "evaluations")}
    if "state_dict" not in data:  # a bare state dict: wrap it so it can carry the meta
        data = {"state_dict": data}
    data["meta"] = {**meta, "dtop": info}
    path = out_dir / f"{ckpt.stem}.calibrated.pth"

    def write(f: io.BufferedWriter) -> None:
        torch.save(data, f)

    return atomic_save(path, write)
