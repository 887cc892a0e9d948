"""One ConvNeXt V2 block: reference vs torch.compile vs the fused Triton ops.

Providers (same weights, GRN gamma/beta non-zero, no layer scale, drop 0):
  reference         ConvNeXtV2Block(impl='reference') eager (= ops.reference
                    math, mmpretrain op order)
  compile           torch.compile of that reference block
  fast              ConvNeXtV2Block(impl='triton'), save mode
  fast_recompute    the same with ``fused_recompute=True``
  fast_mlp          ``impl='triton'`` with the Triton-GEMM MLP
                    (``fused_mlp='triton'``, ops/mlp_gemm.py), save mode
Modes ``fwd`` (no grad) and ``fwd+bwd``; the residual stream is bf16 and the
block runs under bf16 autocast (stages 1-3 of the mmdet AMP setup; the seed
config's AmpOptimWrapper default is fp16, ``--dtype fp16`` selects it).

Shapes: the four V2-B stage shapes at 1024x1024 with N=2 and a 224x224
classification batch (N=64, stage 1).  Each row: median CUDA-event time,
achieved GB/s and TFLOP/s on stated models (bytes: the block's compulsory
I/O -- x and out, plus dout and dx for fwd+bwd -- in the stream dtype;
FLOPs: 2*49*E for the dwconv and 16*E*C for pw1+pw2, x3 for fwd+bwd), peak
memory above the inputs, saved-activation bytes (saved_tensors_hooks,
parameters excluded) and per-element, max error vs the reference.

Usage:
  python benchmarks/bench_block.py            # needs CUDA
  python benchmarks/bench_block.py --smoke    # tiny CPU run (Triton
                                              # interpreter), rows marked smoke
  python benchmarks/bench_block.py --table    # markdown from stored rows
  pytest benchmarks/bench_block.py            # pytest-benchmark (CUDA only)
Runs are appended to ``benchmarks/results/<device>-<date>.json`` (the
suite's common format, see ``benchmarks/common.py``).
"""
import argparse
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == '__main__':  # script use: make `benchmarks` and the repo importable
    sys.path.insert(0, os.path.dirname(_HERE))
    if '--smoke' in sys.argv:
        os.environ.setdefault('TRITON_INTERPRET', '1')

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from convnextv2_fast.models import ConvNeXtV2Block  # noqa: E402
from convnextv2_fast.testing import max_abs_err  # noqa: E402
from convnextv2_fast.testing.memory import SavedTensorBytes  # noqa: E402

PROVIDERS = ('reference', 'compile', 'fast', 'fast_recompute', 'fast_mlp')
FAST = {'fast': dict(fused_recompute=False, fused_mlp='cublas'),
        'fast_recompute': dict(fused_recompute=True, fused_mlp='cublas'),
        'fast_mlp': dict(fused_recompute=False, fused_mlp='triton')}
MODES = ('fwd', 'fwd+bwd')
# (name, N, C, H, W)
SHAPES = [('1024-s1', 2, 128, 256, 256), ('1024-s2', 2, 256, 128, 128),
          ('1024-s3', 2, 512, 64, 64), ('1024-s4', 2, 1024, 32, 32),
          ('224-b64-s1', 64, 128, 56, 56)]
SMOKE_SHAPES = [('smoke', 2, 16, 12, 10)]
COLUMNS = ['shape', 'N', 'C', 'H', 'W', 'mode', 'provider', 'median_ms',
           'GBps', 'TFLOPs', 'speedup_vs_reference', 'peak_above_base_gib',
           'saved_MiB', 'saved_B_per_elem', 'max_err_out', 'smoke']
DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16,
          'fp32': torch.float32}


def make_block(C, provider, seed=0):
    torch.manual_seed(seed)
    blk = ConvNeXtV2Block(C, use_grn=True, layer_scale_init_value=0.,
                          impl='reference')
    with torch.no_grad():
        blk.grn.gamma.normal_(0., 0.5)
        blk.grn.beta.normal_(0., 0.5)
    if provider in FAST:
        blk.impl = 'triton'
        for k, v in FAST[provider].items():
            setattr(blk, k, v)
    return blk


def model_bytes_flops(N, C, H, W, mode, elem_size):
    E = N * C * H * W
    io = (2 if mode == 'fwd' else 4) * E * elem_size
    flops = 2 * 49 * E + 16 * E * C
    return io, flops * (1 if mode == 'fwd' else 3)


def _step(block, x, mode, amp_dtype, grad):
    with torch.autocast(x.device.type, dtype=amp_dtype,
                        enabled=amp_dtype is not None):
        if mode == 'fwd':
            with torch.no_grad():
                return block(x)
        y = block(x)
    y.backward(grad)
    return y


def bench_one(shape, provider, mode, device, dtype, amp_dtype, warmup=5,
              iters=20):
    name, N, C, H, W = shape
    blk = make_block(C, provider).to(device)
    blk.train()
    module = torch.compile(blk) if provider == 'compile' else blk
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, C, H, W, generator=gen).to(device, dtype).contiguous(
        memory_format=torch.channels_last)
    grad = torch.randn(N, C, H, W, generator=gen).to(device, dtype)
    x = x.requires_grad_(mode == 'fwd+bwd')
    row = dict(bench='block', shape=name, N=N, C=C, H=H, W=W, mode=mode,
               provider=provider, dtype=str(dtype).replace('torch.', ''),
               autocast=str(amp_dtype).replace('torch.', '')
               if amp_dtype else None)
    out = _step(module, x, mode, amp_dtype, grad)  # warm / compile
    row['out'] = out.detach().float()
    if mode == 'fwd+bwd':
        with SavedTensorBytes(exclude=list(blk.parameters())) as saved:
            with torch.autocast(device.type, dtype=amp_dtype,
                                enabled=amp_dtype is not None):
                y = module(x)
        del y
        row['saved_MiB'] = saved.bytes / 2**20
        row['saved_B_per_elem'] = saved.bytes / x.numel()

    def fn():
        _step(module, x, mode, amp_dtype, grad)
        if mode == 'fwd+bwd':
            blk.zero_grad(set_to_none=True)
            x.grad = None

    with common.peak_memory(device, row):
        row.update(common.time_fn(fn, device, warmup, iters))
    io, flops = model_bytes_flops(N, C, H, W, mode, x.element_size())
    sec = row['median_ms'] / 1e3
    row['GBps'] = io / sec / 1e9
    row['TFLOPs'] = flops / sec / 1e12
    return row


