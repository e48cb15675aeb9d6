"""Presets -> complete mmengine configs, and the small pieces a safe run needs.

`build_config` turns a preset and a phase ("base": threshold 1.0, every head supervised;
"prune": the base weights fine-tuned with exits on) into the whole mmengine config a run
uses: model, data, optimiser, schedule, hooks, environment. The same config is what
`dtop config` writes as a plain ``.py`` file, so mmseg's own tools/train.py and tools/test.py
run it unchanged: nothing a run needs lives only in dtop's Python code.

Checkpoints are written through `AtomicCheckpointHook`: mmengine's stock hook writes the
checkpoint and the ``last_checkpoint`` pointer in place, so a run killed at the wrong moment
leaves a truncated file that a later ``--resume`` trips over. Ours writes each file under a
temporary name and renames it into place.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from mmengine.config import Config
from mmengine.dist import is_main_process
from mmengine.hooks import CheckpointHook
from mmengine.registry import HOOKS

from .errors import UserError
from .presets import Preset, replace

PHASES = ("base", "prune")
#: Modules a config must import so that mmseg's registries know dtop's model and hooks.
CUSTOM_IMPORTS = ["dtop_cli.model", "dtop_cli.engine"]
LAST_CHECKPOINT = "last_checkpoint"


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


# --------------------------------------------------------------------------- data


def _dataset_kind(preset: Preset) -> dict[str, Any]:
    """Dataset type and the arguments the preset's type needs beyond the folders."""
    d = preset.data
    if d.dataset == "synthetic":
        # mmseg's ADE20KDataset refuses class names outside its own 150, so the demo reads
        # the same ADE20K layout through the generic dataset with its own class list.
        from .data.synthetic import CLASSES, PALETTE

        return dict(type="BaseSegDataset", img_suffix=".jpg", seg_map_suffix=".png",
                    metainfo=dict(classes=list(CLASSES), palette=[list(c) for c in PALETTE]))
    return dict(type=d.type)


def pipelines(preset: Preset) -> tuple[list[dict], list[dict]]:
    d = preset.data
    train = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations"),  # reduce_zero_label comes from the dataset
        dict(type="RandomResize", scale=tuple(d.train_scale), ratio_range=tuple(d.resize_ratio), keep_ratio=True),
        dict(type="RandomCrop", crop_size=tuple(d.crop), cat_max_ratio=d.cat_max_ratio),
        dict(type="RandomFlip", prob=0.5),
        *([dict(type="PhotoMetricDistortion")] if d.photometric else []),
        dict(type="PackSegInputs"),
    ]
    test = [
        dict(type="LoadImageFromFile"),
        dict(type="Resize", scale=tuple(d.test_scale), keep_ratio=True),
        dict(type="LoadAnnotations"),  # reduce_zero_label comes from the dataset
        dict(type="PackSegInputs"),
    ]
    return train, test


def dataset_root(preset: Preset, data_root: Union[str, Path]) -> Path:
    """Where the preset's dataset lives under ``--data-root``."""
    return Path(data_root).expanduser().resolve() / preset.data.root


def dataset_config(preset: Preset, data_root: Path, split: str, pipeline: list[dict]) -> dict:
    sp = getattr(preset.data, f"{split}_split")
    ds = dict(_dataset_kind(preset))
    ds.update(
        data_root=str(dataset_root(preset, data_root)),
        data_prefix=dict(img_path=sp.img, seg_map_path=sp.ann),
        reduce_zero_label=preset.data.reduce_zero_label,
        pipeline=pipeline,
    )
    if sp.list:
        ds["ann_file"] = sp.list
    return ds


def per_process_batch(preset: Preset, world_size: int) -> int:
    """The preset's batch is the total over all processes (the paper's 16 = 4 GPUs x 4)."""
    bs = preset.data.batch_size
    if world_size < 1 or bs % world_size:
        raise UserError(f"preset batch size {bs} cannot be split evenly over {world_size} processes; "
                        f"use a process count that divides it or --set data.batch_size=N")
    return bs // world_size


# --------------------------------------------------------------------------- config


