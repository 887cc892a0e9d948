"""benchmarks/perf_model.py on small synthetic rows whose answers are
computed by hand (model, not a GPU measurement)."""
import pytest

from benchmarks import perf_model as pm
from benchmarks.shapes import MASKRCNN_V2B

G = pm.H100
HBM = 3.35e12 * 0.87  # B/s
L2 = 7.0e12
TC = 990e12 * 0.70
FMA = 67e12 * 0.50


def test_constants_are_the_stated_assumptions():
    assert (G['sms'], G['hbm_tbs'], G['tensor_tflops'], G['fp32_tflops']) \
        == (132, 3.35, 990., 67.)
    assert pm.H200['hbm_tbs'] == 4.8 and pm.H200['sms'] == 132
    text = pm.describe(G)
    for s in ('132 SMs', '3.35 TB/s', '990 TFLOP/s', '67 TFLOP/s', 'L2',
              'assumed'):
        assert s in text


@pytest.mark.parametrize('kw,bound,us', [
    (dict(hbm_B=1e9, l2_B=1e9, issue_us=1., calls=1), 'hbm',
     1e9 / HBM * 1e6),
    (dict(hbm_B=1e9, l2_B=7e9, issue_us=1., calls=1), 'l2', 1000.),
    (dict(hbm_B=1e6, l2_B=1e6, issue_us=1000., calls=1), 'issue', 1000.),
    (dict(hbm_B=1e6, tc_flops=TC * 1e-3, calls=1), 'flop', 1000.),
    (dict(hbm_B=1e6, fma_flops=FMA * 1e-3, fma_eff=0.5, calls=1), 'flop',
     1000.),
    (dict(hbm_B=1e3, calls=10), 'launch', 20.),
])
def test_each_term_dominates_once(kw, bound, us):
    t = pm.kernel_time(G, **kw)
    assert t['bound'] == bound
    assert t['time_us'] == pytest.approx(us, rel=1e-9)


CLK = 1.755e9


@pytest.mark.parametrize('programs,pps,warps,cycles_per_instr', [
    # 8 programs of 4 warps per SM on every SM: one full-rate round
    (132 * 8, 8, 4, 8),
    # underfilled (0.5 waves): 4 resident programs = 4 warps per scheduler,
    # still full rate -- the old wave quantisation said 8 (2x)
    (132 * 4, 8, 4, 4),
    # 1 program of 8 warps per SM (2 warps per scheduler: half rate), 3
    # rounds of 8 x I / (4 x 0.5)
    (132 * 3, 1, 8, 12),
    # a tail: 9 programs on the busiest SM, 8 resident: a full round (8 I)
    # then one program alone (1 warp per scheduler: quarter rate, 4 I);
    # the old model ran 2 whole waves (16 I)
    (132 * 9, 8, 4, 12),
    # uneven: 133 programs put 2 on one SM: 2 programs, 2 warps per
    # scheduler, half rate
    (133, 8, 4, 4),
])
def test_issue_time_is_the_busiest_sms_rounds(programs, pps, warps,
                                              cycles_per_instr):
    instr = 1000.
    us = pm.issue_time_us(G, programs=programs, programs_per_sm=pps,
                          num_warps=warps, instr_per_program=instr)
    assert us == pytest.approx(cycles_per_instr * instr / CLK * 1e6)
    assert pm.issue_time_us(G, programs=programs, programs_per_sm=pps,
                            num_warps=warps, instr_per_program=instr,
                            launches=3) == pytest.approx(3 * us)
    assert pm.issue_time_us(G, programs=0, programs_per_sm=pps,
                            num_warps=warps, instr_per_program=instr) == 0.


S4 = MASKRCNN_V2B[3]  # 1024-s4: E = 2*32*32*1024


def _traffic(kernel, kind, provider='fast', phase='fwd', basis='fit',
             H=32, calls=1, hbm=0., l2=0., flops=0.):
    E = S4.E
    return dict(suite='traffic', shape=S4.name, H=H, W=32, basis=basis,
                provider=provider, phase=phase, kind=kind, kernel=kernel,
                calls=calls, hbm_B_per_elem=None if hbm is None else hbm / E,
                l2_B_per_elem=l2 / E, l1_B_per_elem=l2 / E,
                flops_per_elem=flops / E)


def _static(kernel, provider='fast', phase='fwd', **kw):
    r = dict(suite='static', shape=S4.name, provider=provider, phase=phase,
             kernel=kernel, launches=1, programs=1000, num_warps=4,
             sass_instr_per_program=0, spill_store_B=0, spill_load_B=0,
             occupancy=0.5, programs_per_sm=8, waves=None)
    r.update(kw)
    return r


