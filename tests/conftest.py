"""Shared test set-up.

* Triton runs in its CPU interpreter unless the caller set ``TRITON_INTERPRET``
  explicitly (the GPU check script sets ``TRITON_INTERPRET=0``).  It must be set
  before any ``@triton.jit`` function is created, hence here, at the top of the
  root conftest.
* No ``torch.cuda`` call happens at import or collection time: GPU tests use the
  ``requires_cuda`` marker, whose condition is evaluated when the test runs.
"""
import os

os.environ.setdefault('TRITON_INTERPRET', '1')

import pytest  # noqa: E402
import torch  # noqa: E402


def cuda_available() -> bool:
    return torch.cuda.is_available()


def pytest_runtest_setup(item):
    if item.get_closest_marker('gpu') is not None and not cuda_available():
        pytest.skip('needs a CUDA device: none on this machine '
                    '(run tools/gpu_check.sh on a GPU machine)')
    if item.get_closest_marker('interpreter') is not None and \
            os.environ.get('TRITON_INTERPRET') != '1':
        pytest.skip('interpreter test: TRITON_INTERPRET=1 is not set')


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 references must be true fp32 (cuDNN/cuBLAS may use TF32 on Hopper)."""
    old = (torch.backends.cuda.matmul.allow_tf32,
           torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    (torch.backends.cuda.matmul.allow_tf32,
     torch.backends.cudnn.allow_tf32) = old
