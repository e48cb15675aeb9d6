"""The `dtop` command line: parse -> call -> render, one thin function per command.

The work lives in ``commands/``, ``runtime/`` and ``data/``; the tables in ``render.py``.
Exit codes (a contract, see the README): 0 success, 2 bad input (one line on stderr, no
traceback unless --debug), 1 any other failure. `--json` prints exactly one JSON object on
stdout; everything else goes to stderr.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from . import render
from .console import Progress
from .errors import RunStopped, UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Dynamic token pruning (DToP) for plain-ViT semantic segmentation.",
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()

PresetOpt = typer.Option(..., "--preset", "-p", help="Preset name (see `dtop presets`) or path to a YAML file.")
CkptPresetOpt = typer.Option(
    None, "--preset", "-p", help="Preset name or YAML file (default: the one the checkpoint records; needed for "
    "checkpoints of the public DToP code).")
SetOpt = typer.Option(None, "--set", help="Override a preset value: dotted.key=value (repeatable).")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object on stdout.")


def _finite(obj):
    """NaN/inf (e.g. the IoU of a class absent from a split) become null: standard JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def emit_json(obj: dict) -> None:
    """The only way a command writes its --json result: one object, one line, stdout."""
    sys.stdout.write(json.dumps(_finite(obj), allow_nan=False) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- presets / env


@app.command("presets")
def presets_cmd(as_json: bool = JsonOpt) -> None:
    """List the presets with backbone, dataset, crop, thresholds and the paper's numbers."""
    from . import presets as P

    items = [P.load_preset(n) for n in P.available()]
    if as_json:
        emit_json({"presets": [P.summary(p) for p in items]})
        return
    # Piped output (CI logs, files) gets the whole table rather than rich's 80-column default.
    (out if out.is_terminal else Console(width=max(out.width, 160))).print(render.presets_table(items))


@app.command("env")
def env_cmd(as_json: bool = JsonOpt) -> None:
    """Versions of python/torch/mmcv/mmseg/mmengine and the CUDA devices: paste into bug reports."""
    from .envinfo import collect

    info = collect()
    if as_json:
        emit_json(info)
        return
    out.print(render.key_value_table("dtop env", info))


# --------------------------------------------------------------------------- prepare


@app.command("prepare")
def prepare_cmd(
    dataset: str = typer.Argument(
        ..., metavar="DATASET", help="ade20k, pascal-context, coco-stuff10k or synthetic."
    ),
    src: Optional[List[Path]] = typer.Option(
        None, "--src", help="Official archive or its extracted folder (repeatable; pascal-context: "
        "the VOC2010 tar and trainval_merged.json)."),
    data_root: Path = typer.Option(
        Path("data"), "--data-root", help="Folder the presets read datasets from."),
    download: Optional[bool] = typer.Option(
        None, "--download/--no-download", help="Without --src: the official files are taken from the current "
        "directory or DATA_ROOT/downloads, else downloaded there (resuming a partial file). --download always "
        "fetches; --no-download never touches the network.", show_default=False),
    sha256: Optional[List[str]] = typer.Option(
        None, "--sha256", help="Expected SHA-256 of each input, in order (repeatable)."),
    url: Optional[List[str]] = typer.Option(
        None, "--url", help="Download from this mirror instead of the official URL (repeatable, same order)."),
    verify: bool = typer.Option(
        False, "--verify", help="Check an existing dataset: pairs per split vs the official counts, "
        "sizes, label values. Exit 1 on problems."),
    allow_partial: bool = typer.Option(
        False, "--allow-partial", help="With --verify: a pair count that differs from the official one "
        "is a warning, not a problem (deliberate subsets)."),
    workers: int = typer.Option(0, "--workers", help="Processes for conversion and checks (0: all cores)."),
    seed: int = typer.Option(0, "--seed", help="synthetic only: random seed of the generated data."),
    force: bool = typer.Option(
        False, "--force", help="synthetic only: replace a generated set made with other settings."),
    as_json: bool = JsonOpt,
) -> None:
    """Turn the files the dataset authors publish into the folders the presets read, safely."""
    from .data import prepare_dataset, verify_dataset

    if verify:
        if src or download or sha256 or url:
            raise UserError(
                "--verify checks an existing dataset: it takes no --src, --download, --sha256 or --url")
        rep = verify_dataset(dataset, data_root, workers=workers, allow_partial=allow_partial, console=err)
        if as_json:
            emit_json(rep)
        else:
            out.print(render.splits_table(f"verify {dataset}: {rep['root']}", rep["splits"]))
            for w in rep["warnings"]:
                out.print(f"[yellow]warning:[/] {w}", highlight=False)
            for p in rep["problems"][:20]:
                out.print(f"[red]problem:[/] {p}", highlight=False)
            if len(rep["problems"]) > 20:
                out.print(f"... and {len(rep['problems']) - 20} more problems", highlight=False)
            if any("the official dataset has" in p for p in rep["problems"]):
                out.print("(a deliberate subset? add --allow-partial to treat pair counts as warnings)")
            out.print("[green]ok[/]" if rep["ok"] else f"[red]{len(rep['problems'])} problem(s)[/]")
        if not rep["ok"]:
            raise typer.Exit(1)
        return
    res = prepare_dataset(dataset, src or [], data_root, download=download, sha256=sha256 or [],
                          urls=url or [], workers=workers, seed=seed, force=force, console=err)
    _next_step(_train_hint(dataset, data_root))
    if as_json:
        emit_json(res)
        return
    splits = res.get("splits")
    if isinstance(splits, dict) and all(isinstance(v, dict) for v in splits.values()):
        out.print(render.splits_table(f"{dataset}: {res.get('root', '')} ({res.get('status', 'prepared')}, "
                                      f"{res.get('classes_seen', '?')} classes seen)", splits))
        for w in res.get("warnings", []):
            out.print(f"[yellow]warning:[/] {w}", highlight=False)
    else:  # the synthetic demo reports its own keys
        out.print(render.key_value_table(f"dtop prepare {dataset}", res))


# --------------------------------------------------------------------------- train / prune / eval / config

DataRootOpt = typer.Option(Path("data"), "--data-root", help="Folder the presets read datasets from.")
WorkDirOpt = typer.Option(None, "--work-dir",
                          help="Checkpoints and logs (default: work_dirs/<preset>/<phase>).")
GpusOpt = typer.Option(1, "--gpus", help="Processes per node (one per GPU), started through torchrun.")
NnodesOpt = typer.Option(1, "--nnodes", help="Machines taking part (torchrun --nnodes).")
NodeRankOpt = typer.Option(0, "--node-rank", help="This machine's rank among --nnodes.")
MasterAddrOpt = typer.Option(None, "--master-addr", help="Address of the rank-0 machine (several machines).")
MasterPortOpt = typer.Option(None, "--master-port", help="Port on the rank-0 machine (default: a free one).")
LauncherOpt = typer.Option("none", "--launcher",
                           help="none, pytorch (set for you by --gpus) or slurm (under srun).")
AmpOpt = typer.Option(False, "--amp", help="bf16 autocast (CUDA only).")
ResumeOpt = typer.Option(
    False, "--resume", help="Continue from the work dir's newest readable checkpoint (an unreadable newer one is "
    "named and set aside). `--resume auto`: continue if there is a checkpoint, else start (for requeued jobs).")
ResumeAutoOpt = typer.Option(False, "--resume-auto", hidden=True, help="Same as `--resume auto`.")
MaxItersOpt = typer.Option(None, "--max-iters",
                           help="Shorten the schedule (warm-up and poly horizon scale along).")
PretrainedOpt = typer.Option(None, "--pretrained",
                             help="Local pretrained ViT weights instead of the preset's URL.")
SeedOpt = typer.Option(0, "--seed", help="Random seed.")
VerboseOpt = typer.Option(False, "--verbose", help="Show mmengine's full log on stderr.")
LogToOpt = typer.Option(None, "--log-to", help="Also log to tensorboard and/or wandb (comma list; the "
                        "local scalars.json is always written). Needs pip install 'dtop[tensorboard]' / "
                        "'dtop[wandb]'.")
WandbProjectOpt = typer.Option(None, "--wandb-project", help="W&B project (default: $WANDB_PROJECT, else dtop).")
WandbNameOpt = typer.Option(None, "--wandb-name", help="W&B run name (default: $WANDB_NAME, else <preset>-<phase>).")
DeviceOpt = typer.Option(None, "--device", help="cpu or cuda (default: cuda when present).")
CkptDataRootOpt = typer.Option(
    None, "--data-root", help="Folder the presets read datasets from (default: the one the checkpoint was trained "
    "on, else data).")
DEFAULT_DATA_ROOT = Path("data")


def _next_step(command: str) -> None:
    """The next command of the workflow, on stderr (stdout may carry --json)."""
    err.print(f"next: [bold]{command}[/]", highlight=False, soft_wrap=True)


def _data_root_flag(data_root: Path) -> str:
    return "" if Path(data_root) == DEFAULT_DATA_ROOT else f" --data-root {data_root}"


def _train_hint(dataset: str, data_root: Path) -> str:
    """`dtop train` for the presets that read ``dataset``."""
    from . import presets as P

    presets = {n: P.load_preset(n) for n in P.available()}
    names = [n for n, p in presets.items() if p.data.dataset == dataset]
    # the paper's own model (ATM head) is what one trains; the model-zoo presets (SETR,
    # Segmenter) start from published weights and come after it. The larger model of a
    # dataset sorts last.
    trained = [n for n in names if presets[n].model.head.type == "atm"] or names
    first = trained[-1] if trained else "NAME"
    more = f" (or: {', '.join(n for n in names if n != first)})" if len(names) > 1 else ""
    return f"dtop train --preset {first}{_data_root_flag(data_root)}{more}"


def _with_checkpoint(preset: Optional[str], overrides: Optional[List[str]], ckpt: Optional[Path],
                     data_root: Optional[Path]):
    """(preset, data root) of a command that takes a checkpoint: the preset the checkpoint
    records unless --preset is given (see runtime.checkpoints.resolve_preset); the data root
    given, else the one the checkpoint was trained on if it still exists, else data/."""
    from .runtime.checkpoints import resolve_preset, run_info

    p = resolve_preset(preset, overrides, ckpt)
    if data_root is None:
        recorded = run_info(ckpt).get("data_root") if ckpt is not None else None
        data_root = Path(recorded) if recorded and Path(recorded).is_dir() else DEFAULT_DATA_ROOT
    return p, data_root


def _child_args(command: str, preset: Optional[str], overrides: Optional[List[str]], opts,
                as_json: bool) -> list[str]:
    """The same command for each torchrun worker, with the options it was given."""
    from .presets import format_threshold

    child = [command, "--data-root", str(opts.data_root), "--work-dir", str(opts.work_dir), "--seed", str(opts.seed)]
    if preset is not None:
        child += ["--preset", preset]
    for o in overrides or []:
        child += ["--set", o]
    if opts.resume:
        child += ["--resume", "auto"] if opts.resume == "auto" else ["--resume"]
    for flag, on in (("--amp", opts.amp), ("--verbose", opts.verbose), ("--json", as_json)):
        if on:
            child.append(flag)
    if opts.log_to:
        child += ["--log-to", ",".join(opts.log_to)]
    for flag, val in (("--max-iters", opts.max_iters), ("--pretrained", opts.pretrained), ("--init", opts.init),
                      ("--from", opts.base_checkpoint), ("--thresh", opts.threshold), ("--topk", opts.topk),
                      ("--wandb-project", opts.wandb_project), ("--wandb-name", opts.wandb_name)):
        if val is not None:
            child += [flag, format_threshold(val) if flag == "--thresh" else str(val)]
    return child


def _read_status(path: Path) -> Optional[dict]:
    """What rank 0 of a torchrun job wrote when it stopped on purpose (see :func:`main`)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "message" in data and "exit_code" in data else None


def _run_phase(command: str, preset: Optional[str], overrides: Optional[List[str]], opts, layout: dict,
               as_json: bool) -> None:
    """Shared body of `train` and `prune`: one process here, or N through torchrun."""
    from .data.mmseg import check_dataset
    from .fsutil import check_work_dir
    from .runtime.launch import is_rank0, launch
    from .runtime.train import train

    opts = opts.checked()
    p, data_root = _with_checkpoint(preset, overrides, opts.base_checkpoint, opts.data_root)
    opts = opts.replace(work_dir=opts.resolved_work_dir(p), data_root=data_root)
    if "tensorboard" in opts.log_to and "LOCAL_RANK" not in os.environ and is_rank0():
        # once per job (not again in each torchrun worker), before the long part starts
        err.print(f"watch it: tensorboard --logdir {opts.work_dir}", highlight=False, soft_wrap=True)
    if layout["gpus"] > 1 or layout["nnodes"] > 1:
        if opts.launcher != "none":
            raise UserError("--gpus/--nnodes start their own processes; do not combine them with --launcher")
        check_dataset(p, opts.data_root)
        wd = check_work_dir(opts.work_dir)
        status = wd / f".dtop-status-{os.getpid()}.json"
        try:
            rc = launch(_child_args(command, preset, overrides, opts, as_json), status_file=status, **layout)
            stopped = _read_status(status)
        finally:
            status.unlink(missing_ok=True)
        if stopped is not None:  # rank 0 stopped on purpose: its line and exit code
            raise RunStopped(stopped["message"], exit_code=int(stopped["exit_code"]))
        if rc != 0:
            err.print(f"[bold red]error:[/] distributed run failed (exit code {rc})")
        raise typer.Exit(0 if rc == 0 else 1)
    res = train(p, opts, console=err)
    if not is_rank0():
        return
    if res["checkpoint"]:
        from .runtime.checkpoints import newest_checkpoint

        ckpt = Path(res["checkpoint"])
        if command == "train":
            _next_step(f"dtop prune --from {ckpt}")
        else:  # plain `dtop eval` picks the newest checkpoint under ./work_dirs: is it this one?
            found = newest_checkpoint()
            _next_step("dtop eval --flops" if found is not None and found.resolve() == ckpt.resolve()
                       else f"dtop eval --ckpt {ckpt} --flops")
    if as_json:
        emit_json(res)
        return
    out.print(render.train_table(command, p.name, res))


@app.command("train")
def train_cmd(
    preset: str = PresetOpt,
    data_root: Path = DataRootOpt,
    work_dir: Optional[Path] = WorkDirOpt,
    gpus: int = GpusOpt,
    nnodes: int = NnodesOpt,
    node_rank: int = NodeRankOpt,
    master_addr: Optional[str] = MasterAddrOpt,
    master_port: Optional[int] = MasterPortOpt,
    launcher: str = LauncherOpt,
    amp: bool = AmpOpt,
    resume: bool = ResumeOpt,
    resume_auto: bool = ResumeAutoOpt,
    max_iters: Optional[int] = MaxItersOpt,
    pretrained: Optional[Path] = PretrainedOpt,
    init: Optional[Path] = typer.Option(
        None, "--init", help="Start from a trained model file (e.g. an mmseg model-zoo checkpoint) instead of "
        "pretrained backbone weights; heads the preset adds start fresh, parts in schedule.base.frozen stay fixed."),
    seed: int = SeedOpt,
    verbose: bool = VerboseOpt,
    log_to: Optional[str] = LogToOpt,
    wandb_project: Optional[str] = WandbProjectOpt,
    wandb_name: Optional[str] = WandbNameOpt,
    overrides: Optional[List[str]] = SetOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Base training (threshold 1.0: nothing exits, every head is supervised)."""
    from .runtime.config import RunOptions
    from .runtime.tracking import parse_log_to

    opts = RunOptions("base", data_root=data_root, work_dir=work_dir, max_iters=max_iters, amp=amp,
                      resume="auto" if resume_auto else resume, launcher=launcher, pretrained=pretrained, seed=seed,
                      verbose=verbose, log_to=parse_log_to(log_to), wandb_project=wandb_project,
                      wandb_name=wandb_name, init=init)
    _run_phase("train", preset, overrides, opts, dict(gpus=gpus, nnodes=nnodes, node_rank=node_rank,
                                                      master_addr=master_addr, master_port=master_port), as_json)


@app.command("prune")
def prune_cmd(
    from_ckpt: Path = typer.Option(..., "--from", help="Base checkpoint to fine-tune with exits on."),
    preset: Optional[str] = CkptPresetOpt,
    thresh: Optional[str] = typer.Option(None, "--thresh", help="Exit threshold: 0.9, or one per non-final stage, 0.97,0.9 (default: the preset's)."),
    topk: Optional[int] = typer.Option(None, "--topk",
                                       help="Tokens kept per class for context (default: the preset's)."),
    data_root: Optional[Path] = CkptDataRootOpt,
    work_dir: Optional[Path] = WorkDirOpt,
    gpus: int = GpusOpt,
    nnodes: int = NnodesOpt,
    node_rank: int = NodeRankOpt,
    master_addr: Optional[str] = MasterAddrOpt,
    master_port: Optional[int] = MasterPortOpt,
    launcher: str = LauncherOpt,
    amp: bool = AmpOpt,
    resume: bool = ResumeOpt,
    resume_auto: bool = ResumeAutoOpt,
    max_iters: Optional[int] = MaxItersOpt,
    seed: int = SeedOpt,
    verbose: bool = VerboseOpt,
    log_to: Optional[str] = LogToOpt,
    wandb_project: Optional[str] = WandbProjectOpt,
    wandb_name: Optional[str] = WandbNameOpt,
    overrides: Optional[List[str]] = SetOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Pruned fine-tuning: load a base checkpoint (strictly), switch exits on, train the prune schedule."""
    from .runtime.config import RunOptions
    from .runtime.tracking import parse_log_to

    opts = RunOptions("prune", data_root=data_root, work_dir=work_dir, base_checkpoint=from_ckpt,
                      max_iters=max_iters, threshold=thresh, topk=topk, amp=amp,
                      resume="auto" if resume_auto else resume,
                      launcher=launcher, seed=seed, verbose=verbose, log_to=parse_log_to(log_to),
                      wandb_project=wandb_project, wandb_name=wandb_name)
    _run_phase("prune", preset, overrides, opts, dict(gpus=gpus, nnodes=nnodes, node_rank=node_rank,
                                                      master_addr=master_addr, master_port=master_port), as_json)


@app.command("eval")
def eval_cmd(
    ckpt: Optional[Path] = typer.Option(
        None, "--ckpt", help="Checkpoint to evaluate, dtop's or the public code's (default: the newest under "
        "work_dirs/, a prune run before a base run of the same preset)."),
    preset: Optional[str] = CkptPresetOpt,
    thresh: Optional[str] = typer.Option(
        None, "--thresh", help="Exit threshold: 0.9, or one per non-final stage, 0.97,0.9 (default: the checkpoint's, else the preset's; 1.0 = base)."),
    flops: bool = typer.Option(
        False, "--flops", help="Also GFLOPs per image (paper convention: one crop-size window; and the test "
        "protocol's total) and the share of tokens each stage finalised."),
    per_class: bool = typer.Option(False, "--per-class", help="IoU of every class."),
    stages: bool = typer.Option(False, "--stages", help="Also score each head on its own (per-stage mIoU)."),
    images: Optional[int] = typer.Option(None, "--images",
                                         help="Evaluate the first N validation images only."),
    device: Optional[str] = DeviceOpt,
    data_root: Optional[Path] = CkptDataRootOpt,
    gpus: int = GpusOpt,
    nnodes: int = NnodesOpt,
    node_rank: int = NodeRankOpt,
    master_addr: Optional[str] = MasterAddrOpt,
    master_port: Optional[int] = MasterPortOpt,
    launcher: str = LauncherOpt,
    overrides: Optional[List[str]] = SetOpt,
    as_json: bool = JsonOpt,
) -> None:
    """mIoU / aAcc on the validation split by the preset's test protocol."""
    from .commands.evaluate import evaluate
    from .runtime.checkpoints import newest_checkpoint
    from .runtime.launch import init_distributed, is_rank0, launch

    if ckpt is None:
        ckpt = newest_checkpoint()
        if ckpt is None:
            raise UserError("no checkpoint under work_dirs/: make one with `dtop train --preset NAME` (and "
                            "`dtop prune --from CKPT`), or pass --ckpt")
        err.print(f"evaluating {ckpt} (the newest checkpoint under work_dirs/)", highlight=False, soft_wrap=True)
    p, data_root = _with_checkpoint(preset, overrides, ckpt, data_root)
    if gpus > 1 or nnodes > 1:
        if launcher != "none":
            raise UserError("--gpus/--nnodes start their own processes; do not combine them with --launcher")
        child = ["eval", "--ckpt", str(ckpt), "--data-root", str(data_root)]
        for flag, val in (("--preset", preset), ("--thresh", thresh), ("--images", images), ("--device", device)):
            if val is not None:
                child += [flag, str(val)]
        for flag, on in (("--flops", flops), ("--per-class", per_class), ("--stages", stages), ("--json", as_json)):
            if on:
                child.append(flag)
        for o in overrides or []:
            child += ["--set", o]
        rc = launch(child, gpus=gpus, nnodes=nnodes, node_rank=node_rank, master_addr=master_addr,
                    master_port=master_port)
        if rc != 0:
            err.print(f"[bold red]error:[/] distributed evaluation failed (exit code {rc})")
        raise typer.Exit(0 if rc == 0 else 1)
    device = init_distributed(launcher, device)
    with Progress(f"eval {ckpt.name}", console=err, transient=True, enabled=is_rank0()) as bar:
        res = evaluate(p, ckpt, data_root=data_root, threshold=thresh, flops=flops, per_class=per_class,
                       stage_miou=stages, images=images, device=device, progress=bar)
    if not is_rank0():
        return
    if as_json:
        emit_json(res)
        return
    for t in render.eval_tables(p.name, ckpt, res):
        out.print(t)


@app.command("flops")
def flops_cmd(
    preset: Optional[str] = CkptPresetOpt,
    ckpt: Optional[Path] = typer.Option(
        None, "--ckpt", help="Trained checkpoint: average the dynamic cost over validation images "
        "(without: one crop-size image, nothing exits)."),
    thresh: Optional[str] = typer.Option(
        None, "--thresh", help="Exit threshold, 0.9 or 0.97,0.9 (default: without --ckpt 1.0, the base model; with it the "
        "checkpoint's, else the preset's)."),
    images: Optional[int] = typer.Option(
        None, "--images", help="With --ckpt: the first N validation images (default all)."),
    shape: Optional[tuple[int, int]] = typer.Option(
        None, "--shape", help="Without --ckpt: image size H W (default: the preset's crop)."),
    device: Optional[str] = DeviceOpt,
    data_root: Optional[Path] = CkptDataRootOpt,
    overrides: Optional[List[str]] = SetOpt,
    as_json: bool = JsonOpt,
) -> None:
    """GFLOPs per image in the paper's convention (fvcore counting, one crop-size image)."""
    from .commands.flops import flops_report

    p, data_root = _with_checkpoint(preset, overrides, ckpt, data_root)
    with Progress("flops", console=err, transient=True, enabled=ckpt is not None) as bar:
        res = flops_report(p, ckpt, threshold=thresh, images=images, shape=shape, data_root=data_root,
                           device=device, progress=bar)
    if as_json:
        emit_json(res)
        return
    out.print(render.flops_table(res))


@app.command("bench")
def bench_cmd(
    preset: Optional[str] = typer.Option(
        None, "--preset", "-p", help="Preset name or YAML file (default with --ckpt: the one it records)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    batch: int = typer.Option(1, "--batch", help="Images per forward."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, bf16 or fp16 (weights and inputs)."),
    exits: Optional[str] = typer.Option(
        None, "--exits", help="F1,F2: share of all tokens retired after stage 1 and by the end of stage 2 "
        "(cumulative), forced at random positions. Without it: the real exit rule of --ckpt."),
    ckpt: Optional[Path] = typer.Option(None, "--ckpt", help="Trained checkpoint (default: random weights)."),
    thresh: Optional[str] = typer.Option(
        None, "--thresh", help="With --ckpt and no --exits: exit threshold, 0.9 or 0.97,0.9 (default: the checkpoint's)."),
    data_root: Optional[Path] = typer.Option(
        None, "--data-root", help="Time on the preset's validation images under this folder (default: random "
        "inputs)."),
    repeats: int = typer.Option(10, "--repeats", help="Timed runs of each model (interleaved)."),
    warmup: int = typer.Option(2, "--warmup", help="Untimed runs of each model first."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads torch may use."),
    graphs: str = typer.Option("auto", "--graphs", help="CUDA graphs for both models: auto (on with cuda), on, off."),
    bucket: int = typer.Option(16, "--bucket", help="With graphs: token counts padded to a multiple of this."),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Also measure peak memory of both."),
    overrides: Optional[List[str]] = SetOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Wall-clock dense vs pruned on the same inputs: median times, their ratio, FLOP ratio, memory."""
    from .commands.bench import BenchOptions, run_bench

    if preset is None and ckpt is None:
        raise UserError("give --preset (random weights) or --ckpt (a trained model)")
    p, _ = _with_checkpoint(preset, overrides, ckpt, data_root)
    opts = BenchOptions(p, device=device, batch=batch, dtype=dtype, exits=exits, ckpt=ckpt, thresh=thresh,
                        repeats=repeats, warmup=warmup, data_root=data_root, threads=threads, graphs=graphs,
                        bucket=bucket, memory=memory)
    res = run_bench(opts, log=lambda msg: err.print(f"[dim]bench:[/] {msg}", highlight=False))
    if as_json:
        emit_json(res)
        return
    out.print(render.bench_table(res))


@app.command("config")
def config_cmd(
    preset: str = PresetOpt,
    phase: str = typer.Option("base", "--phase", help="base or prune."),
    out_file: Optional[Path] = typer.Option(None, "--out",
                                            help="Write the .py config here (default: stdout)."),
    data_root: Path = DataRootOpt,
    work_dir: Optional[Path] = WorkDirOpt,
    from_ckpt: Optional[Path] = typer.Option(None, "--from", help="prune: the base checkpoint (load_from)."),
    thresh: Optional[str] = typer.Option(None, "--thresh", help="prune: exit threshold, 0.9 or 0.97,0.9."),
    topk: Optional[int] = typer.Option(None, "--topk", help="prune: tokens kept per class."),
    max_iters: Optional[int] = MaxItersOpt,
    gpus: int = typer.Option(1, "--gpus", help="Total processes the batch is split over."),
    overrides: Optional[List[str]] = SetOpt,
) -> None:
    """The complete mmengine config a run would use, loadable by mmseg's own tools/train.py."""
    from .presets import load_preset
    from .runtime.config import RunOptions, build_config, write_config

    p = load_preset(preset, overrides)
    opts = RunOptions(phase, data_root=data_root, work_dir=work_dir, max_iters=max_iters, threshold=thresh,
                      topk=topk, launcher="pytorch" if gpus > 1 else "none")
    cfg = build_config(p, opts, load_from=from_ckpt, world_size=gpus)
    if out_file is None:
        sys.stdout.write(cfg.pretty_text)
        return
    write_config(cfg, out_file)
    err.print(f"wrote {out_file}")


@app.command("quickstart")
def quickstart_cmd(
    work_dir: Path = typer.Option(Path("work_dirs/quickstart"), "--work-dir",
                                  help="Data, checkpoints, summary.json."),
    seed: int = SeedOpt,
    base_iters: Optional[int] = typer.Option(None, "--base-iters",
                                             help="Shorten base training (smoke runs)."),
    prune_iters: Optional[int] = typer.Option(None, "--prune-iters",
                                              help="Shorten pruned fine-tuning (smoke runs)."),
    pretrain: bool = typer.Option(False, "--pretrain",
                                  help="Pretrain the backbone here instead of starting from the shipped file "
                                       "(presets/weights; adds minutes)."),
    pretrain_iters: Optional[int] = typer.Option(None, "--pretrain-iters",
                                                 help="Pretrain here for this many iterations (implies --pretrain)."),
    n_train: Optional[int] = typer.Option(None, "--train-images",
                                          help="Smaller synthetic training set (smoke runs)."),
    n_val: Optional[int] = typer.Option(None, "--val-images",
                                        help="Smaller synthetic validation set (smoke runs)."),
    as_json: bool = JsonOpt,
) -> None:
    """The embedded demo end to end: prepare synthetic, train from the demo backbone, prune, eval --flops of both."""
    from .commands.quickstart import quickstart

    s = quickstart(work_dir, seed=seed, base_iters=base_iters, prune_iters=prune_iters,
                   pretrain_iters=pretrain_iters, n_train=n_train, n_val=n_val, pretrain=pretrain, console=err)
    if as_json:
        emit_json(s)
        return
    out.print(render.quickstart_table(s))
    out.print(f"summary: {Path(s['work_dir']) / 'summary.json'}")


# --------------------------------------------------------------------------- infer / sweep


@app.command("infer")
def infer_cmd(
    images: List[str] = typer.Argument(..., metavar="IMAGE...", help="Image files, folders or glob patterns."),
    preset: Optional[str] = CkptPresetOpt,
    ckpt: Path = typer.Option(..., "--ckpt", help="Checkpoint (dtop's or the public code's layout)."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for NAME_{labels,overlay,exits,panel}.png."),
    thresh: Optional[str] = typer.Option(None, "--thresh", help="Exit threshold: 0.9, or one per non-final stage, 0.97,0.9 (default: the checkpoint's, else the preset's; 1.0 = base)."),
    device: Optional[str] = DeviceOpt,
    overrides: Optional[List[str]] = SetOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Label maps, overlays and exit-stage maps; one JSON line per image on stdout (--json: one object)."""
    from . import api
    from .commands.infer import run_infer
    from .presets import check_threshold

    p, _ = _with_checkpoint(preset, overrides, ckpt, DEFAULT_DATA_ROOT)
    if thresh is not None:
        check_threshold(thresh)

    with Progress("infer", console=err, transient=True) as bar:
        def line(rec: dict) -> None:
            if not as_json:
                err.print(f"{rec['image']} -> {Path(rec['outputs']['panel']).name}", highlight=False,
                          soft_wrap=True)
                emit_json(rec)

        def skipped(name: str, why: str) -> None:
            err.print(f"[yellow]skipped[/] {name}: {why}", highlight=False, soft_wrap=True)

        res = run_infer(images, p, ckpt, out_dir, threshold=thresh, device=api.resolve_device(device),
                        on_result=line, on_skip=skipped, progress=bar)
    if as_json:
        emit_json(res)
    else:
        err.print(f"{len(res['images'])} image(s) -> {res['out']}" +
                  (f", {len(res['skipped'])} skipped" if res["skipped"] else ""))


@app.command("curves")
def curves_cmd(
    work_dir: Path = typer.Argument(..., help="Work dir of a train/prune run, or a folder of them "
                                    "(e.g. the quickstart's)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for the PNGs (default: WORK_DIR/curves)."),
    as_json: bool = JsonOpt,
) -> None:
    """Pictures of a run's logged scalars: loss per head, learning rate, validation mIoU and, for
    prune runs, exit shares and GFLOPs ratio over iterations. Works while the run is going."""
    from .commands.curves import draw_curves

    res = draw_curves(work_dir, out_dir)
    if as_json:
        emit_json(res)
        return
    for path in res["pictures"]:
        out.print(path, highlight=False, soft_wrap=True)


@app.command("sweep")
def sweep_cmd(
    preset: Optional[str] = CkptPresetOpt,
    ckpt: Path = typer.Option(..., "--ckpt", help="Checkpoint to sweep (one model, threshold changed in place)."),
    thresholds: str = typer.Option("0.8,0.85,0.9,0.95,1.0", "--thresholds", help="Comma-separated exit thresholds in (0, 1]."),
    images: Optional[int] = typer.Option(None, "--images", help="The first N validation images only (default all)."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for sweep.csv and sweep.png."),
    per_stage: bool = typer.Option(False, "--per-stage", help="Every combination of the thresholds over the "
                                   "non-final stages (e.g. 0.9,1.0 -> 1.0 | 1,0.9 | 0.9,1 | 0.9)."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="calibration.json of `dtop calibrate`: "
                                               "mark its point on the plot."),
    data_root: Optional[Path] = CkptDataRootOpt,
    device: Optional[str] = DeviceOpt,
    overrides: Optional[List[str]] = SetOpt,
    as_json: bool = JsonOpt,
) -> None:
    """mIoU against GFLOPs over exit thresholds: CSV, PNG plot and a table."""
    from . import api
    from .commands.sweep import parse_thresholds, run_sweep

    ts = parse_thresholds(thresholds)
    p, data_root = _with_checkpoint(preset, overrides, ckpt, data_root)
    with Progress("sweep", console=err, transient=True) as bar:
        res = run_sweep(p, ckpt, ts, data_root, out_dir, images=images, progress=bar,
                        device=api.resolve_device(device), per_stage=per_stage, calibration=calibration)
    if as_json:
        emit_json(res)
        return
    out.print(render.sweep_table(p.name, ckpt, res))
    out.print(f"wrote {res['csv']} and {res['plot']}", highlight=False, soft_wrap=True)


@app.command("calibrate")
def calibrate_cmd(
    ckpt: Path = typer.Option(..., "--ckpt", help="Checkpoint to calibrate (a pruned one, usually)."),
    target_gflops: Optional[float] = typer.Option(
        None, "--target-gflops", help="Budget: average GFLOPs per image (paper convention) at most G."),
    target_ratio: Optional[float] = typer.Option(
        None, "--target-ratio", help="Budget: average GFLOPs at most R times the same model's at threshold 1.0."),
    target_ms: Optional[float] = typer.Option(
        None, "--target-ms", help="Budget: wall time of one batch at most T ms (dtop bench's method; "
        "--device, --batch, --dtype)."),
    images: int = typer.Option(200, "--images", help="Calibrate on the first N validation images."),
    per_stage: bool = typer.Option(False, "--per-stage", help="One threshold per non-final stage (coordinate "
                                   "search from the best single threshold)."),
    max_evals: int = typer.Option(30, "--max-evals", help="At most this many candidates evaluated."),
    apply: bool = typer.Option(False, "--apply", help="Also write CKPT_STEM.calibrated.pth: the checkpoint with "
                               "the calibrated threshold in its meta (eval/infer use it by default)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for calibration.json (and the calibrated "
                                           "checkpoint); default: the checkpoint's folder."),
    device: Optional[str] = DeviceOpt,
    batch: int = typer.Option(1, "--batch", help="--target-ms: images per timed forward."),
    dtype: str = typer.Option("fp32", "--dtype", help="--target-ms: fp32, bf16 or fp16."),
    repeats: int = typer.Option(5, "--repeats", help="--target-ms: timed runs per candidate."),
    preset: Optional[str] = CkptPresetOpt,
    data_root: Optional[Path] = CkptDataRootOpt,
    overrides: Optional[List[str]] = SetOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Best mIoU within a cost budget: searches the exit threshold(s), writes calibration.json."""
    from .commands.calibrate import CalibrateOptions, calibrate, target_from_options

    target = target_from_options(target_gflops, target_ratio, target_ms)
    if target.kind != "ms" and (batch != 1 or dtype != "fp32"):
        raise UserError("--batch and --dtype shape the timing of --target-ms; GFLOPs budgets take neither")
    if images < 1:
        raise UserError(f"--images must be a positive integer (got {images})")
    p, data_root = _with_checkpoint(preset, overrides, ckpt, data_root)
    opts = CalibrateOptions(target, images=images, per_stage=per_stage, max_evals=max_evals, apply=apply,
                            out_dir=out_dir, device=device, batch=batch, dtype=dtype, repeats=repeats)
    with Progress("calibrate: reading images", console=err, transient=True) as bar:
        res = calibrate(p, ckpt, data_root, opts, progress=bar,
                        log=lambda msg: err.print(f"[dim]calibrate:[/] {msg}", highlight=False, soft_wrap=True))
    if as_json:
        emit_json(res)
        return
    out.print(render.calibrate_table(res))
    out.print(render.calibrate_summary(res), highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------- entry point

def _normalize_resume(args: list[str]) -> list[str]:
    """``--resume auto`` / ``--resume=auto`` -> ``--resume-auto``: ``--resume`` stays a flag
    (typer options cannot take an optional value) and ``auto`` is never a positional of
    train or prune."""
    out: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--resume=auto" or (a == "--resume" and i + 1 < len(args) and args[i + 1] == "auto"):
            out.append("--resume-auto")
            i += 1 if a == "--resume=auto" else 2
            continue
        out.append(a)
        i += 1
    return out


def _report_stop(e: RunStopped) -> None:
    """One line from the first process (all of them stop together). A torchrun worker writes
    it to the status file instead: its launcher prints it and exits with its code."""
    from .runtime.launch import STATUS_FILE_ENV, is_rank0

    if not is_rank0():
        return
    path = os.environ.get(STATUS_FILE_ENV)
    if path:
        from .fsutil import atomic_write

        atomic_write(path, json.dumps({"message": str(e), "exit_code": e.exit_code}).encode())
        return
    err.print(f"[bold red]stopped:[/] {e}", highlight=False, soft_wrap=True)


def main(argv: Optional[List[str]] = None) -> None:
    """Console-script entry: maps UserError to exit 2 with one line, other errors to 1, a run
    stopped on purpose (RunStopped) to its own code."""
    # OpenMP threads that spin while waiting make torch on a busy small CPU (data workers,
    # other jobs) many times slower; idle threads must sleep. Read once, when torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:  # recent typer carries its own copy of click and no longer depends on the package
        from typer._click.exceptions import ClickException
    except ImportError:  # older typer, built on the click package
        from click.exceptions import ClickException

    args = _normalize_resume(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    try:
        rv = app(args=args, prog_name="dtop", standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except ClickException as e:
        e.show()
        sys.exit(2)
    except UserError as e:
        if debug:
            raise
        # the message is plain text: brackets in it (pip extras, lists) are not markup
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except RunStopped as e:
        if debug:
            raise
        _report_stop(e)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the last line of defence for a CLI
        if debug:
            raise
        err.print(f"[bold red]error:[/] {type(e).__name__}: {e} (run with --debug for the traceback)",
                  highlight=False, soft_wrap=True)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
