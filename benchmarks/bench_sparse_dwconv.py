"""Sparse depthwise 7x7 conv kernels, measured against their model: every path
(gather, FFMA tiles 2/4/8, tensor-core 8x8 tiles for fp16/bf16, skip 1/2/4) at
every FCMAE V2-B stage (224², mask 0.6, 64 images, bf16), each pass --
forward, input gradient (the forward kernel on grad_out with reversed taps),
weight gradient (the tile wgrad on the tile paths, the skip wgrad on the skip
paths, the gather's otherwise).

Each row: median µs (CUDA events, the project's timer), the pass's HBM floor
and the model's time from :mod:`benchmarks.model_sparse_dwconv` for the same
layout with the GPU's constants (H200 nominal, or perf_model's H100 on an
H100), ``x_hbm_floor`` measured and ``measured_vs_model``: what a GPU visit
checks the model against.  Neighbour and halo tables are built before timing
(once per stage in the encoder).  ``--smoke`` (CPU): 2 images, stage 1, the C++
twins (the tensor-core path's twin emulates ldmatrix/mma.sync: slow, correct,
not a speed number).

    python -m benchmarks --suites sparse_dwconv       # GPU: full size
    python benchmarks/bench_sparse_dwconv.py --smoke  # CPU check of the script
"""
import argparse
import os.path as osp
import sys
from typing import List

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import common, shapes  # noqa: E402
from benchmarks import model_sparse_dwconv as msd  # noqa: E402
from convnextv2_fast._ext import extension_status  # noqa: E402
from convnextv2_fast._timing import time_fn  # noqa: E402
from convnextv2_fast.models.fcmae import random_patch_mask  # noqa: E402
from convnextv2_fast.sparse.dwconv import SKIP_TILES, TILES, mma_applies  # noqa: E402
from convnextv2_fast.sparse.layout import build_layouts  # noqa: E402

COLUMNS = ['stage', 'pass', 'path', 'dtype', 'M', 'C', 'median_us', 'hbm_floor_us',
           'x_hbm_floor', 'model_us', 'measured_vs_model', 'bound']


def _hw(device: torch.device) -> dict:
    """The model's constants for this GPU (H200 nominal unless an H100)."""
    if device.type == 'cuda' and 'H100' in torch.cuda.get_device_name(device):
        from benchmarks import model_fcmae, perf_model
        return model_fcmae.dwconv_hw(perf_model.GPUS['H100'])
    return msd.H200


def _paths(dtype: torch.dtype, C: int):
    """(name, tile, mma) of every path of the forward for this dtype (``tile``
    ``'skip<T>'`` for the skip path, as model_layout_pass takes it)."""
    out = [('gather', 0, False)] + [(f'tile{t}', t, False) for t in TILES]
    if mma_applies(8, dtype, C):
        out.append(('mma8', 8, True))
    return out + [(f'skip{t}', f'skip{t}', False) for t in SKIP_TILES]


def _pass_fn(ops, kind, lay, x, go, taps, bias, tile, mma):
    """The op call of one pass on one path (tables prebuilt)."""
    if isinstance(tile, str):  # the skip path
        t = int(tile[len('skip'):])
        halo = lay.tile_halo_rows(t)
        if kind == 'wgrad':
            return lambda: ops.sparse_dwconv_skip_wgrad(go, x, halo, t)
        inp, w, b = (x, taps, bias) if kind == 'fwd' else (go, taps.flip(0).contiguous(), None)
        return lambda: ops.sparse_dwconv_skip_fwd(inp, w, b, halo, t)
    if kind == 'wgrad':
        if tile:
            halo = lay.tile_halo_rows(tile)
            return lambda: ops.sparse_dwconv_tile_wgrad(go, x, halo, tile)
        nbr = lay.neighbour_rows()
        return lambda: ops.sparse_dwconv_bwd_weight(go, x, nbr)
    inp, w, b = (x, taps, bias) if kind == 'fwd' else (go, taps.flip(0).contiguous(), None)
    if mma:
        halo = lay.tile_halo_rows(8)
        return lambda: ops.sparse_dwconv_mma_fwd(inp, w, b, halo)
    if tile:
        halo = lay.tile_halo_rows(tile)
        return lambda: ops.sparse_dwconv_tile_fwd(inp, w, b, halo, tile)
    nbr = lay.neighbour_rows()
    return lambda: ops.sparse_dwconv_fwd(inp, w, b, nbr)