def _model(preset: Preset, threshold: float, pretrained: Optional[str]) -> dict:
    from .model.build import model_config

    return model_config(preset, threshold=threshold, pretrained=pretrained)


def build_config(
    preset: Preset,
    phase: str,
    *,
    data_root: Union[str, Path],
    work_dir: Union[str, Path],
    max_iters: Optional[int] = None,
    threshold: Optional[float] = None,
    topk: Optional[int] = None,
    amp: bool = False,
    load_from: Optional[Union[str, Path]] = None,
    resume: bool = False,
    launcher: str = "none",
    pretrained: Optional[Union[str, Path]] = None,
    world_size: Optional[int] = None,
    cuda: Optional[bool] = None,
    seed: int = 0,
    validate: bool = True,
) -> Config:
    """The complete mmengine config of one run of ``phase`` (see the module docstring).

    ``threshold``/``topk`` override the preset's exit settings; the base phase always trains
    at threshold 1.0 (nothing exits), which is what makes it the base model. ``world_size``
    (default: $WORLD_SIZE or 1) splits the preset's total batch over processes; ``cuda``
    (default: whether CUDA is available) picks the distributed backend. ``validate`` False
    leaves out the validation loop (the demo evaluates separately, once, after training).
    """
    sched = schedule(preset, phase, max_iters)
    if topk is not None:
        if topk < 0:
            raise UserError(f"--topk must be >= 0 (got {topk})")
        preset = replace(preset, **{"exit.keep_topk": int(topk)})
    if phase == "base":
        if threshold is not None and threshold != 1.0:
            raise UserError("the base phase trains with threshold 1.0; use `dtop prune --thresh` for exits")
        thr = 1.0
    else:
        thr = preset.exit.threshold if threshold is None else float(threshold)
    if not 0.0 < thr <= 1.0:
        raise UserError(f"--thresh must be in (0, 1] (got {thr})")
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()

    train_pipeline, test_pipeline = pipelines(preset)
    workers = max(0, min(preset.data.num_workers, os.cpu_count() or 1))
    loader_common = dict(num_workers=workers, persistent_workers=workers > 0)
    train_loader = dict(
        batch_size=per_process_batch(preset, world_size),
        sampler=dict(type="InfiniteSampler", shuffle=True),
        dataset=dataset_config(preset, Path(data_root), "train", train_pipeline),
        **loader_common,
    )
    val_loader = dict(
        batch_size=1,
        sampler=dict(type="DefaultSampler", shuffle=False),
        dataset=dataset_config(preset, Path(data_root), "val", test_pipeline),
        **loader_common,
    )
    evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"])

    o = preset.optim
    head_mult = dict(lr_mult=o.head_lr_mult)
    optim_wrapper: dict[str, Any] = dict(
        type="AmpOptimWrapper" if amp else "OptimWrapper",
        optimizer=dict(type="AdamW", lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay),
        paramwise_cfg=dict(custom_keys={"decode_head": dict(head_mult), "auxiliary_head": dict(head_mult)}),
    )
    if amp:
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
    vis_backends = [dict(type="LocalVisBackend")]
    cfg = dict(
        default_scope="mmseg",
        custom_imports=dict(imports=list(CUSTOM_IMPORTS), allow_failed_imports=False),
        dtop=dict(preset=preset.name, phase=phase, threshold=thr, keep_topk=preset.exit.keep_topk),
        model=_model(preset, thr, None if pretrained is None else str(pretrained)),
        train_dataloader=train_loader,
        val_dataloader=val_loader,
        test_dataloader=val_loader,
        val_evaluator=evaluator,
        test_evaluator=evaluator,
        optim_wrapper=optim_wrapper,
        param_scheduler=param_scheduler,
        train_cfg=dict(type="IterBasedTrainLoop", max_iters=sched.iters, val_interval=sched.val_interval),
        val_cfg=dict(type="ValLoop"),
        test_cfg=dict(type="TestLoop"),
        default_hooks=default_hooks,
        log_processor=dict(by_epoch=False),
        log_level="INFO",
        vis_backends=vis_backends,
        visualizer=dict(type="SegLocalVisualizer", vis_backends=vis_backends, name="visualizer"),
        env_cfg=dict(
            cudnn_benchmark=False,
            mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
            dist_cfg=dict(backend="nccl" if cuda else "gloo"),
        ),
        randomness=dict(seed=seed),
        launcher=launcher,
        work_dir=str(Path(work_dir).expanduser().resolve()),
        load_from=None if load_from is None else str(Path(load_from).expanduser().resolve()),
        resume=bool(resume),
    )
    if launcher != "none" and not cuda:
        # mmengine hands DDP the local rank as a device id, which torch refuses for CPU modules.
        cfg["model_wrapper_cfg"] = dict(type="CPUDistributedDataParallel")
    if not validate:
        for key in ("val_dataloader", "val_evaluator", "val_cfg"):
            cfg[key] = None
    return Config(cfg)


