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


def latest_tables(results_dir: str = common.RESULTS_DIR,
                  include_smoke: bool = False) -> str:
    """Markdown of the newest run in each results file (for the README)."""
    chunks = []
    for path in sorted(glob.glob(os.path.join(results_dir, '*.json'))):
        with open(path) as f:
            runs = json.load(f)
        runs = [r for r in runs if include_smoke or not r['meta'].get('smoke')]
        if not runs:
            continue
        md = os.path.splitext(path)[0] + '.md'
        chunks.append(f'#### {os.path.basename(path)}\n\n' +
                      (open(md).read() if os.path.exists(md) else ''))
    return '\n'.join(chunks) or '_No GPU results committed yet._\n'
