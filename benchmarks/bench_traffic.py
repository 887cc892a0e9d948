"""Suite ``traffic``: bytes per block element of one ConvNeXt-V2-B block at
three levels -- model, not a GPU measurement (runs on a CPU, no GPU).

For each V2-B Mask R-CNN stage (:data:`benchmarks.shapes.MASKRCNN_V2B`:
N=2, C=128..1024, stream fp32 at stage 1 / bf16 after, compute bf16):

* ``reference``: ``ConvNeXtV2Block(impl='reference')`` (op-for-op
  mmpretrain) under CUDA bf16 autocast, counted at the dispatcher on fake
  tensors at the REAL shape (:func:`benchmarks.traffic.count_amp_reference`);
  channels_last input (what the fused path and ``bench_block`` use).
* ``fast`` / ``fast_recompute``: ``fused_block_forward`` /
  ``fused_block_backward`` (save / recompute) driven in the Triton
  interpreter at the real C and dtypes (bf16 tensors: the interpreter's bf16
  arithmetic is wrong, but only addresses are used) with the spatial size
  scaled down (``BlockShape.scaled``); the host functions pick the tile sizes
  they pick on a GPU (``TRITON_INTERPRET`` reads 0 while they choose, 1 while
  the kernels run).  Triton kernels are counted per launch by
  :class:`benchmarks.traffic.TritonTraffic`, torch ops in the host functions
  by :class:`benchmarks.traffic.AtenTraffic`.

Sizes.  The runs keep the stage's real width W and use heights 8 and 16
(``basis='run'``): with the real W a pixel tile meets the image rows as at
full size (a 32-pixel tile is 1/8 of a 256-pixel row; in an 8x8 image it would
span 4 rows and reuse its own halo).  Bytes are then linear in H (interior
rows add the same, the three border rows at each edge and the per-call weight
traffic a constant), so each kernel is extrapolated to the full height
(``basis='fit'``, ``H, W`` = full; a third height reproduces the fit, see
``tests/test_traffic_gates.py``).  The per-element figures of the two heights
show the trend: they fall with H only through the border rows and the
weight traffic (``_to_copy`` of weights, the W2 fold), which do not grow
with the image.

What the fit cannot see: a grid capped in programs (the wgrad's one round
of programs)
gives each program more tiles at full size, so its per-program reuse
distance grows.  The depthwise kernels are therefore also run at the FULL
shape with 4 random programs each (``basis='sampled'``; l1/l2/own figures
extrapolated x programs / programs_run, ``hbm_B`` not measured, torch ops
replaced by uninitialised outputs).

Nor a split whose count follows the size: the Triton MLP's dW2 GEMM splits
the pixels over S programs per (C, K) tile with fp32 (S, C, K) partials
(:func:`convnextv2_fast.ops.mlp_gemm.launch_config`).  At stage 1 the run
heights hit the 64-pixel floor of a split, so S doubles with H (32, 64) and
the fit extrapolates the partials' bytes (the kernel's stores, the torch sum
that reads them) as ~16 bytes per block element where the full shape (S =
64 of 1024 pixels) moves ~1: an overcount of ~30 B/element in
``fast_mlp``'s stage-1 backward.  Stages 2-4 keep the full shape's S (16,
4 of 5, 2) at both heights.

Rows (consumed as data by the performance model): ``suite, shape (full-size
name), H, W (size run, or full for fit/sampled), basis, provider, phase
(fwd | bwd | fwd+bwd for totals), kind (triton | aten | total), kernel,
calls, l1_B, l2_B, hbm_B, own_footprint_B, flops`` and the same per block
element of the row's size (E = N*H*W*C), plus ``kernel='TOTAL'`` rows per
(shape, size, basis, provider, phase).  aten rows carry the op's in+out bytes
(library kernels are opaque) as their HBM view and, except for GEMMs, as
their L1/L2 views; a GEMM's L1/L2 view is its tiled re-reads
(:func:`benchmarks.traffic.gemm_l2_bytes`, an assumed cuBLAS tile, so the
Triton GEMMs' recorded L2 view has a like-for-like peer); Triton rows count the
tensor-core FLOPs of their ``tl.dot`` calls (2*M*N*K per call, whole tiles)
and nothing else (CUDA-core math is in the static suite's issue count);
``l1_share_B`` is the simulated per-program L1.

Usage: ``python -m benchmarks --suites traffic`` or
``python benchmarks/bench_traffic.py [--smoke] [--out PATH]``.
"""
import functools
import os
import sys
from contextlib import contextmanager

_HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(_HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import traffic as T  # noqa: E402
from benchmarks.shapes import (FAST_PROVIDERS, MASKRCNN_V2B,  # noqa: E402
                               BlockShape)

# fast_mlp: the fused block with the Triton-GEMM MLP (save mode)
PROVIDERS = ('reference', 'fast', 'fast_recompute', 'fast_mlp')
# run sizes (H, W); W None = the stage's real width (tiles then meet rows
# as at full size; only the 3 border rows at each edge differ, and the fit
# to the full height removes them)
SIZES = ((8, None), (16, None))
SMOKE_SIZES = ((8, 8), )
DW_PREFIX = '_dwconv'
MODEL_NOTE = 'model, not a GPU measurement'
COLUMNS = ['shape', 'H', 'W', 'basis', 'provider', 'phase', 'kind', 'kernel',
           'calls',
           'l1_B_per_elem', 'l2_B_per_elem', 'hbm_B_per_elem',
           'own_footprint_B', 'flops_per_elem', 'programs', 'programs_run']
SUMMARY_COLUMNS = ['shape', 'H', 'W', 'basis', 'provider', 'phase',
                   'l1_B_per_elem',
                   'l2_B_per_elem', 'hbm_B_per_elem', 'flops_per_elem']


# --------------------------------------------------------------------------
# driving the fused block
# --------------------------------------------------------------------------
@contextmanager
def gpu_tile_configs():
    """The host functions choose tiles as on a GPU (the package's one switch,
    ``CONVNEXTV2_FAST_GPU_CONFIG=1``, read by every op's config choice);
    kernels still run interpreted."""
    old = os.environ.get('CONVNEXTV2_FAST_GPU_CONFIG')
    os.environ['CONVNEXTV2_FAST_GPU_CONFIG'] = '1'
    try:
        yield
    finally:
        if old is None:
            os.environ.pop('CONVNEXTV2_FAST_GPU_CONFIG', None)
        else:
            os.environ['CONVNEXTV2_FAST_GPU_CONFIG'] = old


def kernels_interpreted() -> bool:
    """Whether the package's Triton kernels were created in interpreter mode
    (TRITON_INTERPRET=1 when they were imported)."""
    from triton.runtime.interpreter import InterpretedFunction
    from convnextv2_fast.ops import dwconv_ln
    return isinstance(dwconv_ln._dwconv_ln_fwd_kernel, InterpretedFunction)


def block_args(shape: BlockShape, seed: int = 0):
    """Random (N, H, W, C) input and block parameters in the dtypes the
    fused path sees under autocast (parameters fp32, stream dtype x)."""
    N, H, W, C = shape.N, shape.H, shape.W, shape.C
    K = 4 * C
    g = torch.Generator().manual_seed(seed)

    def rnd(*s, dtype=torch.float32, scale=0.1):
        return (torch.randn(*s, generator=g) * scale).to(dtype)

    x = rnd(N, H, W, C, dtype=shape.stream_dtype, scale=1.)
    params = (rnd(C, 1, 7, 7), rnd(C), 1. + rnd(C), rnd(C), rnd(K, C),
              rnd(K), rnd(K), rnd(K), rnd(C, K), rnd(C),
              torch.ones(N, C))
    return x, params


def run_fast_block(shape: BlockShape, provider: str, sample=None,
                   no_compute: bool = False, count_aten: bool = True,
                   memo=None):
    """Drive ``fused_block_forward`` then ``fused_block_backward`` at
    ``shape``; returns ``{phase: (TritonTraffic, AtenTraffic or None)}``.

    ``provider``: a key of :data:`benchmarks.shapes.FAST_PROVIDERS`;
    ``sample``: a :class:`~benchmarks.traffic.TritonTraffic` program sample;
    ``no_compute``: torch ops produce uninitialised outputs
    (:class:`~benchmarks.traffic.NoComputeMode`), for real shapes where only
    the Triton addresses matter; ``memo``: see
    :class:`~benchmarks.traffic.TritonTraffic` (share one between the two
    providers of a shape: their launches repeat)."""
    from convnextv2_fast.ops.fused_block import (backward_inputs,
                                                 fused_block_backward,
                                                 fused_block_forward)
    x, params = block_args(shape)
    cd = shape.compute_dtype
    cfg = FAST_PROVIDERS[provider]
    save, mlp = cfg['save'], cfg['mlp']
    out = {}

    @contextmanager
    def counting():
        tt = T.TritonTraffic(sample=sample, memo=memo)
        at = T.AtenTraffic() if count_aten else None
        nc = T.NoComputeMode() if no_compute else None
        with gpu_tile_configs(), tt:
            if nc is not None:
                nc.__enter__()
            if at is not None:
                at.__enter__()
            try:
                yield tt, at
            finally:
                if at is not None:
                    at.__exit__(None, None, None)
                if nc is not None:
                    nc.__exit__(None, None, None)

    with torch.no_grad(), np.errstate(all='ignore'):
        with counting() as rec:
            fwd = fused_block_forward(x, *params, compute_dtype=cd,
                                      save=save, mlp=mlp)
        out['fwd'] = rec
        dout = torch.randn(x.shape).to(x.dtype)
        with counting() as rec:
            # no layer scale in V2 (r needs no grad): need_dr=False
            fused_block_backward(dout, *backward_inputs((x, *params), fwd),
                                 compute_dtype=cd, save=save, need_dr=False,
                                 mlp=mlp)
        out['bwd'] = rec
    return out


# --------------------------------------------------------------------------
# rows
# --------------------------------------------------------------------------
_SUMMED = ('l1_B', 'l2_B', 'hbm_B', 'own_footprint_B', 'flops')


def _per_elem(row, E):
    for k in ('l1_B', 'l2_B', 'hbm_B', 'flops'):
        v = row.get(k)
        row[k + '_per_elem'] = None if v is None else v / E
    return row


def _triton_rows(tt, l1_share, scale_sampled=False):
    """Per-kernel sums over a phase's launches (first-launch order)."""
    agg = {}
    for L in tt.launches:
        s = L.stats(l1_share(L))
        s['l1_share_B'] = l1_share(L)
        if scale_sampled:
            f = s['programs'] / max(1, s['programs_run'])
            for k in ('l1_B', 'l2_B', 'own_footprint_B', 'flops'):
                s[k] = s[k] * f
            s['hbm_B'] = None
        a = agg.get(L.name)
        if a is None:
            agg[L.name] = dict(s)
            continue
        for k in ('calls', 'programs', 'programs_run', 'l1_B', 'l2_B',
                  'own_footprint_B', 'hbm_B', 'flops'):
            a[k] = None if a[k] is None or s[k] is None else a[k] + s[k]
    return list(agg.values())


def _aten_rows(records):
    return [dict(kernel=a['kernel'], calls=a['calls'], l1_B=a['l2_B'],
                 l2_B=a['l2_B'], hbm_B=a['bytes'], own_footprint_B=None,
                 flops=a['flops']) for a in T.aggregate_aten(records)]


def _sum_rows(rows, **fields):
    t = dict(rows[0], kind='total', kernel='TOTAL', **fields)
    t['calls'] = sum(r['calls'] for r in rows)
    for k in _SUMMED + ('programs', 'programs_run'):
        vals = [r.get(k) for r in rows]
        t[k] = None if any(v is None for v in vals) else sum(vals)
    t['own_footprint_B'] = None
    return t


def _with_totals(rows, E):
    """``rows`` (kernel rows of one shape/size/provider/basis) + per-element
    figures + TOTAL rows per phase and for ``fwd+bwd``."""
    out = list(rows)
    totals = []
    for phase in ('fwd', 'bwd'):
        ph = [r for r in rows if r['phase'] == phase]
        if ph:
            totals.append(_sum_rows(ph))
    out += totals
    if len(totals) == 2:
        out.append(_sum_rows(totals, phase='fwd+bwd'))
    return [_per_elem(r, E) for r in out]


_OCCUPANCY = {}  # (shape, kernel, programs) -> (programs_per_sm, smem_B)


def use_static_occupancy(static_rows) -> int:
    """Take each kernel's programs per SM and shared memory from the static
    suite's rows (what the sm_90 compile of the same launch gives); returns
    how many launches it knows."""
    for r in static_rows:
        if r.get('programs_per_sm') and r.get('programs'):
            occ = (int(r['programs_per_sm']), int(r.get('smem_B') or 0))
            _OCCUPANCY[(r['shape'], r['kernel'], int(r['programs']))] = occ
            # runs at a reduced size launch fewer programs of the same config
            _OCCUPANCY.setdefault((r['shape'], r['kernel'], None), occ)
    return len(_OCCUPANCY)


def static_occupancy(launch, shape: str):
    """(programs_per_sm, smem_B) of ``launch`` at the stage ``shape`` (a
    BlockShape name) from the static rows given to
    :func:`use_static_occupancy`, or None."""
    return _OCCUPANCY.get((shape, launch.name, launch.n_programs),
                          _OCCUPANCY.get((shape, launch.name, None)))


def default_l1_share(launch, shape: str = None) -> int:
    """Per-kernel L1 share: from the static suite's occupancy of the same
    launch when known (:func:`use_static_occupancy`), else
    :data:`benchmarks.traffic.DEFAULT_PROGRAMS_PER_SM` programs per SM and
    no shared memory."""
    occ = static_occupancy(launch, shape) if shape else None
    return T.l1_share_bytes(*occ) if occ else T.l1_share_bytes()


def _base(full, H, W, provider, phase, basis, note=''):
    return dict(suite='traffic', bench='traffic', shape=full.name, H=H, W=W,
                provider=provider, phase=phase, basis=basis,
                note=MODEL_NOTE + note)


_MEMO = {}  # identical launches across providers (one shape at a time)


def fast_rows(full: BlockShape, H: int, W: int, provider: str,
              l1_share=default_l1_share):
    """Every Triton launch and torch op of the fused block at (H, W)."""
    shape = full.scaled(H, W)
    memo = _MEMO.setdefault(shape.name, {})
    if len(_MEMO) > 2:  # keep only recent shapes
        _MEMO.pop(next(iter(_MEMO)))
    rec = run_fast_block(shape, provider, memo=memo)
    rows = []
    for phase in ('fwd', 'bwd'):
        tt, at = rec[phase]
        base = _base(full, H, W, provider, phase, 'run')
        rows += [dict(base, kind='triton', **r) for r in _triton_rows(
            tt, l1_share)] + [dict(base, kind='aten', **r)
                              for r in _aten_rows(at.records)]
    return _with_totals(rows, shape.E)


def sampled_dw_rows(full: BlockShape, provider: str, k: int = 4,
                    l1_share=default_l1_share):
    """Depthwise kernels at the full shape, ``k`` programs each
    (extrapolated x programs / programs run; ``hbm_B`` not measured)."""
    rec = run_fast_block(full, provider,
                         sample=T.sample_programs(DW_PREFIX, k),
                         no_compute=True, count_aten=False)
    rows = []
    for phase in ('fwd', 'bwd'):
        tt, _ = rec[phase]
        base = _base(full, full.H, full.W, provider, phase, 'sampled',
                     '; sampled programs, extrapolated')
        tt.launches = [L for L in tt.launches if L.name.startswith(DW_PREFIX)]
        rows += [dict(base, kind='triton', **r)
                 for r in _triton_rows(tt, l1_share, scale_sampled=True)]
    return _with_totals(rows, full.E)


def reference_rows(full: BlockShape):
    from convnextv2_fast.models import ConvNeXtV2Block
    blk = ConvNeXtV2Block(full.C, use_grn=True, layer_scale_init_value=0.,
                          impl='reference').train()
    recs = T.count_amp_reference(blk, (full.N, full.C, full.H, full.W),
                                 full.stream_dtype, full.compute_dtype)
    rows = []
    for phase in ('fwd', 'bwd'):
        base = _base(full, full.H, full.W, 'reference', phase, 'run',
                     '; dispatcher counts on fake CUDA tensors, bf16 '
                     'autocast')
        rows += [dict(base, kind='aten', **r) for r in _aten_rows(
            recs[phase])]
    return _with_totals(rows, full.E)


def fit_rows(rows, full: BlockShape):
    """Extrapolate each (provider, phase, kind, kernel) from its two run
    sizes (same W, heights H1 < H2) to the full height: bytes are linear in H
    (interior rows each add the same, the 3 border rows at each edge and the
    per-call weight traffic add a constant), so ``v(H) = v1 + (v2 - v1) (H -
    H1) / (H2 - H1)`` is exact when nothing else depends on the size
    (``basis='fit'``)."""
    runs = {}
    for r in rows:
        if r['basis'] == 'run' and r['kernel'] != 'TOTAL' and \
                r['phase'] != 'fwd+bwd':
            runs.setdefault((r['provider'], r['phase'], r['kind'],
                             r['kernel']), {})[r['H']] = r
    out = []
    for key, by_h in runs.items():
        if len(by_h) < 2:
            continue
        (h1, r1), (h2, r2) = sorted(by_h.items())[:2]
        t = (full.H - h1) / (h2 - h1)
        f = dict(r2, H=full.H, W=full.W, basis='fit', programs=None,
                 programs_run=None)
        for k in ('l1_B', 'l2_B', 'hbm_B', 'own_footprint_B', 'flops'):
            if r1.get(k) is not None and r2.get(k) is not None:
                f[k] = r1[k] + (r2[k] - r1[k]) * t
        out.append(f)
    return _with_totals(out, full.E)


def fast_provider_rows(full: BlockShape, provider: str, sizes=SIZES,
                       sampled=True):
    # each program's L1 share: the occupancy of the kernel at this stage
    # (static suite rows, see use_static_occupancy)
    share = functools.partial(default_l1_share, shape=full.name)
    rows = []
    for h, w in sizes:
        rows += fast_rows(full, min(h, full.H), min(w or full.W, full.W),
                          provider, l1_share=share)
    rows += fit_rows(rows, full)
    if sampled:
        rows += sampled_dw_rows(full, provider, l1_share=share)
    return rows


def run_rows(stages, sizes, providers, sampled=True, progress=None):
    rows = []
    for full in stages:
        for provider in providers:
            if provider == 'reference':
                new = reference_rows(full)
            else:
                new = fast_provider_rows(full, provider, sizes, sampled)
            rows += new
            if progress:
                for r in new:
                    progress(r)
    return rows


def run_suite(smoke: bool, device, providers, progress=None, stages=None):
    """Entry used by ``benchmarks/run.py`` (CPU; ``device`` is not used).
    ``stages``: names of the stages to run (default all)."""
    provs = [p for p in PROVIDERS if p in providers or (
        p in ('fast_recompute', 'fast_mlp') and 'fast' in providers)]
    if not kernels_interpreted():
        return _run_in_subprocess(smoke, provs)
    if smoke:
        return run_rows(MASKRCNN_V2B[:1], SMOKE_SIZES, provs, sampled=False,
                        progress=progress)
    todo = [s for s in MASKRCNN_V2B if not stages or s.name in stages]
    _load_static_occupancy()
    return run_rows(todo, SIZES, provs, progress=progress)


def _load_static_occupancy():
    """Occupancy per (stage, kernel) from the static suite (stored rows of
    the same sources, else a run: warm, ~1 min); without ptxas the default
    L1 share stays (said in the rows' note via MODEL_NOTE)."""
    from benchmarks import bench_model, sm90
    if not sm90.have_ptxas():
        return
    rows, _ = bench_model.input_rows('static', False, None, ['fast'])
    use_static_occupancy(rows)


def _run_in_subprocess(smoke, providers):
    """The kernels were imported compiled (TRITON_INTERPRET unset): count in
    a child process with the interpreter on."""
    import json
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, 'rows.json')
        cmd = [sys.executable, os.path.join(_HERE, 'bench_traffic.py'),
               '--rows-json', path, '--providers', *providers] + (
                   ['--smoke'] if smoke else [])
        env = dict(os.environ, TRITON_INTERPRET='1',
                   PYTHONPATH=os.pathsep.join(
                       [os.path.dirname(_HERE)] +
                       [p for p in [os.environ.get('PYTHONPATH')] if p]))
        subprocess.run(cmd, check=True, env=env)
        with open(path) as f:
            return json.load(f)


