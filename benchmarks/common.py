"""Shared benchmark machinery: timing, memory, saved activations, results.

Results are data: every benchmark appends rows (dicts) to
``benchmarks/results/<gpu>-<date>.json`` together with the environment
(GPU name, torch/triton/mmcv versions, commit, timestamp); markdown tables and
plots are generated from those files, never typed by hand.
"""
import datetime
import json
import os
import platform
import re
import subprocess
from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence

import torch

from convnextv2_fast._timing import synchronize, time_fn  # noqa: F401  (one timer)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           'results')
PROVIDERS = ('reference', 'compile', 'fast')


def device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'cpu-{platform.machine()}-{os.cpu_count()}cores'


def _commit() -> str:
    try:
        return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'],
                              capture_output=True, text=True, timeout=10,
                              cwd=os.path.dirname(RESULTS_DIR)
                              ).stdout.strip() or 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


# What the static and traffic rows (the model's inputs) are a function of:
# the fused ops' kernels and host code, the shapes and the instruments (the
# static rows also of the extension sources; the traffic rows of the Triton
# kernels' occupancy, i.e. the static instrument, but not of the .cu files)
# -- not the models, the tuner, the results files, the README or the tests.
_COMMON_SOURCES = ('convnextv2_fast/ops/*.py', 'benchmarks/shapes.py',
                   'benchmarks/sm90.py', 'benchmarks/bench_static.py')
SUITE_SOURCES = {
    'static': _COMMON_SOURCES + ('csrc/**/*', ),
    'traffic': _COMMON_SOURCES + ('benchmarks/traffic.py',
                                  'benchmarks/bench_traffic.py'),
}


def source_digest(suite: str = None,
                  root: str = os.path.dirname(RESULTS_DIR) + '/..') -> str:
    """sha256 (16 hex) of the sources ``suite``'s rows depend on
    (:data:`SUITE_SOURCES`; None: all of them), plus the torch and Triton
    versions: stored rows with the same digest are the rows a run now would
    produce (the model suite reuses them)."""
    import glob
    import hashlib
    root = os.path.abspath(root)
    globs = SUITE_SOURCES[suite] if suite else sorted(
        {g for gs in SUITE_SOURCES.values() for g in gs})
    h = hashlib.sha256()
    files = sorted({f for g in globs
                    for f in glob.glob(os.path.join(root, g), recursive=True)
                    if os.path.isfile(f) and not f.endswith(('.so', '.pyc'))})
    for f in files:
        h.update(os.path.relpath(f, root).encode())
        with open(f, 'rb') as fh:
            h.update(hashlib.sha256(fh.read()).digest())
    try:
        import triton
        h.update(triton.__version__.encode())
    except ImportError:
        pass
    h.update(torch.__version__.encode())
    return h.hexdigest()[:16]


def stored_digest(meta: dict, suite: str):
    """The digest a stored run's ``suite`` rows were made from (per-suite
    digests; runs before them stored one digest of everything)."""
    return (meta.get('source_digests') or {}).get(suite,
                                                  meta.get('source_digest'))


def env_metadata(device: torch.device) -> dict:
    meta = dict(device=device_name(device), torch=torch.__version__,
                cuda=str(torch.version.cuda), commit=_commit(),
                source_digest=source_digest(),
                source_digests={k: source_digest(k) for k in SUITE_SOURCES},
                timestamp=datetime.datetime.now(
                    datetime.timezone.utc).isoformat(timespec='seconds'))
    for name in ('triton', 'mmcv', 'mmdet', 'mmpretrain'):
        try:
            meta[name] = __import__(name).__version__
        except Exception:
            meta[name] = None
    return meta


@contextmanager
def peak_memory(device: torch.device, out: dict):
    """Record peak allocated/reserved GiB of the block into ``out``."""
    if device.type != 'cuda':
        out.update(peak_alloc_gib=None, peak_reserved_gib=None)
        yield
        return
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    yield
    torch.cuda.synchronize(device)
    out.update(
        peak_alloc_gib=torch.cuda.max_memory_allocated(device) / 2**30,
        peak_above_base_gib=(torch.cuda.max_memory_allocated(device) - base) /
        2**30,
        peak_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30)


def results_path(device: torch.device, date: Optional[str] = None) -> str:
    date = date or datetime.date.today().isoformat()
    slug = re.sub(r'[^A-Za-z0-9]+', '-', device_name(device)).strip('-')
    return os.path.join(RESULTS_DIR, f'{slug}-{date}.json')


def _run_suites(run: dict) -> set:
    return {r.get('suite') or r.get('bench') for r in run.get('rows', [])}


