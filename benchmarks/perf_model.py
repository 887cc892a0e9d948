"""A bandwidth / issue / FLOP model of the block and the V2-B backbone on
H100 SXM and H200 -- model, not a GPU measurement.

A pure function of the rows of two other suites (consumed as data, by field
name) and the hardware constants below:

* ``static`` rows (``benchmarks/bench_static.py``): per Triton kernel as an
  H100 would launch it: ``shape, provider, phase, kernel, launches,
  programs, num_warps, regs, spill_store_B, spill_load_B, occupancy,
  programs_per_sm, waves, sass_instr_per_program, tensor_core``.
* ``traffic`` rows (``benchmarks/bench_traffic.py``): bytes and FLOPs per
  kernel / aten op of one block: ``shape, provider, phase, kind ('triton' |
  'aten'), kernel, calls, basis ('run' | 'fit' | 'sampled'),
  l1/l2/hbm_B_per_elem, flops_per_elem`` (plus ``kernel='TOTAL'`` rows,
  ignored here: the model sums its own).

Per kernel (one row per (shape, provider, phase, kind, kernel)):

    time = max(hbm_B / (HBM bandwidth x achievable fraction),
               l2_B / L2 bandwidth,
               issue: the busiest SM's rounds of resident programs (below),
               FLOPs / peak x efficiency,
               calls x minimum kernel time)

The issue term of one launch (:func:`issue_time_us`) is counted per SM: the
busiest SM runs ``ceil(programs / SMs)`` programs, ``programs_per_sm`` at a
time (the compiler's occupancy); a round of ``k`` resident programs issues
``k x warps x instructions`` warp-instructions at 4 per clock, derated
linearly below 4 resident warps per scheduler (``k x warps / 4``).  So an
underfilled grid (fewer programs than resident slots) runs at the derate of
the warps it really has, and a short last round at its own, instead of a
whole wave at full occupancy (the earlier wave quantisation counted both
against an underfilled grid: a 0.48-wave launch came out ~2x too slow).

Triton kernels: bytes from the traffic rows (the L2 view of a depthwise
kernel from its ``sampled`` full-shape row when there is one: it is the one
that sees a tile re-read per tap at the real size; local-memory spill traffic
from the static row added to the L2 view, each spilled byte stored and loaded
once per thread: a lower bound), warp-instructions = ``sass_instr_per_program
x num_warps x programs x launches`` (static rows; the ``Ginstr`` column,
the issue term per launch as above), and a FLOP term for the
tensor-core work of their ``tl.dot`` calls (counted by the traffic recorder,
whole tiles) at the same ``gemm_eff`` as cuBLAS -- an assumption that a
Triton wgmma GEMM reaches cuBLAS's efficiency, to be checked on a GPU; their
other math is CUDA-core instructions, already in the issue term.  aten ops (the
reference block, and the torch GEMMs/reductions inside the fused host
functions): HBM bytes = the op's inputs + outputs; the L2 view of a GEMM =
its tiled re-reads at an assumed cuBLAS tile (``traffic.gemm_l2_bytes``: the
like-for-like peer of the Triton GEMMs' recorded L2 view), FLOPs by op
class: GEMMs on tensor cores at ``gemm_eff`` of the dense bf16 peak
(cuBLAS), convolutions (the 7x7 depthwise conv and its backward, cuDNN) on
CUDA cores at ``conv_eff`` of the fp32 FMA peak, everything else
memory-bound (elementwise / reductions) at the achievable HBM bandwidth.

Per block: the sum over its kernels (``kernel='BLOCK'``; phases ``fwd``,
``bwd`` and ``fwd+bwd``).  Per backbone: the four V2-B stage blocks weighted
by their depths (3, 3, 27, 3; ``kernel='BACKBONE'``; stem, downsamples and
output norms not included), with ``ratio_vs_reference``.
"""
import math
from collections import defaultdict
from typing import Dict, Iterable, List, Optional

