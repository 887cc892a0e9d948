"""The skip path of the submanifold depthwise 7x7 conv (``sparse_dwconv_skip_fwd``
/ ``sparse_dwconv_skip_wgrad``: ``skip_for_each_px`` / ``skip_tile_fwd`` /
``skip_tile_wgrad`` in ``sparse_dwconv_math.h``, run by the C++ twin here and
by the CUDA kernels on a GPU, where FCMAE's stages 2-4 take it).

* forward, input gradient and weight gradient vs the exact (fp64) result:
  within the fp32 summation bound, and within the 2x rule of the gather (the
  same-precision path) -- every dtype, tile size 1 / 2 / 4, vector width,
  on FCMAE layouts (full and partial halos, single-visible-patch and
  all-visible samples, sample boundaries inside tile chunks) and on arbitrary
  visibility maps (partly visible source tiles: the per-pixel branch);
  fp64 to 1e-12;
* equal to the gather bit for bit where every sum is exact (small integers);
* the autograd op on the skip path vs the dense-masked reference (2x rule);
* the weight gradient bit-identical across runs and thread counts;
* the default path takes it where ``SKIP_PATH`` says; bad arguments named;
  a wrong halo table fails; opcheck / torch.compile; CUDA vs twin (``-m gpu``).
"""
import pytest
import torch

from convnextv2_fast.sparse import (layout_from_visibility, sparse_dwconv7x7,
                                    sparse_dwconv_backward, sparse_dwconv_forward)
from convnextv2_fast.sparse.dwconv import SKIP_PATH, SKIP_TILES, _taps, conv_skip
from convnextv2_fast.testing import assert_close_to_ref

from test_sparse_dwconv import _inputs, _run, _scattered_layout, _tile_layout, needs_ext
from test_sparse_dwconv_tile_wgrad import _wgrad, check_wgrad_paths
from test_sparse_dwconv_tiles import DTYPES, _layouts, check_deterministic, check_vs_dense_masked

ops = torch.ops.convnextv2_fast


def _skip(x, w2, b, layout, tile, flip=False):
    return ops.sparse_dwconv_skip_fwd(x, _taps(w2, flip), b, layout.tile_halo_rows(tile), tile)


def _skip_wgrad(go, f, layout, tile):
    return ops.sparse_dwconv_skip_wgrad(go, f, layout.tile_halo_rows(tile), tile)


def _gather(x, w2, b, layout, flip=False):
    return ops.sparse_dwconv_fwd(x, _taps(w2, flip), b, layout.neighbour_rows())


def _fwd_bound(x, w2, b, layout, flip=False):
    """|fp32 sum - exact| bound per output: 50 eps sum |terms| (49 taps + bias)."""
    ab = None if b is None else b.double().abs()
    return 50 * 2.0**-24 * _gather(x.double().abs(), w2.double().abs(), ab, layout, flip)


@needs_ext
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('c', [13, 6, 12, 64])
def test_skip_forward_and_input_grad_match_the_gather(dtype, c):
    """Same products, another fp32 order: within the summation bound of the
    exact result and the 2x rule of the gather's error (both printed)."""
    for name, layout in _layouts().items():
        f, w, b, go = _inputs(layout, c, dtype, 1)
        f, go, w2, b = f.to(dtype), go.to(dtype), w.reshape(c, 49).to(dtype), b.to(dtype)
        for what, x, bias, flip in (('fwd', f, b, False), ('dgrad', go, None, True)):
            exact = _gather(x.double(), w2.double(), None if bias is None else bias.double(),
                            layout, flip)
            gather = _gather(x, w2, bias, layout, flip)
            bound = _fwd_bound(x, w2, bias, layout, flip)
            for tile in SKIP_TILES:
                got = _skip(x, w2, bias, layout, tile, flip)
                if dtype == torch.float64:
                    torch.testing.assert_close(got, gather, rtol=1e-12, atol=1e-12)
                    continue
                if dtype == torch.float32:  # output rounding only for 16-bit dtypes
                    err = (got.double() - exact).abs()
                    assert (err <= bound + 1e-30).all(), (name, tile, what, err.max())
                assert_close_to_ref(f'{name}/skip{tile}/{what}', got, gather, exact, dtype=dtype)


