"""The sparse dwconv byte/issue model (benchmarks/model_sparse_dwconv.py) runs
on a real FCMAE layout and labels its rows as a model."""
import pytest
import torch

from benchmarks import model_sparse_dwconv as msd


def test_model_rows_small_layout():
    rows = msd.run(N=2, stages=(0, ), dtype=torch.bfloat16)
    assert [r['pass'] for r in rows] == ['fwd', 'dgrad', 'wgrad']
    for r in rows:
        assert 'model' in r['model'] and 'not a GPU measurement' in r['model']
        assert r['M'] == 2 * 56 * 56 * 19 // 49 and r['C'] == 128
        assert 0 < r['hbm_floor_us'] <= r['hbm_us'] <= r['model_us']
        assert r['model_us'] == max(r['hbm_us'], r['l2_us'], r['lsu_us'], r['issue_us'])
        assert r['x_hbm_floor'] >= 1


def test_distinct_rows_counts_the_union_per_cta():
    table = torch.tensor([[0, 1] + [-1] * 47, [1, 2] + [-1] * 47, [5] + [-1] * 48],
                         dtype=torch.int32)
    assert msd.distinct_rows_per_cta(table, 2) == (3 + 1) / 2


def test_vector_width_matches_the_cuda_dispatch():
    """fp16: 4 channels, fp32/bf16: 2, odd C: 1 (see sparse_dwconv_cuda.cu)."""
    assert msd.fwd_vec(torch.float16, 128) == 4
    assert msd.fwd_vec(torch.bfloat16, 128) == 2
    assert msd.fwd_vec(torch.float32, 128) == 2
    assert msd.fwd_vec(torch.float16, 6) == 2
    assert msd.fwd_vec(torch.float16, 45) == 1


def _model_max(r):
    return max(r['hbm_us'], r['l2_us'], r['lsu_us'], r['issue_us'], r.get('tensor_us', 0))


def test_tile_path_rows_and_choice():
    """fwd/dgrad/wgrad take the GPU's path (conv_tile: tile 8 at stage 1; fp16/
    bf16 forward and input gradient on tensor cores, conv_mma); on the real
    layout the tile paths model below the gather, and the model gives every
    path (compare_paths) at every stage."""
    # 16 images: at 4 the tensor-core kernel's once-per-CTA setup (taps, B
    # fragments) is not amortised (one tile pair a CTA) and it models on par
    # with the FFMA tiles
    rows = msd.run(N=16, stages=(0, ), dtype=torch.bfloat16)
    assert [r['path'] for r in rows] == ['mma8', 'mma8', 'tile8']
    ffma = msd.run(N=16, stages=(0, ), dtype=torch.bfloat16, path=8)
    assert [r['path'] for r in ffma] == ['tile8'] * 3
    assert [r['path'] for r in msd.run(N=4, stages=(0, ), dtype=torch.float32)] == \
        ['tile8'] * 3
    gather = msd.run(N=16, stages=(0, ), dtype=torch.bfloat16, path=0)
    assert [r['path'] for r in gather] == ['gather'] * 3
    assert rows[0]['x_hbm_floor'] < ffma[0]['x_hbm_floor'] < gather[0]['x_hbm_floor']
    assert rows[0]['hbm_floor_us'] == gather[0]['hbm_floor_us']
    for r in rows + ffma:
        assert r['model_us'] == _model_max(r)
        if r['path'] != 'mma8':
            assert r['issue_us'] >= r['ffma_floor_us']  # nothing FFMA-based beats them
    paths = msd.compare_paths(N=2, stages=(0, 1))
    assert sorted({(r['stage'], r['path']) for r in paths}) == [
        (s, p) for s in (1, 2) for p in ('gather', 'mma8', 'tile2', 'tile4', 'tile8')]
    assert 'mma8' not in {r['path'] for r in msd.compare_paths(N=2, stages=(0, ),
                                                                  dtype=torch.float32)}


def test_mma_forward_gate():
    """FCMAE V2-B stage 1 (64 images, 224^2, mask 0.6), bf16 and fp16: the
    tensor-core forward and input gradient within 2x of their HBM floor, below
    the FFMA floor in issue time (the FFMAs alone are 1.76x the bf16 floor),
    and faster than the FFMA tile kernel (model, not a GPU measurement)."""
    for dtype in (torch.bfloat16, torch.float16):
        rows = [r for r in msd.run(stages=(0, ), dtype=dtype) if r['pass'] != 'wgrad']
        ffma = [r for r in msd.run(stages=(0, ), dtype=dtype, path=8)
                if r['pass'] != 'wgrad']
        for r, f in zip(rows, ffma):
            assert r['path'] == 'mma8' and f['path'] == 'tile8'
            assert r['x_hbm_floor'] <= 2.0, (dtype, r)
            assert r['issue_us'] < r['ffma_floor_us'] and r['tensor_us'] < r['model_us']
            assert r['model_us'] < 0.75 * f['model_us']