def test_join_prefers_fit_and_sampled_l2():
    rows = [_traffic('_k', 'triton', basis='run', H=8, hbm=1.), # not used
            _traffic('_k', 'triton', basis='fit', hbm=HBM * 1e-3, l2=1.),
            _traffic('_k', 'triton', basis='sampled', hbm=None,
                     l2=L2 * 2e-3),
            _traffic('TOTAL', 'total', hbm=1e12)]  # ignored
    k = pm.traffic_kernels(rows)
    assert list(k) == [(S4.name, 'fast', 'fwd', 'triton', '_k')]
    v = k[(S4.name, 'fast', 'fwd', 'triton', '_k')]
    assert v['hbm_B'] == pytest.approx(HBM * 1e-3)
    assert v['l2_B'] == pytest.approx(L2 * 2e-3)
    out = pm.kernel_rows([_static('_k')], rows, G)
    assert len(out) == 1
    assert out[0]['bound'] == 'l2' and out[0]['time_us'] == \
        pytest.approx(2000.)


def test_spills_and_instructions_from_static_rows():
    # 1056 programs x 4 warps x 128 threads: spill 100+100 B per thread;
    # 8 programs per SM, one full-rate round of 8 x 4 x I / 4 cycles
    instr = 3000e-6 * CLK / 8
    st = _static('_k', spill_store_B=100, spill_load_B=100, programs=1056,
                 sass_instr_per_program=instr)
    tr = [_traffic('_k', 'triton', hbm=1., l2=1.)]
    (r, ) = pm.kernel_rows([st], tr, G)
    assert r['l2_MB'] == pytest.approx((200 * 128 * 1056 + 1) / 1e6)
    assert r['bound'] == 'issue' and r['time_us'] == pytest.approx(3000.)
    assert r['Ginstr'] == pytest.approx(instr * 4 * 1056 / 1e9)


def test_aten_op_classes():
    tr = [_traffic('mm', 'aten', hbm=1e6, flops=TC * 1e-3),
          _traffic('convolution_backward', 'aten', hbm=1e6,
                   flops=FMA * 1e-3),
          _traffic('add', 'aten', hbm=HBM * 1e-3, flops=0.)]
    rows = {r['kernel']: r for r in pm.kernel_rows([], tr, G)}
    for k in ('mm', 'convolution_backward', 'add'):
        assert rows[k]['time_us'] == pytest.approx(1000.), k
    assert rows['mm']['bound'] == 'flop' and rows['add']['bound'] == 'hbm'


def _stage_block_rows(times_by_provider):
    """Synthetic aten kernel rows: one 'add' per (stage, provider, phase)
    whose HBM bytes give the wanted microseconds."""
    rows = []
    for s in MASKRCNN_V2B:
        for prov, (tf, tb) in times_by_provider.items():
            for phase, us in (('fwd', tf), ('bwd', tb)):
                hbm = HBM * us * 1e-6
                rows.append(dict(suite='traffic', shape=s.name, H=s.H,
                                 W=s.W, basis='run', provider=prov,
                                 phase=phase, kind='aten', kernel='add',
                                 calls=1, hbm_B_per_elem=hbm / s.E,
                                 l2_B_per_elem=hbm / s.E,
                                 flops_per_elem=0.))
    return rows


def test_block_backbone_and_gate_ratio():
    tr = _stage_block_rows({'reference': (100., 200.), 'fast': (40., 110.)})
    rows = pm.model([], tr, gpus=('H100', ))
    blocks = [r for r in rows if r['kind'] == 'block']
    assert len(blocks) == 4 * 2 * 3
    b = next(r for r in blocks if r['shape'] == '1024-s1' and
             r['provider'] == 'fast' and r['phase'] == 'fwd+bwd')
    assert b['time_us'] == pytest.approx(150.)
    assert b['ratio_vs_reference'] == pytest.approx(0.5)
    bb = {(r['provider'], r['phase']): r for r in rows
          if r['kind'] == 'backbone'}
    depth = 3 + 3 + 27 + 3
    assert bb[('reference', 'fwd+bwd')]['time_us'] == \
        pytest.approx(300. * depth)
    assert bb[('fast', 'fwd')]['time_us'] == pytest.approx(40. * depth)
    assert pm.backbone_ratio(rows) == pytest.approx(0.5)
    # a backbone needs every stage
    partial = [r for r in tr if r['shape'] != '1024-s4']
    assert pm.backbone_ratio(pm.model([], partial)) is None


def test_markdown_says_model_and_constants():
    tr = _stage_block_rows({'reference': (100., 200.), 'fast': (40., 110.)})
    md = pm.markdown(pm.model([], tr))
    assert 'model, not a GPU measurement' in md
    assert '3.35 TB/s' in md and '4.8 TB/s' in md and 'BACKBONE' in md


def test_gate_accepts_half_and_rejects_more():
    good = pm.model([], _stage_block_rows({'reference': (100., 200.),
                                           'fast': (40., 110.)}))
    ok, ratio, text = pm.gate(good)
    assert ok and ratio == pytest.approx(0.5)
    assert 'model, not a GPU measurement' in text and '3.35 TB/s' in text
    bad = pm.model([], _stage_block_rows({'reference': (100., 200.),
                                          'fast': (40., 111.)}))
    assert not pm.gate(bad)[0]
    assert not pm.gate(pm.model([], []))[0]  # no rows: no pass
