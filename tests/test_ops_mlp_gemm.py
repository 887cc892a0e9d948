"""The Triton MLP GEMMs (convnextv2_fast.ops.mlp_gemm) on the interpreter:
every output of the four host functions against an fp64 torch composition,
with the 2x-same-dtype-error rule, at the interpreter's tiles and at the
GPU's (CONVNEXTV2_FAST_GPU_CONFIG=1: 128-row tiles, the dW2 pixel split),
with pixel counts, C and K that are not multiples of any tile and several
samples (a sample boundary falls inside every tile grid).  The whole fused
block / backbone with ``mlp='triton'`` is covered in test_fused_block.py."""
import math

import pytest
import torch
import torch.nn.functional as F

from convnextv2_fast._errors import ArgumentError
from convnextv2_fast.ops import mlp_gemm as M
from convnextv2_fast.testing import assert_close_to_ref

from _fused_testutil import GPU_CONFIGS, poisoned_empty, set_gpu_config

pytestmark = pytest.mark.interpreter

DTYPES = pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
CONFIGS = GPU_CONFIGS


@pytest.fixture
def tiles(monkeypatch, gpu_config):
    set_gpu_config(monkeypatch, gpu_config)
    M._launch_config.cache_clear()
    yield
    M._launch_config.cache_clear()


def _inputs(N=3, HW=37, C=20, seed=0):
    """fp32 master inputs; K = 4C = 80 (not a multiple of 32/64/128)."""
    g = torch.Generator().manual_seed(seed)
    K = 4 * C

    def rn(*s, sc=1.):
        return torch.randn(*s, generator=g) * sc

    return dict(z=rn(N, HW, C), w1=rn(K, C, sc=0.3), b1=rn(K, sc=0.2),
                h=rn(N, HW, K), scale=1 + rn(N, K, sc=0.3),
                w2=rn(C, K, sc=0.2), bias=rn(C), r=rn(N, C).abs(),
                res=rn(N, HW, C), dout=rn(N, HW, C), beta=rn(K),
                db2=rn(C))


def torch_mlp(t, dt):
    """The four ops' math in torch, activations/weights in ``dt`` (the
    same-dtype reference) or fp64 (the high-precision one); per-sample
    vectors stay fp32 (or fp64)."""
    hi = torch.float64 if dt == torch.float64 else torch.float32
    a = {k: v.to(dt) for k, v in t.items()
         if k in ('z', 'w1', 'h', 'w2', 'res', 'dout', 'h_pw1')}
    v = {k: t[k].to(hi) for k in ('b1', 'scale', 'bias', 'r', 'beta', 'db2')}
    h1 = a['z'] @ a['w1'].t() + v['b1'].to(dt)
    u1 = F.gelu(h1)
    u = F.gelu(a['h'])
    q = u * v['scale'][:, None].to(dt)
    # pw2's operand: GELU of pw1's own h when given (the kernels chain)
    u2 = F.gelu(a.get('h_pw1', a['h']))
    out = a['res'] + v['r'][:, None] * (
        (u2 * v['scale'][:, None].to(dt)) @ a['w2'].t() + v['bias'][None])
    da = a['dout'] * v['r'][:, None].to(dt)
    dv = da @ a['w2']
    P = torch.einsum('npc,npk->nck', a['dout'].to(hi), u.to(hi))
    sp = P * v['scale'][:, None, :]
    colsum = a['dout'].to(hi).sum(1)
    w2 = a['w2'].to(hi)
    return dict(
        h=h1, u=u1, S=(u1 * u1).sum(1).to(hi), out=out.to(a['res'].dtype),
        dv=dv, q=q, R=(dv * u).sum(1).to(hi),
        dw2=(v['r'][:, :, None] * sp).sum(0)
        + v['db2'][:, None] * v['beta'][None],
        dbeta=w2.t() @ v['db2'],
        drw=(w2[None] * sp).sum(2) + colsum * (w2 @ v['beta'])[None])


def run_kernels(t, dt, need_dr):
    a = {k: t[k].to(dt) for k in ('z', 'w1', 'h', 'w2')}
    with poisoned_empty():
        h, u, spart = M.pw1_forward(a['z'], a['w1'], t['b1'])
        # pw2 consumes exactly what pw1 emits (u of its own h, not of t['h'])
        out = M.pw2_residual_forward(u, t['scale'], a['w2'], t['bias'],
                                     t['r'], t['res'].to(dt))
        dout = t['dout'].to(dt)
        # da = dout * r as scale_colsum forms it (tested with that op)
        da = (dout.float() * t['r'][:, None]).to(dt)
        colsum = dout.float().sum(1)
        dv, q, rpart = M.dv_backward(da, a['w2'], a['h'], t['scale'])
        dw2, dbeta, drw = M.dw2_backward(
            dout if need_dr else da, t['r'], q, a['w2'], t['beta'],
            t['db2'], colsum, need_dr)
    # the per-tile partials summed here (the GEMMs' part of S and R)
    return dict(h=h, u=u, S=spart.sum(1), out=out, dv=dv, q=q,
                R=rpart.sum(1), dw2=dw2, dbeta=dbeta, drw=drw)


