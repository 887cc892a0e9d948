"""dwconv 7x7 + LayerNorm Triton op vs ops.reference (interpreter on CPU)."""
import pytest
import torch

from convnextv2_fast._errors import ArgumentError
from convnextv2_fast.ops.dwconv_ln import dwconv_ln, dwconv_ln_forward
from convnextv2_fast.ops.reference import dwconv7x7_ln_ref

from _fused_testutil import check_parity

SHAPES = [(2, 8, 5, 11), (2, 24, 9, 13), (2, 40, 16, 7)]


def _inputs(N, C, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, W, C, generator=g)  # NHWC; per-sample content
    dw_w = torch.randn(C, 1, 7, 7, generator=g) * 0.2
    dw_b = torch.randn(C, generator=g)
    ln_w = 1 + 0.5 * torch.randn(C, generator=g)
    ln_b = 0.5 * torch.randn(C, generator=g)
    return [x, dw_w, dw_b, ln_w, ln_b]


def _ref(x, dw_w, dw_b, ln_w, ln_b):
    return dwconv7x7_ln_ref(x.permute(0, 3, 1, 2), dw_w, dw_b, ln_w, ln_b)


@pytest.mark.interpreter
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
@pytest.mark.parametrize('shape', SHAPES)
def test_dwconv_ln_parity(shape, dtype):
    inputs = _inputs(*shape)
    grad = torch.randn(shape[0], shape[2], shape[3], shape[1])
    check_parity(['z', 'dx', 'd_dw_weight', 'd_dw_bias', 'd_ln_weight',
                  'd_ln_bias'], dwconv_ln, _ref, inputs, dtype, grad)


@pytest.mark.interpreter
def test_dwconv_ln_stats_and_out_dtype():
    x, dw_w, dw_b, ln_w, ln_b = _inputs(2, 8, 5, 6)
    z, mean, rstd = dwconv_ln_forward(x.half(), dw_w, dw_b, ln_w, ln_b,
                                      out_dtype=torch.float32)
    assert z.dtype == torch.float32 and mean.dtype == torch.float32
    y = torch.nn.functional.conv2d(x.half().float().permute(0, 3, 1, 2), dw_w,
                                   dw_b, padding=3, groups=8)
    y = y.permute(0, 2, 3, 1).reshape(-1, 8)
    torch.testing.assert_close(mean, y.mean(1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rstd, (y.var(1, unbiased=False) + 1e-6).rsqrt(),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.interpreter
def test_dwconv_ln_weight_grads_deterministic():
    inputs = [t.requires_grad_() for t in _inputs(2, 8, 9, 7)]
    g = torch.randn(2, 9, 7, 8)
    grads = []
    for _ in range(2):
        for t in inputs:
            t.grad = None
        dwconv_ln(*inputs).backward(g)
        grads.append([t.grad.clone() for t in inputs])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_dwconv_ln_bad_inputs():
    x, dw_w, dw_b, ln_w, ln_b = _inputs(2, 8, 5, 6)
    with pytest.raises(ArgumentError, match='x must be 4-D'):
        dwconv_ln_forward(x[0], dw_w, dw_b, ln_w, ln_b)
    with pytest.raises(TypeError, match='x must have dtype'):
        dwconv_ln_forward(x.double(), dw_w, dw_b, ln_w, ln_b)
    with pytest.raises(ArgumentError, match='x must be contiguous'):
        dwconv_ln_forward(x.transpose(1, 2), dw_w, dw_b, ln_w, ln_b)
    with pytest.raises(ArgumentError, match='dw_weight must have shape'):
        dwconv_ln_forward(x, dw_w[:4], dw_b, ln_w, ln_b)
    with pytest.raises(ArgumentError, match='ln_bias must have shape'):
        dwconv_ln_forward(x, dw_w, dw_b, ln_w, ln_b[:3])


@pytest.mark.gpu
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16,
                                   torch.bfloat16])
@pytest.mark.parametrize('shape', [(2, 128, 96, 80), (2, 1024, 25, 42)])
def test_gpu_dwconv_ln_parity(shape, dtype):
    inputs = _inputs(*shape)
    grad = torch.randn(shape[0], shape[2], shape[3], shape[1])
    check_parity(['z', 'dx', 'd_dw_weight', 'd_dw_bias', 'd_ln_weight',
                  'd_ln_bias'], dwconv_ln, _ref, inputs, dtype, grad,
                 device='cuda')
