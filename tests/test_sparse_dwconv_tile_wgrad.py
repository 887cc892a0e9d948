"""The tile path of the weight/bias gradient (``sparse_dwconv_tile_wgrad``:
``load_tile_dy`` / ``wgrad_tile_rows`` / ``sum_slots`` in
``sparse_dwconv_math.h``, run by the C++ twin here and by the CUDA kernel on a
GPU).

* tile wgrad == gather wgrad up to fp32 summation order (both within the
  summation bound of the exact sum), every dtype, tile size and vector width,
  on FCMAE layouts (full and partial halos, single-visible-patch and
  all-visible samples, chunks spanning sample boundaries, a last chunk with
  empty slots) and on arbitrary visibility maps; fp64 to 1e-12;
* vs the dense-masked reference (2x rule, both errors printed) through the
  autograd op, which takes the tile wgrad wherever ``conv_tile`` picks a tile;
* bit-identical across runs and thread counts;
* a wrong halo table is rejected (the tests can fail); no tiles -> zeros;
  bad arguments are named; opcheck / torch.compile.
"""
import pytest
import torch

from benchmarks import model_sparse_dwconv as msd
from convnextv2_fast.sparse import (layout_from_visibility, sparse_dwconv7x7,
                                    sparse_dwconv7x7_dense_masked_ref, sparse_dwconv_backward)
from convnextv2_fast.sparse.dwconv import TILES
from convnextv2_fast.testing import assert_close_to_ref

from test_sparse_dwconv import _inputs, _run, _tile_layout, needs_ext
from test_sparse_dwconv_tiles import (DTYPES, _fcmae_edge_layout, _layouts, check_deterministic,
                                      check_vs_dense_masked, cuda_tile_cases)

