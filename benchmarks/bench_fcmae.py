"""FCMAE encoder benchmark: sparse (visible sites only) vs dense-masked.

Providers: ``sparse`` (SparseConvNeXtV2.forward_sparse, compiled sparse
dwconv op when built), ``dense_eager`` (dense-masked encoder, the official JAX
formulation) and ``dense_compile`` (the same under ``torch.compile``).  Modes
``fwd`` and ``fwd+bwd`` (backward of a sum over the last stage).  Reports the
median time (CUDA events), img/s and peak memory; rows are appended as JSON
lines to ``benchmarks/results/bench_fcmae.jsonl`` with GPU name, torch
version, git commit and timestamp.

    python benchmarks/bench_fcmae.py                       # V2-B, 224², batch 64 and 16
    python benchmarks/bench_fcmae.py --smoke               # tiny CPU run, rows marked smoke

Without CUDA only ``--smoke`` runs (its numbers say nothing about GPU speed).
"""
import argparse
import datetime
import json
import os
import os.path as osp
import statistics
import subprocess
import sys
import time

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)

from convnextv2_fast._ext import extension_status  # noqa: E402
from convnextv2_fast.models.fcmae import random_patch_mask  # noqa: E402
from convnextv2_fast.models.sparse_encoder import (  # noqa: E402
    SparseConvNeXtV2, dense_masked_encoder_forward)
from convnextv2_fast.sparse.layout import stage_visible_mask  # noqa: E402

AMP = {'none': None, 'fp16': torch.float16, 'bf16': torch.bfloat16}


def _commit():
    try:
        return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT,
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return 'unknown'


def _timeit(fn, iters, warmup, device):
    for _ in range(warmup):
        fn()
    times = []
    if device.type == 'cuda':
        torch.cuda.synchronize()
        for _ in range(iters):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def make_step(provider, mode, enc, x, mask, amp_dtype, compiled_cache):
    device = x.device
    patch = enc.patch_size

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    if provider == 'sparse':

        def run():
            with autocast():
                rows, _ = enc.forward_sparse(x, mask)   # layouts built inside: part of the cost
                return rows[-1]
    else:
        layouts = enc.layouts(x, mask)
        vis = [stage_visible_mask(lay, torch.float32) for lay in layouts]
        fwd = dense_masked_encoder_forward
        if provider == 'dense_compile':
            if 'fn' not in compiled_cache:
                compiled_cache['fn'] = torch.compile(dense_masked_encoder_forward)
            fwd = compiled_cache['fn']

        def run():
            with autocast():
                return fwd(enc, x, vis)[-1]
    del patch

    if mode == 'fwd':

        def step():
            with torch.no_grad():
                run()
    else:

        def step():
            out = run()
            out.float().sum().backward()
            for p in enc.parameters():
                p.grad = None
    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--arch', default='base')
    ap.add_argument('--img', type=int, default=224)
    ap.add_argument('--batch', type=int, nargs='+', default=[64, 16])
    ap.add_argument('--mask-ratio', type=float, default=0.6)
    ap.add_argument('--amp', choices=list(AMP), default='bf16')
    ap.add_argument('--providers', nargs='+',
                    default=['sparse', 'dense_eager', 'dense_compile'])
    ap.add_argument('--modes', nargs='+', default=['fwd', 'fwd+bwd'])
    ap.add_argument('--iters', type=int, default=10)
    ap.add_argument('--warmup', type=int, default=3)
    ap.add_argument('--smoke', action='store_true',
                    help='tiny config (atto, 64², batch 2) that also runs on CPU')
    ap.add_argument('--out', default=osp.join(ROOT, 'benchmarks', 'results',
                                              'bench_fcmae.jsonl'))
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print('bench_fcmae: needs a CUDA device (none found); run with --smoke for '
              'a tiny CPU check of the script.', file=sys.stderr)
        return 2
    if args.smoke:
        args.arch, args.img, args.batch = 'atto', 64, [2]
        args.iters, args.warmup = 2, 1
        if not cuda:
            args.amp = 'none'
            args.providers = [p for p in args.providers if p != 'dense_compile']
    device = torch.device('cuda' if cuda else 'cpu')
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    amp_dtype = AMP[args.amp]
    enc = SparseConvNeXtV2(arch=args.arch).to(device).train()
    meta = dict(
        gpu=torch.cuda.get_device_name() if cuda else 'cpu',
        torch=torch.__version__, commit=_commit(),
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        extension=extension_status()[1], smoke=args.smoke)
    os.makedirs(osp.dirname(args.out), exist_ok=True)
    compiled_cache = {}
    rows = []
    for batch in args.batch:
        g = torch.Generator(device='cpu').manual_seed(0)
        x = torch.randn(batch, 3, args.img, args.img, generator=g).to(device)
        grid = args.img // enc.patch_size
        mask = random_patch_mask(batch, grid, grid, args.mask_ratio, generator=g).to(device)
        for mode in args.modes:
            for provider in args.providers:
                step = make_step(provider, mode, enc, x, mask, amp_dtype, compiled_cache)
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                try:
                    ms = _timeit(step, args.iters, args.warmup, device)
                    err = None
                except torch.cuda.OutOfMemoryError as exc:  # report, keep going
                    ms, err = float('nan'), f'OOM: {exc}'.splitlines()[0]
                peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
                row = dict(bench='fcmae_encoder', arch=args.arch, img=args.img,
                           batch=batch, mask_ratio=args.mask_ratio, amp=args.amp,
                           provider=provider, mode=mode, ms=ms,
                           img_per_s=batch / ms * 1e3 if ms == ms else None,
                           peak_mem_mb=peak, error=err, **meta)
                rows.append(row)
                with open(args.out, 'a') as f:  # row by row: a timeout keeps what ran
                    f.write(json.dumps(row) + '\n')
                print(f'{provider:14s} {mode:8s} b={batch:<4d} {ms:9.2f} ms '
                      f'{row["img_per_s"] or 0:9.1f} img/s '
                      f'peak {peak if peak is not None else float("nan"):9.1f} MiB'
                      + (' (smoke)' if args.smoke else '') + (f' {err}' if err else ''))
    print(f'appended {len(rows)} rows to {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
