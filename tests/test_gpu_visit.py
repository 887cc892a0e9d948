"""The GPU visit's CPU-side machinery: the carried Triton cache (prune,
relocate, hit/miss log), tools/gpu_check.sh's early failures."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tools'))
import warm_triton_cache as wtc  # noqa: E402


def _fake_entry(cache, key, name, where=None):
    d = cache / key
    d.mkdir(parents=True)
    kids = {}
    for suffix in ('.json', '.cubin', '.ptx', '.ttir', '.llir'):
        (d / (name + suffix)).write_text('x')
        kids[name + suffix] = str((where or d) / (name + suffix))
    (d / f'__grp__{name}.json').write_text(json.dumps(dict(child_paths=kids)))
    return d


def test_prune_and_relocate(tmp_path):
    old = tmp_path / 'built'
    _fake_entry(old, 'k1', 'dw', where=tmp_path / 'elsewhere' / 'k1')
    (old / 'stub').mkdir()
    (old / 'stub' / 'launcher.so').write_text('x')  # no group: dropped
    _fake_entry(old, 'stale', 'dw')  # an older kernel source's entry
    assert wtc.relocate(old, keep=wtc.KEEP_SUFFIXES, only={'k1'}) == 1
    assert sorted(os.listdir(old)) == ['k1']
    assert sorted(os.listdir(old / 'k1')) == ['__grp__dw.json', 'dw.cubin',
                                             'dw.json']
    moved = tmp_path / 'carried'
    shutil.move(str(old), str(moved))
    wtc.relocate(moved)
    kids = json.loads((moved / 'k1' / '__grp__dw.json').read_text())[
        'child_paths']
    assert kids == {'dw.json': str(moved / 'k1' / 'dw.json'),
                    'dw.cubin': str(moved / 'k1' / 'dw.cubin')}


def test_report_counts_hits_and_misses(tmp_path, capsys):
    (tmp_path / 'manifest.json').write_text(json.dumps(dict(
        specialisations=[dict(kernel='a', key='h1'),
                         dict(kernel='b', key='h2')])))
    log = tmp_path / 'lookups'
    log.write_text('hit h1 a\nhit h1 a\nmiss h3 c\nmiss h4 d\nhit h4 d\n'
                   'miss h5 triton_poi_fused_add_0\n')  # inductor's
    # h4 missed in one worker, then hit (another worker compiled it): a hit
    assert wtc.report(str(tmp_path), str(log), str(tmp_path / 'r.txt')) == 1
    text = (tmp_path / 'r.txt').read_text()
    assert '2 hits, 1 misses' in text and 'MISS c h3' in text
    assert '1 warmed but not looked up' in text
    assert '1 torch.compile kernels' in text


def test_logging_cache_manager(tmp_path, monkeypatch):
    import triton_cache_log
    monkeypatch.setenv('TRITON_CACHE_DIR', str(tmp_path / 'c'))
    monkeypatch.setenv(triton_cache_log.LOG_ENV, str(tmp_path / 'log'))
    m = triton_cache_log.LoggingCacheManager('key1')
    assert m.get_group('k.json') is None
    p = m.put('{}', 'k.json', binary=False)
    m.put_group('k.json', {'k.json': p})
    assert m.get_group('k.json') == {'k.json': p}
    assert (tmp_path / 'log').read_text() == 'miss key1 k\nhit key1 k\n'


def test_area_table_fits_the_visit():
    for area, spec in wtc.AREAS.items():
        assert sum(spec['budget'].values()) <= 480, area
        for f in spec['tests']:
            assert os.path.exists(os.path.join(ROOT, f)), f
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'tools',
                                                       'warm_triton_cache.py'),
                          'show', '--area', 'block', 'budget'],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith('install=')


@pytest.mark.parametrize('args, rc, needle', [
    ([], 2, '--area block|fcmae|maskrcnn is required'),
    (['--area', 'nope'], 2, 'is required'),
    (['--area', 'block', '--skip-build'], 2, 'is for --dry-run'),
    (['--area', 'block', '--dry-run', '--wheels', '/nonexistent'], 3,
     "no wheels in '/nonexistent'"),
])
def test_gpu_check_stops_early_and_says_why(tmp_path, args, rc, needle):
    res = subprocess.run(['bash', os.path.join(ROOT, 'tools', 'gpu_check.sh'),
                          *args], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OUT=str(tmp_path),
                                  PYTHON=sys.executable))
    assert res.returncode == rc, res.stdout + res.stderr
    assert needle in res.stdout + res.stderr


KERNEL = textwrap.dedent('''
    import sys, triton, triton.language as tl, torch
    sys.path.insert(0, sys.argv[1])
    import warm_triton_cache as wtc

    @triton.jit
    def add_one(X, N, BLOCK: tl.constexpr):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(X + o, tl.load(X + o, mask=o < N) + 1, mask=o < N)

    def fn():
        add_one[(1, )](torch.zeros(64), 64, BLOCK=64)
        add_one[(1, )](torch.zeros(64, dtype=torch.float16), 50, BLOCK=64)

    print('launches', len(wtc.make_capture(sys.argv[2])(fn)))
''')


def test_warmed_cache_hits_after_prune_and_move(tmp_path):
    """A real sm_90 compile through the stand-in driver, pruned, moved to
    another folder (as the carry does), relocated, then looked up again
    through the logging manager: every lookup hits."""
    from benchmarks import sm90
    if not sm90.have_ptxas():
        pytest.skip('Triton has no ptxas here')
    script = tmp_path / 'k.py'
    script.write_text(KERNEL)
    env = dict(os.environ, TRITON_INTERPRET='0',
               PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    built = tmp_path / 'built'
    res = subprocess.run([sys.executable, str(script), os.path.join(ROOT, 'tools'),
                          str(built)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0 and 'launches 2' in res.stdout, res.stderr[-3000:]
    assert wtc.relocate(built, keep=wtc.KEEP_SUFFIXES) == 2
    carried = tmp_path / 'carried'
    shutil.move(str(built), str(carried))
    wtc.relocate(carried)
    log = tmp_path / 'lookups'
    env.update(TRITON_CACHE_MANAGER='triton_cache_log:LoggingCacheManager',
               CONVNEXTV2_FAST_CACHE_LOG=str(log),
               PYTHONPATH=os.path.join(ROOT, 'tools') + os.pathsep +
               env['PYTHONPATH'])
    res = subprocess.run([sys.executable, str(script), os.path.join(ROOT, 'tools'),
                          str(carried)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    hits, misses = wtc.read_lookups(str(log))
    assert len(hits) == 2 and not misses, log.read_text()


def test_every_gpu_test_file_belongs_to_an_area():
    """A GPU test outside every area would never run on a visit (nor be
    warmed): each file with a ``gpu`` mark is in some area's list."""
    import glob
    listed = {f for spec in wtc.AREAS.values() for f in spec['tests']}
    for path in glob.glob(os.path.join(ROOT, 'tests', 'test_*.py')):
        with open(path) as f:
            if '@pytest.mark.' + 'gpu' in f.read():  # (not this file)
                rel = os.path.relpath(path, ROOT)
                assert rel in listed, f'{rel} has GPU tests but no area'