@needs_ext
@pytest.mark.parametrize('tile', SKIP_TILES)
def test_skip_equals_the_gather_bitwise_on_exact_sums(tile):
    """Small integers: every fp32 sum is exact, so any order gives the same
    bits -- the skip path computes the same set of products as the gather
    (no tap lost or doubled, none from an absent pixel)."""
    for name, layout in _layouts().items():
        g = torch.Generator().manual_seed(3)
        c = 10
        f = torch.randint(-4, 5, (layout.num_rows, c), generator=g).float()
        go = torch.randint(-4, 5, (layout.num_rows, c), generator=g).float()
        w2 = torch.randint(-3, 4, (c, 49), generator=g).float()
        b = torch.randint(-3, 4, (c, ), generator=g).float()
        assert torch.equal(_skip(f, w2, b, layout, tile), _gather(f, w2, b, layout)), name
        assert torch.equal(_skip(go, w2, None, layout, tile, True),
                           _gather(go, w2, None, layout, True)), name
        for x, y in zip(_skip_wgrad(go, f, layout, tile), _wgrad(go, f, layout, 0)):
            assert torch.equal(x, y), (name, tile)


@needs_ext
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('c', [13, 6, 64])
def test_skip_wgrad_within_the_summation_bound(dtype, c):
    check_wgrad_paths(dtype, c, {f'skip{t}': (lambda go, f, lay, t=t: _skip_wgrad(go, f, lay, t))
                                 for t in SKIP_TILES})


def test_layouts_exercise_partial_source_tiles_and_chunks():
    """What the skip path can get wrong is present: source tiles partly visible
    (the per-pixel branch: arbitrary maps, and FCMAE layouts read with a
    larger tile than their own), fully visible and absent ones, and several
    weight-gradient chunks ending in a partial one."""
    lay = _layouts()['scattered']
    halo = lay.tile_halo_rows(2).view(-1, 8, 8)
    part = halo[:, 1:7, 1:7].reshape(-1, 3, 2, 3, 2).permute(0, 1, 3, 2, 4).reshape(-1, 4)
    state = (part >= 0).sum(1)
    assert (state == 4).any() and (state == 0).any() and ((state > 0) & (state < 4)).any()
    for tile, lay in _chunk_layouts().items():
        k, per = lay.tile_halo_rows(tile).shape[0], 256 // tile**2  # SkipGeom::kWgradTiles
        assert k > 2 * per and k % per, tile


def _chunk_layouts():
    """Per skip tile a layout with several weight-gradient chunks, the last partial."""
    return {4: _tile_layout(5, n=8, img_hw=(224, 224), stage=1),
            2: _tile_layout(5, n=8, img_hw=(224, 224), stage=2),
            1: _scattered_layout(1, n=4, hw=(20, 30))}


@needs_ext
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('name', ['tiles4', 'tiles2', 'tiles1', 'edge4', 'edge2', 'scattered'])
def test_autograd_on_the_skip_path_matches_dense_masked(name, dtype):
    """The autograd op with the skip path forced (forward, input and weight
    gradient) vs the dense-masked reference: 2x rule, fp64 to 1e-12; the
    weight gradient is the skip op's."""
    import convnextv2_fast.sparse.dwconv as dw
    layout = _layouts()[name]
    tile = layout.tile if layout.tile in SKIP_TILES else 2
    f, w, b, go = _inputs(layout, 12, dtype, 5)
    assert dw.conv_tile(layout) == 0  # no FFMA tile path: the skip choice decides
    orig = dw.conv_skip
    dw.conv_skip = lambda lay, s=None, device_type=None: tile
    try:
        cand = _run(lambda f_, w_, b_: sparse_dwconv7x7(f_, w_, b_, layout, impl='ext'),
                    f, w, b, go, dtype)
    finally:
        dw.conv_skip = orig
    gw, gb = _skip_wgrad(go.to(dtype), f.to(dtype), layout, tile)
    assert torch.equal(cand[2].reshape(12, 49), gw.t().to(dtype))
    assert torch.equal(cand[3], gb.to(dtype))
    check_vs_dense_masked(cand, f, w, b, go, dtype, layout, f'skip{tile}/{name}')


