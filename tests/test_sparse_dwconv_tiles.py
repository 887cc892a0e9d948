"""The tile path of the submanifold depthwise 7x7 conv (forward and input
gradient): per-tile halo table, staged dense stencil (``conv_tile_row`` /
``stage_halo_px`` in ``sparse_dwconv_math.h``, run by the C++ twin here and
by the CUDA kernel on a GPU).

* the halo table against its definition, one pixel at a time;
* tile path == gather path bit for bit (same arithmetic, same tap order), every
  dtype, every instantiated tile size, on FCMAE layouts (tiles with full and
  partial halos, single-visible-patch and all-visible samples, sample
  boundaries inside a tile row chunk) and on arbitrary visibility maps;
* tile path vs the dense-masked reference (2x rule; fp64 to 1e-12);
* a wrong halo table is rejected (the tests can fail), bad arguments are named.
"""
import pytest
import torch

from convnextv2_fast.sparse import (build_layouts, check_mask, layout_from_visibility,
                                    sparse_dwconv7x7, sparse_dwconv7x7_dense_masked_ref,
                                    sparse_dwconv_backward, sparse_dwconv_forward)
from convnextv2_fast.sparse.dwconv import TILES, conv_tile
from convnextv2_fast.testing import assert_close_to_ref

from test_sparse_dwconv import (_edge_layout, _inputs, _run, _scattered_layout,
                                _tile_layout, needs_ext)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _fcmae_edge_layout(stage, grid=(3, 4), device='cpu'):
    """Samples: one visible patch (corner: partial halo at the image border),
    two diagonal patches (partial halos from masked neighbours), all visible
    (interior tiles with full halos); sample boundaries inside row chunks.
    ``grid``: patches per image (at stage 3, 2x2 tiles, a full halo needs an
    interior tile: at least 5x5 patches)."""
    gh, gw = grid
    mask = torch.ones(3, gh, gw, dtype=torch.bool)
    mask[0, 2, 3] = False
    mask[1, 0, 1] = False
    mask[1, 1, 2] = False
    mask[2] = False
    mask = check_mask(mask.to(device), 3, gh, gw)
    return build_layouts(mask, 32 * gh, 32 * gw, 32, 4)[stage]


def _layouts():
    return {
        'tiles8': _tile_layout(0), 'tiles4': _tile_layout(1, stage=1),
        'tiles2': _tile_layout(2, stage=2), 'tiles1': _tile_layout(3, stage=3),
        'edge8': _fcmae_edge_layout(0), 'edge4': _edge_layout(),
        'edge2': _fcmae_edge_layout(2, grid=(5, 5)),
        'scattered': _scattered_layout(4),
    }