from benchmarks import shapes as _shapes

MODEL_NOTE = 'model, not a GPU measurement'

# Every constant is an ASSUMPTION of the model (published specs where they
# exist, the rest stated as guesses); printed by describe().
H100 = dict(
    name='H100 SXM',
    sms=132,
    clock_ghz=1.755,  # sustained SM clock under load (boost max 1.98)
    hbm_tbs=3.35,  # nominal HBM3 bandwidth
    hbm_achievable=0.87,  # fraction a streaming kernel reaches (~2.9 TB/s)
    l2_tbs=7.0,  # L2 -> SM bandwidth (assumed; no official figure)
    issue_per_sm_clk=4,  # warp-instructions per SM per clock (4 schedulers)
    warps_to_saturate=4,  # resident warps per scheduler that hide latency
    tensor_tflops=990.,  # dense bf16 tensor-core peak
    fp32_tflops=67.,  # fp32 FMA peak (CUDA cores)
    gemm_eff=0.70,  # cuBLAS GEMMs: fraction of tensor peak
    conv_eff=0.50,  # cuDNN depthwise 7x7 (fwd, dgrad, wgrad): of fp32 peak
    min_kernel_us=2.0,  # shortest kernel (launch + ramp), per call
    max_warps_per_sm=64,
)
H200 = dict(H100, name='H200 SXM', hbm_tbs=4.8)
GPUS = {'H100': H100, 'H200': H200}

GEMM_OPS = ('mm', 'addmm', '_addmm_activation', 'bmm', 'baddbmm', 'linear',
            'matmul')
CONV_OPS = ('convolution', '_convolution', 'cudnn_convolution',
            'convolution_overrideable', 'convolution_backward')
TERMS = ('t_hbm_us', 't_l2_us', 't_issue_us', 't_flop_us', 't_launch_us')
COLUMNS = ['gpu', 'shape', 'provider', 'phase', 'kind', 'kernel', 'calls',
           'hbm_MB', 'l2_MB', 'GFLOP', 'Ginstr', 't_hbm_us', 't_l2_us',
           't_issue_us', 't_flop_us', 'time_us', 'bound',
           'ratio_vs_reference']
SUMMARY_COLUMNS = ['gpu', 'shape', 'provider', 'phase', 'kernel', 'time_us',
                   'ratio_vs_reference', 'bound_share']


def shape_table() -> Dict[str, _shapes.BlockShape]:
    """Full-size shapes by name (Mask R-CNN 1024 stages, FCMAE stages)."""
    out = {s.name: s for s in _shapes.MASKRCNN_V2B}
    for s in _shapes.fcmae_v2b_stages():
        out.setdefault(s.name, s)
    return out


def describe(gpu: dict) -> str:
    """The constants, one per line (markdown list)."""
    g = gpu
    lines = [
        f"- {g['name']}: {g['sms']} SMs at {g['clock_ghz']} GHz (assumed "
        'sustained clock)',
        f"- HBM {g['hbm_tbs']} TB/s nominal x {g['hbm_achievable']} achievable"
        f" = {g['hbm_tbs'] * g['hbm_achievable']:.2f} TB/s (assumed fraction)",
        f"- L2 bandwidth {g['l2_tbs']} TB/s (assumed)",
        f"- issue: {g['issue_per_sm_clk']} warp-instructions / SM / clock, "
        f"full rate at >= {g['warps_to_saturate']} resident warps per "
        "scheduler, linear below (assumed derate); per SM: the busiest SM's "
        'rounds of resident programs',
        f"- tensor cores {g['tensor_tflops']:.0f} TFLOP/s dense bf16; GEMMs "
        f"(cuBLAS) at {g['gemm_eff']:.0%} of it (assumed)",
        f"- fp32 FMA {g['fp32_tflops']:.0f} TFLOP/s; depthwise conv ops "
        f"(cuDNN) at {g['conv_eff']:.0%} of it (assumed)",
        '- elementwise / reduction aten ops: memory-bound at the achievable '
        'HBM bandwidth; views free',
        f"- every kernel call at least {g['min_kernel_us']} us (assumed)",
    ]
    return '\n'.join(lines)


