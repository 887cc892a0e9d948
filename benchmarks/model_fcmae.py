"""Encoder-level model of FCMAE V2-B pre-training (model, not a GPU measurement).

The FCMAE V2-B encoder (224², mask ratio 0.6, 64 images, depths 3/3/27/3,
widths 128..1024, bf16 autocast as ``benchmarks/bench_fcmae.py`` runs it on a
GPU) forward + backward, for three providers and a what-if:

* ``sparse``: :meth:`SparseConvNeXtV2.forward_sparse` (visible rows; the
  depthwise conv through the extension ops) with ``mlp_impl='triton'``, what
  it runs on a GPU: each block's tail after the LN on the dense fused block's
  Triton ops (:mod:`convnextv2_fast.sparse.mlp`), the stage layouts built in
  the step as the GPU benchmark does (part ``layout``);
* ``sparse_torch``: the same with ``mlp_impl='torch'`` (the block tail as
  separate aten ops: the path before the fused tail, and on CPU tensors);
* ``dense_masked_eager``: :func:`dense_masked_encoder_forward` in eager
  PyTorch (the reference the tests and the benchmark compare against; its
  visible masks are built outside the step, as in the benchmark);
* ``dense_masked_compile``: a MODEL OF A COMPILER applied to the eager
  dense-masked op list (:func:`fuse_chains`): every maximal run of consecutive
  non-GEMM, non-convolution aten ops of one graph (forward or backward, in
  dispatch order) becomes one fused kernel that reads the run's external
  inputs once and writes its external outputs once (a tensor is external
  output when an op outside the run -- later in the forward, or in the
  backward: saved activations -- reads it, or it is the encoder output or a
  parameter gradient); GEMMs and convolutions stay library calls, unchanged.
  Optimistic for inductor (one kernel per run, no recompute trade-off, no
  GEMM epilogue fusion either way), so it makes the compile baseline fast;
* ``sparse_fused`` (a what-if, no such code): the same fusion rule applied to
  the ``sparse_torch`` op list (the sparse dwconv ops are boundaries like
  GEMMs) -- what fusing every LN / GELU / GRN / cast / residual chain over the
  visible rows could buy at most.

Counting: every aten op of the forward and the backward (gradient of the
last stage's output, parameters require grad, the image does not) is counted
by :class:`benchmarks.traffic.AtenTraffic` on FAKE tensors at the full shape
(``FakeTensorMode``: shapes and dtypes only, no compute; the extension ops
have fake implementations in ``convnextv2_fast/sparse/_ops.py``); the mask is
real (``random_patch_mask``, seed 0) and so are the layouts (visible row
counts, tables), built beforehand on the CPU.  CUDA's bf16 autocast policy is
applied on CPU fake tensors: CPU autocast (GEMMs and convolutions in bf16)
plus :class:`CudaAutocastPolicy` (the fp32 rules of CUDA's policy that the CPU
policy lacks: ``layer_norm`` in fp32, ``norm`` with an fp32 result); the test
suite checks the forward op list equals the one under CUDA's own autocast on
fake CUDA tensors (the backward cannot run there without a GPU), and that fake
counting equals real counting at a tiny shape.

Triton kernels (the ``sparse`` provider's fused tail) cannot run on fake
tensors; while :func:`triton_launches_counted` is active a launch does not
run and is recorded instead, by a formula (:meth:`OpCounter.triton_launch`):
one kernel that reads each of its tensor arguments that existed before the
launch once and writes each freshly allocated, not yet written one (its
outputs and per-tile partials) once -- each storage once, by the bytes of
the view passed -- at the GPU's launch configuration
(``CONVNEXTV2_FAST_GPU_CONFIG=1``: the partials' tile counts).  The tests
check the formula by hand and against the interpreter's recorded footprint
(:class:`benchmarks.traffic.TritonTraffic` ``hbm_B``) at a small shape.  The
CPU has no fp32-output half GEMM, so the fused tail's pw1 weight gradient is
counted as a bf16 GEMM + cast where CUDA writes fp32 directly (one [4C, C]
cast per block, ~1% of the sparse time).

Time per op (:func:`op_time`), perf_model's rule and constants
(:func:`benchmarks.perf_model.kernel_time`, ``H100``/``H200``): the largest
of HBM bytes (inputs + outputs) at the achievable bandwidth, L2 bytes (a
GEMM's tiled re-reads, :func:`benchmarks.traffic.gemm_l2_bytes`), FLOPs
(GEMMs and dense convolutions -- groups = 1: the stem and the 2x2 downsamples,
implicit GEMMs -- on tensor cores at ``gemm_eff``; depthwise convolutions and
their backward on CUDA cores at ``conv_eff``, perf_model's class rule) and the
launch floor ``min_kernel_us`` per op.  The sparse depthwise-conv ops take
their time from :mod:`benchmarks.model_sparse_dwconv` instead (forward, input
gradient, weight gradient on the path ``conv_tile`` / ``conv_skip`` pick on a
GPU: tensor-core / FFMA 8x8 tiles at stage 1, the skip path at stages 2-4; its
bytes, L2, wavefronts and issue with
the GPU's constants from perf_model; two launches for the weight gradient:
kernel + reduce).

Per-stage parts come from prefix encoders (the first k stages, stage k with 0
blocks or its full depth): ``stem`` (stem GEMM + LN), ``s1`` (3 blocks),
``s2`` .. ``s4`` (downsample + blocks), plus ``layout`` for the sparse
provider; the parts telescope to the full encoder.  Not modelled: host
synchronisations (the layout build's ``nonzero``/``unique``/``item``), CPU
launch overhead beyond the floor, multi-kernel aten ops (one kernel per op),
copies made inside a library kernel (the dense-masked block's LayerNorm of a
permuted NCHW map makes it contiguous inside the kernel: uncounted, which
flatters the eager baseline).  The compile model is a lower bound for inductor
(see above); the sparse / eager ratio is the robust one.

    python -m benchmarks.model_fcmae            # model + CPU measurement, writes results
    python -m benchmarks --suites fcmae_model   # the same rows as a suite
"""
import argparse
import dataclasses
import os
import sys
from collections import defaultdict
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Dict, List, Optional
from unittest import mock

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from benchmarks import model_sparse_dwconv as msd
from benchmarks import perf_model, shapes
from benchmarks.traffic import _WRITE_ONLY, AtenTraffic, cuda_autocast, tensor_bytes
from convnextv2_fast.models.fcmae import random_patch_mask
from convnextv2_fast.models import sparse_encoder
from convnextv2_fast.models.sparse_encoder import (SparseConvNeXtV2,
                                                   dense_masked_encoder_forward)
