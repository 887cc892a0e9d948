"""dwconv 7x7 + LayerNorm Triton op vs ops.reference (interpreter on CPU).

Shapes cover: N >= 2, H != W, C not a power of two and larger than one
channel block (BC=32 in both the interpreter's and the GPU's configs), images
smaller than a tile, partial tiles at each sample's edge.  Outputs come from
NaN-poisoned ``torch.empty`` (``check_parity``), so an unwritten element fails.
"""
import math

import pytest
import torch

from convnextv2_fast._errors import ArgumentError
from convnextv2_fast.ops import dwconv_ln as dmod
from convnextv2_fast.ops.dwconv_ln import (dwconv_ln, dwconv_ln_backward,
                                           dwconv_ln_forward, launch_config)
from convnextv2_fast.ops.reference import dwconv7x7_ln_ref

from _fused_testutil import check_parity

NAMES = ['z', 'dx', 'd_dw_weight', 'd_dw_bias', 'd_ln_weight', 'd_ln_bias']
# (N, C, H, W): sub-tile image; C > BC with H*W not a tile multiple; C < BC
SHAPES = [(2, 8, 5, 11), (2, 40, 9, 13), (3, 24, 10, 7)]


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


def _parity(shape, dtype, seed=0):
    inputs = _inputs(*shape, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    grad = torch.randn(shape[0], shape[2], shape[3], shape[1], generator=g)
    check_parity(NAMES, dwconv_ln, _ref, inputs, dtype, grad)


@pytest.mark.interpreter
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
@pytest.mark.parametrize('shape', SHAPES)
def test_dwconv_ln_parity(shape, dtype):
    _parity(shape, dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_dwconv_ln_parity_gpu_config(dtype, monkeypatch):
    """The exact tiles/grids the GPU launches, on a small case (2-D tiles
    8x8 / 4x8, several tiles per image, wgrad programs visiting several
    tiles, two or more channel blocks in every kernel)."""
    monkeypatch.setenv('CONVNEXTV2_FAST_GPU_CONFIG', '1')
    shape = (2, 72, 9, 10)
    if dtype == torch.float16:  # the big-image tiles (8x8) on this case
        monkeypatch.setattr(dmod, '_MIN_PROGRAMS', 0)
    for k in dmod.KERNELS:
        cfg = launch_config(k, *_nhwc(shape), dtype)
        assert cfg == launch_config(k, *_nhwc(shape), dtype, gpu=True)
        assert cfg.meta['BC'] < shape[1]
    monkeypatch.setattr(dmod, '_WGRAD_MIN_PROGRAMS', 6)  # G = 2 < units
    monkeypatch.setattr(dmod, '_WGRAD_MAX_PARTIAL_FRAC', 1e9)  # (tiny M)
    wg = launch_config('wgrad', *_nhwc(shape), dtype)
    assert 1 < wg.runtime['G'] <= wg.runtime['NUM_UNITS']
    if dtype == torch.float32:  # 8-row units: programs visit several
        assert wg.runtime['G'] < wg.runtime['NUM_UNITS']
    _parity(shape, dtype, seed=3)


@pytest.mark.interpreter
def test_dwconv_ln_parity_int64_offsets(monkeypatch):
    """The int64-offset variant (M*C >= 2**31 on real shapes) forced on."""
    monkeypatch.setattr(dmod, '_I64_ELEMS', 0)
    assert launch_config('dgrad', 1, 2, 2, 2).meta['I64']
    _parity((2, 40, 6, 9), torch.float32, seed=5)


def _nhwc(shape):
    N, C, H, W = shape
    return N, H, W, C


@pytest.mark.interpreter
def test_dwconv_ln_stats_and_out_dtype():
    x, dw_w, dw_b, ln_w, ln_b = _inputs(2, 40, 5, 6)
    z, mean, rstd = dwconv_ln_forward(x.half(), dw_w, dw_b, ln_w, ln_b,
                                      out_dtype=torch.float32)
    assert z.dtype == torch.float32 and mean.dtype == torch.float32
    y = torch.nn.functional.conv2d(x.half().float().permute(0, 3, 1, 2), dw_w,
                                   dw_b, padding=3, groups=40)
    y = y.permute(0, 2, 3, 1).reshape(-1, 40)
    torch.testing.assert_close(mean, y.mean(1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rstd, (y.var(1, unbiased=False) + 1e-6).rsqrt(),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.interpreter
@pytest.mark.parametrize('cd', [torch.float16, torch.bfloat16])
def test_dwconv_ln_backward_residual_and_dtypes(cd):
    """dres is added to dx; dx_dtype honoured; a half-precision z/dz
    (compute dtype) with an fp32 x (stage 1 under autocast) matches the fp32
    reference (bf16 only passes through loads/stores/casts: the kernels do
    their arithmetic in fp32)."""
    x, dw_w, dw_b, ln_w, ln_b = _inputs(2, 40, 6, 5)
    z, mean, rstd = dwconv_ln_forward(x, dw_w, dw_b, ln_w, ln_b,
                                      out_dtype=cd)
    assert z.dtype == cd
    zr = _ref(x, dw_w, dw_b, ln_w, ln_b)
    assert (z.float() - zr).abs().max() <= 4 * (zr.to(cd).float() -
                                                 zr).abs().max() + 1e-2
    dz = torch.randn_like(x).to(cd)
    dres = torch.randn_like(x)
    dx, d_w, d_b, d_lnw, d_lnb = dwconv_ln_backward(
        dz, x, dw_w, dw_b, ln_w, mean, rstd, dres=dres, dx_dtype=torch.float32)
    assert dx.dtype == torch.float32 and d_w.dtype == torch.float32
    xr = x.clone().requires_grad_()
    params = [t.clone().requires_grad_() for t in (dw_w, dw_b, ln_w, ln_b)]
    _ref(xr, *params).backward(dz.float())
    ref = [xr.grad + dres] + [p.grad for p in params]
    for name, got, want in zip(['dx', 'd_w', 'd_b', 'd_lnw', 'd_lnb'],
                               [dx, d_w, d_b, d_lnw, d_lnb], ref):
        err = (got - want).abs().max().item()
        scale = want.abs().max().item()
        assert err <= 2e-2 * scale + 1e-2, (name, err, scale)


@pytest.mark.interpreter
def test_dwconv_ln_weight_grads_deterministic():
    inputs = [t.requires_grad_() for t in _inputs(2, 40, 6, 5)]
    g = torch.randn(2, 6, 5, 40)
    grads = []
    for _ in range(2):
        for t in inputs:
            t.grad = None
        dwconv_ln(*inputs).backward(g)
        grads.append([t.grad.clone() for t in inputs])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# ---- launch configs at the real V2-B shapes (no kernel runs) -------------
def _stages():
    from benchmarks.shapes import MASKRCNN_V2B
    return MASKRCNN_V2B


@pytest.mark.parametrize('stage', range(4))
def test_launch_config_real_shapes(stage):
    s = _stages()[stage]
    N, H, W, C, M = s.N, s.H, s.W, s.C, s.M
    for k in dmod.KERNELS:
        dt = s.compute_dtype if k == 'dgrad' else s.stream_dtype
        cfg = launch_config(k, N, H, W, C, dt, gpu=True)
        assert cfg.meta['I64'] is False  # M*C < 2**31 at every stage
        assert cfg.num_stages == 1
        line = cfg.meta['BC'] * dt.itemsize
        # LN kernels loop over channel blocks: each block is a whole line
        assert line == 128 if k in ('fwd', 'ln_bwd') else line <= 128
        # enough programs to fill 132 SMs (fwd/ln_bwd: at least 128 at the
        # smallest tile; their channel blocks loop inside a program)
        assert math.prod(cfg.grid) >= 128
    wg = launch_config('wgrad', N, H, W, C, s.stream_dtype, gpu=True)
    G, n_cb = wg.grid
    # a few hundred programs (about 2 per SM at least), balanced: every
    # program the same number of units; partials small against the
    # activation
    assert G * n_cb >= 256
    units = wg.runtime['NUM_UNITS']
    per = -(-units // G)
    assert -(-units // per) == G
    act_bytes = M * C * s.compute_dtype.itemsize
    assert G * 49 * C * 4 <= 0.5 * act_bytes, (G, C, act_bytes)


def test_launch_config_rejects_unknown_kernel():
    with pytest.raises(ArgumentError, match='kernel must be one of'):
        launch_config('nope', 1, 8, 8, 8)


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
    check_parity(NAMES, dwconv_ln, _ref, inputs, dtype, grad, device='cuda')