def write_config(cfg: Config, path: Union[str, Path]) -> Path:
    """Write ``cfg`` as a plain ``.py`` config (atomically) that ``Config.fromfile`` loads."""
    path = Path(path)
    if path.suffix != ".py":
        raise UserError(f"config output must be a .py file (got {path})")
    text = cfg.pretty_text
    _atomic_write(path, text.encode())
    return path


# --------------------------------------------------------------------------- atomic files


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _is_local(path: str) -> bool:
    return "://" not in str(path)


@HOOKS.register_module()
class AtomicCheckpointHook(CheckpointHook):
    """mmengine's CheckpointHook, but no checkpoint or pointer file is ever half-written.

    Each checkpoint is saved under a hidden temporary name and renamed into place, then
    ``last_checkpoint`` is replaced the same way, and only then the oldest checkpoint beyond
    ``max_keep_ckpts`` is removed: a run killed at any instant leaves a pointer to a complete
    checkpoint. (The stock hook deletes the old checkpoint first and writes both files in
    place.) Remote ``out_dir``s fall back to the stock behaviour.
    """

    def _save_checkpoint_with_step(self, runner: Any, step: int, meta: dict) -> None:
        if not _is_local(self.out_dir):
            return super()._save_checkpoint_with_step(runner, step, meta)
        run_info = runner.cfg.get("dtop") if runner.cfg is not None else None
        if run_info is not None:  # what the weights are: `dtop eval` reads the threshold back
            meta = dict(meta, dtop=dict(run_info))
        name = self.filename_tmpl.format(step)
        final = os.path.join(self.out_dir, name)
        part = f".{name}.part"
        self.last_ckpt = final
        runner.message_hub.update_info("last_ckpt", final)

        stale: Optional[int] = None
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                stale = self.keep_ckpt_ids.popleft()
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info("keep_ckpt_ids", list(self.keep_ckpt_ids))

        tmp = os.path.join(self.out_dir, part)
        try:
            # runner.save_checkpoint writes on the main process only (master_only).
            runner.save_checkpoint(self.out_dir, part, self.file_client_args,
                                   save_optimizer=self.save_optimizer,
                                   save_param_scheduler=self.save_param_scheduler, meta=meta,
                                   by_epoch=self.by_epoch, backend_args=self.backend_args, **self.args)
            if not is_main_process():
                return
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            if is_main_process():
                Path(tmp).unlink(missing_ok=True)
            raise
        _atomic_write(Path(runner.work_dir) / LAST_CHECKPOINT, final.encode())
        if stale is not None and stale != step:
            old = os.path.join(self.out_dir, self.filename_tmpl.format(stale))
            if os.path.isfile(old):
                os.remove(old)


def latest_checkpoint(work_dir: Union[str, Path]) -> Optional[Path]:
    """The checkpoint ``--resume`` continues from: the ``last_checkpoint`` pointer if it names
    an existing file, else the newest ``iter_N.pth`` in the work dir, else None."""
    work_dir = Path(work_dir)
    pointer = work_dir / LAST_CHECKPOINT
    if pointer.is_file():
        try:
            target = Path(pointer.read_text().strip())
        except OSError:
            target = None
        if target is not None and str(target) and target.is_file():
            return target
    best: Optional[tuple[int, Path]] = None
    for p in work_dir.glob("iter_*.pth"):
        stem = p.stem.removeprefix("iter_")
        if stem.isdigit() and (best is None or int(stem) > best[0]):
            best = (int(stem), p)
    return None if best is None else best[1]



