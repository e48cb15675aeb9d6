#!/usr/bin/env bash
# Regenerate the README's pictures (docs/infer_panel.png, docs/sweep.png) from a checkpoint of
# the demo, by default the pruned checkpoint `dtop quickstart` leaves in work_dirs/quickstart.
#
#   scripts/readme_pictures.sh                       # after `dtop quickstart`
#   CKPT=path.pth DATA_ROOT=dir scripts/readme_pictures.sh
#
# Optional: IMAGE (validation image for the panel), THRESH (its exit threshold, default the
# checkpoint's), THRESHOLDS and IMAGES (the sweep). The PNGs are reduced to 256 colours so
# they stay small in the repository.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WD=${WORK_DIR:-work_dirs/quickstart}
CKPT=${CKPT:-$(cat "$WD/prune/last_checkpoint")}
DATA_ROOT=${DATA_ROOT:-$WD/data}
IMAGE=${IMAGE:-$DATA_ROOT/synthetic/images/validation/syn_val_00000002.jpg}
THRESHOLDS=${THRESHOLDS:-0.6,0.7,0.8,0.85,0.9,0.95,1.0}
IMAGES=${IMAGES:-32}
DTOP=${DTOP:-.venv/bin/dtop}
PY=${PY:-.venv/bin/python}

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$DTOP" infer "$IMAGE" --preset tiny-synthetic --ckpt "$CKPT" --out "$TMP/infer" ${THRESH:+--thresh "$THRESH"} >/dev/null
"$DTOP" sweep --preset tiny-synthetic --ckpt "$CKPT" --data-root "$DATA_ROOT" --thresholds "$THRESHOLDS" \
    --images "$IMAGES" --out "$TMP/sweep"
mkdir -p docs
"$PY" - "$TMP/infer/$(basename "${IMAGE%.*}")_panel.png" docs/infer_panel.png "$TMP/sweep/sweep.png" docs/sweep.png <<'PY'
import sys
from PIL import Image

args = sys.argv[1:]
for src, dst in zip(args[::2], args[1::2]):
    img = Image.open(src).convert("RGB")
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(dst, optimize=True)
    print(dst)
PY
