"""One entry point for the benchmark suite: ``python -m benchmarks``.

Picks what the machine can run: full-size suites on a CUDA GPU; on a machine
without one, the timed suites run their ``--smoke`` configuration (tiny
models on the CPU, the fused Triton kernels in the Triton interpreter), which
is what the README's main command and CI run.  The CPU suites
(:data:`CPU_SUITES`: static, traffic, memory, model, fcmae_model) need no GPU and run at
full fidelity anywhere (``--smoke`` still selects their reduced set).
Writes ``benchmarks/results/<device>-<date>.json`` (appending), a markdown
table ``.md`` beside it, and PNG plots.
"""
import argparse
import importlib
import os
import sys

from benchmarks import common

SUITES = {
    'block': 'benchmarks.bench_block',
    'backbone': 'benchmarks.bench_backbone',
    'maskrcnn': 'benchmarks.bench_maskrcnn',
    'fcmae': 'benchmarks.bench_fcmae',
    'sparse_dwconv': 'benchmarks.bench_sparse_dwconv',
    'static': 'benchmarks.bench_static',
    'traffic': 'benchmarks.bench_traffic',
    'memory': 'benchmarks.bench_memory',
    'model': 'benchmarks.bench_model',
    'fcmae_model': 'benchmarks.model_fcmae',
}

# Suites computed on the CPU (compiler output, interpreter counts, fake
# tensors, a model): same results with or without a GPU, never forced to
# --smoke.  A suite listed here need not be registered yet.
CPU_SUITES = ('static', 'traffic', 'memory', 'model', 'fcmae_model')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog='python -m benchmarks', description=__doc__.split('\n')[0])
    parser.add_argument('--smoke', action='store_true',
                        help='tiny CPU-sized configuration (about a minute)')
    parser.add_argument('--suites', nargs='+', default=None,
                        help=f'subset of {sorted(SUITES)} (default: all)')
    parser.add_argument('--providers', nargs='+',
                        default=None, help='subset of reference compile fast '
                        '(default: all on GPU; reference fast in smoke)')
    parser.add_argument('--out', default=None,
                        help='results JSON path (default results/<device>-<date>.json)')
    parser.add_argument('--no-plots', action='store_true')
    args = parser.parse_args(argv)
    for s in args.suites or []:
        if s not in SUITES:
            parser.error(f'--suites: unknown suite {s!r}; choose from '
                         f'{sorted(SUITES)}')
    for p in args.providers or []:
        if p not in common.PROVIDERS:
            parser.error(f'--providers: unknown provider {p!r}; choose from '
                         f'{list(common.PROVIDERS)}')
    return args


def main(argv=None):
    args = parse_args(argv)
    import torch
    cuda = torch.cuda.is_available()
    suites = args.suites or list(SUITES)
    gpu_suites = [s for s in suites if s not in CPU_SUITES]
    smoke = args.smoke or (not cuda and bool(gpu_suites))
    if not cuda and not args.smoke and gpu_suites:
        print(f'No CUDA device: full-size {gpu_suites} need a GPU; running '
              'their --smoke configuration instead (CPU suites '
              f'{[s for s in suites if s in CPU_SUITES]} run in full).')
    if smoke and not cuda and gpu_suites:
        # exercise the fused kernels on the CPU through the Triton interpreter
        # (CPU suites that compile for sm_90 re-run themselves without it)
        os.environ.setdefault('TRITON_INTERPRET', '1')
    device = torch.device('cuda' if cuda else 'cpu')
    providers = args.providers or (['reference', 'fast'] if smoke else list(
        common.PROVIDERS))

    def suite_smoke(name):
        return args.smoke or (smoke and name not in CPU_SUITES)

    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    meta = common.env_metadata(device)
    meta.update(smoke=smoke, providers=providers, argv=sys.argv[1:])
    print(f"device: {meta['device']}  torch {meta['torch']}  triton "
          f"{meta['triton']}  smoke={smoke}")
    all_rows, tables, complete = [], [], []
    path = args.out or common.results_path(device)
    # results survive a timeout: the JSON (earlier runs + this one) and the
    # markdown are rewritten after every row and every suite
    save = common.PartialResults(path, meta)
    for name in suites:
        module = importlib.import_module(SUITES[name])
        bar = tqdm(desc=name, unit='case') if tqdm else None
        done = []

        def row_done(r, name=name, module=module, done=done, bar=bar):
            done.append(r)
            save(all_rows + done, tables + [common.suite_table(
                name, done, module.COLUMNS) + ' (partial)'], complete)
            if bar is not None:
                bar.update(1)

        rows = module.run_suite(suite_smoke(name), device, providers,
                                progress=row_done)
        if bar is not None:
            bar.close()
        all_rows += rows
        table = common.suite_table(name, rows, module.COLUMNS)
        if hasattr(module, 'summary_markdown'):
            table = (f'### {name}\n\n' + module.summary_markdown(rows) +
                     '\n\n' + table[len(f'### {name}') + 2:])
        tables.append(table)
        complete.append(name)
        save(all_rows, tables, complete)
    header = (f"Device: {meta['device']} | torch {meta['torch']} | triton "
              f"{meta['triton']} | commit {meta['commit']} | "
              f"{meta['timestamp']}")
    smoked = [n for n in suites if suite_smoke(n) and n not in CPU_SUITES]
    if smoked:
        header += (f'\n\nSMOKE run of {smoked}: tiny shapes; a code-path and '
                   'parity check, not a performance measurement (on a CPU '
                   'the fused kernels run in the Triton interpreter).')
    cpu_run = [n for n in suites if n in CPU_SUITES]
    if cpu_run:
        header += (f'\n\nCPU suites {cpu_run}'
                   f"{' (reduced --smoke set)' if args.smoke else ''}: "
                   'compiler output, counts and models, not GPU '
                   'measurements.')
    md = header + '\n\n' + '\n\n'.join(tables) + '\n'
    md_path = os.path.splitext(path)[0] + '.md'
    with open(md_path, 'w') as f:
        f.write(md)
    print(md)
    if not args.no_plots:
        from benchmarks.report import plot_rows
        for png in plot_rows(all_rows, os.path.splitext(path)[0], meta):
            print(f'plot: {png}')
    print(f'results: {path}\ntable: {md_path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
