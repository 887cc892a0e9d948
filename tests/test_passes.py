"""The fused block's hidden passes, temporaries, weight recasts and layout
copies (issue 8, section 2) stay gone: shown at the dispatcher (every aten op
the host code issues is logged, see ``_dispatch_count.OpLog``), each check
next to a deliberately bad variant it must catch."""
import pytest
import torch

from convnextv2_fast import ConvNeXtV2Fast, LayerNorm2d
from convnextv2_fast.ops.fused_block import (fused_block_backward,
                                             fused_block_forward)
from convnextv2_fast.ops.grn_stats import grn_stats_reference

from _dispatch_count import OpLog

N, H, W, C = 2, 9, 11, 8  # E >= 4 * C * K: save mode keeps the weight casts
K = 4 * C
HW, E = H * W, N * H * W * C


def _block_inputs(ls=False, seed=0, hw=(H, W)):
    """fp32 params and stream, as under autocast (compute dtype fp16)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, *hw, C, generator=g)
    params = [torch.randn(C, 1, 7, 7, generator=g) / 7,  # dw_w
              torch.randn(C, generator=g), 1 + 0.2 * torch.randn(C, generator=g),
              torch.randn(C, generator=g) * 0.2,
              torch.randn(K, C, generator=g) / C**0.5, torch.randn(K, generator=g),
              torch.randn(K, generator=g), torch.randn(K, generator=g),
              torch.randn(C, K, generator=g) / K**0.5, torch.randn(C, generator=g)]
    r = (0.5 + torch.rand(N, C, generator=g)) if ls else torch.ones(N, C)
    return x, params, r


def _fwd_bwd(save=True, need_dr=False, ls=False, pass_casts=True, hw=(H, W)):
    x, p, r = _block_inputs(ls, hw=hw)
    cd = torch.float16
    with OpLog() as fwd:
        out, z, h, mean, rstd, S, w1c, w2c = fused_block_forward(
            x, *p, r, compute_dtype=cd, save=save)
    dout = torch.randn_like(out)
    w1 = w1c if pass_casts and w1c.numel() else p[4]
    w2 = w2c if pass_casts and w2c.numel() else p[8]
    with OpLog() as bwd:
        grads = fused_block_backward(
            dout, x, z, h, mean, rstd, S, *p[:4], w1, p[5], p[6], p[7], w2,
            p[9], r, compute_dtype=cd, save=save, need_dr=need_dr)
    return fwd, bwd, (w1c, w2c), grads


def _wsized(log):
    """New tensors with the (N, C, K) element count: (op, shape, dtype)."""
    return [t for t in log.new_tensors()
            if len(t[1]) >= 2 and torch.Size(t[1]).numel() == N * C * K]


def _wsized_fp32(log):
    return [t for t in _wsized(log) if t[2] == torch.float32]


@pytest.mark.interpreter
@pytest.mark.parametrize('need_dr', [False, True], ids=['no_dr', 'dr'])
def test_w2_fold_no_fp32_nck_temporaries(need_dr):
    fwd, bwd, _, _ = _fwd_bwd(need_dr=need_dr, ls=need_dr)
    assert not _wsized_fp32(fwd) and not _wsized_fp32(bwd)
    # one (N, C, K) tensor each way, in the compute dtype: the scaled W2
    # copies (forward) and the bmm output P (backward)
    assert [t[1:] for t in _wsized(fwd)] == [((N, C, K), torch.float16)]
    assert _wsized(bwd) == [('aten.bmm', (N, C, K), torch.float16)]
    # the checks catch the old formulation
    with OpLog() as bad:
        w2, S = torch.randn(C, K), torch.rand(N, K)
        scale = grn_stats_reference(S, torch.randn(K))[3]
        (w2[None] * scale[:, None, :]).to(torch.float16)
    assert _wsized_fp32(bad)


@pytest.mark.interpreter
def test_no_bias_broadcast_gemm():
    fwd, _, _, _ = _fwd_bwd()
    names = [o.name for o in fwd.ops]
    assert 'aten.baddbmm' not in names and names.count('aten.bmm') == 1
    # nothing (N, HW, C)-sized but the pw2 output and the block output
    assert len([t for t in fwd.new_tensors()
                if torch.Size(t[1]).numel() == E]) == 3  # z, a, out


def _big_reductions(log):
    return [o for o in log.ops if o.name == 'aten.sum'
            and max(torch.Size(s).numel() for s, _ in o.inputs[:1]) >= E]


@pytest.mark.interpreter
@pytest.mark.parametrize('ls', [False, True], ids=['no_ls', 'ls'])
def test_bias_grads_without_extra_passes(ls):
    """db1 (over dh, (N*HW, K)) and the dout column sums (over (N, HW, C))
    come from kernels that already pass over those tensors: no torch
    reduction reads anything activation-sized."""
    _, bwd, _, _ = _fwd_bwd(need_dr=ls, ls=ls)
    assert not _big_reductions(bwd)
    with OpLog() as bad:
        torch.randn(N * HW, K, dtype=torch.float16).sum(0,
                                                        dtype=torch.float32)
    assert _big_reductions(bad)


def _weight_casts(log):
    """Casts of fp32 pointwise weights (the weight grad's GEMM-output cast,
    half -> fp32 on CPU, is not a weight recast)."""
    return [o for o in log.ops if o.copy == 'cast'
            and o.inputs[0] in (((K, C), torch.float32),
                                ((C, K), torch.float32))]


@pytest.mark.interpreter
def test_pointwise_weights_cast_once():
    fwd, bwd, (w1c, w2c), _ = _fwd_bwd(save=True)
    assert len(_weight_casts(fwd)) == 1  # w1 (torch); w2 in the fold kernel
    assert w1c.dtype == w2c.dtype == torch.float16
    assert w1c.shape == (K, C) and w2c.shape == (C, K)
    assert not _weight_casts(bwd)
    # what the check sees when the backward gets the fp32 weights
    _, bad, _, _ = _fwd_bwd(save=True, pass_casts=False)
    assert len(_weight_casts(bad)) == 2
    # recompute mode keeps no weight copies (memory first) and recasts
    _, bwd_r, (w1r, w2r), _ = _fwd_bwd(save=False)
    assert w1r.numel() == 0 and w2r.numel() == 0
    assert len(_weight_casts(bwd_r)) == 2
    # save mode where a cast would exceed E/4 elements (4C^2 > E/4,
    # V2-B stage 4): not kept, recast in the backward (the saved-bytes gate)
    _, bwd_s, (w1s, w2s), _ = _fwd_bwd(save=True, hw=(3, 5))
    assert 4 * C * K > N * 3 * 5 * C
    assert w1s.numel() == 0 and w2s.numel() == 0
    assert len(_weight_casts(bwd_s)) == 2


@pytest.mark.interpreter
def test_saved_weights_are_the_casts():
    """Under autocast the autograd function saves the fp16 casts of w1/w2 in
    place of the fp32 parameters, and grads keep the parameters' dtype."""
    from test_fused_block import block_input, make_block, variant
    blk = variant(make_block(C), torch.float32, 'triton')
    x = block_input(N, C, H, W, torch.float32).requires_grad_()
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast('cpu', dtype=torch.float16):
            y = blk(x)
    wshapes = [s for s in saved if s[0] in ((K, C), (C, K))]
    assert sorted(wshapes, key=str) == sorted(
        [((K, C), torch.float16), ((C, K), torch.float16)], key=str)
    y.sum().backward()
    for p in blk.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32


