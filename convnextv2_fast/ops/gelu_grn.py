"""GELU + GRN, with the GRN apply folded into the second pointwise GEMM.

Layout: the hidden tensor is (N, HW, K) contiguous (K = 4C hidden channels,
channels-last pixels).  Forward:

1. ``_gelu_sumsq_kernel``: ``u = GELU(h)`` (exact erf GELU, fp32 math, one
   cast at the store) and per-(sample, pixel tile, channel) fp32 partial sums
   of ``u**2`` (deterministic).
2. ``S``, ``G = sqrt(S)``, ``Nx = G / (mean_k G + eps)``, ``scale = 1 +
   gamma * Nx``: :mod:`.grn_stats` (two small kernels; ``G = 0`` gives
   ``Nx = 0``, never 0/0).
3. ``pw2(u * scale + beta) = u @ (W2 diag(scale_n))^T + (W2 beta + b2)``:
   ``_w2_fold_kernel`` reads W2 once in its own dtype and writes the N
   per-sample scaled copies ``w2s[n] = W2 * scale[n]`` directly in the
   compute dtype (no fp32 (N, C, K) temporary), per-K-block partials of
   ``W2 beta`` and, on request, W2 cast to the compute dtype (kept for the
   backward instead of a recast there).  The GEMM is a plain torch ``bmm``
   (cuBLAS); the bias ``W2 beta + b2`` (C,) fp32 is returned separately and
   added by the layer-scale/residual kernel that already passes over the pw2
   output, so there is no bias broadcast copy.

Backward (``da`` = grad of the pw2 output, via :func:`grn_pw2_backward`):
``dv = da @ W2`` (torch), then ``_grn_bwd_reduce_kernel`` recomputes ``u``
from ``h`` and emits partials of the second global reduction
``R[n, k] = sum_p dv * u``; the (N, K) GRN-stat backward is
:func:`.grn_stats.grn_stats_backward`;
``_grn_bwd_apply_kernel`` writes ``dh = (dv * scale + u * t) * GELU'(h)``
and per-tile fp32 partial column sums of ``dh`` (the pw1 bias grad, no
second pass over dh).  The W2 grad: ``P_n = g_n^T u_n`` (one torch ``bmm``,
output in the compute dtype: the only (N, C, K) tensor), then
``_w2_fold_bwd_kernel`` reduces ``dW2 = sum_n r_n scale_n P_n + db2 beta^T``,
``dbeta = W2^T db2`` and, only when asked, the layer-scale grad ``dr`` in one
pass over P and W2 (fp32 partials, fixed-order sums: deterministic).
"""
import torch
import triton
import triton.language as tl

from .._errors import ArgumentError
from ._common import (check_same_device, check_tensor, next_pow2,
                      use_gpu_config)
from .grn_stats import grn_stats_backward, grn_stats_forward
from .reference import GRN_EPS

_SQRT1_2 = 0.7071067811865476
# the kernels index within one sample in int32 (see _hidden_tile)
MAX_HIDDEN_PER_SAMPLE = 2**31 - 1
_INV_SQRT_2PI = 0.3989422804014327