def full_size_totals(rows):
    """Per (shape, provider): bytes per block element at the full shape, fwd
    and fwd+bwd -- reference counted at the full shape, fast providers from
    the height fit, with ``l2_dw_sampled`` = the fitted fwd+bwd L2 view with
    the depthwise kernels' share replaced by their sampled full-shape
    figure (the per-program reuse distance of a capped grid)."""
    out = []
    keys = []
    for r in rows:
        k = (r['shape'], r['provider'])
        if k not in keys:
            keys.append(k)
    for shape, prov in keys:
        basis = 'run' if prov == 'reference' else 'fit'
        sel = [r for r in rows if r['shape'] == shape and
               r['provider'] == prov and r['basis'] == basis]
        tot = {r['phase']: r for r in sel if r['kernel'] == 'TOTAL'}
        if 'fwd' not in tot or 'fwd+bwd' not in tot:
            continue
        row = dict(shape=shape, provider=prov)
        for ph, tag in (('fwd', 'fwd'), ('fwd+bwd', 'fwdbwd')):
            for k in ('l1', 'l2', 'hbm'):
                row[f'{tag}_{k}'] = tot[ph][f'{k}_B_per_elem']
        dw_fit = sum(r['l2_B_per_elem'] for r in sel
                     if r['kernel'].startswith(DW_PREFIX))
        smp = [r for r in rows if r['shape'] == shape and
               r['provider'] == prov and r['basis'] == 'sampled' and
               r['kernel'].startswith(DW_PREFIX)]
        row['fwdbwd_l2_dw_sampled'] = (
            row['fwdbwd_l2'] - dw_fit + sum(r['l2_B_per_elem'] for r in smp)
            if smp else None)
        out.append(row)
    return out


