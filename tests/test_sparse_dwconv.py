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


# Channel counts picking every vector width of the shared arithmetic
# (sparse_dwconv_math.h): the C++ twin uses the largest of 16/8/4/2/1 dividing C,
# the CUDA kernels 4/2/1 (fp16) or 2/1 (fp32, bf16) — so C = 13, 6, 12 run on CPU
# the very instantiations V = 1, 2, 4 the GPU runs; 24 and 64 the wide CPU ones.
CHANNELS = [13, 6, 12, 24, 64]


@needs_ext
@pytest.mark.parametrize('c', CHANNELS)
@pytest.mark.parametrize('kind', ['tiles', 'scattered'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_twin_matches_dense_masked_reference(kind, dtype, c):
    _compare('ext', kind, dtype, c=c)


def _edge_layout(device='cpu'):
    """Stage-2 tile layout (4x4 tiles, 16 rows a patch): a sample with a single
    visible patch (a corner), one with two diagonal patches (partial halos), and
    an all-visible sample; sample boundaries fall inside row chunks."""
    mask = torch.ones(3, 3, 4, dtype=torch.bool)
    mask[0, 2, 3] = False
    mask[1, 0, 1] = False
    mask[1, 1, 2] = False
    mask[2] = False
    mask = check_mask(mask.to(device), 3, 3, 4)
    return build_layouts(mask, 96, 128, 32, 4)[1]


@needs_ext
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16,
                                   torch.float64])
def test_cpu_twin_all_visible_single_patch_and_batch_boundaries(dtype):
    layout = _edge_layout()
    assert layout.counts.tolist() == [16, 32, 12 * 16]
    # samples meet inside a row chunk of the C++ forward (64 rows), of the weight
    # gradient (kWgradRowsPerChunk = 128 rows) and of the CUDA forward (8 rows a
    # thread row): boundaries at rows 16 and 48
    assert layout.counts.cumsum(0)[:-1].tolist() == [16, 48]
    if dtype == torch.float64:
        _exact_fp64(layout, 12)
    else:
        _compare('ext', 'edge', dtype, c=12, layout=layout)


