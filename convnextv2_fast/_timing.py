"""The one timer of the project: benchmarks and the ``impl='auto'`` tuner.

Median/min/max milliseconds of a callable, CUDA events on a GPU (host clock
elsewhere), after warm-up.  No ``torch.cuda`` call at import.
"""
import statistics
import time
from typing import Callable, Dict

import torch


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 3,
            iters: int = 10) -> Dict[str, float]:
    """Median/min/max milliseconds of ``fn`` (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
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
    return dict(median_ms=statistics.median(times), min_ms=min(times),
                max_ms=max(times), iters=iters)