# Tiles per weight-gradient chunk and tiles processed at a time (TileGeom<TS>::
# kWgradTiles / kWgradSlots in sparse_dwconv_math.h, as the model reads them;
# tests/test_model_sparse_dwconv.py checks them against the source).
CHUNK_TILES = {t: msd.WGRAD_TILE_ROWS // t**2 for t in TILES}
SLOTS = msd.WGRAD_SLOTS


def _wgrad(grad_out, feats, layout, tile):
    """(grad_taps [49, C], grad_bias) on the path ``tile`` (0 = gather)."""
    ops = torch.ops.convnextv2_fast
    if tile:
        return ops.sparse_dwconv_tile_wgrad(grad_out, feats, layout.tile_halo_rows(tile), tile)
    return ops.sparse_dwconv_bwd_weight(grad_out, feats, layout.neighbour_rows())


def _summation_bound(go, f, layout):
    """|fp32 sum - exact| bound per element: n eps sum |terms| (n = rows + 1),
    sum |terms| = the exact weight gradient of |dy|, |x| (fp64 gather)."""
    ga, gba = _wgrad(go.double().abs(), f.double().abs(), layout, 0)
    n = layout.num_rows + 1
    return n * 2.0**-24 * ga, n * 2.0**-24 * gba


@needs_ext
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('c', [13, 6, 12, 64])
def test_tile_wgrad_equals_gather_up_to_summation_order(dtype, c):
    """Both paths sum the same fp32 products (the inputs' exact values):
    each within the summation bound of the exact sum, the tile path within the
    2x rule of the gather's error (both printed), fp64 to 1e-12."""
    check_wgrad_paths(dtype, c, {f'tile{t}': (lambda go, f, lay, t=t: _wgrad(go, f, lay, t))
                                 for t in TILES})


def check_wgrad_paths(dtype, c, paths):
    """Every path of ``paths`` ({tag: fn(grad_out, feats, layout) -> (grad_taps,
    grad_bias)}) on every layout of ``_layouts`` against the gather and the
    exact sums (:func:`check_wgrad`)."""
    for name, layout in _layouts().items():
        f, _, _, go = _inputs(layout, c, dtype, 3)
        f, go = f.to(dtype), go.to(dtype)
        exact = _wgrad(go.double(), f.double(), layout, 0)
        bound = _summation_bound(go, f, layout)
        gather = _wgrad(go, f, layout, 0)
        for tag, fn in paths.items():
            check_wgrad(f'{name}/{tag}', fn(go, f, layout), gather, exact, bound, dtype)


def check_wgrad(tag, got, gather, exact, bound, dtype):
    """(grad_taps, grad_bias) of a weight-gradient path against the gather's and
    the exact (fp64) sums: opmath dtype; fp64 to 1e-12; else both within the
    summation bound and the 2x rule with the gather as the same-precision (fp32)
    path (errors printed)."""
    for what, x, y, z, bd in zip(('taps', 'bias'), got, gather, exact, bound):
        assert x.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        if dtype == torch.float64:
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
            continue
        err, err_g = (x.double() - z).abs(), (y.double() - z).abs()
        print(f'{tag}/{what} ({dtype}): err {err.max():.3e}, gather err {err_g.max():.3e}, '
              f'bound {bd.max():.3e}')
        assert (err <= bd + 1e-30).all(), (tag, what)
        assert (err_g <= bd + 1e-30).all(), (tag, what)
        assert_close_to_ref(f'{tag}/{what}', x, y, z, dtype=torch.float32)


def test_chunks_span_samples_and_end_with_empty_slots():
    """The layouts above exercise what the chunking can get wrong: a chunk
    holding tiles of two samples, a last chunk shorter than the others whose
    last round has empty slots, several chunks."""
    for name, tile in (('edge8', 8), ('tiles8', 8), ('tiles4', 4), ('edge4', 4),
                       ('edge2', 2), ('tiles2', 2)):
        layout = _layouts()[name]
        halo = layout.tile_halo_rows(tile)
        own = halo.view(-1, tile + 6, tile + 6)[:, 3:3 + tile, 3:3 + tile].reshape(len(halo), -1)
        first = own.clamp(min=0).max(1).values.long()
        sample = layout.sample[first]
        chunk = torch.arange(len(halo)) // CHUNK_TILES[tile]
        spans = any(sample[chunk == k].unique().numel() > 1 for k in chunk.unique())
        assert spans, name
    lay = _layouts()['tiles8']
    assert lay.tile_halo_rows(8).shape[0] > 2 * CHUNK_TILES[8]
    assert lay.tile_halo_rows(8).shape[0] % CHUNK_TILES[8]
    lay = _layouts()['tiles4']
    assert lay.tile_halo_rows(4).shape[0] % CHUNK_TILES[4] % SLOTS[4]


@needs_ext
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('name', ['edge8', 'edge4', 'edge2', 'tiles8', 'tiles4', 'scattered'])
def test_autograd_weight_grad_on_the_tile_path_matches_dense_masked(name, dtype):
    """The autograd op on the tile path (forward, input and weight gradient;
    ``sparse_dwconv_backward`` takes the tile wgrad) vs the dense-masked
    reference: 2x rule (both errors printed), fp64 to 1e-12."""
    import convnextv2_fast.sparse.dwconv as dw
    layout = _layouts()[name]
    tile = layout.tile if layout.tile in TILES else 4
    f, w, b, go = _inputs(layout, 12, dtype, 5)
    orig = dw.conv_tile
    calls = []

    def spy(lay, t=None, device_type=None):
        calls.append(t)
        return orig(lay, tile)

    dw.conv_tile = spy
    try:
        cand = _run(lambda f_, w_, b_: sparse_dwconv7x7(f_, w_, b_, layout, impl='ext'),
                    f, w, b, go, dtype)
    finally:
        dw.conv_tile = orig
    assert calls
    # the autograd op's weight gradient is the tile op's
    gw, gb = _wgrad(go.to(dtype), f.to(dtype), layout, tile)
    assert torch.equal(cand[2].reshape(12, 49), gw.t().to(dtype))
    assert torch.equal(cand[3], gb.to(dtype))
    check_vs_dense_masked(cand, f, w, b, go, dtype, layout, f'tile{tile}/{name}')


@needs_ext
def test_default_path_takes_the_tile_wgrad_where_the_forward_tiles():
    """CPU default: tile 8 at stage 1 (conv_tile), the gather elsewhere — the
    weight gradient follows the forward's path."""
    for stage, tile in ((0, 8), (1, 0)):
        layout = _tile_layout(2, stage=stage)
        f, w, _, go = _inputs(layout, 8, torch.float32, 4)
        _, gw, gb = sparse_dwconv_backward(go, f, w.reshape(8, 49), layout)
        gw_t, gb_t = _wgrad(go, f, layout, tile)
        assert torch.equal(gw, gw_t.t()) and torch.equal(gb, gb_t), stage


@needs_ext
def test_tile_wgrad_deterministic_across_runs_and_threads():
    layout = _tile_layout(5, n=3)
    f, _, _, go = _inputs(layout, 24, torch.float32, 6)
    for tile in TILES:
        assert layout.tile_halo_rows(tile).shape[0] > 2 * CHUNK_TILES[tile]  # several chunks
        check_deterministic(lambda: _wgrad(go, f, layout, tile), tile)


@needs_ext
def test_wrong_halo_table_is_rejected():
    """The gate can fail: the weight gradient from a halo table with rows and
    columns swapped (a transposed stencil) fails the 2x rule; the right one
    passes."""
    layout = _fcmae_edge_layout(1)
    f, w, b, go = _inputs(layout, 12, torch.float32, 7)
    ops = torch.ops.convnextv2_fast
    halo = layout.tile_halo_rows(4)
    bad_halo = halo.view(-1, 10, 10).transpose(1, 2).contiguous().view(-1, 100)
    good = ops.sparse_dwconv_tile_wgrad(go, f, halo, 4)[0].t()
    bad = ops.sparse_dwconv_tile_wgrad(go, f, bad_halo, 4)[0].t()
    ref = (lambda f_, w_, b_: sparse_dwconv7x7_dense_masked_ref(f_, w_, b_, layout))
    same = _run(ref, f, w, b, go, torch.float32)[2].reshape(12, 49)
    hi = _run(ref, f, w, b, go, torch.float64)[2].reshape(12, 49)
    assert_close_to_ref('good', good, same, hi, dtype=torch.float32)
    with pytest.raises(AssertionError, match='tolerance'):
        assert_close_to_ref('bad', bad, same, hi, dtype=torch.float32)


@needs_ext
@pytest.mark.parametrize('tile', TILES)
def test_no_tiles_gives_zeros(tile):
    ops = torch.ops.convnextv2_fast
    f = torch.zeros(0, 5)
    halo = torch.zeros(0, (tile + 6)**2, dtype=torch.int32)
    gw, gb = ops.sparse_dwconv_tile_wgrad(f, f, halo, tile)
    assert gw.shape == (49, 5) and gb.shape == (5, )
    assert not gw.any() and not gb.any()


@needs_ext
def test_tile_wgrad_op_checks_name_the_argument():
    layout = _tile_layout(0, stage=1)
    f = torch.randn(layout.num_rows, 4)
    ops = torch.ops.convnextv2_fast
    halo = layout.tile_halo_rows(4)
    with pytest.raises(RuntimeError, match='sparse_dwconv_tile_wgrad: tile must be 2, 4 or 8'):
        ops.sparse_dwconv_tile_wgrad(f, f, halo, 3)
    with pytest.raises(RuntimeError, match=r'halo_rows must be a \[K, \(tile \+ 6\)\^2\]'):
        ops.sparse_dwconv_tile_wgrad(f, f, halo, 8)
    with pytest.raises(RuntimeError, match='halo_rows must be int32'):
        ops.sparse_dwconv_tile_wgrad(f, f, halo.long(), 4)
    with pytest.raises(RuntimeError, match='grad_out must have the shape'):
        ops.sparse_dwconv_tile_wgrad(f[:, :3].contiguous(), f, halo, 4)
    with pytest.raises(RuntimeError, match='grad_out dtype'):
        ops.sparse_dwconv_tile_wgrad(f.double(), f, halo, 4)


@needs_ext
def test_tile_wgrad_opcheck_and_compile():
    from convnextv2_fast.sparse._ops import sparse_ops
    ops = sparse_ops()
    layout = _tile_layout(1, stage=2)
    f, _, _, go = _inputs(layout, 5, torch.float32, 2)
    halo = layout.tile_halo_rows(2)
    torch.library.opcheck(ops.sparse_dwconv_tile_wgrad.default, (go, f, halo, 2),
                          test_utils=('test_schema', 'test_faketensor'))
    fn = torch.compile(lambda *a: ops.sparse_dwconv_tile_wgrad(*a)[0] * 2, backend='aot_eager',
                       fullgraph=True)
    torch.testing.assert_close(fn(go, f, halo, 2),
                               ops.sparse_dwconv_tile_wgrad(go, f, halo, 2)[0] * 2,
                               rtol=0, atol=0)


# -- GPU (skipped on CPU machines) ---------------------------------------------------
@cuda_tile_cases
def test_cuda_tile_wgrad(dtype, c):
    """CUDA tile wgrad (staging vector widths: C = 45, 6 -> 1 channel a lane,
    12 (fp32) / 128 -> 16-byte loads; partial channel chunks at 45 and 6) vs
    the C++ twin (2x rule against fp64, both errors printed), vs the CUDA
    gather (summation bound) and bit-identical across runs, every tile size."""
    import convnextv2_fast._C as C
    assert C.WITH_CUDA, 'extension built without CUDA'
    for name, lay_cpu in _layouts().items():
        lay_gpu = layout_from_visibility(lay_cpu.nbr.cuda() >= 0, tile=lay_cpu.tile)
        f, _, _, go = _inputs(lay_cpu, c, dtype, 8)
        f, go = f.to(dtype), go.to(dtype)
        exact = _wgrad(go.double(), f.double(), lay_cpu, 0)
        bound = _summation_bound(go, f, lay_cpu)
        gat = _wgrad(go.cuda(), f.cuda(), lay_gpu, 0)
        for tile in TILES:
            cpu = _wgrad(go, f, lay_cpu, tile)
            gpu = _wgrad(go.cuda(), f.cuda(), lay_gpu, tile)
            again = _wgrad(go.cuda(), f.cuda(), lay_gpu, tile)
            for what, x, y, z, g0, a, bd in zip(('taps', 'bias'), gpu, cpu, exact, gat, again,
                                                bound):
                assert torch.equal(x, a), (name, tile, what)
                assert_close_to_ref(f'cuda-tile{tile}-wgrad/{name}/{what}', x.cpu(), y, z,
                                    dtype=torch.float32)
                assert ((x.cpu().double() - z).abs() <= bd + 1e-30).all(), (name, tile)
                assert ((g0.cpu().double() - z).abs() <= bd + 1e-30).all(), (name, tile)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_tile_wgrad_bit_identical_at_fcmae_shape(dtype):
    """Stage 1 and 2 of FCMAE (8 images, 224^2): the default GPU path (tile 8,
    4) is bit-identical across runs."""
    for stage, c in ((0, 128), (1, 256)):
        layout = _tile_layout(9, n=8, img_hw=(224, 224), stage=stage, device='cuda')
        f, w, _, go = _inputs(layout, c, dtype, 10, device='cuda')
        f, go, w2 = f.to(dtype), go.to(dtype), w.reshape(c, 49).to(dtype)
        r1 = sparse_dwconv_backward(go, f, w2, layout)
        gw_t, gb_t = _wgrad(go, f, layout, layout.tile)
        assert torch.equal(r1[1], gw_t.t()) and torch.equal(r1[2], gb_t)
        for _ in range(3):
            r2 = sparse_dwconv_backward(go, f, w2, layout)
            for a, b in zip(r1, r2):
                assert torch.equal(a, b)
