"""The measured ``impl='auto'`` choice: fused or reference, per block shape.

Paths: ``'reference'``, ``'triton'`` (the fused block with cuBLAS GEMMs) and
``'triton_mlp'`` (the fused block with the Triton GEMMs of
:mod:`convnextv2_fast.ops.mlp_gemm`); the two fused MLPs are both timed
unless the block (``fused_mlp``) or ``CONVNEXTV2_FAST_MLP`` fixes one.

``impl='auto'`` must never make a user's training slower than the reference.
On first use per (GPU, block shape, dtypes, training/inference) a block is
timed both ways on random data of the same shape, dtype and memory format
(forward; forward+backward when training: ``torch.autograd.grad``, so no
``.grad`` is touched; under ``torch.random.fork_rng``, so the caller's random
stream -- drop path -- is unchanged) and the faster one is kept.  Choices are
cached per device in memory and on disk (JSON), so the timing happens once
per machine, not once per process.

Knobs:

* ``CONVNEXTV2_FAST_AUTOTUNE=0`` turns the timing off: ``auto`` then uses the
  fused path wherever it is supported (the pre-tuning behaviour).
* ``CONVNEXTV2_FAST_CACHE_DIR`` (default ``~/.cache/convnextv2_fast``) holds
  ``impl_choice.json``; ``python -m convnextv2_fast.info`` prints it.

Timing never happens while ``torch.compile`` traces (the cached choice, or
the fused path when none is cached, is used), and a failure of either path
while timing is recorded as a loss for that path, never raised.  The timer is
injectable (:func:`set_timer`) so the logic is tested on a CPU.

Note for DDP: each rank tunes on its own first batch; both paths compute the
same function, so a disagreement between ranks costs speed, not correctness.
"""
import json
import os
import threading
import warnings
from typing import Callable, Dict, Optional

import torch

from ._timing import time_fn
from .version import __version__

TUNE_ENV = 'CONVNEXTV2_FAST_AUTOTUNE'
CACHE_DIR_ENV = 'CONVNEXTV2_FAST_CACHE_DIR'
CACHE_FILE = 'impl_choice.json'
_FORMAT = 2  # bump when the key or the timing protocol changes
# path name -> the fused block's MLP (what ConvNeXtV2Block._use_fused returns)
PATH_MLP = {'triton': 'cublas', 'triton_mlp': 'triton'}
MLP_PATH = {v: k for k, v in PATH_MLP.items()}

_LOCK = threading.Lock()
_MEMORY: Dict[str, Dict[str, dict]] = {}  # device name -> key -> entry
_LOADED = set()


def tuning_enabled() -> bool:
    return os.environ.get(TUNE_ENV, '1').strip().lower() not in (
        '0', 'false', 'no', 'off')


def cache_path() -> str:
    root = os.environ.get(CACHE_DIR_ENV) or os.path.join(
        os.path.expanduser('~'), '.cache', 'convnextv2_fast')
    return os.path.join(root, CACHE_FILE)


_DEVICE_NAMES: Dict[tuple, str] = {}


def device_name(device: torch.device) -> str:
    """GPU name (cached per device: this runs on every block call)."""
    key = (device.type, device.index)
    name = _DEVICE_NAMES.get(key)
    if name is None:
        name = (torch.cuda.get_device_name(device) if device.type == 'cuda'
                else device.type)
        _DEVICE_NAMES[key] = name
    return name


def _cuda_event_timer(fn: Callable[[], object], device: torch.device,
                      warmup: int = 2, reps: int = 5) -> float:
    """Median milliseconds of ``fn`` (CUDA events; host clock elsewhere)."""
    return time_fn(fn, device, warmup=warmup, iters=reps)['median_ms']


_TIMER: Callable[[Callable[[], object], torch.device], float] = \
    _cuda_event_timer


def set_timer(timer: Optional[Callable]) -> None:
    """Replace the timer ``(fn, device) -> ms`` (None restores the default).
    Tests inject one to drive the choice deterministically on a CPU."""
    global _TIMER
    _TIMER = timer or _cuda_event_timer


def clear_memory_cache() -> None:
    with _LOCK:
        _MEMORY.clear()
        _LOADED.clear()


def _dtype_name(dtype) -> str:
    return str(dtype).replace('torch.', '')


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except Exception:  # pragma: no cover - no triton: never tuned anyway
        return 'none'


def size_bucket(M: int) -> int:
    """Pixels per block call (N*H*W) rounded up to a power of two: mmdet
    feeds many padded image sizes, and the fused/reference ratio moves with
    the size, not with the exact H and W; one timing per bucket."""
    return 1 << max(0, int(M) - 1).bit_length()


def block_key(block, x: torch.Tensor, compute_dtype: torch.dtype,
              training: bool) -> str:
    """The cache key: channels, pixel bucket, dtypes, memory format, layer
    scale, recompute, mode, and the versions whose kernels were timed (a new
    package, Triton or torch version times again)."""
    from .ops.fused_block import mlp_for, recompute_enabled
    N, C, H, W = x.shape
    cl = x.is_contiguous(memory_format=torch.channels_last) and \
        not x.is_contiguous()
    params = _dtype_name(block.depthwise_conv.weight.dtype)
    return (f'C{C}-M<={size_bucket(N * H * W)}-x:{_dtype_name(x.dtype)}-'
            f'cd:{_dtype_name(compute_dtype)}-p:{params}-'
            f'{"nhwc" if cl else "nchw"}-ls:{int(block.gamma is not None)}-'
            f'rc:{int(recompute_enabled(block))}-'
            f'mlp:{mlp_for(block) or "any"}-'
            f'{"train" if training else "infer"}-'
            f'v{__version__}-triton{_triton_version()}-torch{torch.__version__}'
            f'-f{_FORMAT}')


