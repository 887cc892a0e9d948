#!/usr/bin/env bash
# GPU check of the fused Triton block, one command, well under 8 minutes.
#
#   bash tools/gpu_check_block.sh [python]
#
# On a CUDA machine with the project installed
# (`pip install --no-build-isolation --no-deps -e .`, or run from the repo root
# so `convnextv2_fast` is importable):
#   1. GPU parity tests of the fused ops (compiled Triton, TRITON_INTERPRET=0):
#      fp32/fp16/bf16 and bf16/fp16 autocast at real stage shapes, bit-identical
#      weight grads across runs, saved bytes/element with recompute;
#   2. the block benchmark (reference / compile / fast / fast_recompute, fwd and
#      fwd+bwd, V2-B 1024^2 stage shapes + a 224^2 batch), appending rows to
#      benchmarks/results/block-<gpu>.jsonl and printing a markdown table.
# Output is also written to $OUT (if set) or benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-${PYTHON:-python}}
export TRITON_INTERPRET=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=${OUT:-benchmarks/results}
mkdir -p "$RES"
start=$(date +%s)

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check_block.sh: no CUDA device')" || exit 2
"$PY" -c "import torch, triton; print('GPU', torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"

echo "== 1/2 GPU parity tests (fused ops) =="
timeout 240 "$PY" -m pytest -q -m gpu -rs \
  tests/test_fused_block.py tests/test_ops_dwconv_ln.py tests/test_ops_grn.py \
  2>&1 | tee "$RES/gpu_check_block_tests.log"
test_rc=${PIPESTATUS[0]}
echo "tests rc=$test_rc after $(( $(date +%s) - start )) s"

echo "== 2/2 block benchmark =="
timeout 300 "$PY" benchmarks/bench_block.py --iters 10 --results-dir "$RES" \
  2>&1 | tee "$RES/gpu_check_block_bench.log"
bench_rc=${PIPESTATUS[0]}
echo "bench rc=$bench_rc; total $(( $(date +%s) - start )) s"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