try:  # registered where mmengine looks up model wrappers; see build_config
    from mmengine.model import MMDistributedDataParallel
    from mmengine.registry import MODEL_WRAPPERS

    @MODEL_WRAPPERS.register_module(force=True)
    class CPUDistributedDataParallel(MMDistributedDataParallel):
        """mmengine's DDP wrapper for CPU processes (gloo): no device ids, unused weights allowed.

        ``find_unused_parameters`` is on because a DToP model may hold weights a phase does not
        train (e.g. the class token kept for checkpoint compatibility).
        """

        def __init__(self, module: Any, device_ids: Any = None, **kwargs: Any) -> None:
            kwargs.setdefault("find_unused_parameters", True)
            kwargs.setdefault("broadcast_buffers", False)
            super().__init__(module=module, device_ids=None, **kwargs)
except ImportError:  # pragma: no cover - mmengine without distributed support
    pass


# --------------------------------------------------------------------------- checks


def _prepare_hint(preset: Preset, data_root: Path) -> str:
    name = preset.data.dataset
    src = {"ade20k": " --src ADEChallengeData2016.zip",
           "pascal-context": " --src VOCtrainval_03-May-2010.tar --src trainval_merged.json",
           "coco-stuff10k": " --src cocostuff-10k-v1.1.zip"}.get(name, "")
    return f"`dtop prepare {name}{src} --data-root {data_root}`"


def _known_class_count(preset: Preset) -> Optional[int]:
    if preset.data.dataset == "synthetic":
        from .data.synthetic import CLASSES

        return len(CLASSES)
    try:
        from mmseg.registry import DATASETS
        from mmseg.utils import register_all_modules

        register_all_modules(init_default_scope=False)
        cls = DATASETS.get(preset.data.type)
    except Exception:  # noqa: BLE001 - an unknown type is reported by the dataset build itself
        return None
    classes = getattr(cls, "METAINFO", {}).get("classes") if cls is not None else None
    return len(classes) if classes else None


def check_dataset(preset: Preset, data_root: Union[str, Path]) -> Path:
    """Fail early, in one line, when the preset's dataset is missing or is not what it expects."""
    data_root = Path(data_root)
    root = dataset_root(preset, data_root)
    hint = _prepare_hint(preset, data_root)
    if not root.is_dir():
        raise UserError(f"dataset folder {root} not found: run {hint} first")
    known = _known_class_count(preset)
    if known is not None and known != preset.data.num_classes:
        raise UserError(f"preset '{preset.name}' has data.num_classes {preset.data.num_classes} but "
                        f"{preset.data.dataset} ({preset.data.type}) has {known} classes")
    if preset.data.dataset == "synthetic":
        from .data.synthetic import MANIFEST

        if not (root / MANIFEST).is_file():
            raise UserError(f"{root} was not made by `dtop prepare synthetic`: run {hint}")
    for split in ("train", "val"):
        sp = getattr(preset.data, f"{split}_split")
        for what, rel in (("images", sp.img), ("annotations", sp.ann), ("image list", sp.list)):
            if rel is None:
                continue
            path = root / rel
            ok = path.is_file() if what == "image list" else path.is_dir()
            if not ok:
                raise UserError(f"{split} {what} {path} not found: run {hint} first")
        ann_dir = root / sp.ann
        sample = sorted(p for p in ann_dir.iterdir() if p.suffix == ".png")[:4]
        if not sample:
            raise UserError(f"no annotations in {ann_dir}: run {hint} first")
        _check_labels(preset, sample)
    return root


