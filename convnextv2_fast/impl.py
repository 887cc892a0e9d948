"""Which implementation of the block runs: ``reference`` (pure PyTorch) or ``triton``.

``impl='auto'`` considers the fused Triton path for CUDA tensors when Triton
and the fused ops are importable, the reference path otherwise; the block then
keeps whichever of the two it measured faster for its shape
(:mod:`convnextv2_fast.autotune`).  ``impl='triton'``
forces the fused path (CPU tensors only under ``TRITON_INTERPRET=1``).  The
environment variable ``CONVNEXTV2_FAST_IMPL`` overrides the constructor
argument for every model in the process.

No ``torch.cuda`` call happens at import time.
"""
import functools
import importlib
import importlib.util
import os
from typing import Optional, Tuple

import torch

from ._errors import ArgumentError

VALID_IMPLS = ('auto', 'reference', 'triton')
ENV_VAR = 'CONVNEXTV2_FAST_IMPL'


def check_impl(impl, name: str = 'impl') -> str:
    """Validate an impl value; raise :class:`ArgumentError` naming ``name``."""
    if not isinstance(impl, str) or impl not in VALID_IMPLS:
        raise ArgumentError(
            f'{name} must be one of {VALID_IMPLS}, got {impl!r}.')
    return impl


def env_impl() -> Optional[str]:
    """The value of ``CONVNEXTV2_FAST_IMPL`` (validated), or None if unset."""
    value = os.environ.get(ENV_VAR, '').strip()
    if not value:
        return None
    return check_impl(value, name=f'environment variable {ENV_VAR}')


def is_interpreter() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get('TRITON_INTERPRET', '0') == '1'


@functools.lru_cache(maxsize=None)
@torch.compiler.assume_constant_result  # torch.compile: do not trace imports
def triton_status() -> Tuple[bool, str]:
    """(available, reason): whether Triton imports and its version or error."""
    if importlib.util.find_spec('triton') is None:
        return False, 'triton is not installed'
    try:
        triton = importlib.import_module('triton')
    except Exception as exc:  # pragma: no cover - broken installs only
        return False, f'import triton failed: {exc!r}'
    return True, f'triton {triton.__version__}'


@functools.lru_cache(maxsize=None)
@torch.compiler.assume_constant_result  # torch.compile: do not trace imports
def fused_status() -> Tuple[bool, str]:
    """(available, reason): whether the fused Triton block ops import."""
    ok, why = triton_status()
    if not ok:
        return False, why
    try:
        importlib.import_module('convnextv2_fast.ops.fused_block')
    except ImportError as exc:
        return False, f'fused Triton block ops not importable: {exc}'
    return True, 'fused Triton block ops available'


def effective_impl(impl: str) -> str:
    """The requested impl after the environment override."""
    return env_impl() or check_impl(impl)


def resolve_impl(impl: str, device: torch.device) -> str:
    """Return 'reference' or 'triton' for a tensor on ``device``.

    Raises ``RuntimeError`` when 'triton' is forced but cannot run here.
    """
    impl = effective_impl(impl)
    if impl == 'reference':
        return 'reference'
    fused_ok, why = fused_status()
    runnable = device.type == 'cuda' or (device.type == 'cpu' and is_interpreter())
    if impl == 'auto':
        return 'triton' if fused_ok and device.type == 'cuda' else 'reference'
    # impl == 'triton'
    if not fused_ok:
        raise RuntimeError(f"impl='triton' was requested but {why}.")
    if not runnable:
        raise RuntimeError(
            f"impl='triton' needs CUDA tensors (or CPU tensors with "
            f'TRITON_INTERPRET=1); got a tensor on {device}.')
    return 'triton'


def auto_choice_description() -> str:
    """Human sentence: what impl='auto' picks on this machine (for info)."""
    override = os.environ.get(ENV_VAR)
    fused_ok, why = fused_status()
    if override:
        head = f'{ENV_VAR}={override} overrides the constructor argument; '
    else:
        head = ''
    if fused_ok:
        return head + ("auto -> per block shape on CUDA, the faster of 'triton' "
                       "and 'reference' (timed once, cached; see tuning "
                       "below); 'reference' for CPU tensors")
    return head + f"auto -> 'reference' everywhere ({why})"
