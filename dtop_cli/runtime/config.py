"""Presets -> complete mmengine configs.

`build_config` turns a preset and a run's options (phase "base": threshold 1.0, every head
supervised; "prune": the base weights fine-tuned with exits on) into the whole mmengine
config a run uses: model, data, optimiser, schedule, hooks, environment. The same config is
what `dtop config` writes as a plain ``.py`` file, so mmseg's own tools/train.py and
tools/test.py run it unchanged: nothing a run needs lives only in dtop's Python code.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from mmengine.config import Config

from ..data.mmseg import dataset_config, pipelines
from ..errors import UserError
from ..fsutil import atomic_write
from ..presets import Preset, Threshold, check_threshold, replace, threshold_value
from .tracking import MEAN_PATTERN, check_trackers
from .tracking import vis_backends as tracking_backends

PHASES = ("base", "prune")
LAUNCHERS = ("none", "pytorch", "slurm")
#: Modules a config must import so that mmseg's registries know dtop's model and hooks.
CUSTOM_IMPORTS = ["dtop_cli.model", "dtop_cli.runtime.hooks", "dtop_cli.runtime.tracking", "dtop_cli.data.transforms"]
#: ``resume`` values: no, the newest readable checkpoint (must exist), or that if any exists.
RESUME_MODES = (False, True, "auto")

PathLike = Union[str, Path]


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class RunOptions:
    """One training run as the user asked for it (`dtop train` / `dtop prune` flags).

    Checked once (:meth:`checked`) before anything slow happens. ``threshold``/``topk``
    override the preset's exit settings for the prune phase; the base phase always trains
    at threshold 1.0 (nothing exits), which is what makes it the base model.
    """

    phase: str
    data_root: PathLike = "data"
    work_dir: Optional[PathLike] = None
    base_checkpoint: Optional[PathLike] = None
    max_iters: Optional[int] = None
    threshold: Optional[Threshold] = None
    topk: Optional[int] = None
    amp: bool = False
    resume: Union[bool, str] = False  # False, True (must exist) or "auto" (if one exists)
    launcher: str = "none"
    pretrained: Optional[PathLike] = None
    #: a trained model (e.g. an mmseg model-zoo file) the base phase starts from instead of
    #: pretrained backbone weights: heads the preset adds start fresh (``dtop train --init``)
    init: Optional[PathLike] = None
    seed: int = 0
    validate: bool = True
    verbose: bool = False
    log_to: tuple[str, ...] = ()
    wandb_project: Optional[str] = None
    wandb_name: Optional[str] = None

    def checked(self) -> "RunOptions":
        """Self, after every check that needs no files; raises UserError with one line."""
        if self.phase not in PHASES:
            raise UserError(f"unknown phase '{self.phase}' (expected one of: {', '.join(PHASES)})")
        if self.max_iters is not None and int(self.max_iters) < 1:
            raise UserError(f"--max-iters must be a positive integer (got {self.max_iters})")
        if self.topk is not None and self.topk < 0:
            raise UserError(f"--topk must be >= 0 (got {self.topk})")
        if self.threshold is not None:
            t = check_threshold(self.threshold)
            if self.phase == "base" and t != 1.0:
                raise UserError("the base phase trains with threshold 1.0; use `dtop prune --thresh` for exits")
        if self.resume not in RESUME_MODES:
            raise UserError(f"--resume takes no value or 'auto' (got {self.resume!r})")
        if self.launcher not in LAUNCHERS:
            raise UserError(f"--launcher must be none, pytorch or slurm (got {self.launcher})")
        if self.phase == "base" and self.base_checkpoint is not None:
            raise UserError("--from applies to `dtop prune`; the base phase trains from pretrained weights")
        if self.init is not None and self.phase != "base":
            raise UserError("--init applies to `dtop train`; `dtop prune` starts from --from CKPT")
        if self.init is not None and self.pretrained is not None:
            raise UserError("--init and --pretrained both name starting weights: pass one")
        check_trackers(self.log_to)
        return self

    def replace(self, **changes: Any) -> "RunOptions":
        return dataclasses.replace(self, **changes)

    def preset_for_run(self, preset: Preset) -> Preset:
        """The preset with this run's exit settings applied (what the run's model is)."""
        if self.topk is not None:
            preset = replace(preset, **{"exit.keep_topk": int(self.topk)})
        return preset

    def run_threshold(self, preset: Preset) -> Union[float, list[float]]:
        """The exit threshold the run trains with: 1.0 for base, else --thresh or the preset's
        (a number, or a list with one per non-final stage)."""
        if self.phase == "base":
            return 1.0
        t = preset.exit.threshold if self.threshold is None else self.threshold
        return threshold_value(check_threshold(t, stages=preset.num_stages - 1))

    def resolved_work_dir(self, preset: Preset) -> Path:
        """``--work-dir``, by default ``work_dirs/<preset>/<phase>``."""
        return Path(self.work_dir) if self.work_dir is not None else Path("work_dirs") / preset.name / self.phase


# --------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class Schedule:
    """Iteration counts of one phase after ``--max-iters`` scaling."""

    iters: int
    warmup: int
    poly_end: int
    val_interval: int
    checkpoint_interval: int


def schedule(preset: Preset, phase: str, max_iters: Optional[int] = None) -> Schedule:
    """The phase's schedule, shortened to ``max_iters`` with warm-up and poly horizon scaled.

    Shortening keeps the *shape* of the learning-rate curve: a 40k-iteration schedule whose
    poly horizon is 160k, cut to 400 iterations, warms up over 15 iterations and decays
    towards a horizon of 1600, exactly as the full run would, only faster.
    """
    if phase not in PHASES:
        raise UserError(f"unknown phase '{phase}' (expected one of: {', '.join(PHASES)})")
    ph = getattr(preset.schedule, phase)
    iters = ph.iters if max_iters is None else int(max_iters)
    if iters < 1:
        raise UserError(f"--max-iters must be a positive integer (got {max_iters})")
    f = iters / ph.iters
    warmup = min(max(1, round(preset.optim.warmup_iters * f)), iters)
    poly_end = max(warmup + 1, round(ph.poly_iters * f))
    return Schedule(
        iters=iters,
        warmup=warmup,
        poly_end=poly_end,
        val_interval=max(1, min(preset.schedule.val_interval, iters)),
        checkpoint_interval=max(1, min(preset.schedule.checkpoint_interval, iters)),
    )


def per_process_batch(preset: Preset, world_size: int) -> int:
    """The preset's batch is the total over all processes (the paper's 16 = 4 GPUs x 4)."""
    bs = preset.data.batch_size
    if world_size < 1 or bs % world_size:
        raise UserError(f"preset batch size {bs} cannot be split evenly over {world_size} processes; "
                        f"use a process count that divides it or --set data.batch_size=N")
    return bs // world_size


# --------------------------------------------------------------------------- config


def build_config(
    preset: Preset,
    opts: RunOptions,
    *,
    load_from: Optional[PathLike] = None,
    pretrained: Optional[PathLike] = None,
    world_size: Optional[int] = None,
    cuda: Optional[bool] = None,
) -> Config:
    """The complete mmengine config of one run (see the module docstring).

    load_from / pretrained: the resolved files the run starts from (a checkpoint; backbone
    weights). ``world_size`` (default: $WORLD_SIZE or 1) splits the preset's total batch
    over processes; ``cuda`` (default: whether CUDA is available) picks the distributed
    backend. ``opts.validate`` False leaves out the validation loop (the demo evaluates
    separately, once, after training).
    """
    from ..model.build import model_config

    opts = opts.checked()
    phase = opts.phase
    sched = schedule(preset, phase, opts.max_iters)
    preset = opts.preset_for_run(preset)
    thr = opts.run_threshold(preset)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()

    train_pipeline, test_pipeline = pipelines(preset)
    workers = max(0, min(preset.data.num_workers, os.cpu_count() or 1))
    loader_common = dict(num_workers=workers, persistent_workers=workers > 0)
    data_root = Path(opts.data_root)
    train_loader = dict(
        batch_size=per_process_batch(preset, world_size),
        sampler=dict(type="InfiniteSampler", shuffle=True),
        dataset=dataset_config(preset, data_root, "train", train_pipeline),
        **loader_common,
    )
    val_loader = dict(
        batch_size=1,
        sampler=dict(type="DefaultSampler", shuffle=False),
        dataset=dataset_config(preset, data_root, "val", test_pipeline),
        **loader_common,
    )
    evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"])

    o = preset.optim
    head_mult = dict(lr_mult=o.head_lr_mult)
    optim_wrapper: dict[str, Any] = dict(
        type="AmpOptimWrapper" if opts.amp else "OptimWrapper",
        optimizer=dict(type="AdamW", lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay),
        paramwise_cfg=dict(custom_keys={"decode_head": dict(head_mult), "auxiliary_head": dict(head_mult)}),
    )
    if opts.amp:
        optim_wrapper["dtype"] = "bfloat16"
    param_scheduler = [
        dict(type="LinearLR", start_factor=o.warmup_ratio, by_epoch=False, begin=0, end=sched.warmup),
        dict(type="PolyLR", eta_min=0.0, power=o.poly_power, begin=sched.warmup, end=sched.poly_end,
             by_epoch=False),
    ]
    log_interval = max(1, min(50, sched.iters // 10 or 1))
    default_hooks = dict(
        timer=dict(type="IterTimerHook"),
        logger=dict(type="LoggerHook", interval=log_interval, log_metric_by_epoch=False),
        param_scheduler=dict(type="ParamSchedulerHook"),
        checkpoint=dict(type="AtomicCheckpointHook", by_epoch=False, interval=sched.checkpoint_interval,
                        max_keep_ckpts=2, save_last=True),
        sampler_seed=dict(type="DistSamplerSeedHook"),
        visualization=dict(type="SegVisualizationHook"),
    )
    vis_backends = tracking_backends(opts.log_to, f"{preset.name}-{phase}", opts.wandb_project, opts.wandb_name)
    work_dir = opts.resolved_work_dir(preset)
    cfg = dict(
        default_scope="mmseg",
        custom_imports=dict(imports=list(CUSTOM_IMPORTS), allow_failed_imports=False),
        # what the weights are (copied into every checkpoint's meta): `dtop eval`, `prune`,
        # `infer` ... rebuild the model from the recorded preset and threshold alone
        dtop=dict(preset=preset.name, phase=phase, threshold=thr, keep_topk=preset.exit.keep_topk,
                  preset_yaml=preset.to_yaml(), data_root=str(data_root.expanduser().resolve())),
        model=model_config(preset, threshold=thr, pretrained=None if pretrained is None else str(pretrained),
                           frozen=getattr(preset.schedule, phase).frozen or ()),
        train_dataloader=train_loader,
        val_dataloader=val_loader,
        test_dataloader=val_loader,
        val_evaluator=evaluator,
        test_evaluator=evaluator,
        optim_wrapper=optim_wrapper,
        param_scheduler=param_scheduler,
        train_cfg=dict(type="DToPTrainLoop", max_iters=sched.iters, val_interval=sched.val_interval),
        val_cfg=dict(type="ValLoop"),
        test_cfg=dict(type="TestLoop"),
        default_hooks=default_hooks,
        # a prune run also logs what its training batches retired (exit shares, GFLOPs ratio)
        custom_hooks=[dict(type="ExitStatsHook")] if phase == "prune" else [],
        log_processor=dict(by_epoch=False, mean_pattern=MEAN_PATTERN),
        log_level="INFO",
        vis_backends=vis_backends,
        # one visualizer per run: mmengine keeps visualizers by name for the whole process, so
        # a second run in one process (the quickstart's prune) would write into the first's
        # vis_data/scalars.json under a shared name
        visualizer=dict(type="SegLocalVisualizer", vis_backends=vis_backends,
                        name=f"visualizer:{Path(work_dir).expanduser().resolve()}"),
        env_cfg=dict(
            cudnn_benchmark=False,
            mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
            dist_cfg=dict(backend="nccl" if cuda else "gloo"),
        ),
        randomness=dict(seed=opts.seed),
        launcher=opts.launcher,
        work_dir=str(Path(work_dir).expanduser().resolve()),
        load_from=None if load_from is None else str(Path(load_from).expanduser().resolve()),
        resume=bool(opts.resume),
    )
    if opts.launcher != "none" and not cuda:
        # mmengine hands DDP the local rank as a device id, which torch refuses for CPU modules.
        cfg["model_wrapper_cfg"] = dict(type="CPUDistributedDataParallel")
    if not opts.validate:
        for key in ("val_dataloader", "val_evaluator", "val_cfg"):
            cfg[key] = None
    return Config(cfg)


def write_config(cfg: Config, path: PathLike) -> Path:
    """Write ``cfg`` as a plain ``.py`` config (atomically) that ``Config.fromfile`` loads."""
    path = Path(path)
    if path.suffix != ".py":
        raise UserError(f"config output must be a .py file (got {path})")
    atomic_write(path, cfg.pretty_text.encode())
    return path
