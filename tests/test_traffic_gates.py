"""Traffic counters (benchmarks/traffic.py) and the depthwise reuse gate.

Gate (issue 8, section 3): each depthwise kernel (``_dwconv*``: forward
dwconv+LN, LN backward, dgrad, wgrad) at every V2-B Mask R-CNN stage reads
each byte of its tile and halo about once at the L2 view: L2-view bytes <=
1.25 x the sum over programs of each program's own unique footprint.

Size: the REAL stage shapes (N=2, 1024^2: C/H=W = 128/256 ... 1024/32), with
only a few programs of each depthwise launch executed in the interpreter
(:func:`benchmarks.traffic.sample_programs`) and the torch ops replaced by
uninitialised outputs (:class:`benchmarks.traffic.NoComputeMode`).  Both
quantities are per-program sums, so a sample measures them exactly for the
programs it runs.  A scaled-down spatial size would not be representative:
it changes how a pixel tile meets the image rows (a 32-pixel tile spans
4 rows of an 8-wide image but 1/8 of a 256-wide row) and how many tiles a
program with a capped grid owns (today's wgrad: 344 programs, so 6 units of
16 rows per program at stage 1, but 1 at 16x16).
About a minute for all four stages on 2 cores.
"""
import collections
import os

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from benchmarks import traffic as T
from benchmarks.shapes import MASKRCNN_V2B

pytestmark = pytest.mark.interpreter


# --------------------------------------------------------------------------
# tiny kernels for the counters
# --------------------------------------------------------------------------
@triton.jit
def _copy_kernel(X, Y, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + o, tl.load(X + o, mask=o < n), mask=o < n)


@triton.jit
def _read_aba_kernel(X, Y, BLOCK: tl.constexpr):
    """Reads line A, line B, line A again (BLOCK fp32 = one 128-B line)."""
    o = tl.arange(0, BLOCK)
    a = tl.load(X + o)
    b = tl.load(X + BLOCK + o)
    a2 = tl.load(X + o)
    tl.store(Y + o, a + b + a2)


def _stats(fn, l1_share=None, sample=None):
    with T.TritonTraffic(sample=sample) as tt:
        fn()
    return tt.stats((lambda L: l1_share) if l1_share else None)


def test_copy_kernel_counts():
    x = torch.randn(1024)
    y = torch.empty(1024)
    s, = _stats(lambda: _copy_kernel[(4, )](x, y, 1024, BLOCK=256))
    assert torch.equal(x, y)
    nbytes = 1024 * 4
    assert (s['l1_B'], s['l2_B'], s['hbm_B'], s['own_footprint_B']) == (
        2 * nbytes, ) * 4
    assert (s['programs'], s['programs_run']) == (4, 4)


def test_masked_lanes_and_sampling():
    x = torch.randn(1000)
    y = torch.empty(1000)
    s, = _stats(lambda: _copy_kernel[(4, )](x, y, 1000, BLOCK=256))
    assert s['l1_B'] == 2 * 1000 * 4  # masked-off lanes are not requested
    assert s['hbm_B'] == 2 * 32 * 128  # 4000 B = 31.25 lines -> 32 each
    s, = _stats(lambda: _copy_kernel[(4, )](x, y, 1000, BLOCK=256),
                sample=lambda name, grid: {1})
    assert (s['programs_run'], s['l1_B'], s['hbm_B']) == (1, 2048, 2048)


def test_line_read_twice_lru():
    x = torch.randn(64)
    y = torch.empty(32)

    def run():
        _read_aba_kernel[(1, )](x, y, BLOCK=32)

    # L1 view: 3 loads + 1 store of one line each
    big, = _stats(run, l1_share=2 * 128)  # A stays cached: 2 fills + store
    assert big['l1_B'] == 4 * 128
    assert big['l2_B'] == 3 * 128
    assert big['hbm_B'] == big['own_footprint_B'] == 3 * 128
    small, = _stats(run, l1_share=128)  # B evicts A: A is fetched twice
    assert small['l2_B'] == 4 * 128


def _naive_lru(accesses, cap):
    """Reference: an OrderedDict LRU with the same instruction semantics."""
    cache = collections.OrderedDict()
    moved = 0
    for a in accesses:
        lines = [int(v) for v in a.lines]
        hits = [ln in cache for ln in lines]
        if a.kind == 'store':
            moved += len(lines)
        else:
            moved += hits.count(False) + (len(lines) if a.kind == 'atomic'
                                          else 0)
        for ln in lines:
            cache[ln] = True
            cache.move_to_end(ln)
        while len(cache) > cap:
            cache.popitem(last=False)
    return moved


