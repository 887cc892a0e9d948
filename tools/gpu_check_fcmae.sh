#!/usr/bin/env bash
# GPU check of the sparse FCMAE work, on a machine where the project is already
# installed with its CUDA extension (pip install --no-build-isolation -e . with
# TORCH_CUDA_ARCH_LIST=9.0).  Builds nothing.  Runs the GPU tests of the sparse
# ops / encoder / FCMAE and the encoder benchmark; well under 5 minutes on one H100.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export CONVNEXTV2_FAST_REQUIRE_EXT=1
export TRITON_INTERPRET=0

echo "== extension"
$PY -c "import torch, convnextv2_fast._C as C; \
assert C.WITH_CUDA, 'extension built without CUDA'; \
print('ok', C.__file__, torch.cuda.get_device_name())"

echo "== GPU tests"
timeout 60 $PY -m pytest -q -m gpu -rs tests/test_sparse_dwconv.py \
    tests/test_sparse_encoder.py tests/test_fcmae.py

echo "== benchmark (V2-B, 224^2, mask 0.6, bf16 autocast); rows -> benchmarks/results/"
# providers: fast = sparse, reference = dense-masked eager, compile = dense-masked
# torch.compile (its V2-B compile takes a minute or two: only at batch 64)
timeout 170 $PY benchmarks/bench_fcmae.py --batch 64 --iters 5 --warmup 2
timeout 60 $PY benchmarks/bench_fcmae.py --batch 16 --iters 5 --warmup 2 \
    --providers fast reference