def _load(dev: str) -> Dict[str, dict]:
    if dev not in _LOADED:
        _LOADED.add(dev)
        entries = {}
        try:
            with open(cache_path()) as f:
                entries = json.load(f).get(dev, {})
        except (OSError, ValueError):
            pass
        _MEMORY.setdefault(dev, {}).update(entries)
    return _MEMORY.setdefault(dev, {})


def _store(dev: str, key: str, entry: dict) -> None:
    _MEMORY.setdefault(dev, {})[key] = entry
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = {}
        data.setdefault(dev, {})[key] = entry
        tmp = f'{path}.{os.getpid()}.tmp'
        with open(tmp, 'w') as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: concurrent ranks never see a torn file
    except OSError as exc:  # read-only home: keep the in-memory choice
        warnings.warn(f'convnextv2_fast: cannot write the impl cache {path} '
                      f'({exc}); choices are kept for this process only.',
                      RuntimeWarning, stacklevel=3)


def cached_choices(device: Optional[str] = None) -> Dict[str, Dict[str, dict]]:
    """All cached entries (from disk and this process), per device name."""
    data = {}
    try:
        with open(cache_path()) as f:
            data = json.load(f)
    except (OSError, ValueError):
        pass
    for dev, entries in _MEMORY.items():
        data.setdefault(dev, {}).update(entries)
    if device is not None:
        return {device: data.get(device, {})}
    return data


def _time_path(block, x, path: str, training: bool) -> float:
    """Milliseconds of one block call on ``path`` (a :data:`PATH_MLP` key
    or 'reference'); inf when the path fails."""
    params = [p for p in block.parameters() if p.requires_grad]
    xin = torch.randn_like(x).requires_grad_(training)
    if path == 'reference':
        run = block._reference_forward
    else:
        def run(t):
            return block._fused_forward(t, mlp=PATH_MLP[path])

    def step():
        out = run(xin)
        if training:
            torch.autograd.grad(out, [xin] + params,
                                grad_outputs=torch.ones_like(out),
                                allow_unused=True)
        return out

    try:
        with torch.set_grad_enabled(training):
            return float(_TIMER(step, x.device))
    except Exception as exc:  # a failing path loses; never break the forward
        warnings.warn(f'convnextv2_fast: {path} block failed while tuning '
                      f'({type(exc).__name__}: {exc}); it is not used for '
                      'this shape.', RuntimeWarning, stacklevel=3)
        return float('inf')


def choose(block, x: torch.Tensor, compute_dtype: torch.dtype,
           training: bool) -> str:
    """The fastest path ('triton', 'triton_mlp' or 'reference') for
    ``block`` on inputs like ``x``."""
    from .ops.fused_block import mlp_for
    dev = device_name(x.device)
    key = block_key(block, x, compute_dtype, training)
    with _LOCK:
        entry = _load(dev).get(key)
    if entry is not None:
        return entry['choice']
    if (not tuning_enabled() or torch.compiler.is_compiling()
            or torch._C._autograd._top_saved_tensors_default_hooks(False)
            is not None):
        # not timed: disabled, tracing, or inside saved-tensor hooks (e.g.
        # activation checkpointing or offloading: the timing graph must not
        # go through them); the fused path, nothing cached
        return MLP_PATH[mlp_for(block) or 'cublas']
    fixed = mlp_for(block)
    fused_paths = [MLP_PATH[fixed]] if fixed else ['triton', 'triton_mlp']
    devices = [x.device] if x.device.type == 'cuda' else []
    times = {}
    with torch.random.fork_rng(devices=devices):
        for path in fused_paths + ['reference']:
            times[path] = _time_path(block, x, path, training)
    # ties go to the earlier path: the fused cuBLAS path, then the Triton MLP
    order = list(times)
    choice = min(times, key=lambda p: (times[p], order.index(p)))
    if all(t == float('inf') for t in times.values()):
        choice = 'reference'
    fused_ms = min(times[p] for p in fused_paths)
    ref_ms = times['reference']
    entry = dict(choice=choice, fused_ms=fused_ms, reference_ms=ref_ms,
                 shape=list(x.shape),
                 times_ms={p: times[p] for p in fused_paths})
    with _LOCK:
        if any(t == float('inf') for t in times.values()):
            # a failure (e.g. a transient OOM) decides this process only
            _MEMORY.setdefault(dev, {})[key] = entry
        else:
            _store(dev, key, entry)
    return choice


def describe() -> str:
    """Multi-line text for ``python -m convnextv2_fast.info``."""
    lines = [f'tuning {"on" if tuning_enabled() else "off"} ({TUNE_ENV}), '
             f'cache {cache_path()}']
    for dev, entries in sorted(cached_choices().items()):
        for key, e in sorted(entries.items()):
            lines.append(f'  {dev} | {key} -> {e.get("choice")} (fused '
                         f'{e.get("fused_ms", float("nan")):.3g} ms, '
                         f'reference {e.get("reference_ms", float("nan")):.3g}'
                         ' ms)')
    if len(lines) == 1:
        lines.append('  (no cached choices yet)')
    return '\n'.join(lines)