FULL_COLUMNS = ['shape', 'provider', 'fwd_l1', 'fwd_l2', 'fwd_hbm',
                'fwdbwd_l1', 'fwdbwd_l2', 'fwdbwd_hbm', 'fwdbwd_l2_dw_sampled']


def summary_markdown(rows) -> str:
    from benchmarks.common import markdown_table
    tot = [r for r in rows if r['kernel'] == 'TOTAL']
    return (f'Bytes per block element at the full shape ({MODEL_NOTE}; '
            'fast providers extrapolated from two heights at the real width, '
            'reference counted at the full shape).\n\n' +
            markdown_table(full_size_totals(rows), FULL_COLUMNS) +
            '\n\nTotals per run size (the per-element figures of the two '
            'heights and of the fit show the size dependence).\n\n' +
            markdown_table(tot, SUMMARY_COLUMNS))


def write_markdown(json_path: str) -> str:
    """(Re)generate the ``.md`` beside a results JSON from its last run."""
    from benchmarks import common
    run = common.load_runs(json_path)[-1]
    meta, rows = run['meta'], run['rows']
    md = (f"{MODEL_NOTE}: traffic suite | {meta.get('device')} | torch "
          f"{meta.get('torch')} | triton {meta.get('triton')} | commit "
          f"{meta.get('commit')} | {meta.get('timestamp')}"
          f"{' | smoke' if meta.get('smoke') else ''}\n\n" +
          summary_markdown(rows) + '\n\n### per kernel\n\n' +
          common.markdown_table(rows, COLUMNS) + '\n')
    path = os.path.splitext(json_path)[0] + '.md'
    with open(path, 'w') as f:
        f.write(md)
    return path