def _check_labels(preset: Preset, files: list[Path]) -> None:
    """Label values beyond the preset's classes mean the folder holds another dataset."""
    import cv2
    import numpy as np

    top = preset.data.num_classes if preset.data.reduce_zero_label else preset.data.num_classes - 1
    for f in files:
        lab = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
        if lab is None:
            raise UserError(f"annotation {f} is not a readable image")
        vals = np.unique(lab)
        vals = vals[vals != 255]
        if vals.size and int(vals.max()) > top:
            raise UserError(f"annotation {f} holds label {int(vals.max())}, beyond the "
                            f"{preset.data.num_classes} "
                            f"classes of preset '{preset.name}': preset and dataset do not match")


def check_work_dir(work_dir: Union[str, Path]) -> Path:
    """Create the work dir and make sure we can write there (one line instead of a traceback later)."""
    wd = Path(work_dir).expanduser().resolve()
    try:
        wd.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".dtop-write-test-", dir=wd)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write to work dir {wd}: {e.strerror or e}") from None
    return wd


def cache_dir() -> Path:
    """Where downloaded pretrained weights live ($DTOP_CACHE, else ~/.cache/dtop)."""
    base = os.environ.get("DTOP_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                       os.path.expanduser("~/.cache"), "dtop")
    return Path(base) / "pretrained"


def resolve_pretrained(preset: Preset, pretrained: Optional[Union[str, Path]],
                       console: Any = None) -> Optional[Path]:
    """The local file of the backbone's pretrained weights: ``--pretrained``, the cache, or a
    one-time download of the preset's URL (resumable, checksum recorded)."""
    if pretrained is not None:
        p = Path(pretrained).expanduser()
        if not p.is_file():
            raise UserError(f"--pretrained {p}: file not found")
        return p.resolve()
    url = preset.model.pretrained
    if not url:
        return None
    if "://" not in url:  # a path in the preset
        p = Path(url).expanduser()
        if not p.is_file():
            raise UserError(f"preset '{preset.name}' names pretrained weights {p}, which do not exist")
        return p.resolve()
    from .data.archives import download

    dest = cache_dir()
    name = Path(url.split("?")[0]).name
    try:
        path, _ = download(url, dest, retries=2, backoff=1.0, console=console)
    except UserError as e:
        raise UserError(f"pretrained weights unavailable ({e}); download {url} and put it at "
                        f"{dest / name}, or pass --pretrained PATH") from None
    return path


# --------------------------------------------------------------------------- runs


def _register_all() -> None:
    from mmseg.utils import register_all_modules

    from . import model  # noqa: F401  (registers DToP modules)
    from .safeload import install_safe_globals

    register_all_modules(init_default_scope=False)
    install_safe_globals()


def _checkpoint_meta(path: Path) -> dict:
    from .safeload import load_checkpoint

    meta = load_checkpoint(path).get("meta")
    return meta if isinstance(meta, dict) else {}


class _Progress:
    """A rich progress bar fed by mmengine hook calls (console only; nothing in the config)."""

    def __init__(self, console: Any, title: str) -> None:
        from mmengine.hooks import Hook

        self.console = console
        self.title = title
        self.metrics: dict[str, float] = {}
        outer = self

        class _Hook(Hook):
            priority = "VERY_LOW"

            def before_train(self, runner: Any) -> None:
                outer._start(runner.max_iters, runner.iter)

            def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None,
                                 outputs: Optional[dict] = None) -> None:
                loss = None
                if outputs and "loss" in outputs:
                    loss = float(outputs["loss"].detach()) if hasattr(outputs["loss"], "detach") \
                        else float(outputs["loss"])
                outer._step(runner.iter + 1, loss)

            def after_val_epoch(self, runner: Any, metrics: Optional[dict] = None) -> None:
                outer._val(runner.iter, metrics or {})

            def after_train(self, runner: Any) -> None:
                outer._stop()

        self.hook = _Hook()
        self._progress = None

    def _start(self, total: int, done: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                  TimeRemainingColumn(), console=self.console)
        self._progress.start()
        self._task = self._progress.add_task(self.title, total=total, completed=done, info="")

    def _step(self, it: int, loss: Optional[float]) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=it, info="" if loss is None else f"loss {loss:.3f}")

    def _val(self, it: int, metrics: dict) -> None:
        self.metrics = {}
        for k, v in metrics.items():
            try:  # mmseg reports numpy scalars (float32 is not a Python float)
                self.metrics[k] = float(v)
            except (TypeError, ValueError):
                continue
        if self.console is not None and "mIoU" in self.metrics:
            self.console.print(f"{self.title}: iteration {it}: val mIoU {self.metrics['mIoU']:.2f}")

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


