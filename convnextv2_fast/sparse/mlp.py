"""The sparse encoder block's MLP tail on compact rows, fused (FCMAE).

``out = res + r[n, c] * pw2(GRN(GELU(pw1(z))))`` on the ``[M, C]`` visible
rows of a stage whose samples all have ``p`` visible rows (FCMAE's fixed
``len_keep``): then the rows ARE an ``(N, p, C)`` tensor, sample by sample,
and the dense fused block's kernels apply unchanged with the sample axis as
the per-sample GRN segment:

=====================  ====================================================
pw1 (+ bias)            torch ``F.linear`` (cuBLAS) in the compute dtype
GELU + GRN sum u^2      :func:`..ops.gelu_grn.gelu_sumsq_forward` (Triton),
                        :func:`..ops.grn_stats.grn_stats_forward` (fp32)
GRN apply (less beta)   ``u * scale[n, k]``:
                        :func:`..ops.layer_scale_residual.scale_residual_forward`
                        with the (N, 4C) GRN scale as its per-(sample,
                        channel) factor (one Triton pass)
pw2                     torch ``F.linear`` with the shared W2; the GRN beta
                        goes into the pw2 bias ``W2 beta + b2`` (fp32)
pw2 bias, layer scale,  ``scale_residual_forward`` (one Triton pass; ``r``
drop path, residual     (N, C) fp32 = layer scale x drop-path keep scale)
=====================  ====================================================

Unlike the dense block (:func:`..ops.gelu_grn.grn_pw2_forward`), the GRN is
NOT folded into a per-sample W2: with p ~ 10..80 visible rows per sample at
stages 3-4 the (N, C, 4C) folded weights (and, in the backward, the (N, C,
4C) ``dout^T u`` products) are several times the activations they replace
(benchmarks/model_fcmae.py counted both: the fold made stage 4 slower than
the torch tail).

Backward: ``dout * r`` with the column sums for the pw2 bias grad
(:func:`..ops.layer_scale_residual.scale_colsum`; with a layer scale,
:func:`..ops.layer_scale_residual.scale_residual_backward` for its grad plus
one torch column sum), torch GEMMs for ``dv = da W2`` and ``dW2 = da^T (u
scale) + db2 beta^T`` (the GRN-scaled ``u`` saved by the forward), the dense block's
GRN/GELU backward kernels (:func:`..ops.gelu_grn.grn_bwd_reduce`,
:func:`..ops.grn_stats.grn_stats_backward`, :func:`..ops.gelu_grn.grn_bwd_apply`
with ``db1``), torch GEMMs for pw1's data and weight grads (fp32 weight grads).

Precision: the compute dtype ``cd`` is the autocast dtype under
``torch.autocast`` (else ``z``'s dtype): ``z`` is cast to it once (what
autocast does before the torch path's pw1), the GEMMs run in it, GRN
statistics and all kernel math are fp32 (one rounding at each store), the
output has ``res``'s dtype (the torch path's residual add promotes to the
stream dtype).

This module is a caller of the ops (it does not change them).  Pure PyTorch
reference: the torch path of :meth:`SparseConvNeXtV2._block` (``sparse_grn``).
Imported lazily by the encoder (it imports Triton).
"""
import torch
import torch.nn.functional as F

from .._errors import ArgumentError
from ..ops.fused_block import compute_dtype_for, mm_f32
from ..ops.gelu_grn import grn_bwd_apply, grn_bwd_reduce, gelu_sumsq_forward
from ..ops.grn_stats import grn_stats_backward, grn_stats_forward
from ..ops.layer_scale_residual import (scale_colsum, scale_residual_backward,
                                        scale_residual_forward)


def _weight2d(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], w.shape[1])


