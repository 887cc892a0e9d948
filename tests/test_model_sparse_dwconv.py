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
        (s, p) for s in (1, 2) for p in ('gather', 'mma8', 'skip1', 'skip2', 'skip4', 'tile2',
                                         'tile4', 'tile8')]
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
    """The weight gradient on the 8x8 tile path (the GPU's at stage 1; tile 4 at
    stage 2, the path before the skip path): within 4x (bf16: the fp32 FFMAs
    alone are 1.76x the bf16 floor) / 2x (fp32) of its HBM floor and below 0.6 x
    the gather wgrad, issue above the FFMA floor; the gate rejects the bad
    variant, the 2x2-tile wgrad at stage 1 (each 2x2 tile stages 64 halo pixels
    for 4 pixels: staging and L2 traffic eat the gain) and the gather itself."""
    for dtype, limit in ((torch.bfloat16, 4.0), (torch.float32, 2.0)):
        kw = dict(N=16, stages=(0, 1), dtype=dtype)
        rows = {(r['stage'], r['path']): r
                for r in msd.compare_paths(passes=('wgrad', ), **kw)}
        taken = [r for r in msd.run(**kw) if r['pass'] == 'wgrad']
        assert [(r['stage'], r['path']) for r in taken] == [(1, 'tile8'), (2, 'skip4')]
        for r in (taken[0], rows[(2, 'tile4')]):
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


# -- skip path ---------------------------------------------------------------------
# The skip path's gate (x HBM floor) per stage, and the least gain over the
# path the stage took before (model): stages 2 and 3 hold 30 of V2-B's 36
# blocks; stage 4's passes are 1-us floors issue-bound on the per-source-tile
# tests (3.6x, still 2x faster than the gather).
SKIP_GATE = {2: 2.05, 3: 2.0, 4: 4.0}
SKIP_GAIN = 1.7


def test_skip_path_gate():
    """FCMAE V2-B (64 images, 224^2, mask 0.6, bf16; model, not a GPU
    measurement): stages 2-4 take the skip path for all three passes; each
    pass models at most SKIP_GATE x its HBM floor and faster than the paths
    before it (the gather at stages 3/4, the 4x4 tiles at stage 2) by at
    least SKIP_GAIN; the FFMA floor of the skip path counts only the products
    with visible pixels (below the 49-tap floor), its issue time above it."""
    rows = msd.run(stages=(1, 2, 3))
    by = {(r['stage'], r['pass'], r['path']): r for r in rows}
    assert [r['path'] for r in rows] == ['skip4'] * 3 + ['skip2'] * 3 + ['skip4'] * 3
    old = {2: 4, 3: 0, 4: 0}
    for stage, t in old.items():
        base = {r['pass']: r for r in msd.run(stages=(stage - 1, ), path=t)}
        for kind in ('fwd', 'dgrad', 'wgrad'):
            r = next(v for k, v in by.items() if k[:2] == (stage, kind))
            assert r['x_hbm_floor'] <= SKIP_GATE[stage], (stage, kind, r['x_hbm_floor'])
            assert r['model_us'] * SKIP_GAIN <= base[kind]['model_us'], (stage, kind)
            assert r['issue_us'] >= r['ffma_floor_us']
            assert r['ffma_floor_us'] < base[kind]['ffma_floor_us']
            assert r['model_us'] == _model_max(r)


def _skip_sass():
    import re
    from benchmarks import sm90
    if not sm90.have_ptxas():
        pytest.skip('no ptxas/nvdisasm for sm_90 here')
    out = {}
    for kind in ('fwd', 'wgrad'):
        for name, ops in msd.cu_kernel_sass(f'sparse_dwconv_skip_{kind}_kernel').items():
            m = re.search(r'<(c10::BFloat16|c10::Half|float), (\d), (\d)>', name)
            dt = {'c10::BFloat16': 'bfloat16', 'c10::Half': 'float16'}.get(m.group(1), 'float32')
            out[(kind, dt, int(m.group(2)), int(m.group(3)))] = ops
    return out


