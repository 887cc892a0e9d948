"""The ConvNeXt V2 block: mmpretrain's ``ConvNeXtBlock`` names, two paths.

Children (and so state_dict keys) are exactly mmpretrain's: ``depthwise_conv``,
``norm``, ``pointwise_conv1``, ``act``, ``grn``, ``pointwise_conv2``, ``gamma``
(layer scale, only when ``layer_scale_init_value > 0``) and ``drop_path``.

``forward`` runs either the reference path (the same PyTorch ops in the same
order as mmpretrain, so fp32 results agree to rounding) or the fused Triton
block op, chosen by :func:`convnextv2_fast.impl.resolve_impl`.
"""
from functools import partial

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp

from ..impl import check_impl, effective_impl, resolve_impl
from .layers import DropPath, GRN, build_activation, build_norm_layer


# dtypes the fused Triton block computes in (inputs and parameters)
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class ConvNeXtV2Block(nn.Module):

    def __init__(self,
                 in_channels,
                 dw_conv_cfg=dict(kernel_size=7, padding=3),
                 norm_cfg=dict(type='LN2d', eps=1e-6),
                 act_cfg=dict(type='GELU'),
                 mlp_ratio=4.,
                 linear_pw_conv=True,
                 drop_path_rate=0.,
                 layer_scale_init_value=1e-6,
                 use_grn=False,
                 with_cp=False,
                 impl='auto'):
        super().__init__()
        self.with_cp = with_cp
        self.impl = check_impl(impl)
        self.dw_conv_cfg = dict(dw_conv_cfg)
        self.depthwise_conv = nn.Conv2d(
            in_channels, in_channels, groups=in_channels, **dw_conv_cfg)
        self.linear_pw_conv = linear_pw_conv
        self.norm = build_norm_layer(norm_cfg, in_channels)
        mid_channels = int(mlp_ratio * in_channels)
        pw_conv = nn.Linear if linear_pw_conv else partial(nn.Conv2d,
                                                           kernel_size=1)
        self.pointwise_conv1 = pw_conv(in_channels, mid_channels)
        self.act = build_activation(act_cfg)
        self.pointwise_conv2 = pw_conv(mid_channels, in_channels)
        self.grn = GRN(mid_channels) if use_grn else None
        self.gamma = nn.Parameter(
            layer_scale_init_value * torch.ones((in_channels)),
            requires_grad=True) if layer_scale_init_value > 0 else None
        self.drop_path = DropPath(
            drop_path_rate) if drop_path_rate > 0. else nn.Identity()

    # -- dispatch ---------------------------------------------------------
    @property
    def drop_prob(self) -> float:
        return self.drop_path.drop_prob if isinstance(self.drop_path,
                                                      DropPath) else 0.

    def fused_supported(self) -> bool:
        """Whether the fused op computes exactly this block's math."""
        return (self.grn is not None
                and self.depthwise_conv.weight.dtype in FUSED_DTYPES
                and self.dw_conv_cfg.get('kernel_size') in (7, (7, 7))
                and self.dw_conv_cfg.get('padding') in (3, (3, 3))
                and set(self.dw_conv_cfg) <= {'kernel_size', 'padding'}
                and isinstance(self.act, nn.GELU)
                and self.act.approximate == 'none')

    def forward(self, x):
        # the path is decided (and, for 'auto', tuned) before checkpointing:
        # the recomputation must take the same path, and tuning must not run
        # under the checkpoint's saved-tensor hooks
        fused = self._use_fused(x)
        if self.with_cp and x.requires_grad:
            return cp.checkpoint(self._inner_forward, x, fused,
                                 use_reentrant=False)
        return self._inner_forward(x, fused)

    def _inner_forward(self, x, fused):
        return (self._fused_forward(x, mlp=fused) if fused
                else self._reference_forward(x))

    def _use_fused(self, x):
        """The path for ``x``: False (reference) or the fused path's MLP
        (``'cublas'`` / ``'triton'``, see
        :func:`convnextv2_fast.ops.fused_block.mlp_for`).  ``resolve_impl``
        first, then for ``impl='auto'`` on CUDA the dtype check (fp64 falls
        back instead of raising) and the measured choice of
        :mod:`convnextv2_fast.autotune` (which also picks the MLP unless the
        block or the environment fixes it)."""
        from ..ops.fused_block import mlp_for
        if not (self.fused_supported()
                and resolve_impl(self.impl, x.device) == 'triton'):
            return False
        if effective_impl(self.impl) != 'auto':
            # 'triton' forced (interpreter included): no tuning.  ('auto'
            # got 'triton' from resolve_impl only for a CUDA device; no second
            # device check here, so tools/warm_triton_cache.py, which answers
            # resolve_impl as for CUDA, drives the tuner's paths as a GPU does)
            return mlp_for(self) or 'cublas'
        if x.dtype not in FUSED_DTYPES:
            return False
        from ..ops.gelu_grn import MAX_HIDDEN_PER_SAMPLE
        if x.shape[2] * x.shape[3] * self.grn.gamma.numel() > \
                MAX_HIDDEN_PER_SAMPLE:
            return False  # beyond the fused kernels' int32 offsets
        from .. import autotune
        from ..ops.fused_block import compute_dtype_for
        training = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters()))
        return autotune.PATH_MLP.get(
            autotune.choose(self, x, compute_dtype_for(x), training), False)

    def _fused_forward(self, x, mlp=None):
        from ..ops.fused_block import fused_block_module_forward
        return fused_block_module_forward(self, x, mlp=mlp)

    def _reference_forward(self, x):
        shortcut = x
        x = self.depthwise_conv(x)
        if self.linear_pw_conv:
            x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
            x = self.norm(x, data_format='channel_last')
            x = self.pointwise_conv1(x)
            x = self.act(x)
            if self.grn is not None:
                x = self.grn(x, data_format='channel_last')
            x = self.pointwise_conv2(x)
            x = x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        else:
            x = self.norm(x, data_format='channel_first')
            x = self.pointwise_conv1(x)
            x = self.act(x)
            if self.grn is not None:
                x = self.grn(x, data_format='channel_first')
            x = self.pointwise_conv2(x)
        if self.gamma is not None:
            x = x.mul(self.gamma.view(1, -1, 1, 1))
        return shortcut + self.drop_path(x)