@pytest.mark.parametrize('kind', ['tiles', 'scattered'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_torch_fallback_matches_dense_masked_reference(kind, dtype):
    _compare('torch', kind, dtype)


def _exact_fp64(layout, c):
    f, w, b, go = _inputs(layout, c, torch.float64, 4)
    a = _run(lambda f_, w_, b_: sparse_dwconv7x7(f_, w_, b_, layout, impl='ext'),
             f, w, b, go, torch.float64)
    r = _run(lambda f_, w_, b_: sparse_dwconv7x7_dense_masked_ref(f_, w_, b_, layout),
             f, w, b, go, torch.float64)
    for x, y in zip(a, r):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


@needs_ext
@pytest.mark.parametrize('c', [7, 16])
def test_cpu_twin_fp64_exact(c):
    _exact_fp64(_scattered_layout(3), c)


@needs_ext
def test_cpu_twin_unaligned_inputs_fall_back_to_scalar_loads():
    """A feats view 4 bytes off alignment must not be read with vector loads."""
    layout = _tile_layout(2)
    f, w, b, go = _inputs(layout, 16, torch.float32, 3)
    store = torch.empty(f.numel() + 1)
    f_off = store[1:].view_as(f).copy_(f)
    assert f_off.data_ptr() % 8 != 0
    from convnextv2_fast.sparse import sparse_dwconv_backward, sparse_dwconv_forward
    w2 = w.reshape(16, 49)
    torch.testing.assert_close(sparse_dwconv_forward(f_off, w2, b, layout),
                               sparse_dwconv_forward(f, w2, b, layout), rtol=0, atol=0)
    for x, y in zip(sparse_dwconv_backward(go, f_off, w2, layout),
                    sparse_dwconv_backward(go, f, w2, layout)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def _neighbour_rows_python(layout):
    """The [M, 49] table by the definition, one site at a time."""
    n_, h_, w_ = layout.shape
    nbr = layout.nbr.tolist()
    out = []
    for s in layout.site.tolist():
        n, h, w = s // (h_ * w_), (s // w_) % h_, s % w_
        row = []
        for dy in range(7):
            for dx in range(7):
                y, x = h + dy - 3, w + dx - 3
                row.append(nbr[n][y][x] if 0 <= y < h_ and 0 <= x < w_ else -1)
        out.append(row)
    return torch.tensor(out, dtype=torch.int32).reshape(-1, 49)


@pytest.mark.parametrize('kind', ['tiles', 'scattered', 'edge'])
def test_neighbour_rows_match_python_construction(kind):
    layout = _edge_layout() if kind == 'edge' else LAYOUTS[kind](11)
    rows = layout.neighbour_rows()
    assert rows.dtype == torch.int32 and rows.is_contiguous()
    assert torch.equal(rows, _neighbour_rows_python(layout))
    assert layout.neighbour_rows() is rows  # built once per stage, cached
    # the pure-PyTorch path's table is the same with -1 -> M (padding row)
    table = layout.neighbour_table()
    assert torch.equal(table, torch.where(rows >= 0, rows.long(),
                                          torch.full_like(table, layout.num_rows)))
    # symmetric neighbourhoods: row r is tap t of m  <=>  m is tap 48 - t of r
    m, t = (rows >= 0).nonzero(as_tuple=True)
    assert torch.equal(rows[rows[m, t].long(), 48 - t], m.to(torch.int32))


@needs_ext
def test_encoder_stage_builds_neighbour_rows_once(monkeypatch):
    """Every block (forward, input grad, weight grad) of a stage reads the one
    table of its path: the neighbour rows (gather) or, where the CPU takes the
    tile path (stage 1, 8x8 tiles: conv_tile), the tile halo rows."""
    from convnextv2_fast.models.sparse_encoder import SparseConvNeXtV2
    from convnextv2_fast.sparse import layout as layout_mod
    calls = []
    orig = layout_mod.StageLayout.neighbour_rows
    orig_halo = layout_mod.StageLayout.tile_halo_rows

    def counting(self):
        if 'rows' not in self._cache:
            calls.append(id(self))
        return orig(self)

    def counting_halo(self, tile):
        if ('halo', tile) not in self._cache:
            calls.append(id(self))
        return orig_halo(self, tile)

    monkeypatch.setattr(layout_mod.StageLayout, 'neighbour_rows', counting)
    monkeypatch.setattr(layout_mod.StageLayout, 'tile_halo_rows', counting_halo)
    enc = SparseConvNeXtV2(arch=dict(depths=[2, 1, 2, 1], channels=[8, 8, 8, 8]),
                           dwconv_impl='ext')
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 4)
    rows, _ = enc.forward_sparse(x, mask)
    sum(r.sum() for r in rows).backward()
    assert len(calls) == 4 and len(set(calls)) == 4  # one per stage


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
    for _ in range(3):  # and across runs
        _, gw3, gb3 = sparse_dwconv_backward(go, f, w.reshape(24, 49), layout)
        assert torch.equal(gw1, gw3) and torch.equal(gb1, gb3)


@needs_ext
def test_parity_gate_rejects_unflipped_input_grad_taps():
    """The gate can fail: the input gradient computed with the forward's (not
    reversed) taps must be rejected by the tolerance rule."""
    from convnextv2_fast.sparse import sparse_dwconv_forward
    layout = _scattered_layout(6)
    f, w, _, go = _inputs(layout, 12, torch.float32, 7)
    w2 = w.reshape(12, 49)
    bad = sparse_dwconv_forward(go, w2, None, layout)  # taps not reversed
    good = sparse_dwconv_forward(go, w2.flip(1), None, layout)
    f64 = f.double().requires_grad_()
    sparse_dwconv7x7_dense_masked_ref(f64, w.double(), None, layout).backward(go.double())
    ff = f.clone().requires_grad_()
    sparse_dwconv7x7_dense_masked_ref(ff, w, None, layout).backward(go)
    assert_close_to_ref('good', good, ff.grad, f64.grad, dtype=torch.float32)
    with pytest.raises(AssertionError, match='tolerance'):
        assert_close_to_ref('bad', bad, ff.grad, f64.grad, dtype=torch.float32)


@needs_ext
def test_op_checks_name_the_argument():
    layout = _scattered_layout(0)
    f = torch.randn(layout.num_rows, 4)
    ops = torch.ops.convnextv2_fast
    rows = layout.neighbour_rows()
    with pytest.raises(RuntimeError, match='taps must have shape'):
        ops.sparse_dwconv_fwd(f, torch.randn(48, 4), None, rows)
    with pytest.raises(RuntimeError, match='taps must have shape'):
        ops.sparse_dwconv_fwd(f, torch.randn(4, 49), None, rows)  # the old [C, 49]
    with pytest.raises(RuntimeError, match='nbr_rows must be int32'):
        ops.sparse_dwconv_fwd(f, torch.randn(49, 4), None, rows.long())
    with pytest.raises(RuntimeError, match='nbr_rows must be an'):
        ops.sparse_dwconv_fwd(f[1:], torch.randn(49, 4), None, rows)
    with pytest.raises(RuntimeError, match='taps dtype'):
        ops.sparse_dwconv_fwd(f, torch.randn(49, 4).half(), None, rows)
    with pytest.raises(RuntimeError, match='grad_out must have the shape'):
        ops.sparse_dwconv_bwd_weight(f[:, :3].contiguous(), f, rows)


@needs_ext
def test_opcheck_fake_impls():
    """Schema, fake (meta) impls and dispatcher registration, as torch.compile needs."""
    from convnextv2_fast.sparse._ops import sparse_ops
    ops = sparse_ops()
    layout = _scattered_layout(1, hw=(6, 9))
    f, w, b, go = _inputs(layout, 5, torch.float32, 2)
    rows = layout.neighbour_rows()
    torch.library.opcheck(ops.sparse_dwconv_fwd.default,
                          (f, w.reshape(5, 49).t().contiguous(), b, rows),
                          test_utils=('test_schema', 'test_faketensor'))
    torch.library.opcheck(ops.sparse_dwconv_bwd_weight.default,
                          (go, f, rows),
                          test_utils=('test_schema', 'test_faketensor'))


# -- GPU (skipped on CPU machines) ---------------------------------------------------
@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize('c', [45, 6, 12, 128])
def test_cuda_kernel_matches_cpu_twin(dtype, c):
    """CUDA vs the C++ twin (same arithmetic), every vector width (C = 45 -> V 1,
    6 -> 2, 12/128 -> 4 for fp16), both vs the fp64 dense-masked reference."""
    import convnextv2_fast._C as C
    assert C.WITH_CUDA, 'extension built without CUDA'
    for kind in ('tiles', 'scattered', 'edge'):
        lay_cpu = _edge_layout() if kind == 'edge' else LAYOUTS[kind](7)
        lay_gpu = _edge_layout('cuda') if kind == 'edge' else LAYOUTS[kind](7, device='cuda')
        _compare('ext', kind, dtype, c=c, device='cuda', layout=lay_gpu)
        f, w, b, go = _inputs(lay_cpu, c, dtype, 8)
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
    for _ in range(3):
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

    def fn(f_, w_, b_, go_, rows):
        out = ops.sparse_dwconv_fwd(f_, w_, b_, rows)
        gw, gb = ops.sparse_dwconv_bwd_weight(go_, f_, rows)
        return out * 2, gw + 1, gb

    args = (f, w.reshape(6, 49).t().contiguous(), b, go, layout.neighbour_rows())
    eager = fn(*args)
    compiled = torch.compile(fn, backend='aot_eager', fullgraph=True)(*args)
    for a, c in zip(eager, compiled):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


@needs_ext
def test_current_build_has_the_neighbour_row_signature():
    """A stale build (old site/nbr signature) is detected by schema_current()
    and treated as missing (pure-PyTorch path, one warning)."""
    from convnextv2_fast.sparse import _ops
    assert _ops.schema_current()
    assert _ops.sparse_ops() is not None


@needs_ext
def test_stale_build_falls_back_with_a_warning(monkeypatch):
    from convnextv2_fast.sparse import _ops
    monkeypatch.setattr(_ops, 'schema_current', lambda: False)
    monkeypatch.setitem(_ops._STATE, 'stale_warned', False)
    monkeypatch.delenv('CONVNEXTV2_FAST_REQUIRE_EXT', raising=False)
    with pytest.warns(RuntimeWarning, match='stale build'):
        assert _ops.sparse_ops() is None
    monkeypatch.setenv('CONVNEXTV2_FAST_REQUIRE_EXT', '1')
    with pytest.raises(RuntimeError, match='stale build'):
        _ops.sparse_ops()
