"""GELU + GRN, with the GRN apply folded into the second pointwise GEMM.

Layout: the hidden tensor is (N, HW, K) contiguous (K = 4C hidden channels,
channels-last pixels).  Forward:

1. ``_gelu_sumsq_kernel``: ``u = GELU(h)`` (exact erf GELU, fp32 math, one
   cast at the store) and per-(sample, pixel tile, channel) fp32 partial sums
   of ``u**2`` (deterministic; reduced with a torch sum).
2. ``G = sqrt(S)``, ``Nx = G / (mean_k G + eps)``, ``scale = 1 + gamma * Nx``
   (tiny (N, K) fp32 torch ops; ``G = 0`` gives ``Nx = 0``, never 0/0).
3. ``pw2(u * scale + beta) = u @ (W2 diag(scale_n))^T + (W2 beta + b2)``:
   a per-sample column scale of W2 (N small matrices) and a bias, so the GRN
   output is never materialised.  The GEMM itself is a torch ``baddbmm``
   (cuBLAS); Triton GEMMs with these epilogues are not written yet.

Backward (``da`` = grad of the pw2 output, via :func:`grn_pw2_backward`):
``dv = da @ W2`` (torch), then ``_grn_bwd_reduce_kernel`` recomputes ``u``
from ``h`` and emits partials of the second global reduction
``R[n, k] = sum_p dv * u``; the (N, K) GRN-stat backward is torch; finally
``_grn_bwd_apply_kernel`` writes ``dh = (dv * scale + u * t) * GELU'(h)``.
"""
import torch
import triton
import triton.language as tl

from .._errors import ArgumentError
from ._common import check_same_device, check_tensor, is_interpreter, next_pow2
from .reference import GRN_EPS