# --------------------------------------------------------------------------
# per-kernel model
# --------------------------------------------------------------------------
def issue_time_us(gpu: dict, *, programs: int, programs_per_sm: int,
                  num_warps: int, instr_per_program: float,
                  launches: int = 1) -> float:
    """Issue time (us) of ``launches`` launches of one kernel config: the
    busiest SM's rounds of resident programs (see the module docstring).
    ``instr_per_program``: warp-instructions per warp of one program."""
    g = gpu
    if not programs or not instr_per_program:
        return 0.
    pps = max(int(programs_per_sm or 1), 1)  # 0 = does not fit (gated)
    full, rem = divmod(math.ceil(programs / g['sms']), pps)

    def cycles(k):  # one round of k resident programs
        per_sched = k * num_warps / g['issue_per_sm_clk']
        derate = max(min(1., per_sched / g['warps_to_saturate']), 1e-3)
        return k * num_warps * instr_per_program / (
            g['issue_per_sm_clk'] * derate)

    total = full * cycles(pps) + (cycles(rem) if rem else 0.)
    return (launches or 1) * total / (g['clock_ghz'] * 1e3)


def kernel_time(gpu: dict, *, hbm_B=0., l2_B=0., issue_us=0., tc_flops=0.,
                fma_flops=0., fma_eff=1., calls=1) -> dict:
    """The five terms (us) of one kernel and their max (``issue_us`` from
    :func:`issue_time_us`)."""
    g = gpu
    hbm = (hbm_B or 0.) / (g['hbm_tbs'] * 1e12 * g['hbm_achievable']) * 1e6
    l2 = (l2_B or 0.) / (g['l2_tbs'] * 1e12) * 1e6
    flop = 0.
    if tc_flops:
        flop += tc_flops / (g['tensor_tflops'] * 1e12 * g['gemm_eff']) * 1e6
    if fma_flops:
        flop += fma_flops / (g['fp32_tflops'] * 1e12 * fma_eff) * 1e6
    launch = (calls or 0) * g['min_kernel_us']
    terms = dict(t_hbm_us=hbm, t_l2_us=l2, t_issue_us=issue_us or 0.,
                 t_flop_us=flop, t_launch_us=launch)
    bound = max(terms, key=terms.get)
    return dict(terms, time_us=terms[bound],
                bound=bound[2:-3])


def _aten_class(kernel: str) -> str:
    if kernel in GEMM_OPS:
        return 'gemm'
    if kernel in CONV_OPS:
        return 'conv'
    return 'memory'


# --------------------------------------------------------------------------
# joining the suites' rows
# --------------------------------------------------------------------------
_BASIS_RANK = {'fit': 0, 'run': 1}


def traffic_kernels(traffic_rows: Iterable[dict],
                    table: Optional[dict] = None) -> Dict[tuple, dict]:
    """{(shape, provider, phase, kind, kernel): dict(calls, hbm_B, l2_B,
    flops)} at the FULL shape: per-element figures x the full shape's E,
    from the ``fit`` row (full height) or else the largest ``run``; the L2
    view of a kernel with a ``sampled`` full-shape row comes from it."""
    table = table or shape_table()
    best, sampled = {}, {}
    for r in traffic_rows:
        if r.get('suite') != 'traffic' or r.get('kernel') == 'TOTAL' or \
                r.get('phase') not in ('fwd', 'bwd') or \
                r.get('kind') not in ('triton', 'aten'):
            continue
        key = (r['shape'], r['provider'], r['phase'], r['kind'], r['kernel'])
        basis = r.get('basis', 'run')
        if basis == 'sampled':
            sampled[key] = r
            continue
        rank = (_BASIS_RANK.get(basis, 2), -(r.get('H') or 0))
        if key not in best or rank < best[key][0]:
            best[key] = (rank, r)
    out = {}
    for key, (_, r) in best.items():
        E = table[key[0]].E

        def full(name, row=r):
            v = row.get(name + '_per_elem')
            return None if v is None else v * E

        k = dict(calls=r.get('calls') or 0, hbm_B=full('hbm_B') or 0.,
                 l2_B=full('l2_B') or 0., flops=full('flops') or 0.,
                 l2_from='traffic ' + r.get('basis', 'run'))
        s = sampled.get(key)
        if s is not None and full('l2_B', s) is not None:
            k['l2_B'] = full('l2_B', s)
            k['l2_from'] = 'traffic sampled (full shape)'
        out[key] = k
    return out


