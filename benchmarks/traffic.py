"""Memory-traffic counters that run without a GPU (a model, not a GPU
measurement).

Two counters, reused by the ``traffic`` suite (:mod:`benchmarks.bench_traffic`)
and the traffic gates (``tests/test_traffic_gates.py``):

**Triton kernels** (:class:`TritonTraffic`), counted in the Triton interpreter
(``TRITON_INTERPRET=1``).  While active, it hooks the interpreter builder's
masked load/store (``tl.load``/``tl.store``, tensor descriptors included, which
the interpreter lowers to the same calls) and atomics, and records, for each
launch and each program in program order, the byte addresses every access
instruction touches (masked-off lanes excluded).  Host addresses are remapped
per launch to a virtual address space in which every tensor storage starts
512-byte aligned (as CUDA's caching allocator gives), so 128-byte line counts
do not depend on where the CPU allocator put the tensors.  Per launch
(:meth:`Launch.stats`):

* ``l1_B``: bytes requested by the programs (L1 view);
* ``l2_B``: bytes that miss a simulated per-program LRU cache of 128-byte lines
  with capacity ``l1_share_bytes`` (the L1 share each resident program gets,
  :func:`l1_share_bytes`), loads filling whole lines, stores written through
  (every store counts, by the 32-byte sectors it touches) -- the L2 view, which exposes a tile re-read once
  per tap at a long reuse distance;
* ``hbm_B``: the launch's global unique footprint, distinct 128-byte lines
  over all programs, loads and stores (the HBM lower bound);
* ``own_footprint_B``: the sum over programs of each program's own distinct
  lines (its tile and halo), what the gate compares ``l2_B`` against.

The LRU works at instruction granularity: the lines one access instruction
touches are coalesced to distinct lines first, hits are decided against the
cache state before the instruction, and the instruction's lines then become
the most recently used (ties by address).  A program sample (``sample=``)
runs only some programs of a launch (the others return at once), so the
per-program figures of a kernel can be measured at the real shape.

**torch ops** (:class:`AtenTraffic`), counted at the dispatcher
(``TorchDispatchMode``): each aten op's input and output bytes (distinct
elements: a broadcast input counts once), view/aliasing ops free, allocations
(``empty*``) free, and FLOPs of GEMMs and convolutions.  Library kernels are
opaque: their rows carry the op's in+out bytes in all three views.
:func:`amp_reference_graph` traces a module under CUDA's bf16 autocast policy
on fake CUDA tensors (no GPU, no compute: the autocast casts, fp32 LayerNorm
and GRN promotions become explicit ops of an aten graph); replaying that graph
on fake CPU tensors gives forward and backward counts at the real shape (the
autograd engine cannot run on fake CUDA tensors without a CUDA device, and the
backward of an autocast region is the autograd of its cast-inserted ops).
Not seen: copies made inside a library kernel (e.g. a LayerNorm making a
non-contiguous input contiguous); the suite feeds channels_last inputs so the
reference LayerNorm needs none.

:class:`NoComputeMode` replaces every non-view aten op by an uninitialised
output of the right shape (addresses only), so host functions can be driven
at the real shape when only Triton addresses are wanted.
"""
import inspect
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

LINE = 128  # bytes per cache line
SECTOR = 32  # bytes per sector: the unit a write-through store moves to L2
ALLOC_ALIGN = 512  # CUDA caching allocator alignment (virtual addresses)

# H100 SXM: 256 KB combined L1 / shared memory per SM.
H100_L1_SMEM_PER_SM = 256 * 1024
# Default resident programs per SM when the static suite gives none: a
# 4-warp program at <= 128 registers per thread (65536 / (128 * 128) = 4).
DEFAULT_PROGRAMS_PER_SM = 4