@triton.jit
def _hidden_tile(HW, K, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's tile of an (N, HW, K) tensor: grid (n, pixel tile t,
    channel block); returns (n, t, channels k, k mask, 2-D mask, offsets).
    The offsets are int32 within the sample (HW * K < 2**31) on an int64
    sample base: half the address registers of all-int64 offsets."""
    n = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    kb = tl.program_id(2)
    p = t * BLOCK_P + tl.arange(0, BLOCK_P)
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = k < K
    return (n, t, k, kmask, (p < HW)[:, None] & kmask[None, :],
            n * HW * K, p[:, None] * K + k[None, :])


@triton.jit
def _gelu_sumsq_kernel(
        Hp,  # (N, HW, K) pre-activation (pw1 output)
        U,  # (N, HW, K) out: GELU(h)
        PART,  # (N, num_p_tiles, K) fp32 out: sum over the tile of u**2
        HW, K,
        BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    n, t, k, kmask, m2, base, off = _hidden_tile(HW, K, BLOCK_P, BLOCK_K)
    h = tl.load(Hp + base + off, mask=m2, other=0.).to(tl.float32)
    u = 0.5 * h * (1. + tl.math.erf(h * 0.7071067811865476))
    u_st = u.to(U.dtype.element_ty)
    tl.store(U + base + off, u_st, mask=m2)
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
    n, t, k, kmask, m2, base, off = _hidden_tile(HW, K, BLOCK_P, BLOCK_K)
    h = tl.load(Hp + base + off, mask=m2, other=0.).to(tl.float32)
    dv = tl.load(DV + base + off, mask=m2, other=0.).to(tl.float32)
    u = 0.5 * h * (1. + tl.math.erf(h * 0.7071067811865476))
    u_st = u.to(U.dtype.element_ty)
    tl.store(U + base + off, u_st, mask=m2)
    tl.store(PART + (n * tl.num_programs(1) + t) * K + k,
             tl.sum(dv * u_st.to(tl.float32), axis=0), mask=kmask)


@triton.jit
def _grn_bwd_apply_kernel(
        Hp,  # (N, HW, K) pre-activation
        DV,  # (N, HW, K) grad of the GRN output
        SCALE,  # (N, K) fp32: 1 + gamma * Nx
        T,  # (N, K) fp32: dG / G (0 where G == 0)
        DH,  # (N, HW, K) out: grad of the pre-activation
        PART,  # (N, num_p_tiles, K) fp32 out: sum over the tile of dh
        HW, K,
        BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    n, t, k, kmask, m2, base, off = _hidden_tile(HW, K, BLOCK_P, BLOCK_K)
    h = tl.load(Hp + base + off, mask=m2, other=0.).to(tl.float32)
    dv = tl.load(DV + base + off, mask=m2, other=0.).to(tl.float32)
    sc = tl.load(SCALE + n * K + k, mask=kmask, other=0.)
    tt = tl.load(T + n * K + k, mask=kmask, other=0.)
    cdf = 0.5 * (1. + tl.math.erf(h * 0.7071067811865476))
    u = (h * cdf).to(DH.dtype.element_ty).to(tl.float32)
    du = dv * sc[None, :] + u * tt[None, :]
    dgelu = cdf + h * tl.exp(-0.5 * h * h) * 0.3989422804014327
    dh = (du * dgelu).to(DH.dtype.element_ty)
    tl.store(DH + base + off, dh, mask=m2)
    # the values the pw1 weight-grad GEMM sees; masked lanes are 0
    tl.store(PART + (n * tl.num_programs(1) + t) * K + k,
             tl.sum(dh.to(tl.float32), axis=0), mask=kmask)


@triton.jit
def _w2_tile(C, K, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's [BLOCK_C, BLOCK_K] tile of a (C, K) matrix: grid
    (channel block, hidden block); returns (cb, kb, c, k, c/k masks, 2-D
    mask, offsets into a contiguous (C, K))."""
    cb = tl.program_id(0)
    kb = tl.program_id(1)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = c < C
    kmask = k < K
    m2 = cmask[:, None] & kmask[None, :]
    return (cb, kb, c, k, cmask, kmask, m2, c[:, None] * K + k[None, :])


