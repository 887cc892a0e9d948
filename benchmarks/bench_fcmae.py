"""FCMAE encoder benchmark: sparse (visible sites only) vs dense-masked.

Providers (the suite's common names, :data:`benchmarks.common.PROVIDERS`):

* ``fast``: :meth:`SparseConvNeXtV2.forward_sparse` — compact visible rows,
  the compiled sparse depthwise-conv op (when built), on CUDA the fused block
  tail (``mlp_impl='auto'``: :mod:`convnextv2_fast.sparse.mlp`), layouts built
  inside the timed step (they are part of the cost);
* ``reference``: the dense-masked encoder in eager PyTorch (the official JAX
  formulation: dense compute, mask re-applied), same weights;
* ``compile``: the same dense-masked encoder under ``torch.compile``.

Modes ``fwd`` (no grad) and ``fwd+bwd`` (backward of a sum over the last
stage).  V2-B at 224², mask ratio 0.6, batch 64 and 16, bf16 autocast on GPU.
Reports median ms (CUDA events), img/s, peak memory and the sparse-vs-dense
max error at visible sites; appends a run (metadata + rows) to
``benchmarks/results/<device>-<date>.json`` via :mod:`benchmarks.common`
(GPU name, torch version, commit, timestamp) — one run per (batch, mode), so
an interrupted run keeps what finished.

    python benchmarks/bench_fcmae.py                 # needs CUDA
    python benchmarks/bench_fcmae.py --smoke         # tiny CPU run, marked smoke
"""
import argparse
import os.path as osp
import sys
from typing import List

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402
from convnextv2_fast._ext import extension_status  # noqa: E402
from convnextv2_fast.models.fcmae import random_patch_mask  # noqa: E402
from convnextv2_fast.models.sparse_encoder import (  # noqa: E402
    SparseConvNeXtV2, dense_masked_encoder_forward)
from convnextv2_fast.sparse.layout import stage_visible_mask  # noqa: E402

AMP = {'none': None, 'fp16': torch.float16, 'bf16': torch.bfloat16}
DESC = {'fast': 'sparse (visible rows)', 'reference': 'dense-masked eager',
        'compile': 'dense-masked torch.compile'}
COLUMNS = ['arch', 'N', 'img', 'mode', 'provider', 'median_ms', 'img_per_s',
           'speedup_vs_reference', 'peak_alloc_gib', 'max_err_out']


def _forward_fn(provider, enc, x, mask, amp_dtype, cache):
    """A no-arg function returning the last-stage output (rows or dense map)."""
    device = x.device

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    if provider == 'fast':

        def run():
            with autocast():
                rows, _ = enc.forward_sparse(x, mask)
            return rows[-1]
        return run
    layouts = enc.layouts(x, mask)
    vis = [stage_visible_mask(lay, torch.float32) for lay in layouts]
    fwd = dense_masked_encoder_forward
    if provider == 'compile':
        fwd = cache.setdefault('compiled', torch.compile(dense_masked_encoder_forward))

    def run():
        with autocast():
            return fwd(enc, x, vis)[-1]
    return run


def _step_fn(run, mode, enc):
    if mode == 'fwd':

        def step():
            with torch.no_grad():
                run()
    else:

        def step():
            run().float().sum().backward()
            for p in enc.parameters():
                p.grad = None
    return step