def l1_share_bytes(programs_per_sm: int = DEFAULT_PROGRAMS_PER_SM,
                   smem_per_program: int = 0,
                   l1_smem_per_sm: int = H100_L1_SMEM_PER_SM) -> int:
    """L1 bytes each resident program gets on H100: the combined L1/shared
    memory of an SM minus the shared memory of the resident programs, divided
    by the resident programs.  ``programs_per_sm`` comes from the static
    (occupancy) suite; the default is :data:`DEFAULT_PROGRAMS_PER_SM`."""
    p = max(1, int(programs_per_sm))
    return max(LINE, (l1_smem_per_sm - p * int(smem_per_program)) // p)


# --------------------------------------------------------------------------
# Triton: records of the interpreter's accesses
# --------------------------------------------------------------------------
@dataclass
class Access:
    kind: str  # 'load' | 'store' | 'atomic'
    lines: np.ndarray  # distinct 128-B line numbers (virtual), sorted int64
    nbytes: int  # bytes requested (active lanes x element size)
    sectors: Optional[int] = None  # distinct 32-B sectors (None: 4 per line)

    @property
    def n_sectors(self) -> int:
        return self.lines.size * (LINE // SECTOR) if self.sectors is None \
            else self.sectors


@dataclass
class Program:
    pid: tuple
    accesses: List[Access] = field(default_factory=list)
    dot_flops: int = 0  # 2*M*N*K of every tl.dot (tensor-core work, padding
    # of masked rows included: the hardware computes whole tiles)


@dataclass
class Launch:
    name: str
    grid: tuple = (1, 1, 1)
    programs: List[Program] = field(default_factory=list)
    _starts: np.ndarray = None
    _ends: np.ndarray = None
    _vbases: np.ndarray = None

    @property
    def n_programs(self) -> int:
        return int(np.prod(self.grid))

    def stats(self, l1_share: Optional[int] = None) -> dict:
        """Counts of this launch (see the module docstring)."""
        cap = (l1_share if l1_share is not None else l1_share_bytes()) // LINE
        if not hasattr(self, '_cache'):
            self._cache = {}
        if cap not in self._cache:
            self._cache[cap] = self._stats(cap)
        return dict(self._cache[cap])

    def _stats(self, cap: int) -> dict:
        l1 = l2 = own = 0
        glob = []
        for prog in self.programs:
            l1 += sum(a.nbytes for a in prog.accesses)
            # load misses fill whole lines; stores (and atomics) write
            # through only the sectors they touch
            l2 += lru_traffic_lines(prog.accesses, cap,
                                    count_stores=False) * LINE
            l2 += SECTOR * sum(a.n_sectors for a in prog.accesses
                               if a.kind != 'load')
            if prog.accesses:
                u = np.unique(np.concatenate([a.lines for a in prog.accesses]))
                own += u.size * LINE
                glob.append(u)
        hbm = (np.unique(np.concatenate(glob)).size * LINE) if glob else 0
        return dict(kernel=self.name, calls=1, l1_B=l1, l2_B=l2, hbm_B=hbm,
                    own_footprint_B=own, programs=self.n_programs,
                    programs_run=len(self.programs),
                    flops=sum(p.dot_flops for p in self.programs))


def lru_traffic_lines(accesses: Sequence[Access], capacity_lines: int,
                      count_stores: bool = True) -> int:
    """Lines moved between a program's LRU cache of ``capacity_lines`` lines
    and L2: load misses (line fills) plus, with ``count_stores``, every
    stored line (write-through; :meth:`Launch.stats` counts stores by sector
    instead).

    Vectorised per instruction: ``last[line]`` holds the (unique, increasing)
    time of each line's last use; the cache holds the ``capacity_lines`` lines
    with the latest times, so a line hits iff its time is at least the
    ``capacity_lines``-th largest time (found with ``np.partition``)."""
    if not accesses:
        return 0
    allines = np.concatenate([a.lines for a in accesses])
    uniq, inv = np.unique(allines, return_inverse=True)
    n = uniq.size
    last = np.full(n, -1, dtype=np.int64)
    live = 0
    t = 0
    moved = 0
    k = max(1, int(capacity_lines))
    pos = 0
    for a in accesses:
        m = a.lines.size
        ids = inv[pos:pos + m]
        pos += m
        if m == 0:
            continue
        prev = last[ids]
        if a.kind == 'store':
            moved += m if count_stores else 0
        else:
            if live <= k:
                hit = prev >= 0
            else:
                thr = np.partition(last, n - k)[n - k]
                hit = prev >= thr
            moved += int(m - np.count_nonzero(hit))
            if a.kind == 'atomic' and count_stores:
                moved += m
        live += int(np.count_nonzero(prev < 0))
        last[ids] = t + np.arange(m, dtype=np.int64)
        t += m
    return moved


_ACTIVE = None  # the TritonTraffic recording now (one at a time)


class TritonTraffic:
    """Context manager recording the Triton interpreter's memory accesses.

    ``sample``: optional ``f(kernel_name, grid) -> set of linear program ids``
    (``x + gx * (y + gy * z)``) or ``None`` for all; programs outside the set
    return at once (their outputs stay unwritten).  ``memo``: optional dict
    shared between recorders; a launch identical to one recorded before (same
    kernel, grid, scalar arguments and tensor shapes/strides/dtypes/offsets/
    aliasing) is not run again but takes the recorded :class:`Launch` (the
    address pattern of these kernels does not depend on data; the launch's
    outputs then stay unwritten).  ``launches`` lists the recorded
    :class:`Launch` objects in launch order.
    """

    def __init__(self, sample: Optional[Callable] = None,
                 memo: Optional[dict] = None):
        self.sample = sample
        self.memo = memo
        self.launches: List[Launch] = []
        self._launch = None
        self._prog = None
        self._patches = []

    # -- patching -----------------------------------------------------------
    def __enter__(self):
        global _ACTIVE
        from triton.runtime import interpreter as ti
        if _ACTIVE is not None:
            raise RuntimeError('a TritonTraffic recorder is already active')
        _ACTIVE = self
        B = ti.InterpreterBuilder
        G = ti.GridExecutor
        rec = self
        orig_load, orig_store = B.create_masked_load, B.create_masked_store
        orig_rmw, orig_cas = B.create_atomic_rmw, B.create_atomic_cas
        orig_dot = B.create_dot
        orig_call, orig_init = G.__call__, G._init_args_hst
        orig_patch_lang = ti._patch_lang

        def patch_lang(fn):  # it reads the kernel's globals
            return orig_patch_lang(getattr(fn, '_traffic_fn', fn))

        def masked_load(b, ptrs, mask, *a, **k):
            rec._record('load', ptrs, mask)
            return orig_load(b, ptrs, mask, *a, **k)

        def masked_store(b, ptrs, value, mask, *a, **k):
            rec._record('store', ptrs, mask)
            return orig_store(b, ptrs, value, mask, *a, **k)

        def atomic_rmw(b, op, ptr, val, mask, *a, **k):
            rec._record('atomic', ptr, mask)
            return orig_rmw(b, op, ptr, val, mask, *a, **k)

        def dot(b, a_, b_, d, *a, **k):
            if rec._prog is not None:
                sa, sb = np.shape(a_.data), np.shape(b_.data)
                rec._prog.dot_flops += 2 * int(np.prod(sa)) * int(sb[-1])
            return orig_dot(b, a_, b_, d, *a, **k)

        def atomic_cas(b, ptr, cmp, val, *a, **k):
            rec._record('atomic', ptr, None)
            return orig_cas(b, ptr, cmp, val, *a, **k)

        def init_args(ge, args_dev, kwargs):
            args_hst, kwargs_hst = orig_init(ge, args_dev, kwargs)
            if rec._launch is not None:
                rec._set_storages(list(args_hst) + list(kwargs_hst.values()))
            return args_hst, kwargs_hst

        def call(ge, *args, **kwargs):
            fn = ge.fn
            key = rec._memo_key(ge, args, kwargs)
            if key is not None and key in rec.memo:
                rec.launches.append(rec.memo[key])
                return None
            launch = Launch(fn.__name__)
            if key is not None:
                rec.memo[key] = launch
            rec._launch = launch
            chosen = {}

            def program(**kw):
                gd = ti.interpreter_builder.grid_dim
                x, y, z = ti.interpreter_builder.grid_idx
                launch.grid = tuple(gd)
                if rec.sample is not None:
                    if 'ids' not in chosen:
                        chosen['ids'] = rec.sample(launch.name, tuple(gd))
                    ids = chosen['ids']
                    if ids is not None and \
                            x + gd[0] * (y + gd[1] * z) not in ids:
                        return None
                rec._prog = Program((x, y, z))
                launch.programs.append(rec._prog)
                return fn(**kw)

            program.__signature__ = inspect.signature(fn)
            program.__name__ = fn.__name__
            program.__annotations__ = getattr(fn, '__annotations__', {})
            program._traffic_fn = fn
            ge.fn = program
            try:
                from torch.utils._python_dispatch import \
                    _disable_current_modes
                with _disable_current_modes():
                    return orig_call(ge, *args, **kwargs)
            finally:
                ge.fn = fn
                rec._launch = rec._prog = None
                rec.launches.append(launch)

        for obj, name, new in ((B, 'create_masked_load', masked_load),
                               (B, 'create_masked_store', masked_store),
                               (B, 'create_atomic_rmw', atomic_rmw),
                               (B, 'create_atomic_cas', atomic_cas),
                               (B, 'create_dot', dot),
                               (G, '_init_args_hst', init_args),
                               (G, '__call__', call),
                               (ti, '_patch_lang', patch_lang)):
            self._patches.append((obj, name, getattr(obj, name)))
            setattr(obj, name, new)
        return self

    def __exit__(self, *exc):
        global _ACTIVE
        for obj, name, old in reversed(self._patches):
            setattr(obj, name, old)
        self._patches = []
        _ACTIVE = None
        return False

    # -- recording ----------------------------------------------------------
    def _memo_key(self, ge, args, kwargs):
        if self.memo is None or callable(ge.grid) or self.sample is not None:
            return None
        storages = {}

        def norm(a):
            if torch.is_tensor(a):
                sid = storages.setdefault(a.untyped_storage().data_ptr(),
                                          len(storages))
                return ('T', tuple(a.shape), a.stride(), str(a.dtype),
                        a.storage_offset(), sid)
            if isinstance(a, (int, float, bool, str, type(None))):
                return a
            return ('?', id(a))  # unknown: never equal to another launch

        return (ge.fn.__name__, tuple(ge.grid),
                tuple(norm(a) for a in args),
                tuple(sorted((k, norm(v)) for k, v in kwargs.items())))

    def _set_storages(self, host_args):
        from triton.runtime.jit import TensorWrapper
        from triton.tools.tensor_descriptor import TensorDescriptor
        spans = {}

        def visit(a):
            if isinstance(a, (tuple, list)):
                for b in a:
                    visit(b)
            elif isinstance(a, TensorDescriptor):
                visit(a.base)
            elif isinstance(a, TensorWrapper):
                visit(a.base)
            elif torch.is_tensor(a):
                s = a.untyped_storage()
                spans[s.data_ptr()] = max(spans.get(s.data_ptr(), 0),
                                          s.nbytes())
        visit(host_args)
        starts = np.array(sorted(spans), dtype=np.uint64)
        sizes = np.array([spans[int(s)] for s in starts], dtype=np.uint64)
        vb, base = [], 0
        for sz in sizes:
            vb.append(base)
            base += -(-int(sz) // ALLOC_ALIGN) * ALLOC_ALIGN + ALLOC_ALIGN
        L = self._launch
        L._starts, L._ends = starts, starts + sizes
        L._vbases = np.array(vb, dtype=np.uint64)

    def _record(self, kind, ptrs, mask):
        L, P = self._launch, self._prog
        if L is None or P is None:
            return
        addr = np.asarray(ptrs.data)
        if mask is not None:
            addr = addr[np.broadcast_to(np.asarray(mask.data, dtype=bool),
                                        addr.shape)]
        addr = addr.reshape(-1).astype(np.uint64)
        esize = ptrs.get_element_ty().primitive_bitwidth // 8
        if addr.size == 0:
            P.accesses.append(Access(kind, np.zeros(0, np.int64), 0))
            return
        idx = np.searchsorted(L._starts, addr, side='right').astype(
            np.int64) - 1
        if (idx < 0).any() or (addr + esize > L._ends[np.maximum(idx, 0)]
                               ).any():
            raise RuntimeError(f'{L.name}: an access falls outside every '
                               'tensor argument of the launch')
        vaddr = addr - L._starts[idx] + L._vbases[idx]
        lines = np.unique((vaddr // LINE).astype(np.int64))
        # sectors touched: first and last byte of each element
        sec = np.unique(np.concatenate([vaddr // SECTOR,
                                        (vaddr + esize - 1) // SECTOR]))
        P.accesses.append(Access(kind, lines, int(addr.size) * esize,
                                 int(sec.size)))

    # -- results --------------------------------------------------------------
    def stats(self, l1_share: Optional[Callable] = None) -> List[dict]:
        """Per-launch :meth:`Launch.stats`; ``l1_share(launch) -> bytes``
        (default :func:`l1_share_bytes` ())."""
        return [L.stats(l1_share(L) if l1_share else None)
                for L in self.launches]


def sample_programs(names_prefix: Optional[str] = None, k: int = 4,
                    seed: int = 0):
    """A ``sample=`` policy: ``k`` programs drawn at random (fixed seed,
    without replacement) from the grid of kernels whose name starts with
    ``names_prefix`` (all kernels if None); no program of the other kernels
    runs.  Random rather than evenly spaced, so that the sample does not fall
    on one image column or border row."""

    def f(name, grid):
        if names_prefix is not None and not name.startswith(names_prefix):
            return set()
        g = int(np.prod(grid))
        if g <= k:
            return None
        rng = np.random.default_rng(seed)
        return set(int(i) for i in rng.choice(g, size=k, replace=False))

    return f


# --------------------------------------------------------------------------
# torch ops at the dispatcher
# --------------------------------------------------------------------------
_WRITE_ONLY = {'copy_', 'fill_', 'zero_', 'normal_', 'uniform_',
               'bernoulli_', 'random_', 'exponential_', 'set_',
               'resize_', 'resize_as_'}
# allocations, metadata-only ops and views whose schema does not say so
# (``_unsafe_view``) or that change a tensor's own metadata in place
_FREE = {'empty', 'empty_like', 'empty_strided', 'new_empty',
         'new_empty_strided', 'detach', 'alias', 'lift_fresh',
         '_local_scalar_dense', 'sym_size', 'sym_stride', 'sym_numel',
         'sym_storage_offset', 'device', 'is_same_size', 'set_',
         '_unsafe_view', '_reshape_alias', 'squeeze_', 'unsqueeze_', 't_',
         'transpose_', 'as_strided_', 'detach_', 'resize_', 'swapdims_',
         'swapaxes_'}


def tensor_bytes(t: torch.Tensor) -> int:
    """Distinct bytes a tensor addresses (dims with stride 0 count once)."""
    n = 1
    for s, st in zip(t.shape, t.stride()):
        if s == 0:
            return 0
        if st != 0:
            n *= s
    return n * t.element_size()


def gemm_flops(func, args, out) -> int:
    """FLOPs (2 per multiply-add) of GEMM / convolution aten ops, else 0."""
    name = func.overloadpacket.__name__
    if name in ('mm', 'addmm', '_addmm_activation'):
        a, b = (args[0], args[1]) if name == 'mm' else (args[1], args[2])
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    if name in ('bmm', 'baddbmm'):
        a, b = (args[0], args[1]) if name == 'bmm' else (args[1], args[2])
        return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    if name in ('convolution', '_convolution', 'cudnn_convolution',
                'convolution_overrideable'):
        w = args[1]
        o = out[0] if isinstance(out, (tuple, list)) else out
        return 2 * o.numel() * int(np.prod(w.shape[1:]))
    if name == 'convolution_backward':
        grad_out, w = args[0], args[2]
        mask = args[-1]
        per = 2 * grad_out.numel() * int(np.prod(w.shape[1:]))
        return per * (int(bool(mask[0])) + int(bool(mask[1])))
    return 0


# The L2 view of a library GEMM (cuBLAS is opaque): a tiled kernel reads A
# once per column tile and B once per row tile.  Tile assumed for cuBLAS on
# sm_90 at these sizes: 256 x 128 (M x N; the largest common bf16 tile, i.e.
# the fewest re-reads: generous to cuBLAS).  The Triton GEMMs' L2 view is
# recorded, not assumed.
CUBLAS_TILE_M, CUBLAS_TILE_N = 256, 128


def gemm_l2_bytes(func, args, out) -> Optional[int]:
    """Modelled L2 -> SM bytes of a GEMM aten op (tiled re-reads of A and B,
    plus the bias/C input and the output once), else None."""
    name = func.overloadpacket.__name__
    if name not in ('mm', 'addmm', '_addmm_activation', 'bmm', 'baddbmm'):
        return None
    a, b = (args[0], args[1]) if name in ('mm', 'bmm') else (args[1],
                                                             args[2])
    M, N = a.shape[-2], b.shape[-1]
    l2 = tensor_bytes(a) * -(-N // CUBLAS_TILE_N) + \
        tensor_bytes(b) * -(-M // CUBLAS_TILE_M)
    if name in ('addmm', '_addmm_activation', 'baddbmm'):
        l2 += tensor_bytes(args[0])
    o = out[0] if isinstance(out, (tuple, list)) else out
    return l2 + tensor_bytes(o)


class AtenTraffic(TorchDispatchMode):
    """Counts every aten op dispatched while active into ``records``
    (``dict(op, in_B, out_B, flops, l2_B)``; ``l2_B`` = in + out except
    for GEMMs: :func:`gemm_l2_bytes`).  Views and allocations are free;
    a mutated argument counts as written (and as read unless the op only
    writes it, e.g. ``copy_``)."""

    def __init__(self):
        super().__init__()
        self.records: List[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name in _FREE or func.namespace == 'prim':
            return out
        schema = func._schema
        written = []  # argument tensors the op writes
        read_in = 0
        flat_named = list(zip(schema.arguments, args)) + [
            (a, kwargs[a.name]) for a in schema.arguments if a.name in kwargs]
        for a, v in flat_named:
            ts = [t for t in tree_flatten(v)[0] if torch.is_tensor(t)]
            w = a.alias_info is not None and a.alias_info.is_write
            for t in ts:
                if w:
                    written.append(t)
                    if name in _WRITE_ONLY or a.name == 'out' or \
                            name.endswith('_out'):
                        continue
                read_in += tensor_bytes(t)
        if written:  # in-place / out=: the written arguments are the output
            out_b = sum(tensor_bytes(t) for t in written)
        else:
            out_b = sum(tensor_bytes(t) for t in tree_flatten(out)[0]
                        if torch.is_tensor(t))
        l2 = gemm_l2_bytes(func, args, out)
        self.records.append(dict(op=name, in_B=read_in, out_B=out_b,
                                 flops=gemm_flops(func, args, out),
                                 l2_B=read_in + out_b if l2 is None else l2))
        return out


def aggregate_aten(records: List[dict]) -> List[dict]:
    """Per-op totals (first-seen order): calls, bytes (in + out), flops,
    l2_B (the L2 view, see :class:`AtenTraffic`)."""
    agg: Dict[str, dict] = {}
    for r in records:
        a = agg.setdefault(r['op'], dict(kernel=r['op'], calls=0, bytes=0,
                                         flops=0, l2_B=0))
        a['calls'] += 1
        a['bytes'] += r['in_B'] + r['out_B']
        a['flops'] += r['flops']
        a['l2_B'] += r.get('l2_B', r['in_B'] + r['out_B'])
    return list(agg.values())


class NoComputeMode(TorchDispatchMode):
    """Runs views (and ops without tensor arguments) as usual; every other
    aten op gets uninitialised outputs of the shapes/strides/dtypes its meta
    kernel gives (mutated arguments are returned as they are).  For driving
    host functions at the real shape when only Triton addresses matter."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = [t for t in tree_flatten((args, kwargs))[0]
                if torch.is_tensor(t)]
        if func.is_view or not flat or func.namespace == 'prim' or \
                func.overloadpacket.__name__ in _FREE:
            return func(*args, **kwargs)
        dev = flat[0].device

        def to_meta(t):
            return t.to('meta') if torch.is_tensor(t) else t

        margs, mkw = tree_map(to_meta, args), tree_map(to_meta, kwargs)
        mout = func(*margs, **mkw)
        schema = func._schema
        mutated = {}
        for i, a in enumerate(schema.arguments):
            if a.alias_info is not None and a.alias_info.is_write:
                v = args[i] if i < len(args) else kwargs.get(a.name)
                if torch.is_tensor(v):
                    mutated[len(mutated)] = v
        outs = []
        mflat, spec = tree_flatten(mout)
        k = 0
        for i, (r, m) in enumerate(zip(schema.returns, mflat)):
            if r.alias_info is not None and r.alias_info.is_write and \
                    k in mutated:
                outs.append(mutated[k])
                k += 1
            elif torch.is_tensor(m):
                outs.append(torch.empty_strided(m.shape, m.stride(),
                                                dtype=m.dtype, device=dev))
            else:
                outs.append(m)
        outs += mflat[len(outs):]
        from torch.utils._pytree import tree_unflatten
        return tree_unflatten(outs, spec)


# --------------------------------------------------------------------------
# the reference under CUDA autocast, without a GPU
# --------------------------------------------------------------------------
@contextmanager
def cuda_autocast(dtype=torch.bfloat16):
    """CUDA's autocast state, set directly: ``torch.autocast('cuda')``
    disables itself on a machine without a CUDA device, but its dispatch key
    works on fake CUDA tensors."""
    prev = (torch.is_autocast_enabled('cuda'),
            torch.get_autocast_dtype('cuda'))
    torch.set_autocast_enabled('cuda', True)
    torch.set_autocast_dtype('cuda', dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled('cuda', prev[0])
        torch.set_autocast_dtype('cuda', prev[1])


def amp_reference_graph(module: torch.nn.Module, x_shape, x_dtype,
                        amp_dtype=torch.bfloat16,
                        memory_format=torch.channels_last):
    """Trace ``module(x)`` at the aten level under CUDA autocast on fake CUDA
    tensors (no compute).  Returns ``(graph_module, param_names)``; call the
    graph as ``gm(x, *params)`` (the autocast casts are explicit nodes)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.func import functional_call
    names = [n for n, _ in module.named_parameters()]
    meta = {n: (p.shape, p.dtype) for n, p in module.named_parameters()}

    def f(x, *ps):
        return functional_call(module, dict(zip(names, ps)), (x, ))

    fm = FakeTensorMode()
    with fm:
        x = torch.empty(x_shape, device='cuda', dtype=x_dtype).contiguous(
            memory_format=memory_format)
        ps = [torch.empty(meta[n][0], device='cuda', dtype=meta[n][1])
              for n in names]
    with cuda_autocast(amp_dtype):
        gm = make_fx(f, tracing_mode='fake')(x, *ps)
    for node in gm.graph.nodes:  # replay on CPU: drop any hard-coded device
        if 'device' in node.kwargs:
            node.kwargs = {**node.kwargs, 'device': torch.device('cpu')}
    gm.recompile()
    return gm, [(n, meta[n]) for n in names]


def count_amp_reference(module: torch.nn.Module, x_shape, x_dtype,
                        amp_dtype=torch.bfloat16, backward=True):
    """Dispatcher records of ``module`` forward (and backward) under CUDA
    bf16 autocast at ``x_shape`` (channels_last), computed on fake tensors:
    ``{'fwd': records, 'bwd': records}``."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    gm, params = amp_reference_graph(module, x_shape, x_dtype, amp_dtype)
    out = {}
    with FakeTensorMode():
        x = torch.empty(x_shape, dtype=x_dtype).contiguous(
            memory_format=torch.channels_last).requires_grad_(backward)
        ps = [torch.empty(s, dtype=d).requires_grad_(backward)
              for _, (s, d) in params]
        with AtenTraffic() as fwd:
            y = gm(x, *ps)
        y = y[0] if isinstance(y, (list, tuple)) else y
        out['fwd'] = fwd.records
        if backward:
            dy = torch.empty_like(y)
            with AtenTraffic() as bwd:
                torch.autograd.backward([y], [dy])
            out['bwd'] = bwd.records
    return out


# --------------------------------------------------------------------------
# the reuse gate
# --------------------------------------------------------------------------
REUSE_FACTOR = 1.25


def reuse_gate_failure(stats: dict, factor: float = REUSE_FACTOR,
                       where: str = '') -> Optional[str]:
    """``None`` if the launch's L2-view bytes are at most ``factor`` x the
    sum over programs of each program's own footprint (each program reads
    its tile and halo about once), else a message naming the kernel and the
    two byte counts."""
    l2, own = stats['l2_B'], stats['own_footprint_B']
    if l2 <= factor * own:
        return None
    return (f"{stats['kernel']}{' at ' + where if where else ''}: L2-view "
            f'{l2:.0f} B > {factor} x own footprint {own:.0f} B '
            f'(= {factor * own:.0f} B; ratio {l2 / max(own, 1):.2f}) over '
            f"{stats['programs_run']} of {stats['programs']} programs")