def _halo_python(layout, tile):
    """The [K, (tile + 6)^2] table by its definition."""
    n_, h_, w_ = layout.shape
    nbr = layout.nbr.tolist()
    blocks = sorted({(s // (h_ * w_), (s // w_) % h_ // tile, s % w_ // tile)
                     for s in layout.site.tolist()})
    out = []
    for n, ty, tx in blocks:
        row = []
        for a in range(tile + 6):
            for b in range(tile + 6):
                y, x = ty * tile - 3 + a, tx * tile - 3 + b
                row.append(nbr[n][y][x] if 0 <= y < h_ and 0 <= x < w_ else -1)
        out.append(row)
    return torch.tensor(out, dtype=torch.int32).reshape(len(blocks), (tile + 6)**2)


@pytest.mark.parametrize('name', ['tiles8', 'tiles2', 'edge4', 'scattered'])
@pytest.mark.parametrize('tile', TILES)
def test_tile_halo_rows_match_definition(name, tile):
    layout = _layouts()[name]
    halo = layout.tile_halo_rows(tile)
    assert halo.dtype == torch.int32 and halo.is_contiguous()
    assert torch.equal(halo, _halo_python(layout, tile))
    assert layout.tile_halo_rows(tile) is halo  # cached per stage and tile size
    # every visible row is an own (centre) pixel of exactly one tile
    own = halo.view(-1, tile + 6, tile + 6)[:, 3:3 + tile, 3:3 + tile].reshape(-1)
    own = own[own >= 0].sort().values
    assert torch.equal(own, torch.arange(layout.num_rows, dtype=torch.int32))


def test_fcmae_layouts_record_their_tile_and_the_default_path():
    assert [lay.tile for lay in (_tile_layout(0, stage=s) for s in range(4))] == [8, 4, 2, 1]
    assert _scattered_layout(0).tile == 1
    assert [conv_tile(_tile_layout(0, stage=s)) for s in range(4)] == [8, 0, 0, 0]  # CPU
    # on CUDA stages 2-4 take the skip path instead (tests/test_sparse_dwconv_skip.py)
    assert [conv_tile(_tile_layout(0, stage=s), device_type='cuda')
            for s in range(4)] == [8, 0, 0, 0]
    assert conv_tile(_scattered_layout(0)) == 0 and conv_tile(_scattered_layout(0), 4) == 4


def test_edge_layouts_have_full_and_partial_halos():
    """The layouts below exercise both kinds of tile the issue names."""
    for name in ('edge8', 'edge4', 'edge2'):
        layout = _layouts()[name]
        halo = layout.tile_halo_rows(layout.tile)
        full = (halo >= 0).all(1)
        assert full.any() and (~full).any(), name
    # single visible patch: its only tile(s) have a halo of their own pixels only
    lay = _fcmae_edge_layout(0)
    assert lay.counts.tolist() == [64, 128, 12 * 64]
    first = lay.tile_halo_rows(8)[0]
    assert int((first >= 0).sum()) == 64


@needs_ext
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('c', [13, 6, 12, 64])
def test_tile_path_equals_gather_bitwise(dtype, c):
    """Same tap order and operations (conv_tile_row vs conv_row): identical
    forward and input gradient for every tile size on every layout."""
    for name, layout in _layouts().items():
        f, w, b, go = _inputs(layout, c, dtype, 1)
        f, go, w2, b = f.to(dtype), go.to(dtype), w.reshape(c, 49).to(dtype), b.to(dtype)
        fwd = sparse_dwconv_forward(f, w2, b, layout, tile=0)
        gin = sparse_dwconv_backward(go, f, w2, layout, need_weight=False, tile=0)[0]
        for tile in TILES:
            out = sparse_dwconv_forward(f, w2, b, layout, tile=tile)
            assert torch.equal(out, fwd), (name, tile, (out - fwd).abs().max())
            g = sparse_dwconv_backward(go, f, w2, layout, need_weight=False, tile=tile)[0]
            assert torch.equal(g, gin), (name, tile, (g - gin).abs().max())


def _compare_tiles(layout, dtype, c, tile):
    """Autograd op on the tile path (forward + input grad; weight grad too) vs
    the dense-masked reference, 2x rule."""
    import convnextv2_fast.sparse.dwconv as dw
    f, w, b, go = _inputs(layout, c, dtype, 5)
    orig = dw.conv_tile
    dw.conv_tile = lambda lay, t=None: orig(lay, tile)
    try:
        cand = _run(lambda f_, w_, b_: sparse_dwconv7x7(f_, w_, b_, layout, impl='ext'),
                    f, w, b, go, dtype)
    finally:
        dw.conv_tile = orig
    check_vs_dense_masked(cand, f, w, b, go, dtype, layout, f'tile{tile}')


def check_vs_dense_masked(cand, f, w, b, go, dtype, layout, tag):
    """``cand`` = (out, grad_input, grad_weight, grad_bias) of the sparse
    conv against the dense-masked reference: fp64 to 1e-12, else the 2x
    same-dtype rule."""
    ref = (lambda f_, w_, b_: sparse_dwconv7x7_dense_masked_ref(f_, w_, b_, layout))
    same = _run(ref, f, w, b, go, dtype)
    hi = _run(ref, f, w, b, go, torch.float64)
    for name, x, y, z in zip(('out', 'grad_input', 'grad_weight', 'grad_bias'), cand, same,
                             hi):
        assert x.dtype == dtype
        if dtype == torch.float64:
            torch.testing.assert_close(x, z, rtol=1e-12, atol=1e-12)
        else:
            assert_close_to_ref(f'{tag}/{name}', x, y, z, dtype=dtype)


@needs_ext
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('name', ['edge8', 'edge4', 'edge2', 'tiles8', 'scattered'])
def test_tile_path_matches_dense_masked_reference(name, dtype):
    layout = _layouts()[name]
    tile = layout.tile if layout.tile in TILES else 4
    _compare_tiles(layout, dtype, 12, tile)


@needs_ext
def test_wrong_halo_table_is_rejected():
    """The gate can fail: a halo table with rows and columns swapped (a
    transposed stencil) must fail the 2x rule; the right one passes."""
    layout = _fcmae_edge_layout(1)
    f, w, b, _ = _inputs(layout, 12, torch.float32, 7)
    w2 = w.reshape(12, 49)
    taps = w2.t().contiguous()
    ops = torch.ops.convnextv2_fast
    halo = layout.tile_halo_rows(4)
    bad_halo = halo.view(-1, 10, 10).transpose(1, 2).contiguous().view(-1, 100)
    good = ops.sparse_dwconv_tile_fwd(f, taps, b, halo, 4)
    bad = ops.sparse_dwconv_tile_fwd(f, taps, b, bad_halo, 4)
    same = sparse_dwconv7x7_dense_masked_ref(f, w, b, layout)
    hi = sparse_dwconv7x7_dense_masked_ref(f.double(), w.double(), b.double(), layout)
    assert_close_to_ref('good', good, same, hi, dtype=torch.float32)
    with pytest.raises(AssertionError, match='tolerance'):
        assert_close_to_ref('bad', bad, same, hi, dtype=torch.float32)


@needs_ext
def test_weight_and_input_grad_deterministic_on_tile_layouts():
    """Bit-identical across runs and thread counts (no atomics, fixed order)."""
    layout = _tile_layout(5, n=3)
    f, w, _, go = _inputs(layout, 24, torch.float32, 6)
    w2 = w.reshape(24, 49)
    check_deterministic(lambda: sparse_dwconv_backward(go, f, w2, layout))


def check_deterministic(fn, tag=None):
    """fn() bit-identical with 1 and 2+ threads and on a third run."""
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        r1 = fn()
        torch.set_num_threads(max(old, 2))
        r2 = fn()
    finally:
        torch.set_num_threads(old)
    r3 = fn()
    for a, b, c in zip(r1, r2, r3):
        assert torch.equal(a, b) and torch.equal(a, c), tag


@needs_ext
def test_tile_op_checks_name_the_argument():
    layout = _tile_layout(0, stage=1)
    f = torch.randn(layout.num_rows, 4)
    taps = torch.randn(49, 4)
    ops = torch.ops.convnextv2_fast
    halo = layout.tile_halo_rows(4)
    with pytest.raises(RuntimeError, match='tile must be 2, 4 or 8'):
        ops.sparse_dwconv_tile_fwd(f, taps, None, halo, 3)
    with pytest.raises(RuntimeError, match=r'halo_rows must be a \[K, \(tile \+ 6\)\^2\]'):
        ops.sparse_dwconv_tile_fwd(f, taps, None, halo, 8)
    with pytest.raises(RuntimeError, match='halo_rows must be int32'):
        ops.sparse_dwconv_tile_fwd(f, taps, None, halo.long(), 4)
    with pytest.raises(RuntimeError, match='taps must have shape'):
        ops.sparse_dwconv_tile_fwd(f, taps.t().contiguous(), None, halo, 4)
    with pytest.raises(Exception, match='tile must be 0'):
        sparse_dwconv_forward(f, taps.t(), None, layout, tile=3)


@needs_ext
def test_tile_op_opcheck_and_compile():
    from convnextv2_fast.sparse._ops import sparse_ops
    ops = sparse_ops()
    layout = _tile_layout(1, stage=2)
    f, w, b, _ = _inputs(layout, 5, torch.float32, 2)
    taps = w.reshape(5, 49).t().contiguous()
    halo = layout.tile_halo_rows(2)
    torch.library.opcheck(ops.sparse_dwconv_tile_fwd.default, (f, taps, b, halo, 2),
                          test_utils=('test_schema', 'test_faketensor'))
    fn = torch.compile(lambda *a: ops.sparse_dwconv_tile_fwd(*a) * 2, backend='aot_eager',
                       fullgraph=True)
    torch.testing.assert_close(fn(f, taps, b, halo, 2),
                               ops.sparse_dwconv_tile_fwd(f, taps, b, halo, 2) * 2,
                               rtol=0, atol=0)


# -- GPU (skipped on CPU machines) ---------------------------------------------------
def cuda_tile_cases(fn):
    """The GPU tile tests' cases: every dtype; C = 45 and 6 (one channel a
    lane / partial channel chunks), 12 and 128 (16-byte loads)."""
    for mark in (pytest.mark.parametrize('c', [45, 6, 12, 128]),
                 pytest.mark.parametrize('dtype', [torch.float32, torch.float16,
                                                   torch.bfloat16]),
                 needs_ext, pytest.mark.gpu):
        fn = mark(fn)
    return fn


@cuda_tile_cases
def test_cuda_tile_kernel(dtype, c):
    """CUDA tile kernel (every vector width: C = 45 -> V 1, 6 -> 2, 12/128 -> 4
    for fp16; partial channel chunks at 45 and 6) vs the C++ twin (2x rule
    against fp64) and vs the CUDA gather kernel (bit for bit: same FMA
    sequence), forward and input gradient, every tile size."""
    import convnextv2_fast._C as C
    assert C.WITH_CUDA, 'extension built without CUDA'
    for name, lay_cpu in _layouts().items():
        lay_gpu = layout_from_visibility(lay_cpu.nbr.cuda() >= 0, tile=lay_cpu.tile)
        f, w, b, go = _inputs(lay_cpu, c, dtype, 8)
        f, go, w2, b = f.to(dtype), go.to(dtype), w.reshape(c, 49).to(dtype), b.to(dtype)
        hi = sparse_dwconv7x7_dense_masked_ref(f.double(), w2.double(), b.double(), lay_cpu)
        for tile in TILES:
            cpu = sparse_dwconv_forward(f, w2, b, lay_cpu, tile=tile)
            # mma=False: the FFMA tile kernel (the tensor-core one has its own tests)
            gpu = sparse_dwconv_forward(f.cuda(), w2.cuda(), b.cuda(), lay_gpu, tile=tile,
                                        mma=False)
            gat = sparse_dwconv_forward(f.cuda(), w2.cuda(), b.cuda(), lay_gpu, tile=0)
            assert_close_to_ref(f'cuda-tile{tile}/{name}', gpu.cpu(), cpu, hi, dtype=dtype)
            assert torch.equal(gpu, gat), (name, tile)
            gin = sparse_dwconv_backward(go.cuda(), f.cuda(), w2.cuda(), lay_gpu,
                                         need_weight=False, tile=tile, mma=False)[0]
            gin0 = sparse_dwconv_backward(go.cuda(), f.cuda(), w2.cuda(), lay_gpu,
                                          need_weight=False, tile=0)[0]
            assert torch.equal(gin, gin0), (name, tile)
