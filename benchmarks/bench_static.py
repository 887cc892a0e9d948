"""Suite ``static``: every kernel as an H100 would launch it, judged on a CPU.

For each V2-B Mask R-CNN stage shape (``benchmarks.shapes.MASKRCNN_V2B``:
N=2, 1024x1024, C=128..1024; residual stream fp32 at stage 1, bf16 after;
compute dtype bf16) and provider ``fast`` (save) / ``fast_recompute``, the
real host functions ``fused_block_forward`` and ``fused_block_backward`` run
at the real shape under :func:`benchmarks.sm90.capture_launches`: every
Triton launch is specialised and compiled for sm_90 exactly as the JIT would
on the GPU (nothing runs; torch ops are shape-inferred only).  The FCMAE
sparse encoder launches no Triton kernel (its depthwise conv is the CUDA
extension, its other ops are torch); its ``.cu`` kernels (every dtype
instantiation) are compiled for sm_90 with ``nvcc --resource-usage`` and
reported at the FCMAE V2-B shapes (``fcmae_v2b_stages``, visible rows =
``fcmae_visible_fraction()`` of N*H*W).

One row per (shape, provider, phase, kernel, config): launches per block,
programs, num_warps/num_stages, registers, spills, stack, shared memory, H100
occupancy and waves over 132 SMs (limits: ``benchmarks.sm90.H100``), SASS
instruction count and a dynamic per-program estimate, tensor-core use, JIT
time.  A static view from the compiler, not a GPU measurement.

Kernels must be created with ``TRITON_INTERPRET=0``; in an interpreter
process :func:`run_suite` re-runs itself in a subprocess
(``python -m benchmarks.bench_static --json OUT``).  Cubins are cached in
``$CONVNEXTV2_FAST_SM90_CACHE`` (default
``~/.cache/convnextv2_fast/triton-sm90``) so reruns are fast.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

from benchmarks import common, shapes, sm90

SUITE = 'static'
# fast = save mode (V2: no layer scale); fast_recompute; fast_layer_scale =
# save mode with a layer scale (ConvNeXt V1-style configs, layer_scale_init_
# value > 0): r needs a grad, so the backward launches the dr variants
# value > 0): r needs a grad, so the backward launches the dr variants; the
# fast_mlp* providers are the same three with the Triton-GEMM MLP
PROVIDERS = tuple(shapes.FAST_PROVIDERS)
PHASES = ('fwd', 'bwd')
COLUMNS = ['suite', 'shape', 'provider', 'phase', 'kernel', 'config',
           'launches', 'programs', 'num_warps', 'num_stages', 'regs',
           'spill_store_B', 'spill_load_B', 'stack_B', 'smem_B',
           'programs_per_sm', 'occupancy', 'limiter', 'waves', 'sass_instr',
           'sass_instr_per_program', 'tensor_core', 'compile_s']
CUDA_EXT_PROVIDER = 'cuda_ext'


def block_inputs(shape: shapes.BlockShape, seed: int = 0) -> dict:
    """CPU tensors of one block at ``shape``: x in the stream dtype, fp32
    parameters (as under autocast), r (N, C) fp32.  Values are irrelevant to
    the launch configuration; big ones are left uninitialised."""
    g = torch.Generator().manual_seed(seed)
    N, H, W, C = shape.N, shape.H, shape.W, shape.C
    K = 4 * C

    def p(*s):
        return torch.randn(*s, generator=g) * 0.02

    return dict(
        x=torch.empty((N, H, W, C), dtype=shape.stream_dtype),
        dw_w=p(C, 1, 7, 7), dw_b=p(C), ln_w=1 + p(C), ln_b=p(C),
        w1=p(K, C), b1=p(K), gamma=p(K), beta=p(K), w2=p(C, K), b2=p(C),
        r=torch.ones((N, C)))


_ARGS = ('x', 'dw_w', 'dw_b', 'ln_w', 'ln_b', 'w1', 'b1', 'gamma', 'beta',
         'w2', 'b2', 'r')


def capture_block(shape: shapes.BlockShape, provider: str) -> dict:
    """{'fwd': [Launch...], 'bwd': [Launch...]} of one block at ``shape``
    for ``provider`` (see PROVIDERS)."""
    from convnextv2_fast.ops.fused_block import (backward_inputs,
                                                 fused_block_backward,
                                                 fused_block_forward)
    cfg = shapes.FAST_PROVIDERS[provider]
    save, need_dr, mlp = cfg['save'], cfg['need_dr'], cfg['mlp']
    t = block_inputs(shape)
    args = [t[k] for k in _ARGS]
    cd = shape.compute_dtype
    box = {}

    def fwd():
        box['out'] = fused_block_forward(*args, compute_dtype=cd, save=save,
                                         mlp=mlp)

    def bwd():
        dout = torch.empty_like(box['out'][0])
        # need_dr as training sets it: only with a layer scale
        fused_block_backward(dout, *backward_inputs(args, box['out']),
                             compute_dtype=cd, save=save, need_dr=need_dr,
                             mlp=mlp)

    return dict(fwd=sm90.capture_launches(fwd),
                bwd=sm90.capture_launches(bwd))


def launch_rows(launches, **keys) -> list:
    """Group launches by (kernel, constexprs, signature): one row each."""
    groups = {}
    for L in launches:
        k = (L.kernel, json.dumps(L.constexprs, sort_keys=True),
             json.dumps(L.signature, sort_keys=True))
        groups.setdefault(k, []).append(L)
    rows = []
    for (name, cfg, sig), ls in groups.items():
        L = ls[0]
        r = dict(suite=SUITE, **keys, kernel=name,
                 config=','.join(f'{a}={b}' for a, b in L.constexprs.items()),
                 launches=len(ls), programs=L.programs, grid=list(L.grid),
                 num_warps=L.num_warps, num_stages=L.num_stages,
                 signature=L.signature,
                 compile_s=round(sum(x.compile_s for x in ls), 3))
        r.update({k: v for k, v in L.resources.items()
                  if k not in ('loop_trips', )})
        r['loop_trips'] = L.resources.get('loop_trips')
        r.update(L.occupancy)
        rows.append(r)
    return rows


def _cu_grid_programs(row: dict, shape: shapes.BlockShape, frac: float):
    """Programs/waves of a .cu kernel at an FCMAE stage (visible rows M)."""
    M = int(round(shape.M * frac))
    g = row.get('grid_expr')
    if not g:
        return None
    return sm90.eval_cu_grid(g, dict(M=M, C=shape.C, H=shape.H, W=shape.W))


def cuda_rows(progress=None, stages=None) -> list:
    """.cu kernels at the FCMAE V2-B shapes (resources do not depend on the
    shape; programs and waves do, where the launch grid is evaluable)."""
    frac = shapes.fcmae_visible_fraction()
    base = sm90.cuda_kernel_resources()
    rows = []
    for shape in stages or shapes.fcmae_v2b_stages():
        for b in base:
            r = dict(suite=SUITE, shape=shape.name, provider=CUDA_EXT_PROVIDER,
                     phase='bwd' if ('grad' in b['kernel']
                                     or 'bwd' in b['kernel']) else 'fwd',
                     launches=1, num_stages=None, sass_instr=None,
                     sass_instr_per_program=None, tensor_core=None)
            r.update({k: v for k, v in b.items() if k != 'grid_expr'})
            r['config'] = f"threads={b.get('threads_per_block')}"
            programs = _cu_grid_programs(b, shape, frac)
            r['programs'] = programs
            if programs and r.get('programs_per_sm'):
                r['waves'] = programs / (r['programs_per_sm'] *
                                         sm90.H100['sms'])
            r['visible_rows'] = int(round(shape.M * frac))
            rows.append(r)
            if progress:
                progress(r)
    return rows


def _stages(smoke: bool):
    return [shapes.MASKRCNN_V2B[-1]] if smoke else list(shapes.MASKRCNN_V2B)


def select_providers(providers) -> list:
    """``fast`` selects every static provider (run.py only knows 'fast')."""
    providers = list(providers or PROVIDERS)
    return [p for p in PROVIDERS if p in providers or 'fast' in providers]


def _run_here(smoke, providers, progress=None) -> list:
    rows = []
    for shape in _stages(smoke):
        for prov in select_providers(providers):
            t0 = time.perf_counter()
            cap = capture_block(shape, prov)
            for phase in PHASES:
                for r in launch_rows(cap[phase], shape=shape.name,
                                     provider=prov, phase=phase):
                    r['smoke'] = smoke
                    rows.append(r)
                    if progress:
                        progress(r)
            print(f'static: {shape.name} {prov}: '
                  f'{time.perf_counter() - t0:.1f} s', file=sys.stderr,
                  flush=True)
    fc = shapes.fcmae_v2b_stages()
    try:
        cu = cuda_rows(progress, fc[:1] if smoke else fc)
    except (FileNotFoundError, RuntimeError) as exc:  # no nvcc / toolkit
        print(f'static suite: no .cu rows ({exc})', file=sys.stderr)
        cu = []
    for r in cu:
        r['smoke'] = smoke
        rows.append(r)
    for r in rows:
        r['bench'] = SUITE
    return rows


def run_suite(smoke: bool, device: torch.device, providers, progress=None):
    """Rows of the static suite (CPU only: ``device`` is ignored)."""
    from convnextv2_fast.ops._common import is_interpreter
    if not sm90.have_ptxas():
        print('static suite: skipped, Triton has no ptxas here',
              file=sys.stderr)
        return []
    if not is_interpreter():
        return _run_here(smoke, providers, progress)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'rows.json')
        argv = ['--json', out, '--providers', *select_providers(providers)]
        proc = sm90.run_in_subprocess('benchmarks.bench_static', *argv,
                                      *(['--smoke'] if smoke else []))
        sys.stderr.write(proc.stderr[-4000:])
        if proc.returncode != 0:
            raise RuntimeError(f'static suite subprocess failed:\n'
                               f'{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}')
        with open(out) as f:
            rows = json.load(f)
    for r in rows:
        if progress:
            progress(r)
    return rows


def summary_markdown(rows, providers=('fast', CUDA_EXT_PROVIDER)) -> str:
    """Per kernel x stage: ``regs / spill-store B / occupancy`` for each of
    ``providers`` (the before/after view of the resource gate)."""
    limits = f'Occupancy limits: {sm90.describe_limits()}.'
    return '\n\n'.join([limits] + [
        _summary(rows, p) for p in providers
        if any(r.get('provider') == p for r in rows)])


def _summary(rows, provider):
    rows = [r for r in rows if r.get('provider') == provider]
    stages = list(dict.fromkeys(r['shape'] for r in rows))
    cells = {}
    for r in rows:
        k = (r['phase'], r['kernel'])
        occ = r.get('occupancy')
        cells.setdefault(k, {})[r['shape']] = (
            f"{r['regs']} / {r['spill_store_B']} / "
            f"{'-' if occ is None else f'{occ:.0%}'}")
    lines = [f'{provider}: registers/thread / spill-store bytes / occupancy '
             '(sm_90, H100 limits; compiler output, not a GPU measurement)',
             '', '| phase | kernel | ' + ' | '.join(stages) + ' |',
             '|---|---|' + '---|' * len(stages)]
    for (ph, k), by in cells.items():
        lines.append(f'| {ph} | {k} | ' + ' | '.join(
            by.get(s, '-') for s in stages) + ' |')
    return '\n'.join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--smoke', action='store_true')
    ap.add_argument('--providers', nargs='+', default=list(PROVIDERS))
    ap.add_argument('--json', default=None, help='write the rows here')
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = run_suite(args.smoke, torch.device('cpu'), args.providers)
    print(f'static suite: {len(rows)} rows in {time.perf_counter() - t0:.1f}'
          f' s; H100 limits: {sm90.describe_limits()}', file=sys.stderr)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, default=str)
    else:
        print(common.markdown_table(rows, COLUMNS))
    return 0


if __name__ == '__main__':
    sys.exit(main())