def test_skip_model_constants_match_the_sass():
    """SKIP_CONST / SKIP_SETUP are the sm_90 SASS of every instantiation the
    host dispatches: the tile loop (first ballot to the weight gradient's first
    shared store / the EXIT) has exactly V FFMAs per product in each copy
    (the full-tile and the per-pixel code, one copy at TS = 1) and its other
    instructions within 10% (weight gradient 12%) of skip_static_instr; the weight gradient's
    unrolled warp sum between 0.8x and 2x wg_epilogue a copy; the forward's
    prologue within 5% of skip_setup; no other (TS, V) instantiation exists."""
    sass = _skip_sass()
    want = {(k, dt, v, t) for k, vec in (('fwd', msd.SKIP_VEC), ('wgrad', msd.SKIP_WGRAD_VEC))
            for dt in ('bfloat16', 'float16', 'float32') for t in msd.SKIP_TILES
            for v in sorted({1, vec[t]})}
    assert set(sass) == want, sorted(set(sass) ^ want)
    for (kind, dt, V, t), ops in sass.items():
        e = 4 if dt == 'float32' else 2
        last = max(i for i, op in enumerate(ops) if op == 'EXIT')
        first = next(i for i, op in enumerate(ops) if op.startswith('VOTE'))
        end = last if kind == 'fwd' else next(i for i, op in enumerate(ops)
                                              if i > first and op.startswith(('STS', 'STG')))
        loop = ops[first:end]
        pred = msd.skip_static_instr(t, V, e, kind)
        ffma = sum(op.startswith('FFMA') for op in loop)
        assert abs(ffma - pred['ffma']) <= 0.02 * pred['ffma'], (kind, dt, V, t, ffma, pred)
        other = len(loop) - ffma
        # (the weight gradient's slice also holds the code between the loop and
        # its first shared store: 12%)
        tol = 0.1 if kind == 'fwd' else 0.12
        assert abs(other - pred['loop']) <= tol * other, (kind, dt, V, t, other, pred)
        if kind == 'fwd':
            setup = msd.skip_setup(dt, V, -(-(t + 6)**2 // 32))
            assert abs(first - setup) <= 0.05 * first, (dt, V, t, first, setup)
        else:
            # each warp runs one of the SKIP_WARPS unrolled copies: 2.7 (5.2 for
            # TS = 1, V = 2) instructions per (tap, channel) in the SASS
            per_copy = (last - end) / pred['epilogue'] * msd.SKIP_CONST['wg_epilogue']
            assert 0.8 * msd.SKIP_CONST['wg_epilogue'] <= per_copy \
                <= 2 * msd.SKIP_CONST['wg_epilogue'], (dt, V, t, per_copy)


def test_skip_constants_match_the_kernel():
    """The model's launch and chunking constants are those of the source
    (SkipGeom in sparse_dwconv_math.h, skip_tiles_per_warp / kSkipWarps in
    sparse_dwconv_skip_cuda.cu), read from it, not assumed."""
    import os
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = os.path.join(root, 'csrc', 'sparse_dwconv')
    with open(os.path.join(src, 'sparse_dwconv_math.h')) as f:
        math_h = f.read()
    with open(os.path.join(src, 'sparse_dwconv_skip_cuda.cu')) as f:
        cu = f.read()
    assert re.search(r'kVec = TS <= 2 \? 2 : 1;', math_h) and \
        msd.SKIP_VEC == {1: 2, 2: 2, 4: 1}
    assert re.search(r'kWgradVec = TS <= 2 \? 2 : 1;', math_h) and \
        msd.SKIP_WGRAD_VEC == {1: 2, 2: 2, 4: 1}
    assert re.search(r'kWgradTiles = 256 / \(TS \* TS\);', math_h)
    assert msd.SKIP_WGRAD_TILES == {1: 256, 2: 64, 4: 16}
    assert re.search(r'kWgradWarps = 4;', math_h) and msd.SKIP_WARPS == 4
    assert re.search(r'constexpr int kSkipWarps = 4;', cu)
    m = re.search(r'return tile == 1 \? (\d+) : tile == 2 \? (\d+) : (\d+);', cu)
    assert m and tuple(map(int, m.groups())) == (msd.SKIP_TPW[1], msd.SKIP_TPW[2],
                                                 msd.SKIP_TPW[4])


def test_skip_counts_on_a_small_table():
    """skip_counts by hand: one 2x2 tile whose halo has its own 4 pixels and
    the 2 pixels of the source tile right of it that reach outputs."""
    halo = torch.full((1, 64), -1, dtype=torch.int32)
    own = [(3, 3), (3, 4), (4, 3), (4, 4)]
    for i, (y, x) in enumerate(own):
        halo[0, y * 8 + x] = i
    halo[0, 3 * 8 + 5] = 4     # source tile (0, +1): pixels (3, 5), (3, 6), (4, 5), (4, 6)
    n = msd.skip_counts(halo, 2)
    assert n['nsrc'] == 25 and n['own'] == 4 and n['words'] == 2
    assert n['full_tiles'] == 1 and n['part_tiles'] == 1
    assert n['px_full'] == 4 and n['px_part'] == 1
    # own pixels reach all 4 outputs; (3, 5) reaches the 2 outputs of row 3 and
    # the 2 of row 4 (dy = 0, -1; dx = 1, 2 are taps)
    assert n['pairs'] == 4 * 4 + 4