@CONFIGS
@DTYPES
@pytest.mark.parametrize('need_dr', [False, True], ids=['no_dr', 'dr'])
def test_mlp_gemm_parity(tiles, dtype, need_dr):
    t = _inputs()
    cand = run_kernels(t, dtype, need_dr)
    # pw2's input is pw1's u: the references start from the same-dtype h
    t['h_pw1'] = cand['h'].float()
    same = torch_mlp(t, dtype)
    high = torch_mlp(t, torch.float64)
    for name, c in cand.items():
        if name == 'drw' and not need_dr:
            assert c is None
            continue
        assert torch.isfinite(c).all(), name
        assert_close_to_ref(name, c, same[name].to(c.dtype), high[name],
                            dtype=dtype)


@CONFIGS
def test_dw2_split_is_deterministic_and_covers_every_pixel(tiles, gpu_config):
    """Several pixel splits (a fixed-order partial sum): bit-identical
    across runs, and equal to one split's result up to fp32 reordering."""
    t = _inputs(N=2, HW=300, C=8)
    cfg = M.launch_config('dw2', 2, 300, 8, 32)
    assert cfg.grid[2] > 1 and cfg.split * cfg.grid[2] >= 300
    colsum = t['dout'].sum(1)
    q = F.gelu(t['h']) * t['scale'][:, None]
    args = (t['dout'], t['r'], q, t['w2'], t['beta'], t['db2'], colsum, True)
    first = M.dw2_backward(*args)
    second = M.dw2_backward(*args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    high = torch_mlp(t, torch.float64)
    for name, c in zip(('dw2', 'dbeta', 'drw'), first):
        torch.testing.assert_close(c.double(), high[name], rtol=1e-4,
                                   atol=1e-4, msg=name)


def test_gpu_configs_are_wgmma_tiles_and_fill_the_gpu():
    """The shipped GPU tiles: 128-row (or 128-channel) tiles, 8 warps
    (two warpgroups: wgmma on sm_90), at least one wave of 132 SMs and >= 90%
    wave efficiency at the V2-B Mask R-CNN stages; the dW2 pixel split gives
    about two waves, covers every pixel and leaves little idle time."""
    for C, HW in ((128, 256 * 256), (256, 128 * 128), (512, 64 * 64),
                  (1024, 32 * 32)):
        for k in M.KERNELS:
            cfg = M.launch_config(k, 2, HW, C, 4 * C, gpu=True)
            assert cfg.num_warps == 8 and 128 in (cfg.BM, cfg.BN), cfg
            progs = math.prod(cfg.grid)
            assert progs >= (250 if k.startswith('dw2') else 128), cfg
            assert progs / (math.ceil(progs / 132) * 132) >= 0.9, cfg
        for k in ('dw2', 'dw2_dr'):
            cfg = M.launch_config(k, 2, HW, C, 4 * C, gpu=True)
            S = cfg.grid[2]
            assert cfg.split % cfg.BK == 0 and cfg.split * S >= HW
            assert cfg.split * (S - 1) < HW  # no empty split
            # little idle time: useful work / (waves x the longest program)
            tiles = cfg.grid[0] * cfg.grid[1]
            waves = math.ceil(tiles * S / 132)
            assert HW * tiles / (waves * 132 * cfg.split) >= 0.9, cfg


def test_bad_inputs_name_the_argument():
    t = _inputs(N=1, HW=5, C=4)
    with pytest.raises(TypeError, match='w1'):
        M.pw1_forward(t['z'].half(), t['w1'], t['b1'])
    with pytest.raises(ArgumentError, match='w1'):
        M.pw1_forward(t['z'], t['w1'][:, :3], t['b1'])
    with pytest.raises(ArgumentError, match='res'):
        M.pw2_residual_forward(t['h'], t['scale'], t['w2'], t['bias'],
                               t['r'], t['res'][:, :4])
    with pytest.raises(TypeError, match='scale'):
        M.pw2_residual_forward(t['h'], t['scale'].double(), t['w2'],
                               t['bias'], t['r'], t['res'])
    with pytest.raises(ArgumentError, match='kernel'):
        M.launch_config('nope', 1, 1, 1, 1)