#: mmengine/mmseg messages that every run prints and that say nothing about the user's run;
#: kept out of the console (not out of the log file) unless ``--verbose``.
_KNOWN_NOISE = (
    "The prefix is not set in metric class",
    '"FileClient" will be deprecated',
    '"HardDiskBackend" is the alias',
)


def _not_known_noise(record: Any) -> bool:
    """Logging filter: False for the messages in ``_KNOWN_NOISE``."""
    msg = record.getMessage()
    return not any(n in msg for n in _KNOWN_NOISE)


class _LinesToLog:
    """A text stream that hands each complete line to ``logger.info`` (the log file)."""

    def __init__(self, logger: Any) -> None:
        self._logger = logger
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            if line.strip():
                self._logger.info(line)
        return len(text)

    def flush(self) -> None:
        pass


class _CurrentStderr:
    """A stream that writes to whatever ``sys.stderr`` is at the time of writing.

    MMLogger instances outlive their runs (quickstart builds two runners in one process, the
    tests many); a handler bound to one run's stderr object would write into a closed
    capture buffer later on.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _quiet_console_logs() -> None:
    """mmengine's console logs become warnings-only, on stderr; the full log stays in the work dir.

    mmengine binds its console handlers to the ``sys.stdout`` of the moment a logger is made;
    the Runner is built with stdout sent to a throw-away buffer (its environment dump, the
    config and the hook table would otherwise fill the terminal), so the handlers are pointed
    at stderr here. Every MMLogger instance is treated: mmengine's ``print_log`` writes to
    the most recent one, which need not be the runner's.
    """
    import logging

    from mmengine.logging import MMLogger

    for logger in list(MMLogger._instance_dict.values()):
        for h in logger.handlers:
            if type(h) is logging.StreamHandler:
                if not isinstance(h.stream, _CurrentStderr):
                    h.setStream(_CurrentStderr())
                h.setLevel(logging.WARNING)
                if _not_known_noise not in h.filters:
                    h.addFilter(_not_known_noise)


def _init_cpu_dist(launcher: str, cuda: bool) -> None:
    """mmengine's pytorch launcher calls torch.cuda.set_device; on CPU start gloo ourselves."""
    if launcher != "pytorch" or cuda:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")