def test_mma_model_constants_match_the_sass():
    """The tensor-core model's instruction counts are those of the sm_90 SASS
    (static counts between the kernel's barriers; the per-pair part is straight-
    line code): per work item and warp 28 LDSM.x4 and 28 HMMA.16816, the item's
    instructions within 10% of MMA_ITEM_INSTR (the model drops half of the
    fourth staging slot: warps 4-7 have none), the once-per-CTA setup at least
    its static count."""
    from benchmarks import sm90
    if not sm90.have_ptxas():
        pytest.skip('no ptxas/nvdisasm for sm_90 here')
    sass = msd.cu_kernel_sass('sparse_dwconv_mma_fwd_kernel')
    assert len(sass) == 2, list(sass)  # fp16 and bf16
    for name, ops in sass.items():
        bars = [k for k, op in enumerate(ops) if op.startswith('BAR')]
        assert len(bars) == 5, (name, len(bars))  # taps, then 4 per pair
        item = ops[bars[1]:]
        assert sum(op.startswith('LDSM') for op in item) == msd.MMA_CH // msd.MMA_WARPS * 7
        assert sum(op.startswith('HMMA.16816.F32') for op in item) == 28
        assert abs(len(item) - msd.MMA_ITEM_INSTR) <= 0.1 * len(item), (name, len(item))
        assert msd.MMA_SETUP_INSTR >= bars[1], (name, bars[1])


def _wgrad_gate(row, gather_row, limit):
    """The tile wgrad gate: at most ``limit`` x its HBM floor and at most 0.6 x
    the gather wgrad's model time (model, not a GPU measurement)."""
    return row['x_hbm_floor'] <= limit and row['model_us'] <= 0.6 * gather_row['model_us']


def test_tile_wgrad_gate_and_its_bad_variant():
    """The weight gradient on the GPU's path (tile 8 at stage 1, tile 4 at stage
    2): within 4x (bf16: the fp32 FFMAs alone are 1.76x the bf16 floor) / 2x
    (fp32) of its HBM floor and below 0.6 x the gather wgrad, issue above the
    FFMA floor; the gate rejects the bad variant,
    the 2x2-tile wgrad at stage 1 (each 2x2 tile stages 64 halo pixels for 4
    pixels: staging and L2 traffic eat the gain) and the gather itself."""
    for dtype, limit in ((torch.bfloat16, 4.0), (torch.float32, 2.0)):
        kw = dict(N=16, stages=(0, 1), dtype=dtype)
        rows = {(r['stage'], r['path']): r
                for r in msd.compare_paths(passes=('wgrad', ), **kw)}
        taken = [r for r in msd.run(**kw) if r['pass'] == 'wgrad']
        assert [(r['stage'], r['path']) for r in taken] == [(1, 'tile8'), (2, 'tile4')]
        for r in taken:
            gather = rows[(r['stage'], 'gather')]
            assert r['hbm_floor_us'] == gather['hbm_floor_us']
            assert r['issue_us'] >= r['ffma_floor_us']
            assert r['model_us'] == _model_max(r)
            assert _wgrad_gate(r, gather, limit), (dtype, r)
        assert not _wgrad_gate(rows[(1, 'tile2')], rows[(1, 'gather')], limit), dtype
        assert not _wgrad_gate(rows[(1, 'gather')], rows[(1, 'gather')], limit), dtype


def test_tile_wgrad_chunking_fills_the_gpu_with_small_partials():
    """FCMAE V2-B stage 1 (64 images, bf16): the tile wgrad's CTAs (chunks x 32-
    channel groups) exceed the 132 SMs' resident slots (8 CTAs of 2 warps each);
    its fp32 partials stay below half the dy + x bytes it reads."""
    from benchmarks import shapes
    from convnextv2_fast.models.fcmae import random_patch_mask
    from convnextv2_fast.sparse.layout import build_layouts
    n, grid = shapes.FCMAE_BATCH, shapes.FCMAE_SIZE // 32
    g = torch.Generator().manual_seed(0)
    mask = random_patch_mask(n, grid, grid, shapes.FCMAE_MASK_RATIO, generator=g)
    lay = build_layouts(mask.reshape(n, grid, grid).bool(), shapes.FCMAE_SIZE,
                        shapes.FCMAE_SIZE, 32, 4)[0]
    k, c = lay.tile_halo_rows(8).shape[0], shapes.V2B_CHANNELS[0]
    chunks = -(-k // (msd.WGRAD_TILE_ROWS // 64))
    assert chunks * (c // msd.TILE_CH) >= 132 * 8
    partial_b = chunks * 50 * c * 4
    assert partial_b < 0.5 * 2 * lay.num_rows * c * 2


def test_tile_wgrad_constants_match_the_kernel():
    """The model's chunking (WGRAD_TILE_ROWS, WGRAD_SLOTS) is the one of
    TileGeom in sparse_dwconv_math.h (read from the source, not assumed)."""
    import os
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, 'csrc', 'sparse_dwconv', 'sparse_dwconv_math.h')) as f:
        text = f.read()
    rows = re.search(r'kWgradTileRows\s*=\s*(\d+)\s*;', text)
    assert rows and int(rows.group(1)) == msd.WGRAD_TILE_ROWS
    slots = re.search(r'kWgradSlots\s*=\s*TS == 8 \? (\d+) : TS == 4 \? (\d+) : (\d+)\s*;', text)
    assert slots and tuple(map(int, slots.groups())) == (
        msd.WGRAD_SLOTS[8], msd.WGRAD_SLOTS[4], msd.WGRAD_SLOTS[2])
