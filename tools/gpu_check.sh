#!/usr/bin/env bash
# One command for a GPU machine with the project checked out (no network):
# install carried wheels, build the project, run the GPU tests and the
# full-size benchmarks, write everything to $OUT (default ./gpu_results).
#
#   bash tools/gpu_check.sh [WHEEL_DIR]      # WHEEL_DIR from tools/fetch_gpu_wheels.sh
#
# Budget: well under 9 minutes on one H100/H200 (GPU tests ~1-2 min, backbone
# benchmark ~2 min, Mask R-CNN benchmark ~3 min at reduced iteration counts).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_results}
mkdir -p "$OUT"
wheels=${1:-}
log() { printf '\n== [%(%H:%M:%S)T] %s\n' -1 "$*" | tee -a "$OUT/gpu_check.log"; }

if [ -n "$wheels" ]; then
  if [ ! -d "$wheels" ]; then
    echo "gpu_check: wheel folder '$wheels' does not exist" >&2
    exit 2
  fi
  log "installing carried wheels from $wheels"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site "$wheels"/*.whl || exit 3
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 - <<'PY' | tee -a "$OUT/gpu_check.log"
import importlib
missing = []
for name in ('torch', 'triton', 'mmengine', 'mmcv', 'mmdet', 'mmpretrain',
             'pycocotools', 'pytest'):
    try:
        m = importlib.import_module(name)
        print(f'{name:12s} {getattr(m, "__version__", "?")}')
    except Exception as exc:
        missing.append(name)
        print(f'{name:12s} MISSING ({type(exc).__name__}: {exc})')
if missing:
    print('gpu_check: missing ' + ', '.join(missing) + ' -> the Mask R-CNN '
          'benchmark and mm* tests will be skipped; carry wheels made by '
          'tools/fetch_gpu_wheels.sh')
PY

log "building the project (extension for sm_90)"
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
  python3 -m pip install -q --no-build-isolation --no-deps -e . \
  >>"$OUT/gpu_check.log" 2>&1 || log "extension build FAILED (see log)"
python3 -m convnextv2_fast.info | tee -a "$OUT/gpu_check.log"

log "GPU tests"
TRITON_INTERPRET=0 timeout 240 python3 -m pytest -m gpu tests -q -rs \
  2>&1 | tee "$OUT/gpu_tests.log" | tail -25

log "benchmarks (full size)"
suites=backbone
python3 -c "import mmdet, mmpretrain, pycocotools" 2>/dev/null && suites="backbone maskrcnn"
TRITON_INTERPRET=0 BENCH_BUDGET=short timeout 330 python3 -m benchmarks \
  --suites $suites --out "$OUT/bench.json" 2>&1 | tail -60 | tee -a "$OUT/gpu_check.log"
cp -f benchmarks/results/*.png "$OUT/" 2>/dev/null || true
log "done; results in $OUT"
