"""Depthwise 7x7 conv (+bias, padding 3) fused with the LayerNorm over C.

Layout: the input is an **(N, H, W, C) contiguous** tensor (the NHWC view
``x.permute(0, 2, 3, 1)`` of an NCHW tensor in ``torch.channels_last`` memory
format is exactly that, without a copy).  The output is the normalised
activation ``z`` as (N, H, W, C) contiguous, plus fp32 per-pixel ``mean`` and
``rstd`` of the conv output (shape (N*H*W,)).

Forward: one program = BLOCK_P pixels x all C channels; 49 masked taps are
accumulated in fp32, then mean/var over C, normalise, affine, one cast at the
store.

Backward (no atomics, deterministic):
1. ``_dwconv_ln_bwd_kernel`` recomputes the conv output of its tile (so it is
   never stored), applies the LN backward and writes ``dy`` (fp32, grad of the
   conv output) plus per-program fp32 partial sums for the LN weight, LN bias
   and conv bias grads.
2. ``_dwconv_dgrad_kernel``: input grad = the same 7x7 depthwise conv with the
   flipped kernel applied to ``dy`` (optionally adding a residual grad).
3. ``_dwconv_wgrad_kernel``: per (tap, c) sum over all pixels of
   ``dy[p] * x[p + offset]``; each program reduces a contiguous range of pixel
   tiles into an fp32 partial buffer (G, 49, C); the host sums over G.
"""
import torch
import triton
import triton.language as tl

from .._errors import ArgumentError
from ._common import check_same_device, check_tensor, next_pow2, pixel_block
from .reference import LN_EPS


