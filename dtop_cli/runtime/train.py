"""One training phase end to end on mmengine's Runner.

All checks that can fail on bad input run before the (slow) runner is built: dataset
folder, work dir, checkpoint architecture, pretrained weights, device. The run writes
checkpoints atomically (:mod:`.hooks`); ``resume`` continues from the work dir's newest
readable one (an unreadable newer one is reported and set aside, never deleted).

A run that ends early on purpose raises :class:`~dtop_cli.errors.RunStopped`: a stop signal
(after a complete checkpoint; exit 128 + signal number), a non-finite loss (nothing saved
from that step), a checkpoint that could not be written.
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
from ..errors import RunStopped, UserError
from ..fsutil import atomic_write, check_work_dir
from ..presets import Preset
from . import hooks  # noqa: F401  (registers the hooks the config names)
from .checkpoints import (
    LAST_CHECKPOINT,
    checkpoint_meta,
    find_resume_checkpoint,
    latest_checkpoint,
    set_aside,
)
from .config import RunOptions, build_config, schedule
from .launch import is_rank0
from .stopping import signal_exit_code, signal_name
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


def _warn(console: Any, message: str) -> None:
    if not is_rank0():
        return
    if console is not None:
        console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)
    else:
        print(f"warning: {message}", file=sys.stderr)


def _remove_partial_writes(work_dir: Path, console: Any) -> None:
    """A checkpoint write killed half-way (SIGKILL, a dead node) leaves its hidden temporary
    file; it is never a checkpoint and may be gigabytes: remove it."""
    if not is_rank0():
        return
    for part in work_dir.glob(".iter_*.pth.part"):
        part.unlink(missing_ok=True)
        _warn(console, f"removed {part.name}, a checkpoint write that did not finish")


def resume_from(work_dir: Path, mode: Any, console: Any = None) -> Optional[Path]:
    """The checkpoint ``--resume`` (``mode`` True) or ``--resume auto`` continues from.

    Unreadable newer checkpoints are named in a warning and renamed to ``NAME.unreadable``
    (by the first process only): kept for inspection, never overwritten by the resumed run.
    None: ``auto`` and no checkpoint at all (the run starts from the beginning).
    """
    point = find_resume_checkpoint(work_dir)
    if point.checkpoint is None:
        if point.unreadable:
            listed = "; ".join(f"{p.name} ({why})" for p, why in point.unreadable)
            raise UserError(f"no readable checkpoint to resume in {work_dir}: {listed}")
        if mode == "auto":
            return None
        raise UserError(f"nothing to resume in {work_dir}: no last_checkpoint or iter_*.pth there")
    for bad, why in point.unreadable:
        kept = set_aside(bad) if is_rank0() and bad.exists() else bad.with_name(bad.name + ".unreadable")
        _warn(console, f"{bad} is not a readable checkpoint ({why}); resuming from {point.checkpoint.name} "
                       f"instead (the unreadable file is kept as {kept.name})")
    if point.unreadable and is_rank0():
        atomic_write(work_dir / LAST_CHECKPOINT, str(point.checkpoint).encode())
    return point.checkpoint


def _stopped(stop: Any, max_iters: int) -> RunStopped:
    """The one line (and exit code) a run that ended early reports."""
    if stop.kind == "signal":
        return RunStopped(f"{signal_name(stop.signum)} after iteration {stop.iteration} of {max_iters}; "
                          f"saved {stop.checkpoint}: run the same command with --resume to continue",
                          exit_code=signal_exit_code(stop.signum))
    terms = ", ".join(f"{k}={v}" for k, v in stop.terms.items()) or "on another process"
    last = (f"the last good checkpoint is {stop.checkpoint} (--resume continues from it)" if stop.checkpoint
            else "no checkpoint was written before it")
    return RunStopped(f"non-finite loss at iteration {stop.iteration}: {terms}; stopped without saving that step, "
                      f"{last}", exit_code=1)


def _from_data_worker(e: UserError) -> UserError:
    """A UserError raised in a DataLoader worker comes back with the worker's traceback as its
    message: keep the original line."""
    text = str(e)
    if "Original Traceback" not in text:
        return e
    last = [ln for ln in text.splitlines() if ln.strip()][-1]
    return UserError(last.split("Error: ", 1)[-1])


def _init_weights(preset: Preset, path: Path, work_dir: Path) -> Path:
    """The file a ``--init`` run loads: `path` checked against the preset (every key of it
    used; only the heads the preset adds may be missing, and are reported) and rewritten as
    a bare state dict in the work dir, so that mmengine's loader never unpickles anything
    but tensors (model-zoo files carry the metadata of older toolkits)."""
    import torch

    from ..fsutil import atomic_save
    from ..model.build import build_model
    from ..model.checkpoint import load_weights, state_dict_of
    from ..safeload import load_checkpoint

    path = path.expanduser().resolve()
    if not path.is_file():
        raise UserError(f"--init {path}: file not found")
    load_weights(build_model(preset, threshold=1.0), path)  # the check (and the report of new keys)
    state = state_dict_of(load_checkpoint(path, map_location="cpu"))
    dest = work_dir / "init_weights.pth"
    atomic_save(dest, lambda f: torch.save({"state_dict": state, "meta": {"dtop_init": str(path)}}, f))
    return dest


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
    _remove_partial_writes(wd, console)
    if opts.init is not None and not opts.resume:
        load_from = _init_weights(preset, Path(opts.init), wd)
    if opts.resume:
        last = resume_from(wd, opts.resume, console)
        if last is None:  # --resume auto, nothing there yet
            opts = opts.replace(resume=False)
    if opts.resume:
        info = checkpoint_meta(last).get("dtop") or {}
        if info and (info.get("phase") != phase or info.get("preset") != preset.name):
            raise UserError(f"{last} is from a {info.get('phase')} run of preset '{info.get('preset')}', "
                            f"not {phase} of '{preset.name}': use another --work-dir")
        load_from = last
    fresh_base = phase == "base" and not opts.resume and opts.init is None
    weights = resolve_pretrained(preset, opts.pretrained, console) if fresh_base else None

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
        try:
            runner.train()
        except UserError as e:  # a damaged image/label pair, found by the data pipeline
            raise _from_data_worker(e) from None
        finally:
            progress.after_train(runner)
    stop = getattr(runner.train_loop, "stop", None)
    if stop is not None:
        raise _stopped(stop, sched.iters)
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
