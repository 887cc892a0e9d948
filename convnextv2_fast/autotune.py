"""The measured ``impl='auto'`` choice: fused or reference, per block shape.

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
import statistics
import threading
import warnings
from typing import Callable, Dict, Optional

import torch

TUNE_ENV = 'CONVNEXTV2_FAST_AUTOTUNE'
CACHE_DIR_ENV = 'CONVNEXTV2_FAST_CACHE_DIR'
CACHE_FILE = 'impl_choice.json'
_FORMAT = 1  # bump when the key or the timing protocol changes

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


def device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return device.type


def _cuda_event_timer(fn: Callable[[], object], device: torch.device,
                      warmup: int = 2, reps: int = 5) -> float:
    """Median milliseconds of ``fn`` (CUDA events; host clock elsewhere)."""
    import time
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == 'cuda':
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


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


def block_key(block, x: torch.Tensor, compute_dtype: torch.dtype,
              training: bool) -> str:
    """The cache key: block shape, dtypes, memory format and mode."""
    N, C, H, W = x.shape
    cl = x.is_contiguous(memory_format=torch.channels_last) and \
        not x.is_contiguous()
    params = _dtype_name(block.depthwise_conv.weight.dtype)
    return (f'N{N}-C{C}-H{H}-W{W}-x:{_dtype_name(x.dtype)}-'
            f'cd:{_dtype_name(compute_dtype)}-p:{params}-'
            f'{"nhwc" if cl else "nchw"}-ls:{int(block.gamma is not None)}-'
            f'{"train" if training else "infer"}-v{_FORMAT}')


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
    """Milliseconds of one block call on ``path`` ('triton'|'reference');
    inf when the path fails."""
    params = [p for p in block.parameters() if p.requires_grad]
    xin = torch.randn_like(x).requires_grad_(training)
    run = block._fused_forward if path == 'triton' else \
        block._reference_forward

    def step():
        out = run(xin)
        if training:
            grads = torch.autograd.grad(
                out, [xin] + params, grad_outputs=torch.ones_like(out),
                allow_unused=True)
            del grads
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
    """'triton' or 'reference' for ``block`` on inputs like ``x``."""
    dev = device_name(x.device)
    key = block_key(block, x, compute_dtype, training)
    with _LOCK:
        entry = _load(dev).get(key)
    if entry is not None:
        return entry['choice']
    if not tuning_enabled() or torch.compiler.is_compiling():
        return 'triton'
    devices = [x.device] if x.device.type == 'cuda' else []
    with torch.random.fork_rng(devices=devices):
        fused_ms = _time_path(block, x, 'triton', training)
        ref_ms = _time_path(block, x, 'reference', training)
    choice = 'triton' if fused_ms <= ref_ms else 'reference'
    if fused_ms == float('inf') and ref_ms == float('inf'):
        choice = 'reference'
    entry = dict(choice=choice, fused_ms=fused_ms, reference_ms=ref_ms,
                 torch=torch.__version__)
    with _LOCK:
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