def test_weight_grad_gemm_fp32_output_on_gpu_and_meta():
    """On CUDA (checked here on meta, same dispatch) the pw1 weight-grad GEMM
    writes fp32 itself: no half output cast afterwards."""
    from convnextv2_fast.ops.fused_block import mm_f32
    a = torch.empty(K, N * HW, dtype=torch.bfloat16, device='meta')
    b = torch.empty(N * HW, C, dtype=torch.bfloat16, device='meta')
    with OpLog() as log:
        out = mm_f32(a, b)
    assert out.dtype == torch.float32 and out.shape == (K, C)
    assert [o.name for o in log.ops] == ['aten.mm']


def _bwd_op_calls(blk, x):
    with OpLog() as log:
        blk(x).sum().backward()
    return log.named('convnextv2_fast.block_bwd')


@pytest.mark.interpreter
@pytest.mark.parametrize('ls', [0., 0.5], ids=['no_ls', 'ls'])
def test_dr_only_when_r_needs_grad(ls):
    from test_fused_block import block_input, make_block, variant
    blk = variant(make_block(C, ls=ls), torch.float32, 'triton')
    x = block_input(N, C, H, W, torch.float32).requires_grad_()
    (call, ) = _bwd_op_calls(blk, x)
    need_dr, mlp = call.args[-2:]
    assert mlp == 'cublas'
    dr_shape = call.outputs[-1][0]
    if ls:
        assert need_dr is True and dr_shape == (N, C)
        assert blk.gamma.grad is not None
    else:
        assert need_dr is False and dr_shape == (0, )


# --------------------------------------------------------------------------
# layout copies between stages
# --------------------------------------------------------------------------
def _backbone(impl):
    torch.manual_seed(0)
    m = ConvNeXtV2Fast(arch=dict(depths=[1, 1], channels=[8, 16]),
                       use_grn=True, layer_scale_init_value=0.,
                       out_indices=[0, 1], gap_before_final_norm=False,
                       impl=impl)
    with torch.no_grad():
        for blk in m.blocks():
            blk.grn.gamma.normal_()
            blk.grn.beta.normal_()
    return m


