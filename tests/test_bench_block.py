"""The block benchmark's --smoke path (tiny CPU run, Triton interpreter):
rows are written, marked smoke, and the markdown renderer reads them back."""
import json
import os

import pytest

bench = pytest.importorskip('benchmarks.bench_block')
common = pytest.importorskip('benchmarks.common')


@pytest.mark.interpreter
def test_bench_block_smoke(tmp_path, capsys):
    rc = bench.main(['--smoke', '--modes', 'fwd+bwd', '--providers',
                     'reference', 'fast_recompute', 'fast_mlp',
                     '--results-dir',
                     str(tmp_path)])
    assert rc == 0
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith('.json')
    runs = common.load_runs(os.path.join(tmp_path, files[0]))
    assert len(runs) == 1
    meta, rows = runs[0]['meta'], runs[0]['rows']
    assert meta['smoke'] is True and meta['torch'] and 'commit' in meta
    assert 'timestamp' in meta
    assert [r['provider'] for r in rows] == ['reference', 'fast_recompute',
                                             'fast_mlp']
    for r in rows:
        assert r['smoke'] is True and r['median_ms'] > 0
        assert r['saved_B_per_elem'] > 0
    fast, mlp = rows[1], rows[2]
    assert fast['max_err_out'] < 1e-4 and mlp['max_err_out'] < 1e-4
    assert fast['saved_B_per_elem'] <= 8 < rows[0]['saved_B_per_elem']
    assert mlp['saved_B_per_elem'] < rows[0]['saved_B_per_elem']
    table = common.render_runs(runs, bench.COLUMNS)
    assert '| fast_recompute |' in table
    json.dumps(rows)


def test_bench_block_needs_cuda_message(capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert bench.main([]) == 2
    assert 'needs a CUDA GPU' in capsys.readouterr().out
