"""Fused MLP: the block's pointwise GEMMs in Triton, with GELU, the GRN and
the residual in their prologues and epilogues (forward and backward).

Layout: pixels channels-last per sample, ``z`` (N, HW, C), hidden ``h``
(N, HW, K) with K = 4C, weights ``W1`` (K, C), ``W2`` (C, K).  Every tile of
pixels lies inside one sample (the grid is (sample x pixel tile, column
block)), so per-sample vectors (GRN scale, layer scale x drop path ``r``)
are plain row/column loads and per-sample reductions are per-tile partials
reduced on the host in a fixed order (no float atomics: bit-reproducible).

Forward (two kernels, the hidden tensor crosses HBM once each way):

- ``_pw1_kernel``: ``h = z W1^T + b1`` (stored in the compute dtype) with an
  epilogue that emits per-tile fp32 partial sums of ``GELU(h)**2`` per
  (sample, hidden channel): the GRN's first global reduction.  ``u`` is
  never stored.
- ``_pw2_kernel``: ``out = res + r * ((GELU(h) * scale_n) W2^T + W2 beta + b2)``
  with the GRN scale ``scale = 1 + gamma * Nx`` applied to the A tile as it
  is loaded (GELU recomputed from ``h`` in the prologue; no (N, C, 4C)
  folded weight, no ``u`` tensor), bias, layer scale x drop path and the
  residual add in the epilogue, written in the stream dtype.

Backward:

- ``_dv_kernel``: ``dv = (dout * r) W2c`` (``da = dout * r`` formed in the
  prologue) with an epilogue that recomputes ``u = GELU(h)`` and emits
  partials of the GRN's second global reduction ``R = sum_p dv * u``; the
  programs of the first hidden block also emit partial column sums of
  ``dout`` (the b2 / layer-scale grads).
- the GELU/GRN backward apply (``dh``, with the pw1 bias grad from the same
  pass) stays :func:`.gelu_grn.grn_bwd_apply`; ``dz = dh W1`` and
  ``dW1 = dh^T z`` are cuBLAS (plain GEMMs; folding the apply into both of
  their prologues would read ``h`` and ``dv`` twice instead of writing and
  reading ``dh`` -- 8 vs 12 units of the hidden tensor, left for a GPU
  profile to justify).
- ``_dw2_kernel``: ``dW2 = sum_n (g_n^T u_n) diag(scale_n) + db2 beta^T`` as a
  GEMM reducing over pixels, ``u`` recomputed from ``h`` in the prologue;
  each program keeps a sample's partial product in registers, so the
  per-sample GRN scale (and, for the layer-scale grad, the per-sample ``r``
  and ``sum_k W2 (scale P)``) is applied there: no (N, C, K) tensor.  The
  pixel range is split over programs when the (C, K) tile grid is too small
  for the GPU (fp32 partials, fixed-order sum).

All math is fp32 with one cast at each store; ``u`` is rounded to the
compute dtype wherever it is formed, so every kernel sees the same ``u``
(what the cuBLAS path stores).  fp32 inputs use IEEE fp32 dots unless torch
allows TF32 for matmuls (``torch.backends.cuda.matmul.allow_tf32``).

Launch configs: one function (:func:`launch_config`) for the host, the sm_90
static suite and the traffic suite.  The GPU tiles are 128-row x 64/128
column tiles with 4/8 warps, so ``tl.dot`` lowers to wgmma on sm_90 (the
static suite reports it); the interpreter gets small tiles (it cannot
autotune over several configs, and pays per program).
"""
import dataclasses
import functools

import torch
import triton
import triton.language as tl

from .._errors import ArgumentError
from ._common import check_same_device, check_tensor, next_pow2, use_gpu_config
from .gelu_grn import _w2_tile, check_hidden

KERNELS = ('pw1', 'pw2', 'dv', 'dw2', 'dw2_dr')
# SMs of an H100/H200, and the programs wanted for the pixel-reducing dW2
# GEMM (at least two waves)
_SMS = 132
_DW2_MIN_PROGRAMS = 2 * _SMS


@triton.jit
def _gelu(h):
    """Exact (erf) GELU of fp32 ``h``."""
    return 0.5 * h * (1. + tl.math.erf(h * 0.7071067811865476))


