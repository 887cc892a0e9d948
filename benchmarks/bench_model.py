"""Suite ``model``: modelled H100 / H200 times of the block and the V2-B
backbone -- model, not a GPU measurement.

Applies :mod:`benchmarks.perf_model` to the rows of the ``static`` and
``traffic`` suites.  Their rows come, in this order of preference, from
(1) this process (an earlier ``run_suite`` here), (2) the newest stored run
in ``benchmarks/results/*.json`` made from the same sources (the same
per-suite :func:`benchmarks.common.source_digest`: kernels, host code,
instruments, the extension sources for ``static``, torch and Triton
versions) with the same smoke flag,
(3) running the suite now.  Each model row says where its inputs
came from (``inputs``).

Rows: per kernel, per block (``kernel='BLOCK'``, phases fwd, bwd, fwd+bwd)
and per backbone (``kernel='BACKBONE'``, depth-weighted stages), each GPU,
with ``ratio_vs_reference``.  :func:`summary_markdown` renders the tables under the
heading "model, not a GPU measurement" with every constant beside them.

``python -m benchmarks.bench_model [--smoke]`` prints that markdown.
"""
import glob
import importlib
import json
import os
import sys

import torch

from benchmarks import common, perf_model

INPUT_SUITES = ('static', 'traffic')
COLUMNS = ['gpu', 'shape', 'provider', 'phase', 'kernel', 'time_us',
           'ratio_vs_reference', 'bound', 'bound_share', 'hbm_MB', 'l2_MB',
           'GFLOP', 'Ginstr', 'note']
_CACHE = {}


def stored_rows(suite: str, smoke: bool, digest: str,
                results_dir: str = common.RESULTS_DIR):
    """(rows, source) of the newest stored run with ``suite`` rows made from
    sources with ``digest`` and the same smoke flag, or (None, None)."""
    best = None
    for path in glob.glob(os.path.join(results_dir, '*.json')):
        try:
            runs = common.load_runs(path)
        except (OSError, ValueError):
            continue
        for run in runs:
            meta = run.get('meta', {})
            rows = [r for r in run.get('rows', [])
                    if r.get('suite') == suite]
            if not rows or common.stored_digest(meta, suite) != digest or \
                    bool(meta.get('smoke')) != bool(smoke):
                continue
            stamp = meta.get('timestamp') or ''
            if best is None or stamp > best[0]:
                best = (stamp, rows, f'{os.path.basename(path)} {stamp}')
    return (best[1], best[2]) if best else (None, None)


def input_rows(suite: str, smoke: bool, device, providers,
               run_missing: bool = True):
    """(rows, source) of an input suite (see the module docstring);
    ``run_missing=False``: stored rows only ((None, why) when there are
    none for these sources)."""
    key = (suite, smoke)
    if key in _CACHE:
        return _CACHE[key]
    digest = common.source_digest(suite)
    rows, source = stored_rows(suite, smoke, digest)
    if rows is None and not run_missing:
        return None, (f'no stored {suite} rows for source digest {digest} '
                      f'in {common.RESULTS_DIR}: run `python -m benchmarks '
                      '--suites static traffic model` and commit the results')
    if rows is None:
        try:
            module = importlib.import_module(f'benchmarks.bench_{suite}')
        except ImportError as exc:
            return [], f'{suite} suite not available ({exc})'
        rows = module.run_suite(smoke, device, list(providers))
        source = f'{suite} suite run now'
    _CACHE[key] = (rows, source)
    return rows, source


def run_suite(smoke: bool, device: torch.device, providers, progress=None,
              run_missing: bool = True):
    """Entry used by benchmarks/run.py (CPU only; ``device`` is passed to
    the input suites).  The reference is always modelled (the gate needs
    it); ``fast`` brings ``fast_recompute`` and ``fast_mlp``.
    ``run_missing=False`` models stored rows only and raises when there are
    none."""
    providers = set(providers) | {'reference'}
    if 'fast' in providers:
        providers |= {'fast_recompute', 'fast_mlp'}
    got = {s: input_rows(s, smoke, device, sorted(providers), run_missing)
           for s in INPUT_SUITES}
    missing = [src for rows, src in got.values() if rows is None]
    if missing:
        raise RuntimeError('; '.join(missing))
    source = '; '.join(f'{s}: {src}' for s, (_, src) in got.items())
    static_rows, traffic_rows = got['static'][0], got['traffic'][0]
    if not smoke:
        extra = before_rows(static_rows, traffic_rows)
        if extra:
            providers.add(BEFORE)
            static_rows = static_rows + extra[0]
            traffic_rows = traffic_rows + extra[1]
            source += f'; {BEFORE}: {extra[2]}'
    rows = perf_model.model(static_rows, traffic_rows)
    rows = [r for r in rows if r['provider'] in providers]
    for r in rows:
        r['inputs'] = source
        r['smoke'] = smoke
        if progress:
            progress(r)
    return rows


