"""Sparse (visible-sites-only) compute for FCMAE pretraining.

``layout``: tile-structured visible sites per stage (site list, neighbour index,
gathers, densify); ``dwconv``: the submanifold depthwise 7x7 conv (compiled
CPU/CUDA ops with a pure-PyTorch fallback and a dense-masked reference).
"""
from .grn import sparse_grn, sparse_grn_dense_masked_ref
from .dwconv import (sparse_dwconv7x7, sparse_dwconv7x7_dense_masked_ref,
                     sparse_dwconv7x7_torch, sparse_dwconv_backward,
                     sparse_dwconv_forward)
from .layout import (StageLayout, build_layouts, check_input_size, check_mask,
                     densify, gather_rows, layout_from_visibility,
                     stage_visible_mask)

__all__ = [
    'sparse_dwconv7x7', 'sparse_dwconv7x7_dense_masked_ref',
    'sparse_dwconv7x7_torch', 'sparse_dwconv_forward', 'sparse_dwconv_backward',
    'sparse_grn', 'sparse_grn_dense_masked_ref', 'StageLayout', 'build_layouts', 'check_input_size', 'check_mask', 'densify',
    'gather_rows', 'layout_from_visibility', 'stage_visible_mask'
]
