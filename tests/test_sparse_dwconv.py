"""Submanifold depthwise 7x7 conv: C++ twin / CUDA kernel / PyTorch fallback vs
the dense-masked reference (``mask -> dwconv -> mask``), forward and all grads."""
import os

import pytest
import torch

from convnextv2_fast._ext import extension_status
from convnextv2_fast.sparse import (build_layouts, check_mask, layout_from_visibility,
                                    sparse_dwconv7x7,
                                    sparse_dwconv7x7_dense_masked_ref)
from convnextv2_fast.testing import assert_close_to_ref


def _ext_built() -> bool:
    loaded, _ = extension_status()
    return loaded and hasattr(torch.ops.convnextv2_fast, 'sparse_dwconv_fwd')


EXT = _ext_built()
needs_ext = pytest.mark.skipif(
    not EXT, reason='compiled extension convnextv2_fast._C is not built '
    f'({extension_status()[1]}); build it with `python setup.py build_ext '
    '--inplace` (CONVNEXTV2_FAST_REQUIRE_EXT=1 turns this into a failure)')


def test_extension_present_when_required():
    """CI sets CONVNEXTV2_FAST_REQUIRE_EXT=1 after `pip install`: then a missing
    extension must fail, not skip."""
    if os.environ.get('CONVNEXTV2_FAST_REQUIRE_EXT', '0') != '1':
        pytest.skip('CONVNEXTV2_FAST_REQUIRE_EXT is not set')
    assert EXT, f'compiled extension required but {extension_status()[1]}'


@needs_ext
def test_extension_module_attributes():
    import convnextv2_fast._C as C
    assert isinstance(C.WITH_CUDA, bool)
    assert hasattr(torch.ops.convnextv2_fast, 'sparse_dwconv_bwd_weight')


def _tile_layout(seed, n=2, img_hw=(96, 160), stage=0, device='cpu'):
    """FCMAE-style layout: different random masks per sample, H != W."""
    g = torch.Generator().manual_seed(seed)
    gh, gw = img_hw[0] // 32, img_hw[1] // 32
    mask = torch.rand(n, gh, gw, generator=g) < 0.6
    mask[:, 0, 0] = False
    mask[0, -1, -1] = False
    mask = check_mask(mask.to(device), n, gh, gw)
    return build_layouts(mask, img_hw[0], img_hw[1], 32, 4)[stage]


def _scattered_layout(seed, n=2, hw=(11, 17), device='cpu'):
    """Arbitrary (non-tile) visible sites: isolated pixels, borders."""
    g = torch.Generator().manual_seed(seed)
    vis = torch.rand(n, *hw, generator=g) < 0.45
    return layout_from_visibility(vis.to(device))


LAYOUTS = {'tiles': _tile_layout, 'scattered': _scattered_layout}


def _inputs(layout, c, dtype, seed, device='cpu'):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(layout.num_rows, c, generator=g).to(device)
    w = (torch.randn(c, 1, 7, 7, generator=g) * 0.2).to(device)
    b = torch.randn(c, generator=g).to(device)
    go = torch.randn(layout.num_rows, c, generator=g).to(device)
    return f, w, b, go


def _run(fn, f, w, b, go, dtype):
    f, w, b = (t.detach().to(dtype).clone().requires_grad_() for t in (f, w, b))
    out = fn(f, w, b)
    out.backward(go.to(dtype))
    return out.detach(), f.grad, w.grad, b.grad


def _compare(impl, kind, dtype, c=13, seed=0, device='cpu', layout=None):
    layout = layout or LAYOUTS[kind](seed, device=device)
    f, w, b, go = _inputs(layout, c, dtype, seed + 1, device)
    cand = _run(lambda f_, w_, b_: sparse_dwconv7x7(f_, w_, b_, layout, impl=impl),
                f, w, b, go, dtype)
    same = _run(lambda f_, w_, b_: sparse_dwconv7x7_dense_masked_ref(f_, w_, b_, layout),
                f, w, b, go, dtype)
    hi = _run(lambda f_, w_, b_: sparse_dwconv7x7_dense_masked_ref(f_, w_, b_, layout),
              f, w, b, go, torch.float64)
    for name, x, y, z in zip(('out', 'grad_input', 'grad_weight', 'grad_bias'), cand,
                             same, hi):
        assert x.dtype == dtype, f'{name}: dtype {x.dtype} != {dtype}'
        assert_close_to_ref(f'{impl}/{kind}/{name}', x, y, z, dtype=dtype)


