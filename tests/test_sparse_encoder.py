"""SparseConvNeXtV2 vs the dense-masked encoder with the same weights."""
import copy

import pytest
import torch

from convnextv2_fast import ConvNeXtV2Fast
from convnextv2_fast._errors import ArgumentError
from convnextv2_fast._ext import extension_status
from convnextv2_fast.models.sparse_encoder import (SparseConvNeXtV2,
                                                   convert_official_fcmae_checkpoint,
                                                   dense_masked_encoder_ref)
from convnextv2_fast.testing import assert_close_to_ref

EXT = extension_status()[0] and hasattr(torch.ops.convnextv2_fast, 'sparse_dwconv_fwd')
IMPLS = [pytest.param('ext', marks=pytest.mark.skipif(
    not EXT, reason=f'compiled extension not built ({extension_status()[1]})')), 'torch']

ARCH = dict(depths=[2, 1, 2, 1], channels=[16, 24, 32, 40])


def randomize_(enc):
    """Non-trivial values for every parameter of ``enc`` (GRN is the
    identity at init), in place, from torch's global RNG."""
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if name.endswith('grn.gamma') or name.endswith('grn.beta'):
                p.normal_(0, 0.5)
            elif p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.normal_(0, 0.3 / p[0].numel()**0.5)
    return enc


def _encoder(impl='torch', seed=0, arch=ARCH):
    torch.manual_seed(seed)
    enc = SparseConvNeXtV2(arch=arch, dwconv_impl=impl, out_indices=(0, 1, 2, 3))
    return randomize_(enc).eval()


def _mask(n=2, gh=3, gw=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, gh * gw, generator=g) < 0.6
    mask[:, 0] = False
    return mask.float()


def _visible_rows(dense, layout):
    return dense.permute(0, 2, 3, 1).reshape(-1, dense.shape[1]).index_select(
        0, layout.site_long())


def _check_against_dense(enc, x, mask, tag):
    """Features at every stage (visible sites) and every parameter gradient."""
    enc64 = copy.deepcopy(enc).double()
    layouts = enc.layouts(x, mask)
    rows, _ = enc.forward_sparse(x, mask, layouts)
    dense = dense_masked_encoder_ref(enc, x, mask, layouts)
    dense64 = dense_masked_encoder_ref(enc64, x.double(), mask, layouts)
    g = torch.Generator().manual_seed(5)
    weights = [torch.randn(r.shape, generator=g).to(r.device) for r in rows]
    for i, (r, d, d64) in enumerate(zip(rows, dense, dense64)):
        assert_close_to_ref(f'{tag}/stage{i}', r, _visible_rows(d, layouts[i]),
                            _visible_rows(d64, layouts[i]), dtype=torch.float32)
        # masked sites of the dense-masked map are exactly zero
        vis = (layouts[i].nbr >= 0).unsqueeze(1)
        assert torch.all(d.masked_fill(vis, 0) == 0)

    def grads(model, outs):
        model.zero_grad()
        loss = sum((o.double() * w.double()).sum() for o, w in zip(outs, weights))
        loss.backward()
        return {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    g_sparse = grads(enc, rows)
    g_dense = grads(enc, [_visible_rows(d, l) for d, l in zip(
        dense_masked_encoder_ref(enc, x, mask, layouts), layouts)])
    g_hi = grads(enc64, [_visible_rows(d, l) for d, l in zip(
        dense_masked_encoder_ref(enc64, x.double(), mask, layouts), layouts)])
    assert g_sparse.keys() == g_hi.keys() and len(g_sparse) > 0
    for name in g_sparse:
        assert_close_to_ref(f'{tag}/grad {name}', g_sparse[name], g_dense[name],
                            g_hi[name], dtype=torch.float32)


@pytest.mark.parametrize('impl', IMPLS)
def test_sparse_encoder_matches_dense_masked(impl):
    enc = _encoder(impl)
    x = torch.randn(2, 3, 96, 64)
    _check_against_dense(enc, x, _mask(2, 3, 2), impl)


@pytest.mark.parametrize('impl', IMPLS)
def test_all_visible_and_single_visible_samples(impl):
    """Unequal visible counts per sample (the index_add GRN path)."""
    enc = _encoder(impl)
    x = torch.randn(3, 3, 64, 96)
    mask = torch.ones(3, 2, 3)
    mask[0] = 0                      # every patch visible
    mask[1, 1, 2] = 0                # one visible patch (a corner)
    mask[2, 0, 1] = 0
    mask[2, 1, 0] = 0
    _check_against_dense(enc, x, mask, impl)


def test_all_visible_equals_dense_backbone():
    """The encoder's weights in ConvNeXtV2Fast give the same stage maps when
    nothing is masked — the weight transfer keeps the meaning."""
    enc = _encoder('torch')
    bb = ConvNeXtV2Fast(arch=ARCH, use_grn=True, layer_scale_init_value=0.,
                        out_indices=[0, 1, 2, 3], gap_before_final_norm=False,
                        impl='reference').eval()
    missing, unexpected = bb.load_state_dict(enc.state_dict(), strict=False)
    assert unexpected == []
    assert sorted(missing) == sorted(f'norm{i}.{k}' for i in range(4)
                                     for k in ('weight', 'bias'))
    x = torch.randn(2, 3, 64, 96)
    outs = enc(x, None)
    with torch.no_grad():
        y = x
        for i in range(4):
            y = bb.stages[i](bb.downsample_layers[i](y))
            torch.testing.assert_close(outs[i], y, rtol=1e-4, atol=1e-4)


def test_grn_is_per_sample():
    """Changing sample 1 must not change sample 0 (batch-wide GRN would)."""
    enc = _encoder('torch')
    x = torch.randn(2, 3, 64, 64)
    mask = _mask(2, 2, 2, seed=3)
    a = enc(x, mask)[-1]
    x2 = x.clone()
    x2[1] *= 5
    x2[1] += 1
    b = enc(x2, mask)[-1]
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)
    assert not torch.allclose(a[1], b[1])


