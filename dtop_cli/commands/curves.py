"""`dtop curves WORK_DIR`: the scalars a run logged, as pictures.

mmengine's LocalVisBackend appends one JSON object per logging interval to
``<work_dir>/<timestamp>/vis_data/scalars.json`` (a resumed run starts a new timestamp
folder). Training lines carry ``iter``, ``lr`` and the loss terms (``decode.loss_mask``,
``aux_0.loss_dice`` ...; prune runs also ``exit.share_s``, ``active.after_s`` and
``gflops_ratio``); validation lines carry ``mIoU`` and ``step``. The reading is pure and
tolerant of a run that is still writing (a half-written last line is skipped).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from ..errors import UserError
from ..fsutil import atomic_write, check_out_dir

Series = dict[str, tuple[list[int], list[float]]]


def read_scalars(path: Path) -> list[dict]:
    """The JSON lines of one scalars.json; a line that does not parse (the one being
    written right now) is skipped."""
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def find_runs(root: Path) -> dict[str, list[Path]]:
    """Runs under ``root`` (a work dir, or a folder of work dirs such as the quickstart's):
    name relative to root ('.' for root itself) -> its scalars files, oldest first."""
    runs: dict[str, list[Path]] = {}
    for f in sorted(root.rglob("vis_data/scalars.json")):
        run_dir = f.parent.parent.parent  # <run>/<timestamp>/vis_data/scalars.json
        name = str(run_dir.relative_to(root)) if run_dir != root else "."
        runs.setdefault(name, []).append(f)
    for files in runs.values():
        files.sort(key=lambda p: p.parent.parent.name)  # timestamps sort in time order
    return runs


def series(rows: list[dict]) -> tuple[Series, Series]:
    """(training series by iteration, validation series by step) of one run's rows. A value
    logged again for the same iteration (a resumed run redoing it) replaces the older one."""
    train: dict[str, dict[int, float]] = {}
    val: dict[str, dict[int, float]] = {}
    for row in rows:
        if "iter" in row:
            target, x = train, int(row["iter"])
        elif "step" in row:
            target, x = val, int(row["step"])
        else:
            continue
        for key, value in row.items():
            if key in ("iter", "step") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            target.setdefault(key, {})[x] = float(value)

    def ordered(d: dict[str, dict[int, float]]) -> Series:
        return {k: (sorted(v), [v[i] for i in sorted(v)]) for k, v in d.items()}

    return ordered(train), ordered(val)


def head_losses(train: Series) -> Series:
    """Total loss and the sum of each head's terms (``decode``, ``aux_0`` ...) per iteration."""
    out: Series = {}
    if "loss" in train:
        out["total"] = train["loss"]
    heads: dict[str, dict[int, float]] = {}
    for key, (xs, ys) in train.items():
        m = re.fullmatch(r"(decode|aux_\d+)\.loss_\w+", key)
        if m:
            acc = heads.setdefault(m.group(1), {})
            for x, y in zip(xs, ys):
                acc[x] = acc.get(x, 0.0) + y
    for head in sorted(heads, key=lambda h: (h == "decode", h)):
        xs = sorted(heads[head])
        out[head] = (xs, [heads[head][x] for x in xs])
    return out


def draw_curves(work_dir: Path, out: Optional[Path] = None) -> dict:
    """Write the PNGs of every run under ``work_dir`` into ``out`` (default
    ``work_dir/curves``); returns {pictures: [paths], runs: {name: {iters, last}}}."""
    from ..viz import line_plot

    work_dir = Path(work_dir).expanduser()
    if not work_dir.is_dir():
        raise UserError(f"{work_dir} is not a folder (give the work dir of a `dtop train` or `dtop prune` run)")
    runs = find_runs(work_dir)
    if not runs:
        raise UserError(f"no vis_data/scalars.json under {work_dir}: is it the work dir of a `dtop train` or "
                        f"`dtop prune` run (it appears after the first logging interval)?")
    out = check_out_dir(out if out is not None else work_dir / "curves")
    pictures: list[str] = []
    summary: dict[str, dict] = {}
    for name, files in runs.items():
        rows = [r for f in files for r in read_scalars(f)]
        train, val = series(rows)
        prefix = "" if name == "." else name.replace("/", "_") + "_"
        title = work_dir.name if name == "." else f"{work_dir.name}/{name}"
        plots: list[tuple[str, Series, str, bool]] = []
        losses = head_losses(train)
        if losses:
            plots.append(("loss", losses, "loss (sum of each head's terms)", True))
        if "lr" in train:
            plots.append(("lr", {"lr": train["lr"]}, "learning rate", False))
        miou = {k: v for k, v in val.items() if k == "mIoU"}
        if miou:
            plots.append(("miou", miou, "validation mIoU (%)", False))
        exits = {k.replace("exit.share_", "exit share, stage "): v for k, v in train.items()
                 if k.startswith("exit.share_")}
        if "gflops_ratio" in train:
            exits["GFLOPs ratio vs base"] = train["gflops_ratio"]
        if exits:
            plots.append(("exits", exits, "share of tokens / GFLOPs ratio (training batches)", False))
        for kind, data, ylabel, log_y in plots:
            path = out / f"{prefix}{kind}.png"
            atomic_write(path, line_plot(data, f"{title}: {kind}", ylabel, log_y=log_y,
                                         xlabel="iteration" if kind != "miou" else "iteration (validation)"))
            pictures.append(str(path))
        iters = train["loss"][0] if "loss" in train else []
        summary[name] = {"iters": iters[-1] if iters else 0,
                         "last": {k: v[1][-1] for k, v in {**train, **val}.items()}}
    return {"pictures": pictures, "runs": summary}
