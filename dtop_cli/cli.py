"""The `dtop` command line: one thin function per command, the work lives in the modules.

Exit codes (a contract, see the README): 0 success, 2 bad input (one line on stderr, no
traceback unless --debug), 1 any other failure. `--json` prints exactly one JSON object on
stdout; everything else goes to stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Dynamic token pruning (DToP) for plain-ViT semantic segmentation.",
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()

PresetOpt = typer.Option(..., "--preset", "-p", help="Preset name (see `dtop presets`) or path to a YAML file.")
SetOpt = typer.Option(None, "--set", help="Override a preset value: dotted.key=value (repeatable).")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object on stdout.")


def emit_json(obj: dict) -> None:
    """The only way a command writes its --json result: one object, one line, stdout."""
    sys.stdout.write(json.dumps(obj) + "\n")
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
    t = Table(title="dtop presets")
    for col in ("name", "backbone", "dataset", "crop", "stage ends", "thresh", "top-k",
                "base mIoU", "base GFLOPs", "pruned mIoU", "pruned GFLOPs"):
        t.add_column(col, justify="right" if col[0].isdigit() or "mIoU" in col or "GFLOPs" in col else "left")
    for p in items:
        pp = p.paper
        nums = [f"{pp.base_miou:.1f}", f"{pp.base_gflops:.1f}", f"{pp.pruned_miou:.1f}", f"{pp.pruned_gflops:.1f}"] if pp else ["-"] * 4
        t.add_row(p.name, p.model.backbone, p.data.dataset, "x".join(map(str, p.data.crop)),
                  ",".join(map(str, p.model.stage_ends)), f"{p.exit.threshold:g}", str(p.exit.keep_topk), *nums)
    out.print(t)


@app.command("env")
def env_cmd(as_json: bool = JsonOpt) -> None:
    """Versions of python/torch/mmcv/mmseg/mmengine and the CUDA devices: paste into bug reports."""
    from .envinfo import collect

    info = collect()
    if as_json:
        emit_json(info)
        return
    t = Table(title="dtop env", show_header=False)
    for k, v in info.items():
        t.add_row(k, v if isinstance(v, str) else json.dumps(v))
    out.print(t)


# --------------------------------------------------------------------------- prepare


@app.command("prepare")
def prepare_cmd(
    dataset: str = typer.Argument(..., metavar="DATASET", help="ade20k, pascal-context, coco-stuff10k or synthetic."),
    src: Optional[List[Path]] = typer.Option(
        None, "--src", help="Official archive or its extracted folder (repeatable; pascal-context: the VOC2010 "
        "tar and trainval_merged.json)."),
    data_root: Path = typer.Option(Path("data"), "--data-root", help="Folder the presets read datasets from."),
    download: bool = typer.Option(False, "--download", help="Fetch the official files into DATA_ROOT/downloads "
                                  "(resumes a partial download)."),
    sha256: Optional[List[str]] = typer.Option(None, "--sha256", help="Expected SHA-256 of each input, in order "
                                               "(repeatable)."),
    url: Optional[List[str]] = typer.Option(None, "--url", help="With --download: a mirror URL instead of the "
                                            "official one (repeatable, same order)."),
    verify: bool = typer.Option(False, "--verify", help="Check an existing dataset: pairs per split vs the "
                                "official counts, sizes, label values. Exit 1 on problems."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="With --verify: a pair count below the "
                                       "official one is a warning, not a problem (deliberate subsets)."),
    workers: int = typer.Option(0, "--workers", help="Processes for conversion and checks (0: all cores)."),
    seed: int = typer.Option(0, "--seed", help="synthetic only: random seed of the generated data."),
    as_json: bool = JsonOpt,
) -> None:
    """Turn the files the dataset authors publish into the folders the presets read, safely."""
    from .data import prepare_dataset, verify_dataset

    if verify:
        if src or download or sha256 or url:
            raise UserError("--verify checks an existing dataset: it takes no --src, --download, --sha256 or --url")
        rep = verify_dataset(dataset, data_root, workers=workers, allow_partial=allow_partial, console=err)
        if as_json:
            emit_json(rep)
        else:
            _print_splits(f"verify {dataset}: {rep['root']}", rep["splits"])
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
    res = prepare_dataset(dataset, src or [], data_root, download=download, sha256=sha256 or [], urls=url or [],
                          workers=workers, seed=seed, console=err)
    if as_json:
        emit_json(res)
        return
    if "splits" in res and isinstance(res["splits"], dict) and all(isinstance(v, dict) for v in res["splits"].values()):
        _print_splits(f"{dataset}: {res.get('root', '')} ({res.get('status', 'prepared')}, "
                      f"{res.get('classes_seen', '?')} classes seen)", res["splits"])
        for w in res.get("warnings", []):
            out.print(f"[yellow]warning:[/] {w}", highlight=False)
    else:
        t = Table(title=f"dtop prepare {dataset}", show_header=False)
        for k, v in res.items():
            t.add_row(str(k), v if isinstance(v, str) else json.dumps(v))
        out.print(t)


def _print_splits(title: str, splits: dict) -> None:
    t = Table(title=title)
    for col in ("split", "pairs", "official", "classes seen"):
        t.add_column(col, justify="left" if col == "split" else "right")
    for k, v in splits.items():
        t.add_row(k, str(v.get("pairs")), str(v.get("official") or "-"), str(v.get("classes_seen", "-")))
    out.print(t)


# --------------------------------------------------------------------------- entry point


def main(argv: Optional[List[str]] = None) -> None:
    """Console-script entry: maps UserError to exit 2 with one line, other errors to 1."""
    try:  # recent typer carries its own copy of click and no longer depends on the package
        from typer._click.exceptions import ClickException
    except ImportError:  # older typer, built on the click package
        from click.exceptions import ClickException

    args = list(sys.argv[1:] if argv is None else argv)
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
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
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
