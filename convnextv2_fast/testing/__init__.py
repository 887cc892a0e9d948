"""Helpers shared by tests and benchmarks (parity rule, model set-up)."""
from .models import randomize_, reference_backbone_kwargs
from .parity import assert_close_to_ref, max_abs_err, tolerance

__all__ = ['assert_close_to_ref', 'max_abs_err', 'tolerance', 'randomize_',
           'reference_backbone_kwargs']