@needs_ext
@pytest.mark.parametrize('kind', ['tiles', 'scattered'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_twin_matches_dense_masked_reference(kind, dtype):
    _compare('ext', kind, dtype)


@pytest.mark.parametrize('kind', ['tiles', 'scattered'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_torch_fallback_matches_dense_masked_reference(kind, dtype):
    _compare('torch', kind, dtype)


@needs_ext
def test_cpu_twin_fp64_exact():
    layout = _scattered_layout(3)
    f, w, b, go = _inputs(layout, 7, torch.float64, 4)
    a = _run(lambda f_, w_, b_: sparse_dwconv7x7(f_, w_, b_, layout, impl='ext'),
             f, w, b, go, torch.float64)
    r = _run(lambda f_, w_, b_: sparse_dwconv7x7_dense_masked_ref(f_, w_, b_, layout),
             f, w, b, go, torch.float64)
    for x, y in zip(a, r):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


@needs_ext
def test_weight_grad_deterministic_across_thread_counts():
    from convnextv2_fast.sparse import sparse_dwconv_backward
    layout = _tile_layout(5, n=3)
    f, w, _, go = _inputs(layout, 24, torch.float32, 6)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, gw1, gb1 = sparse_dwconv_backward(go, f, w.reshape(24, 49), layout)
        torch.set_num_threads(max(old, 2))
        _, gw2, gb2 = sparse_dwconv_backward(go, f, w.reshape(24, 49), layout)
    finally:
        torch.set_num_threads(old)
    assert layout.num_rows > 256  # several chunks
    assert torch.equal(gw1, gw2) and torch.equal(gb1, gb2)


@needs_ext
def test_op_checks_name_the_argument():
    layout = _scattered_layout(0)
    f = torch.randn(layout.num_rows, 4)
    ops = torch.ops.convnextv2_fast
    with pytest.raises(RuntimeError, match='weight must have shape'):
        ops.sparse_dwconv_fwd(f, torch.randn(4, 48), None, layout.site, layout.nbr)
    with pytest.raises(RuntimeError, match='site must be int32'):
        ops.sparse_dwconv_fwd(f, torch.randn(4, 49), None, layout.site.long(), layout.nbr)
    with pytest.raises(RuntimeError, match='site must be a 1-D tensor'):
        ops.sparse_dwconv_fwd(f[1:], torch.randn(4, 49), None, layout.site, layout.nbr)
    with pytest.raises(RuntimeError, match='weight dtype'):
        ops.sparse_dwconv_fwd(f, torch.randn(4, 49).half(), None, layout.site, layout.nbr)


@needs_ext
def test_opcheck_fake_impls():
    """Schema, fake (meta) impls and dispatcher registration, as torch.compile needs."""
    from convnextv2_fast.sparse._ops import sparse_ops
    ops = sparse_ops()
    layout = _scattered_layout(1, hw=(6, 9))
    f, w, b, go = _inputs(layout, 5, torch.float32, 2)
    torch.library.opcheck(ops.sparse_dwconv_fwd.default,
                          (f, w.reshape(5, 49), b, layout.site, layout.nbr),
                          test_utils=('test_schema', 'test_faketensor'))
    torch.library.opcheck(ops.sparse_dwconv_bwd_weight.default,
                          (go, f, layout.site, layout.nbr),
                          test_utils=('test_schema', 'test_faketensor'))


# -- GPU (skipped on CPU machines) ---------------------------------------------------
@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernel_matches_cpu_twin(dtype):
    import convnextv2_fast._C as C
    assert C.WITH_CUDA, 'extension built without CUDA'
    for kind in ('tiles', 'scattered'):
        _compare('ext', kind, dtype, c=45, device='cuda')
        lay_cpu = LAYOUTS[kind](7)
        lay_gpu = LAYOUTS[kind](7, device='cuda')
        f, w, b, go = _inputs(lay_cpu, 45, dtype, 8)
        cpu = _run(lambda f_, w_, b_: sparse_dwconv7x7(f_, w_, b_, lay_cpu, impl='ext'),
                   f, w, b, go, dtype)
        gpu = _run(lambda f_, w_, b_: sparse_dwconv7x7(f_, w_, b_, lay_gpu, impl='ext'),
                   f.cuda(), w.cuda(), b.cuda(), go.cuda(), dtype)
        hi = _run(lambda f_, w_, b_: sparse_dwconv7x7_dense_masked_ref(f_, w_, b_, lay_cpu),
                  f, w, b, go, torch.float64)
        for name, x, y, z in zip(('out', 'gin', 'gw', 'gb'), gpu, cpu, hi):
            assert_close_to_ref(f'cuda-vs-cpu/{kind}/{name}', x.cpu(), y, z, dtype=dtype)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_weight_grad_bit_identical(dtype):
    from convnextv2_fast.sparse import sparse_dwconv_backward
    layout = _tile_layout(9, n=8, img_hw=(224, 224), device='cuda')
    f, w, _, go = _inputs(layout, 128, dtype, 10, device='cuda')
    f, go, w2 = f.to(dtype), go.to(dtype), w.reshape(128, 49).to(dtype)
    r1 = sparse_dwconv_backward(go, f, w2, layout)
    r2 = sparse_dwconv_backward(go, f, w2, layout)
    for a, b in zip(r1, r2):
        assert torch.equal(a, b)


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    """A missing/broken build: pure-PyTorch path + one warning; with
    CONVNEXTV2_FAST_REQUIRE_EXT=1 an error instead."""
    from convnextv2_fast import _ext
    for key, value in dict(loaded=False, module=None, reason='simulated missing build',
                           warned=False).items():
        monkeypatch.setitem(_ext._STATE, key, value)
    monkeypatch.delenv('CONVNEXTV2_FAST_REQUIRE_EXT', raising=False)
    layout = _scattered_layout(2)
    f, w, b, _ = _inputs(layout, 6, torch.float32, 3)
    with pytest.warns(RuntimeWarning, match='simulated missing build'):
        out = sparse_dwconv7x7(f, w, b, layout)
    ref = sparse_dwconv7x7_dense_masked_ref(f, w, b, layout)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match='not available'):
        sparse_dwconv7x7(f, w, b, layout, impl='ext')
    monkeypatch.setenv('CONVNEXTV2_FAST_REQUIRE_EXT', '1')
    with pytest.raises(RuntimeError, match='CONVNEXTV2_FAST_REQUIRE_EXT=1'):
        sparse_dwconv7x7(f, w, b, layout)


@needs_ext
def test_ops_trace_under_torch_compile():
    """The dispatcher ops + fake impls let torch.compile trace them (fullgraph)."""
    layout = _scattered_layout(4, hw=(8, 9))
    f, w, b, go = _inputs(layout, 6, torch.float32, 5)
    ops = torch.ops.convnextv2_fast
    from convnextv2_fast.sparse._ops import sparse_ops
    sparse_ops()  # registers the fake impls

    def fn(f_, w_, b_, go_, site, nbr):
        out = ops.sparse_dwconv_fwd(f_, w_, b_, site, nbr)
        gw, gb = ops.sparse_dwconv_bwd_weight(go_, f_, site, nbr)
        return out * 2, gw + 1, gb

    args = (f, w.reshape(6, 49), b, go, layout.site, layout.nbr)
    eager = fn(*args)
    compiled = torch.compile(fn, backend='aot_eager', fullgraph=True)(*args)
    for a, c in zip(eager, compiled):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
