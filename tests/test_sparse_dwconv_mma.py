"""The tensor-core tile path of the submanifold depthwise 7x7 conv (forward and
input gradient, fp16/bf16, 8x8 tiles): ``sparse_dwconv_mma_fwd``.

On CPU the C++ twin runs the CUDA kernel's staging, fragment and epilogue
index functions (``sparse_dwconv_mma.h``) with ldmatrix / mma.sync emulated
lane by lane from the PTX ISA layouts, so these tests exercise the index math
the GPU runs:

* exact arithmetic (small integers, taps in 1/8 steps: every partial sum is
  exact in fp32, so any order gives the same bits): the twin equals the FFMA
  tile path and the gather bit for bit, on FCMAE layouts with full and
  partial halos, an unpaired last tile, partial channel groups (C = 8, 40)
  and on arbitrary visibility maps;
* random data: forward, input gradient (and the weight gradient of the same
  autograd op) against the dense-masked reference under the 2x rule;
* path selection (``conv_mma``), argument checks, opcheck / torch.compile;
* GPU (``-m gpu``): the CUDA kernel equals the twin bit for bit on exact data
  and within the 2x rule on random data, at test and FCMAE stage-1 shapes.
"""
import pytest
import torch

import convnextv2_fast.sparse.dwconv as dw
from convnextv2_fast.sparse import (layout_from_visibility, sparse_dwconv7x7,
                                    sparse_dwconv_backward, sparse_dwconv_forward)
from convnextv2_fast.sparse.dwconv import conv_mma
from convnextv2_fast.testing import assert_close_to_ref

from test_sparse_dwconv import _inputs, _run, _scattered_layout, _tile_layout, needs_ext
from test_sparse_dwconv_tiles import _fcmae_edge_layout, check_vs_dense_masked

DTYPES16 = [torch.float16, torch.bfloat16]


def _layouts():
    """8x8-tile FCMAE layouts (full / partial halos, single-patch and
    all-visible samples, an odd tile count), finer layouts (their 8x8 tiles
    are partly visible) and arbitrary visibility."""
    lays = {'tiles8': _tile_layout(0), 'edge8': _fcmae_edge_layout(0),
            'tiles4': _tile_layout(1, stage=1), 'tiles2': _tile_layout(2, stage=2),
            'scattered': _scattered_layout(4)}
    assert any(lay.tile_halo_rows(8).shape[0] % 2 for lay in lays.values())  # unpaired tile
    return lays