_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@triton.jit
def _hidden_tile(HW, K, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's tile of an (N, HW, K) tensor: grid (n, pixel tile t,
    channel block); returns (n, t, channels k, k mask, 2-D mask, offsets)."""
    n = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64)
    kb = tl.program_id(2).to(tl.int64)
    p = t * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    kmask = k < K
    return (n, t, k, kmask, (p < HW)[:, None] & kmask[None, :],
            n * HW * K + p[:, None] * K + k[None, :])


@triton.jit
def _gelu_sumsq_kernel(
        Hp,  # (N, HW, K) pre-activation (pw1 output)
        U,  # (N, HW, K) out: GELU(h)
        PART,  # (N, num_p_tiles, K) fp32 out: sum over the tile of u**2
        HW, K,
        BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    n, t, k, kmask, m2, off = _hidden_tile(HW, K, BLOCK_P, BLOCK_K)
    h = tl.load(Hp + off, mask=m2, other=0.).to(tl.float32)
    u = 0.5 * h * (1. + tl.math.erf(h * 0.7071067811865476))
    u_st = u.to(U.dtype.element_ty)
    tl.store(U + off, u_st, mask=m2)
    uf = u_st.to(tl.float32)  # the values the GEMM will see
    tl.store(PART + (n * tl.num_programs(1) + t) * K + k,
             tl.sum(uf * uf, axis=0), mask=kmask)


@triton.jit
def _grn_bwd_reduce_kernel(
        Hp,  # (N, HW, K) pre-activation
        DV,  # (N, HW, K) grad of the GRN output
        U,  # (N, HW, K) out: GELU(h) recomputed (for the W2 grad GEMM)
        PART,  # (N, num_p_tiles, K) fp32 out: sum over the tile of dv * u
        HW, K,
        BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    n, t, k, kmask, m2, off = _hidden_tile(HW, K, BLOCK_P, BLOCK_K)
    h = tl.load(Hp + off, mask=m2, other=0.).to(tl.float32)
    dv = tl.load(DV + off, mask=m2, other=0.).to(tl.float32)
    u = 0.5 * h * (1. + tl.math.erf(h * 0.7071067811865476))
    u_st = u.to(U.dtype.element_ty)
    tl.store(U + off, u_st, mask=m2)
    tl.store(PART + (n * tl.num_programs(1) + t) * K + k,
             tl.sum(dv * u_st.to(tl.float32), axis=0), mask=kmask)


@triton.jit
def _grn_bwd_apply_kernel(
        Hp,  # (N, HW, K) pre-activation
        DV,  # (N, HW, K) grad of the GRN output
        SCALE,  # (N, K) fp32: 1 + gamma * Nx
        T,  # (N, K) fp32: dG / G (0 where G == 0)
        DH,  # (N, HW, K) out: grad of the pre-activation
        HW, K,
        BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    n, t, k, kmask, m2, off = _hidden_tile(HW, K, BLOCK_P, BLOCK_K)
    h = tl.load(Hp + off, mask=m2, other=0.).to(tl.float32)
    dv = tl.load(DV + off, mask=m2, other=0.).to(tl.float32)
    sc = tl.load(SCALE + n * K + k, mask=kmask, other=0.)
    tt = tl.load(T + n * K + k, mask=kmask, other=0.)
    cdf = 0.5 * (1. + tl.math.erf(h * 0.7071067811865476))
    u = (h * cdf).to(DH.dtype.element_ty).to(tl.float32)
    du = dv * sc[None, :] + u * tt[None, :]
    dgelu = cdf + h * tl.exp(-0.5 * h * h) * 0.3989422804014327
    tl.store(DH + off, (du * dgelu).to(DH.dtype.element_ty), mask=m2)


# --------------------------------------------------------------------------
# host functions
# --------------------------------------------------------------------------
def _blocks(K):
    BLOCK_K = min(next_pow2(K), 256 if is_interpreter() else 64)
    budget = 16384 if is_interpreter() else 4096
    BLOCK_P = max(1, min(256, budget // BLOCK_K))
    return BLOCK_P, BLOCK_K


def _grid(N, HW, K, BLOCK_P, BLOCK_K):
    return (N, triton.cdiv(HW, BLOCK_P), triton.cdiv(K, BLOCK_K))


def gelu_sumsq_forward(h):
    """``u = GELU(h)`` and ``S[n, k] = sum_p u**2`` (fp32) of (N, HW, K) h."""
    check_tensor(h, 'h', ndim=3)
    N, HW, K = h.shape
    BLOCK_P, BLOCK_K = _blocks(K)
    grid = _grid(N, HW, K, BLOCK_P, BLOCK_K)
    u = torch.empty_like(h)
    part = torch.empty((N, grid[1], K), device=h.device, dtype=torch.float32)
    _gelu_sumsq_kernel[grid](h, u, part, HW, K, BLOCK_P=BLOCK_P,
                             BLOCK_K=BLOCK_K)
    return u, part.sum(1)


def grn_stats(S, gamma, eps=GRN_EPS):
    """(N, K) fp32 sums of squares -> ``(G, D, Nx, scale)`` (fp32)."""
    G = S.sqrt()
    D = G.mean(dim=1, keepdim=True) + eps
    Nx = G / D
    scale = 1. + gamma.detach().float()[None, :] * Nx
    return G, D, Nx, scale


def grn_stats_backward(R, G, D, Nx, gamma):
    """From ``R[n, k] = sum_p dv * u``: ``(dgamma (K,), t (N, K))`` with
    ``du = dv * scale + u * t``; ``t = 0`` where ``G = 0`` (no 0/0)."""
    K = G.shape[1]
    dgamma = (R * Nx).sum(0)
    dNx = gamma.detach().float()[None, :] * R
    dG = dNx / D - (dNx * G).sum(1, keepdim=True) / (D * D * K)
    safe = G > 0
    t = torch.where(safe, dG / torch.where(safe, G, torch.ones_like(G)),
                    torch.zeros_like(G))
    return dgamma, t


def grn_bwd_reduce(h, dv):
    """Recompute ``u = GELU(h)``; return ``(u, R)`` with ``R = sum_p dv*u``."""
    check_tensor(h, 'h', ndim=3)
    check_tensor(dv, 'dv', shape=tuple(h.shape))
    N, HW, K = h.shape
    BLOCK_P, BLOCK_K = _blocks(K)
    grid = _grid(N, HW, K, BLOCK_P, BLOCK_K)
    u = torch.empty_like(h)
    part = torch.empty((N, grid[1], K), device=h.device, dtype=torch.float32)
    _grn_bwd_reduce_kernel[grid](h, dv, u, part, HW, K, BLOCK_P=BLOCK_P,
                                 BLOCK_K=BLOCK_K)
    return u, part.sum(1)


def grn_bwd_apply(h, dv, scale, t):
    """``dh = (dv * scale + GELU(h) * t) * GELU'(h)`` in h's dtype."""
    check_tensor(h, 'h', ndim=3)
    check_tensor(dv, 'dv', shape=tuple(h.shape))
    N, HW, K = h.shape
    check_tensor(scale, 'scale', shape=(N, K), dtypes=(torch.float32, ))
    check_tensor(t, 't', shape=(N, K), dtypes=(torch.float32, ))
    BLOCK_P, BLOCK_K = _blocks(K)
    dh = torch.empty_like(h)
    _grn_bwd_apply_kernel[_grid(N, HW, K, BLOCK_P, BLOCK_K)](
        h, dv, scale, t, dh, HW, K, BLOCK_P=BLOCK_P, BLOCK_K=BLOCK_K)
    return dh


def _check_pw2(h, gamma, beta, w2, b2):
    check_tensor(h, 'h', ndim=3)
    K = h.shape[2]
    check_tensor(gamma, 'grn_gamma', shape=(K, ), contiguous=False)
    check_tensor(beta, 'grn_beta', shape=(K, ), contiguous=False)
    check_tensor(w2, 'w2', ndim=2, contiguous=False)
    if w2.shape[1] != K:
        raise ArgumentError(f'w2 must have shape (C, {K}) to match the hidden '
                            f'channels of h, got {tuple(w2.shape)}.')
    check_tensor(b2, 'b2', shape=(w2.shape[0], ), contiguous=False)
    check_same_device([('h', h), ('grn_gamma', gamma), ('grn_beta', beta),
                       ('w2', w2), ('b2', b2)])


def grn_pw2_forward(h, gamma, beta, w2, b2, eps=GRN_EPS):
    """``a = pw2(GRN(GELU(h)))`` of (N, HW, K) h, in h's dtype.

    Returns ``(a, S)``; ``S`` (N, K) fp32 sums of squares (for the backward).
    """
    _check_pw2(h, gamma, beta, w2, b2)
    u, S = gelu_sumsq_forward(h)
    _, _, _, scale = grn_stats(S, gamma, eps)
    w2f = w2.detach().float()
    w2s = (w2f[None, :, :] * scale[:, None, :]).to(h.dtype)  # (N, C, K)
    bias2 = (w2f @ beta.detach().float() + b2.detach().float()).to(h.dtype)
    a = torch.baddbmm(bias2, u, w2s.transpose(1, 2))
    return a, S


def grn_pw2_backward(dout, r, h, S, gamma, beta, w2, b2, eps=GRN_EPS):
    """Grads of ``out = res + r[n, c] * pw2(GRN(GELU(h)))`` w.r.t. everything
    but ``res``.

    ``dout`` (N, HW, C) grad of ``out``; ``r`` (N, C) fp32 per-(sample,
    channel) scale (layer scale x drop path) or None (= 1).  Returns
    ``(dh, dgamma, dbeta, dw2, db2, dr)``, weight grads fp32, ``dr`` (N, C)
    fp32 or None.  The grad of ``r`` uses ``P_n = dout_n^T u_n`` (also needed
    for ``dw2``), so the pw2 output is neither saved nor recomputed.
    """
    _check_pw2(h, gamma, beta, w2, b2)
    N, HW, K = h.shape
    C = w2.shape[0]
    check_tensor(dout, 'dout', shape=(N, HW, C))
    cd = h.dtype
    w2f = w2.detach().float()
    if r is None:
        da = dout.to(cd)
    else:
        from .layer_scale_residual import scale_residual_forward
        da = scale_residual_forward(dout, r, None, out_dtype=cd)
    dv = torch.matmul(da, w2.detach().to(cd))  # (N, HW, K)
    u, R = grn_bwd_reduce(h, dv)
    G, D, Nx, scale = grn_stats(S, gamma, eps)
    dgamma, t = grn_stats_backward(R, G, D, Nx, gamma)
    dh = grn_bwd_apply(h, dv, scale, t)
    del dv
    P = torch.bmm(dout.to(cd).transpose(1, 2), u).float()  # (N, C, K)
    colsum = dout.sum(dim=1, dtype=torch.float32)  # (N, C)
    rr = torch.ones((N, C), device=h.device) if r is None else r
    db2 = (rr * colsum).sum(0)
    dw2 = ((rr[:, :, None] * P) * scale[:, None, :]).sum(0) \
        + db2[:, None] * beta.detach().float()[None, :]
    dbeta = db2 @ w2f
    dr = None
    if r is not None:
        bias2 = w2f @ beta.detach().float() + b2.detach().float()
        dr = ((w2f[None] * scale[:, None, :]) * P).sum(2) \
            + bias2[None, :] * colsum
    return dh, dgamma, dbeta, dw2, db2, dr


class GeluGrnPw2Function(torch.autograd.Function):
    """``a = pw2(GRN(GELU(h)))``; h (N, HW, K) contiguous."""

    @staticmethod
    def forward(ctx, h, gamma, beta, w2, b2, eps=GRN_EPS):
        a, S = grn_pw2_forward(h, gamma, beta, w2, b2, eps)
        ctx.save_for_backward(h, S, gamma, beta, w2, b2)
        ctx.eps = eps
        return a

    @staticmethod
    def backward(ctx, da):
        h, S, gamma, beta, w2, b2 = ctx.saved_tensors
        dh, dgamma, dbeta, dw2, db2, _ = grn_pw2_backward(
            da.contiguous(), None, h, S, gamma, beta, w2, b2, ctx.eps)
        return (dh, dgamma.to(gamma.dtype), dbeta.to(beta.dtype),
                dw2.to(w2.dtype), db2.to(b2.dtype), None)


def gelu_grn_pw2(h, gamma, beta, w2, b2, eps=GRN_EPS):
    return GeluGrnPw2Function.apply(h, gamma, beta, w2, b2, eps)