@pytest.mark.parametrize('cap', [1, 3, 8, 40])
def test_lru_matches_naive(cap):
    rng = np.random.default_rng(cap)
    accs = []
    for _ in range(300):
        lines = np.unique(rng.integers(0, 60, size=rng.integers(1, 6)))
        kind = rng.choice(['load', 'load', 'store', 'atomic'])
        accs.append(T.Access(str(kind), lines.astype(np.int64), 4))
    assert T.lru_traffic_lines(accs, cap) == _naive_lru(accs, cap)


def test_l1_share_bytes():
    assert T.l1_share_bytes(4) == 64 * 1024
    assert T.l1_share_bytes(2, smem_per_program=32 * 1024) == 96 * 1024


def test_dispatcher_counts_known_ops():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    with T.AtenTraffic() as at:
        c = torch.mm(a, b)
        c.t()  # a view: free
        c.add_(1.)
        d = torch.empty(8, 4)  # an allocation: free
        d.copy_(c)  # reads c, writes d
        e = a + b[:1].expand(8, 4).repeat(1, 4)
    recs = {r['op']: r for r in at.records}
    # one tile: the L2 view of the GEMM is its in + out bytes
    assert recs['mm'] == dict(op='mm', in_B=(128 + 64) * 4, out_B=32 * 4,
                              flops=2 * 8 * 16 * 4, l2_B=(128 + 64 + 32) * 4)
    assert recs['add_']['in_B'] == recs['add_']['out_B'] == 32 * 4
    assert (recs['copy_']['in_B'], recs['copy_']['out_B']) == (128, 128)
    assert 't' not in recs and 'empty' not in recs
    assert recs['repeat']['in_B'] == 4 * 4  # a broadcast input counts once
    assert e.shape == (8, 16)


def test_amp_reference_counts_on_fake_cuda():
    """CUDA's autocast policy without a GPU: bf16 conv/GEMMs, fp32 LayerNorm
    (a cast to fp32 before it) and GRN norm; FLOPs of the real shapes."""
    from convnextv2_fast.models import ConvNeXtV2Block
    N, C, H, W = 2, 32, 6, 5
    blk = ConvNeXtV2Block(C, use_grn=True, layer_scale_init_value=0.,
                          impl='reference')
    recs = T.count_amp_reference(blk, (N, C, H, W), torch.float32)
    fwd = recs['fwd']
    ops = [r['op'] for r in fwd]
    i = ops.index('native_layer_norm')
    assert ops[i - 1] == '_to_copy'  # bf16 conv output cast up to fp32
    E = N * C * H * W
    ln = fwd[i]
    assert ln['in_B'] == E * 4 + 2 * C * 4  # fp32 input + weight + bias
    conv = fwd[ops.index('convolution')]
    assert conv['flops'] == 2 * 49 * E
    assert conv['in_B'] == E * 2 + C * 49 * 2 + C * 2  # bf16 operands
    mm = [r for r in fwd if r['op'] == 'addmm']
    assert [r['flops'] for r in mm] == [2 * N * H * W * C * 4 * C] * 2
    bwd = recs['bwd']
    cb = [r for r in bwd if r['op'] == 'convolution_backward']
    assert len(cb) == 1 and cb[0]['flops'] == 2 * 2 * 49 * E
    assert sum(r['flops'] for r in bwd if r['op'] == 'mm') == \
        4 * 2 * N * H * W * C * 4 * C


# --------------------------------------------------------------------------
# the reuse gate
# --------------------------------------------------------------------------
@triton.jit
def _taps_outer_kernel(X, OUT, M, C, TILES, BLOCK_P: tl.constexpr,
                       BLOCK_C: tl.constexpr, TAPS: tl.constexpr):
    """BAD (like today's wgrad): taps outside, the program's tiles inside:
    every tap re-reads all TILES tiles (reuse distance TILES tiles)."""
    pid = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    for k in tl.static_range(TAPS):
        acc = tl.zeros((BLOCK_C, ), dtype=tl.float32)
        for t in range(TILES):
            p = (pid * TILES + t) * BLOCK_P + tl.arange(0, BLOCK_P) + k
            x = tl.load(X + p[:, None] * C + c[None, :],
                        mask=(p < M)[:, None], other=0.)
            acc += tl.sum(x, axis=0)
        tl.store(OUT + (pid * TAPS + k) * C + c, acc)


