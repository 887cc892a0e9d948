"""Small layers with mmpretrain-compatible names and semantics.

``LayerNorm2d`` and ``GRN`` mirror ``mmpretrain.models.utils.norm`` (same
parameter names, same ``data_format`` keyword) so state_dicts interchange and
mmengine's initialisers (which match on class and base-class names:
``LayerNorm2d`` is an ``nn.LayerNorm``) treat them alike.
"""
import copy

import torch
import torch.nn as nn

from .._errors import ArgumentError
from ..ops.reference import (GRN_EPS, drop_path_ref, grn_channels_first_ref,
                             grn_ref)

_LN2D_TYPES = ('LN2d', 'LayerNorm2d')


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dim of NCHW (or, channel_last, NHWC) maps.

    ``channel_first`` on a ``channels_last``-strided NCHW tensor normalises
    its NHWC view (contiguous: no copy) and returns a ``channels_last``
    tensor; on any other NCHW tensor it returns an NCHW-contiguous one, as
    mmpretrain's ``LayerNorm2d`` does.  Values are the same either way (the
    same ``layer_norm`` over the same contiguous rows).
    """

    def __init__(self, num_channels: int, **kwargs) -> None:
        super().__init__(num_channels, **kwargs)
        self.num_channels = self.normalized_shape[0]

    def forward(self, x, data_format='channel_first'):
        if x.dim() != 4:
            raise ArgumentError(
                'LayerNorm2d: x must have shape (N, C, H, W), got '
                f'{tuple(x.shape)}.')
        if data_format == 'channel_last':
            return nn.functional.layer_norm(x, self.normalized_shape,
                                            self.weight, self.bias, self.eps)
        if data_format == 'channel_first':
            x = x.permute(0, 2, 3, 1)
            nhwc = x.is_contiguous()  # channels_last memory: a free view
            x = nn.functional.layer_norm(x, self.normalized_shape, self.weight,
                                         self.bias, self.eps)
            x = x.permute(0, 3, 1, 2)
            return x if nhwc else x.contiguous()
        raise ArgumentError(
            "data_format must be 'channel_first' or 'channel_last', got "
            f'{data_format!r}.')


class GRN(nn.Module):
    """Global Response Normalisation (ConvNeXt V2); gamma/beta are 1-D (C,)."""

    def __init__(self, in_channels: int, eps: float = GRN_EPS):
        super().__init__()
        self.in_channels = in_channels
        self.gamma = nn.Parameter(torch.zeros(in_channels))
        self.beta = nn.Parameter(torch.zeros(in_channels))
        self.eps = eps

    def forward(self, x, data_format='channel_first'):
        if data_format == 'channel_last':
            return grn_ref(x, self.gamma, self.beta, self.eps)
        if data_format == 'channel_first':
            return grn_channels_first_ref(x, self.gamma, self.beta, self.eps)
        raise ArgumentError(
            "data_format must be 'channel_first' or 'channel_last', got "
            f'{data_format!r}.')


def build_norm_layer(cfg: dict, num_features: int) -> LayerNorm2d:
    """Build the LN2d norm that ConvNeXt uses (mmpretrain semantics).

    ConvNeXt blocks call their norm with ``data_format=...``, which only the
    LN2d layer accepts, so mmpretrain's ConvNeXt effectively supports only
    ``LN2d``; anything else is rejected here with a clear message.  As in
    mmpretrain, ``eps`` defaults to 1e-5 when the config omits it and
    ``requires_grad`` is honoured.
    """
    if not isinstance(cfg, dict) or 'type' not in cfg:
        raise ArgumentError(
            f"norm_cfg must be a dict with a 'type' key, got {cfg!r}.")
    cfg_ = copy.deepcopy(dict(cfg))
    layer_type = cfg_.pop('type')
    if layer_type not in _LN2D_TYPES:
        raise ArgumentError(
            f"norm_cfg type must be one of {_LN2D_TYPES} (ConvNeXt blocks "
            f'need a channel_first/channel_last LayerNorm), got {layer_type!r}.')
    requires_grad = cfg_.pop('requires_grad', True)
    cfg_.setdefault('eps', 1e-5)
    layer = LayerNorm2d(num_features, **cfg_)
    for param in layer.parameters():
        param.requires_grad = requires_grad
    return layer


def build_activation(cfg: dict) -> nn.Module:
    """Build the block activation. GELU natively; others via mmengine/mmcv."""
    if not isinstance(cfg, dict) or 'type' not in cfg:
        raise ArgumentError(
            f"act_cfg must be a dict with a 'type' key, got {cfg!r}.")
    cfg_ = dict(cfg)
    if cfg_['type'] in ('GELU', nn.GELU):
        cfg_.pop('type')
        return nn.GELU(**cfg_)
    try:
        import mmcv.cnn  # noqa: F401  (registers activations)
        from mmengine.registry import MODELS
    except ImportError as exc:
        raise ArgumentError(
            f'act_cfg {cfg!r}: only GELU is built without mmcv/mmengine '
            f'({exc}).') from exc
    return MODELS.build(cfg_)


class DropPath(nn.Module):
    """Stochastic depth per sample, mmcv ``DropPath`` semantics."""

    def __init__(self, drop_prob: float = 0.1):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path_ref(x, self.drop_prob, self.training)
