"""LayerNorm over the channels of the sparse encoder's compact ``[M, C]`` rows,
one Triton pass each way (FCMAE).

Under bf16/fp16 autocast ``F.layer_norm`` runs in fp32: a cast of the rows to
fp32, the norm (fp32 out), and -- before the next GEMM -- a cast back: three
passes over the rows forward (20 bytes an element at bf16) and more backward.
Here the forward reads the rows once in their dtype and writes the output once
in ``out_dtype`` (fp32 math, one rounding at the store; per-row mean and rstd
saved in fp32), the backward reads ``dy``, ``x`` once and writes ``dx`` once,
with fp32 per-program partials of ``dw``, ``db`` summed on the host in a fixed
order (bit-reproducible, no atomics).

``out_dtype`` is the caller's: the encoder passes the autocast dtype where the
output only feeds a GEMM that autocast would cast it to anyway (the block's LN
before pw1, the downsample LNs before their convs): the same values the torch
path computes; elsewhere (the stem LN, whose output is the residual stream)
:func:`layer_norm_dtype` -- what ``F.layer_norm`` returns under the current
autocast state.

Reference: ``torch.nn.functional.layer_norm`` (tests compare against it in
fp64).  Launch configs: rows per program from the channel block (~4K fp32
values a tile on the GPU; big tiles in the interpreter).
"""
import torch
import triton
import triton.language as tl

from .._errors import ArgumentError
from ..ops._common import check_same_device, check_tensor, next_pow2, pixel_block


@triton.jit
def _ln_fwd_kernel(X, W, B, Y, MEAN, RSTD, M, C, eps,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < M
    cmask = cols < C
    m2 = rmask[:, None] & cmask[None, :]
    off = rows[:, None] * C + cols[None, :]
    x = tl.load(X + off, mask=m2, other=0.).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(m2, x - mean[:, None], 0.)
    var = tl.sum(xc * xc, axis=1) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=cmask, other=0.).to(tl.float32)
    b = tl.load(B + cols, mask=cmask, other=0.).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + off, y.to(Y.dtype.element_ty), mask=m2)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _ln_bwd_kernel(DY, X, W, MEAN, RSTD, DX, DWP, DBP, M, C, rows_per_prog,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    w = tl.load(W + cols, mask=cmask, other=0.).to(tl.float32)
    dw = tl.zeros((BLOCK_C, ), dtype=tl.float32)
    db = tl.zeros((BLOCK_C, ), dtype=tl.float32)
    r0 = pid * rows_per_prog
    r1 = tl.minimum(r0 + rows_per_prog, M)
    for start in range(r0, r1, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        rmask = rows < r1
        m2 = rmask[:, None] & cmask[None, :]
        off = rows[:, None] * C + cols[None, :]
        x = tl.load(X + off, mask=m2, other=0.).to(tl.float32)
        dy = tl.load(DY + off, mask=m2, other=0.).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=rmask, other=0.)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.)
        xhat = tl.where(m2, (x - mean[:, None]) * rstd[:, None], 0.)
        wdy = dy * w[None, :]
        c1 = tl.sum(xhat * wdy, axis=1) / C
        c2 = tl.sum(wdy, axis=1) / C
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=m2)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(DWP + pid * C + cols, dw, mask=cmask)
    tl.store(DBP + pid * C + cols, db, mask=cmask)


# Backward programs: about two per SM of a 132-SM GPU, each over a fixed run of
# rows (a multiple of its row block) -- a function of M and C only, so the
# fp32 dw/db partials (programs, C) and their ordered sum are the same bits on
# any device.
BWD_PROGRAMS = 264


def bwd_rows_per_prog(M: int, block_r: int) -> int:
    return block_r * max(1, triton.cdiv(M, BWD_PROGRAMS * block_r))


def layer_norm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.layer_norm(x, ...)`` returns here: fp32 under an active
    autocast of ``x``'s device type (layer_norm is an fp32 op there), else
    ``x``'s."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.float32
    return x.dtype


def _check(x, weight, bias):
    check_tensor(x, 'x', ndim=2)
    C = x.shape[1]
    check_tensor(weight, 'weight', shape=(C, ))
    check_tensor(bias, 'bias', shape=(C, ))
    check_same_device([('x', x), ('weight', weight), ('bias', bias)])
    if C == 0:
        raise ArgumentError('x must have at least one channel.')


def sparse_ln_forward(x, weight, bias, eps, out_dtype):
    """``(y, mean, rstd)``: y = LN(x) * weight + bias over the last dim in
    ``out_dtype``; mean, rstd (M,) fp32."""
    _check(x, weight, bias)
    M, C = x.shape
    y = torch.empty((M, C), device=x.device, dtype=out_dtype)
    mean = torch.empty((M, ), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if M == 0:
        return y, mean, rstd
    BLOCK_C = next_pow2(C)
    BLOCK_R = pixel_block(BLOCK_C)
    _ln_fwd_kernel[(triton.cdiv(M, BLOCK_R), )](x, weight, bias, y, mean, rstd, M, C,
                                                float(eps), BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
    return y, mean, rstd


def sparse_ln_backward(dy, x, weight, mean, rstd):
    """``(dx, dweight, dbias)``: dx in ``x``'s dtype, dweight/dbias fp32
    (per-program partials summed in program order)."""
    M, C = x.shape
    check_tensor(dy, 'dy', shape=(M, C))
    dx = torch.empty_like(x)
    BLOCK_C = next_pow2(C)
    BLOCK_R = max(1, pixel_block(BLOCK_C) // 2)
    per = bwd_rows_per_prog(M, BLOCK_R)
    progs = max(1, triton.cdiv(M, per))
    dwp = torch.zeros((progs, C), device=x.device, dtype=torch.float32)
    dbp = torch.zeros_like(dwp)
    if M:
        _ln_bwd_kernel[(progs, )](dy, x, weight, mean, rstd, dx, dwp, dbp, M, C, per,
                                  BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
    return dx, dwp.sum(0), dbp.sum(0)


class SparseLayerNormFunction(torch.autograd.Function):
    """Thin autograd wrapper of :func:`sparse_ln_forward` / ``_backward``."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):
        y, mean, rstd = sparse_ln_forward(x, weight, bias, eps, out_dtype)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = sparse_ln_backward(dy.contiguous(), x, weight, mean, rstd)
        return dx, dw.to(weight.dtype), db.to(weight.dtype), None, None


def sparse_layer_norm(x, weight, bias, eps, out_dtype=None):
    """LayerNorm of ``[M, C]`` rows over C (one Triton pass each way) in
    ``out_dtype`` (default :func:`layer_norm_dtype`: what ``F.layer_norm``
    returns).  ``x`` is used as it is (autocast does not apply: the kernel
    computes in fp32 whatever the input dtype)."""
    out_dtype = out_dtype or layer_norm_dtype(x)
    return SparseLayerNormFunction.apply(x.contiguous(), weight, bias, float(eps), out_dtype)
