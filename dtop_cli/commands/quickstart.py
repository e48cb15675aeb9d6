"""`dtop quickstart`: the whole DToP story on the embedded demo, in minutes on a CPU.

prepare synthetic -> train the base model (threshold 1.0) from the demo's pretrained backbone
(shipped in ``presets/weights``, the stand-in for the ImageNet weights every real preset
starts from; ``pretrain=True`` makes it anew, see ``commands.pretrain``) -> prune (fine-tune
with exits on) -> evaluate both with FLOPs. The summary answers the questions the method raises: how
good is each exit on its own (base ``stage_miou``), how much work did pruning save (GFLOPs,
``exit_share``) and what did it cost (mIoU). It is written to ``summary.json`` in the work dir.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional, Union

from ..console import Progress
from ..errors import UserError
from ..fsutil import atomic_write, check_work_dir
from ..presets import format_threshold, load_preset

PRESET = "tiny-synthetic"


def quickstart(
    work_dir: Union[str, Path],
    *,
    seed: int = 0,
    base_iters: Optional[int] = None,
    prune_iters: Optional[int] = None,
    pretrain_iters: Optional[int] = None,
    n_train: Optional[int] = None,
    n_val: Optional[int] = None,
    pretrain: bool = False,
    console: Any = None,
) -> dict[str, Any]:
    """Run the demo in ``work_dir`` (data, both runs, summary.json) and return the summary.

    ``pretrain``: pretrain the backbone here (``pretrain_iters`` iterations, default the
    preset's) instead of starting from the shipped file. ``base_iters``/``prune_iters``
    shorten the schedules, ``n_train``/``n_val`` the dataset (for a fast smoke run; the
    defaults are the real demo).
    """
    from ..data.synthetic import make_synthetic
    from ..runtime.config import RunOptions
    from ..runtime.train import train
    from ..runtime.weights import resolve_pretrained
    from .evaluate import evaluate
    from .pretrain import pretrain_backbone

    t0 = time.perf_counter()
    wd = check_work_dir(work_dir)
    preset = load_preset(PRESET)
    data_root = wd / "data"
    kw: dict[str, Any] = {"seed": seed}
    if n_train is not None:
        kw["n_train"] = n_train
    kw["n_val"] = n_val if n_val is not None else preset.data.val_images
    if console is not None:
        console.print(f"[bold]1/5[/] synthetic dataset in {data_root}")
    # A rerun with other sizes regenerates the demo's own data (never anything else).
    make_synthetic(data_root, overwrite=True, **kw)

    pre: dict[str, Any]
    if pretrain or pretrain_iters is not None:
        if preset.pretrain is None:  # pragma: no cover - the demo preset has one
            raise UserError(f"preset '{PRESET}' has no pretrain section")
        if console is not None:
            console.print("[bold]2/5[/] backbone pretraining (per-token classification, training split)")
        iters = preset.pretrain.iters if pretrain_iters is None else pretrain_iters
        pre = {**pretrain_backbone(preset, data_root, wd / "pretrain" / "backbone.pth", iters=iters,
                                   lr=preset.pretrain.lr, seed=seed, console=console), "shipped": False}
    else:
        weights = resolve_pretrained(preset, None)
        if weights is None:  # pragma: no cover - the demo preset names its file
            raise UserError(f"preset '{PRESET}' names no pretrained backbone")
        pre = {"path": str(weights), "shipped": True}
        if console is not None:
            console.print(f"[bold]2/5[/] pretrained backbone: {weights} (shipped; --pretrain makes it anew)")
    if console is not None:
        console.print("[bold]3/5[/] base training (threshold 1.0: every token runs every layer)")
    base = train(preset, RunOptions("base", data_root=data_root, work_dir=wd / "base", max_iters=base_iters,
                                    pretrained=pre["path"], seed=seed, validate=False),
                 console)
    if console is not None:
        console.print(f"[bold]4/5[/] pruned fine-tuning (threshold {format_threshold(preset.exit.threshold)})")
    pruned = train(preset, RunOptions("prune", data_root=data_root, work_dir=wd / "prune", max_iters=prune_iters,
                                      base_checkpoint=base["checkpoint"], seed=seed, validate=False),
                   console)
    if console is not None:
        console.print("[bold]5/5[/] evaluation of both models")
    with Progress("eval base", console=console, transient=True, enabled=console is not None) as bar:
        eb = evaluate(preset, base["checkpoint"], data_root=data_root, threshold=1.0, flops=True,
                      stage_miou=True, progress=bar)
    with Progress("eval pruned", console=console, transient=True, enabled=console is not None) as bar:
        ep = evaluate(preset, pruned["checkpoint"], data_root=data_root, flops=True, stage_miou=False,
                      progress=bar)
    summary = {
        "preset": PRESET,
        "pretrain": pre,
        "base": {"miou": eb["miou"], "aacc": eb["aacc"], "gflops": eb.get("gflops"),
                 "stage_miou": eb["stage_miou"], "checkpoint": base["checkpoint"],
                 "train_seconds": base["seconds"], "iters": base["iters"]},
        "pruned": {"miou": ep["miou"], "aacc": ep["aacc"], "gflops": ep.get("gflops"),
                   "exit_share": ep["exit_share"], "active_share": ep["active_share"],
                   "threshold": ep["threshold"], "checkpoint": pruned["checkpoint"],
                   "train_seconds": pruned["seconds"], "iters": pruned["iters"]},
        "seconds": round(time.perf_counter() - t0, 1),
        "work_dir": str(wd),
    }
    if summary["base"]["gflops"] and summary["pruned"]["gflops"]:
        summary["gflops_ratio"] = round(summary["pruned"]["gflops"] / summary["base"]["gflops"], 4)
    atomic_write(wd / "summary.json", (json.dumps(summary, indent=1) + "\n").encode())
    return summary