def test_pretend_cuda_tunes_auto_blocks_as_a_gpu(tmp_path, monkeypatch):
    """On the visit an ``impl='auto'`` block times every path on first use
    (launching the Triton-GEMM MLP's kernels too); under pretend_cuda a CPU
    tensor takes the same route, so the warm captures those kernels."""
    import torch
    from convnextv2_fast import autotune
    from convnextv2_fast.impl import fused_status
    from convnextv2_fast.models import ConvNeXtV2Block
    if not fused_status()[0]:
        pytest.skip(fused_status()[1])
    monkeypatch.setenv(autotune.CACHE_DIR_ENV, str(tmp_path))
    for env in (autotune.TUNE_ENV, 'CONVNEXTV2_FAST_IMPL',
                'CONVNEXTV2_FAST_MLP'):
        monkeypatch.delenv(env, raising=False)
    autotune.clear_memory_cache()
    timed = []
    monkeypatch.setattr(autotune, '_time_path',
                        lambda b, x, path, tr: timed.append(path) or 1.0)
    block = ConvNeXtV2Block(8, use_grn=True, impl='auto')
    x = torch.randn(2, 8, 5, 7)
    try:
        assert block._use_fused(x) is False  # a CPU tensor: the reference
        assert timed == []
        with wtc.pretend_cuda():
            assert block._use_fused(x) == 'cublas'  # a tie: the first path
        assert sorted(timed) == ['reference', 'triton', 'triton_mlp']
    finally:
        autotune.clear_memory_cache()
