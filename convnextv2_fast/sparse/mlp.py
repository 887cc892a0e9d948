"""The sparse encoder block's MLP tail on compact rows, fused (FCMAE).

``out = res + r[n, c] * pw2(GRN(GELU(pw1(z))))`` on the ``[M, C]`` visible
rows of a stage whose samples all have ``p`` visible rows (FCMAE's fixed
``len_keep``): then the rows ARE an ``(N, p, C)`` tensor, sample by sample,
and the dense fused block's ops apply unchanged with the sample axis as the
per-sample GRN segment:

====================  =====================================================
pw1 (+ bias)           torch ``F.linear`` (cuBLAS) in the compute dtype
GELU + GRN sum u^2,    :func:`..ops.gelu_grn.grn_pw2_forward` (Triton GELU /
GRN apply + pw2        sum-of-squares pass, fp32 statistics, the GRN folded
                       into a per-sample W2 for a cuBLAS bmm)
pw2 bias, layer        :func:`..ops.layer_scale_residual.scale_residual_forward`
scale, drop path,      (one Triton pass; ``r`` (N, C) fp32 = layer scale x
residual               drop-path keep scale)
====================  =====================================================

Backward: :func:`..ops.gelu_grn.grn_pw2_backward` (the ``dout * r`` pass with
the pw2 bias grad, the GRN/GELU passes with ``db1``, the W2 grads) and torch
GEMMs for pw1's data and weight grads (fp32 weight grad) -- the composition
:func:`..ops.fused_block.fused_block_forward` / ``fused_block_backward`` use,
minus the depthwise conv + LN.

Precision: the compute dtype ``cd`` is the autocast dtype under
``torch.autocast`` (else ``z``'s dtype): ``z`` is cast to it once (what
autocast does before the torch path's pw1), the GEMMs run in it, GRN
statistics and all kernel math are fp32, the output has ``res``'s dtype (the
torch path's residual add promotes to the stream dtype).

This module is a caller of the ops (it does not change them).  Pure PyTorch
reference: the torch path of :meth:`SparseConvNeXtV2._block` (``sparse_grn``).
Imported lazily by the encoder (it imports Triton).
"""
import torch
import torch.nn.functional as F

from .._errors import ArgumentError
from ..ops.fused_block import compute_dtype_for, mm_f32
from ..ops.gelu_grn import grn_pw2_backward, grn_pw2_forward
from ..ops.layer_scale_residual import scale_residual_forward

def _weight2d(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], w.shape[1])


# -- host functions --------------------------------------------------------
def sparse_mlp_forward(z, res, w1, b1, gamma, beta, w2, b2, r, n, eps, cd):
    """Forward on ``[M, C]`` rows, ``M = n * p``.  Returns ``(out, zc, h,
    S)``: ``out`` [M, C] in ``res``'s dtype, ``zc`` = z in ``cd`` and ``h``
    (n, p, K) the pw1 output (saved for the backward), ``S`` (n, K) fp32 GRN
    sums of squares."""
    m, c = z.shape
    if m % n or tuple(res.shape) != (m, c):
        raise ArgumentError(f'z {tuple(z.shape)} and res {tuple(res.shape)} must be '
                            f'[M, C] rows with M a multiple of N={n}.')
    p = m // n
    with torch.autocast(z.device.type, enabled=False):
        zc = z.detach().to(cd).contiguous()
        w1c = w1.detach().to(cd)
        h = F.linear(zc, w1c, b1.detach().to(cd)).view(n, p, -1)
        a, bias2, S, _ = grn_pw2_forward(h, gamma.detach(), beta.detach(),
                                         w2.detach(), b2.detach(), eps)
        out = scale_residual_forward(a, r.detach(), res.detach().reshape(n, p, c),
                                     out_dtype=res.dtype, bias=bias2)
    return out.view(m, c), zc, h, S


def sparse_mlp_backward(dout, zc, h, S, w1, gamma, beta, w2, b2, r, eps,
                        need_dr):
    """Grads ``(dz, dw1, db1, dgamma, dbeta, dw2, db2, dr)`` (dz in ``zc``'s
    dtype, weight grads fp32, ``dr`` (n, C) fp32 or None); the grad of
    ``res`` is ``dout`` itself."""
    n, p, k = h.shape
    cd = h.dtype
    with torch.autocast(h.device.type, enabled=False):
        dh, db1, dgamma, dbeta, dw2, db2, dr = grn_pw2_backward(
            dout.reshape(n, p, -1), r.detach(), h, S, gamma.detach(), beta.detach(),
            w2.detach(), b2.detach(), eps, need_dr=need_dr, w2c=w2.detach().to(cd))
        dh2 = dh.view(n * p, k)
        dz = torch.mm(dh2, w1.detach().to(cd))
        dw1 = mm_f32(dh2.t(), zc)
    return dz, dw1, db1, dgamma, dbeta, dw2, db2, dr


class SparseMlpFunction(torch.autograd.Function):
    """Thin autograd wrapper of :func:`sparse_mlp_forward` / ``_backward``."""

    @staticmethod
    def forward(ctx, z, res, w1, b1, gamma, beta, w2, b2, r, n, eps, cd):
        out, zc, h, S = sparse_mlp_forward(z, res, w1, b1, gamma, beta, w2, b2, r,
                                           n, eps, cd)
        ctx.save_for_backward(zc, h, S, w1, gamma, beta, w2, b2, r)
        ctx.eps, ctx.z_dtype = eps, z.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        zc, h, S, w1, gamma, beta, w2, b2, r = ctx.saved_tensors
        need_dr = bool(ctx.needs_input_grad[8])
        dz, dw1, db1, dgamma, dbeta, dw2, db2, dr = sparse_mlp_backward(
            dout.contiguous(), zc, h, S, w1, gamma, beta, w2, b2, r, ctx.eps, need_dr)
        return (dz.to(ctx.z_dtype), dout, dw1.to(w1.dtype),
                db1.to(w1.dtype), dgamma.to(gamma.dtype), dbeta.to(beta.dtype),
                dw2.to(w2.dtype), db2.to(b2.dtype), dr,
                None, None, None)


def sparse_mlp(z, res, w1, b1, gamma, beta, w2, b2, r, n, eps):
    """``res + r[n, c] * pw2(GRN(GELU(pw1(z))))`` on ``[M, C]`` rows of ``n``
    samples with ``M / n`` rows each (grouped by sample); ``w1`` (K, C) /
    ``w2`` (C, K) (1x1-conv weights accepted), ``r`` (n, C) fp32.  Compute
    dtype: the autocast dtype when autocast is on, else ``z.dtype``."""
    cd = compute_dtype_for(z)
    b2 = b2 if b2 is not None else w2.new_zeros(w2.shape[0])
    b1 = b1 if b1 is not None else w1.new_zeros(w1.shape[0])
    return SparseMlpFunction.apply(z, res, _weight2d(w1), b1, gamma, beta,
                                   _weight2d(w2), b2, r, int(n), float(eps), cd)
