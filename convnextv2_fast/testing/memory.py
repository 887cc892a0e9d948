"""Count the bytes autograd saves for backward (activation memory), and the
live tensor bytes over a forward/backward (peak allocated).

Both work on real tensors and under ``FakeTensorMode`` (storages are told apart
by their identity, not their data pointer, which fake storages lack), so the
memory suite gets exact numbers at the real V2-B shape without compute.

Used by the fused-block tests (recompute must keep <= 8 B per block element),
``benchmarks/bench_block.py`` and ``benchmarks/bench_memory.py``.
"""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storage_key(t: torch.Tensor) -> int:
    """Identity of ``t``'s storage (shared by its views; fake tensors too)."""
    return t.untyped_storage()._cdata


class SavedTensorBytes:
    """Context manager: sum of the unique storages saved for backward.

    Parameters (and any tensor listed in ``exclude``) are not counted: they
    exist regardless of what autograd keeps.  Storages are deduplicated, so a
    tensor saved twice (or a view of a saved tensor) counts once.
    """

    def __init__(self, exclude=()):
        self._exclude = {_storage_key(t) for t in exclude}
        self._seen = set()
        self.bytes = 0

    def _pack(self, t):
        if torch.is_tensor(t) and not isinstance(t, torch.nn.Parameter):
            st = t.untyped_storage()
            key = st._cdata
            if key not in self._exclude and key not in self._seen and st.nbytes():
                self._seen.add(key)
                self.bytes += st.nbytes()
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(
            self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False



class LiveTensorBytes(TorchDispatchMode):
    """Dispatch mode: bytes of the tensor storages that ops create, while they
    are alive (``live``), and the maximum of that (``peak``).

    Every output storage of every op dispatched inside the mode is registered
    once and released, through a weakref finalizer, when its last tensor dies.
    Storages of the tensors in ``exclude`` (parameters, inputs) are never
    counted, not even through a view an op returns: report them separately.  An op is counted at its boundary: a
    custom op (e.g. ``convnextv2_fast::block_fwd``) counts its outputs, not the
    workspace it allocates and frees inside.  Not modelled: allocator rounding
    and caching, cuBLAS/cuDNN workspaces.  ``mark()`` starts a new peak window
    (e.g. the backward) and returns the previous window's peak.
    """

    def __init__(self, exclude=()):
        super().__init__()
        self._exclude = {_storage_key(t) for t in exclude}
        self._sizes = {}
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._register(t)
        return out

    def _register(self, t):
        st = t.untyped_storage()
        key, n = st._cdata, st.nbytes()
        if key in self._exclude:
            return
        old = self._sizes.get(key)
        if old is None:
            weakref.finalize(st, self._release, key)
            old = 0
        if n > old:  # new storage, or an in-place resize grew it
            self._sizes[key] = n
            self.live += n - old
            self.peak = max(self.peak, self.live)

    def _release(self, key):
        self.live -= self._sizes.pop(key, 0)

    def mark(self) -> int:
        """Return the current window's peak and start a new window."""
        peak, self.peak = self.peak, self.live
        return peak


# CUDA autocast ops that run in fp32 but that CPU autocast runs in the lower
# precision (or leaves alone): the ones a ConvNeXt V2 forward reaches.  The
# list is checked op for op by tests/test_memory_suite.py (a fake-CUDA
# forward's trace against the emulated fake-CPU one).
# ``layer_norm``: CUDA's ``fp32`` policy (floating inputs cast to fp32);
# ``linalg_vector_norm``: CUDA's ``fp32_append_dtype`` policy (``dtype=fp32``
# appended, no fp32 copy of the input).
CUDA_FP32_AUTOCAST_OPS = ('layer_norm', 'linalg_vector_norm')
_APPEND_DTYPE_OPS = ('linalg_vector_norm', )


class CudaAutocastOnCpu:
    """Context manager: CPU autocast follows CUDA autocast's fp32 policy for
    :data:`CUDA_FP32_AUTOCAST_OPS`.

    Why: the memory suite needs a backward, and the autograd engine cannot run
    a backward on fake CUDA tensors without a CUDA device; on (fake) CPU
    tensors it can, and with this policy the CPU autocast forward has the
    CUDA dtypes.  Registrations are removed on exit.
    """

    def __enter__(self):
        import warnings
        self._lib = torch.library.Library('aten', 'IMPL')
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # "overriding a kernel"
            for name in CUDA_FP32_AUTOCAST_OPS:
                self._lib.impl(name, _fp32_kernel(name), 'AutocastCPU')
        return self

    def __exit__(self, *exc):
        self._lib._destroy()
        return False


def _fp32_kernel(name):
    op_name, _, overload = name.partition('.')
    op = getattr(getattr(torch.ops.aten, op_name), overload or 'default')
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def cast(a):
        if isinstance(a, torch.Tensor) and a.is_floating_point() and \
                a.dtype != torch.float64:
            return a.float()
        return a

    def kernel(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(keys):
            if name in _APPEND_DTYPE_OPS:
                x = args[0]
                if x.is_floating_point() and x.dtype != torch.float64:
                    kwargs = dict(kwargs, dtype=torch.float32)
                return op(*args, **kwargs)
            return op(*[cast(a) for a in args],
                      **{k: cast(v) for k, v in kwargs.items()})

    return kernel
