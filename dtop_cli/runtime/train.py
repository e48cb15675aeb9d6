"""One training phase end to end on mmengine's Runner.

All checks that can fail on bad input run before the (slow) runner is built: dataset
folder, work dir, checkpoint architecture, pretrained weights, device. The run writes
checkpoints atomically (:mod:`.hooks`); ``resume`` continues from the work dir's last
complete one.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

from mmengine.dist import is_main_process
from mmengine.hooks import Hook

from ..console import LinesToLog, Progress, quiet_mmengine_console
from ..data.mmseg import check_dataset, register_modules
from ..errors import UserError
from ..fsutil import check_work_dir
from ..presets import Preset
from . import hooks  # noqa: F401  (registers the hooks the config names)
from .checkpoints import checkpoint_meta, latest_checkpoint
from .config import RunOptions, build_config, schedule
from .weights import resolve_pretrained


class ProgressHook(Hook):
    """Feeds a console :class:`~dtop_cli.console.Progress` from the runner (iterations,
    loss) and keeps the last validation metrics. Console only: never part of a config."""

    priority = "VERY_LOW"

    def __init__(self, title: str, console: Any = None) -> None:
        self.title = title
        self.console = console
        self.metrics: dict[str, float] = {}
        self._progress: Optional[Progress] = None

    def before_train(self, runner: Any) -> None:
        self._progress = Progress(self.title, runner.max_iters, console=self.console,
                                  completed=runner.iter, enabled=self.console is not None)
        self._progress.start()

    def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None,
                         outputs: Optional[dict] = None) -> None:
        info = None
        if outputs and "loss" in outputs:
            loss = outputs["loss"]
            info = f"loss {float(loss.detach() if hasattr(loss, 'detach') else loss):.3f}"
        if self._progress is not None:
            self._progress.update(runner.iter + 1, info=info)

    def after_val_epoch(self, runner: Any, metrics: Optional[dict] = None) -> None:
        self.metrics = {}
        for k, v in (metrics or {}).items():
            try:  # mmseg reports numpy scalars (float32 is not a Python float)
                self.metrics[k] = float(v)
            except (TypeError, ValueError):
                continue
        if self.console is not None and "mIoU" in self.metrics:
            self.console.print(f"{self.title}: iteration {runner.iter}: val mIoU {self.metrics['mIoU']:.2f}")

    def after_train(self, runner: Any) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _init_cpu_dist(launcher: str, cuda: bool) -> None:
    """mmengine's pytorch launcher calls torch.cuda.set_device; on CPU start gloo ourselves."""
    if launcher != "pytorch" or cuda:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")


def train(preset: Preset, opts: RunOptions, console: Any = None) -> dict[str, Any]:
    """Run one training phase end to end and return what it produced.

    Returns {phase, preset, work_dir, checkpoint, iters, threshold, metrics, resumed_from,
    seconds}.
    """
    import torch

    t0 = time.perf_counter()
    opts = opts.checked()
    phase = opts.phase
    if phase == "prune" and opts.base_checkpoint is None:
        raise UserError("the prune phase starts from a base checkpoint: pass --from CKPT")
    sched = schedule(preset, phase, opts.max_iters)
    data_root = Path(opts.data_root).expanduser().resolve()
    check_dataset(preset, data_root)
    wd = check_work_dir(opts.resolved_work_dir(preset))
    opts = opts.replace(data_root=data_root, work_dir=wd)
    cuda = torch.cuda.is_available()
    if opts.amp and not cuda:
        raise UserError("--amp needs a CUDA GPU (bf16 autocast); none is visible here")
    register_modules()

    load_from: Optional[Path] = None
    if phase == "prune":
        base = Path(opts.base_checkpoint).expanduser().resolve()
        from ..model.build import build_model
        from ..model.checkpoint import load_weights

        load_weights(build_model(preset, threshold=1.0), base)  # strict: same architecture
        load_from = base
    if opts.resume:
        last = latest_checkpoint(wd)
        if last is None:
            raise UserError(f"nothing to resume in {wd}: no last_checkpoint or iter_*.pth there")
        info = checkpoint_meta(last).get("dtop") or {}
        if info and (info.get("phase") != phase or info.get("preset") != preset.name):
            raise UserError(f"{last} is from a {info.get('phase')} run of preset '{info.get('preset')}', "
                            f"not {phase} of '{preset.name}': use another --work-dir")
        load_from = last
    weights = resolve_pretrained(preset, opts.pretrained, console) if phase == "base" and not opts.resume else None

    cfg = build_config(preset, opts, load_from=load_from, pretrained=weights, cuda=cuda)
    _init_cpu_dist(opts.launcher, cuda)
    from mmengine.runner import Runner

    progress = ProgressHook(f"{phase} {preset.name}", console)
    # mmengine logs to stdout; stdout belongs to --json, so everything goes to stderr, and
    # without --verbose only warnings do (the work dir's log file keeps everything).
    with contextlib.redirect_stdout(sys.stderr if opts.verbose else io.StringIO()), warnings.catch_warnings():
        if not opts.verbose:
            # mmseg's hook warns that it will not draw (we never ask it to); a second runner in
            # one process (quickstart) reuses mmengine's global visualizer and warns about that
            warnings.filterwarnings("ignore", message="The draw is False")
            warnings.filterwarnings("ignore", message=".*instance named of visualizer has been created")
        runner = Runner.from_cfg(cfg)
    if not opts.verbose:
        quiet_mmengine_console()
    # mmengine also print()s a few notes ("Loads checkpoint by local backend ..."): into the
    # log file unless --verbose.
    with contextlib.redirect_stdout(sys.stderr if opts.verbose else LinesToLog(runner.logger)):
        if is_main_process():
            runner.register_hook(progress)
        runner.train()
    last = latest_checkpoint(wd)
    return {
        "phase": phase,
        "preset": preset.name,
        "work_dir": str(wd),
        "checkpoint": None if last is None else str(last),
        "iters": sched.iters,
        "threshold": cfg.dtop.threshold,
        "metrics": progress.metrics,
        "resumed_from": str(load_from) if opts.resume and load_from is not None else None,
        "seconds": round(time.perf_counter() - t0, 1),
    }