@triton.jit
def _taps_inner_kernel(X, OUT, M, C, TILES, BLOCK_P: tl.constexpr,
                       BLOCK_C: tl.constexpr, TAPS: tl.constexpr):
    """GOOD: tiles outside, taps inside (the shifted tile stays in L1)."""
    pid = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    for t in range(TILES):
        for k in tl.static_range(TAPS):
            p = (pid * TILES + t) * BLOCK_P + tl.arange(0, BLOCK_P) + k
            x = tl.load(X + p[:, None] * C + c[None, :],
                        mask=(p < M)[:, None], other=0.)
            tl.store(OUT + ((pid * TILES + t) * TAPS + k) * C + c,
                     tl.sum(x, axis=0))


def _tap_variant_stats(kernel):
    C, BLOCK_P, TILES, TAPS, progs = 128, 32, 8, 7, 2
    M = progs * TILES * BLOCK_P
    x = torch.randn(M + TAPS, C)
    out = torch.empty(progs * TILES * TAPS, C)
    s, = _stats(lambda: kernel[(progs, )](x, out, M, C, TILES,
                                          BLOCK_P=BLOCK_P, BLOCK_C=C,
                                          TAPS=TAPS))
    return s


def test_gate_rejects_tile_reread_per_tap():
    """8 tiles of 16 KB re-read once per tap (128 KB reuse distance against
    a 64 KB L1 share): the gate must fail, naming the kernel."""
    bad = _tap_variant_stats(_taps_outer_kernel)
    msg = T.reuse_gate_failure(bad, where='test')
    assert msg is not None and '_taps_outer_kernel' in msg, bad
    assert bad['l2_B'] > 5 * bad['own_footprint_B']
    good = _tap_variant_stats(_taps_inner_kernel)
    assert T.reuse_gate_failure(good) is None, good
    # same requests at the L1 view: only the reuse distance differs
    assert good['l1_B'] >= bad['l1_B'] - 7 * 128 * 4 * 2


_STAGE_RUNS = {}


def _depthwise_launches(stage):
    """Forward + backward of the fused block at the real stage shape: a few
    programs of each ``_dwconv*`` launch run, no torch compute."""
    if stage.name not in _STAGE_RUNS:
        from benchmarks.bench_traffic import DW_PREFIX, run_fast_block
        rec = run_fast_block(stage, 'fast',
                             sample=T.sample_programs(DW_PREFIX, 3),
                             no_compute=True, count_aten=False)
        _STAGE_RUNS[stage.name] = {
            phase: [L for L in tt.launches if L.name.startswith(DW_PREFIX)]
            for phase, (tt, _) in rec.items()}
    return _STAGE_RUNS[stage.name]


@pytest.fixture(scope='module')
def static_occupancy():
    """Programs per SM of every launch, from the sm_90 compile of the same
    launches (the static suite; its cache is warm after
    tests/test_static_gates.py): the L1 share of each program."""
    from benchmarks import bench_static, bench_traffic, sm90
    if not sm90.have_ptxas():
        pytest.skip('Triton has no ptxas here: no occupancy for the L1 share')
    rows = bench_static.run_suite(False, None, ['fast'])
    assert bench_traffic.use_static_occupancy(rows) > 0
    return bench_traffic


@pytest.mark.slow
@pytest.mark.parametrize('stage', MASKRCNN_V2B, ids=lambda s: s.name)
def test_depthwise_kernels_read_tile_and_halo_once(stage, static_occupancy):
    launches = _depthwise_launches(stage)
    assert launches['fwd'], 'no depthwise launch in the forward'
    names = {L.name for ls in launches.values() for L in ls}
    assert {'_dwconv_ln_fwd_kernel', '_dwconv_ln_bwd_kernel',
            '_dwconv_dgrad_kernel', '_dwconv_wgrad_kernel'} <= names, names
    failures, report = [], []
    for phase, ls in launches.items():
        for L in ls:
            occ = static_occupancy.static_occupancy(L, stage.name)
            assert occ is not None, f'{L.name}: no static occupancy'
            s = L.stats(static_occupancy.default_l1_share(L, stage.name))
            report.append(f"{phase} {s['kernel']}: l2 {s['l2_B']} own "
                          f"{s['own_footprint_B']} ({occ[0]} programs/SM)")
            msg = T.reuse_gate_failure(
                s, where=f'stage {stage.name} (C={stage.C}, '
                f'{stage.H}x{stage.W}, {phase})')
            if msg:
                failures.append(msg)
    print('\n'.join(report))
    assert not failures, 'depthwise reuse gate:\n' + '\n'.join(failures)