def test_state_dict_loads_into_backbone_for_finetuning():
    """Every encoder key exists in the dense backbone with the same shape; only
    the output norms (not part of FCMAE) are left to fine-tuning init."""
    enc = SparseConvNeXtV2(arch='atto')
    sd = enc.state_dict()
    bb = ConvNeXtV2Fast(arch='atto', use_grn=True, layer_scale_init_value=0.,
                        out_indices=[0, 1, 2, 3], gap_before_final_norm=False)
    bsd = bb.state_dict()
    for k, v in sd.items():
        assert k in bsd and bsd[k].shape == v.shape, k
    missing, unexpected = bb.load_state_dict(sd, strict=False)
    assert unexpected == []
    assert all(k.split('.')[0] in {f'norm{i}' for i in range(4)} for k in missing)
    assert any(k.startswith('stages.3.1.grn.gamma') for k in sd)
    assert sd['stages.0.0.grn.gamma'].shape == (160, )


def test_official_checkpoint_mapping():
    enc = _encoder('torch', arch='atto')
    ours = enc.state_dict()
    official = {}
    for k, v in ours.items():
        k2 = (k.replace('.depthwise_conv.', '.dwconv.').replace(
            '.pointwise_conv1.', '.pwconv1.').replace('.pointwise_conv2.', '.pwconv2.'))
        if '.grn.' in k2:
            v = v.reshape(1, 1, 1, -1)
        official['encoder.' + k2] = v
    official['mask_token'] = torch.zeros(1, 512, 1, 1)
    official['proj.weight'] = torch.zeros(512, 320, 1, 1)
    mapped, rest = convert_official_fcmae_checkpoint({'model': official},
                                                     prefix='backbone.')
    assert set(rest) == {'mask_token', 'proj.weight'}
    assert set(mapped) == {'backbone.' + k for k in ours}
    enc2 = SparseConvNeXtV2(arch='atto')
    enc2.load_state_dict({k[len('backbone.'):]: v for k, v in mapped.items()})
    for k, v in enc2.state_dict().items():
        assert torch.equal(v, ours[k]), k
    with pytest.raises(ArgumentError, match='sparse'):
        convert_official_fcmae_checkpoint({'stages.0.0.dwconv.kernel': torch.zeros(49, 4)})


def test_input_size_not_multiple_of_patch():
    enc = _encoder('torch')
    with pytest.raises(ArgumentError, match='multiple of the mask patch size 32'):
        enc(torch.randn(1, 3, 80, 64), torch.zeros(1, 4))


@pytest.mark.parametrize('mask,msg', [
    (torch.zeros(2, 5), r'mask must have shape \(N, L\) = \(2, 6\)'),
    (torch.zeros(2, 2, 3), r'mask must have shape'),
    (torch.zeros(2, 6, dtype=torch.int64), 'mask must be bool or floating point'),
    (torch.full((2, 6), 0.5), 'mask values must be 0'),
    (torch.ones(2, 6), 'removes every patch of sample'),
])
def test_bad_masks(mask, msg):
    enc = _encoder('torch')
    with pytest.raises(ArgumentError, match=msg):
        enc(torch.randn(2, 3, 96, 64), mask)


@pytest.mark.gpu
@pytest.mark.skipif(not EXT, reason='compiled extension not built')
def test_cuda_sparse_encoder_matches_dense_masked():
    enc = _encoder('ext').cuda()
    x = torch.randn(4, 3, 96, 160, device='cuda')
    mask = _mask(4, 3, 5, seed=7).cuda()
    _check_against_dense(enc, x, mask, 'cuda-fp32')
    # bf16 autocast: sparse vs dense-masked (same autocast) vs fp64 dense-masked
    layouts = enc.layouts(x, mask)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        rows, _ = enc.forward_sparse(x, mask, layouts)
        dense = dense_masked_encoder_ref(enc, x, mask, layouts)
    dense64 = dense_masked_encoder_ref(copy.deepcopy(enc).double(), x.double(), mask,
                                       layouts)
    for i, (r, d, d64) in enumerate(zip(rows, dense, dense64)):
        assert_close_to_ref(f'cuda-bf16/stage{i}', r.float(),
                            _visible_rows(d, layouts[i]).float(),
                            _visible_rows(d64, layouts[i]), dtype=torch.bfloat16)


