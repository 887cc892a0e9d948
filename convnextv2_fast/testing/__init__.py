"""Helpers shared by tests and benchmarks (parity errors, tolerances)."""
from .parity import assert_close_to_ref, max_abs_err, tolerance

__all__ = ['assert_close_to_ref', 'max_abs_err', 'tolerance']
