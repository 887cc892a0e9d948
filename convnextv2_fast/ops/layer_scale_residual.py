"""Layer scale, drop path and residual add as one per-(sample, channel) scale.

``out[n, p, c] = res[n, p, c] + (a[n, p, c] + bias[c]) * r[n, c]`` with
``r[n, c] = s[n] * ls[c]``, ``s[n] = keep_mask[n] / keep_prob`` (drop path,
mask from :func:`convnextv2_fast.ops.reference.drop_path_mask`) and ``ls`` the
layer scale (ones when the block has none) and ``bias`` (optional, (C,)
fp32) the pw2 bias ``W2 beta + b2`` of the fused block, added here so the
GEMM before it needs no bias broadcast.  All tensors are (N, HW, C)
contiguous (channels-last pixels); ``r`` is (N, C) fp32.

The same kernel gives the backward of ``a`` (``da = dout * r``, no residual)
and per-(sample, tile) fp32 partials of a column sum, reduced on the host in
a fixed order (deterministic): ``PARTIAL=1`` sums ``A`` (``sum_p dout``, for
the bias grads), ``PARTIAL=2`` sums ``A * A2`` (``sum_p dout * a``, the grad
of ``r``).
"""
import torch
import triton
import triton.language as tl

from .._errors import ArgumentError
from ._common import check_same_device, check_tensor, next_pow2, pixel_block


@triton.jit
def _scale_residual_kernel(
        A,  # (N, HW, C) tensor to scale
        R,  # (N, C) fp32 per-(sample, channel) scale
        BIAS,  # (C,) fp32 added to A before the scale (if HAS_BIAS)
        RES,  # (N, HW, C) residual (if HAS_RES)
        OUT,  # (N, HW, C) out
        A2,  # (N, HW, C) second factor of the partials (if PARTIAL == 2)
        PART,  # (N, num_tiles, C) fp32 out: sum_p A [* A2] (if PARTIAL)
        HW, C,
        HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, PARTIAL: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64)
    p = t * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    pmask = p < HW
    cmask = c < C
    m2 = pmask[:, None] & cmask[None, :]
    off = n * HW * C + p[:, None] * C + c[None, :]
    a = tl.load(A + off, mask=m2, other=0.).to(tl.float32)
    r = tl.load(R + n * C + c, mask=cmask, other=0.)
    if HAS_BIAS:
        b = tl.load(BIAS + c, mask=cmask, other=0.)
        out = (a + b[None, :]) * r[None, :]
    else:
        out = a * r[None, :]
    if HAS_RES:
        out += tl.load(RES + off, mask=m2, other=0.).to(tl.float32)
    tl.store(OUT + off, out.to(OUT.dtype.element_ty), mask=m2)
    if PARTIAL == 1:
        tl.store(PART + (n * tl.num_programs(1) + t) * C + c,
                 tl.sum(a, axis=0), mask=cmask)
    if PARTIAL == 2:
        a2 = tl.load(A2 + off, mask=m2, other=0.).to(tl.float32)
        tl.store(PART + (n * tl.num_programs(1) + t) * C + c,
                 tl.sum(a * a2, axis=0), mask=cmask)


def _launch(a, r, res, out, a2=None, partial=0, bias=None):
    """One kernel launch; returns the (N, C) fp32 column sums for
    ``partial`` 1 (``sum_p a``) or 2 (``sum_p a * a2``), else None."""
    N, HW, C = a.shape
    BLOCK_C = next_pow2(C)
    BLOCK_P = pixel_block(BLOCK_C)
    n_tiles = triton.cdiv(HW, BLOCK_P)
    part = (torch.empty((N, n_tiles, C), device=a.device, dtype=torch.float32)
            if partial else None)
    _scale_residual_kernel[(N, n_tiles)](
        a, r, bias if bias is not None else r,
        res if res is not None else a, out,
        a2 if a2 is not None else a, part if part is not None else r,
        HW, C, HAS_BIAS=bias is not None, HAS_RES=res is not None,
        PARTIAL=partial, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    return part.sum(1) if partial else None


def _check(a, r, res, bias=None):
    check_tensor(a, 'a', ndim=3)
    N, HW, C = a.shape
    check_tensor(r, 'r', shape=(N, C), dtypes=(torch.float32, ))
    if res is not None:
        check_tensor(res, 'res', shape=(N, HW, C))
    if bias is not None:
        check_tensor(bias, 'bias', shape=(C, ), dtypes=(torch.float32, ))
    check_same_device([('a', a), ('r', r), ('res', res), ('bias', bias)])


def scale_residual_forward(a, r, res=None, out_dtype=None, bias=None):
    """``res + (a + bias[c]) * r[n, c]`` (res, bias optional) in
    ``out_dtype`` (default ``res.dtype`` if given, else ``a.dtype``)."""
    _check(a, r, res, bias)
    out_dtype = out_dtype or (res.dtype if res is not None else a.dtype)
    out = torch.empty(a.shape, device=a.device, dtype=out_dtype)
    _launch(a, r, res, out, bias=bias)
    return out


def scale_colsum(dout, r, out_dtype=None):
    """``(dout * r[n, c], sum_p dout)``: the grad of the scaled input in
    ``out_dtype`` and the (N, C) fp32 column sums of ``dout`` (bias grads),
    in one pass over ``dout``."""
    _check(dout, r, None)
    da = torch.empty(dout.shape, device=dout.device,
                     dtype=out_dtype or dout.dtype)
    colsum = _launch(dout, r, None, da, partial=1)
    return da, colsum


def scale_residual_backward(dout, a, r, need_dr=True, da_dtype=None):
    """Grads of :func:`scale_residual_forward`: ``(da, dr, dres)``.

    ``dres`` is ``dout`` itself; ``dr`` (N, C) fp32 or None.
    """
    _check(a, r, None)
    check_tensor(dout, 'dout', shape=tuple(a.shape))
    da = torch.empty(a.shape, device=a.device, dtype=da_dtype or a.dtype)
    dr = _launch(dout, r, None, da, a, partial=2 if need_dr else 0)
    return da, dr, dout


class ScaleResidualFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, a, r, res):
        ctx.save_for_backward(a, r)
        ctx.res_dtype = res.dtype
        return scale_residual_forward(a, r, res)

    @staticmethod
    def backward(ctx, dout):
        a, r = ctx.saved_tensors
        da, dr, dres = scale_residual_backward(
            dout.contiguous(), a, r, need_dr=ctx.needs_input_grad[1])
        return da, dr, dres


def layer_scale_drop_path_residual(res, a, ls, keep_scale):
    """``res + keep_scale[n] * ls[c] * a``; (N, HW, C) tensors, ls (C,) or
    None, keep_scale (N,) fp32 (``mask / keep_prob``) or None."""
    N, HW, C = a.shape
    r = torch.ones((N, C), device=a.device, dtype=torch.float32)
    if ls is not None:
        if ls.shape != (C, ):
            raise ArgumentError(f'ls must have shape ({C},), got '
                                f'{tuple(ls.shape)}.')
        r = r * ls.float()[None, :]
    if keep_scale is not None:
        r = r * keep_scale.float().view(N, 1)
    return ScaleResidualFunction.apply(a, r, res)