from convnextv2_fast.sparse._ops import sparse_ops
from convnextv2_fast.sparse.dwconv import conv_skip, conv_tile
from convnextv2_fast.sparse.layout import build_layouts, stage_visible_mask

MODEL_NOTE = perf_model.MODEL_NOTE
COMPILE_NOTE = ('model of a compiler, not torch.compile output: each maximal run of '
                'non-GEMM/conv aten ops fused into one kernel reading its external '
                'inputs once and writing its external outputs once; GEMMs/convs unchanged')
FUSED_NOTE = ('what-if, not code that exists: the sparse op list with the same fusion rule '
              '(LN/GELU/GRN/casts/residual over visible rows fused between the GEMMs and '
              'the sparse dwconv ops) -- what fusing them could buy at most')
TRITON_NOTE = ('fused block tail (Triton kernels counted by formula: tensor arguments that '
               'existed before the launch read once, fresh outputs/partials written once)')
CPU_NOTE = ('measured on this CPU (fp32, the two providers alternated, min of runs), '
            'not a GPU measurement')
PROVIDERS = ('sparse', 'sparse_torch', 'dense_masked_eager', 'dense_masked_compile',
             'sparse_fused')
MLP_IMPL = {'sparse': 'triton', 'sparse_torch': 'torch'}  # counted provider -> mlp_impl
PARTS = ('layout', 'stem', 's1', 's2', 's3', 's4')
PHASES = ('fwd', 'bwd', 'fwd+bwd')
GATE_VS_EAGER, GATE_VS_COMPILE = 0.4, 0.6  # issue 11: sparse / dense-masked, fwd+bwd
EXT_FWD = ('sparse_dwconv_fwd', 'sparse_dwconv_tile_fwd', 'sparse_dwconv_mma_fwd',
           'sparse_dwconv_skip_fwd')
EXT_WGRAD = ('sparse_dwconv_bwd_weight', 'sparse_dwconv_tile_wgrad', 'sparse_dwconv_skip_wgrad')
COLUMNS = ['gpu', 'provider', 'phase', 'part', 'time_us', 'ratio_vs_eager',
           'ratio_vs_compile', 'calls', 'hbm_MB', 'GFLOP', 'bound_share', 'class_share',
           'top_ops']
CPU_COLUMNS = ['arch', 'N', 'img', 'mode', 'provider', 'min_ms', 'median_ms',
               'speedup_vs_reference']