def main(argv=None):
    import argparse
    import json
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--smoke', action='store_true')
    p.add_argument('--providers', nargs='+', default=list(PROVIDERS),
                   choices=PROVIDERS)
    p.add_argument('--rows-json', default=None,
                   help='write the rows (a JSON list) here')
    p.add_argument('--out', default=None,
                   help='results JSON (common format) + .md beside it')
    p.add_argument('--stages', nargs='+', default=None,
                   help='subset of ' + ' '.join(s.name for s in MASKRCNN_V2B))
    p.add_argument('--render', default=None, metavar='JSON',
                   help='only regenerate the .md of a stored results JSON')
    args = p.parse_args(argv)
    if args.render:
        print(write_markdown(args.render))
        return 0
    os.environ.setdefault('TRITON_INTERPRET', '1')
    rows = run_suite(args.smoke, torch.device('cpu'), args.providers,
                     stages=args.stages, progress=lambda r: print(
                         f"{r['shape']} {r['H']}x{r['W']} {r['provider']} "
                         f"{r['phase']} {r['kernel']}", flush=True))
    if args.rows_json:
        with open(args.rows_json, 'w') as f:
            json.dump(rows, f)
    if args.out:
        from benchmarks import common
        meta = common.env_metadata(torch.device('cpu'))
        meta.update(smoke=args.smoke, suite='traffic', note=MODEL_NOTE)
        common.append_results(args.out, meta, rows)
        print(write_markdown(args.out))
    return 0


if __name__ == '__main__':
    sys.exit(main())