def test_traffic_rows_linear_in_height():
    """The suite extrapolates each kernel's bytes from two heights to the
    full height (linear in H at fixed W); check the fit on a third height,
    and that the rows carry the columns the performance model reads."""
    from benchmarks import bench_traffic as B
    from benchmarks.shapes import BlockShape
    # C=16: the weight-cast decision (fused_block.keep_cast) is the same at
    # every height run here, as the fit assumes; W=32: an 8-row band is 256
    # pixels, a whole row tile of the assumed cuBLAS tile (the library
    # GEMMs' L2 view re-reads B once per 256 rows of a sample: a step in H
    # unless the band is whole tiles -- as at the real stage widths)
    full = BlockShape('tiny', 2, 40, 32, 16, 1, torch.float32,
                      torch.bfloat16)
    # heights on the 8-row tile grid of the depthwise kernels (the suite's
    # heights 8 and 16 are; a partial tile row is not linear in H)
    runs = {h: B.fast_rows(full, h, full.W, 'fast') for h in (8, 16, 24)}
    fit = B.fit_rows(runs[8] + runs[24], full.scaled(16, full.W))
    need = {'suite', 'shape', 'H', 'W', 'provider', 'phase', 'kind',
            'kernel', 'calls', 'l1_B', 'l2_B', 'hbm_B', 'own_footprint_B',
            'flops', 'l1_B_per_elem', 'l2_B_per_elem', 'hbm_B_per_elem',
            'flops_per_elem'}
    assert all(need <= set(r) for r in runs[8])
    got = {(r['phase'], r['kernel']): r for r in runs[16]}
    kinds = set()
    for f in fit:
        r = got[(f['phase'], f['kernel'])]
        kinds.add(f['kind'])
        for k in ('l1_B', 'l2_B', 'hbm_B', 'flops'):
            assert f[k] == pytest.approx(r[k], rel=0.02, abs=256), (f, k)
    assert {'triton', 'aten', 'total'} <= kinds
    assert any(r['kernel'].startswith('_dwconv') for r in fit)


def test_stores_write_through_by_sector():
    """A store of half a line moves 64 B to L2 (two 32-B sectors), not the
    whole line; a load miss fills the whole 128-B line."""
    half_store = T.Access('store', np.array([0], np.int64), 64, 2)
    load = T.Access('load', np.array([1], np.int64), 4)
    L = T.Launch('k', programs=[T.Program((0, 0, 0), [half_store, load])])
    st = L.stats(l1_share=T.LINE * 8)
    assert st['l2_B'] == 64 + 128
    assert st['l1_B'] == 68


def test_library_gemm_l2_view_counts_tiled_rereads():
    """A library GEMM's L2 view: A once per column tile, B once per row tile
    of the assumed cuBLAS tile (the peer of a Triton GEMM's recorded view)."""
    M, K, N = 1024, 64, 512
    a, b = torch.randn(M, K), torch.randn(K, N)
    with T.AtenTraffic() as at:
        torch.mm(a, b)
    (r, ) = at.records
    col_tiles = -(-N // T.CUBLAS_TILE_N)
    row_tiles = -(-M // T.CUBLAS_TILE_M)
    assert col_tiles > 1 and row_tiles > 1
    assert r['l2_B'] == (M * K * col_tiles + K * N * row_tiles + M * N) * 4
    assert r['in_B'] + r['out_B'] == (M * K + K * N + M * N) * 4


@pytest.mark.interpreter
def test_triton_recorder_counts_dot_flops():
    """tl.dot work per program (whole tiles, masked rows included): the
    model's tensor-core term for the Triton GEMMs."""
    from convnextv2_fast.ops import mlp_gemm as M
    N, HW, C = 2, 40, 16
    K = 4 * C
    z, w1, b1 = torch.randn(N, HW, C), torch.randn(K, C), torch.randn(K)
    cfg = M.launch_config('pw1', N, HW, C, K)
    with T.TritonTraffic() as tt:
        M.pw1_forward(z, w1, b1)
    (st, ) = tt.stats()
    programs = cfg.grid[0]
    c_steps = -(-C // cfg.BK)
    assert st['flops'] == programs * c_steps * 2 * cfg.BM * cfg.BN * cfg.BK
    assert st['flops'] >= 2 * N * HW * C * K