# --------------------------------------------------------------------------
# counting
# --------------------------------------------------------------------------
class CudaAutocastPolicy(TorchFunctionMode):
    """Under CPU autocast, the fp32 rules of CUDA's autocast policy that the
    CPU policy does not have, for the functions the FCMAE encoders call:
    ``layer_norm`` runs in fp32 (floating arguments cast to fp32), ``norm``
    of a 16-bit tensor returns fp32 (``linalg_vector_norm`` with dtype fp32).
    Checked against CUDA's own policy on fake CUDA tensors (the tests)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if not torch.is_autocast_enabled('cpu'):
            return func(*args, **kwargs)
        if func in (F.layer_norm, torch.layer_norm):
            def up(t):
                return t.float() if torch.is_tensor(t) and t.is_floating_point() \
                    and t.dtype != torch.float64 else t
            args, kwargs = tree_map(up, (args, kwargs))
            with torch.autocast('cpu', enabled=False):
                return func(*args, **kwargs)
        if func in (torch.norm, torch.functional.norm, torch.linalg.vector_norm) and \
                args and args[0].dtype in (torch.float16, torch.bfloat16) and \
                kwargs.get('dtype') is None:
            kwargs['dtype'] = torch.float32
        return func(*args, **kwargs)


# ops whose CPU and CUDA kernels return contiguous outputs where their meta
# (fake) kernel keeps a permuted input's strides (the dense-masked block's
# LayerNorm of an NCHW map permuted to NHWC): made contiguous in the fake run
CONTIGUOUS_OUT = ('native_layer_norm_backward', )


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class OpCounter(AtenTraffic):
    """:class:`AtenTraffic` records plus, per op, what the compile model and
    the sparse-conv model need: ``reads`` / ``writes`` as (storage, view key,
    bytes), the first tensor argument's shape and dtype, a convolution's
    ``groups``.  Holds a reference to every tensor it saw (storage ids stay
    unique)."""

    def __init__(self, phase: str, keep_alive: list):
        super().__init__()
        self.phase, self.keep_alive = phase, keep_alive
        self.fresh = set()  # storages allocated and not yet written

    def __enter__(self):
        _COUNTERS.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _COUNTERS.remove(self)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        n = len(self.records)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if len(self.records) == n:
            if func.overloadpacket.__name__ in _ALLOC:
                for t in (t for t in tree_flatten(out)[0] if torch.is_tensor(t)):
                    self.keep_alive.append(t)
                    self.fresh.add(_storage(t))
            return out
        kwargs = kwargs or {}
        rec = self.records[-1]
        if rec['op'] in CONTIGUOUS_OUT and any(
                isinstance(t, FakeTensor) for t in tree_flatten(out)[0]):
            # as the real kernels (not counted: the fake run's strides only)
            out = tree_map(lambda t: t.contiguous() if torch.is_tensor(t) else t, out)
        reads, writes = [], []
        named = list(zip(func._schema.arguments, args)) + [
            (a, kwargs[a.name]) for a in func._schema.arguments if a.name in kwargs]
        for a, v in named:
            is_write = a.alias_info is not None and a.alias_info.is_write
            only_written = is_write and (rec['op'] in _WRITE_ONLY or a.name == 'out'
                                         or rec['op'].endswith('_out'))
            for t in (t for t in tree_flatten(v)[0] if torch.is_tensor(t)):
                self.keep_alive.append(t)
                item = (_storage(t), (_storage(t), t.storage_offset(), tuple(t.shape),
                                      t.stride()), tensor_bytes(t))
                if is_write:
                    writes.append(item)
                if not only_written:
                    reads.append(item)
        if not writes:
            for t in (t for t in tree_flatten(out)[0] if torch.is_tensor(t)):
                self.keep_alive.append(t)
                writes.append((_storage(t), (_storage(t), t.storage_offset(), tuple(t.shape),
                                             t.stride()), tensor_bytes(t)))
        first = next((t for t in tree_flatten(args)[0] if torch.is_tensor(t)), None)
        self.fresh -= {s for s, _, _ in writes}
        rec.update(phase=self.phase, reads=reads, writes=writes,
                   shape0=tuple(first.shape) if first is not None else (),
                   dtype0=first.dtype if first is not None else None)
        if rec['op'] in ('convolution', 'convolution_backward'):
            rec['groups'] = args[8] if rec['op'] == 'convolution' else args[9]
        return out

    def triton_launch(self, name: str, args, kwargs) -> dict:
        """Record one Triton kernel launch by the formula of the module
        docstring: each tensor argument's storage once, written if it was
        allocated and not yet written (an output or partial), else read."""
        reads, writes = {}, {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if torch.is_tensor(t)]
        for t in tensors:
            self.keep_alive.append(t)
            s = _storage(t)
            item = (s, (s, t.storage_offset(), tuple(t.shape), t.stride()), tensor_bytes(t))
            (writes if s in self.fresh else reads).setdefault(s, item)
        self.fresh -= set(writes)
        in_b = sum(b for _, _, b in reads.values())
        out_b = sum(b for _, _, b in writes.values())
        rec = dict(op=f'triton:{name}', in_B=in_b, out_B=out_b, flops=0, l2_B=in_b + out_b,
                   phase=self.phase, reads=list(reads.values()), writes=list(writes.values()),
                   shape0=tuple(tensors[0].shape) if tensors else (),
                   dtype0=tensors[0].dtype if tensors else None)
        self.records.append(rec)
        return rec


_COUNTERS: List[OpCounter] = []  # the active counters, innermost last
_ALLOC = ('empty', 'empty_like', 'empty_strided', 'new_empty')


@contextmanager
def triton_launches_counted():
    """While active, a Triton kernel launch (compiled or interpreted) does
    not run: the innermost active :class:`OpCounter` records it
    (:meth:`OpCounter.triton_launch`); launch configurations are the GPU's
    (``CONVNEXTV2_FAST_GPU_CONFIG=1``), and the sparse encoder's ``mlp_impl``
    resolves as for CUDA tensors (the counted tensors are CPU stand-ins)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    def run(self, *args, grid, warmup, **kwargs):
        if not _COUNTERS:
            raise RuntimeError('a Triton launch outside an OpCounter while counting')
        _COUNTERS[-1].triton_launch(getattr(self, 'fn', self).__name__, args, kwargs)

    resolve_mlp_impl = sparse_encoder.resolve_mlp_impl

    def resolve(impl, device):
        return resolve_mlp_impl(impl, torch.device('cuda'))

    with ExitStack() as stack:
        for cls in (JITFunction, InterpretedFunction):
            stack.enter_context(mock.patch.object(cls, 'run', run))
        stack.enter_context(mock.patch.dict(os.environ, {'CONVNEXTV2_FAST_GPU_CONFIG': '1'}))
        stack.enter_context(mock.patch.object(sparse_encoder, 'resolve_mlp_impl', resolve))
        yield


