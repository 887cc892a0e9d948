"""Shared helpers of the fused-op tests (parity of outputs and all grads)."""
import contextlib

import pytest
import torch

from convnextv2_fast.testing import assert_close_to_ref

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@contextlib.contextmanager
def poisoned_empty():
    """Make ``torch.empty``/``empty_like`` return NaN-filled float tensors, so
    an element a kernel forgets to write fails the parity check."""
    real_empty, real_like = torch.empty, torch.empty_like

    def empty(*a, **k):
        t = real_empty(*a, **k)
        if t.dtype in _FLOATS:
            t.fill_(float('nan'))
        return t

    def empty_like(*a, **k):
        t = real_like(*a, **k)
        if t.dtype in _FLOATS:
            t.fill_(float('nan'))
        return t

    torch.empty, torch.empty_like = empty, empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_like


def run_with_grads(fn, inputs, dtype, grad_out, poison=False, device='cpu'):
    """Cast ``inputs`` to ``dtype`` (leaves requiring grad), run ``fn``,
    backprop ``grad_out``; return [output, grad_0, grad_1, ...]."""
    leaves = [t.detach().to(device, dtype).requires_grad_() for t in inputs]
    grad_out = grad_out.to(device)
    ctx = poisoned_empty() if poison else contextlib.nullcontext()
    with ctx:
        out = fn(*leaves)
        out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def check_parity(names, fn, ref_fn, inputs, dtype, grad_out, hi=torch.float64,
                 device='cpu'):
    """Kernel vs same-dtype reference vs fp64 reference, output and every
    gradient, with the project's 2x-reference-error rule."""
    cand = run_with_grads(fn, inputs, dtype, grad_out, poison=True,
                          device=device)
    same = run_with_grads(ref_fn, inputs, dtype, grad_out, device=device)
    high = run_with_grads(ref_fn, inputs, hi, grad_out, device=device)
    assert len(names) == len(cand)
    for name, c, s, h in zip(names, cand, same, high):
        assert c is not None, f'{name}: no gradient'
        assert c.dtype == s.dtype, f'{name}: dtype {c.dtype} != {s.dtype}'
        assert_close_to_ref(name, c, s, h, dtype=dtype)


# the interpreter's tiles and the GPU's (CONVNEXTV2_FAST_GPU_CONFIG=1) for
# the op tests that run both
GPU_CONFIGS = pytest.mark.parametrize('gpu_config', [False, True],
                                      ids=['interp_tiles', 'gpu_tiles'])


def set_gpu_config(monkeypatch, on: bool):
    """Make ``use_gpu_config()`` (every op's launch_config) answer ``on``."""
    monkeypatch.setenv('CONVNEXTV2_FAST_GPU_CONFIG', '1' if on else '0')
