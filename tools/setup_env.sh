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
#   MAX_JOBS         parallel compile jobs of the extension build (default 2)
#   TORCH_CUDA_ARCH_LIST  CUDA archs of the extension (default: unset, i.e.
#                    setup.py's documented default list when no GPU is visible)
#   CONVNEXTV2_FAST_WHEEL_DIR  where the project's sdist + wheel go (default dist/)
#
# The extension is compiled once: `python -m build` makes the sdist and, from
# it, the wheel (tests/test_packaging.py installs that wheel into a fresh venv);
# the editable install then gets the wheel's compiled extension
# (tools/prebuilt_wheel.py extract) instead of compiling it again.  A wheel
# already in the wheel folder is reused when it is current (same torch, arch
# list, csrc/ and Python sources).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
if [ -z "${MMCV_WHEELHOUSE:-}" ] && [ -d ../shared/wheels ]; then
  MMCV_WHEELHOUSE=$(cd ../shared/wheels && pwd)
fi
export MAX_JOBS=${MAX_JOBS:-2}
export CONVNEXTV2_FAST_WHEEL_DIR=${CONVNEXTV2_FAST_WHEEL_DIR:-$PWD/dist}

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
pipq 'setuptools<81' wheel ninja build

step "mmcv 2.1.0 (wheelhouse: ${MMCV_WHEELHOUSE:-none, building from source})"
"$PY" tools/install_mmcv.py ${MMCV_WHEELHOUSE:+--wheelhouse "$MMCV_WHEELHOUSE"}

step "convnextv2_fast sdist + wheel (compiles csrc/; CUDA archs: ${TORCH_CUDA_ARCH_LIST:-setup.py default})"
mkdir -p "$CONVNEXTV2_FAST_WHEEL_DIR"
BUILD_LOG="$CONVNEXTV2_FAST_WHEEL_DIR/build.log"
if ! "$PY" tools/prebuilt_wheel.py current; then
  build_start=$(date +%s)
  "$PY" -m build --no-isolation --outdir "$CONVNEXTV2_FAST_WHEEL_DIR" . >"$BUILD_LOG" 2>&1 \
    || { tail -n 40 "$BUILD_LOG" >&2; echo "build failed (log: $BUILD_LOG)" >&2; exit 1; }
  grep '^convnextv2_fast: ' "$BUILD_LOG" | sort -u || true
  echo "sdist + wheel built in $(( $(date +%s) - build_start )) s (log: $BUILD_LOG)"
fi

step "convnextv2_fast editable with extras [mmdet,test,bench], extension from the wheel"
CONVNEXTV2_FAST_NO_EXT=1 pipq --no-build-isolation -e ".[mmdet,test,bench]"
"$PY" tools/prebuilt_wheel.py extract
"$PY" -c "import torch, mmcv.ops, mmdet, mmpretrain, convnextv2_fast" \
  || { echo "environment check failed" >&2; exit 1; }
"$PY" -m convnextv2_fast.info
step "environment ready: $VENV"
