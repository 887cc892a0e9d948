"""Suite ``model``: modelled H100 / H200 times of the block and the V2-B
backbone -- model, not a GPU measurement.

Applies :mod:`benchmarks.perf_model` to the rows of the ``static`` and
``traffic`` suites.  Their rows come, in this order of preference, from
(1) this process (an earlier ``run_suite`` here), (2) the newest stored run
in ``benchmarks/results/*.json`` made from the same sources (the same
:func:`benchmarks.common.source_digest`: kernels, host code, extension
sources, instruments, torch and Triton versions) with the same smoke flag,
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
            if not rows or meta.get('source_digest') != digest or \
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
    digest = common.source_digest()
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
    rows = perf_model.model(got['static'][0], got['traffic'][0])
    rows = [r for r in rows if r['provider'] in providers]
    for r in rows:
        r['inputs'] = source
        r['smoke'] = smoke
        if progress:
            progress(r)
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
