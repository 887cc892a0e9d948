"""Memory suite: bytes saved for backward and peak live tensor bytes of the
whole V2-B backbone at the real shape, with no compute (``FakeTensorMode``).

Model: ``ConvNeXtV2Fast(arch='base', out_indices=[0, 1, 2, 3],
drop_path_rate=0.4, layer_scale_init_value=0., use_grn=True,
gap_before_final_norm=False)`` (the seed Mask R-CNN backbone), train mode,
bf16 autocast, input N x 3 x 1024 x 1024.  Tensors are fake CPU tensors and
CPU autocast follows CUDA autocast's policy (``CudaAutocastOnCpu``: the
autograd engine cannot run a backward on fake CUDA tensors without a CUDA
device; tests/test_memory_suite.py checks that the forward's op-by-op dtypes
and shapes equal a fake-CUDA forward's).  The fused path is selected as the
Triton interpreter would select it on a CPU (no kernel runs: the custom ops
``convnextv2_fast::block_fwd/block_bwd`` have fake implementations).
N = 2 (the issue's shape) and 4 (the seed's images per GPU).  Providers:
``reference`` (eager mmpretrain op order), ``fast`` (fused, save mode),
``fast_recompute``; each with ``with_cp`` False and True.

Columns (MiB = 2**20 bytes; exact tensor storage bytes, not a GPU
measurement: no allocator rounding/caching, no cuBLAS/cuDNN workspace, and a
fused custom op counts its outputs, not the workspace it frees inside):
  saved_MiB               storages autograd packs for backward (hooks;
                          parameters and the input image excluded; under
                          ``with_cp`` the checkpointed blocks keep their
                          inputs alive outside autograd's packs: see
                          ``act_end_fwd_MiB``)
  saved_B_per_block_elem  saved bytes / sum over blocks of N*H*W*C
  act_end_fwd_MiB         live bytes at the end of forward (everything the
                          forward left alive: saved activations + outputs)
  peak_fwd_MiB            peak live bytes during forward
  peak_fwdbwd_MiB         peak live bytes over forward + backward (param
                          grads included, outputs' grads supplied as ones)
  params_MiB              parameter bytes (fp32), not in the peaks
Block rows (``model='block'``, one per V2-B stage shape of
``benchmarks/shapes.py``, bf16 stream and compute, fake tensors): bytes saved
for backward per block element of one block, the block input included (the
fused op keeps it: it is the residual stream).  Gate (issue 8 section 3):
the fused block keeps no more than today's 13.7 B/elem (save) and 2.7
(recompute) -- :data:`SAVED_GATE`, :func:`saved_gate_violations`.
Smoke: atto at 64x64 (N=2, 4) and the block rows at 1/8 of the spatial size.
"""
import contextlib
import os

import torch

from convnextv2_fast.testing.memory import (CudaAutocastOnCpu, LiveTensorBytes,
                                            SavedTensorBytes)

PROVIDERS = ('reference', 'fast', 'fast_recompute')
COLUMNS = ['model', 'shape', 'size', 'N', 'provider', 'with_cp', 'saved_MiB',
           'saved_B_per_block_elem', 'act_end_fwd_MiB', 'peak_fwd_MiB',
           'peak_fwdbwd_MiB', 'params_MiB']
FULL = dict(model='v2b', arch='base', size=1024, batches=(2, 4))
SMOKE = dict(model='atto', arch='atto', size=64, batches=(2, 4))
MiB = 2.**20
# bytes saved for backward per block element of one fused block, 16-bit
# stream (today's values: tests/test_fused_block.py::test_recompute_saved_bytes)
SAVED_GATE = {'fast': 13.7, 'fast_recompute': 2.7}


def build_backbone(arch: str, drop_path_rate: float = 0.4):
    """The seed config's backbone (real, CPU, not initialised)."""
    from convnextv2_fast.models import ConvNeXtV2Fast
    return ConvNeXtV2Fast(arch=arch, out_indices=[0, 1, 2, 3],
                          drop_path_rate=drop_path_rate,
                          layer_scale_init_value=0., use_grn=True,
                          gap_before_final_norm=False, init_cfg=None)