def _exact_inputs(layout, c, seed):
    """Integers in [-4, 4], taps in 1/8 steps in [-1, 1], integer bias: every
    product and partial sum of a 7x7 stencil is exact in fp32 (and the
    results, |y| <= 200 + 4, are exact in fp16 and bf16 up to rounding of the
    final value, which is the same single rounding on every path)."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randint(-4, 5, (layout.num_rows, c), generator=g).float()
    w = torch.randint(-8, 9, (c, 49), generator=g).float() / 8
    b = torch.randint(-3, 4, (c, ), generator=g).float()
    return f, w, b


def _taps(w2, dtype, flip=False):
    return (w2.flip(1) if flip else w2).t().contiguous().to(dtype)


@needs_ext
@pytest.mark.parametrize('dtype', DTYPES16)
@pytest.mark.parametrize('c', [8, 40, 64])
def test_mma_twin_equals_tile_and_gather_on_exact_data(dtype, c):
    ops = torch.ops.convnextv2_fast
    for name, layout in _layouts().items():
        f, w2, b = _exact_inputs(layout, c, 3)
        f, b = f.to(dtype), b.to(dtype)
        halo = layout.tile_halo_rows(8)
        for flip, bias in ((False, b), (True, None)):  # forward, input gradient
            taps = _taps(w2, dtype, flip)
            mma = ops.sparse_dwconv_mma_fwd(f, taps, bias, halo)
            tile = ops.sparse_dwconv_tile_fwd(f, taps, bias, halo, 8)
            gat = ops.sparse_dwconv_fwd(f, taps, bias, layout.neighbour_rows())
            assert torch.equal(mma, tile), (name, flip, (mma - tile).abs().max())
            assert torch.equal(mma, gat), (name, flip)


@needs_ext
def test_exact_data_check_can_fail():
    """The exact-data gate sees a wrong stencil: transposed taps differ."""
    layout = _tile_layout(0)
    f, w2, b = _exact_inputs(layout, 16, 4)
    ops = torch.ops.convnextv2_fast
    halo = layout.tile_halo_rows(8)
    taps = _taps(w2, torch.float16)
    wt = w2.view(16, 7, 7).transpose(1, 2).reshape(16, 49)
    good = ops.sparse_dwconv_tile_fwd(f.half(), taps, None, halo, 8)
    bad = ops.sparse_dwconv_mma_fwd(f.half(), _taps(wt, torch.float16), None, halo)
    assert not torch.equal(good, bad)


def _force_mma(monkeypatch):
    monkeypatch.setattr(dw, 'conv_tile', lambda lay, t=None: 8)
    monkeypatch.setattr(dw, 'conv_mma', lambda x, tile, mma=None: True)


@needs_ext
@pytest.mark.parametrize('dtype', DTYPES16)
@pytest.mark.parametrize('name', ['tiles8', 'edge8', 'tiles2', 'scattered'])
def test_mma_path_matches_dense_masked_reference(name, dtype, monkeypatch):
    """Autograd op with the tensor-core forward and input gradient (the
    weight gradient on the FFMA tile path) vs the dense-masked reference."""
    layout = _layouts()[name]
    f, w, b, go = _inputs(layout, 24, dtype, 5)
    _force_mma(monkeypatch)
    cand = _run(lambda f_, w_, b_: sparse_dwconv7x7(f_, w_, b_, layout, impl='ext'),
                f, w, b, go, dtype)
    check_vs_dense_masked(cand, f, w, b, go, dtype, layout, 'mma')


@needs_ext
def test_conv_mma_selects_where_it_applies():
    x16 = torch.zeros(10, 16, dtype=torch.float16)
    assert not conv_mma(x16, 8)  # CPU: the FFMA twin unless asked
    assert conv_mma(x16, 8, True)
    assert not conv_mma(x16, 8, False)
    assert not conv_mma(torch.zeros(10, 16), 8)  # fp32
    assert not conv_mma(torch.zeros(10, 12, dtype=torch.float16), 8)  # C % 8
    assert not conv_mma(x16, 4)
    assert not conv_mma(torch.zeros(161, dtype=torch.float16)[1:].view(10, 16), 8)  # unaligned
    for bad in ((x16, 4), (torch.zeros(10, 16), 8), (torch.zeros(10, 12).half(), 8)):
        with pytest.raises(Exception, match='tensor-core path needs'):
            conv_mma(*bad, True)
    if torch.cuda.is_available():
        assert conv_mma(x16.cuda(), 8) and conv_mma(x16.cuda().bfloat16(), 8)


@needs_ext
def test_mma_op_checks_name_the_argument():
    layout = _tile_layout(0)
    ops = torch.ops.convnextv2_fast
    halo = layout.tile_halo_rows(8)
    f = torch.randn(layout.num_rows, 16).half()
    taps = torch.randn(49, 16).half()
    with pytest.raises(RuntimeError, match='float16 or bfloat16'):
        ops.sparse_dwconv_mma_fwd(f.float(), taps.float(), None, halo)
    with pytest.raises(RuntimeError, match='multiple of 8'):
        ops.sparse_dwconv_mma_fwd(f[:, :12].contiguous(), taps[:, :12].contiguous(), None,
                                  halo)
    buf = torch.zeros(layout.num_rows * 16 + 1, dtype=torch.float16)
    with pytest.raises(RuntimeError, match='16-byte aligned'):
        ops.sparse_dwconv_mma_fwd(buf[1:].view(-1, 16), taps, None, halo)
    hbuf = torch.zeros(halo.numel() + 1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match='halo_rows must be 8-byte aligned'):
        ops.sparse_dwconv_mma_fwd(f, taps, None, hbuf[1:].view_as(halo))
    with pytest.raises(RuntimeError, match=r'halo_rows must be a \[K, \(tile \+ 6\)\^2\]'):
        ops.sparse_dwconv_mma_fwd(f, taps, None, layout.tile_halo_rows(4))


@needs_ext
def test_mma_op_opcheck_compile_and_determinism():
    from convnextv2_fast.sparse._ops import sparse_ops
    ops = sparse_ops()
    layout = _tile_layout(1)
    f, w, b, _ = _inputs(layout, 16, torch.float16, 2)
    taps = _taps(w.reshape(16, 49), torch.float16)
    f, b = f.half(), b.half()
    halo = layout.tile_halo_rows(8)
    torch.library.opcheck(ops.sparse_dwconv_mma_fwd.default, (f, taps, b, halo),
                          test_utils=('test_schema', 'test_faketensor'))
    fn = torch.compile(lambda *a: ops.sparse_dwconv_mma_fwd(*a) * 2, backend='aot_eager',
                       fullgraph=True)
    ref = ops.sparse_dwconv_mma_fwd(f, taps, b, halo)
    torch.testing.assert_close(fn(f, taps, b, halo), ref * 2, rtol=0, atol=0)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(ops.sparse_dwconv_mma_fwd(f, taps, b, halo), ref)
    finally:
        torch.set_num_threads(old)


@needs_ext
def test_empty_inputs():
    ops = torch.ops.convnextv2_fast
    f = torch.zeros(0, 16, dtype=torch.bfloat16)
    out = ops.sparse_dwconv_mma_fwd(f, torch.zeros(49, 16, dtype=torch.bfloat16), None,
                                    torch.zeros(0, 196, dtype=torch.int32))
    assert out.shape == (0, 16)


# -- GPU (skipped on CPU machines) ---------------------------------------------------
def _gpu_layout(lay_cpu):
    return layout_from_visibility(lay_cpu.nbr.cuda() >= 0, tile=lay_cpu.tile)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize('dtype', DTYPES16)
@pytest.mark.parametrize('c', [8, 40, 128])
def test_cuda_mma_kernel(dtype, c):
    """CUDA tensor-core kernel vs the twin: bit for bit on exact data (so the
    fragment layouts, staging and epilogue agree), 2x rule on random data
    (forward and input gradient, both errors printed), bit-identical reruns."""
    import convnextv2_fast._C as C
    assert C.WITH_CUDA, 'extension built without CUDA'
    ops = torch.ops.convnextv2_fast
    for name, lay_cpu in _layouts().items():
        lay_gpu = _gpu_layout(lay_cpu)
        halo, halo_g = lay_cpu.tile_halo_rows(8), lay_gpu.tile_halo_rows(8)
        f, w2, b = _exact_inputs(lay_cpu, c, 6)
        f, b = f.to(dtype), b.to(dtype)
        taps = _taps(w2, dtype)
        cpu = ops.sparse_dwconv_mma_fwd(f, taps, b, halo)
        gpu = ops.sparse_dwconv_mma_fwd(f.cuda(), taps.cuda(), b.cuda(), halo_g)
        assert torch.equal(gpu.cpu(), cpu), (name, (gpu.cpu() - cpu).abs().max())
        f, w, b, go = _inputs(lay_cpu, c, dtype, 8)
        f, go, w2, b = f.to(dtype), go.to(dtype), w.reshape(c, 49).to(dtype), b.to(dtype)
        for x, bias, flip, what in ((f, b, False, 'fwd'), (go, None, True, 'dgrad')):
            taps = _taps(w2.float(), dtype, flip)
            hi = ops.sparse_dwconv_tile_fwd(x.double(), taps.double(),
                                            None if bias is None else bias.double(), halo, 8)
            cpu = ops.sparse_dwconv_mma_fwd(x, taps, bias, halo)
            args = (x.cuda(), taps.cuda(), None if bias is None else bias.cuda(), halo_g)
            gpu = ops.sparse_dwconv_mma_fwd(*args)
            assert torch.equal(gpu, ops.sparse_dwconv_mma_fwd(*args))
            assert_close_to_ref(f'cuda-mma/{name}/{what}', gpu.cpu(), cpu, hi, dtype=dtype)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize('dtype', DTYPES16)
def test_cuda_mma_default_path_at_fcmae_stage1(dtype):
    """FCMAE stage 1 (8 images, 224^2, C = 128): the default CUDA path is the
    tensor-core kernel; forward and input gradient match the FFMA tile kernel
    under the 2x rule against fp64."""
    layout = _tile_layout(9, n=8, img_hw=(224, 224), stage=0, device='cuda')
    f, w, b, go = _inputs(layout, 128, dtype, 10, device='cuda')
    f, go, w2, b = f.to(dtype), go.to(dtype), w.reshape(128, 49).to(dtype), b.to(dtype)
    assert conv_mma(f, dw.conv_tile(layout))
    hi = sparse_dwconv_forward(f.double(), w2.double(), b.double(), layout)
    out = sparse_dwconv_forward(f, w2, b, layout)
    ffma = sparse_dwconv_forward(f, w2, b, layout, mma=False)
    assert_close_to_ref('stage1-mma/fwd', out.cpu(), ffma.cpu(), hi.cpu(), dtype=dtype)
    hi = sparse_dwconv_backward(go.double(), f.double(), w2.double(), layout,
                                need_weight=False)[0]
    gin = sparse_dwconv_backward(go, f, w2, layout, need_weight=False)[0]
    gin0 = sparse_dwconv_backward(go, f, w2, layout, need_weight=False, mma=False)[0]
    assert_close_to_ref('stage1-mma/dgrad', gin.cpu(), gin0.cpu(), hi.cpu(), dtype=dtype)
