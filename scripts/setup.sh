#!/usr/bin/env bash
# Set up dtop in a project-local virtual environment (.venv). Safe to run again: a second run
# checks a stamp and the imports and finishes in seconds.
#
#   bash scripts/setup.sh            # create/refresh .venv
#   bash scripts/setup.sh --test     # ... then run the test suite
#   bash scripts/setup.sh --force    # ignore the stamp, re-check every step
#
# Environment knobs:
#   DTOP_TORCH_SPEC=...   torch requirement installed when the venv has no torch
#                         (default torch==2.13.0, the CPU build).
#   DTOP_SYSTEM_SITE=1    create .venv with --system-site-packages, so a torch you already
#                         installed (e.g. a CUDA build) is used as it is and never replaced.
#   PYTHON=python3.X      interpreter used to create .venv (default python3, needs >= 3.10).
#
# Why the steps look the way they do:
#   * mmcv 2.1.0 (the newest mmcv mmsegmentation 1.2.2 accepts) is published as source only.
#     Its setup.py imports pkg_resources and torch, so it is built without build isolation,
#     against the torch already in .venv, with setuptools<70 (newer setuptools dropped what
#     it needs). It is compiled with no GPU visible (CUDA_VISIBLE_DEVICES=), which builds the
#     CPU ops only: nothing in dtop needs mmcv's CUDA kernels and they take far longer to
#     compile. pip caches the built wheel, so later setups on the same machine reuse it.
#   * torch itself requires setuptools>=77.0.3, and mmengine imports pkg_resources at run
#     time (setuptools 82 removed it), so after the build setuptools goes to >=77.0.3,<82.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
VENV=$ROOT/.venv
PY=$VENV/bin/python
STAMP=$ROOT/.setup-stamp
TORCH_SPEC=${DTOP_TORCH_SPEC:-torch==2.13.0}
MMCV_SPEC="mmcv==2.1.0"
BUILD_SETUPTOOLS="setuptools<70"
RUNTIME_SETUPTOOLS="setuptools>=77.0.3,<82"
# pyproject.toml [build-system]; hatchling needs editables for an editable install when
# pip does not isolate the build (it would otherwise fetch it itself).
BUILD_BACKEND=("hatchling>=1.26" "editables>=0.5")

RUN_TESTS=0
FORCE=0
for arg in "$@"; do
    case "$arg" in
        --test) RUN_TESTS=1 ;;
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "setup.sh: unknown option '$arg' (try --help)" >&2; exit 2 ;;
    esac
done

T_ALL=$(date +%s.%N)
T_STEP=$T_ALL
log() { printf '[setup] %s\n' "$*" >&2; }
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
done_step() { log "$(printf '%-34s %6s s' "$1" "$(elapsed "$T_STEP")")"; T_STEP=$(date +%s.%N); }
pip() { "$PY" -m pip --disable-pip-version-check "$@"; }
can_import() { "$PY" -c "$1" >/dev/null 2>&1; }

# The stamp records what this setup was made from; any change to these re-runs the installs.
stamp_value() {
    {
        cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh"
        echo "torch-spec=$TORCH_SPEC system-site=${DTOP_SYSTEM_SITE:-0}"
    } | sha256sum | cut -d' ' -f1
}

run_tests() {
    if [ "$RUN_TESTS" = 1 ]; then
        log "running the test suite: .venv/bin/python -m pytest -q"
        local t0; t0=$(date +%s.%N)
        local rc=0
        "$PY" -m pytest -q || rc=$?
        log "tests finished in $(elapsed "$t0") s (exit $rc)"
        exit "$rc"
    fi
}

# ---------------------------------------------------------------- fast path
if [ "$FORCE" = 0 ] && [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp_value)" ] \
    && [ -x "$VENV/bin/dtop" ] && can_import "import mmcv.ops, mmseg, dtop_cli.cli"; then
    done_step "up to date (stamp + imports ok)"
    run_tests
    exit 0
fi
rm -f "$STAMP"

# ---------------------------------------------------------------- 1. virtual environment
if [ ! -x "$PY" ]; then
    BASE_PY=${PYTHON:-python3}
    command -v "$BASE_PY" >/dev/null || { log "error: '$BASE_PY' not found (set PYTHON=...)"; exit 1; }
    "$BASE_PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || { log "error: dtop needs Python >= 3.10 (found $("$BASE_PY" -V 2>&1)); set PYTHON=..."; exit 1; }
    VENV_ARGS=()
    if [ "${DTOP_SYSTEM_SITE:-0}" = 1 ]; then
        VENV_ARGS+=(--system-site-packages)
        log "creating .venv with --system-site-packages (your installed torch is kept)"
    fi
    "$BASE_PY" -m venv "${VENV_ARGS[@]}" "$VENV" \
        || { log "error: '$BASE_PY -m venv' failed (on Debian/Ubuntu: apt install python3-venv)"; exit 1; }
    done_step "create .venv"
else
    done_step ".venv exists"
fi

# ---------------------------------------------------------------- 2. torch
if can_import "import torch"; then
    done_step "torch kept ($("$PY" -c 'import torch; print(torch.__version__)'))"
else
    log "installing $TORCH_SPEC"
    pip install -q "$TORCH_SPEC"
    done_step "install $TORCH_SPEC"
fi

# ---------------------------------------------------------------- 3. mmcv with compiled ops
if can_import "import mmcv.ops"; then
    done_step "mmcv.ops present"
else
    log "mmcv.ops missing: building $MMCV_SPEC with CPU ops (several minutes on 2 cores; once, pip caches the wheel)"
    pip install -q "$BUILD_SETUPTOOLS" wheel
    build_mmcv() {
        CUDA_VISIBLE_DEVICES= MMCV_WITH_OPS=1 MAX_JOBS="$(nproc)" \
            pip install --no-build-isolation --progress-bar off "$@" "$MMCV_SPEC"
    }
    build_mmcv
    if ! can_import "import mmcv.ops"; then
        # A cached wheel built against another torch does not load: build a fresh one.
        log "the installed mmcv does not load against this torch; rebuilding without pip's cache"
        build_mmcv --no-cache-dir --force-reinstall --no-deps
    fi
    done_step "build/install $MMCV_SPEC"
fi
# torch needs setuptools>=77.0.3; mmengine needs pkg_resources (gone in setuptools 82).
if ! "$PY" -c 'import sys, setuptools, pkg_resources; v = tuple(int(x) for x in setuptools.__version__.split(".")[:2]); sys.exit(not ((77, 0) <= v < (82, 0)))' >/dev/null 2>&1; then
    pip install -q "$RUNTIME_SETUPTOOLS"
fi
"$PY" -c "import mmcv.ops" || { log "error: mmcv.ops does not import (see above)"; exit 1; }
done_step "setuptools $("$PY" -c 'import setuptools; print(setuptools.__version__)'), mmcv.ops ok"

# ---------------------------------------------------------------- 4. dtop itself
# Built without isolation (nothing to download twice); its build backend must be present.
pip install -q "${BUILD_BACKEND[@]}"
pip install -q --no-build-isolation -e "$ROOT[test]"
done_step "install dtop (editable) + test deps"

"$PY" -c "import mmcv.ops, mmseg, dtop_cli.cli" || { log "error: the installed stack does not import"; exit 1; }
"$VENV/bin/dtop" --help >/dev/null
done_step "check imports + dtop console script"

stamp_value > "$STAMP"
log "$(printf '%-34s %6s s' "total" "$(elapsed "$T_ALL")")"
log "ready: .venv/bin/dtop quickstart runs the demo; .venv/bin/dtop --help lists the commands"
run_tests
