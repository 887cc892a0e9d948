"""Plots and README tables generated from results files (never by hand)."""
import glob
import json
import os
from collections import defaultdict
from typing import List

from benchmarks import common


def plot_rows(rows: List[dict], prefix: str, meta: dict) -> List[str]:
    """Speed-up and peak-memory bar charts per case/provider -> PNG paths."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    out = []
    by_bench = defaultdict(list)
    for r in rows:
        by_bench[r['bench']].append(r)
    for bench, brows in by_bench.items():
        cases = sorted({_case(r) for r in brows})
        providers = [p for p in common.PROVIDERS
                     if any(r['provider'] == p for r in brows)]
        for metric, label in (('speedup_vs_reference', 'speed-up vs reference'),
                              ('peak_alloc_gib', 'peak allocated GiB')):
            if not any(r.get(metric) for r in brows):
                continue
            fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cases)), 4))
            width = 0.8 / max(1, len(providers))
            for i, p in enumerate(providers):
                vals = [next((r.get(metric) or 0 for r in brows
                              if r['provider'] == p and _case(r) == c), 0)
                        for c in cases]
                ax.bar([j + i * width for j in range(len(cases))], vals,
                       width, label=p)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
            ax.set_xticklabels(cases, rotation=20, ha='right', fontsize=8)
            ax.set_ylabel(label)
            ax.set_title(f"{bench}: {label}\n{meta['device']}, torch "
                         f"{meta['torch']}, triton {meta['triton']}",
                         fontsize=9)
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = f'{prefix}-{bench}-{metric}.png'
            fig.savefig(path, dpi=90)
            plt.close(fig)
            out.append(path)
    return out


def _case(r):
    parts = [str(r.get(k)) for k in ('arch', 'N', 'H', 'W', 'batch', 'dtype',
                                     'mode') if r.get(k) is not None]
    return ' '.join(parts)


def _is_gpu_run(run: dict) -> bool:
    return not str(run['meta'].get('device', 'cpu')).startswith('cpu')


def latest_tables(results_dir: str = common.RESULTS_DIR,
                  include_smoke: bool = False) -> str:
    """Markdown of the newest GPU run in each results file (for the README;
    CPU instrument runs go to :func:`instrument_tables`)."""
    chunks = []
    for path in sorted(glob.glob(os.path.join(results_dir, '*.json'))):
        with open(path) as f:
            runs = json.load(f)
        runs = [r for r in runs if _is_gpu_run(r) and (
            include_smoke or not r['meta'].get('smoke'))]
        if not runs:
            continue
        md = os.path.splitext(path)[0] + '.md'
        chunks.append(f'#### {os.path.basename(path)}\n\n' +
                      (open(md).read() if os.path.exists(md) else ''))
    return '\n'.join(chunks) or '_No GPU results committed yet._\n'


INSTRUMENT_SUITES = ('static', 'traffic', 'memory', 'model')


def instrument_tables(results_dir: str = common.RESULTS_DIR) -> str:
    """Each CPU instrument suite's summary (its ``summary_markdown``) from
    the newest non-smoke run holding its rows, with that run's commit and
    source digest -- model and compiler output, not GPU measurements.
    ``*-before-*`` files (an earlier kernel generation) are left out."""
    import importlib
    newest = {}
    for path in sorted(glob.glob(os.path.join(results_dir, '*.json'))):
        if '-before-' in os.path.basename(path):
            continue  # kept for the record: an earlier kernel generation
        with open(path) as f:
            runs = json.load(f)
        for run in runs:
            m = run['meta']
            if _is_gpu_run(run) or m.get('smoke'):
                continue
            for suite in INSTRUMENT_SUITES:
                rows = [r for r in run['rows'] if r.get('suite') == suite]
                stamp = m.get('timestamp') or ''
                if rows and stamp >= newest.get(suite, ('',))[0]:
                    newest[suite] = (stamp, rows, m, os.path.basename(path))
    chunks = []
    for suite in INSTRUMENT_SUITES:
        if suite not in newest:
            continue
        stamp, rows, m, name = newest[suite]
        mod = importlib.import_module(f'benchmarks.bench_{suite}')
        if suite == 'static':  # both MLP paths and the extension
            body = mod.summary_markdown(rows, providers=(
                'fast', 'fast_mlp', mod.CUDA_EXT_PROVIDER)).strip() + '\n'
        else:
            body = mod.summary_markdown(rows).strip() + '\n'
        if suite == 'memory':  # its summary is the legend; the numbers:
            body += '\n' + common.markdown_table(
                [r for r in rows if r.get('model') != 'block'],
                mod.COLUMNS) + '\n'
        chunks.append(
            f"#### {suite} ({name}, commit {m.get('commit')}, sources "
            f"{common.stored_digest(m, suite)}, {stamp})\n\n" + body)
    return '\n'.join(chunks) or '_No instrument results committed yet._\n'


def _replace_block(text: str, marker: str, body: str, readme: str) -> str:
    begin, end = f'<!-- {marker}:begin -->', f'<!-- {marker}:end -->'
    if begin not in text or end not in text:
        raise ValueError(f'{readme} has no {begin} ... {end} block')
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return head + begin + '\n' + body + end + tail


def update_readme(readme: str, results_dir: str = common.RESULTS_DIR) -> bool:
    """Replace the README blocks between the results markers (GPU runs) and
    the instrument markers (CPU suites) with the latest committed
    (non-smoke) tables.  Returns True when the file changed."""
    with open(readme) as f:
        text = f.read()
    new = _replace_block(text, 'results', latest_tables(results_dir), readme)
    if '<!-- instrument:begin -->' in new:
        new = _replace_block(new, 'instrument', instrument_tables(results_dir),
                             readme)
    if new != text:
        with open(readme, 'w') as f:
            f.write(new)
    return new != text


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(
        description='Regenerate the README results block from '
        'benchmarks/results/ (non-smoke runs only).')
    parser.add_argument('--readme', default=os.path.join(
        os.path.dirname(common.RESULTS_DIR), '..', 'README.md'))
    args = parser.parse_args(argv)
    changed = update_readme(os.path.normpath(args.readme))
    print('README updated' if changed else 'README already up to date')


if __name__ == '__main__':
    main()