def static_kernels(static_rows: Iterable[dict], gpu: dict
                   ) -> Dict[tuple, dict]:
    """{(shape, provider, phase, kernel): dict(warp_instr, issue_us,
    spill_B, occupancy, launches)} summed over a kernel's configs (the
    worst occupancy kept for the report)."""
    out = {}
    for r in static_rows:
        if r.get('suite') != 'static' or r.get('phase') not in ('fwd', 'bwd'):
            continue
        key = (r['shape'], r['provider'], r['phase'], r['kernel'])
        launches = r.get('launches') or 1
        programs = r.get('programs') or 0
        warps = r.get('num_warps') or 0
        per_prog = r.get('sass_instr_per_program') or 0
        threads = warps * 32
        spill = ((r.get('spill_store_B') or 0) + (r.get('spill_load_B') or 0)
                 ) * threads * programs * launches
        k = out.setdefault(key, dict(warp_instr=0., issue_us=0., spill_B=0.,
                                     launches=0,
                                     occupancy=r.get('occupancy')))
        k['warp_instr'] += per_prog * warps * programs * launches
        k['issue_us'] += issue_time_us(
            gpu, programs=programs, programs_per_sm=r.get('programs_per_sm'),
            num_warps=warps, instr_per_program=per_prog, launches=launches)
        k['spill_B'] += spill
        k['launches'] += launches
        if r.get('occupancy') is not None and (
                k['occupancy'] is None or r['occupancy'] < k['occupancy']):
            k['occupancy'] = r['occupancy']
    return out


def kernel_rows(static_rows: Iterable[dict], traffic_rows: Iterable[dict],
                gpu: dict, table: Optional[dict] = None) -> List[dict]:
    """One model row per (shape, provider, phase, kind, kernel)."""
    tr = traffic_kernels(traffic_rows, table)
    st = static_kernels(static_rows, gpu)
    keys = list(tr)
    for (shape, prov, phase, kernel) in st:  # Triton kernels no traffic saw
        k = (shape, prov, phase, 'triton', kernel)
        if k not in tr and any(t[:3] == (shape, prov, phase) for t in tr):
            keys.append(k)
    rows = []
    for key in keys:
        shape, prov, phase, kind, kernel = key
        t = tr.get(key)
        row = dict(suite='model', bench='model', gpu=gpu['name'], shape=shape,
                   provider=prov, phase=phase, kind=kind, kernel=kernel,
                   note=MODEL_NOTE, missing=[])
        if t is None:
            row['missing'].append('traffic')
            t = dict(calls=0, hbm_B=0., l2_B=0., flops=0.)
        row['calls'] = t['calls']
        if kind == 'triton':
            s = st.get((shape, prov, phase, kernel))
            if s is None:
                row['missing'].append('static')
                s = dict(warp_instr=0., issue_us=0., spill_B=0., launches=0,
                         occupancy=None)
            if not row['calls']:
                row['calls'] = s['launches']
            l2 = t['l2_B'] + s['spill_B']
            terms = kernel_time(gpu, hbm_B=t['hbm_B'], l2_B=l2,
                                issue_us=s['issue_us'],
                                tc_flops=t['flops'], calls=row['calls'])
            row.update(Ginstr=s['warp_instr'] / 1e9, spill_MB=s['spill_B'] /
                       1e6, occupancy=s['occupancy'])
        else:
            cls = _aten_class(kernel)
            # the L2 term of a library op: its modelled tiled re-reads for
            # a GEMM (traffic.gemm_l2_bytes), else its bytes (below the HBM
            # term, so it never binds)
            l2 = t['l2_B'] or t['hbm_B']
            terms = kernel_time(
                gpu, hbm_B=t['hbm_B'], l2_B=l2,
                tc_flops=t['flops'] if cls == 'gemm' else 0.,
                fma_flops=t['flops'] if cls == 'conv' else 0.,
                fma_eff=gpu['conv_eff'], calls=row['calls'])
            row['op_class'] = cls
        row.update(hbm_MB=t['hbm_B'] / 1e6, l2_MB=l2 / 1e6,
                   GFLOP=t['flops'] / 1e9, **terms)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------