def set_provider(model, provider: str, with_cp: bool) -> None:
    model.set_impl('reference' if provider == 'reference' else 'triton')
    for b in model.blocks():
        b.fused_recompute = provider == 'fast_recompute'
        b.with_cp = with_cp


def block_elements(model, N: int, size: int) -> int:
    """Sum over all blocks of N*H*W*C (stage s runs at size / 4 / 2**s)."""
    return sum(len(stage) * N * (size // (4 * 2**i))**2 * C
               for i, (stage, C) in enumerate(zip(model.stages,
                                                  model.channels)))


def measure(model, N: int, size: int, device, amp_dtype=torch.bfloat16):
    """One training step's memory (forward, then backward with ones as the
    outputs' grads) -> dict of byte counts.  Works on real tensors and inside
    ``FakeTensorMode`` (then ``model`` and ``device`` are fake/any)."""
    params = list(model.parameters())
    for p in params:
        p.grad = None
    x = torch.empty(N, model.in_channels, size, size, device=device).normal_()
    with LiveTensorBytes(exclude=params + [x]) as live:
        with SavedTensorBytes(exclude=params + [x]) as saved:
            with torch.autocast(device.type, dtype=amp_dtype,
                                enabled=amp_dtype is not None):
                outs = model(x)
        act_end_fwd = live.live
        peak_fwd = live.mark()
        grads = [torch.ones_like(o) for o in outs]
        torch.autograd.backward(outs, grads)
        del outs, grads
        peak_bwd = live.mark()
    for p in params:
        p.grad = None
    return dict(saved=saved.bytes, act_end_fwd=act_end_fwd,
                peak_fwd=peak_fwd, peak_fwdbwd=max(peak_fwd, peak_bwd),
                params=sum(p.numel() * p.element_size() for p in params))


def fake_copy(model, fake_mode, device='cpu'):
    """Replace every parameter and buffer of (real, CPU) ``model`` by a fake
    tensor of the same shape/dtype on ``device`` ('cuda' needs no CUDA device
    for a forward; a backward does).  Call it outside ``fake_mode``."""
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for name, t in list(store.items()):
                if t is None:
                    continue
                fake = fake_mode.from_tensor(t.detach())
                with fake_mode:
                    fake = fake.to(device)
                store[name] = torch.nn.Parameter(
                    fake, requires_grad=t.requires_grad) if isinstance(
                        t, torch.nn.Parameter) else fake
    return model


@contextlib.contextmanager
def fused_path_on_cpu():
    """``impl='triton'`` resolves to the fused path for CPU tensors only
    under ``TRITON_INTERPRET=1``; set it while fake tensors run (no kernel
    launches), restore it after.  The kernels are imported first, so they
    are created as the process's setting says (compiled on a GPU machine)."""
    import convnextv2_fast.ops.fused_block  # noqa: F401
    old = os.environ.get('TRITON_INTERPRET')
    os.environ['TRITON_INTERPRET'] = '1'
    try:
        yield
    finally:
        if old is None:
            del os.environ['TRITON_INTERPRET']
        else:
            os.environ['TRITON_INTERPRET'] = old


def summary_markdown(rows) -> str:
    """What the numbers are (run.py puts it above the table)."""
    return ('Exact tensor storage bytes of one training step under '
            'FakeTensorMode at the real shape (bf16 autocast, CUDA policy) '
            '-- counted, not a GPU measurement: no allocator rounding or '
            'caching, no cuBLAS/cuDNN workspace, a fused custom op counts its '
            'outputs, not its internal workspace.  MiB = 2**20 B; '
            'saved_B_per_block_elem = saved bytes / sum over blocks of '
            'N*H*W*C.')


def block_saved_bytes(shape, provider: str) -> int:
    """Bytes one V2-B block (``shape``: a ``benchmarks.shapes.BlockShape``)
    saves for backward, its input included, under fake tensors in the
    shape's compute dtype (autocast) and stream dtype."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from convnextv2_fast.models import ConvNeXtV2Block
    blk = ConvNeXtV2Block(shape.C, use_grn=True, layer_scale_init_value=0.,
                          drop_path_rate=0.1, impl='reference').train()
    fake_mode = FakeTensorMode()
    fake_copy(blk, fake_mode)
    blk.impl = 'reference' if provider == 'reference' else 'triton'
    blk.fused_recompute = provider == 'fast_recompute'
    with fake_mode, CudaAutocastOnCpu(), fused_path_on_cpu():
        x = torch.empty(shape.N, shape.C, shape.H, shape.W,
                        dtype=shape.stream_dtype).contiguous(
                            memory_format=torch.channels_last)
        x.requires_grad_()
        with SavedTensorBytes(exclude=list(blk.parameters()) + [x]) as saved:
            with torch.autocast('cpu', dtype=shape.compute_dtype):
                blk(x)
    return saved.bytes + x.numel() * x.element_size()


def block_rows(shapes, providers, progress=None):
    rows = []
    for shape in shapes:
        for provider in providers:
            b = block_saved_bytes(shape, provider)
            row = dict(bench='memory', suite='memory', model='block',
                       shape=shape.name, N=shape.N, provider=provider,
                       with_cp=False, dtype=str(shape.stream_dtype).replace(
                           'torch.', ''), saved_MiB=b / MiB,
                       saved_B_per_block_elem=b / shape.E,
                       note='exact storage bytes under FakeTensorMode, not a '
                       'GPU measurement')
            rows.append(row)
            if progress:
                progress(row)
    return rows


def saved_gate_violations(rows):
    """Block rows with a 16-bit stream whose saved bytes per block element
    exceed :data:`SAVED_GATE` for their provider (``reference`` is held to
    the ``fast`` limit: the gate must reject it)."""
    bad = []
    for r in rows:
        if r.get('model') != 'block' or r['dtype'] not in ('bfloat16',
                                                             'float16'):
            continue
        limit = SAVED_GATE.get(r['provider'], SAVED_GATE['fast'])
        if r['saved_B_per_block_elem'] > limit:
            bad.append((r['shape'], r['provider'], r['saved_B_per_block_elem'],
                        limit))
    return bad


def rows_for(cfg, providers, with_cps=(False, True), progress=None):
    from torch._subclasses.fake_tensor import FakeTensorMode
    model = build_backbone(cfg['arch']).train()
    rows = []
    fake_mode = FakeTensorMode()
    fake_copy(model, fake_mode)
    device = torch.device('cpu')
    with fake_mode, CudaAutocastOnCpu(), fused_path_on_cpu():
        for N in cfg['batches']:
            elems = block_elements(model, N, cfg['size'])
            for provider in providers:
                for with_cp in with_cps:
                    set_provider(model, provider, with_cp)
                    m = measure(model, N, cfg['size'], device)
                    row = dict(bench='memory', suite='memory',
                               model=cfg['model'], shape=f"{cfg['size']}-all",
                               size=cfg['size'], N=N,
                               provider=provider, with_cp=with_cp,
                               dtype='bf16-autocast',
                               saved_MiB=m['saved'] / MiB,
                               saved_B_per_block_elem=m['saved'] / elems,
                               act_end_fwd_MiB=m['act_end_fwd'] / MiB,
                               peak_fwd_MiB=m['peak_fwd'] / MiB,
                               peak_fwdbwd_MiB=m['peak_fwdbwd'] / MiB,
                               params_MiB=m['params'] / MiB,
                               block_elems=elems,
                               note='exact storage bytes under FakeTensorMode'
                               ', not a GPU measurement')
                    rows.append(row)
                    if progress:
                        progress(row)
    return rows


def run_suite(smoke: bool, device: torch.device, providers, progress=None):
    """Entry used by benchmarks/run.py.  Runs on any machine (fake tensors);
    ``device`` is ignored.  ``fast`` brings its recompute variant along."""
    from benchmarks.shapes import MASKRCNN_V2B
    provs = [p for p in PROVIDERS if p in providers or (
        p == 'fast_recompute' and 'fast' in providers)]
    shapes = [s.scaled(s.H // 8, s.W // 8) if smoke else s
              for s in MASKRCNN_V2B]
    return (rows_for(SMOKE if smoke else FULL, provs, progress=progress) +
            block_rows(shapes, provs, progress))


if __name__ == '__main__':
    import sys

    from benchmarks import common
    smoke = '--smoke' in sys.argv
    rows = run_suite(smoke, torch.device('cpu'), PROVIDERS,
                     progress=lambda r: print(r, flush=True))
    print(common.markdown_table(rows, COLUMNS))
