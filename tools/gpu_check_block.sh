#!/usr/bin/env bash
# GPU check of the fused Triton block (issue: fused kernels), well under
# 8 minutes: GPU parity tests of the fused ops (fp32/fp16/bf16 and autocast at
# real stage shapes, bit-identical weight grads, saved bytes with recompute)
# and the block benchmark (reference / compile /
# fast / fast_recompute, fwd and fwd+bwd, V2-B 1024^2 stage shapes + 224^2).
#   bash tools/gpu_check_block.sh [--wheels DIR]
exec bash "$(dirname "$0")/gpu_check.sh" --suites block --tests \
  "tests/test_fused_block.py tests/test_ops_dwconv_ln.py tests/test_ops_grn.py" "$@"
