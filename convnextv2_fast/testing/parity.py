"""The project's parity rule, used by every kernel test.

``err(candidate vs hi-precision ref) <= 2 * err(PyTorch same-dtype vs ref) + floor``
with floors fp32 1e-4, fp16 1e-2, bf16 5e-2 (flash-attention / Liger style).
Both errors are printed before asserting, so a passing run documents itself.
"""
import torch

FLOORS = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2,
          torch.float64: 1e-10}


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def tolerance(ref_err: float, dtype: torch.dtype, factor: float = 2.0,
              floor: float = None) -> float:
    return factor * ref_err + (FLOORS[dtype] if floor is None else floor)


def assert_close_to_ref(name: str, candidate: torch.Tensor,
                        same_dtype_ref: torch.Tensor, hi_ref: torch.Tensor,
                        dtype: torch.dtype = None, factor: float = 2.0,
                        floor: float = None) -> None:
    """Assert ``candidate`` is within the 2x-reference-error rule of ``hi_ref``.

    ``same_dtype_ref`` is the PyTorch reference computed in the candidate's
    dtype; ``hi_ref`` the fp32/fp64 reference.  Non-finite candidates fail
    unless the reference is non-finite at the same places.
    """
    dtype = dtype or candidate.dtype
    assert candidate.shape == hi_ref.shape, (
        f'{name}: shape {tuple(candidate.shape)} != {tuple(hi_ref.shape)}')
    finite_ref = torch.isfinite(hi_ref)
    assert torch.equal(torch.isfinite(candidate), finite_ref), (
        f'{name}: non-finite values where the reference is finite')
    err = max_abs_err(candidate[finite_ref], hi_ref[finite_ref])
    ref_err = max_abs_err(same_dtype_ref[finite_ref], hi_ref[finite_ref])
    tol = tolerance(ref_err, dtype, factor, floor)
    print(f'{name}: err={err:.3e} ref_err={ref_err:.3e} tol={tol:.3e} '
          f'({dtype})')
    assert err <= tol, (f'{name}: max error {err:.3e} > tolerance {tol:.3e} '
                        f'(reference same-dtype error {ref_err:.3e})')