def warm_layouts(layouts) -> None:
    """Build every cached table the forward reads (on either device's path:
    ``neighbour_rows``, ``tile_halo_rows``, ``down_index``) so that no
    data-dependent op runs under fake tensors."""
    for i, lay in enumerate(layouts):
        lay.site_long()
        lay.neighbour_rows()
        for dev in ('cpu', 'cuda'):
            tile = conv_tile(lay, device_type=dev) or conv_skip(lay, device_type=dev)
            if tile:
                lay.tile_halo_rows(tile)
        if i:
            lay.down_index(layouts[i - 1])


def fcmae_layouts(N: int, size: int, mask_ratio: float, seed: int = 0):
    """(mask, stage layouts) of a real random FCMAE mask (seed ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    grid = size // 32
    mask = random_patch_mask(N, grid, grid, mask_ratio, generator=g)
    layouts = build_layouts(mask.reshape(N, grid, grid).bool(), size, size, 32, 4)
    warm_layouts(layouts)
    return mask, layouts


def _encoder(depths, channels, fake_mode, device='cpu'):
    arch = dict(depths=list(depths), channels=list(channels))
    if fake_mode is None:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return SparseConvNeXtV2(arch=arch, init_cfg=None).to(device).train()
    with torch.device('meta'):
        enc = SparseConvNeXtV2(arch=arch, init_cfg=None)
    with fake_mode:
        return enc.to_empty(device=device).train()


def count(provider: str, depths, channels, layouts, N: int, size: int,
          fake: bool = True, amp=torch.bfloat16, device: str = 'cpu') -> dict:
    """``{'fwd': records, 'bwd': records, 'keep': storages}`` of one encoder
    (``depths``/``channels``: a prefix of V2-B's, ``layouts`` its stages')
    forward + backward under bf16 autocast with CUDA's policy (see the module
    docstring); ``provider``: ``'sparse'`` (fused block tail, its Triton
    launches counted, not run: :func:`triton_launches_counted`),
    ``'sparse_torch'`` or ``'dense'``; ``fake=False`` computes for real
    (tests, tiny shapes; the Triton launches are counted, not run, there too);
    ``device='cuda'`` (fake only, forward only): CUDA's own autocast."""
    sparse_ops()  # registers the fake impls of the extension ops
    fm = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    enc = _encoder(depths, channels, fm, device)
    enc.mlp_impl = MLP_IMPL.get(provider, 'torch')
    k = len(depths)
    lays = layouts[:k]
    if device != 'cpu':
        lays = _layouts_on(lays, fm, device)
    vis = [stage_visible_mask(lay, torch.float32) for lay in lays]
    keep_alive = []
    out = {}
    with ExitStack() as stack:
        stack.enter_context(fm if fm is not None else nullcontext())
        if provider == 'sparse':
            stack.enter_context(triton_launches_counted())
        g = torch.Generator().manual_seed(1)
        x = torch.empty(N, 3, size, size, device=device) if fake else torch.randn(
            N, 3, size, size, generator=g)
        with ExitStack() as amp_ctx:
            if device == 'cuda':
                amp_ctx.enter_context(cuda_autocast(amp))
            elif amp is not None:
                amp_ctx.enter_context(torch.autocast('cpu', dtype=amp))
                amp_ctx.enter_context(CudaAutocastPolicy())
            with OpCounter('fwd', keep_alive) as fwd:
                if provider in MLP_IMPL:
                    y = enc.forward_sparse(x, None, lays)[0][-1]
                else:
                    y = dense_masked_encoder_forward(enc, x, vis)[-1]
        out['fwd'] = fwd.records
        out['keep'] = {_storage(y)}
        if device == 'cpu':
            dy = torch.ones_like(y) if not fake else torch.empty_like(y)
            with OpCounter('bwd', keep_alive) as bwd:
                torch.autograd.backward([y], [dy])
            out['bwd'] = bwd.records
            out['keep'] |= {_storage(p.grad) for p in enc.parameters()
                            if p.grad is not None}
    out['keep_alive'] = keep_alive
    return out


def _layouts_on(layouts, fm, device):
    """Copies of ``layouts`` (tensors and cached tables) as fake tensors on
    ``device`` (the CUDA-policy check)."""
    out = []
    with fm:
        def conv(t):
            return fm.from_tensor(t).to(device)
        for lay in layouts:
            new = dataclasses.replace(lay, site=conv(lay.site), nbr=conv(lay.nbr),
                                      sample=conv(lay.sample), counts=conv(lay.counts),
                                      _cache={})
            new._cache.update({k: conv(v) for k, v in lay._cache.items()
                               if not (isinstance(k, tuple) and k[0] == 'down')})
            out.append(new)
        for i in range(1, len(layouts)):
            out[i]._cache[('down', id(out[i - 1]))] = conv(layouts[i].down_index(layouts[i - 1]))
    return out