def train(
    preset: Preset,
    phase: str,
    *,
    data_root: Union[str, Path],
    work_dir: Union[str, Path],
    base_checkpoint: Optional[Union[str, Path]] = None,
    max_iters: Optional[int] = None,
    threshold: Optional[float] = None,
    topk: Optional[int] = None,
    amp: bool = False,
    resume: bool = False,
    launcher: str = "none",
    pretrained: Optional[Union[str, Path]] = None,
    seed: int = 0,
    validate: bool = True,
    verbose: bool = False,
    console: Any = None,
) -> dict[str, Any]:
    """Run one training phase end to end and return what it produced.

    All checks that can fail on bad input run before the (slow) runner is built: dataset
    folder, work dir, checkpoint architecture, pretrained weights, device. The run writes
    checkpoints atomically; ``resume`` continues from the work dir's last complete one.
    """
    import contextlib
    import io
    import time
    import warnings

    import torch

    t0 = time.perf_counter()
    if launcher not in ("none", "pytorch", "slurm"):
        raise UserError(f"--launcher must be none, pytorch or slurm (got {launcher})")
    sched = schedule(preset, phase, max_iters)
    data_root = Path(data_root).expanduser().resolve()
    check_dataset(preset, data_root)
    wd = check_work_dir(work_dir)
    cuda = torch.cuda.is_available()
    if amp and not cuda:
        raise UserError("--amp needs a CUDA GPU (bf16 autocast); none is visible here")
    _register_all()

    load_from: Optional[Path] = None
    if phase == "prune":
        if base_checkpoint is None:
            raise UserError("the prune phase starts from a base checkpoint: pass --from CKPT")
        base = Path(base_checkpoint).expanduser().resolve()
        from .model.build import build_model
        from .model.checkpoint import load_weights

        load_weights(build_model(preset, threshold=1.0), base)  # strict: same architecture
        load_from = base
    elif base_checkpoint is not None:
        raise UserError("--from applies to `dtop prune`; the base phase trains from pretrained weights")
    if resume:
        last = latest_checkpoint(wd)
        if last is None:
            raise UserError(f"nothing to resume in {wd}: no last_checkpoint or iter_*.pth there")
        info = _checkpoint_meta(last).get("dtop") or {}
        if info and (info.get("phase") != phase or info.get("preset") != preset.name):
            raise UserError(f"{last} is from a {info.get('phase')} run of preset '{info.get('preset')}', "
                            f"not {phase} of '{preset.name}': use another --work-dir")
        load_from = last
    weights = resolve_pretrained(preset, pretrained, console) if phase == "base" and not resume else None

    cfg = build_config(preset, phase, data_root=data_root, work_dir=wd, max_iters=max_iters,
                       threshold=threshold, topk=topk, amp=amp, load_from=load_from, resume=resume,
                       launcher=launcher, pretrained=weights, cuda=cuda, seed=seed, validate=validate)
    _init_cpu_dist(launcher, cuda)
    from mmengine.runner import Runner

    progress = _Progress(console, f"{phase} {preset.name}")
    # mmengine logs to stdout; stdout belongs to --json, so everything goes to stderr, and
    # without --verbose only warnings do (the work dir's log file keeps everything).
    with contextlib.redirect_stdout(sys.stderr if verbose else io.StringIO()), warnings.catch_warnings():
        if not verbose:
            # mmseg's hook warns that it will not draw (we never ask it to); a second runner in
            # one process (quickstart) reuses mmengine's global visualizer and warns about that
            warnings.filterwarnings("ignore", message="The draw is False")
            warnings.filterwarnings("ignore", message=".*instance named of visualizer has been created")
        runner = Runner.from_cfg(cfg)
    if not verbose:
        _quiet_console_logs()
    # mmengine also print()s a few notes ("Loads checkpoint by local backend ..."): into the
    # log file unless --verbose.
    with contextlib.redirect_stdout(sys.stderr if verbose else _LinesToLog(runner.logger)):
        if is_main_process():
            runner.register_hook(progress.hook)
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
        "resumed_from": str(load_from) if resume and load_from is not None else None,
        "seconds": round(time.perf_counter() - t0, 1),
    }


# --------------------------------------------------------------------------- launching


def torchrun_command(child_args: list[str], *, gpus: int, nnodes: int = 1, node_rank: int = 0,
                     master_addr: Optional[str] = None, master_port: Optional[int] = None) -> list[str]:
    """The command that starts ``gpus`` processes per node running ``dtop <child_args>`` through
    torch's own launcher (torch.distributed.run, i.e. torchrun)."""
    if gpus < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise UserError(f"bad process layout: --gpus {gpus} --nnodes {nnodes} --node-rank {node_rank}")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}", f"--nnodes={nnodes}",
           f"--node_rank={node_rank}"]
    if master_addr:
        cmd.append(f"--master_addr={master_addr}")
    if master_port:
        cmd.append(f"--master_port={master_port}")
    elif nnodes == 1:
        cmd.append(f"--master_port={_free_port()}")
    return cmd + ["-m", "dtop_cli.cli", *child_args, "--launcher", "pytorch"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(child_args: list[str], **layout: Any) -> int:
    """Run the distributed job in the foreground; returns its exit code (0 = every rank done)."""
    import subprocess

    cmd = torchrun_command(child_args, **layout)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, layout.get("gpus", 1)))))
    return subprocess.call(cmd, env=env)
