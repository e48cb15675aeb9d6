#!/usr/bin/env bash
# The GPU check of the wall-clock speed goal: is the pruned model faster than the dense one
# in practice, on an H100/H200-class GPU? One short script, a few minutes once the
# environment is installed.
#
#   bash scripts/gpu_bench.sh [OUT_DIR]      (default: $OUT if set, else /tmp/dtop-gpu-bench)
#
# What it runs (`dtop bench`, random weights, forced exits so speed does not depend on
# training): segvit-large-ade, 640x640, bf16, --exits 0.35,0.77 (35% of all tokens retired
# after stage 1, 77% by the end of stage 2), at batch 8 and batch 1, each twice:
#   graphs: dense and pruned both replayed as CUDA graphs (dense as one graph, pruned per
#           stage and padded width) -- the "same treatment" for both;
#   eager:  both op by op.
# Then, for reference, segvit-base-ade 512x512 (30% / 65%) at batch 1 and 8 with graphs.
#
# Targets checked (ratios from one run each):
#   batch 8: best measured speed-up >= 0.9 x FLOP ratio (dense GFLOPs / pruned GFLOPs)
#   batch 1: speed-up with graphs on both sides >= 1.2
# Exit 0 when both hold, 1 when not, 3 when the environment is missing.
#
# Output (at most 4 files, so a remote runner can bring them all back):
#   OUT_DIR/results.jsonl  one `dtop bench --json` object per run, with "run" naming it
#   OUT_DIR/summary.txt    table of the runs and the verdict (also printed)
#   OUT_DIR/env.txt        nvidia-smi and `dtop env`
#   OUT_DIR/bench.log      everything the runs wrote on stderr
#
# Environment: a CUDA build of torch plus this project. On a machine whose system python
# already has CUDA torch:  DTOP_SYSTEM_SITE=1 bash scripts/setup.sh  (compiles mmcv once,
# minutes). PYTHON_BIN=/path/to/python overrides the interpreter (default .venv/bin/python,
# else python3). GPU_BENCH_DRY=1 runs the same plumbing on the CPU with the tiny preset
# (a check of the script itself; its numbers mean nothing).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR=${1:-${OUT:-${TMPDIR:-/tmp}/dtop-gpu-bench}}
mkdir -p "$OUT_DIR"
if [ -n "${PYTHON_BIN:-}" ]; then PY=$PYTHON_BIN
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi

DRY=${GPU_BENCH_DRY:-0}
if [ "$DRY" = 1 ]; then
    echo "gpu_bench: DRY RUN on the CPU with tiny-synthetic (checks the script, not the speed)" >&2
elif ! "$PY" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_bench: torch sees no CUDA device (torch %s, CUDA build %s)" % (torch.__version__, torch.version.cuda))
import mmseg, mmcv, dtop_cli.model  # noqa: F401  (the model needs the OpenMMLab stack)
EOF
then
    echo "gpu_bench: environment missing (see the header of this script: DTOP_SYSTEM_SITE=1 bash scripts/setup.sh)" >&2
    exit 3
fi

{ nvidia-smi 2>&1; echo; "$PY" -m dtop_cli.cli env 2>&1; } > "$OUT_DIR/env.txt"
: > "$OUT_DIR/results.jsonl"
: > "$OUT_DIR/bench.log"

# run NAME ARGS...: one `dtop bench --json` run, its JSON tagged with "run": NAME
run() {
    local name=$1; shift
    echo "== $name: dtop bench $*" | tee -a "$OUT_DIR/bench.log" >&2
    local json
    if json=$(timeout 300 "$PY" -m dtop_cli.cli bench "$@" --json 2>>"$OUT_DIR/bench.log"); then
        "$PY" -c 'import json,sys; r=json.loads(sys.argv[2]); r["run"]=sys.argv[1]; print(json.dumps(r))' \
            "$name" "$json" >> "$OUT_DIR/results.jsonl"
    else
        echo "gpu_bench: run $name failed (see bench.log)" | tee -a "$OUT_DIR/bench.log" >&2
    fi
}

if [ "$DRY" = 1 ]; then
    L=(--preset tiny-synthetic --device cpu --dtype fp32 --exits 0.35,0.77 --repeats 2 --warmup 0)
    B=(--preset tiny-synthetic --device cpu --dtype fp32 --exits 0.3,0.65 --repeats 2 --warmup 0 --no-memory)
    ON=(--graphs off)
else
    L=(--preset segvit-large-ade --device cuda --dtype bf16 --exits 0.35,0.77 --repeats 40 --warmup 5)
    B=(--preset segvit-base-ade --device cuda --dtype bf16 --exits 0.3,0.65 --repeats 40 --warmup 5 --no-memory)
    ON=(--graphs on)
fi
run large-b8-graphs "${L[@]}" --batch 8 "${ON[@]}"
run large-b8-eager "${L[@]}" --batch 8 --graphs off
run large-b1-graphs "${L[@]}" --batch 1 "${ON[@]}"
run large-b1-eager "${L[@]}" --batch 1 --graphs off
run base-b1-graphs "${B[@]}" --batch 1 "${ON[@]}"
run base-b8-graphs "${B[@]}" --batch 8 "${ON[@]}"

"$PY" - "$OUT_DIR" <<'EOF' | tee "$OUT_DIR/summary.txt"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = {}
for line in (out / "results.jsonl").read_text().splitlines():
    r = json.loads(line)
    rows[r["run"]] = r
print(f"{'run':16} {'device':28} {'dense ms':>9} {'pruned ms':>9} {'speed-up':>8} {'FLOP ratio':>10} "
      f"{'ideal':>6} {'/FLOPs':>6} {'dense MB':>9} {'pruned MB':>9} graphs")
for name, r in rows.items():
    mem = [f"{r[k]:9.1f}" if r.get(k) is not None else f"{'-':>9}" for k in ("dense_peak_mb", "pruned_peak_mb")]
    print(f"{name:16} {r['device_name'][:28]:28} {r['dense_ms']:9.3f} {r['pruned_ms']:9.3f} {r['speedup']:7.3f}x "
          f"{r['flop_ratio']:9.3f}x {r['ideal_ratio']:5.2f}x {r['speedup_over_flop_ratio']:6.3f} {mem[0]} {mem[1]} "
          f"{r['graphs_captured'] if r['graphs'] else 'off'}")
ok = True
b8 = [rows[k] for k in ("large-b8-graphs", "large-b8-eager") if k in rows]
if b8:
    best = max(b8, key=lambda r: r["speedup"])
    good = best["speedup"] >= 0.9 * best["flop_ratio"]
    ok &= good
    print(f"batch 8: best speed-up {best['speedup']:.3f}x ({best['run']}) vs 0.9 x FLOP ratio "
          f"{0.9 * best['flop_ratio']:.3f}x -> {'PASS' if good else 'FAIL'}")
else:
    ok = False
    print("batch 8: no result -> FAIL")
b1 = rows.get("large-b1-graphs")
if b1:
    good = b1["speedup"] >= 1.2
    ok &= good
    print(f"batch 1: graphed speed-up {b1['speedup']:.3f}x vs 1.2x -> {'PASS' if good else 'FAIL'}")
else:
    ok = False
    print("batch 1: no result -> FAIL")
print("ALL TARGETS MET" if ok else "TARGETS NOT MET")
(out / ".verdict").write_text("ok" if ok else "fail")
EOF
verdict=$(cat "$OUT_DIR/.verdict" 2>/dev/null || echo fail)
rm -f "$OUT_DIR/.verdict"
[ "$verdict" = ok ]