# -- host functions --------------------------------------------------------
def sparse_mlp_forward(z, res, w1, b1, gamma, beta, w2, b2, r, n, eps, cd,
                       keep_a=False):
    """Forward on ``[M, C]`` rows, ``M = n * p``.  Returns ``(out, zc, h, us,
    S, a)``: ``out`` [M, C] in ``res``'s dtype; saved for the backward:
    ``zc`` = z in ``cd``, ``h`` (n, p, K) the pw1 output, ``us`` (n, p, K)
    the GRN-scaled GELU output ``u * scale``, ``S`` (n, K) fp32 GRN sums of
    squares, ``a`` [M, C] the pw2 output less its bias when ``keep_a`` (the
    grad of ``r`` needs it), else None."""
    m, c = z.shape
    if m % n or tuple(res.shape) != (m, c):
        raise ArgumentError(f'z {tuple(z.shape)} and res {tuple(res.shape)} must be '
                            f'[M, C] rows with M a multiple of N={n}.')
    p = m // n
    with torch.autocast(z.device.type, enabled=False):
        zc = z.detach().to(cd).contiguous()
        h = F.linear(zc, w1.detach().to(cd), b1.detach().to(cd)).view(n, p, -1)
        u, spart = gelu_sumsq_forward(h)
        S, scale = grn_stats_forward(spart, gamma.detach(), eps)
        us = scale_residual_forward(u, scale, out_dtype=cd)
        del u
        a = F.linear(us.view(m, -1), w2.detach().to(cd))
        bias2 = torch.mv(w2.detach().float(), beta.detach().float()) + b2.detach().float()
        out = scale_residual_forward(a.view(n, p, c), r.detach(),
                                     res.detach().reshape(n, p, c),
                                     out_dtype=res.dtype, bias=bias2)
    return out.view(m, c), zc, h, us, S, (a if keep_a else None)


def sparse_mlp_backward(dout, zc, h, us, S, a, w1, gamma, beta, w2, b2, r, eps):
    """Grads ``(dz, dw1, db1, dgamma, dbeta, dw2, db2, dr)`` (dz in ``zc``'s
    dtype, weight grads fp32, ``dr`` (n, C) fp32 when ``a`` is given, else
    None); the grad of ``res`` is ``dout`` itself."""
    n, p, k = h.shape
    m, cd = n * p, h.dtype
    with torch.autocast(h.device.type, enabled=False):
        d3 = dout.reshape(n, p, -1)
        r = r.detach()
        dr = None
        if a is not None:  # grad of r: sum_p dout * (a + bias2)
            da, dr, _ = scale_residual_backward(d3, a.view(n, p, -1), r, da_dtype=cd)
            colsum = d3.sum(1, dtype=torch.float32)
            bias2 = torch.mv(w2.detach().float(), beta.detach().float()) + \
                b2.detach().float()
            dr = dr + colsum * bias2[None, :]
        else:
            da, colsum = scale_colsum(d3, r, out_dtype=cd)
        db2 = (r * colsum).sum(0)
        dbeta = torch.mv(w2.detach().float().t(), db2)
        da2 = da.view(m, -1)
        dv = torch.mm(da2, w2.detach().to(cd)).view(n, p, k)
        # the GRN output is us + beta: dW2 = da^T us + (sum_rows da) beta^T
        dw2 = mm_f32(da2.t(), us.view(m, k)) + db2[:, None] * beta.detach().float()[None, :]
        del da, da2
        _, rpart = grn_bwd_reduce(h, dv)
        scale, t, dgamma = grn_stats_backward(S, rpart, gamma.detach(), eps)
        dh, db1 = grn_bwd_apply(h, dv, scale, t)
        del dv
        dh2 = dh.view(m, k)
        dz = torch.mm(dh2, w1.detach().to(cd))
        dw1 = mm_f32(dh2.t(), zc)
    return dz, dw1, db1, dgamma, dbeta, dw2, db2, dr


class SparseMlpFunction(torch.autograd.Function):
    """Thin autograd wrapper of :func:`sparse_mlp_forward` / ``_backward``."""

    @staticmethod
    def forward(ctx, z, res, w1, b1, gamma, beta, w2, b2, r, n, eps, cd):
        out, zc, h, us, S, a = sparse_mlp_forward(
            z, res, w1, b1, gamma, beta, w2, b2, r, n, eps, cd,
            keep_a=bool(ctx.needs_input_grad[8]))
        ctx.save_for_backward(zc, h, us, S, a, w1, gamma, beta, w2, b2, r)
        ctx.eps, ctx.z_dtype = eps, z.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        zc, h, us, S, a, w1, gamma, beta, w2, b2, r = ctx.saved_tensors
        dz, dw1, db1, dgamma, dbeta, dw2, db2, dr = sparse_mlp_backward(
            dout.contiguous(), zc, h, us, S, a, w1, gamma, beta, w2, b2, r, ctx.eps)
        return (dz.to(ctx.z_dtype), dout, dw1.to(w1.dtype), db1.to(w1.dtype),
                dgamma.to(gamma.dtype), dbeta.to(beta.dtype), dw2.to(w2.dtype),
                db2.to(b2.dtype), dr, None, None, None)


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
