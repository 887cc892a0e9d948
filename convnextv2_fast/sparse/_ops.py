"""The compiled sparse ops (``torch.ops.convnextv2_fast.*``) and their fake impls.

``convnextv2_fast._C`` registers the ops with the dispatcher (``TORCH_LIBRARY``
in ``csrc/bindings.cpp``); the shape-only fake implementations that
``torch.compile`` needs are registered here, once, after the library loaded.
"""
import os
import warnings

import torch

from .._ext import get_extension

_STATE = {'fakes': False}

REQUIRE_EXT_ENV = 'CONVNEXTV2_FAST_REQUIRE_EXT'


def sparse_ops():
    """``torch.ops.convnextv2_fast`` when the compiled ops are available, else None.

    A missing extension gives one warning (from :func:`get_extension`) and
    callers use their pure-PyTorch path; with ``CONVNEXTV2_FAST_REQUIRE_EXT=1``
    a missing extension raises instead.
    """
    ext = get_extension('sparse depthwise conv (FCMAE)')
    stale = ext is not None and hasattr(torch.ops.convnextv2_fast, 'sparse_dwconv_fwd') \
        and not schema_current()
    if ext is None or stale or not hasattr(torch.ops.convnextv2_fast, 'sparse_dwconv_fwd'):
        from .._ext import extension_status
        why = (STALE_BUILD if stale else extension_status()[1])
        if os.environ.get(REQUIRE_EXT_ENV, '0') == '1':
            raise RuntimeError(
                f'{REQUIRE_EXT_ENV}=1 but the compiled extension is unavailable: {why}')
        if stale and not _STATE.get('stale_warned'):
            warnings.warn(f'convnextv2_fast: {why}; using the pure-PyTorch sparse dwconv.',
                          RuntimeWarning, stacklevel=2)
            _STATE['stale_warned'] = True
        return None
    if not _STATE['fakes']:
        _register_fakes()
        _STATE['fakes'] = True
    return torch.ops.convnextv2_fast


STALE_BUILD = ('the compiled extension predates the [49, C]-taps / [M, 49] neighbour-row '
               'op signature or the tile ops sparse_dwconv_tile_fwd / '
               'sparse_dwconv_tile_wgrad / sparse_dwconv_mma_fwd / sparse_dwconv_skip_fwd / '
               'sparse_dwconv_skip_wgrad (a stale build): '
               'rebuild it with `python setup.py build_ext --inplace`')

TILE_OPS = ('sparse_dwconv_tile_fwd', 'sparse_dwconv_tile_wgrad', 'sparse_dwconv_mma_fwd',
            'sparse_dwconv_skip_fwd', 'sparse_dwconv_skip_wgrad')


def schema_current() -> bool:
    """True when the loaded ops take the per-stage neighbour-row table and have
    the tile path (:data:`TILE_OPS`)."""
    return ('nbr_rows' in str(torch.ops.convnextv2_fast.sparse_dwconv_fwd.default._schema)
            and all(hasattr(torch.ops.convnextv2_fast, op) for op in TILE_OPS))


def _register_fakes():

    @torch.library.register_fake('convnextv2_fast::sparse_dwconv_fwd')
    def _fwd_fake(feats, taps, bias, nbr_rows):
        return torch.empty_like(feats)

    @torch.library.register_fake('convnextv2_fast::sparse_dwconv_tile_fwd')
    def _tile_fwd_fake(feats, taps, bias, halo_rows, tile):
        return torch.empty_like(feats)

    @torch.library.register_fake('convnextv2_fast::sparse_dwconv_skip_fwd')
    def _skip_fwd_fake(feats, taps, bias, halo_rows, tile):
        return torch.empty_like(feats)

    @torch.library.register_fake('convnextv2_fast::sparse_dwconv_mma_fwd')
    def _mma_fwd_fake(feats, taps, bias, halo_rows):
        return torch.empty_like(feats)

    def _wgrad_fake(feats):
        acc = torch.float64 if feats.dtype == torch.float64 else torch.float32
        c = feats.shape[1]
        return (feats.new_empty((49, c), dtype=acc),
                feats.new_empty((c, ), dtype=acc))

    @torch.library.register_fake('convnextv2_fast::sparse_dwconv_bwd_weight')
    def _bwd_weight_fake(grad_out, feats, nbr_rows):
        return _wgrad_fake(feats)

    @torch.library.register_fake('convnextv2_fast::sparse_dwconv_tile_wgrad')
    def _tile_wgrad_fake(grad_out, feats, halo_rows, tile):
        return _wgrad_fake(feats)

    @torch.library.register_fake('convnextv2_fast::sparse_dwconv_skip_wgrad')
    def _skip_wgrad_fake(grad_out, feats, halo_rows, tile):
        return _wgrad_fake(feats)
