#!/usr/bin/env bash
# One command per GPU visit (machine without network, project checked out):
# install carried wheels, build the project and its CUDA extension, run the
# GPU tests, run the full-size benchmarks, and collect everything in $OUT.
#
#   bash tools/gpu_check.sh [--wheels DIR] [--suites "S ..."|all] [--tests "PATHS"]
#
#   --wheels DIR  wheels from tools/fetch_gpu_wheels.sh (mmcv CUDA build,
#                 mmengine, mmdet, mmpretrain, pycocotools, ...); without
#                 them the suites that need mmdet are skipped, saying so
#   --suites      benchmark suites of `python -m benchmarks` (default
#                 "backbone maskrcnn"; all = block backbone maskrcnn fcmae)
#   --tests       test paths for `pytest -m gpu` (default: tests/)
#
# Per-issue wrappers: tools/gpu_check_block.sh, tools/gpu_check_fcmae.sh.
# Time: GPU tests <= 4 min (cold Triton compiles included), benchmarks run
# with BENCH_BUDGET=short under a BENCH_TIMEOUT (default 330 s) limit, so the
# default call stays under 9 minutes on one H100/H200 plus the build.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_results}
wheels='' suites='backbone maskrcnn' tests='tests'
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels=$2; shift 2 ;;
    --suites) suites=$2; shift 2 ;;
    --tests) tests=$2; shift 2 ;;
    *) echo "gpu_check: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
[ "$suites" = all ] && suites='block backbone maskrcnn fcmae'
mkdir -p "$OUT"
start=$(date +%s)
log() { printf '\n== [%(%H:%M:%S)T +%ss] %s\n' -1 "$(( $(date +%s) - start ))" "$*" \
          | tee -a "$OUT/gpu_check.log"; }

python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device visible')" || exit 2
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
missing=$(python3 - <<'PY' 2>&1 | tee -a "$OUT/gpu_check.log" | tail -1
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
print(' '.join(missing))
PY
)
if [ -n "$missing" ]; then
  log "missing: $missing -> suites needing mmdet/mmpretrain are skipped and " \
      "their tests skip; carry wheels made by tools/fetch_gpu_wheels.sh"
  case "$missing" in *mm*|*pycocotools*) suites=${suites//maskrcnn/} ;; esac
fi

log "building the project and its CUDA extension (sm_90)"
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
  python3 -m pip install -q --no-build-isolation --no-deps -e . \
  >>"$OUT/gpu_check.log" 2>&1 || log "extension build FAILED (see gpu_check.log)"
python3 -m convnextv2_fast.info 2>&1 | tee -a "$OUT/gpu_check.log"

log "GPU tests: pytest -m gpu $tests"
# shellcheck disable=SC2086
TRITON_INTERPRET=0 CONVNEXTV2_FAST_REQUIRE_EXT=1 timeout 240 \
  python3 -m pytest -m gpu -q -rs $tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -30
test_rc=${PIPESTATUS[0]}

bench_rc=0
if [ -n "${suites// /}" ]; then
  log "benchmarks: $suites"
  # shellcheck disable=SC2086
  TRITON_INTERPRET=0 BENCH_BUDGET=short timeout "${BENCH_TIMEOUT:-330}" \
    python3 -m benchmarks --suites $suites --out "$OUT/bench.json" 2>&1 \
    | tee "$OUT/bench.log" | tail -80
  bench_rc=${PIPESTATUS[0]}
fi
log "done: tests rc=$test_rc, benchmarks rc=$bench_rc; results in $OUT" \
    "(copy bench.json/.md/.png to benchmarks/results/ and run" \
    "python -m benchmarks.report to refresh the README)"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