# The block before the depthwise rewrite (issue 8), as a LOWER BOUND: its
# depthwise kernels from the stored *-before-* results (sm_90 compile rows and
# the traffic suite's sampled full-shape L2 view; HBM = today's unique
# footprint), every other kernel and torch op as today's ``fast`` (the old
# MLP side made more passes: W2 fold temporaries, db1 and bias copies).
BEFORE = 'fast_before_lb'
DW_PREFIX = '_dwconv'


def before_rows(static_rows, traffic_rows,
                results_dir: str = common.RESULTS_DIR):
    """(static rows, traffic rows, source) of provider :data:`BEFORE`, or
    None without stored *-before-* results."""
    old_static = _rows_of(results_dir, 'static-before-*.json', 'static')
    old_traffic = _rows_of(results_dir, 'traffic-before-*.json', 'traffic')
    old_dw = {(r['shape'], r['phase'], r['kernel']): r for r in old_traffic
              if r.get('provider') == 'fast' and r.get('basis') == 'sampled'
              and r['kernel'].startswith(DW_PREFIX)}
    if not old_static or not old_dw:
        return None

    def dw(r):
        return r['kernel'].startswith(DW_PREFIX)

    st = [dict(r, provider=BEFORE) for r in old_static
          if r.get('provider') == 'fast' and dw(r)]
    st += [dict(r, provider=BEFORE) for r in static_rows
           if r.get('provider') == 'fast' and not dw(r)]
    tr = []
    for r in traffic_rows:
        if r.get('provider') != 'fast' or r.get('kernel') == 'TOTAL':
            continue
        if dw(r) and r.get('basis') == 'sampled':
            continue  # replaced by the old kernel's sampled row below
        if dw(r) and (r['shape'], r['phase'], r['kernel']) not in old_dw:
            continue
        tr.append(dict(r, provider=BEFORE))
    tr += [dict(r, provider=BEFORE) for r in old_dw.values()]
    return st, tr, 'depthwise kernels from *-before-* results, the rest ' \
        'as fast (a lower bound)'


def _rows_of(results_dir, pattern, suite):
    rows = []
    for path in sorted(glob.glob(os.path.join(results_dir, pattern))):
        rows += rows_in_file(path, suite)
    return rows


def summary_markdown(rows) -> str:
    """The model's heading ("model, not a GPU measurement"), constants and
    block/backbone table (run.py puts it above the per-kernel table)."""
    src = f"\n\nInputs: {rows[0]['inputs']}" if rows else ''
    return perf_model.markdown(rows) + src


def rows_in_file(path: str, suite: str) -> list:
    """``suite`` rows of a results file (common format: a list of runs) or
    of a plain JSON list of rows (the suites' ``--json`` output)."""
    with open(path) as f:
        data = json.load(f)
    if data and isinstance(data[0], dict) and 'rows' in data[0]:
        data = [r for run in data for r in run['rows']]
    return [r for r in data if r.get('suite') == suite]


def main(argv=None):
    """``[--smoke] [--static PATH] [--traffic PATH] [--json OUT]``: PATH
    gives an input suite's rows from a file instead."""
    argv = sys.argv[1:] if argv is None else argv
    smoke = '--smoke' in argv
    for suite in INPUT_SUITES:
        if f'--{suite}' in argv:
            path = argv[argv.index(f'--{suite}') + 1]
            _CACHE[(suite, smoke)] = (rows_in_file(path, suite), path)
    rows = run_suite(smoke, torch.device('cpu'), ['reference', 'fast'])
    print(summary_markdown(rows))
    if rows:
        print(f"inputs: {rows[0]['inputs']}")
    if '--json' in argv:
        with open(argv[argv.index('--json') + 1], 'w') as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