def run(N: int, stages, dtype: torch.dtype, device: torch.device, warmup: int, iters: int,
        progress=None) -> List[dict]:
    from convnextv2_fast.sparse._ops import sparse_ops
    ops = sparse_ops()
    g = torch.Generator().manual_seed(0)
    grid = shapes.FCMAE_SIZE // 32
    mask = random_patch_mask(N, grid, grid, shapes.FCMAE_MASK_RATIO,
                             generator=g).reshape(N, grid, grid).bool()
    layouts = build_layouts(mask.to(device), shapes.FCMAE_SIZE, shapes.FCMAE_SIZE, 32, 4)
    cpu_layouts = build_layouts(mask, shapes.FCMAE_SIZE, shapes.FCMAE_SIZE, 32, 4)
    hw = _hw(device)
    rows = []
    for i in stages:
        lay, C = layouts[i], shapes.V2B_CHANNELS[i]
        x = torch.randn(lay.num_rows, C, generator=g).to(device, dtype)
        go = torch.randn(lay.num_rows, C, generator=g).to(device, dtype)
        taps = (torch.randn(49, C, generator=g) * 0.1).to(device, dtype)
        bias = torch.randn(C, generator=g).to(device, dtype)
        for name, tile, mma in _paths(dtype, C):
            for kind in ('fwd', 'dgrad', 'wgrad'):
                if kind == 'wgrad' and mma:
                    continue  # the tensor-core path's weight gradient is tile 8's
                t = time_fn(_pass_fn(ops, kind, lay, x, go, taps, bias, tile, mma), device,
                            warmup=warmup, iters=iters)
                m = msd.model_layout_pass(kind, cpu_layouts[i], C, dtype, tile, hw, mma=mma)
                us = t['median_ms'] * 1e3
                row = dict(bench='sparse_dwconv', suite='sparse_dwconv', stage=i + 1,
                           **{'pass': kind}, path=m['path'], dtype=str(dtype).split('.')[-1],
                           N=N, M=lay.num_rows, C=C, median_us=us,
                           hbm_floor_us=m['hbm_floor_us'],
                           x_hbm_floor=us / m['hbm_floor_us'], model_us=m['model_us'],
                           measured_vs_model=us / m['model_us'],
                           bound=max(('hbm_us', 'l2_us', 'lsu_us', 'issue_us', 'tensor_us'),
                                     key=lambda k: m.get(k) or 0)[:-3],
                           model='model_us: model, not a GPU measurement',
                           provider='fast', smoke=device.type != 'cuda')
                rows.append(row)
                if progress:
                    progress(row)
    return rows


def run_suite(smoke: bool, device: torch.device, providers, progress=None):
    """Entry in the shape of benchmarks/run.py's suites (providers: the paths are
    the suite's providers, all of them always).  No rows without the compiled
    extension (e.g. the Triton-cache warmer's interpreter: nothing to warm)."""
    loaded, why = extension_status()
    if not loaded:
        print(f'sparse_dwconv suite: skipped, the compiled extension is {why}',
              file=sys.stderr)
        return []
    if smoke or device.type != 'cuda':
        return run(2, (0, ), torch.float16, device, warmup=1, iters=2, progress=progress)
    return run(shapes.FCMAE_BATCH, (0, 1, 2, 3), torch.bfloat16, device, warmup=10,
               iters=50, progress=progress)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--smoke', action='store_true', help='tiny CPU run of the C++ twins')
    ap.add_argument('--out', default=None)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print('bench_sparse_dwconv: needs a CUDA device; --smoke runs the C++ twins',
              file=sys.stderr)
        return 2
    device = torch.device('cuda' if cuda else 'cpu')
    meta = common.env_metadata(device)
    meta.update(bench='sparse_dwconv', smoke=args.smoke or not cuda,
                argv=sys.argv[1:] if argv is None else list(argv))
    rows = run_suite(args.smoke, device, None,
                     progress=lambda r: print(f"s{r['stage']} {r['pass']:5s} {r['path']:6s} "
                                              f"{r['median_us']:9.1f} us  model "
                                              f"{r['model_us']:7.1f} us", flush=True))
    print(common.markdown_table(rows, COLUMNS))
    out = args.out or common.results_path(device)
    common.append_results(out, meta, rows)
    print(f'appended to {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
