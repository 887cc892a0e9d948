"""The sparse encoder's fused MLP tail (``mlp_impl='triton'``,
:mod:`convnextv2_fast.sparse.mlp`) vs its torch path and the dense-masked
reference: every stage output and every parameter gradient under the
2x-same-dtype rule, layer scale on/off, drop path in train mode (same RNG,
same kept samples), unequal counts falling back to the torch code."""
import copy

import pytest
import torch
import torch.nn as nn

from convnextv2_fast._errors import ArgumentError
from convnextv2_fast.models.fcmae import random_patch_mask
from convnextv2_fast.models.sparse_encoder import (SparseConvNeXtV2,
                                                   dense_masked_encoder_ref)
from convnextv2_fast.testing import assert_close_to_ref

from test_sparse_encoder import randomize_

ARCH = dict(depths=[2, 1], channels=[8, 16])   # patch 8 = the total stride
ARCH_GPU = dict(depths=[2, 1, 2, 1], channels=[32, 64, 96, 128])


def _encoder(arch=ARCH, patch=8, layer_scale=False, drop_path_rate=0., seed=0):
    torch.manual_seed(seed)
    enc = SparseConvNeXtV2(arch=arch, patch_size=patch, drop_path_rate=drop_path_rate,
                           out_indices=tuple(range(len(arch['depths']))),
                           dwconv_impl='torch', mlp_impl='torch')
    randomize_(enc)
    with torch.no_grad():
        if layer_scale:
            for stage in enc.stages:
                for blk in stage:
                    blk.gamma = nn.Parameter(torch.rand(blk.grn.gamma.numel() // 4) + 0.5)
    return enc.eval()


def _visible_rows(dense, layout):
    return dense.permute(0, 2, 3, 1).reshape(-1, dense.shape[1]).index_select(
        0, layout.site_long())


def _run(enc, impl, x, mask, layouts, weights, seed=3, amp=None):
    """(stage rows, {param: grad}) of ``enc`` with ``mlp_impl=impl``;
    ``impl='dense'``: the dense-masked reference at the visible rows."""
    enc.zero_grad()
    torch.manual_seed(seed)
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        if impl == 'dense':
            rows = [_visible_rows(d, lay) for d, lay in zip(
                dense_masked_encoder_ref(enc, x, mask, layouts), layouts)]
        else:
            enc.mlp_impl = impl
            rows, _ = enc.forward_sparse(x, mask, layouts)
    sum((r.double() * w.double()).sum() for r, w in zip(rows, weights)).backward()
    return ([r.detach() for r in rows],
            {n: p.grad.detach().clone() for n, p in enc.named_parameters()})


def _check_parity(enc, x, mask, tag, dtype, amp=None, dense=True):
    """fused (dtype) vs [torch path, dense-masked] (dtype) vs the fp64 torch
    path: every stage output and every parameter gradient, 2x rule."""
    layouts = enc.layouts(x, mask)
    assert all(lay.equal_counts for lay in layouts)
    g = torch.Generator().manual_seed(5)
    shapes = [(lay.num_rows, c) for lay, c in zip(layouts, enc.channels)]
    weights = [torch.randn(s, generator=g).to(x.device) for s in shapes]
    enc_d = enc if amp else copy.deepcopy(enc).to(dtype)
    xd = x if amp else x.to(dtype)
    cand = _run(enc_d, 'triton', xd, mask, layouts, weights, amp=amp)
    refs = {'torch': _run(enc_d, 'torch', xd, mask, layouts, weights, amp=amp)}
    if dense:
        refs['dense'] = _run(enc_d, 'dense', xd, mask, layouts, weights, amp=amp)
    hi = _run(copy.deepcopy(enc).double(), 'torch', x.double(), mask, layouts, weights)
    for ref_name, ref in refs.items():
        for i, (c, r, h) in enumerate(zip(cand[0], ref[0], hi[0])):
            assert_close_to_ref(f'{tag} vs {ref_name}/stage{i}', c.double(), r.double(),
                                h, dtype=dtype)
        assert cand[1].keys() == hi[1].keys() and len(cand[1]) > 0
        for name in cand[1]:
            assert_close_to_ref(f'{tag} vs {ref_name}/grad {name}', cand[1][name].double(),
                                ref[1][name].double(), hi[1][name], dtype=dtype)


def _equal_mask(n, grid, ratio=0.5, seed=1):
    return random_patch_mask(n, grid, grid, ratio, generator=torch.Generator().manual_seed(seed))


@pytest.mark.interpreter
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
@pytest.mark.parametrize('layer_scale', [False, True])
def test_fused_mlp_matches_torch_and_dense(dtype, layer_scale):
    enc = _encoder(layer_scale=layer_scale)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    _check_parity(enc, x, _equal_mask(2, 4), f'interp-{dtype}-ls{int(layer_scale)}',
                  dtype)


def _drop_path_check(enc, x, mask, tag):
    """Train mode, drop path 0.5: the fused path and the torch path with
    the same RNG state keep the same samples (a dropped sample's rows pass
    the block unchanged) and agree on outputs and grads."""
    layouts = enc.layouts(x, mask)
    blk = enc.stages[0][1]
    blk.drop_path.drop_prob = 0.5
    assert blk.drop_prob == 0.5
    rows_in = torch.randn(layouts[0].num_rows, enc.channels[0], device=x.device)
    outs = {}
    for impl in ('triton', 'torch'):
        enc.mlp_impl = impl
        r = rows_in.clone().requires_grad_()
        torch.manual_seed(1)
        out = enc._block(blk, r, layouts[0])
        enc.zero_grad()
        out.backward(torch.ones_like(out))
        outs[impl] = (out.detach(), r.grad, {n: p.grad.clone() for n, p in
                                             blk.named_parameters() if p.grad is not None})
    n = layouts[0].counts.numel()
    same = [(outs[i][0] - rows_in).view(n, -1).abs().amax(1) == 0 for i in outs]
    print(f'{tag}: dropped samples {same[0].tolist()}')
    assert 0 < int(same[0].sum()) < n  # this seed drops some samples, keeps others
    assert torch.equal(same[0], same[1])
    (fo, fdx, fg), (to, tdx, tg) = outs['triton'], outs['torch']
    print(f'{tag}: out err {(fo - to).abs().max():.3e}, dx err {(fdx - tdx).abs().max():.3e}')
    torch.testing.assert_close(fo, to, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fdx, tdx, rtol=1e-4, atol=1e-5)
    assert fg.keys() == tg.keys() and len(fg) == 11  # with the layer scale
    for name in fg:
        torch.testing.assert_close(fg[name], tg[name], rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.interpreter
def test_fused_mlp_drop_path_same_samples():
    enc = _encoder(drop_path_rate=0.5, layer_scale=True).train()
    x = torch.randn(6, 3, 16, 16)
    _drop_path_check(enc, x, _equal_mask(6, 2), 'interp-train')


def _spy(monkeypatch):
    """Count the calls of the fused MLP entry point."""
    from convnextv2_fast.sparse import mlp
    calls = []
    real = mlp.sparse_mlp

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(mlp, 'sparse_mlp', spy)
    return calls


@pytest.mark.interpreter
def test_fused_mlp_runs_on_equal_counts_and_falls_back_otherwise(monkeypatch):
    calls = _spy(monkeypatch)
    enc = _encoder()
    x = torch.randn(2, 3, 32, 32)
    enc.mlp_impl = 'triton'
    enc.forward_sparse(x, _equal_mask(2, 4))
    assert len(calls) == 3  # every block
    calls.clear()
    mask = torch.zeros(2, 16)
    mask[0, :9] = 1  # 7 and 16 visible patches
    layouts = enc.layouts(x, mask)
    assert not any(lay.equal_counts for lay in layouts)
    fused, _ = enc.forward_sparse(x, mask, layouts)
    assert not calls
    enc.mlp_impl = 'torch'
    ref, _ = enc.forward_sparse(x, mask, layouts)
    for a, b in zip(fused, ref):  # the torch tail; the LayerNorms are Triton's (fp32)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    enc.mlp_impl = 'auto'  # CPU tensors: the torch code, even in the interpreter
    enc.forward_sparse(x, _equal_mask(2, 4))
    assert not calls


def test_mlp_impl_validation(monkeypatch):
    with pytest.raises(ArgumentError, match='mlp_impl'):
        SparseConvNeXtV2(arch=ARCH, patch_size=8, mlp_impl='cublas')
    from convnextv2_fast.models.fcmae import FCMAE
    model = FCMAE(backbone=dict(arch=ARCH, patch_size=8, mlp_impl='torch'),
                  decoder=dict(embed_dim=8, depth=1))
    assert model.backbone.mlp_impl == 'torch'
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    enc = SparseConvNeXtV2(arch=ARCH, patch_size=8, mlp_impl='triton')
    with pytest.raises(RuntimeError, match='TRITON_INTERPRET'):
        enc.forward_sparse(torch.randn(2, 3, 32, 32), _equal_mask(2, 4))


# -- GPU ----------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize('layer_scale', [False, True])
def test_cuda_fused_mlp_matches_torch_and_dense(layer_scale):
    enc = _encoder(ARCH_GPU, patch=32, layer_scale=layer_scale).cuda()
    x = torch.randn(4, 3, 128, 96, device='cuda')
    g = torch.Generator().manual_seed(1)
    mask = random_patch_mask(4, 4, 3, 0.6, generator=g).cuda()  # equal counts
    enc.dwconv_impl = 'auto'
    _check_parity(enc, x, mask, f'cuda-fp32-ls{int(layer_scale)}', torch.float32)
    _check_parity(enc, x, mask, f'cuda-bf16amp-ls{int(layer_scale)}', torch.bfloat16,
                  amp=torch.bfloat16)
    # 'auto' picks the fused path for CUDA tensors
    enc.mlp_impl = 'auto'
    from convnextv2_fast.models.sparse_encoder import resolve_mlp_impl
    assert resolve_mlp_impl('auto', x.device) == 'triton'


@pytest.mark.gpu
def test_cuda_fused_mlp_drop_path_same_samples():
    enc = _encoder(ARCH_GPU, patch=32, drop_path_rate=0.5, layer_scale=True).cuda().train()
    x = torch.randn(16, 3, 64, 64, device='cuda')  # 16 samples: some kept, some dropped
    _drop_path_check(enc, x, _equal_mask(16, 2).cuda(), 'cuda-train')