@triton.jit
def _dwconv_tile(X, Wt, p, c, pmask, cmask, H, W, C, FLIP: tl.constexpr,
                 BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """fp32 [BLOCK_P, BLOCK_C] depthwise 7x7 conv (no bias) of pixel tile p.

    X: (M, C) NHWC input; Wt: (49, C) fp32 taps (tap = kh * 7 + kw).
    FLIP: use the flipped kernel (dgrad: dx[q] = sum_k w[k] dy[q - (k - 3)]).
    """
    HW = H * W
    n = p // HW
    hw = p % HW
    h = hw // W
    w = hw % W
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for kh in tl.static_range(7):
        if FLIP:
            hh = h - (kh - 3)
        else:
            hh = h + (kh - 3)
        hok = pmask & (hh >= 0) & (hh < H)
        for kw in tl.static_range(7):
            if FLIP:
                ww = w - (kw - 3)
            else:
                ww = w + (kw - 3)
            ok = hok & (ww >= 0) & (ww < W)
            q = (n * H + hh) * W + ww
            xv = tl.load(X + q[:, None] * C + c[None, :],
                         mask=ok[:, None] & cmask[None, :],
                         other=0.).to(tl.float32)
            wv = tl.load(Wt + (kh * 7 + kw) * C + c, mask=cmask, other=0.)
            acc += xv * wv[None, :]
    return acc


@triton.jit
def _pixel_tile(M, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile: (pid, pixel rows p, channels c, their masks, and
    the 2-D mask) of a (BLOCK_P, BLOCK_C) block of an (M, C) NHWC tensor."""
    pid = tl.program_id(0).to(tl.int64)
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    pmask = p < M
    cmask = c < C
    return pid, p, c, pmask, cmask, pmask[:, None] & cmask[None, :]


@triton.jit
def _dwconv_ln_fwd_kernel(
        X,  # (M, C) NHWC input, M = N*H*W
        Wt,  # (49, C) fp32 conv taps
        B,  # (C,) fp32 conv bias
        LNW,  # (C,) fp32 LN weight
        LNB,  # (C,) fp32 LN bias
        Z,  # (M, C) out: normalised activations
        MEAN,  # (M,) fp32 out
        RSTD,  # (M,) fp32 out
        M, H, W, C, eps,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid, p, c, pmask, cmask, m2 = _pixel_tile(M, C, BLOCK_P, BLOCK_C)
    acc = _dwconv_tile(X, Wt, p, c, pmask, cmask, H, W, C, False, BLOCK_P,
                       BLOCK_C)
    acc += tl.load(B + c, mask=cmask, other=0.)[None, :]
    mean = tl.sum(acc, axis=1) / C
    diff = tl.where(cmask[None, :], acc - mean[:, None], 0.)
    var = tl.sum(diff * diff, axis=1) / C
    rstd = tl.rsqrt(var + eps)
    lnw = tl.load(LNW + c, mask=cmask, other=0.)
    lnb = tl.load(LNB + c, mask=cmask, other=0.)
    z = diff * rstd[:, None] * lnw[None, :] + lnb[None, :]
    tl.store(Z + p[:, None] * C + c[None, :], z.to(Z.dtype.element_ty),
             mask=m2)
    tl.store(MEAN + p, mean, mask=pmask)
    tl.store(RSTD + p, rstd, mask=pmask)


@triton.jit
def _dwconv_ln_bwd_kernel(
        X,  # (M, C) NHWC input of the conv
        Wt,  # (49, C) fp32 conv taps
        B,  # (C,) fp32 conv bias
        LNW,  # (C,) fp32 LN weight
        DZ,  # (M, C) grad of the LN output
        MEAN,  # (M,) fp32
        RSTD,  # (M,) fp32
        DY,  # (M, C) fp32 out: grad of the conv output
        PART,  # (num_programs, 3, C) fp32 out: sums of dz*xhat, dz, dy
        M, H, W, C,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid, p, c, pmask, cmask, m2 = _pixel_tile(M, C, BLOCK_P, BLOCK_C)
    acc = _dwconv_tile(X, Wt, p, c, pmask, cmask, H, W, C, False, BLOCK_P,
                       BLOCK_C)
    acc += tl.load(B + c, mask=cmask, other=0.)[None, :]
    mean = tl.load(MEAN + p, mask=pmask, other=0.)
    rstd = tl.load(RSTD + p, mask=pmask, other=0.)
    xhat = tl.where(m2, (acc - mean[:, None]) * rstd[:, None], 0.)
    dz = tl.load(DZ + p[:, None] * C + c[None, :], mask=m2,
                 other=0.).to(tl.float32)
    lnw = tl.load(LNW + c, mask=cmask, other=0.)
    g = dz * lnw[None, :]
    c1 = tl.sum(xhat * g, axis=1) / C
    c2 = tl.sum(g, axis=1) / C
    dy = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
    dy = tl.where(m2, dy, 0.)
    tl.store(DY + p[:, None] * C + c[None, :], dy, mask=m2)
    base = PART + pid * 3 * C
    tl.store(base + c, tl.sum(dz * xhat, axis=0), mask=cmask)
    tl.store(base + C + c, tl.sum(dz, axis=0), mask=cmask)
    tl.store(base + 2 * C + c, tl.sum(dy, axis=0), mask=cmask)


@triton.jit
def _dwconv_dgrad_kernel(
        DY,  # (M, C) fp32 grad of the conv output
        Wt,  # (49, C) fp32 conv taps (flipped inside)
        RES,  # (M, C) residual grad added to the result (if HAS_RES)
        DX,  # (M, C) out: grad of the conv input
        M, H, W, C,
        HAS_RES: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid, p, c, pmask, cmask, m2 = _pixel_tile(M, C, BLOCK_P, BLOCK_C)
    acc = _dwconv_tile(DY, Wt, p, c, pmask, cmask, H, W, C, True, BLOCK_P,
                       BLOCK_C)
    if HAS_RES:
        acc += tl.load(RES + p[:, None] * C + c[None, :], mask=m2,
                       other=0.).to(tl.float32)
    tl.store(DX + p[:, None] * C + c[None, :], acc.to(DX.dtype.element_ty),
             mask=m2)


@triton.jit
def _dwconv_wgrad_kernel(
        X,  # (M, C) NHWC conv input
        DY,  # (M, C) fp32 grad of the conv output
        PART,  # (num_programs, 49, C) fp32 out
        M, H, W, C, TILES_PER_PROG,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    HW = H * W
    for kh in tl.static_range(7):
        for kw in tl.static_range(7):
            acc = tl.zeros((BLOCK_C, ), dtype=tl.float32)
            for t in range(TILES_PER_PROG):
                tile = pid * TILES_PER_PROG + t
                p = tile * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
                pmask = p < M
                n = p // HW
                hw = p % HW
                hh = hw // W + (kh - 3)
                ww = hw % W + (kw - 3)
                ok = pmask & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
                q = (n * H + hh) * W + ww
                dy = tl.load(DY + p[:, None] * C + c[None, :],
                             mask=pmask[:, None] & cmask[None, :], other=0.)
                xv = tl.load(X + q[:, None] * C + c[None, :],
                             mask=ok[:, None] & cmask[None, :],
                             other=0.).to(tl.float32)
                acc += tl.sum(dy * xv, axis=0)
            tl.store(PART + (pid * 49 + kh * 7 + kw) * C + c, acc, mask=cmask)


# --------------------------------------------------------------------------
# host functions
# --------------------------------------------------------------------------
def _check_params(x, dw_weight, dw_bias, ln_weight, ln_bias):
    check_tensor(x, 'x', ndim=4)
    C = x.shape[3]
    check_tensor(dw_weight, 'dw_weight', shape=(C, 1, 7, 7), contiguous=False)
    check_tensor(dw_bias, 'dw_bias', shape=(C, ), contiguous=False)
    if ln_weight is not None:
        check_tensor(ln_weight, 'ln_weight', shape=(C, ), contiguous=False)
        check_tensor(ln_bias, 'ln_bias', shape=(C, ), contiguous=False)
    check_same_device([('x', x), ('dw_weight', dw_weight),
                       ('dw_bias', dw_bias), ('ln_weight', ln_weight),
                       ('ln_bias', ln_bias)])
    return C


def _taps(dw_weight):
    """(C, 1, 7, 7) -> (49, C) fp32 contiguous."""
    C = dw_weight.shape[0]
    return dw_weight.detach().reshape(C, 49).t().float().contiguous()


def _launch_shape(x):
    N, H, W, C = x.shape
    M = N * H * W
    BLOCK_C = next_pow2(C)
    BLOCK_P = pixel_block(BLOCK_C)
    return N, H, W, C, M, BLOCK_C, BLOCK_P


def dwconv_ln_forward(x, dw_weight, dw_bias, ln_weight, ln_bias, eps=LN_EPS,
                      out_dtype=None):
    """z = LN_C(dwconv7x7(x) + b) of an (N, H, W, C) contiguous tensor.

    Returns ``(z, mean, rstd)``: z (N, H, W, C) in ``out_dtype`` (default
    x.dtype), mean/rstd fp32 (N*H*W,).
    """
    _check_params(x, dw_weight, dw_bias, ln_weight, ln_bias)
    N, H, W, C, M, BLOCK_C, BLOCK_P = _launch_shape(x)
    out_dtype = out_dtype or x.dtype
    z = torch.empty((N, H, W, C), device=x.device, dtype=out_dtype)
    mean = torch.empty((M, ), device=x.device, dtype=torch.float32)
    rstd = torch.empty((M, ), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(M, BLOCK_P), )
    _dwconv_ln_fwd_kernel[grid](
        x, _taps(dw_weight), dw_bias.detach().float().contiguous(),
        ln_weight.detach().float().contiguous(),
        ln_bias.detach().float().contiguous(), z, mean, rstd, M, H, W, C,
        float(eps), BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    return z, mean, rstd


def dwconv_ln_backward(dz, x, dw_weight, dw_bias, ln_weight, mean, rstd,
                       dres=None, dx_dtype=None):
    """Grads of :func:`dwconv_ln_forward`.

    ``dres`` (optional, (N, H, W, C)) is added to the input grad (the residual
    branch of a block).  Returns ``(dx, d_dw_weight (C,1,7,7), d_dw_bias,
    d_ln_weight, d_ln_bias)``; weight grads are fp32, reduced from per-program
    partial buffers with a torch sum (deterministic).
    """
    C = _check_params(x, dw_weight, dw_bias, ln_weight, ln_weight)
    check_tensor(dz, 'dz', shape=tuple(x.shape))
    if dres is not None:
        check_tensor(dres, 'dres', shape=tuple(x.shape))
    N, H, W, C, M, BLOCK_C, BLOCK_P = _launch_shape(x)
    check_tensor(mean, 'mean', shape=(M, ), dtypes=(torch.float32, ))
    check_tensor(rstd, 'rstd', shape=(M, ), dtypes=(torch.float32, ))
    taps = _taps(dw_weight)
    n_tiles = triton.cdiv(M, BLOCK_P)
    dy = torch.empty((M, C), device=x.device, dtype=torch.float32)
    part = torch.empty((n_tiles, 3, C), device=x.device, dtype=torch.float32)
    _dwconv_ln_bwd_kernel[(n_tiles, )](
        x, taps, dw_bias.detach().float().contiguous(),
        ln_weight.detach().float().contiguous(), dz, mean, rstd, dy, part,
        M, H, W, C, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    # three separate reductions: the results must not alias each other
    d_lnw, d_lnb, d_b = (part[:, i].sum(0) for i in range(3))

    dx = torch.empty((N, H, W, C), device=x.device,
                     dtype=dx_dtype or x.dtype)
    _dwconv_dgrad_kernel[(n_tiles, )](
        dy, taps, dres if dres is not None else dy, dx, M, H, W, C,
        HAS_RES=dres is not None, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)

    # wgrad: a bounded number of programs, each reducing a range of tiles
    max_progs = 4 if _interp() else 512
    tiles_per_prog = triton.cdiv(n_tiles, max_progs)
    n_progs = triton.cdiv(n_tiles, tiles_per_prog)
    wpart = torch.empty((n_progs, 49, C), device=x.device,
                        dtype=torch.float32)
    _dwconv_wgrad_kernel[(n_progs, )](
        x, dy, wpart, M, H, W, C, tiles_per_prog, BLOCK_P=BLOCK_P,
        BLOCK_C=BLOCK_C)
    d_w = wpart.sum(0).t().reshape(C, 1, 7, 7)
    return dx, d_w, d_b, d_lnw, d_lnb


def _interp():
    from ._common import is_interpreter
    return is_interpreter()


class DwconvLNFunction(torch.autograd.Function):
    """Autograd wrapper: (N, H, W, C) x -> (N, H, W, C) z."""

    @staticmethod
    def forward(ctx, x, dw_weight, dw_bias, ln_weight, ln_bias, eps=LN_EPS):
        z, mean, rstd = dwconv_ln_forward(x, dw_weight, dw_bias, ln_weight,
                                          ln_bias, eps)
        ctx.save_for_backward(x, dw_weight, dw_bias, ln_weight, mean, rstd)
        ctx.param_dtypes = (dw_weight.dtype, dw_bias.dtype, ln_weight.dtype,
                            ln_bias.dtype)
        return z

    @staticmethod
    def backward(ctx, dz):
        x, dw_weight, dw_bias, ln_weight, mean, rstd = ctx.saved_tensors
        dx, d_w, d_b, d_lnw, d_lnb = dwconv_ln_backward(
            dz.contiguous(), x, dw_weight, dw_bias, ln_weight, mean, rstd)
        dt = ctx.param_dtypes
        return (dx, d_w.to(dt[0]), d_b.to(dt[1]), d_lnw.to(dt[2]),
                d_lnb.to(dt[3]), None)


def dwconv_ln(x, dw_weight, dw_bias, ln_weight, ln_bias, eps=LN_EPS):
    """Functional entry: (N, H, W, C) contiguous -> (N, H, W, C)."""
    return DwconvLNFunction.apply(x, dw_weight, dw_bias, ln_weight, ln_bias,
                                  eps)


__all__ = ['dwconv_ln_forward', 'dwconv_ln_backward', 'DwconvLNFunction',
           'dwconv_ln', 'ArgumentError']
