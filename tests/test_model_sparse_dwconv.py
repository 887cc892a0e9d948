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
    """fwd/dgrad take the GPU's path (conv_tile: tile 8 at stage 1), wgrad the
    gather; on the real layout the tile path models below the gather, and the
    model gives every path (compare_paths) at every stage."""
    rows = msd.run(N=4, stages=(0, ), dtype=torch.bfloat16)
    assert [r['path'] for r in rows] == ['tile8', 'tile8', 'gather']
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