# sums: block, backbone, the gate
# --------------------------------------------------------------------------
def _sum(rows, **fields):
    s = dict(suite='model', bench='model', note=MODEL_NOTE, **fields)
    s['time_us'] = sum(r['time_us'] for r in rows)
    s['calls'] = sum(r.get('calls') or 0 for r in rows)
    for k in ('hbm_MB', 'l2_MB', 'GFLOP', 'Ginstr'):
        s[k] = sum(r.get(k) or 0. for r in rows)
    share = defaultdict(float)
    for r in rows:
        share[r['bound']] += r['time_us']
    s['bound_share'] = ', '.join(
        f'{b} {v / s["time_us"]:.0%}' for b, v in sorted(
            share.items(), key=lambda kv: -kv[1])) if s['time_us'] else ''
    s['bound'] = max(share, key=share.get) if share else None
    return s


def block_rows(krows: List[dict]) -> List[dict]:
    """Per (gpu, shape, provider): phases fwd, bwd, fwd+bwd."""
    groups = defaultdict(list)
    for r in krows:
        groups[(r['gpu'], r['shape'], r['provider'], r['phase'])].append(r)
    out = []
    for (gpu, shape, prov) in sorted({k[:3] for k in groups}):
        phases = []
        for phase in ('fwd', 'bwd'):
            rows = groups.get((gpu, shape, prov, phase))
            if rows:
                phases.append(_sum(rows, gpu=gpu, shape=shape, provider=prov,
                                   phase=phase, kind='block', kernel='BLOCK'))
        out += phases
        if len(phases) == 2:
            both = _sum([r for p in ('fwd', 'bwd')
                         for r in groups[(gpu, shape, prov, p)]], gpu=gpu,
                        shape=shape, provider=prov, phase='fwd+bwd',
                        kind='block', kernel='BLOCK')
            out.append(both)
    return out


def backbone_rows(brows: List[dict], stages=None) -> List[dict]:
    """Depth-weighted sum of the stage blocks per (gpu, provider, phase);
    only where every stage has a block row."""
    stages = stages or _shapes.MASKRCNN_V2B
    by = {(r['gpu'], r['shape'], r['provider'], r['phase']): r for r in brows}
    out = []
    for (gpu, prov, phase) in sorted({(k[0], k[2], k[3]) for k in by}):
        parts = [(s, by.get((gpu, s.name, prov, phase))) for s in stages]
        if any(p is None for _, p in parts):
            continue
        row = dict(suite='model', bench='model', note=MODEL_NOTE, gpu=gpu,
                   shape='+'.join(s.name for s in stages), provider=prov,
                   phase=phase, kind='backbone', kernel='BACKBONE',
                   depths=[s.depth for s in stages])
        row['time_us'] = sum(s.depth * p['time_us'] for s, p in parts)
        for k in ('hbm_MB', 'l2_MB', 'GFLOP', 'Ginstr', 'calls'):
            row[k] = sum(s.depth * (p.get(k) or 0) for s, p in parts)
        out.append(row)
    return out