def count_layout_build(N: int, size: int, mask: torch.Tensor) -> List[dict]:
    """Records of what the sparse step does before its first GEMM on real
    tensors: ``SparseConvNeXtV2.layouts`` (mask check, the four stage layouts)
    and the tables the GPU forward reads (the halo tables of the tile and skip
    paths, gathers, down indices)."""
    with torch.device('meta'):
        enc = SparseConvNeXtV2(arch='base', init_cfg=None)
    x = torch.empty(1, 3, 1, 1).expand(N, 3, size, size)
    with OpCounter('fwd', []) as c:
        lays = enc.layouts(x, mask)
        for i, lay in enumerate(lays):
            tile = msd.gpu_path(lay)
            if tile:
                lay.tile_halo_rows(int(str(tile).replace('skip', '')))
            else:
                lay.neighbour_rows()
            lay.down_index(lays[i - 1]) if i else lay.site_long()
    return c.records


# --------------------------------------------------------------------------
# the compile model
# --------------------------------------------------------------------------
def op_class(rec: dict) -> str:
    """'sparse_dwconv' | 'gemm' | 'conv' | 'memory' | 'fused' | 'triton' (see
    the module docstring: dense convolutions with groups = 1 are GEMMs;
    'triton': a fused-tail kernel, timed like a memory op by its bytes)."""
    op = rec['op']
    if op in EXT_FWD + EXT_WGRAD:
        return 'sparse_dwconv'
    if op.startswith('fused'):
        return 'fused'
    if op.startswith('triton:'):
        return 'triton'
    cls = perf_model._aten_class(op)
    if cls == 'conv' and rec.get('groups') == 1:
        return 'gemm'
    return cls


def fuse_chains(fwd: List[dict], bwd: List[dict], keep=()) -> tuple:
    """(fwd, bwd) with every maximal run of 'memory' ops (per graph) replaced
    by one ``fused`` record (the compile model, module docstring).  ``keep``:
    storages that are results (encoder output, parameter gradients)."""
    seq = [(0, r) for r in fwd] + [(1, r) for r in bwd]
    readers = defaultdict(list)
    for i, (_, r) in enumerate(seq):
        for s, _, _ in r['reads']:
            readers[s].append(i)
    out = ([], [])
    i = 0
    while i < len(seq):
        g, r = seq[i]
        if op_class(r) != 'memory':
            out[g].append(r)
            i += 1
            continue
        j = i
        while j < len(seq) and seq[j][0] == g and op_class(seq[j][1]) == 'memory':
            j += 1
        out[g].append(_fused(seq, i, j, readers, set(keep)))
        i = j
    return out


def _fused(seq, i, j, readers, keep) -> dict:
    produced, ins, written = set(), {}, {}
    for _, r in seq[i:j]:
        for s, view, b in r['reads']:
            if s not in produced:
                ins.setdefault(view, b)
        for s, _, b in r['writes']:
            produced.add(s)
            written[s] = b
    out_b = sum(b for s, b in written.items()
                if s in keep or any(k >= j or k < i for k in readers.get(s, ())))
    ops = [r['op'] for _, r in seq[i:j]]
    in_b = sum(ins.values())
    return dict(op=f'fused[{len(ops)}]', ops=ops, in_B=in_b, out_B=out_b, flops=0,
                l2_B=in_b + out_b, phase=seq[i][1]['phase'], reads=[], writes=[])


# --------------------------------------------------------------------------
# time
# --------------------------------------------------------------------------
def dwconv_hw(gpu: dict) -> dict:
    """model_sparse_dwconv's hardware dict from perf_model's GPU constants
    (achievable HBM, assumed L2, sustained clock): one set of constants for
    every op of the encoder."""
    return dict(hbm_Bps=gpu['hbm_tbs'] * 1e12 * gpu['hbm_achievable'],
                l2_Bps=gpu['l2_tbs'] * 1e12, sms=gpu['sms'],
                clk_hz=gpu['clock_ghz'] * 1e9, issue_per_clk=gpu['issue_per_sm_clk'],
                wavefront_B=msd.H200['wavefront_B'])


def dwconv_passes(layouts, gpu: dict, channels=shapes.V2B_CHANNELS,
                  dtype=torch.bfloat16) -> Dict[tuple, dict]:
    """{(rows M, pass): model_sparse_dwconv row} per stage, on the GPU's path."""
    hw = dwconv_hw(gpu)
    out = {}
    for lay, C in zip(layouts, channels):
        tile = msd.gpu_path(lay)
        for kind in ('fwd', 'dgrad', 'wgrad'):
            out[(lay.num_rows, kind)] = msd.model_layout_pass(kind, lay, C, dtype, tile, hw)
    return out


def op_time(rec: dict, gpu: dict, dw: Optional[Dict[tuple, dict]] = None) -> dict:
    """perf_model's terms and time of one record (module docstring)."""
    cls = op_class(rec)
    hbm = rec['in_B'] + rec['out_B']
    if cls == 'sparse_dwconv':
        kind = 'wgrad' if rec['op'] in EXT_WGRAD else (
            'fwd' if rec['phase'] == 'fwd' else 'dgrad')
        p = dw[(rec['shape0'][0], kind)]
        launches = 2 if kind == 'wgrad' else 1
        terms = dict(t_hbm_us=p['hbm_us'], t_l2_us=p['l2_us'],
                     t_issue_us=max(p['issue_us'], p['lsu_us'], p.get('tensor_us', 0.)),
                     t_flop_us=0.,
                     t_launch_us=launches * gpu['min_kernel_us'])
        bound = max(terms, key=terms.get)
        t = dict(terms, time_us=terms[bound], bound=bound[2:-3], calls=launches,
                 path=p['path'])
        hbm = p['hbm_us'] * dwconv_hw(gpu)['hbm_Bps'] / 1e6
    else:
        t = perf_model.kernel_time(
            gpu, hbm_B=hbm, l2_B=rec.get('l2_B') or hbm,
            tc_flops=rec['flops'] if cls == 'gemm' else 0.,
            fma_flops=rec['flops'] if cls == 'conv' else 0.,
            fma_eff=gpu['conv_eff'], calls=1)
        t['calls'] = 1
    t.update(op=rec['op'] if cls != 'sparse_dwconv' else f"dwconv_{kind}[{t['path']}]",
             cls=cls, hbm_B=hbm, flops=rec['flops'])
    return t


