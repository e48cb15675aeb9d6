"""Watching a run: experiment trackers (`--log-to`) and the pruning scalars of training batches.

mmengine already ships TensorBoard and Weights & Biases backends; dtop only chooses them,
checks their packages before a long run starts, and adds what a pruning run is judged by:
the share of tokens each stage retires, the share still active after each stage and the
GFLOPs that implies, per logging interval of the training batches themselves. Those come
for free: the model knows each image's exit map and token counts after every forward.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Optional, Sequence

from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ..cost import gflops_from_counts
from ..errors import UserError

TRACKERS: dict[str, tuple[str, str]] = {
    # name: (module that must import, extra that installs it)
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
}

# scalar names the log processor averages over its window (mmengine's own pattern, plus
# ours): without it mmengine logs only the last iteration's value of a non-loss scalar
MEAN_PATTERN = r".*(loss|time|data_time|grad_norm|exit|active|gflops_ratio).*"


def parse_log_to(value: Optional[str]) -> tuple[str, ...]:
    """``--log-to tensorboard,wandb`` -> ("tensorboard", "wandb"); raises UserError on an
    unknown name. Empty or None: local scalars only."""
    if not value:
        return ()
    names = tuple(dict.fromkeys(v.strip().lower() for v in value.split(",") if v.strip()))
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise UserError(f"--log-to: unknown tracker '{unknown[0]}' (choose from: {', '.join(TRACKERS)})")
    return names


def check_trackers(names: Sequence[str]) -> None:
    """Before training: every asked-for tracker's package imports, else one line naming the
    extra that installs it."""
    for name in names:
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"--log-to {name} needs the {module} package: pip install 'dtop[{extra}]' "
                            f"(or pip install {module})")


def vis_backends(names: Sequence[str], run_name: str, wandb_project: Optional[str] = None,
                 wandb_name: Optional[str] = None) -> list[dict]:
    """mmengine visualisation backends: local scalars always, then the trackers asked for.

    W&B: project and run name from the flags, else the usual WANDB_PROJECT / WANDB_NAME
    environment variables, else ``dtop`` and ``<preset>-<phase>``. WANDB_MODE=offline and
    the rest of W&B's environment apply as usual.
    """
    backends: list[dict] = [dict(type="LocalVisBackend")]
    for name in names:
        if name == "tensorboard":
            backends.append(dict(type="TensorboardVisBackend"))
        elif name == "wandb":
            init = dict(project=wandb_project or os.environ.get("WANDB_PROJECT") or "dtop",
                        name=wandb_name or os.environ.get("WANDB_NAME") or run_name)
            backends.append(dict(type="WandbVisBackend", init_kwargs=init))
    return backends


def exit_scalars(model: Any, exit_stage: Any, active_counts: Any, hw: tuple[int, int]) -> dict[str, float]:
    """The pruning scalars of one training batch.

    exit_stage: (B, h, w) stage 1..S that finalised each token; active_counts: (B, S) tokens
    each stage ran on. Returns ``exit.share_s`` (tokens retired by stage s's head),
    ``active.after_s`` (tokens still running after stage s, s < S) and ``gflops_ratio``
    (the batch's mean GFLOPs in the paper's convention over the same model with nothing
    exiting and no auxiliary head, as ``dtop flops`` counts the base model).
    """
    counts = active_counts.detach().cpu().tolist()
    stages = len(counts[0])
    n = hw[0] * hw[1]
    out: dict[str, float] = {}
    total = float(exit_stage.numel())
    for s in range(1, stages + 1):
        out[f"exit.share_{s}"] = float((exit_stage == s).sum()) / total
    for s in range(1, stages):
        out[f"active.after_{s}"] = sum(c[s] for c in counts) / (n * len(counts))
    dense = gflops_from_counts(model, hw, [n] * stages, aux_heads=False)
    pruned = sum(gflops_from_counts(model, hw, c, aux_heads=True) for c in counts) / len(counts)
    out["gflops_ratio"] = pruned / dense
    return out


@HOOKS.register_module(force=True)
class ExitStatsHook(Hook):
    """After each training iteration of a prune run, the pruning scalars of that batch go to
    the message hub (``train/exit.share_1`` ...), so the logger writes their mean over each
    logging interval beside the loss, to every backend (scalars.json, TensorBoard, W&B).
    Each process reports its own batches; the log shows rank 0's."""

    priority = "NORMAL"  # before the LoggerHook (BELOW_NORMAL) of the same iteration

    def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
        model = runner.model.module if hasattr(runner.model, "module") else runner.model
        record = getattr(model, "train_exit_record", None)
        if record is None:
            return
        exit_stage, active_counts = record
        for key, value in exit_scalars(model, exit_stage, active_counts, tuple(exit_stage.shape[-2:])).items():
            runner.message_hub.update_scalar(f"train/{key}", value)
