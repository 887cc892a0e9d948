#!/usr/bin/env bash
# Create/refresh the project's virtual environment (.venv by default) on a
# fresh machine: torch, mmcv 2.1.0 (via tools/install_mmcv.py), mmdet,
# mmpretrain, test/bench extras, and this package with its compiled extension.
#
# Environment knobs:
#   VENV             venv folder (default .venv)
#   PYTHON           interpreter that creates it (default python3)
#   TORCH_SPEC       torch pins (default "torch==2.14.1 torchvision==0.29.1")
#   MMCV_WHEELHOUSE  folder of prebuilt mmcv wheels (default ../shared/wheels
#                    when it exists; otherwise mmcv is built from source, ~36 min)
#   MAX_JOBS, TORCH_CUDA_ARCH_LIST  passed to the extension build (default 2, 9.0)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
if [ -z "${MMCV_WHEELHOUSE:-}" ] && [ -d ../shared/wheels ]; then
  MMCV_WHEELHOUSE=$(cd ../shared/wheels && pwd)
fi
export MAX_JOBS=${MAX_JOBS:-2}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}

step() { printf '\n== [%(%H:%M:%S)T] %s\n' -1 "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
# pip quietly; the local index's "Location ... ignored" warnings are noise
pipq() {
  local out rc=0
  out=$("$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1) || rc=$?
  printf '%s\n' "$out" | grep -v "^WARNING: Location" || true
  return $rc
}

step "torch ($TORCH_SPEC)"
# shellcheck disable=SC2086
pipq $TORCH_SPEC
# mmengine 0.10.x still imports pkg_resources (removed in setuptools 81)
pipq 'setuptools<81' wheel ninja

step "mmcv 2.1.0 (wheelhouse: ${MMCV_WHEELHOUSE:-none, building from source})"
"$PY" tools/install_mmcv.py ${MMCV_WHEELHOUSE:+--wheelhouse "$MMCV_WHEELHOUSE"}

step "convnextv2_fast with extras [mmdet,test,bench] (compiles csrc/)"
pipq --no-build-isolation -e ".[mmdet,test,bench]"
"$PY" -c "import torch, mmcv.ops, mmdet, mmpretrain, convnextv2_fast" \
  || { echo "environment check failed" >&2; exit 1; }
"$PY" -m convnextv2_fast.info
step "environment ready: $VENV"
