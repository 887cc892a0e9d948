"""Helpers shared by the Triton ops (validation, block-size choice).

No ``torch.cuda`` call happens here at import time.
"""
import os

import torch
import triton

from .._errors import ArgumentError
from ..impl import is_interpreter  # noqa: F401  (re-exported to the ops)
from . import _triton_compat  # noqa: F401  (fixes triton 3.6's interpreter on import)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def use_gpu_config() -> bool:
    """Whether launch-config functions pick the GPU's tiles: always on a GPU;
    under the interpreter only with ``CONVNEXTV2_FAST_GPU_CONFIG=1`` (tests
    run the exact GPU configuration on small cases this way)."""
    return (not is_interpreter()
            or os.environ.get('CONVNEXTV2_FAST_GPU_CONFIG', '0') == '1')


def check_tensor(t, name, ndim=None, dtypes=SUPPORTED_DTYPES, contiguous=True,
                 shape=None):
    """Validate ``t``; raise TypeError / ArgumentError naming ``name``."""
    if not torch.is_tensor(t):
        raise TypeError(f'{name} must be a torch.Tensor, got {type(t)}.')
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(
            f'{name} must have dtype in {[str(d) for d in dtypes]}, '
            f'got {t.dtype}.')
    if ndim is not None and t.dim() != ndim:
        raise ArgumentError(
            f'{name} must be {ndim}-D, got shape {tuple(t.shape)}.')
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ArgumentError(
            f'{name} must have shape {tuple(shape)}, got {tuple(t.shape)}.')
    if contiguous and not t.is_contiguous():
        raise ArgumentError(f'{name} must be contiguous (stride '
                            f'{t.stride()} for shape {tuple(t.shape)}).')
    return t


def check_same_device(name_tensor_pairs):
    devs = {t.device for _, t in name_tensor_pairs if t is not None}
    if len(devs) > 1:
        names = ', '.join(n for n, t in name_tensor_pairs if t is not None)
        raise ArgumentError(f'{names} must be on one device, got {devs}.')


def pixel_block(block_c: int) -> int:
    """Pixels per program for a [BLOCK_P, BLOCK_C] tile.

    The interpreter pays ~ms per program instance, so it gets big tiles; on a
    GPU the tile is kept at ~4K fp32 values (registers).
    """
    interp = not use_gpu_config()
    budget = 16384 if interp else 4096
    return max(1, min(256 if interp else 64, budget // block_c))


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(int(n))
