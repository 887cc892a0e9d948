#!/usr/bin/env bash
# GPU check of sparse FCMAE (issue: sparse conv + FCMAE), well under 5
# minutes: the CUDA extension vs its CPU twin in all dtypes, bit-identical
# weight grads, sparse encoder on GPU, and the V2-B FCMAE encoder benchmark
# (sparse vs dense-masked eager vs dense-masked torch.compile, 224^2, mask 0.6).
#   bash tools/gpu_check_fcmae.sh [--wheels DIR]
exec bash "$(dirname "$0")/gpu_check.sh" --suites fcmae --tests \
  "tests/test_sparse_dwconv.py tests/test_sparse_encoder.py tests/test_fcmae.py" "$@"