def add_ratios(rows: List[dict]) -> None:
    """``ratio_vs_reference`` = time / the reference's time (same gpu,
    shape, phase, kernel level)."""
    ref = {(r['gpu'], r['shape'], r['phase'], r['kind'], r['kernel']):
           r['time_us'] for r in rows if r['provider'] == 'reference'
           and r['kind'] in ('block', 'backbone')}
    for r in rows:
        base = ref.get((r['gpu'], r['shape'], r['phase'], r['kind'],
                        r['kernel']))
        if base:
            r['ratio_vs_reference'] = r['time_us'] / base


def model(static_rows, traffic_rows, gpus=('H100', 'H200'),
          stages=None) -> List[dict]:
    """All model rows: kernels, blocks, backbone, for each GPU."""
    static_rows, traffic_rows = list(static_rows), list(traffic_rows)
    out = []
    for name in gpus:
        k = kernel_rows(static_rows, traffic_rows, GPUS[name])
        b = block_rows(k)
        out += k + b + backbone_rows(b, stages)
    add_ratios(out)
    return out


def backbone_ratio(rows: List[dict], gpu='H100', provider='fast',
                   phase='fwd+bwd') -> Optional[float]:
    """Modelled backbone time of ``provider`` / the reference's."""
    for r in rows:
        if r['kind'] == 'backbone' and r['gpu'] == GPUS[gpu]['name'] and \
                r['provider'] == provider and r['phase'] == phase:
            return r.get('ratio_vs_reference')
    return None


GATE_RATIO = 0.5  # issue 8 section 3: fast <= 0.5 x reference


def gate(rows: List[dict], gpu='H100', provider='fast') -> tuple:
    """(ok, ratio, text): the modelled V2-B backbone forward+backward of
    ``provider`` on ``gpu`` is at most :data:`GATE_RATIO` of the modelled
    eager reference; ``text`` states the numbers and the assumptions."""
    ratio = backbone_ratio(rows, gpu, provider, 'fwd+bwd')
    times = {r['provider']: r['time_us'] for r in rows
             if r['kind'] == 'backbone' and r['gpu'] == GPUS[gpu]['name']
             and r['phase'] == 'fwd+bwd'}
    text = (f'{MODEL_NOTE}: V2-B backbone blocks fwd+bwd on {gpu}: '
            + ', '.join(f'{p} {t / 1e3:.2f} ms' for p, t in sorted(
                times.items()))
            + (f'; {provider}/reference = {ratio:.3f} (gate <= {GATE_RATIO})'
               if ratio is not None else '; no ratio (rows missing)')
            + '\nassumptions:\n' + describe(GPUS[gpu]))
    return (ratio is not None and ratio <= GATE_RATIO), ratio, text


def markdown(rows: List[dict]) -> str:
    """Backbone and per-block tables, the constants beside them."""
    from benchmarks.common import markdown_table
    gpus = [g for g in GPUS.values()
            if any(r['gpu'] == g['name'] for r in rows)]
    parts = [f'#### {MODEL_NOTE}', '',
             'Modelled times from the static (sm_90 compile) and traffic '
             '(interpreter / dispatcher byte counts) suites; no GPU ran.  '
             'Assumptions:', '']
    for g in gpus:
        parts += [describe(g), '']
    summary = [r for r in rows if r['kind'] in ('backbone', 'block')]
    summary.sort(key=lambda r: (r['gpu'], r['kind'] != 'backbone',
                                r['shape'], r['phase'], r['provider']))
    parts += [f'Backbone (V2-B blocks, depths 3/3/27/3) and blocks -- '
              f'{MODEL_NOTE}:', '', markdown_table(summary, SUMMARY_COLUMNS),
              '']
    return '\n'.join(parts)