@triton.jit
def _w2_fold_kernel(
        W2,  # (C, K) pw2 weight, own dtype, strides (stride_c, stride_k)
        SCALE,  # (N, K) fp32 GRN scale 1 + gamma * Nx
        BETA,  # (K,) GRN beta
        W2S,  # (N, C, K) out, compute dtype: W2 * scale[n]
        W2C,  # (C, K) out, compute dtype: W2 cast (if HAS_W2C)
        BPART,  # (num_k_blocks, C) fp32 out: partial sums of W2 beta
        N, C, K, stride_c, stride_k,
        HAS_W2C: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    cb, kb, c, k, cmask, kmask, m2, off = _w2_tile(C, K, BLOCK_C, BLOCK_K)
    w = tl.load(W2 + c[:, None] * stride_c + k[None, :] * stride_k,
                mask=m2, other=0.).to(tl.float32)
    beta = tl.load(BETA + k, mask=kmask, other=0.).to(tl.float32)
    tl.store(BPART + kb * C + c, tl.sum(w * beta[None, :], axis=1),
             mask=cmask)
    if HAS_W2C:
        tl.store(W2C + off, w.to(W2C.dtype.element_ty), mask=m2)
    out_ptrs = W2S + off  # advanced by one (C, K) matrix per sample
    for n in range(N):
        s = tl.load(SCALE + n * K + k, mask=kmask, other=0.)
        tl.store(out_ptrs, (w * s[None, :]).to(W2S.dtype.element_ty),
                 mask=m2)
        out_ptrs += C * K


@triton.jit
def _w2_fold_bwd_kernel(
        P,  # (N, C, K) g_n^T u_n (compute dtype)
        SCALE,  # (N, K) fp32 GRN scale
        RS,  # (N, C) fp32 scale applied to P (if APPLY_R)
        W2,  # (C, K) pw2 weight, own dtype, strides (stride_c, stride_k)
        BETA,  # (K,) GRN beta
        DB2,  # (C,) fp32 grad of b2
        COLSUM,  # (N, C) fp32 sum_p dout (if NEED_DR)
        DW2,  # (C, K) fp32 out
        DBPART,  # (num_c_blocks, K) fp32 out: partials of W2^T db2
        DRPART,  # (num_k_blocks, N, C) fp32 out (if NEED_DR)
        N, C, K, stride_c, stride_k,
        APPLY_R: tl.constexpr, NEED_DR: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    cb, kb, c, k, cmask, kmask, m2, off = _w2_tile(C, K, BLOCK_C, BLOCK_K)
    w = tl.load(W2 + c[:, None] * stride_c + k[None, :] * stride_k,
                mask=m2, other=0.).to(tl.float32)
    beta = tl.load(BETA + k, mask=kmask, other=0.).to(tl.float32)
    db2 = tl.load(DB2 + c, mask=cmask, other=0.)
    tl.store(DBPART + cb * K + k, tl.sum(w * db2[:, None], axis=0),
             mask=kmask)
    acc = db2[:, None] * beta[None, :]
    p_ptrs = P + off  # advanced by one (C, K) matrix per sample
    for n in range(N):
        s = tl.load(SCALE + n * K + k, mask=kmask, other=0.)
        sp = tl.load(p_ptrs, mask=m2, other=0.).to(tl.float32) * s[None, :]
        p_ptrs += C * K
        if APPLY_R:
            rn = tl.load(RS + n * C + c, mask=cmask, other=0.)
            acc += rn[:, None] * sp
        else:
            acc += sp
        if NEED_DR:
            cs = tl.load(COLSUM + n * C + c, mask=cmask, other=0.)
            tl.store(DRPART + (kb * N + n) * C + c,
                     tl.sum(w * (sp + cs[:, None] * beta[None, :]), axis=1),
                     mask=cmask)
    tl.store(DW2 + off, acc, mask=m2)


# --------------------------------------------------------------------------
# host functions
# --------------------------------------------------------------------------
def check_hidden(h):
    """Validate an (N, HW, K) hidden tensor, including the int32 in-sample
    offset limit of the kernels (HW * K < 2**31: ~4M pixels at K = 512,
    an 8192^2 image at stage 1)."""
    check_tensor(h, 'h', ndim=3)
    if h.shape[1] * h.shape[2] > MAX_HIDDEN_PER_SAMPLE:
        raise ArgumentError(
            f'h: {h.shape[1]} pixels x {h.shape[2]} hidden channels per '
            'sample exceeds the int32 in-sample offsets of the GELU/GRN '
            "kernels (2**31); use impl='reference' for inputs this large.")
    return h


def _blocks(K):
    interp = not use_gpu_config()
    BLOCK_K = min(next_pow2(K), 256 if interp else 64)
    budget = 16384 if interp else 4096
    BLOCK_P = max(1, min(256, budget // BLOCK_K))
    return BLOCK_P, BLOCK_K


def _grid(N, HW, K, BLOCK_P, BLOCK_K):
    return (N, triton.cdiv(HW, BLOCK_P), triton.cdiv(K, BLOCK_K))


def gelu_sumsq_forward(h):
    """``u = GELU(h)`` and the (N, T, K) fp32 per-tile partials of ``S[n, k]
    = sum_p u**2`` of (N, HW, K) h (reduced by
    :func:`.grn_stats.grn_stats_forward`)."""
    check_hidden(h)
    N, HW, K = h.shape
    BLOCK_P, BLOCK_K = _blocks(K)
    grid = _grid(N, HW, K, BLOCK_P, BLOCK_K)
    u = torch.empty_like(h)
    part = torch.empty((N, grid[1], K), device=h.device, dtype=torch.float32)
    _gelu_sumsq_kernel[grid](h, u, part, HW, K, BLOCK_P=BLOCK_P,
                             BLOCK_K=BLOCK_K)
    return u, part


def grn_bwd_reduce(h, dv):
    """Recompute ``u = GELU(h)``; return ``(u, rpart)``, the (N, T, K) fp32
    per-tile partials of ``R = sum_p dv*u`` (reduced by
    :func:`.grn_stats.grn_stats_backward`)."""
    check_hidden(h)
    check_tensor(dv, 'dv', shape=tuple(h.shape))
    N, HW, K = h.shape
    BLOCK_P, BLOCK_K = _blocks(K)
    grid = _grid(N, HW, K, BLOCK_P, BLOCK_K)
    u = torch.empty_like(h)
    part = torch.empty((N, grid[1], K), device=h.device, dtype=torch.float32)
    _grn_bwd_reduce_kernel[grid](h, dv, u, part, HW, K, BLOCK_P=BLOCK_P,
                                 BLOCK_K=BLOCK_K)
    return u, part


def grn_bwd_apply(h, dv, scale, t):
    """``dh = (dv * scale + GELU(h) * t) * GELU'(h)`` in h's dtype and the
    pw1 bias grad ``db1 = sum_{n,p} dh`` (K,) fp32, from per-tile partials
    of the same pass (fixed-order sum)."""
    check_hidden(h)
    check_tensor(dv, 'dv', shape=tuple(h.shape))
    N, HW, K = h.shape
    check_tensor(scale, 'scale', shape=(N, K), dtypes=(torch.float32, ))
    check_tensor(t, 't', shape=(N, K), dtypes=(torch.float32, ))
    BLOCK_P, BLOCK_K = _blocks(K)
    grid = _grid(N, HW, K, BLOCK_P, BLOCK_K)
    dh = torch.empty_like(h)
    part = torch.empty((N * grid[1], K), device=h.device, dtype=torch.float32)
    _grn_bwd_apply_kernel[grid](h, dv, scale, t, dh, part, HW, K,
                                BLOCK_P=BLOCK_P, BLOCK_K=BLOCK_K)
    return dh, part.sum(0)


def fold_blocks(C, K):
    """``(BLOCK_C, BLOCK_K)`` of the W2 fold kernels (forward and backward)."""
    interp = not use_gpu_config()
    BLOCK_K = min(next_pow2(K), 256 if interp else 128)
    budget = 16384 if interp else 2048  # <= 255 regs, no spills
    BLOCK_C = max(1, min(next_pow2(C), budget // BLOCK_K))
    return BLOCK_C, BLOCK_K


def w2_fold(w2, scale, beta, dtype, keep_w2=False):
    """Per-sample scaled copies of W2 for the folded GRN apply.

    Returns ``(w2s, wb, w2c)``: ``w2s`` (N, C, K) in ``dtype`` with
    ``w2s[n] = W2 * scale[n]`` (fp32 product, one rounding); ``wb = W2 beta``
    (C,) fp32; ``w2c`` W2 cast to ``dtype`` when ``keep_w2`` (else None).
    W2 is read once, in its own dtype, with its own strides.
    """
    C, K = w2.shape
    N = scale.shape[0]
    BLOCK_C, BLOCK_K = fold_blocks(C, K)
    grid = (triton.cdiv(C, BLOCK_C), triton.cdiv(K, BLOCK_K))
    w2s = torch.empty((N, C, K), device=w2.device, dtype=dtype)
    w2c = (torch.empty((C, K), device=w2.device, dtype=dtype) if keep_w2
           else None)
    bpart = torch.empty((grid[1], C), device=w2.device, dtype=torch.float32)
    _w2_fold_kernel[grid](w2, scale, beta, w2s,
                          w2c if w2c is not None else w2s, bpart, N, C, K,
                          w2.stride(0), w2.stride(1), HAS_W2C=keep_w2,
                          BLOCK_C=BLOCK_C, BLOCK_K=BLOCK_K)
    return w2s, bpart.sum(0), w2c


def w2_fold_backward(P, scale, rs, w2, beta, db2, colsum=None, need_dr=False):
    """Weight grads through the folded GRN apply, one pass over P and W2.

    ``P`` (N, C, K) ``g_n^T u_n`` with ``g`` either ``dout`` (then ``rs`` is
    the (N, C) fp32 per-(sample, channel) scale r) or the already scaled
    ``da = dout * r`` (``rs`` None).  ``db2`` (C,) fp32.  Returns
    ``(dw2, dbeta, drw)`` fp32: ``dw2 = sum_n rs_n scale_n P_n + db2 beta^T``,
    ``dbeta = W2^T db2`` and, when ``need_dr`` (needs ``rs`` and ``colsum``
    = sum_p dout, (N, C) fp32), ``drw[n, c] = sum_k W2[c, k] (scale[n, k]
    P[n, c, k] + beta[k] colsum[n, c])`` (the r grad less ``b2 * colsum``);
    else ``drw`` is None.
    """
    N, C, K = P.shape
    if need_dr and (rs is None or colsum is None):
        raise ArgumentError('need_dr needs P from dout, rs and colsum.')
    BLOCK_C, BLOCK_K = fold_blocks(C, K)
    grid = (triton.cdiv(C, BLOCK_C), triton.cdiv(K, BLOCK_K))
    f32 = torch.float32
    dw2 = torch.empty((C, K), device=P.device, dtype=f32)
    dbpart = torch.empty((grid[0], K), device=P.device, dtype=f32)
    drpart = (torch.empty((grid[1], N, C), device=P.device, dtype=f32)
              if need_dr else None)
    _w2_fold_bwd_kernel[grid](
        P, scale, rs if rs is not None else db2, w2, beta, db2,
        colsum if colsum is not None else db2, dw2, dbpart,
        drpart if drpart is not None else dbpart, N, C, K, w2.stride(0),
        w2.stride(1), APPLY_R=rs is not None, NEED_DR=need_dr,
        BLOCK_C=BLOCK_C, BLOCK_K=BLOCK_K)
    return dw2, dbpart.sum(0), (drpart.sum(0) if need_dr else None)


def _check_pw2(h, gamma, beta, w2, b2):
    check_hidden(h)
    K = h.shape[2]
    check_tensor(gamma, 'grn_gamma', shape=(K, ), contiguous=False)
    check_tensor(beta, 'grn_beta', shape=(K, ))
    check_tensor(w2, 'w2', ndim=2, contiguous=False)
    if w2.shape[1] != K:
        raise ArgumentError(f'w2 must have shape (C, {K}) to match the hidden '
                            f'channels of h, got {tuple(w2.shape)}.')
    check_tensor(b2, 'b2', shape=(w2.shape[0], ), contiguous=False)
    check_same_device([('h', h), ('grn_gamma', gamma), ('grn_beta', beta),
                       ('w2', w2), ('b2', b2)])


def grn_pw2_forward(h, gamma, beta, w2, b2, eps=GRN_EPS, keep_w2=False):
    """``pw2(GRN(GELU(h)))`` of (N, HW, K) h, less its bias.

    Returns ``(a, bias2, S, w2c)``: ``a = u @ (W2 diag(scale_n))^T`` in h's
    dtype (no bias), ``bias2 = W2 beta + b2`` (C,) fp32 (to be added by the
    consumer of ``a``, see ``scale_residual_forward(bias=...)``), ``S``
    (N, K) fp32 sums of squares, ``w2c`` W2 in h's dtype when ``keep_w2``
    (W2 itself if it already has that dtype) else None.
    """
    _check_pw2(h, gamma, beta, w2, b2)
    u, spart = gelu_sumsq_forward(h)
    S, scale = grn_stats_forward(spart, gamma, eps)
    recast = keep_w2 and w2.dtype != h.dtype
    w2s, wb, w2c = w2_fold(w2.detach(), scale, beta.detach(), h.dtype, recast)
    if keep_w2 and not recast:
        w2c = w2.detach()
    a = torch.bmm(u, w2s.transpose(1, 2))
    return a, wb + b2.detach().float(), S, w2c


def grn_pw2_backward(dout, r, h, S, gamma, beta, w2, b2, eps=GRN_EPS,
                     need_dr=None, w2c=None):
    """Grads of ``out = res + r[n, c] * pw2(GRN(GELU(h)))`` w.r.t. everything
    but ``res``.

    ``dout`` (N, HW, C) grad of ``out``; ``r`` (N, C) fp32 per-(sample,
    channel) scale (layer scale x drop path) or None (= 1).  ``need_dr``
    (default: ``r is not None``) computes the grad of ``r``; ``w2c`` is W2
    in h's dtype if the forward kept it (else W2 is cast here).  Returns
    ``(dh, db1, dgamma, dbeta, dw2, db2, dr)``: ``dh`` in h's dtype, the pw1
    bias grad ``db1`` and the weight grads fp32, ``dr`` (N, C) fp32 or None.
    The grad of ``r`` uses ``P_n = dout_n^T u_n`` (also giving ``dw2``), so
    the pw2 output is neither saved nor recomputed.
    """
    _check_pw2(h, gamma, beta, w2, b2)
    N, HW, K = h.shape
    C = w2.shape[0]
    check_tensor(dout, 'dout', shape=(N, HW, C))
    cd = h.dtype
    need_dr = (r is not None) if need_dr is None else bool(need_dr)
    if need_dr and r is None:
        raise ArgumentError('need_dr needs r.')
    if r is None:
        da = dout.to(cd)
        colsum = dout.sum(dim=1, dtype=torch.float32)
    else:
        from .layer_scale_residual import scale_colsum
        da, colsum = scale_colsum(dout, r, out_dtype=cd)
    if w2c is None:
        w2c = w2.detach().to(cd)
    dv = torch.matmul(da, w2c)  # (N, HW, K)
    u, rpart = grn_bwd_reduce(h, dv)
    scale, t, dgamma = grn_stats_backward(S, rpart, gamma, eps)
    dh, db1 = grn_bwd_apply(h, dv, scale, t)
    del dv
    # P_n = g_n^T u_n, the only (N, C, K) tensor, in the compute dtype
    g = dout.to(cd) if need_dr else da
    P = torch.bmm(g.transpose(1, 2), u)
    del u, g
    db2 = colsum.sum(0) if r is None else (r * colsum).sum(0)
    dw2, dbeta, drw = w2_fold_backward(
        P, scale, r if need_dr else None, w2.detach(), beta.detach(), db2,
        colsum, need_dr)
    dr = drw + b2.detach().float()[None, :] * colsum if need_dr else None
    return dh, db1, dgamma, dbeta, dw2, db2, dr


class GeluGrnPw2Function(torch.autograd.Function):
    """``a = pw2(GRN(GELU(h)))``; h (N, HW, K) contiguous."""

    @staticmethod
    def forward(ctx, h, gamma, beta, w2, b2, eps=GRN_EPS):
        a, bias2, S, _ = grn_pw2_forward(h, gamma, beta, w2, b2, eps)
        ctx.save_for_backward(h, S, gamma, beta, w2, b2)
        ctx.eps = eps
        return (a.float() + bias2).to(a.dtype)

    @staticmethod
    def backward(ctx, da):
        h, S, gamma, beta, w2, b2 = ctx.saved_tensors
        dh, _, dgamma, dbeta, dw2, db2, _ = grn_pw2_backward(
            da.contiguous(), None, h, S, gamma, beta, w2, b2, ctx.eps)
        return (dh, dgamma.to(gamma.dtype), dbeta.to(beta.dtype),
                dw2.to(w2.dtype), db2.to(b2.dtype), None)


def gelu_grn_pw2(h, gamma, beta, w2, b2, eps=GRN_EPS):
    return GeluGrnPw2Function.apply(h, gamma, beta, w2, b2, eps)