def run(shapes, providers, modes, device, dtype, amp_dtype, warmup=5,
        iters=20, smoke=False, progress=None):
    rows = []
    for shape in shapes:
        for mode in modes:
            ref_out = None
            for provider in providers:
                row = bench_one(shape, provider, mode, device, dtype,
                                amp_dtype, warmup, iters)
                out = row.pop('out')
                if provider == 'reference':
                    ref_out = out
                elif ref_out is not None:
                    row['max_err_out'] = max_abs_err(out, ref_out)
                row['smoke'] = smoke
                rows.append(row)
                if progress:
                    progress(row)
                if device.type == 'cuda':
                    torch.cuda.empty_cache()
    common.add_speedups(rows, key=('shape', 'mode'))
    return rows


def run_suite(smoke: bool, device: torch.device, providers, progress=None):
    """Entry used by benchmarks/run.py: bf16 autocast on CUDA (fp32 in the
    smoke run); 'fast' also runs its recompute and Triton-MLP variants."""
    providers = list(providers) + (['fast_recompute', 'fast_mlp']
                                   if 'fast' in providers else [])
    if smoke:
        return run(SMOKE_SHAPES, providers, MODES, device, torch.float32,
                   None, smoke=True, progress=progress,
                   **common.iteration_budget(True))
    return run(SHAPES, providers, MODES, device, torch.bfloat16,
               torch.bfloat16, progress=progress,
               **common.iteration_budget(False))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--smoke', action='store_true',
                   help='tiny CPU run through the Triton interpreter')
    p.add_argument('--providers', nargs='+', default=None,
                   choices=PROVIDERS)
    p.add_argument('--modes', nargs='+', default=list(MODES), choices=MODES)
    p.add_argument('--shapes', nargs='+', default=None,
                   help='subset of shape names: ' +
                   ' '.join(s[0] for s in SHAPES))
    p.add_argument('--dtype', default='bf16', choices=sorted(DTYPES))
    p.add_argument('--iters', type=int, default=20)
    p.add_argument('--results-dir', default=None)
    p.add_argument('--table', action='store_true',
                   help='print the markdown table of the stored rows and exit')
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device('cuda' if cuda else 'cpu')
    path = common.results_path(device)
    if args.results_dir:
        path = os.path.join(args.results_dir, os.path.basename(path))
    if args.table:
        print(common.render_runs(common.load_runs(path), COLUMNS))
        return 0
    if not cuda and not args.smoke:
        print('bench_block.py needs a CUDA GPU (full-size shapes). On this '
              'machine run `python benchmarks/bench_block.py --smoke` for a tiny '
              'CPU check of the code path (Triton interpreter).')
        return 2
    if args.smoke:
        if not cuda:
            os.environ.setdefault('TRITON_INTERPRET', '1')
        shapes = SMOKE_SHAPES
        providers = args.providers or ['reference', 'fast', 'fast_recompute',
                                       'fast_mlp']
        dtype, amp = torch.float32, None
        warmup, iters = 1, 2
    else:
        shapes = [s for s in SHAPES if not args.shapes or s[0] in args.shapes]
        providers = args.providers or list(PROVIDERS)
        dtype = DTYPES[args.dtype]
        amp = dtype if dtype != torch.float32 else None
        warmup, iters = 5, args.iters
    rows = run(shapes, providers, args.modes, device, dtype, amp, warmup,
               iters, smoke=args.smoke,
               progress=lambda r: print(
                   f"{r['shape']:>11} {r['mode']:>8} {r['provider']:>15} "
                   f"{r['median_ms']:9.3f} ms", flush=True))
    meta = common.env_metadata(device)
    meta.update(smoke=args.smoke, bench='block')
    common.append_results(path, meta, rows)
    print(common.markdown_table(rows, COLUMNS))
    print(f'run appended to {path}')
    return 0


# --------------------------------------------------------------------------
# pytest-benchmark entry (CUDA only; skipped at run time, not collection)
# --------------------------------------------------------------------------
try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    @pytest.fixture
    def cuda_device():
        if not torch.cuda.is_available():
            pytest.skip('bench_block needs a CUDA device')
        return torch.device('cuda')

    @pytest.mark.parametrize('shape', SHAPES, ids=[s[0] for s in SHAPES])
    @pytest.mark.parametrize('mode', MODES)
    @pytest.mark.parametrize('provider', PROVIDERS)
    def test_block_bench(benchmark, cuda_device, shape, mode, provider):
        name, N, C, H, W = shape
        blk = make_block(C, provider).to(cuda_device)
        module = torch.compile(blk) if provider == 'compile' else blk
        x = torch.randn(N, C, H, W, device=cuda_device,
                        dtype=torch.bfloat16).contiguous(
                            memory_format=torch.channels_last)
        x.requires_grad_(mode == 'fwd+bwd')
        grad = torch.randn_like(x)

        def fn():
            _step(module, x, mode, torch.bfloat16, grad)
            torch.cuda.synchronize()

        fn()
        benchmark(fn)


if __name__ == '__main__':
    sys.exit(main())
