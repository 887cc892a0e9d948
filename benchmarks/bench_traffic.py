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
  interpreter at the real C and dtypes with the spatial size scaled down
  (``BlockShape.scaled``); the host functions pick the tile sizes they pick
  on a GPU (``TRITON_INTERPRET`` reads 0 while they choose, 1 while the
  kernels run).  Triton kernels are counted per launch by
  :class:`benchmarks.traffic.TritonTraffic`, torch ops in the host functions
  by :class:`benchmarks.traffic.AtenTraffic`.

Rows (consumed as data by the performance model): ``suite, shape (full-size
name), H, W (size run), provider, phase (fwd | bwd), kind (triton | aten),
kernel, calls, l1_B, l2_B, hbm_B, own_footprint_B, flops`` and the same per
block element of the run (E = N*H*W*C), plus ``kernel='TOTAL'`` rows per
(shape, size, provider, phase) and for phase ``fwd+bwd``.  aten rows carry
the op's in+out bytes in all three views (library kernels are opaque).

Per-program tile re-reads at the real shape: the depthwise kernels are also
run at the FULL shape with a few programs sampled (``H, W`` = real,
``kind='triton-sampled'``; l1/l2/own figures extrapolated x programs /
programs_run, ``hbm_B`` not measured).  This is the size at which a grid
capped in programs (today's wgrad: 512) gives each program as many tiles as
on the GPU.

Usage: ``python -m benchmarks --suites traffic`` or
``python benchmarks/bench_traffic.py [--smoke] [--out PATH]``.
"""
import os
import sys
from contextlib import contextmanager

_HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(_HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import traffic as T  # noqa: E402
from benchmarks.shapes import MASKRCNN_V2B, BlockShape  # noqa: E402

PROVIDERS = ('reference', 'fast', 'fast_recompute')
# run sizes (H, W); W None = the stage's real width (tiles then meet rows
# as at full size; only the 3 border rows at each edge differ, and the fit
# to the full height removes them)
SIZES = ((8, None), (16, None))
SMOKE_SIZES = ((8, 8), )
DW_PREFIX = '_dwconv'
MODEL_NOTE = 'model, not a GPU measurement'
COLUMNS = ['shape', 'H', 'W', 'basis', 'provider', 'phase', 'kind', 'kernel', 'calls',
           'l1_B_per_elem', 'l2_B_per_elem', 'hbm_B_per_elem',
           'own_footprint_B', 'flops_per_elem', 'programs', 'programs_run']
SUMMARY_COLUMNS = ['shape', 'H', 'W', 'basis', 'provider', 'phase', 'l1_B_per_elem',
                   'l2_B_per_elem', 'hbm_B_per_elem', 'flops_per_elem']


# --------------------------------------------------------------------------
# driving the fused block
# --------------------------------------------------------------------------
@contextmanager
def gpu_tile_configs():
    """The host functions choose tiles as on a GPU (they read
    ``TRITON_INTERPRET`` when they choose); kernels still run interpreted
    (the recorder sets it back to 1 around each launch)."""
    old = os.environ.get('TRITON_INTERPRET')
    os.environ['TRITON_INTERPRET'] = '0'
    try:
        yield
    finally:
        if old is None:
            os.environ.pop('TRITON_INTERPRET', None)
        else:
            os.environ['TRITON_INTERPRET'] = old


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


def run_fast_block(shape: BlockShape, recompute: bool, sample=None,
                   no_compute: bool = False, count_aten: bool = True,
                   memo=None):
    """Drive ``fused_block_forward`` then ``fused_block_backward`` at
    ``shape``; returns ``{phase: (TritonTraffic, AtenTraffic or None)}``.

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
    save = not recompute
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
                                      save=save)
        out['fwd'] = rec
        dout = torch.randn(x.shape).to(x.dtype)
        with counting() as rec:
            # no layer scale in V2 (r needs no grad): need_dr=False
            fused_block_backward(dout, *backward_inputs((x, *params), fwd),
                                 compute_dtype=cd, save=save, need_dr=False)
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
            for k in ('l1_B', 'l2_B', 'own_footprint_B'):
                s[k] = s[k] * f
            s['hbm_B'] = None
        a = agg.get(L.name)
        if a is None:
            agg[L.name] = dict(s, flops=0)
            continue
        for k in ('calls', 'programs', 'programs_run', 'l1_B', 'l2_B',
                  'own_footprint_B', 'hbm_B'):
            a[k] = None if a[k] is None or s[k] is None else a[k] + s[k]
    return list(agg.values())


def _aten_rows(records):
    return [dict(kernel=a['kernel'], calls=a['calls'], l1_B=a['bytes'],
                 l2_B=a['bytes'], hbm_B=a['bytes'], own_footprint_B=None,
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


def default_l1_share(launch) -> int:
    """Per-kernel L1 share; :data:`benchmarks.traffic.DEFAULT_PROGRAMS_PER_SM`
    programs per SM and no shared memory until the static suite provides the
    occupancy per kernel."""
    return T.l1_share_bytes()


def _base(full, H, W, provider, phase, basis, note=''):
    return dict(suite='traffic', shape=full.name, H=H, W=W,
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
    rec = run_fast_block(shape, provider == 'fast_recompute', memo=memo)
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
    rec = run_fast_block(full, provider == 'fast_recompute',
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
    rows = []
    for h, w in sizes:
        rows += fast_rows(full, min(h, full.H), min(w or full.W, full.W),
                          provider)
    rows += fit_rows(rows, full)
    if sampled:
        rows += sampled_dw_rows(full, provider)
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


def run_suite(smoke: bool, device, providers, progress=None):
    """Entry used by ``benchmarks/run.py`` (CPU; ``device`` is not used)."""
    provs = [p for p in PROVIDERS if p in providers or (
        p == 'fast_recompute' and 'fast' in providers)]
    if not kernels_interpreted():
        return _run_in_subprocess(smoke, provs)
    if smoke:
        return run_rows(MASKRCNN_V2B[:1], SMOKE_SIZES, provs, sampled=False,
                        progress=progress)
    return run_rows(MASKRCNN_V2B, SIZES, provs, progress=progress)


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


def summary_markdown(rows) -> str:
    from benchmarks.common import markdown_table
    tot = [r for r in rows if r['kernel'] == 'TOTAL']
    return (f'Bytes per block element ({MODEL_NOTE}).\n\n' +
            markdown_table(tot, SUMMARY_COLUMNS))


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
    args = p.parse_args(argv)
    os.environ.setdefault('TRITON_INTERPRET', '1')
    rows = run_suite(args.smoke, torch.device('cpu'), args.providers,
                     progress=lambda r: print(
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
        md = (f"{MODEL_NOTE}: traffic suite | torch {meta['torch']} | triton "
              f"{meta['triton']} | commit {meta['commit']} | "
              f"{meta['timestamp']}\n\n" + summary_markdown(rows) +
              '\n\n### per kernel\n\n' +
              common.markdown_table(rows, COLUMNS) + '\n')
        with open(os.path.splitext(args.out)[0] + '.md', 'w') as f:
            f.write(md)
    return 0


if __name__ == '__main__':
    sys.exit(main())