def totals(timed: List[dict]) -> dict:
    """Sums of timed records: time, calls, bytes, FLOPs, time per bound and per op."""
    s = dict(time_us=0., calls=0, hbm_B=0., flops=0., by_bound=defaultdict(float),
             by_op=defaultdict(float), by_cls=defaultdict(float))
    for t in timed:
        s['time_us'] += t['time_us']
        s['calls'] += t['calls']
        s['hbm_B'] += t['hbm_B']
        s['flops'] += t['flops']
        s['by_bound'][t['bound']] += t['time_us']
        s['by_cls'][t['cls']] += t['time_us']
        s['by_op'][t['op'] if t['cls'] != 'fused' else 'fused'] += t['time_us']
    return s


def _diff(a: dict, b: Optional[dict]) -> dict:
    if b is None:
        return a
    d = {k: a[k] - b[k] for k in ('time_us', 'calls', 'hbm_B', 'flops')}
    for k in ('by_bound', 'by_op', 'by_cls'):
        d[k] = {n: a[k].get(n, 0.) - b[k].get(n, 0.)
                for n in set(a[k]) | set(b[k])}
    return d


def _shares(d: dict, total: float, n: int = 9) -> str:
    items = sorted(((k, v) for k, v in d.items() if v > 1e-9), key=lambda kv: -kv[1])
    return ', '.join(f'{k} {v / total:.0%}' for k, v in items[:n]) if total else ''


# --------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------
def _prefixes(depths, parts: bool = True):
    """(part, depths of the prefix encoder) in order; parts telescope
    (``parts=False``: the whole encoder only)."""
    if not parts:
        return [('encoder', tuple(depths))]
    out = []
    for k in range(len(depths)):
        out.append(('stem' if k == 0 else f's{k + 1}:down', tuple(depths[:k]) + (0, )))
        out.append((f's{k + 1}', tuple(depths[:k + 1])))
    return out


def provider_counts(layouts, N: int, size: int, depths, channels, parts: bool = True,
                    progress=None) -> Dict[str, Dict[str, dict]]:
    """{provider: {prefix name: counts}}: the sparse (fused tail), sparse
    torch and dense-masked encoders counted once per prefix; the compile model
    and the sparse what-if are :func:`fuse_chains` of the last two."""
    out = {p: {} for p in PROVIDERS}
    for name, d in _prefixes(depths, parts):
        for base, eager, fused in (('sparse', 'sparse', None),
                                   ('sparse_torch', 'sparse_torch', 'sparse_fused'),
                                   ('dense', 'dense_masked_eager', 'dense_masked_compile')):
            c = count(base, d, channels[:len(d)], layouts, N, size)
            out[eager][name] = c
            if fused:
                f = dict(c)
                f['fwd'], f['bwd'] = fuse_chains(c['fwd'], c['bwd'], c['keep'])
                out[fused][name] = f
            if progress:
                progress(f'{base} {name} {d}')
    return out


def model(N: int = shapes.FCMAE_BATCH, size: int = shapes.FCMAE_SIZE,
          mask_ratio: float = shapes.FCMAE_MASK_RATIO, depths=shapes.V2B_DEPTHS,
          channels=shapes.V2B_CHANNELS, gpus=('H100', 'H200'), seed: int = 0,
          parts: bool = True, log=None) -> List[dict]:
    """Rows per (gpu, provider, phase, part) plus the encoder totals
    (``part='encoder'``) with the ratios to the dense-masked eager encoder and
    to the compile model; ``parts=False``: the encoder rows only (faster)."""
    mask, layouts = fcmae_layouts(N, size, mask_ratio, seed)
    layout_recs = [dict(r, phase='fwd') for r in count_layout_build(N, size, mask)]
    counts = provider_counts(layouts, N, size, depths, channels, parts, log)
    vis = layouts[0].num_rows / layouts[0].nbr.numel()
    rows = []
    for gname in gpus:
        gpu = perf_model.GPUS[gname]
        dw = dwconv_passes(layouts, gpu, channels)
        for prov in PROVIDERS:
            for phase in PHASES:
                ph = ('fwd', 'bwd') if phase == 'fwd+bwd' else (phase, )
                prev, found = None, {}
                for name, _ in _prefixes(depths, parts):
                    t = totals([op_time(r, gpu, dw) for p in ph
                                for r in counts[prov][name][p]])
                    part = name.split(':')[0]
                    d = _diff(t, prev)
                    found[part] = _add(found[part], d) if part in found else d
                    prev = t
                enc_total = prev
                if prov.startswith('sparse') and 'fwd' in ph:
                    found['layout'] = totals([op_time(r, gpu, dw) for r in layout_recs])
                    enc_total = _add(enc_total, found['layout'])
                found['encoder'] = enc_total
                for part in PARTS + ('encoder', ):
                    if part in found:
                        rows.append(_row(gname, prov, phase, part, found[part], N, size,
                                         mask_ratio, vis))
    _ratios(rows)
    return rows


