#!/usr/bin/env bash
# The prepared first run of the PSA block on one bare NVIDIA machine (python, torch, triton,
# timm; no mmengine, mmcv, cv2, mmseg, mmpose, mmdet needed): at most 420 s, the section
# limits added up. Each section runs under its own timeout and writes OUT_DIR/<section>.md as
# it goes; OUT_DIR/summary.txt holds "<section> rc=N" per section (124: timed out).
#
#   tools/dev/gpu_check.sh OUT_DIR            # on the GPU
#   tools/dev/gpu_check.sh OUT_DIR --build    # first compile mmpsa._ext in place (+180 s)
#   tools/dev/gpu_check.sh OUT_DIR --smoke    # on CPU under TRITON_INTERPRET=1, tiny shapes (CI)
#
# Sections, in the order a first run must answer them (python -m mmpsa.analysis.gpu_check NAME):
#   preflight  10 s  mmpsa.layers imports, CUDA visible, triton version, mmpsa._ext state
#   parity    120 s  auto/triton/aten vs the fp64 literal form: multi-tile, unaligned
#                    (12x9, 13x21), channels_last and segmentation shapes, every variant x
#                    mode, fp32/bf16/fp64; max|err|/max|ref| over output and every gradient
#                    within 1e-5 / 2e-2 / 1e-10, two runs bitwise equal; pass/FAIL per row
#   kernels    20 s  n_regs / n_spills of each compiled Triton kernel (triton's JIT cache)
#   block     150 s  literal / Triton / ATen / BatchNorm2d fwd+bwd, CUDA events, bf16 and
#                    fp32, HRNet-W48 shapes at batch 32; torch.profiler split (Triton
#                    kernels, other kernels, host)
#   network   120 s  timm HRNet-W48 train step, stock vs PSA, bf16 autocast, batch 32
# The ATen rows say n/a where mmpsa._ext is not built for this python.
set -u
OUT=${1:?usage: tools/dev/gpu_check.sh OUT_DIR [--smoke] [--build]}
shift
MODE=gpu BUILD=0
for arg in "$@"; do
    case $arg in
        --smoke) MODE=smoke ;;
        --build) BUILD=1 ;;
        *) echo "unknown argument: $arg" >&2 && exit 2 ;;
    esac
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
: > "$OUT/summary.txt"

if [ "$MODE" = smoke ]; then
    # triton reads it when the kernels are decorated: set before mmpsa imports them
    export TRITON_INTERPRET=1
    SCALE=5 # the interpreter is slow, and a CI machine may be loaded
else
    SCALE=1
fi

# section NAME SECONDS [ARGS...]: one section under its timeout, output to OUT/NAME.md
section() {
    local name=$1 limit=$(($2 * SCALE))
    shift 2
    echo "== $name (at most ${limit} s)"
    {
        echo "# $name"
        echo
    } > "$OUT/$name.md"
    local t0=$SECONDS
    timeout "$limit" "$PY" -W ignore::UserWarning -m mmpsa.analysis.gpu_check "$name" \
        --preset "$MODE" "$@" >> "$OUT/$name.md" 2>&1
    local rc=$?
    tail -n 40 "$OUT/$name.md"
    [ $rc = 124 ] && echo "(timed out after ${limit} s)" | tee -a "$OUT/$name.md"
    echo "($name: rc=$rc after $((SECONDS - t0)) s)"
    echo "$name rc=$rc" >> "$OUT/summary.txt"
}

section preflight 10
if [ "$BUILD" = 1 ]; then
    echo "== build (at most 180 s)"
    MAX_JOBS=$(nproc) timeout 180 "$PY" setup.py -q build_ext --inplace > "$OUT/build.md" 2>&1
    echo "build rc=$?" >> "$OUT/summary.txt"
    tail -n 5 "$OUT/build.md"
fi
section parity 120
section kernels 20 --budget $((10 * SCALE))
section block 150
section network 120
echo '== summary'
cat "$OUT/summary.txt"
