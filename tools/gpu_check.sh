#!/usr/bin/env bash
# The prepared GPU check of the fused PSA block (issue #21): about 4-5 minutes on one bare
# NVIDIA machine whose python has torch and triton (mmengine, addict, termcolor, yapf,
# platformdirs may come as wheels in .whl/). Each section runs under its own timeout and
# writes its output to OUT_DIR as it goes, so a rerun fits in 15 minutes of machine time.
#
#   tools/gpu_check.sh OUT_DIR            # on the GPU
#   tools/gpu_check.sh OUT_DIR --smoke    # on CPU under TRITON_INTERPRET=1, tiny shapes
#
# Sections (OUT_DIR/<name>.md, rc of each in OUT_DIR/summary.txt):
#   env      GPU, python, torch, triton
#   build    mmpsa._ext compiled in place (setup.py build_ext), or says it was not
#   parity   each path against the literal form in fp64 (fp32 and bf16 inputs)
#   block    literal vs ATen vs Triton fwd+bwd and BatchNorm2d on the same tensors, fp32
#            and bf16: HRNet-W48 shapes at batch 32 (256x192 input), C=512@128x256 at batch 2
#   network  timm HRNet-W48 train step, batch 32, 256x192, bf16 autocast: stock vs PSA
set -u
OUT=${1:?usage: tools/gpu_check.sh OUT_DIR [--smoke]}
MODE=${2:-gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
: > "$OUT/summary.txt"

if [ "$MODE" = --smoke ]; then
    export TRITON_INTERPRET=1
    # one config, one dtype per section, one shape: the interpreter is slow
    # (a CI machine may be loaded: each section gets ten times its GPU-mode time limit)
    SCALE=10 DEV=cpu BATCH=2 SEG_BATCH=2 REPS=1 CONFIGS="paper:sequential"
    SHAPES="16x5x3" SEG_SHAPES="" PARITY_SHAPES="16x5x3" PARITY_DTYPES=bf16 BLOCK_DTYPES=fp32
else
    SCALE=1 DEV=cuda BATCH=32 SEG_BATCH=2 REPS=20
    CONFIGS="paper:parallel paper:sequential official:parallel official:sequential"
    SHAPES="64x64x48 48x64x48 96x32x24 192x16x12 384x8x6" SEG_SHAPES="512x128x256"
    PARITY_SHAPES="64x64x48 384x8x6" PARITY_DTYPES="fp32 bf16" BLOCK_DTYPES="bf16 fp32"
fi

# section NAME SECONDS FUNCTION: run it under its timeout, output to OUT/NAME.md
section() {
    local name=$1 limit=$(($2 * SCALE))
    echo "== $name (at most ${limit} s)"
    timeout "$limit" bash -c "$3" > "$OUT/$name.md" 2>&1
    local rc=$?
    tail -n 40 "$OUT/$name.md"
    [ $rc = 124 ] && echo "(timed out after ${limit} s)" | tee -a "$OUT/$name.md"
    echo "$name rc=$rc" >> "$OUT/summary.txt"
}

env_info() {
    command -v nvidia-smi > /dev/null && nvidia-smi -L
    "$PY" -c 'import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda",
      torch.cuda.is_available() and torch.cuda.get_device_name())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton not importable:", e)'
    echo "TRITON_INTERPRET=${TRITON_INTERPRET:-0}"
    if [ "$MODE" = --smoke ]; then ext_state; fi
}

wheels() {
    if ls .whl/*.whl > /dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/mmpsa_site .whl/*.whl && echo "installed: $(ls .whl)"
    else
        echo 'no .whl folder: using the python as it is'
    fi
}

ext_state() {
    "$PY" -W ignore -c 'from mmpsa.layers import psa_fused as f
print("mmpsa._ext", "built and loaded" if f._EXT is not None else
      "NOT built: the aten/cpu rows say n/a, auto falls back to plain ops off CUDA")'
}

build() {
    if [ "$MODE" = --smoke ]; then
        echo 'build skipped (--smoke: the extension as it is here, see env)'
    else
        MAX_JOBS=$(nproc) "$PY" setup.py -q build_ext --inplace 2>&1 | tail -n 5
        ext_state
    fi
}

bench() {
    "$PY" tools/benchmark_psa.py --threads 0 --device "$DEV" "$@"
}

parity() {
    for dtype in $PARITY_DTYPES; do
        # shellcheck disable=SC2086
        bench --parity --paths auto triton aten --dtype $dtype --batch 2 --configs $CONFIGS \
            --shapes $PARITY_SHAPES || return
    done
}

block() {
    for dtype in $BLOCK_DTYPES; do
        # shellcheck disable=SC2086
        bench --paths literal aten triton bn --dtype $dtype --batch $BATCH --reps $REPS \
            --configs $CONFIGS --shapes $SHAPES || return
        [ -z "$SEG_SHAPES" ] && continue
        # shellcheck disable=SC2086
        bench --paths literal aten triton bn --dtype $dtype --batch $SEG_BATCH --reps $REPS \
            --configs $CONFIGS --shapes $SEG_SHAPES || return
    done
}

network() {
    bench --network --batch "$BATCH" --reps 10
}

export MODE DEV PY BATCH SEG_BATCH REPS CONFIGS SHAPES SEG_SHAPES PARITY_SHAPES PARITY_DTYPES \
    BLOCK_DTYPES
export -f env_info ext_state wheels build bench parity block network
section env 30 env_info
section wheels 60 wheels
export PYTHONPATH="/tmp/mmpsa_site:$PYTHONPATH"
section build 180 build
section parity 90 parity
section block 240 block
if [ "$MODE" = --smoke ]; then
    echo '== network skipped (--smoke)' | tee "$OUT/network.md"
    echo 'network skipped' >> "$OUT/summary.txt"
elif "$PY" -c 'import timm' 2> /dev/null; then
    section network 150 network
else
    echo '== network skipped: timm is not importable' | tee "$OUT/network.md"
    echo 'network skipped' >> "$OUT/summary.txt"
fi
echo '== summary'
cat "$OUT/summary.txt"