def _add(a, b):
    d = {k: a[k] + b[k] for k in ('time_us', 'calls', 'hbm_B', 'flops')}
    for k in ('by_bound', 'by_op', 'by_cls'):
        d[k] = {n: a[k].get(n, 0.) + b[k].get(n, 0.) for n in set(a[k]) | set(b[k])}
    return d


def _row(gname, prov, phase, part, d, N, size, mask_ratio, vis) -> dict:
    note = MODEL_NOTE + ('; ' + COMPILE_NOTE if prov == 'dense_masked_compile' else '') + (
        '; ' + FUSED_NOTE if prov == 'sparse_fused' else '') + (
        '; ' + TRITON_NOTE if prov == 'sparse' else '')
    return dict(suite='fcmae_model', bench='fcmae_model', kind='model',
                gpu=perf_model.GPUS[gname]['name'], provider=prov, phase=phase, part=part,
                arch='V2-B', N=N, img=size, mask_ratio=mask_ratio, visible_fraction=vis,
                dtype='bf16-autocast', time_us=d['time_us'], calls=d['calls'],
                hbm_MB=d['hbm_B'] / 1e6, GFLOP=d['flops'] / 1e9,
                bound_share=_shares(d['by_bound'], d['time_us']),
                class_share=_shares(d['by_cls'], d['time_us']),
                top_ops=_shares(d['by_op'], d['time_us'], 6), note=note)


def _ratios(rows: List[dict]) -> None:
    base = {(r['gpu'], r['provider'], r['phase'], r['part']): r['time_us'] for r in rows}
    for r in rows:
        for col, prov in (('ratio_vs_eager', 'dense_masked_eager'),
                          ('ratio_vs_compile', 'dense_masked_compile')):
            b = base.get((r['gpu'], prov, r['phase'], r['part']))
            if b and r['part'] != 'layout':
                r[col] = r['time_us'] / b


def encoder_ratios(rows: List[dict], gpu: str = 'H200', phase: str = 'fwd+bwd') -> tuple:
    """(sparse / eager, sparse / compile) of the modelled encoder."""
    for r in rows:
        if r.get('kind') == 'model' and r['gpu'] == perf_model.GPUS[gpu]['name'] and \
                r['provider'] == 'sparse' and r['phase'] == phase and r['part'] == 'encoder':
            return r['ratio_vs_eager'], r['ratio_vs_compile']
    return None, None


def gate(rows: List[dict]) -> tuple:
    """(ok, text): issue 11's encoder targets on both GPUs (sparse <= 0.4 x
    eager and <= 0.6 x the compile model, fwd+bwd), the numbers in the text."""
    ok, parts = True, []
    for g in ('H100', 'H200'):
        e, c = encoder_ratios(rows, g)
        if e is None:
            return False, f'no encoder rows for {g}'
        ok = ok and e <= GATE_VS_EAGER and c <= GATE_VS_COMPILE
        parts.append(f'{g}: sparse/eager {e:.3f} (target <= {GATE_VS_EAGER}), '
                     f'sparse/compile {c:.3f} (target <= {GATE_VS_COMPILE})')
    return ok, f'{MODEL_NOTE}: FCMAE V2-B encoder fwd+bwd: ' + '; '.join(parts)


# --------------------------------------------------------------------------
# the CPU measurement
# --------------------------------------------------------------------------
CPU_DEPTHS = (1, 1, 3, 1)


