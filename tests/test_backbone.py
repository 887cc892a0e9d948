"""ConvNeXtV2Fast (reference path) vs mmpretrain.ConvNeXt: structure and math."""
import copy

import pytest
import torch

from _oracle import CONTRACT_PARAM_COUNTS, meta_device, mmpretrain_convnext
from convnextv2_fast import ConvNeXtV2Fast
from convnextv2_fast.models.backbone import ARCH_SETTINGS
from convnextv2_fast.testing import (max_abs_err, randomize_,
                                     reference_backbone_kwargs)

ALL_ARCHS = list(ARCH_SETTINGS)


def _pair(seed=0, **kwargs):
    """(mmpretrain model, our model) with identical random weights."""
    ConvNeXt = mmpretrain_convnext()
    ref = ConvNeXt(**copy.deepcopy(kwargs))
    randomize_(ref, seed)
    ours = ConvNeXtV2Fast(impl='reference', **copy.deepcopy(kwargs))
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize('arch', ALL_ARCHS)
@pytest.mark.parametrize('linear_pw_conv', [True, False])
@pytest.mark.parametrize('layer_scale', [0., 1e-6])
def test_state_dict_keys_shapes_counts(arch, linear_pw_conv, layer_scale):
    ConvNeXt = mmpretrain_convnext()
    for out_indices in ([0, 1, 2, 3], [-1], [1, -2]):
        kwargs = dict(arch=arch, use_grn=True, linear_pw_conv=linear_pw_conv,
                      layer_scale_init_value=layer_scale)
        with meta_device():
            ref = ConvNeXt(out_indices=list(out_indices), **kwargs)
            ours = ConvNeXtV2Fast(out_indices=list(out_indices), **kwargs)
        assert list(ours.state_dict()) == list(ref.state_dict())
        assert _shapes(ours) == _shapes(ref)
        assert ours.out_indices == ref.out_indices
        n_ours = sum(p.numel() for p in ours.parameters())
        assert n_ours == sum(p.numel() for p in ref.parameters())
        if (out_indices == [0, 1, 2, 3] and not layer_scale
                and arch in CONTRACT_PARAM_COUNTS):
            assert n_ours == CONTRACT_PARAM_COUNTS[arch]


def test_dict_arch_five_stages_and_negative_indices():
    ConvNeXt = mmpretrain_convnext()
    arch = dict(depths=[1, 1, 1, 1, 1], channels=[8, 16, 24, 32, 40])
    ref_idx, our_idx = [-1, 4], [-1, 4]
    ref = ConvNeXt(arch=dict(arch), out_indices=ref_idx, use_grn=True)
    ours = ConvNeXtV2Fast(arch=dict(arch), out_indices=our_idx, use_grn=True)
    assert our_idx == ref_idx == [3, 4]  # hard-coded 4 + index, in place
    assert _shapes(ours) == _shapes(ref)


def test_grn_params_are_1d():
    model = ConvNeXtV2Fast(arch='atto', use_grn=True)
    for name, p in model.named_parameters():
        if '.grn.' in name:
            assert p.dim() == 1


def test_default_init_matches_mmpretrain_distribution():
    """init_weights applies the same init_cfg (TruncNormal std .02 on
    Conv2d/Linear, LayerNorm (incl. LN2d) weight 1 bias 0, GRN zeros)."""
    torch.manual_seed(0)
    model = ConvNeXtV2Fast(arch=dict(depths=[2], channels=[64]), use_grn=True,
                           out_indices=[0])
    model.init_weights()
    sd = model.state_dict()
    w = sd['stages.0.0.pointwise_conv1.weight']
    assert abs(w.std().item() - 0.02) < 0.003
    assert torch.all(sd['stages.0.0.pointwise_conv1.bias'] == 0)
    assert torch.all(sd['stages.0.0.norm.weight'] == 1)
    assert torch.all(sd['downsample_layers.0.1.weight'] == 1)
    assert torch.all(sd['stages.0.0.grn.gamma'] == 0)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()
            if p.grad is not None}


def _run(model, x, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    x = x.clone().requires_grad_(True)
    outs = model(x)
    loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum()
               for o in outs)
    loss.backward()
    return outs, x.grad, _grads(model)