@triton.jit
def _row_tile(HW, NCOLS, BM: tl.constexpr, BN: tl.constexpr):
    """This program's (pixel tile, column block) on a 1-D grid: program id =
    (sample * tiles + tile) * column blocks + column block, so the programs
    that share a row tile are launched together (its re-reads hit L2) and
    the grid has no 65535 y-limit.  Returns (n (int64), t, p, p mask, tiles
    per sample, column block)."""
    T = tl.cdiv(HW, BM)
    ncb = tl.cdiv(NCOLS, BN)
    pid = tl.program_id(0)
    row = pid // ncb
    n = (row // T).to(tl.int64)
    t = row % T
    p = t * BM + tl.arange(0, BM)
    return n, t, p, p < HW, T, pid % ncb


@triton.jit
def _gemm_tile(A, B, HW, NCOLS, KRED, stride_bcol, stride_bred,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Setup of a row-tiled GEMM ``out[n, p, col] = sum_r A[n, p, r] *
    B[col, r]`` (A (N, HW, KRED) contiguous, B addressed by strides): this
    program's tile (:func:`_row_tile`), its columns and their mask, the
    reduction lane ``r`` and the first [BM, BK] A / [BK, BN] B pointers.
    Returns (n, t, p, p mask, T, column block, cols, cols mask, r, A
    pointers, B pointers); each kernel keeps its own operand prologue."""
    n, t, p, pmask, T, cb = _row_tile(HW, NCOLS, BM, BN)
    cols = cb * BN + tl.arange(0, BN)
    r = tl.arange(0, BK)
    a_ptrs = A + n * HW * KRED + p[:, None] * KRED + r[None, :]
    b_ptrs = B + cols[None, :] * stride_bcol + r[:, None] * stride_bred
    return n, t, p, pmask, T, cb, cols, cols < NCOLS, r, a_ptrs, b_ptrs


@triton.jit
def _pw1_kernel(
        Z,  # (N, HW, C) LN output, compute dtype
        W1,  # (K, C) pw1 weight, compute dtype, strides (stride_k, stride_c)
        B1,  # (K,) pw1 bias
        Hp,  # (N, HW, K) out: pre-activation, compute dtype
        PART,  # (N, T, K) fp32 out: per-tile sum of GELU(h)**2 (if SUMSQ)
        HW, C, K, stride_wk, stride_wc,
        SUMSQ: tl.constexpr, PREC: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    n, t, p, pmask, T, kb, k, kmask, r, a_ptrs, b_ptrs = _gemm_tile(
        Z, W1, HW, K, C, stride_wk, stride_wc, BM, BN, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for c0 in range(0, C, BK):
        rm = (c0 + r) < C
        a = tl.load(a_ptrs, mask=pmask[:, None] & rm[None, :], other=0.)
        b = tl.load(b_ptrs, mask=rm[:, None] & kmask[None, :], other=0.)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_ptrs += BK
        b_ptrs += BK * stride_wc
    b1 = tl.load(B1 + k, mask=kmask, other=0.).to(tl.float32)
    h = (acc + b1[None, :]).to(Hp.dtype.element_ty)
    m2 = pmask[:, None] & kmask[None, :]
    tl.store(Hp + n * HW * K + p[:, None] * K + k[None, :], h, mask=m2)
    if SUMSQ:
        u = _gelu(h.to(tl.float32)).to(Hp.dtype.element_ty).to(tl.float32)
        u = tl.where(m2, u, 0.)
        tl.store(PART + (n * T + t) * K + k, tl.sum(u * u, axis=0),
                 mask=kmask)


@triton.jit
def _pw2_kernel(
        Hp,  # (N, HW, K) pre-activation, compute dtype
        SCALE,  # (N, K) fp32 GRN scale 1 + gamma * Nx
        W2,  # (C, K) pw2 weight, compute dtype, strides (stride_c, stride_k)
        BIAS,  # (C,) fp32: W2 beta + b2
        R,  # (N, C) fp32 layer scale x drop-path keep scale
        RES,  # (N, HW, C) residual, stream dtype
        OUT,  # (N, HW, C) out, stream dtype
        HW, C, K, stride_wc, stride_wk,
        PREC: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    n, t, p, pmask, T, cb, c, cmask, r, h_ptrs, w_ptrs = _gemm_tile(
        Hp, W2, HW, C, K, stride_wc, stride_wk, BM, BN, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rm = (k0 + r) < K
        h = tl.load(h_ptrs, mask=pmask[:, None] & rm[None, :],
                    other=0.).to(tl.float32)
        s = tl.load(SCALE + n * K + k0 + r, mask=rm, other=0.)
        u = _gelu(h).to(Hp.dtype.element_ty).to(tl.float32)
        q = (u * s[None, :]).to(W2.dtype.element_ty)
        w = tl.load(w_ptrs, mask=rm[:, None] & cmask[None, :], other=0.)
        acc = tl.dot(q, w, acc, input_precision=PREC)
        h_ptrs += BK
        w_ptrs += BK * stride_wk
    bias = tl.load(BIAS + c, mask=cmask, other=0.)
    rs = tl.load(R + n * C + c, mask=cmask, other=0.)
    m2 = pmask[:, None] & cmask[None, :]
    off = n * HW * C + p[:, None] * C + c[None, :]
    res = tl.load(RES + off, mask=m2, other=0.).to(tl.float32)
    out = res + (acc + bias[None, :]) * rs[None, :]
    tl.store(OUT + off, out.to(OUT.dtype.element_ty), mask=m2)


@triton.jit
def _dv_kernel(
        DOUT,  # (N, HW, C) grad of the block output, stream dtype
        R,  # (N, C) fp32 layer scale x drop-path keep scale
        W2,  # (C, K) pw2 weight, compute dtype, strides (stride_c, stride_k)
        Hp,  # (N, HW, K) pre-activation, compute dtype
        DV,  # (N, HW, K) out: grad of the GRN output, compute dtype
        RPART,  # (N, T, K) fp32 out: per-tile sum of dv * GELU(h)
        CPART,  # (N, T, C) fp32 out: per-tile sum of dout (hidden block 0)
        HW, C, K, stride_wc, stride_wk,
        PREC: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    n, t, p, pmask, T, kb, k, kmask, r, g_ptrs, w_ptrs = _gemm_tile(
        DOUT, W2, HW, K, C, stride_wk, stride_wc, BM, BN, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for c0 in range(0, C, BK):
        rm = (c0 + r) < C
        g = tl.load(g_ptrs, mask=pmask[:, None] & rm[None, :],
                    other=0.).to(tl.float32)
        rs = tl.load(R + n * C + c0 + r, mask=rm, other=0.)
        da = (g * rs[None, :]).to(W2.dtype.element_ty)
        w = tl.load(w_ptrs, mask=rm[:, None] & kmask[None, :], other=0.)
        acc = tl.dot(da, w, acc, input_precision=PREC)
        if kb == 0:
            tl.store(CPART + (n * T + t) * C + c0 + r, tl.sum(g, axis=0),
                     mask=rm)
        g_ptrs += BK
        w_ptrs += BK * stride_wc
    m2 = pmask[:, None] & kmask[None, :]
    off = n * HW * K + p[:, None] * K + k[None, :]
    dv = acc.to(DV.dtype.element_ty)
    tl.store(DV + off, dv, mask=m2)
    h = tl.load(Hp + off, mask=m2, other=0.).to(tl.float32)
    u = _gelu(h).to(Hp.dtype.element_ty).to(tl.float32)
    tl.store(RPART + (n * T + t) * K + k,
             tl.sum(dv.to(tl.float32) * u, axis=0), mask=kmask)


@triton.jit
def _dw2_kernel(
        G,  # (N, HW, C) grad of the block output, stream dtype
        R,  # (N, C) fp32 layer scale x drop-path keep scale
        Hp,  # (N, HW, K) pre-activation, compute dtype
        SCALE,  # (N, K) fp32 GRN scale
        W2,  # (C, K) pw2 weight, any dtype, strides (stride_c, stride_k)
        BETA,  # (K,) GRN beta
        DB2,  # (C,) fp32 grad of b2
        COLSUM,  # (N, C) fp32 sum_p dout (if NEED_DR)
        DW2P,  # (S, C, K) fp32 out: per-split partials of dW2
        DRP,  # (S, KB, N, C) fp32 out: partials of the r grad (if NEED_DR)
        DBP,  # (CB, K) fp32 out: partials of dbeta = W2^T db2 (split 0)
        N, HW, C, K, stride_wc, stride_wk, P_SPLIT,
        NEED_DR: tl.constexpr, PREC: tl.constexpr,
        BC: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr):
    cb, kb, c, k, cmask, kmask, m2, off = _w2_tile(C, K, BC, BK)
    s = tl.program_id(2)
    q = tl.arange(0, BP)
    p_lo = s * P_SPLIT
    acc = tl.zeros((BC, BK), dtype=tl.float32)
    # dbeta = W2^T db2 and the beta db2^T term of dW2 come from the first
    # split's programs; elsewhere the W2 tile is masked off (no bytes move)
    # and wbeta = sum_k W2 beta is 0, so only split 0 adds its r-grad term
    w0 = tl.load(W2 + c[:, None] * stride_wc + k[None, :] * stride_wk,
                 mask=m2 & ((c * 0 + s) == 0)[:, None], other=0.).to(
                     tl.float32)
    beta = tl.load(BETA + k, mask=kmask, other=0.).to(tl.float32)
    wbeta = tl.sum(w0 * beta[None, :], axis=1)
    if s == 0:
        db2 = tl.load(DB2 + c, mask=cmask, other=0.)
        acc += db2[:, None] * beta[None, :]
        tl.store(DBP + cb * K + k, tl.sum(w0 * db2[:, None], axis=0),
                 mask=kmask)
    # this program's pixels of each sample: [p_lo, p_lo + p_n), whole
    # BP steps only up to the sample's end (no padded split)
    p_n = tl.minimum(HW - p_lo, P_SPLIT)
    for n in range(N):
        rs = tl.load(R + n * C + c, mask=cmask, other=0.)
        sc = tl.load(SCALE + n * K + k, mask=kmask, other=0.)
        g_ptrs = G + n * HW * C + (p_lo + q)[None, :] * C + c[:, None]
        h_ptrs = Hp + n * HW * K + (p_lo + q)[:, None] * K + k[None, :]
        if NEED_DR:
            # the r grad needs this sample's product alone: a second
            # accumulator, the GRN scale and r applied after the pixels
            pn = tl.zeros((BC, BK), dtype=tl.float32)
            for p0 in range(0, p_n, BP):
                pm = (p0 + q) < p_n
                g = tl.load(g_ptrs, mask=cmask[:, None] & pm[None, :],
                            other=0.).to(tl.float32)
                h = tl.load(h_ptrs, mask=pm[:, None] & kmask[None, :],
                            other=0.).to(tl.float32)
                u = _gelu(h).to(Hp.dtype.element_ty)
                pn = tl.dot(g.to(Hp.dtype.element_ty), u, pn,
                            input_precision=PREC)
                g_ptrs += BP * C
                h_ptrs += BP * K
            sp = pn * sc[None, :]
            acc += rs[:, None] * sp
            # W2 re-read per sample (L2): not held in registers across the
            # pixel loop (the register budget of the two accumulators)
            w = tl.load(W2 + c[:, None] * stride_wc + k[None, :] * stride_wk,
                        mask=m2, other=0.).to(tl.float32)
            cs = tl.load(COLSUM + n * C + c, mask=cmask, other=0.)
            tl.store(DRP + ((s * tl.num_programs(1) + kb) * N + n) * C + c,
                     tl.sum(w * sp, axis=1) + cs * wbeta, mask=cmask)
        else:
            # one accumulator over all samples: r scales the g tile and the
            # GRN scale the u tile as they are loaded (u * scale rounded to
            # the compute dtype: the forward pw2 GEMM's own A operand)
            for p0 in range(0, p_n, BP):
                pm = (p0 + q) < p_n
                g = tl.load(g_ptrs, mask=cmask[:, None] & pm[None, :],
                            other=0.).to(tl.float32)
                h = tl.load(h_ptrs, mask=pm[:, None] & kmask[None, :],
                            other=0.).to(tl.float32)
                u = _gelu(h).to(Hp.dtype.element_ty).to(tl.float32)
                qs = (u * sc[None, :]).to(Hp.dtype.element_ty)
                acc = tl.dot((g * rs[:, None]).to(Hp.dtype.element_ty), qs,
                             acc, input_precision=PREC)
                g_ptrs += BP * C
                h_ptrs += BP * K
    tl.store(DW2P + s * C * K + off, acc, mask=m2)


# --------------------------------------------------------------------------
# launch configuration (one source of truth: host, static and traffic suites)
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tiles, warps, stages and grid of one MLP kernel launch.  For ``dw2``
    ``BM``/``BN``/``BK`` are the (C, K, pixel) tile and ``split`` the pixels
    per program per sample."""
    kernel: str
    BM: int
    BN: int
    BK: int
    num_warps: int
    num_stages: int
    grid: tuple
    split: int = 0


# (BM, BN, BK, warps, stages): GPU tiles sized for wgmma (M = 128 rows per
# warpgroup pair) and a register budget without spills (the static gate);
# interpreter tiles small (tests run hold-out shapes in seconds).
# dw2_dr (the dW2 GEMM with the layer-scale grad) keeps a second per-sample
# accumulator: half the tile.
_GPU_TILES = {'pw1': (128, 128, 64, 8, 3), 'pw2': (128, 128, 64, 8, 3),
              'dv': (128, 128, 64, 8, 3), 'dw2': (128, 128, 64, 8, 3),
              'dw2_dr': (128, 64, 64, 8, 3)}
_INTERP_TILES = {'pw1': (32, 32, 32, 4, 1), 'pw2': (32, 32, 32, 4, 1),
                 'dv': (32, 32, 32, 4, 1), 'dw2': (32, 32, 32, 4, 1),
                 'dw2_dr': (32, 32, 32, 4, 1)}


def launch_config(kernel: str, N: int, HW: int, C: int, K: int,
                  gpu: bool = None) -> GemmConfig:
    """Config of ``kernel`` (one of :data:`KERNELS`) for a block with N
    samples of HW pixels, C channels and K hidden channels.  ``gpu``: the
    GPU's tiles (default: on a GPU, or ``CONVNEXTV2_FAST_GPU_CONFIG=1``)."""
    if kernel not in KERNELS:
        raise ArgumentError(f'kernel must be one of {KERNELS}, got '
                            f'{kernel!r}.')
    if gpu is None:
        gpu = use_gpu_config()
    return _launch_config(kernel, int(N), int(HW), int(C), int(K), bool(gpu),
                          _DW2_MIN_PROGRAMS)


@functools.lru_cache(maxsize=4096)
def _launch_config(kernel, N, HW, C, K, gpu, min_programs) -> GemmConfig:
    BM, BN, BK, warps, stages = (_GPU_TILES if gpu else _INTERP_TILES)[kernel]
    if kernel in ('dw2', 'dw2_dr'):
        BC, BKk, BP = BM, BN, BK
        if not gpu:  # interpreter: no wider than the problem
            BC, BKk = min(BC, next_pow2(C)), min(BKk, next_pow2(K))
        tiles = triton.cdiv(C, BC) * triton.cdiv(K, BKk)
        split = _dw2_split(HW, BP, tiles, gpu, min_programs)
        S = triton.cdiv(HW, split)
        return GemmConfig(kernel, BC, BKk, BP, warps, stages,
                          (triton.cdiv(C, BC), triton.cdiv(K, BKk), S), split)
    ncols = K if kernel in ('pw1', 'dv') else C
    nred = C if kernel in ('pw1', 'dv') else K
    if not gpu:
        BN = min(BN, next_pow2(ncols))
        BK = min(BK, next_pow2(nred))
    return GemmConfig(kernel, BM, BN, BK, warps, stages,
                      (triton.cdiv(ncols, BN) * N * triton.cdiv(HW, BM), ))


def _dw2_split(HW, BP, tiles, gpu, min_programs):
    """Pixels per dW2 program per sample (a multiple of BP).  GPU: at least
    ``min_programs`` programs over the (C, K) tiles and the splits where
    the pixels allow, the split count chosen up to 2x that for the best
    efficiency = useful pixel work / (whole waves of 132 SMs x the longest
    program's pixels) -- a short last split counts as idle time; fewer
    programs on ties.  Interpreter: two splits where the pixels allow (the
    tests exercise the partial sum)."""
    if not gpu:
        return max(BP, triton.cdiv(triton.cdiv(HW, 2), BP) * BP)
    best = None
    lo = triton.cdiv(min_programs, tiles)
    for want in range(lo, 2 * lo + 1):
        split = max(BP, triton.cdiv(triton.cdiv(HW, want), BP) * BP)
        progs = triton.cdiv(HW, split) * tiles
        eff = HW * tiles / (triton.cdiv(progs, _SMS) * _SMS * split)
        if best is None or (eff, -progs) > best[0]:
            best = ((eff, -progs), split)
        if split == BP:
            break
    return best[1]


def _prec(dtype) -> str:
    """``tl.dot`` precision for fp32 operands: IEEE unless torch allows TF32
    for matmuls (what cuBLAS would do); ignored for half operands."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return 'tf32'
    return 'ieee'


def _launch(cfg, kernel_fn, *args, **meta):
    kernel_fn[cfg.grid](*args, num_warps=cfg.num_warps,
                        num_stages=cfg.num_stages, **meta)


# --------------------------------------------------------------------------
# host functions
# --------------------------------------------------------------------------
def _check_mlp(z_or_h, name, w, wname, wshape):
    check_tensor(z_or_h, name, ndim=3)
    check_tensor(w, wname, shape=wshape, contiguous=False)
    if w.dtype != z_or_h.dtype:
        raise TypeError(f'{wname} must have the compute dtype '
                        f'{z_or_h.dtype} of {name}, got {w.dtype}.')
    check_same_device([(name, z_or_h), (wname, w)])


def pw1_forward(z, w1, b1, sumsq=True):
    """``h = z W1^T + b1`` of (N, HW, C) ``z`` and (K, C) ``w1`` (both in the
    compute dtype), in that dtype; with ``sumsq`` also the (N, T, K) fp32
    per-tile partials of ``S[n, k] = sum_p GELU(h)**2`` (else None; reduced
    by :func:`.grn_stats.grn_stats_forward`)."""
    N, HW, C = z.shape
    K = w1.shape[0] if w1.dim() == 2 else -1
    _check_mlp(z, 'z', w1, 'w1', (K, C))
    check_tensor(b1, 'b1', shape=(K, ), contiguous=True)
    h = torch.empty((N, HW, K), device=z.device, dtype=z.dtype)
    check_hidden(h)
    cfg = launch_config('pw1', N, HW, C, K)
    T = triton.cdiv(HW, cfg.BM)
    part = torch.empty((N, T, K) if sumsq else (1, ), device=z.device,
                       dtype=torch.float32)
    _launch(cfg, _pw1_kernel, z, w1, b1, h, part, HW, C, K, w1.stride(0),
            w1.stride(1), SUMSQ=sumsq, PREC=_prec(z.dtype), BM=cfg.BM,
            BN=cfg.BN, BK=cfg.BK)
    return h, (part if sumsq else None)


def pw2_residual_forward(h, scale, w2, bias, r, res):
    """``out = res + r * ((GELU(h) * scale) W2^T + bias)``.

    ``h`` (N, HW, K) and ``w2`` (C, K) in the compute dtype, ``scale``
    (N, K) fp32 GRN scale, ``bias`` (C,) fp32 (``W2 beta + b2``), ``r``
    (N, C) fp32, ``res`` (N, HW, C) the residual stream; ``out`` has
    ``res``'s dtype."""
    check_hidden(h)
    N, HW, K = h.shape
    C = w2.shape[0] if w2.dim() == 2 else -1
    _check_mlp(h, 'h', w2, 'w2', (C, K))
    f32 = (torch.float32, )
    check_tensor(scale, 'scale', shape=(N, K), dtypes=f32)
    check_tensor(bias, 'bias', shape=(C, ), dtypes=f32)
    check_tensor(r, 'r', shape=(N, C), dtypes=f32)
    check_tensor(res, 'res', shape=(N, HW, C))
    check_same_device([('h', h), ('scale', scale), ('bias', bias), ('r', r),
                       ('res', res)])
    out = torch.empty_like(res)
    cfg = launch_config('pw2', N, HW, C, K)
    _launch(cfg, _pw2_kernel, h, scale, w2, bias, r, res, out, HW, C, K,
            w2.stride(0), w2.stride(1), PREC=_prec(h.dtype), BM=cfg.BM,
            BN=cfg.BN, BK=cfg.BK)
    return out


def dv_backward(dout, r, w2, h):
    """``dv = (dout * r) W2`` in h's dtype, the (N, T, K) fp32 per-tile
    partials of ``R = sum_p dv * GELU(h)`` (reduced by
    :func:`.grn_stats.grn_stats_backward`) and ``colsum = sum_p dout``
    (N, C) fp32, one kernel.

    ``dout`` (N, HW, C), ``r`` (N, C) fp32, ``w2`` (C, K) in h's dtype."""
    check_hidden(h)
    N, HW, K = h.shape
    C = w2.shape[0] if w2.dim() == 2 else -1
    _check_mlp(h, 'h', w2, 'w2', (C, K))
    check_tensor(dout, 'dout', shape=(N, HW, C))
    check_tensor(r, 'r', shape=(N, C), dtypes=(torch.float32, ))
    check_same_device([('h', h), ('dout', dout), ('r', r)])
    cfg = launch_config('dv', N, HW, C, K)
    T = triton.cdiv(HW, cfg.BM)
    dv = torch.empty_like(h)
    rpart = torch.empty((N, T, K), device=h.device, dtype=torch.float32)
    cpart = torch.empty((N, T, C), device=h.device, dtype=torch.float32)
    _launch(cfg, _dv_kernel, dout, r, w2, h, dv, rpart, cpart, HW, C, K,
            w2.stride(0), w2.stride(1), PREC=_prec(h.dtype), BM=cfg.BM,
            BN=cfg.BN, BK=cfg.BK)
    return dv, rpart, cpart.sum(1)


def dw2_backward(dout, r, h, scale, w2, beta, db2, colsum, need_dr=False):
    """Weight grads of ``out = res + r * ((GELU(h) * scale) W2^T + W2 beta
    + b2)`` through W2, one GEMM over the pixels.

    Returns ``(dw2 (C, K), dbeta (K,), drw)`` fp32: ``dw2 = sum_n
    (g_n^T u_n) diag(scale_n) + db2 beta^T`` with ``g = dout * r`` (the r
    scale applied per sample when ``need_dr``), ``dbeta = W2^T db2``, and
    when ``need_dr`` ``drw[n, c] = sum_k W2[c, k] (scale[n, k] P[n, c, k] +
    beta[k] colsum[n, c])`` (the grad of r less ``b2 * colsum``), else None.
    ``w2`` (C, K) any dtype (read as fp32), ``db2`` (C,) and ``colsum``
    (N, C) fp32."""
    check_hidden(h)
    N, HW, K = h.shape
    C = w2.shape[0] if w2.dim() == 2 else -1
    check_tensor(w2, 'w2', shape=(C, K), contiguous=False)
    check_tensor(dout, 'dout', shape=(N, HW, C))
    f32 = (torch.float32, )
    check_tensor(r, 'r', shape=(N, C), dtypes=f32)
    check_tensor(scale, 'scale', shape=(N, K), dtypes=f32)
    check_tensor(beta, 'grn_beta', shape=(K, ))
    check_tensor(db2, 'db2', shape=(C, ), dtypes=f32)
    check_tensor(colsum, 'colsum', shape=(N, C), dtypes=f32)
    cfg = launch_config('dw2_dr' if need_dr else 'dw2', N, HW, C, K)
    S, KB = cfg.grid[2], cfg.grid[1]
    dev = h.device
    part = torch.empty((S, C, K), device=dev, dtype=torch.float32)
    drp = torch.empty((S, KB, N, C) if need_dr else (1, ), device=dev,
                      dtype=torch.float32)
    dbp = torch.empty((cfg.grid[0], K), device=dev, dtype=torch.float32)
    _launch(cfg, _dw2_kernel, dout, r, h, scale, w2, beta, db2, colsum, part,
            drp, dbp, N, HW, C, K, w2.stride(0), w2.stride(1), cfg.split,
            NEED_DR=bool(need_dr), PREC=_prec(h.dtype), BC=cfg.BM,
            BK=cfg.BN, BP=cfg.BK)
    dw2 = part[0] if S == 1 else part.sum(0)
    drw = drp.sum((0, 1)) if need_dr else None
    return dw2, dbp.sum(0), drw
