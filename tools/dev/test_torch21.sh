#!/usr/bin/env bash
# The compatibility subset (tests/compat_subset.txt) on the oldest supported stack: torch 2.1.2,
# torchvision 0.16.2, mmcv 2.1.0 (the last torch with OpenMMLab's prebuilt mmcv wheels).
#
# Two virtualenvs must not share one source tree (an editable install builds mmpsa/_ext*.so in
# place), so this runs in a clone of the checkout's HEAD (committed files only) under
# outputs/torch2.1 (ignored), with its own venv, set up by tools/dev/setup_env.sh under
# requirements/lock/torch2.1.txt. mmcv's wheel for torch 2.1.2 is cached under its own key
# (~/.cache/mmpsa/wheels); the clone and its venv are reused (the set-up's stamp decides).
#
# Cost: with the mmcv wheel cached, ~1.5 min set-up on a fresh clone + the subset (~3 min on
# 2 cores); on a fresh machine add the torch 2.1.2 download (~2.5 GB, ~1 min) and one mmcv
# build (11-40 min on 2 shared cores).
#
# Environment: T21_DIR (default outputs/torch2.1), PYTEST_ARGS (default -q).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DIR=${T21_DIR:-$ROOT/outputs/torch2.1}
TORCH_SPEC="torch==2.1.2 torchvision==0.16.2"
start=$(date +%s)
step() { echo "[torch2.1 $(( $(date +%s) - start ))s] $*"; }

step "clone of $(git rev-parse --short HEAD) in $DIR"
if [ -d "$DIR/.git" ]; then
  git -C "$DIR" fetch -q "$ROOT" HEAD
  git -C "$DIR" checkout -q --detach FETCH_HEAD
  git -C "$DIR" clean -q -fdx -e .venv-t21 -e 'mmpsa/_ext*.so' -e build/
else
  mkdir -p "$(dirname "$DIR")"
  git clone -q --no-hardlinks "$ROOT" "$DIR"
fi
cd "$DIR"
step "set-up ($TORCH_SPEC, lock requirements/lock/torch2.1.txt)"
VENV=.venv-t21 TORCH_SPEC="$TORCH_SPEC" LOCK=requirements/lock/torch2.1.txt bash tools/dev/setup_env.sh
step "compatibility subset"
# shellcheck disable=SC2046,SC2086
.venv-t21/bin/python -m pytest -p no:cacheprovider -n 2 --dist loadfile ${PYTEST_ARGS:--q} \
  $(grep -v -E '^\s*(#|$)' tests/compat_subset.txt)
step "done"