def cpu_measurement(N: int = 2, size: int = 224, depths=CPU_DEPTHS, iters: int = 7,
                    progress=None) -> List[dict]:
    """Sparse vs dense-masked eager fwd+bwd on this CPU (V2-B widths, reduced
    depths, fp32, mask 0.6): ``bench_fcmae``'s step functions (layouts built in
    the sparse step, the dense masks outside), the two providers' steps
    alternated ``iters`` times after a warm-up so that a burst of load from
    other processes hits both, minimum per provider (measured, not a model)."""
    import time

    from benchmarks import bench_fcmae
    arch = dict(depths=list(depths), channels=list(shapes.V2B_CHANNELS))
    enc = SparseConvNeXtV2(arch=arch).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 3, size, size, generator=g)
    grid = size // enc.patch_size
    mask = random_patch_mask(N, grid, grid, shapes.FCMAE_MASK_RATIO, generator=g)
    steps = {p: bench_fcmae._step_fn(bench_fcmae._forward_fn(p, enc, x, mask, None, {}),
                                     'fwd+bwd', enc) for p in ('fast', 'reference')}
    times = {p: [] for p in steps}
    for i in range(iters + 1):
        for p, step in steps.items():
            t0 = time.perf_counter()
            step()
            if i:  # the first round is the warm-up
                times[p].append((time.perf_counter() - t0) * 1e3)
    rows = []
    for p, ts in times.items():
        rows.append(dict(bench='fcmae_encoder', arch='V2-B widths', depths=list(depths), N=N,
                         img=size, mode='fwd+bwd', provider=p, model=bench_fcmae.DESC[p],
                         dtype='fp32', min_ms=min(ts), median_ms=sorted(ts)[len(ts) // 2],
                         times_ms=ts, note=CPU_NOTE))
        if progress:
            progress(rows[-1])
    speedup = rows[1]['min_ms'] / rows[0]['min_ms']
    rows[0]['speedup_vs_reference'], rows[1]['speedup_vs_reference'] = speedup, 1.
    rows.append(dict(suite='fcmae_model', bench='fcmae_model', kind='cpu_measured',
                     provider='sparse', phase='fwd+bwd', part='encoder', N=N, img=size,
                     depths=list(depths), threads=torch.get_num_threads(), iters=iters,
                     sparse_min_ms=rows[0]['min_ms'], eager_min_ms=rows[1]['min_ms'],
                     speedup_vs_eager=speedup, target_speedup=2.3, note=CPU_NOTE))
    return rows


# --------------------------------------------------------------------------
# suite entry, markdown, CLI
# --------------------------------------------------------------------------
def run_suite(smoke: bool, device: torch.device, providers=None, progress=None):
    """All providers always (the ratios need them); ``smoke``: 8 images
    and a 1-image CPU measurement at depths 1/1/1/1."""
    def log(msg):
        print(msg, file=sys.stderr, flush=True)
    rows = model(N=8 if smoke else shapes.FCMAE_BATCH, log=log)
    for r in rows:
        if progress:
            progress(r)
    cpu = cpu_measurement(N=1 if smoke else 2, depths=(1, 1, 1, 1) if smoke else CPU_DEPTHS,
                          iters=2 if smoke else 7)
    for r in cpu:
        if progress:
            progress(r)
    return rows + cpu


def summary_markdown(rows: List[dict]) -> str:
    from benchmarks.common import markdown_table
    model_rows = [r for r in rows if r.get('kind') == 'model']
    enc = [r for r in model_rows if r['part'] == 'encoder']
    parts = [f'#### FCMAE V2-B encoder -- {MODEL_NOTE}', '',
             'Per op: perf_model rule (HBM / L2 / FLOP / launch floor, constants below); '
             'sparse depthwise conv from model_sparse_dwconv (GPU path). '
             f'dense_masked_compile: {COMPILE_NOTE}.', '',
             markdown_table(enc, ['gpu', 'provider', 'phase', 'time_us', 'ratio_vs_eager',
                                  'ratio_vs_compile', 'calls', 'hbm_MB', 'GFLOP',
                                  'bound_share', 'class_share']), '',
             'Per stage (fwd+bwd; `layout`: the sparse step\'s layout build):', '',
             markdown_table([r for r in model_rows if r['phase'] == 'fwd+bwd'
                             and r['part'] != 'encoder'],
                            ['gpu', 'provider', 'part', 'time_us', 'ratio_vs_eager',
                             'ratio_vs_compile', 'calls', 'bound_share', 'class_share',
                             'top_ops']), '',
             'class_share: time by op class (gemm: mm/addmm and dense convs; sparse_dwconv: '
             'the extension ops; conv: depthwise cuDNN; memory: elementwise/reduction/cast '
             'aten ops, each its own kernel; fused: the compile rule\'s kernels; triton: the '
             'sparse provider\'s fused block-tail kernels, counted by formula).', '']
    ok, text = gate(model_rows) if model_rows else (False, 'no model rows')
    parts += [f'Issue 11 targets: {"MET" if ok else "NOT met"} -- {text}', '']
    cpu = [r for r in rows if r.get('kind') == 'cpu_measured']
    for r in cpu:
        parts += [f"CPU ({CPU_NOTE}): V2-B widths, depths {r['depths']}, {r['img']}², "
                  f"{r['N']} images, {r['threads']} threads: sparse {r['sparse_min_ms']:.0f} ms, "
                  f"dense-masked eager {r['eager_min_ms']:.0f} ms, speed-up "
                  f"{r['speedup_vs_eager']:.2f}x (issue target >= {r['target_speedup']}x).", '']
    gpus = [g for g in perf_model.GPUS.values() if any(r['gpu'] == g['name'] for r in enc)]
    parts += ['Constants (assumptions):', ''] + [perf_model.describe(g) for g in gpus]
    return '\n'.join(parts) + '\n'


def main(argv=None):
    from benchmarks import common
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--smoke', action='store_true')
    ap.add_argument('--no-cpu', action='store_true', help='skip the CPU measurement')
    ap.add_argument('--out', default=None, help='results JSON (appends a run)')
    args = ap.parse_args(argv)
    if args.no_cpu:
        rows = model(N=8 if args.smoke else shapes.FCMAE_BATCH,
                     log=lambda m: print(m, file=sys.stderr, flush=True))
    else:
        rows = run_suite(args.smoke, torch.device('cpu'))
    md = summary_markdown(rows)
    print(md)
    if args.out:
        meta = common.env_metadata(torch.device('cpu'))
        meta.update(bench='fcmae_model', smoke=args.smoke, argv=list(argv or sys.argv[1:]))
        common.append_results(args.out, meta, rows)
        with open(os.path.splitext(args.out)[0] + '.md', 'w') as f:
            f.write(md + '\n' + common.markdown_table(
                [r for r in rows if r.get('kind') == 'model'], COLUMNS) + '\n')
        print(f'results appended to {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
