"""GELU + GRN (+ pw2 with the GRN folded in) and layer-scale/drop-path/residual
Triton ops vs ops.reference (interpreter on CPU)."""
import pytest
import torch

from convnextv2_fast._errors import ArgumentError
from convnextv2_fast.ops.gelu_grn import (gelu_grn_pw2, gelu_sumsq_forward,
                                          grn_pw2_forward)
from convnextv2_fast.ops.layer_scale_residual import (ScaleResidualFunction,
                                                      scale_residual_forward)
from convnextv2_fast.ops.reference import gelu_grn_pw2_ref, scale_residual_ref

from _fused_testutil import check_parity, run_with_grads

# (N, HW, C): hidden K = 4C
SHAPES = [(2, 35, 8), (2, 117, 24), (2, 63, 40)]


def _inputs(N, HW, C, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = 4 * C
    h = torch.randn(N, HW, K, generator=g)
    h[1] = 2 * h[1] - 0.3  # different statistics per sample
    gamma = torch.randn(K, generator=g)  # non-zero GRN params
    beta = torch.randn(K, generator=g)
    w2 = torch.randn(C, K, generator=g) / K**0.5
    b2 = torch.randn(C, generator=g)
    return [h, gamma, beta, w2, b2]


@pytest.mark.interpreter
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
@pytest.mark.parametrize('shape', SHAPES)
def test_gelu_grn_pw2_parity(shape, dtype):
    inputs = _inputs(*shape)
    grad = torch.randn(shape)
    check_parity(['a', 'dh', 'd_grn_gamma', 'd_grn_beta', 'd_w2', 'd_b2'],
                 gelu_grn_pw2, gelu_grn_pw2_ref, inputs, dtype, grad)


@pytest.mark.interpreter
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_gelu_grn_pw2_parity_gpu_tile_configs(dtype, monkeypatch):
    """The tile sizes the host picks on a GPU (smaller than the
    interpreter's): several, partly masked, pixel/channel blocks and W2-fold
    tiles, at a small shape."""
    from convnextv2_fast.ops import gelu_grn
    monkeypatch.setenv('CONVNEXTV2_FAST_GPU_CONFIG', '1')
    N, HW, C = 2, 117, 24
    assert gelu_grn._blocks(4 * C) == (64, 64)
    assert gelu_grn.fold_blocks(C, 4 * C) == (16, 128)
    inputs = _inputs(N, HW, C)
    grad = torch.randn(N, HW, C)
    check_parity(['a', 'dh', 'd_grn_gamma', 'd_grn_beta', 'd_w2', 'd_b2'],
                 gelu_grn_pw2, gelu_grn_pw2_ref, inputs, dtype, grad)


@pytest.mark.interpreter
def test_gelu_sumsq_matches_torch():
    h = _inputs(2, 35, 8)[0]
    u, spart = gelu_sumsq_forward(h)
    S = spart.sum(1)
    ur = torch.nn.functional.gelu(h)
    torch.testing.assert_close(u, ur, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(S, (ur * ur).sum(1), rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
def test_grn_zero_channel_is_finite():
    """A hidden channel that is 0 everywhere (G = 0): no 0/0 anywhere, and
    a whole sample that is 0 (mean G = 0) too."""
    h, gamma, beta, w2, b2 = _inputs(2, 35, 8)
    h[:, :, 3] = -20.  # GELU(-20) == 0 exactly -> u == 0 in channel 3
    h[1] = -20.  # sample 1 entirely zero after GELU
    grad = torch.randn(2, 35, 8)
    check_parity(['a', 'dh', 'd_grn_gamma', 'd_grn_beta', 'd_w2', 'd_b2'],
                 gelu_grn_pw2, gelu_grn_pw2_ref, [h, gamma, beta, w2, b2],
                 torch.float32, grad)
    for dtype in (torch.float32, torch.float16):
        outs = run_with_grads(gelu_grn_pw2, [h, gamma, beta, w2, b2], dtype,
                              grad)
        for t in outs:
            assert torch.isfinite(t).all()


@pytest.mark.interpreter
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_scale_residual_parity(dtype):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 45, 24, generator=g)
    r = torch.randn(2, 24, generator=g)
    res = torch.randn(2, 45, 24, generator=g)
    grad = torch.randn(2, 45, 24, generator=g)

    def cand(a, r, res):
        return ScaleResidualFunction.apply(a, r.float(), res)

    def ref(a, r, res):
        return scale_residual_ref(a, r, res)

    check_parity(['out', 'da', 'dr', 'dres'], cand, ref, [a, r, res], dtype,
                 grad)


def test_grn_bad_inputs():
    h, gamma, beta, w2, b2 = _inputs(2, 35, 8)
    with pytest.raises(ArgumentError, match='h must be 3-D'):
        grn_pw2_forward(h[0], gamma, beta, w2, b2)
    with pytest.raises(TypeError, match='h must have dtype'):
        gelu_sumsq_forward(h.double())
    with pytest.raises(ArgumentError, match='grn_gamma must have shape'):
        grn_pw2_forward(h, gamma[:5], beta, w2, b2)
    with pytest.raises(ArgumentError, match='w2 must have shape'):
        grn_pw2_forward(h, gamma, beta, w2[:, :7], b2)
    with pytest.raises(ArgumentError, match='r must have shape'):
        scale_residual_forward(h, torch.ones(3, 32))


@pytest.mark.gpu
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16,
                                   torch.bfloat16])
@pytest.mark.parametrize('shape', [(2, 64 * 64, 512), (2, 25 * 42, 1024)])
def test_gpu_gelu_grn_pw2_parity(shape, dtype):
    inputs = _inputs(*shape)
    grad = torch.randn(shape)
    check_parity(['a', 'dh', 'd_grn_gamma', 'd_grn_beta', 'd_w2', 'd_b2'],
                 gelu_grn_pw2, gelu_grn_pw2_ref, inputs, dtype, grad,
                 device='cuda')


def test_hidden_beyond_int32_offsets_is_refused():
    """The GELU/GRN kernels index within a sample in int32: a larger
    hidden tensor is refused with a message, never silently wrapped."""
    from convnextv2_fast.ops.gelu_grn import MAX_HIDDEN_PER_SAMPLE, check_hidden
    ok = torch.empty((1, 2**21, 1023), device='meta')
    assert check_hidden(ok) is ok
    with pytest.raises(ValueError, match='int32'):
        check_hidden(torch.empty((1, 2**21, 1024), device='meta'))
    assert 2**21 * 1024 > MAX_HIDDEN_PER_SAMPLE >= 2**21 * 1023
