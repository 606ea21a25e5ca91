#!/usr/bin/env bash
# Create or update the project virtualenv with the pinned OpenMMLab stack.
#
# Idempotent: a stamp in the venv records a hash of everything that decides the
# install (requirements/ with the lock, setup.py, mmpsa/csrc/, this script,
# tools/dev/build_mmcv.py); when it matches, this returns at once. mmcv's compiled wheel is reused
# from ${MMPSA_CACHE_DIR:-~/.cache/mmpsa}/wheels (built there once, ~10 min on 2 cores).
#
# Every package is installed under the lock (requirements/lock/torch<X.Y>.txt, pip
# constraints: the same versions on every machine), and the venv is checked against it at the
# end. LOCK=FILE names another lock; LOCK= (empty) installs unpinned, e.g. to write a new lock
# with LOCK_WRITE=FILE (mmpsa.utils.lock).
#
# Environment: VENV (default .venv), PYTHON (default python3),
#              TORCH_SPEC (default "torch==2.14.1 torchvision==0.29.1"),
#              LOCK (default requirements/lock/torch2.14.txt with the default TORCH_SPEC, else
#              none), LOCK_WRITE (write the installed set as a lock there at the end),
#              MMPSA_DOCS (1: install the doc tools, requirements/docs.txt; 0: not; default:
#              where the lock pins sphinx, i.e. the torch 2.14 end, not the torch 2.1 one),
#              MMPSA_SETUP_NEED_GB (free space a new venv needs, default 8; checked first).
# A failed pip install stops the set-up at that step with pip's message.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
DEFAULT_TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
TORCH_SPEC=${TORCH_SPEC:-$DEFAULT_TORCH_SPEC}
if [ -z "${LOCK+set}" ] && [ "$TORCH_SPEC" = "$DEFAULT_TORCH_SPEC" ]; then
  LOCK=requirements/lock/torch2.14.txt
fi
LOCK=${LOCK:-}
LOCK_WRITE=${LOCK_WRITE:-}
MMPSA_DOCS=${MMPSA_DOCS:-}
if [ -z "$MMPSA_DOCS" ]; then
  MMPSA_DOCS=0
  if [ -n "$LOCK" ] && grep -q '^sphinx==' "$LOCK"; then MMPSA_DOCS=1; fi
fi
stamp="$VENV/.mmpsa-setup"
want=$( (cat requirements/*.txt setup.py mmpsa/csrc/* tools/dev/setup_env.sh tools/dev/build_mmcv.py; echo "$TORCH_SPEC docs=$MMPSA_DOCS"; [ -z "$LOCK" ] || grep -v '^#' "$LOCK") | sha256sum | cut -c1-16)
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

start=$(date +%s)
step() { echo "[setup $(( $(date +%s) - start ))s] $*"; }
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip install, quiet; its exit status is kept (a failed install stops the set-up here, with
# pip's own message, instead of surfacing later as a missing module)
pip_q() {
  local out rc=0
  out=$("$VENV/bin/python" -m pip install -q "$@" 2>&1) || rc=$?
  if [ -n "$out" ]; then
    printf '%s\n' "$out" | grep -v -E '^WARNING: Location .* is ignored' || true
  fi
  if [ "$rc" -ne 0 ]; then
    echo "setup: 'pip install $*' failed (exit $rc); see pip's message above" >&2
    return "$rc"
  fi
}

if [ ! -x "$VENV/bin/python" ]; then
  # a new venv with the stack takes ~6.5 GB (torch's CUDA wheels); pip's own 'No space left on
  # device' comes midway, so say it first, with the numbers
  need_gb=${MMPSA_SETUP_NEED_GB:-8}
  case "$need_gb" in
    '' | *[!0-9]*) echo "setup: MMPSA_SETUP_NEED_GB must be a whole number of GB, not '$need_gb'" >&2; exit 1 ;;
  esac
  venv_parent=$(dirname "$VENV")
  free_gb=$(df -Pk "$venv_parent" | awk 'NR==2 {print int($4 / 1048576)}')
  if [ "$free_gb" -lt "$need_gb" ]; then
    echo "setup: $free_gb GB free under $venv_parent, a new $VENV needs about $need_gb GB" \
      "(torch + the OpenMMLab stack); free some space or set MMPSA_SETUP_NEED_GB" >&2
    exit 1
  fi
  step "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
if [ -n "$LOCK" ]; then
  # the lock as pip constraints for every install below (mmcv, a local wheel, is only checked)
  grep -v -E '^(mmcv==|#)' "$LOCK" > "$VENV/.mmpsa-constraints.txt"
  export PIP_CONSTRAINT="$PWD/$VENV/.mmpsa-constraints.txt"
  case "$VENV" in /*) export PIP_CONSTRAINT="$VENV/.mmpsa-constraints.txt" ;; esac
  step "installing under $LOCK"
fi
step "torch + build tools ($TORCH_SPEC)"
# pip >= 24.1: older pips install -e through `setup.py develop`, which (setuptools >= 80)
# re-enters pip with build isolation, where torch is missing and mmpsa._ext is not built
# shellcheck disable=SC2086
pip_q 'pip>=24.1' $TORCH_SPEC 'numpy==1.26.4' ninja wheel 'setuptools>=77,<81'
step "mmcv 2.1.0 with compiled ops (cached wheel, or a ~10 min build)"
"$VENV/bin/python" tools/dev/build_mmcv.py
wheel=$("$VENV/bin/python" tools/dev/build_mmcv.py --print-path)
step "OpenMMLab stack (mmengine, mmcv, mmseg, mmdet, mmpose deps, mim, pytest)"
pip_q "$wheel" -r requirements/env.txt
step "mmpose 1.3.2 without its unbuildable chumpy requirement"
pip_q --no-deps mmpose==1.3.2
if [ "$MMPSA_DOCS" = 1 ]; then
  step "documentation tools (requirements/docs.txt: sphinx, myst-parser)"
  pip_q -r requirements/docs.txt
fi
step "mmpsa (editable; compiles mmpsa._ext, the fused block, ~1 min)"
pip_q --no-deps --no-build-isolation -e .
step "checking the stack imports"
"$VENV/bin/python" - <<'PY'
import mmcv, mmcv.ops, mmengine, mmseg, mmpose, mmdet, torch, numpy
import mmseg.models, mmpose.models  # these import mmcv.ops / mmdet at import time
import mmpsa
import mmpsa._ext  # the compiled fused block: a failed build must fail the set-up
print(f'torch {torch.__version__}, numpy {numpy.__version__}, mmengine {mmengine.__version__}, '
      f'mmcv {mmcv.__version__} (ops), mmseg {mmseg.__version__}, mmpose {mmpose.__version__}, '
      f'mmdet {mmdet.__version__}, mmpsa {mmpsa.__version__}')
PY
if [ -n "$LOCK" ]; then
  step "checking the venv against $LOCK"
  "$VENV/bin/python" -W ignore -m mmpsa.utils.lock check "$LOCK"
fi
if [ -n "$LOCK_WRITE" ]; then
  "$VENV/bin/python" -W ignore -m mmpsa.utils.lock write "$LOCK_WRITE" --for "TORCH_SPEC=\"$TORCH_SPEC\""
fi
echo "$want" > "$stamp"
step "done"
