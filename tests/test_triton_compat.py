"""convnextv2_fast/ops/_triton_compat.py: Triton 3.6's interpreter under
numpy >= 2.4 (``range()`` over a runtime scalar argument)."""
import pytest
import torch
import triton
import triton.language as tl

from convnextv2_fast.ops import _common, _triton_compat  # noqa: F401


@triton.jit
def _sum_tiles_kernel(X, OUT, N_TILES, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], tl.float32)
    for t in range(N_TILES):  # __index__ of a runtime scalar in the interpreter
        acc += tl.load(X + t * BLOCK + tl.arange(0, BLOCK))
    tl.store(OUT + tl.arange(0, BLOCK), acc)


@pytest.mark.interpreter
def test_range_over_runtime_scalar():
    x = torch.arange(24, dtype=torch.float32)
    out = torch.empty(8)
    _sum_tiles_kernel[(1, )](x, out, 3, BLOCK=8)
    torch.testing.assert_close(out, x.view(3, 8).sum(0))


def test_patch_only_where_needed():
    from triton.runtime import interpreter
    fn = interpreter._patch_lang_tensor
    if _triton_compat.APPLIED:  # an old interpreter: now patched, once
        assert fn._squeezes_index and not _triton_compat.apply()
    else:  # already squeezes (triton >= 3.8), or patched by an earlier import
        assert getattr(fn, '_squeezes_index', False) or \
            not _triton_compat._needs_index_fix(fn)