@needs_ext
def test_skip_wgrad_deterministic_across_runs_and_threads():
    for tile, layout in _chunk_layouts().items():
        f, _, _, go = _inputs(layout, 24, torch.float32, 6)
        check_deterministic(lambda: _skip_wgrad(go, f, layout, tile), tile)


def test_default_paths():
    """CUDA: stages 2-4 (tiles 4, 2, 1) take the skip path (4x4 source tiles
    over stage 4's 1x1 layout), stage 1 the 8x8 tile path; CPU as
    SKIP_PATH['cpu']; explicit choices win; bad values named."""
    lays = [_tile_layout(0, stage=s) for s in range(4)]
    assert [conv_skip(lay, device_type='cuda') for lay in lays] == [0, 4, 2, 4]
    assert [conv_skip(lay) for lay in lays] == [SKIP_PATH['cpu'].get(t, 0)
                                                for t in (8, 4, 2, 1)]
    assert conv_skip(lays[1], True) == 4 and conv_skip(lays[1], False) == 0
    assert conv_skip(lays[0], 2) == 2
    from convnextv2_fast._errors import ArgumentError
    with pytest.raises(ArgumentError, match='skip must be'):
        conv_skip(lays[0], 8)
    with pytest.raises(ArgumentError, match='skip must be'):
        conv_skip(lays[0], True)  # the layout's 8x8 tiles have no skip instantiation


@needs_ext
def test_forward_and_backward_take_the_requested_path():
    layout = _layouts()['tiles2']
    f, w, b, go = _inputs(layout, 8, torch.float32, 2)
    w2 = w.reshape(8, 49)
    out = sparse_dwconv_forward(f, w2, b, layout, skip=2)
    assert torch.equal(out, _skip(f, w2, b, layout, 2))
    gin, gw, gb = sparse_dwconv_backward(go, f, w2, layout, skip=2)
    assert torch.equal(gin, _skip(go, w2, None, layout, 2, True))
    sw, sb = _skip_wgrad(go, f, layout, 2)
    assert torch.equal(gw, sw.t()) and torch.equal(gb, sb)
    # an explicit FFMA tile wins over the skip path
    out8 = sparse_dwconv_forward(f, w2, b, layout, tile=4, skip=2)
    assert torch.equal(out8, ops.sparse_dwconv_tile_fwd(f, _taps(w2), b,
                                                        layout.tile_halo_rows(4), 4))


@needs_ext
def test_wrong_halo_table_is_rejected():
    """The gate can fail: a halo table with rows and columns swapped (a
    transposed stencil) fails the 2x rule; the right one passes."""
    layout = _layouts()['tiles2']
    f, w, b, _ = _inputs(layout, 8, torch.float32, 4)
    w2 = w.reshape(8, 49)
    exact = _gather(f.double(), w2.double(), b.double(), layout)
    gather = _gather(f, w2, b, layout)
    halo = layout.tile_halo_rows(2)
    bad = halo.view(-1, 8, 8).transpose(1, 2).contiguous().view(-1, 64)
    good = ops.sparse_dwconv_skip_fwd(f, _taps(w2), b, halo, 2)
    assert_close_to_ref('skip2/good', good, gather, exact, dtype=torch.float32)
    wrong = ops.sparse_dwconv_skip_fwd(f, _taps(w2), b, bad, 2)
    with pytest.raises(AssertionError):
        assert_close_to_ref('skip2/transposed', wrong, gather, exact, dtype=torch.float32)


@needs_ext
@pytest.mark.parametrize('tile', SKIP_TILES)
def test_no_tiles_gives_zeros(tile):
    f = torch.zeros(0, 5)
    halo = torch.zeros(0, (tile + 6)**2, dtype=torch.int32)
    gw, gb = ops.sparse_dwconv_skip_wgrad(f, f, halo, tile)
    assert torch.equal(gw, torch.zeros(49, 5)) and torch.equal(gb, torch.zeros(5))
    assert ops.sparse_dwconv_skip_fwd(f, torch.zeros(49, 5), None, halo, tile).shape == (0, 5)