@pytest.mark.parametrize('mode', ['eval', 'train_drop_path'])
@pytest.mark.parametrize('variant', [
    dict(arch='atto'),
    dict(arch=dict(depths=[1, 2], channels=[16, 24]), linear_pw_conv=False,
         layer_scale_init_value=0.5),
])
def test_forward_backward_parity_fp32(mode, variant):
    kwargs = reference_backbone_kwargs(**variant)
    kwargs['out_indices'] = list(range(len(
        ARCH_SETTINGS[kwargs['arch']]['depths'] if isinstance(
            kwargs['arch'], str) else kwargs['arch']['depths'])))
    if mode == 'train_drop_path':
        kwargs['drop_path_rate'] = 0.5
    ref, ours = _pair(seed=1, **kwargs)
    ref.train(mode != 'eval')
    ours.train(mode != 'eval')
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 96, 160, generator=gen)
    x[1] = x[1] * 3 + 1  # different content per sample
    outs_r, gx_r, grads_r = _run(ref, x, seed=123)
    outs_o, gx_o, grads_o = _run(ours, x, seed=123)
    assert len(outs_r) == len(outs_o)
    for i, (a, b) in enumerate(zip(outs_r, outs_o)):
        assert b.shape == a.shape and b.is_contiguous()
        err = max_abs_err(a, b)
        print(f'out{i} {tuple(a.shape)} max err {err:.3e}')
        assert err <= 1e-5 * (1 + a.abs().max().item())
    err = max_abs_err(gx_r, gx_o)
    print(f'input grad max err {err:.3e}')
    assert err <= 1e-5 * (1 + gx_r.abs().max().item())
    assert set(grads_r) == set(grads_o)
    worst = max((max_abs_err(grads_r[n], grads_o[n]) /
                 (1 + grads_r[n].abs().max().item()), n) for n in grads_r)
    print(f'worst relative param-grad err {worst[0]:.3e} ({worst[1]})')
    assert worst[0] <= 1e-5


def test_drop_path_schedule_and_train_randomness():
    ref, ours = _pair(**reference_backbone_kwargs(arch='atto',
                                                  drop_path_rate=0.3))
    rates_r = [getattr(b.drop_path, 'drop_prob', 0.) for s in ref.stages
               for b in s]
    rates_o = [b.drop_prob for b in ours.blocks()]
    assert rates_o == pytest.approx(rates_r)
    assert rates_o[0] == 0 and rates_o[-1] == pytest.approx(0.3)
    ours.train()
    x = torch.randn(4, 3, 64, 64)
    torch.manual_seed(0)
    a = ours(x)[-1]
    torch.manual_seed(1)
    b = ours(x)[-1]
    assert not torch.allclose(a, b)  # drop path is active in training


def test_frozen_stages_and_train_refreezes():
    ConvNeXt = mmpretrain_convnext()
    kwargs = reference_backbone_kwargs(arch='atto', frozen_stages=2)
    ref, ours = ConvNeXt(**kwargs), ConvNeXtV2Fast(**kwargs)
    for model in (ref, ours):
        model.train()
    req_r = {n: p.requires_grad for n, p in ref.named_parameters()}
    req_o = {n: p.requires_grad for n, p in ours.named_parameters()}
    assert req_r == req_o
    assert not req_o['stages.1.0.depthwise_conv.weight']
    assert req_o['stages.2.0.depthwise_conv.weight']
    assert not ours.stages[0].training and ours.stages[2].training
    assert not ours.downsample_layers[1].training
    ours.stages[0].train()
    ours.train()  # re-applies freezing
    assert not ours.stages[0].training


def test_with_cp_same_result_and_only_when_grad():
    kwargs = reference_backbone_kwargs(arch=dict(depths=[1, 1],
                                                 channels=[16, 32]),
                                       out_indices=[0, 1])
    _, plain = _pair(**kwargs)
    _, ckpt = _pair(with_cp=True, **kwargs)
    x = torch.randn(2, 3, 32, 48)
    outs_p, gx_p, grads_p = _run(plain, x)
    outs_c, gx_c, grads_c = _run(ckpt, x)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(outs_p, outs_c))
    assert torch.allclose(gx_p, gx_c, atol=1e-6)
    assert all(torch.allclose(grads_p[n], grads_c[n], atol=1e-6)
               for n in grads_p)
    calls = []
    orig = torch.utils.checkpoint.checkpoint

    def spy(*args, **kw):
        calls.append(1)
        return orig(*args, **kw)

    torch.utils.checkpoint.checkpoint = spy
    try:
        with torch.no_grad():
            ckpt(x)
        assert not calls  # no checkpointing without grad
        ckpt(x.requires_grad_(True))
        assert len(calls) == 2
    finally:
        torch.utils.checkpoint.checkpoint = orig


def test_gap_before_final_norm():
    kwargs = reference_backbone_kwargs(arch='atto', out_indices=[1, 3],
                                       gap_before_final_norm=True)
    ref, ours = _pair(**kwargs)
    ref.eval(), ours.eval()
    x = torch.randn(2, 3, 64, 96)
    outs_r, outs_o = ref(x), ours(x)
    assert [o.shape for o in outs_o] == [(2, 80), (2, 320)]
    for a, b in zip(outs_r, outs_o):
        assert max_abs_err(a, b) <= 1e-5


def test_outputs_nchw_contiguous_strides():
    model = ConvNeXtV2Fast(**reference_backbone_kwargs(arch='atto')).eval()
    outs = model(torch.randn(1, 3, 800 // 4, 1344 // 4))
    assert [tuple(o.shape[2:]) for o in outs] == [(50, 84), (25, 42),
                                                   (12, 21), (6, 10)]
    assert all(o.is_contiguous() for o in outs)