def _activation_copies(log, n=2):
    """Copies (explicit or hidden in a kernel) of (n, ...) 4-D tensors."""
    return [(o.name, o.copy, o.inputs[0][0]) for o in log.copies()
            if len(o.inputs[0][0]) == 4 and o.inputs[0][0][0] == n]


@pytest.mark.interpreter
@pytest.mark.parametrize('impl', ['reference', 'triton'])
def test_backbone_layout_copies(impl):
    m = _backbone(impl)
    x = torch.randn(2, 3, 40, 56)
    with OpLog() as fwd:
        outs = m(x)
    assert all(o.is_contiguous() for o in outs)
    # forward: the image into channels_last, one NCHW copy per output
    assert _activation_copies(fwd) == [
        ('aten.clone', 'copy', (2, 3, 40, 56)),
        ('aten.clone', 'copy', (2, 8, 10, 14)),
        ('aten.clone', 'copy', (2, 16, 5, 7))]
    with OpLog() as bwd:
        torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
    # backward: the NCHW output grads are normalised through the out norms'
    # NHWC views (one hidden copy each); nothing else activation-sized
    assert sorted(_activation_copies(bwd), key=str) == sorted([
        ('aten.native_layer_norm_backward', 'hidden', (2, 10, 14, 8)),
        ('aten.native_layer_norm_backward', 'hidden', (2, 5, 7, 16))],
        key=str)


def test_layer_norm_2d_channels_last_no_copy():
    ln = LayerNorm2d(8, eps=1e-6)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(2, 8, 5, 7)
    xcl = x.contiguous(memory_format=torch.channels_last)
    with OpLog() as good:
        ycl = ln(xcl)
    with OpLog() as nchw:  # mmpretrain's path: hidden copy + .contiguous()
        y = ln(x)
    assert not good.copies()
    assert [o.copy for o in nchw.copies()] == ['hidden', 'copy']
    assert ycl.is_contiguous(memory_format=torch.channels_last)
    assert y.is_contiguous()
    assert torch.equal(y, ycl)  # same numerics
    assert list(ln.state_dict()) == ['weight', 'bias']


@pytest.mark.interpreter
@pytest.mark.parametrize('mlp', ['cublas', 'triton'])
@pytest.mark.parametrize('save,need_dr', [(True, False), (False, True)],
                         ids=['save_no_dr', 'recompute_dr'])
def test_custom_op_fake_impls_match(save, need_dr, mlp):
    """opcheck: the fake impls of block_fwd / block_bwd give the real
    outputs' shapes, dtypes and strides with the new outputs (w1c, w2c) and
    the need_dr flag (fp32 params, fp16 compute, as under autocast)."""
    from convnextv2_fast.ops.fused_block import _block_bwd_op, _block_fwd_op
    x, p, r = _block_inputs(ls=need_dr)
    cfg = (1e-6, 1e-6, torch.float16, save)
    fwd_args = (x, *p, r, *cfg, mlp)
    torch.library.opcheck(_block_fwd_op, fwd_args,
                          test_utils=('test_faketensor', ))
    out, z, h, mean, rstd, S, w1c, w2c = _block_fwd_op(*fwd_args)
    w1 = w1c if w1c.numel() else p[4]
    w2 = w2c if w2c.numel() else p[8]
    bwd_args = (torch.randn_like(out), x, z, h, mean, rstd, S, *p[:4], w1,
                p[5], p[6], p[7], w2, p[9], r, *cfg, need_dr, mlp)
    torch.library.opcheck(_block_bwd_op, bwd_args,
                          test_utils=('test_faketensor', ))


@pytest.mark.interpreter
def test_block_layer_scale_gpu_tile_configs(monkeypatch):
    """The dr path of the W2-fold backward (layer scale) and the bias /
    column-sum kernels with the tile sizes the host picks on a GPU."""
    from test_fused_block import block_input, make_block, names, run, variant
    monkeypatch.setenv('CONVNEXTV2_FAST_GPU_CONFIG', '1')
    Cb = 24
    blk = make_block(Cb, ls=0.5)
    x = block_input(2, Cb, 9, 13, torch.float32)
    grad = torch.randn(2, Cb, 9, 13)
    cand = run(variant(blk, torch.float32, 'triton'), x, grad, poison=True)
    ref = run(variant(blk, torch.float64, 'reference'), x.double(), grad)
    for n, c, r in zip(names(blk), cand, ref):
        torch.testing.assert_close(c.double(), r, rtol=1e-4, atol=1e-4,
                                   msg=n)
