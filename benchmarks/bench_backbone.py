"""The ConvNeXt V2 backbone alone: reference vs torch.compile vs fast.

Providers (same random weights, GRN parameters non-zero):
  reference  mmpretrain.ConvNeXt eager (our reference path if mmpretrain is
             missing — numerically the same ops)
  compile    torch.compile of the reference
  fast       ConvNeXtV2Fast with impl='auto' (fused Triton blocks on CUDA; on
             CPU, impl='triton' in the Triton interpreter when TRITON_INTERPRET=1)
Modes fwd (no grad) and fwd+bwd; under fp16 autocast on CUDA (the mmdet
AmpOptimWrapper default), fp32 on CPU.  Each fast row also records its max
error against the reference (outputs and, for fwd+bwd, input gradients).
"""
import argparse
import copy
from typing import List

import torch

from benchmarks import common
from convnextv2_fast import ConvNeXtV2Fast
from convnextv2_fast.impl import fused_status, is_interpreter
from convnextv2_fast.testing import max_abs_err, randomize_
from convnextv2_fast.testing.memory import SavedTensorBytes

FULL_CASES = [  # (arch, N, H, W)
    ('base', 2, 1024, 1024), ('base', 4, 1024, 1024),
    ('base', 64, 224, 224), ('base', 128, 224, 224)]
SMOKE_ARCH = dict(depths=[1, 1, 2, 1], channels=[16, 32, 48, 64])
SMOKE_CASES = [(SMOKE_ARCH, 2, 64, 96)]


def backbone_kwargs(arch):
    return dict(arch=copy.deepcopy(arch), out_indices=[0, 1, 2, 3],
                drop_path_rate=0., layer_scale_init_value=0.,
                gap_before_final_norm=False, use_grn=True)


def reference_model(arch):
    try:
        from mmpretrain.models import ConvNeXt
        return ConvNeXt(**backbone_kwargs(arch)), 'mmpretrain.ConvNeXt'
    except ImportError:
        return (ConvNeXtV2Fast(impl='reference', **backbone_kwargs(arch)),
                'ConvNeXtV2Fast(reference)')


def fast_impl(device):
    if device.type == 'cuda':
        return 'auto'
    ok, _ = fused_status()
    return 'triton' if ok and is_interpreter() else 'reference'


def build(provider, arch, device, seed=0):
    """(model, description) for one provider; identical weights."""
    ref, name = reference_model(arch)
    randomize_(ref, seed)
    if provider == 'reference':
        return ref.to(device), name
    if provider == 'compile':
        return torch.compile(ref.to(device)), f'torch.compile({name})'
    impl = fast_impl(device)
    fast = ConvNeXtV2Fast(impl=impl, **backbone_kwargs(arch))
    fast.load_state_dict(ref.state_dict(), strict=True)
    return fast.to(device), f'ConvNeXtV2Fast(impl={impl!r})'


def _step(model, x, mode, amp):
    with torch.autocast(x.device.type, dtype=torch.float16, enabled=amp):
        if mode == 'fwd':
            with torch.no_grad():
                return model(x), None
        x = x.detach().requires_grad_(True)
        outs = model(x)
        loss = sum(o.float().square().mean() for o in outs)
    loss.backward()
    return outs, x.grad


def run(cases, providers, device, modes=('fwd', 'fwd+bwd'), warmup=3,
        iters=10, progress=None) -> List[dict]:
    amp = device.type == 'cuda'
    rows = []
    for arch, n, h, w in cases:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n, 3, h, w, generator=gen).to(device)
        arch_name = arch if isinstance(arch, str) else 'tiny-smoke'
        ref_outputs = {}
        for provider in providers:
            model, desc = build(provider, arch, device)
            model.train()  # training-mode backbone, drop path 0
            for mode in modes:
                row = dict(bench='backbone', arch=arch_name, N=n, H=h, W=w,
                           mode=mode, provider=provider, model=desc,
                           dtype='fp16-autocast' if amp else 'fp32')
                outs, gx = _step(model, x, mode, amp)
                if provider == 'reference':
                    ref_outputs[mode] = ([o.detach().float() for o in outs],
                                         gx)
                elif mode in ref_outputs:
                    ref_outs, ref_gx = ref_outputs[mode]
                    row['max_err_out'] = max(
                        max_abs_err(a, b) for a, b in zip(ref_outs, outs))
                    if gx is not None:
                        row['max_err_input_grad'] = max_abs_err(ref_gx, gx)
                model.zero_grad(set_to_none=True)
                del outs, gx
                if mode == 'fwd+bwd':
                    with SavedTensorBytes(
                            exclude=list(model.parameters())) as saved:
                        with torch.autocast(device.type, torch.float16,
                                            enabled=amp):
                            outs = model(x.detach().requires_grad_(True))
                    del outs
                    row['saved_MiB'] = saved.bytes / 2**20

                def fn():
                    _step(model, x, mode, amp)
                    if mode == 'fwd+bwd':
                        model.zero_grad(set_to_none=True)

                with common.peak_memory(device, row):
                    row.update(common.time_fn(fn, device, warmup, iters))
                row['img_per_s'] = n / (row['median_ms'] / 1e3)
                rows.append(row)
                if progress:
                    progress(row)
            del model
            if device.type == 'cuda':
                torch.cuda.empty_cache()
    common.add_speedups(rows, key=('arch', 'N', 'H', 'W', 'mode'))
    return rows


COLUMNS = ['arch', 'N', 'H', 'W', 'mode', 'provider', 'median_ms',
           'img_per_s', 'speedup_vs_reference', 'peak_alloc_gib', 'saved_MiB',
           'max_err_out', 'max_err_input_grad']


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--smoke', action='store_true')
    parser.add_argument('--providers', nargs='+', default=list(
        common.PROVIDERS))
    parser.add_argument('--iters', type=int, default=10)
    args = parser.parse_args(argv)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    rows = run(SMOKE_CASES if args.smoke else FULL_CASES, args.providers,
               device, iters=args.iters)
    print(common.markdown_table(rows, COLUMNS))


if __name__ == '__main__':
    main()


def run_suite(smoke: bool, device: torch.device, providers, progress=None):
    """Entry used by benchmarks/run.py."""
    cases = SMOKE_CASES if smoke else FULL_CASES
    return run(cases, providers, device, progress=progress,
               **common.iteration_budget(smoke))