def run(arch, img, batches, providers, device, modes=('fwd', 'fwd+bwd'),
        mask_ratio=0.6, amp='bf16', warmup=3, iters=10, progress=None,
        out=None, meta=None) -> List[dict]:
    amp_dtype = AMP[amp]
    enc = SparseConvNeXtV2(arch=arch).to(device).train()
    cache, all_rows = {}, []
    arch_name = arch if isinstance(arch, str) else 'custom'
    for n in batches:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 3, img, img, generator=g).to(device)
        grid = img // enc.patch_size
        mask = random_patch_mask(n, grid, grid, mask_ratio, generator=g).to(device)
        layouts = enc.layouts(x, mask)
        # correctness of the fast path against the eager dense-masked reference
        with torch.no_grad():
            sparse_out = _forward_fn('fast', enc, x, mask, amp_dtype, cache)().float()
            dense_out = _forward_fn('reference', enc, x, mask, amp_dtype, cache)()
            dense_rows = dense_out.float().permute(0, 2, 3, 1).reshape(
                -1, dense_out.shape[1]).index_select(0, layouts[-1].site_long())
            fast_err = (sparse_out - dense_rows).abs().max().item()
        del sparse_out, dense_out, dense_rows
        for mode in modes:
            rows = []
            for provider in providers:
                row = dict(bench='fcmae_encoder', arch=arch_name, N=n, img=img,
                           mask_ratio=mask_ratio, mode=mode, provider=provider,
                           model=DESC[provider], dtype=f'{amp}-autocast'
                           if amp_dtype is not None else 'fp32',
                           visible_fraction=layouts[0].num_rows /
                           layouts[0].nbr.numel(),
                           extension=extension_status()[1])
                if provider == 'fast':
                    row['max_err_out'] = fast_err
                step = _step_fn(_forward_fn(provider, enc, x, mask, amp_dtype, cache),
                                mode, enc)
                try:
                    with common.peak_memory(device, row):
                        row.update(common.time_fn(step, device, warmup, iters))
                    row['img_per_s'] = n / (row['median_ms'] / 1e3)
                except torch.cuda.OutOfMemoryError as exc:
                    row.update(median_ms=None, img_per_s=None,
                               error=f'OOM: {str(exc).splitlines()[0]}')
                    torch.cuda.empty_cache()
                rows.append(row)
                if progress:
                    progress(row)
            common.add_speedups(rows, key=('arch', 'N', 'img', 'mode'))
            if out:
                common.append_results(out, meta or {}, rows)
            all_rows += rows
    return all_rows


def run_suite(smoke: bool, device: torch.device, providers, progress=None):
    """Entry in the shape of benchmarks/run.py's suites."""
    if smoke:
        return run('atto', 64, [2], providers, device, amp='none', progress=progress,
                   **common.iteration_budget(True))
    return run('base', 224, [64, 16], providers, device, progress=progress,
               **common.iteration_budget(False))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--arch', default='base')
    ap.add_argument('--img', type=int, default=224)
    ap.add_argument('--batch', type=int, nargs='+', default=[64, 16])
    ap.add_argument('--mask-ratio', type=float, default=0.6)
    ap.add_argument('--amp', choices=list(AMP), default='bf16')
    ap.add_argument('--providers', nargs='+', default=['fast', 'reference', 'compile'],
                    choices=list(common.PROVIDERS))
    ap.add_argument('--modes', nargs='+', default=['fwd', 'fwd+bwd'],
                    choices=['fwd', 'fwd+bwd'])
    ap.add_argument('--iters', type=int, default=None)
    ap.add_argument('--warmup', type=int, default=None)
    ap.add_argument('--smoke', action='store_true',
                    help='tiny config (atto, 64², batch 2, fp32) that also runs on CPU')
    ap.add_argument('--out', default=None,
                    help='results JSON (default benchmarks/results/<device>-<date>.json)')
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print('bench_fcmae: needs a CUDA device (none found); run with --smoke for '
              'a tiny CPU check of the script.', file=sys.stderr)
        return 2
    device = torch.device('cuda' if cuda else 'cpu')
    budget = common.iteration_budget(args.smoke)
    warmup = budget['warmup'] if args.warmup is None else args.warmup
    iters = budget['iters'] if args.iters is None else args.iters
    if args.smoke:
        args.arch, args.img, args.batch = 'atto', 64, [2]
        if not cuda:
            args.amp = 'none'
            args.providers = [p for p in args.providers if p != 'compile']
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    meta = common.env_metadata(device)
    meta.update(bench='fcmae_encoder', smoke=args.smoke, argv=sys.argv[1:] if argv is None
                else list(argv))
    out = args.out or common.results_path(device)

    def progress(r):
        print(f"{r['provider']:10s} {r['mode']:8s} N={r['N']:<4d} "
              f"{r.get('median_ms') or float('nan'):9.2f} ms "
              f"{r.get('img_per_s') or 0:9.1f} img/s "
              f"peak {r.get('peak_alloc_gib') or float('nan'):7.2f} GiB"
              + (' (smoke)' if args.smoke else ''), flush=True)

    rows = run(args.arch, args.img, args.batch, args.providers, device,
               modes=args.modes, mask_ratio=args.mask_ratio, amp=args.amp,
               warmup=warmup, iters=iters, progress=progress, out=out, meta=meta)
    print(common.markdown_table(rows, COLUMNS))
    print(f'results appended to {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