def drop_superseded(runs: List[dict], meta: dict, suites) -> List[dict]:
    """``runs`` less those a new run (``meta``) replaces: same device and
    smoke flag, and every suite they hold is among ``suites`` (complete in
    the new run).  A results file then keeps the newest run of each suite
    per device (older ones stay in git history) instead of growing by every
    rerun; runs of other devices (H100 next to H200) are kept."""
    key = (meta.get('device'), bool(meta.get('smoke')))
    suites = set(suites)
    return [r for r in runs
            if (r['meta'].get('device'), bool(r['meta'].get('smoke'))) != key
            or not _run_suites(r) or not _run_suites(r) <= suites]


def append_results(path: str, meta: dict, rows: List[dict]) -> str:
    """Append one run (metadata + rows) to the JSON results file, dropping
    the runs it supersedes (:func:`drop_superseded`)."""
    runs = []
    if os.path.exists(path):
        with open(path) as f:
            runs = json.load(f)
    new = dict(meta=meta, rows=rows)
    runs = drop_superseded(runs, meta, _run_suites(new)) + [new]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(runs, f, indent=1)
    return path


def suite_table(name: str, rows: List[dict], columns: Sequence[str]) -> str:
    return f'### {name}\n\n' + markdown_table(rows, columns)


class PartialResults:
    """Rewrites ``path`` (the runs already in it + this run) and its ``.md``
    on every call, so a run cut short keeps what it measured."""

    def __init__(self, path: str, meta: dict):
        self.path, self.meta = path, meta
        self.previous = load_runs(path) if os.path.exists(path) else []

    def __call__(self, rows: List[dict], tables: Sequence[str],
                 complete=()) -> None:
        """``complete``: the suites whose rows are all in ``rows`` (earlier
        runs of only those are dropped: a run cut short never loses an older
        run of the suite it was in)."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + '.tmp'
        runs = drop_superseded(self.previous, self.meta, complete)
        with open(tmp, 'w') as f:
            json.dump(runs + [dict(meta=self.meta, rows=rows)], f,
                      indent=1, default=str)
        os.replace(tmp, self.path)
        with open(os.path.splitext(self.path)[0] + '.md', 'w') as f:
            f.write('\n\n'.join(tables) + '\n')


def load_runs(path: str) -> List[dict]:
    """The runs (``{'meta': ..., 'rows': [...]}``) stored in a results file."""
    with open(path) as f:
        return json.load(f)


def render_runs(runs: List[dict], columns: Sequence[str]) -> str:
    """Markdown: one table per stored run, headed by its environment."""
    parts = []
    for run in runs:
        m = run['meta']
        parts.append(f"#### {m.get('device')} | torch {m.get('torch')} | "
                     f"triton {m.get('triton')} | commit {m.get('commit')} | "
                     f"{m.get('timestamp')}{' | smoke' if m.get('smoke') else ''}"
                     f"\n\n{markdown_table(run['rows'], columns)}\n")
    return '\n'.join(parts)


def _fmt(v):
    if v is None:
        return '-'
    if isinstance(v, float):
        return f'{v:.3g}' if abs(v) < 1000 else f'{v:.0f}'
    return str(v)


def markdown_table(rows: List[dict], columns: Sequence[str]) -> str:
    lines = ['| ' + ' | '.join(columns) + ' |',
             '|' + '---|' * len(columns)]
    for row in rows:
        lines.append('| ' + ' | '.join(_fmt(row.get(c)) for c in columns) +
                     ' |')
    return '\n'.join(lines)


def add_speedups(rows: List[dict], key: Sequence[str],
                 time_col: str = 'median_ms') -> None:
    """Add ``speedup_vs_reference`` (reference time / time) to each row of
    the same ``key`` group."""
    ref = {tuple(r[k] for k in key): r[time_col] for r in rows
           if r.get('provider') == 'reference' and r.get(time_col)}
    for r in rows:
        base = ref.get(tuple(r[k] for k in key))
        if base and r.get(time_col):
            r['speedup_vs_reference'] = base / r[time_col]


def iteration_budget(smoke: bool) -> Dict[str, int]:
    """(warmup, iters) for a suite: tiny for smoke, reduced when the
    environment says ``BENCH_BUDGET=short`` (the GPU check script's time box),
    full otherwise."""
    if smoke:
        return dict(warmup=1, iters=2)
    if os.environ.get('BENCH_BUDGET') == 'short':
        return dict(warmup=2, iters=5)
    return dict(warmup=3, iters=10)
