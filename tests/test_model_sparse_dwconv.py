"""The sparse dwconv byte/issue model (benchmarks/model_sparse_dwconv.py) runs
on a real FCMAE layout and labels its rows as a model."""
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


def test_tile_path_rows_and_choice():
    """fwd/dgrad/wgrad take the GPU's path (conv_tile: tile 8 at stage 1); on
    the real layout the tile path models below the gather, and the model gives
    every path (compare_paths) at every stage."""
    rows = msd.run(N=4, stages=(0, ), dtype=torch.bfloat16)
    assert [r['path'] for r in rows] == ['tile8', 'tile8', 'tile8']
    gather = msd.run(N=4, stages=(0, ), dtype=torch.bfloat16, path=0)
    assert [r['path'] for r in gather] == ['gather'] * 3
    assert rows[0]['x_hbm_floor'] < gather[0]['x_hbm_floor']
    assert rows[0]['hbm_floor_us'] == gather[0]['hbm_floor_us']
    for r in rows:
        assert r['model_us'] == max(r['hbm_us'], r['l2_us'], r['lsu_us'], r['issue_us'])
        assert r['issue_us'] >= r['ffma_floor_us']  # nothing beats the FFMAs
    paths = msd.compare_paths(N=2, stages=(0, 1))
    assert sorted({(r['stage'], r['path']) for r in paths}) == [
        (s, p) for s in (1, 2) for p in ('gather', 'tile2', 'tile4', 'tile8')]


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
            assert r['model_us'] == max(r['hbm_us'], r['l2_us'], r['lsu_us'], r['issue_us'])
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
