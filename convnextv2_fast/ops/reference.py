"""Pure-PyTorch reference implementations of the ConvNeXt V2 block ops.

These are the numerical definition of the package (the same math, op for op,
as ``mmpretrain.ConvNeXt`` with ``use_grn=True``).  The backbone's reference
path, the tests and the benchmarks all import them from here.

Every function takes an ``upcast`` flag: with ``upcast=True`` the inputs are
promoted to fp32 (fp64 stays fp64) and the result is cast back to the input
dtype — the "reference in higher precision" used by parity tests.
"""
from typing import Optional

import torch
import torch.nn.functional as F

GRN_EPS = 1e-6
LN_EPS = 1e-6


def _up(t: Optional[torch.Tensor], upcast: bool) -> Optional[torch.Tensor]:
    if t is None or not upcast or t.dtype == torch.float64:
        return t
    return t.float()


def layer_norm_channels_last_ref(x, weight, bias, eps=LN_EPS, upcast=False):
    """LayerNorm over the last dim of an (..., C) tensor."""
    dtype = x.dtype
    x, weight, bias = _up(x, upcast), _up(weight, upcast), _up(bias, upcast)
    y = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return y.to(dtype) if upcast else y


def dwconv7x7_ref(x, weight, bias, upcast=False):
    """Depthwise 7x7 conv, padding 3, of an NCHW tensor. weight: (C, 1, 7, 7)."""
    dtype = x.dtype
    x, weight, bias = _up(x, upcast), _up(weight, upcast), _up(bias, upcast)
    y = F.conv2d(x, weight, bias, padding=3, groups=x.shape[1])
    return y.to(dtype) if upcast else y


def dwconv7x7_ln_ref(x, dw_weight, dw_bias, ln_weight, ln_bias, eps=LN_EPS,
                     upcast=False):
    """Depthwise 7x7 conv + LayerNorm over C: NCHW in, NHWC (N, H, W, C) out."""
    dtype = x.dtype
    x, dw_weight, dw_bias = _up(x, upcast), _up(dw_weight, upcast), _up(dw_bias, upcast)
    y = dwconv7x7_ref(x, dw_weight, dw_bias)
    y = layer_norm_channels_last_ref(y.permute(0, 2, 3, 1), _up(ln_weight, upcast),
                                     _up(ln_bias, upcast), eps)
    return y.to(dtype) if upcast else y


def grn_ref(u, gamma, beta, eps=GRN_EPS, upcast=False):
    """Global Response Normalisation of a channels-last (N, H, W, K) tensor.

    ``G = ||u||_2 over (H, W)``; ``N = G / (mean_K G + eps)``;
    ``out = gamma * (u * N) + beta + u``.
    """
    dtype = u.dtype
    u, gamma, beta = _up(u, upcast), _up(gamma, upcast), _up(beta, upcast)
    gx = torch.norm(u, p=2, dim=(1, 2), keepdim=True)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + eps)
    out = gamma * (u * nx) + beta + u
    return out.to(dtype) if upcast else out


def grn_channels_first_ref(u, gamma, beta, eps=GRN_EPS):
    """GRN of an NCHW tensor (the ``linear_pw_conv=False`` layout)."""
    gx = torch.norm(u, p=2, dim=(2, 3), keepdim=True)
    nx = gx / (gx.mean(dim=1, keepdim=True) + eps)
    return (gamma.view(1, -1, 1, 1) * (u * nx) + beta.view(1, -1, 1, 1) + u)


def drop_path_ref(x, drop_prob: float, training: bool):
    """Stochastic depth with mmcv semantics (per-sample keep mask, rescale).

    Consumes ``torch.rand((N, 1, ..., 1), dtype=x.dtype)`` exactly like
    ``mmcv.cnn.bricks.drop.drop_path`` so equal seeds give equal masks.
    """
    if drop_prob == 0. or not training:
        return x
    keep_prob = 1 - drop_prob
    return x.div(keep_prob) * drop_path_mask(x, drop_prob)


def drop_path_mask(x, drop_prob: float):
    """The (N, 1, .., 1) {0, 1} keep mask of mmcv's drop path (one RNG draw)."""
    keep_prob = 1 - drop_prob
    shape = (x.shape[0], ) + (1, ) * (x.ndim - 1)
    random_tensor = keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)
    return random_tensor.floor()


def gelu_grn_pw2_ref(h, grn_gamma, grn_beta, w2, b2, eps=GRN_EPS, upcast=False):
    """``pw2(GRN(GELU(h)))`` of a channels-last (N, H, W, K) or (N, HW, K) h.

    The reference of :mod:`convnextv2_fast.ops.gelu_grn` (a 3-D input is
    treated as (N, 1, HW, K) for the GRN's spatial reduction).
    """
    dtype = h.dtype
    h, grn_gamma, grn_beta, w2, b2 = (_up(t, upcast) for t in
                                      (h, grn_gamma, grn_beta, w2, b2))
    u = F.gelu(h)
    squeeze = u.dim() == 3
    if squeeze:
        u = u.unsqueeze(1)
    y = F.linear(grn_ref(u, grn_gamma, grn_beta, eps), w2, b2)
    if squeeze:
        y = y.squeeze(1)
    return y.to(dtype) if upcast else y


def scale_residual_ref(a, r, res=None, upcast=False):
    """``res + a * r[n, c]`` of (N, HW, C) tensors; ``r`` (N, C) (layer scale
    times drop-path keep scale).  The reference of
    :mod:`convnextv2_fast.ops.layer_scale_residual`."""
    dtype = res.dtype if res is not None else a.dtype
    a, r, res = _up(a, upcast), _up(r, upcast), _up(res, upcast)
    out = a * r[:, None, :]
    if res is not None:
        out = res + out
    return out.to(dtype) if upcast else out
