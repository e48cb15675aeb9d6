#!/usr/bin/env python
"""Rebuild the demo's pretrained backbone, presets/weights/tiny-synthetic-vit.pth.

    .venv/bin/python scripts/make_demo_weights.py                 # the shipped file (~3-6 min on 2 cores)
    .venv/bin/python scripts/make_demo_weights.py --out /tmp/w.pth --iters 50

It draws the synthetic training split (seed 0) in a temporary folder and pretrains the
tiny-synthetic backbone with the preset's `pretrain` settings, seed 0 (see
dtop_cli/commands/pretrain.py). The file records how it was made in meta.dtop.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "presets" / "weights" / "tiny-synthetic-vit.pth")
    ap.add_argument("--iters", type=int, default=None, help="default: the preset's pretrain.iters")
    ap.add_argument("--train-images", type=int, default=None, help="default: the generator's 2000")
    args = ap.parse_args(argv)
    from rich.console import Console

    from dtop_cli.commands.pretrain import make_demo_weights
    from dtop_cli.errors import UserError

    console = Console(stderr=True)
    try:
        with tempfile.TemporaryDirectory(prefix="dtop-demo-weights-") as tmp:
            res = make_demo_weights(args.out, tmp, iters=args.iters, n_train=args.train_images, console=console)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    console.print(f"wrote {res['path']} ({res['iters']} iterations, train pixel acc {res['train_pixel_acc']}, "
                  f"{res['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