@pytest.mark.parametrize('equal', [True, False])
def test_sparse_grn_matches_dense_grn(equal):
    from convnextv2_fast.sparse import (layout_from_visibility, sparse_grn,
                                        sparse_grn_dense_masked_ref)
    g = torch.Generator().manual_seed(0)
    vis = torch.zeros(3, 5, 6, dtype=torch.bool)
    vis.view(3, -1)[:, :7] = True
    if not equal:
        vis[2, 4, :] = True
    vis = vis.view(3, -1)[:, torch.randperm(30, generator=g)].view(3, 5, 6)
    layout = layout_from_visibility(vis)
    assert bool(layout.equal_counts) == equal
    u = torch.randn(layout.num_rows, 8, generator=g, dtype=torch.float64)
    u[:, 3] = 0  # an all-zero channel: gradient must stay finite
    u.requires_grad_()
    gamma = torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True)
    out = sparse_grn(u, gamma, beta, layout)
    ref = sparse_grn_dense_masked_ref(u, gamma, beta, layout)
    torch.testing.assert_close(out, ref)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    g1 = torch.autograd.grad(out, (u, gamma, beta), go)
    g2 = torch.autograd.grad(ref, (u, gamma, beta), go)
    for a, b in zip(g1, g2):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize('equal', [True, False])
def test_sparse_grn_low_precision(dtype, equal):
    """The hand-written forward/backward in fp32/fp16/bf16 (fp32 statistics)
    against the dense-masked reference in the same dtype and in fp64 (the 2x
    rule), with a non-contiguous output gradient."""
    from convnextv2_fast.sparse import (layout_from_visibility, sparse_grn,
                                        sparse_grn_dense_masked_ref)
    g = torch.Generator().manual_seed(1)
    vis = torch.rand(2, 6, 7, generator=g) < 0.5
    if equal:
        vis = torch.zeros(2, 6, 7, dtype=torch.bool)
        vis.view(2, -1)[0, torch.randperm(42, generator=g)[:17]] = True
        vis.view(2, -1)[1, torch.randperm(42, generator=g)[:17]] = True
    layout = layout_from_visibility(vis)
    assert bool(layout.equal_counts) == equal
    u64 = torch.randn(layout.num_rows, 24, generator=g, dtype=torch.float64)
    gamma64 = torch.randn(24, generator=g, dtype=torch.float64)
    beta64 = torch.randn(24, generator=g, dtype=torch.float64)
    go64 = torch.randn(24, layout.num_rows, generator=g, dtype=torch.float64).t()

    def run(fn, dt):
        u, gamma, beta = (t.to(dt).requires_grad_() for t in (u64, gamma64, beta64))
        out = fn(u, gamma, beta, layout)
        grads = torch.autograd.grad(out, (u, gamma, beta), go64.to(dt))
        return (out, ) + grads

    assert not go64.is_contiguous()
    got = run(sparse_grn, dtype)
    same = run(sparse_grn_dense_masked_ref, dtype)
    hi = run(sparse_grn_dense_masked_ref, torch.float64)
    for name, a, b, c in zip(('out', 'du', 'dgamma', 'dbeta'), got, same, hi):
        assert a.dtype == dtype, name
        assert_close_to_ref(f'grn-{dtype}-{equal}/{name}', a.double(), b.double(), c,
                            dtype=dtype)


def test_drop_path_is_per_sample_in_training():
    """Train mode with drop path: a dropped sample's block branch is removed
    entirely (its rows equal the block input); kept ones are rescaled."""
    torch.manual_seed(0)
    enc = SparseConvNeXtV2(arch=dict(depths=[2], channels=[8]), patch_size=4,
                           drop_path_rate=0.5).train()
    blk = enc.stages[0][1]  # linspace(0, 0.5, 2)[1]
    assert blk.drop_prob == 0.5
    x = torch.randn(6, 3, 8, 8)
    layouts = enc.layouts(x, torch.zeros(6, 4))
    rows_in = torch.randn(layouts[0].num_rows, 8)
    torch.manual_seed(1)
    out = enc._block(blk, rows_in, layouts[0])
    torch.manual_seed(1)
    keep = (0.5 + torch.rand(6, 1)).floor().view(-1)
    assert 0 < keep.sum() < 6  # this seed drops some samples and keeps others
    enc.eval()
    branch = enc._block(blk, rows_in, layouts[0]) - rows_in
    expected = rows_in + branch / 0.5 * keep.index_select(0, layouts[0].sample)[:, None]
    torch.testing.assert_close(out, expected)