@needs_ext
def test_skip_op_checks_name_the_argument():
    layout = _layouts()['tiles2']
    f = torch.randn(layout.num_rows, 4)
    taps = torch.randn(49, 4)
    halo = layout.tile_halo_rows(2)
    with pytest.raises(RuntimeError, match='tile must be 1, 2 or 4'):
        ops.sparse_dwconv_skip_fwd(f, taps, None, layout.tile_halo_rows(8), 8)
    with pytest.raises(RuntimeError, match=r'halo_rows must be a \[K, \(tile \+ 6\)\^2\]'):
        ops.sparse_dwconv_skip_fwd(f, taps, None, halo, 4)
    with pytest.raises(RuntimeError, match='halo_rows must be int32'):
        ops.sparse_dwconv_skip_fwd(f, taps, None, halo.long(), 2)
    with pytest.raises(RuntimeError, match='grad_out must have the shape of feats'):
        ops.sparse_dwconv_skip_wgrad(f[:-1], f, halo, 2)
    with pytest.raises(RuntimeError, match='taps must have shape'):
        ops.sparse_dwconv_skip_fwd(f, taps[:, :3], None, halo, 2)


@needs_ext
def test_skip_opcheck_and_compile():
    layout = _layouts()['tiles2']
    f, w, b, go = _inputs(layout, 6, torch.float32, 7)
    halo = layout.tile_halo_rows(2)
    taps = _taps(w.reshape(6, 49))
    torch.library.opcheck(ops.sparse_dwconv_skip_fwd.default, (f, taps, b, halo, 2))
    torch.library.opcheck(ops.sparse_dwconv_skip_wgrad.default, (go, f, halo, 2))
    fn = torch.compile(lambda *a: ops.sparse_dwconv_skip_fwd(*a) * 2, backend='aot_eager',
                       fullgraph=True)
    torch.testing.assert_close(fn(f, taps, b, halo, 2),
                               ops.sparse_dwconv_skip_fwd(f, taps, b, halo, 2) * 2,
                               rtol=0, atol=0)


# -- GPU (skipped on CPU machines) ---------------------------------------------------
@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize('c', [45, 6, 12, 128])
def test_cuda_skip_matches_the_twin(dtype, c):
    """CUDA skip kernels (C = 45: one channel a lane and a partial channel
    block; 6, 12, 128: two) vs the C++ twin: the same arithmetic, so equal up
    to the fp32 contraction of the host compiler -- the 2x rule against fp64
    (both errors printed); the weight gradient bit-identical across runs."""
    import convnextv2_fast._C as C
    assert C.WITH_CUDA, 'extension built without CUDA'
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip('the CUDA skip kernels are built for sm_90 only')
    for name, lay_cpu in _layouts().items():
        lay_gpu = layout_from_visibility(lay_cpu.nbr.cuda() >= 0, tile=lay_cpu.tile)
        f, w, b, go = _inputs(lay_cpu, c, dtype, 8)
        f, go, w2, b = f.to(dtype), go.to(dtype), w.reshape(c, 49).to(dtype), b.to(dtype)
        exact = _gather(f.double(), w2.double(), b.double(), lay_cpu)
        wexact = _wgrad(go.double(), f.double(), lay_cpu, 0)
        for tile in SKIP_TILES:
            cpu = _skip(f, w2, b, lay_cpu, tile)
            gpu = _skip(f.cuda(), w2.cuda(), b.cuda(), lay_gpu, tile)
            assert_close_to_ref(f'cuda-skip{tile}/{name}', gpu.cpu(), cpu, exact, dtype=dtype)
            wc = _skip_wgrad(go, f, lay_cpu, tile)
            wg = _skip_wgrad(go.cuda(), f.cuda(), lay_gpu, tile)
            again = _skip_wgrad(go.cuda(), f.cuda(), lay_gpu, tile)
            for x, y, z, a in zip(wg, wc, wexact, again):
                assert torch.equal(x, a), (name, tile)
                assert_close_to_ref(f'cuda-skip{tile}-wgrad/{name}', x.cpu(), y, z,
                                    dtype=torch.float32)
