"""Fused MLP: the block's pointwise GEMMs in Triton, with GELU, the GRN and
the residual in their prologues and epilogues (forward and backward).

Layout: pixels channels-last per sample, ``z`` (N, HW, C), hidden ``h``
(N, HW, K) with K = 4C, weights ``W1`` (K, C), ``W2`` (C, K).  Every tile of
pixels lies inside one sample (the grid is (sample x pixel tile, column
block)), so per-sample vectors (GRN scale, layer scale x drop path ``r``)
are plain row/column loads and per-sample reductions are per-tile partials
reduced on the host in a fixed order (no float atomics: bit-reproducible).

Forward (two kernels):

- ``_pw1_kernel``: ``h = z W1^T + b1`` with an epilogue that applies GELU
  once per element and writes ``u = GELU(h)`` (pw2's operand) and, in save
  mode only, ``h`` (the backward's; recompute and inference write ``u``
  alone), both in the compute dtype, and emits per-tile fp32 partial sums
  of ``u**2`` per (sample, hidden channel): the GRN's first global
  reduction.  The epilogue stores ``h`` (into ``u``'s buffer when ``h`` is
  not kept) and runs the GELU on 32-column chunks read back from L2: 114
  registers and two programs per SM at 128 x 128 tiles (on the register
  tile 163-255 and one, with spills when ``h`` is stored too).
- ``_pw2_kernel``: ``out = res + r * ((u * scale_n) W2^T + W2 beta + b2)``
  with the GRN scale ``scale = 1 + gamma * Nx`` applied to the A tile as it
  is loaded (one multiply per element; no (N, C, 4C) folded weight), bias,
  layer scale x drop path and the residual add in the epilogue, written in
  the stream dtype.

  GELU is not recomputed in pw2's prologue from ``h``: that costs the erf
  once per element *per column block* (C / 128 times: 4-8x at stages 3-4),
  which made pw2 issue-bound (~44K instructions per warp at stage 3, 6x
  the cuBLAS path's bmm in the model); writing ``u`` costs one more 4C-wide
  store (2 bytes per hidden element) in save mode.

Backward:

- ``da = dout * r`` and the column sums of ``dout`` (the b2 / layer-scale
  grads) in one pass over ``dout``
  (:func:`.layer_scale_residual.scale_colsum`, as the cuBLAS path): both
  GEMMs that need it read ``da`` as loaded.  Formed in dv's prologue instead
  (with the column sums from the first column block's programs) it cost
  ~120 instructions per K step in every program and a divergent branch.
- ``_dv_kernel``: ``dv = da W2c`` with an epilogue that recomputes ``u =
  GELU(h)`` (once per element), emits partials of the GRN's second global
  reduction ``R = sum_p dv * u`` and writes ``q = u * scale`` (the forward
  pw2's operand) for the dW2 GEMM.  The epilogue runs on 32-column chunks
  of the tile with ``dv`` read back from L2 (126 registers, two programs per
  SM; on the whole tile 210+, one).
- the GELU/GRN backward apply (``dh``, with the pw1 bias grad from the same
  pass) stays :func:`.gelu_grn.grn_bwd_apply`; ``dz = dh W1`` and
  ``dW1 = dh^T z`` are cuBLAS (plain GEMMs; folding the apply into both of
  their prologues would read ``h`` and ``dv`` twice instead of writing and
  reading ``dh`` -- 8 vs 12 units of the hidden tensor, left for a GPU
  profile to justify).
- ``_dw2_kernel``: ``dW2 = sum_n g_n^T q_n + db2 beta^T`` as a GEMM
  reducing over pixels, ``q`` read as written by ``_dv_kernel`` (it reads
  the same bytes as ``h`` would, without the erf per channel block, and
  the operands go to the dot as loaded: 3.1K instructions per warp at
  stage 3); for the
  layer-scale grad each program keeps a sample's partial product in
  registers, so the per-sample ``r`` and ``sum_k W2 Q`` are applied there:
  no (N, C, K) tensor.  The
  pixel range is split over programs when the (C, K) tile grid is too small
  for the GPU (fp32 partials, fixed-order sum).

All math is fp32 with one cast at each store; ``u`` is rounded to the
compute dtype wherever it is formed, so every kernel sees the same ``u``
(what the cuBLAS path stores), and ``q`` is the same rounding of ``u *
scale`` in the forward and the backward.  fp32 inputs use IEEE fp32 dots
unless torch allows TF32 for matmuls
(``torch.backends.cuda.matmul.allow_tf32``).

Launch configs: one function (:func:`launch_config`) for the host, the sm_90
static suite and the traffic suite.  The GPU tiles are 128-row x 64/128
column tiles with 8 warps, so ``tl.dot`` lowers to wgmma on sm_90 (the
static suite reports it); the interpreter gets small tiles (it cannot
autotune over several configs, and pays per program).
"""
import dataclasses
import functools

import torch
import triton
import triton.language as tl

from .._errors import ArgumentError
from ._common import (SUPPORTED_DTYPES, check_same_device, check_tensor,
                      next_pow2, use_gpu_config)
from .gelu_grn import _w2_tile, check_hidden

KERNELS = ('pw1', 'pw2', 'dv', 'dw2', 'dw2_dr')
# SMs of an H100/H200, and the programs wanted for the pixel-reducing dW2
# GEMM (at least two waves)
_SMS = 132
_DW2_MIN_PROGRAMS = 2 * _SMS
# columns of one chunk of the pw1 / dv GEMMs' GELU epilogues
_EPILOGUE_COLS = 32


@triton.jit
def _gelu(h):
    """Exact (erf) GELU of fp32 ``h``."""
    return 0.5 * h * (1. + tl.math.erf(h * 0.7071067811865476))


@triton.jit
def _gelu_out(h, u_ptrs, part_ptrs, pmask, cmask, WRITE_U: tl.constexpr,
              SUMSQ: tl.constexpr):
    """pw1's epilogue on a [rows, cols] tile of ``h`` (compute dtype): ``u =
    GELU(h)`` rounded to that dtype, stored (if WRITE_U), and the column
    sums of ``u**2`` over the valid rows (if SUMSQ)."""
    u = _gelu(h.to(tl.float32)).to(h.dtype)
    m2 = pmask[:, None] & cmask[None, :]
    if WRITE_U:
        tl.store(u_ptrs, u, mask=m2)
    if SUMSQ:
        uf = tl.where(m2, u.to(tl.float32), 0.)
        tl.store(part_ptrs, tl.sum(uf * uf, axis=0), mask=cmask)


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
        Hp,  # (N, HW, K) out: pre-activation, compute dtype (if WRITE_H)
        U,  # (N, HW, K) out: u = GELU(h), compute dtype (if WRITE_U)
        PART,  # (N, T, K) fp32 out: per-tile sum of u**2 (if SUMSQ)
        HW, C, K, stride_wk, stride_wc,
        WRITE_H: tl.constexpr, WRITE_U: tl.constexpr, SUMSQ: tl.constexpr,
        PREC: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        EC: tl.constexpr):
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
    # one 64-bit tile base, 32-bit offsets in the tile
    base = (n * HW + t * BM) * K
    rows = (p - t * BM)[:, None] * K
    part = PART + (n * T + t) * K
    if WRITE_H or WRITE_U:
        # h stored (into u's buffer when it is not kept: overwritten by u
        # chunk by chunk), then the GELU epilogue on EC-column chunks of the
        # tile read back (this program's own bytes, from L2, after a
        # barrier).  On the register tile the compiler evaluated the GELU
        # twice beside an h store (in the store's layout and in the
        # accumulator's, for the sum: 255 registers and spills at 128 x
        # 128), and once without one at 163 registers (one program per SM);
        # chunked: 117 (two)
        if WRITE_H:
            hbuf = Hp + base
        else:
            hbuf = U + base
        tl.store(hbuf + rows + k[None, :], h,
                 mask=pmask[:, None] & kmask[None, :])
        if WRITE_U or SUMSQ:
            tl.debug_barrier()
            for c0 in range(0, BN, EC):
                kc = kb * BN + c0 + tl.arange(0, EC)
                kcm = kc < K
                off = rows + kc[None, :]
                _gelu_out(tl.load(hbuf + off, mask=pmask[:, None] &
                                  kcm[None, :], other=0.), U + base + off,
                          part + kc, pmask, kcm, WRITE_U, SUMSQ)
    else:
        _gelu_out(h, U, part + k, pmask, kmask, False, SUMSQ)


@triton.jit
def _pw2_kernel(
        U,  # (N, HW, K) u = GELU(h), compute dtype
        SCALE,  # (N, K) fp32 GRN scale 1 + gamma * Nx
        W2,  # (C, K) pw2 weight, compute dtype, strides (stride_c, stride_k)
        BIAS,  # (C,) fp32: W2 beta + b2
        R,  # (N, C) fp32 layer scale x drop-path keep scale
        RES,  # (N, HW, C) residual, stream dtype
        OUT,  # (N, HW, C) out, stream dtype
        HW, C, K, stride_wc, stride_wk,
        PREC: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    n, t, p, pmask, T, cb, c, cmask, r, u_ptrs, w_ptrs = _gemm_tile(
        U, W2, HW, C, K, stride_wc, stride_wk, BM, BN, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rm = (k0 + r) < K
        u = tl.load(u_ptrs, mask=pmask[:, None] & rm[None, :],
                    other=0.).to(tl.float32)
        s = tl.load(SCALE + n * K + k0 + r, mask=rm, other=0.)
        q = (u * s[None, :]).to(W2.dtype.element_ty)
        w = tl.load(w_ptrs, mask=rm[:, None] & cmask[None, :], other=0.)
        acc = tl.dot(q, w, acc, input_precision=PREC)
        u_ptrs += BK
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
        DA,  # (N, HW, C) dout * r, compute dtype
        W2,  # (C, K) pw2 weight, compute dtype, strides (stride_c, stride_k)
        Hp,  # (N, HW, K) pre-activation, compute dtype
        SCALE,  # (N, K) fp32 GRN scale
        DV,  # (N, HW, K) out: grad of the GRN output, compute dtype
        Q,  # (N, HW, K) out: u * scale, compute dtype (dW2's operand)
        RPART,  # (N, T, K) fp32 out: per-tile sum of dv * GELU(h)
        HW, C, K, stride_wc, stride_wk,
        PREC: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        EC: tl.constexpr):
    n, t, p, pmask, T, kb, k, kmask, r, a_ptrs, w_ptrs = _gemm_tile(
        DA, W2, HW, K, C, stride_wk, stride_wc, BM, BN, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for c0 in range(0, C, BK):
        rm = (c0 + r) < C
        a = tl.load(a_ptrs, mask=pmask[:, None] & rm[None, :], other=0.)
        w = tl.load(w_ptrs, mask=rm[:, None] & kmask[None, :], other=0.)
        acc = tl.dot(a, w, acc, input_precision=PREC)
        a_ptrs += BK
        w_ptrs += BK * stride_wc
    base = (n * HW + t * BM) * K  # the tile's 64-bit base, 32-bit offsets
    rows = (p - t * BM)[:, None] * K
    tl.store(DV + base + rows + k[None, :], acc.to(DV.dtype.element_ty),
             mask=pmask[:, None] & kmask[None, :])
    # the GELU epilogue on EC-column chunks of the tile, dv read back (this
    # program's own bytes, from L2, after a barrier): the whole-tile
    # epilogue held 64 GELU values per thread next to the accumulator (210+
    # registers, one program per SM); per chunk 126 (two)
    tl.debug_barrier()
    for c0 in range(0, BN, EC):
        kc = kb * BN + c0 + tl.arange(0, EC)
        kcm = kc < K
        mc = pmask[:, None] & kcm[None, :]
        off = base + rows + kc[None, :]
        dv = tl.load(DV + off, mask=mc, other=0.).to(tl.float32)
        h = tl.load(Hp + off, mask=mc, other=0.).to(tl.float32)
        u = _gelu(h).to(Hp.dtype.element_ty).to(tl.float32)
        s = tl.load(SCALE + n * K + kc, mask=kcm, other=0.)
        tl.store(Q + off, (u * s[None, :]).to(Q.dtype.element_ty), mask=mc)
        tl.store(RPART + (n * T + t) * K + kc, tl.sum(dv * u, axis=0),
                 mask=kcm)


@triton.jit
def _dw2_kernel(
        G,  # (N, HW, C): dout (if NEED_DR), else da = dout * r (compute
        #     dtype, from scale_colsum)
        R,  # (N, C) fp32 layer scale x drop-path keep scale (if NEED_DR)
        Q,  # (N, HW, K) u * GRN scale, compute dtype (from _dv_kernel)
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
    pq = tl.arange(0, BP)
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
        g_ptrs = G + n * HW * C + (p_lo + pq)[None, :] * C + c[:, None]
        q_ptrs = Q + n * HW * K + (p_lo + pq)[:, None] * K + k[None, :]
        if NEED_DR:
            # the r grad needs this sample's product alone: a second
            # accumulator (already GRN-scaled: q = u * scale), r applied
            # after the pixels
            sp = tl.zeros((BC, BK), dtype=tl.float32)
            for p0 in range(0, p_n, BP):
                pm = (p0 + pq) < p_n
                g = tl.load(g_ptrs, mask=cmask[:, None] & pm[None, :],
                            other=0.)
                qs = tl.load(q_ptrs, mask=pm[:, None] & kmask[None, :],
                             other=0.)
                sp = tl.dot(g.to(tl.float32).to(Q.dtype.element_ty), qs, sp,
                            input_precision=PREC)
                g_ptrs += BP * C
                q_ptrs += BP * K
            rs = tl.load(R + n * C + c, mask=cmask, other=0.)
            acc += rs[:, None] * sp
            # W2 re-read per sample (L2): not held in registers across the
            # pixel loop (the register budget of the two accumulators)
            w = tl.load(W2 + c[:, None] * stride_wc + k[None, :] * stride_wk,
                        mask=m2, other=0.).to(tl.float32)
            cs = tl.load(COLSUM + n * C + c, mask=cmask, other=0.)
            tl.store(DRP + ((s * tl.num_programs(1) + kb) * N + n) * C + c,
                     tl.sum(w * sp, axis=1) + cs * wbeta, mask=cmask)
        else:
            # one accumulator over all samples, both operands as loaded (a
            # plain pipelined GEMM): da = dout * r and q = u * scale, each
            # rounded to the compute dtype as the forward / dv GEMMs use them
            for p0 in range(0, p_n, BP):
                pm = (p0 + pq) < p_n
                da = tl.load(g_ptrs, mask=cmask[:, None] & pm[None, :],
                             other=0.)
                qs = tl.load(q_ptrs, mask=pm[:, None] & kmask[None, :],
                             other=0.)
                acc = tl.dot(da, qs, acc, input_precision=PREC)
                g_ptrs += BP * C
                q_ptrs += BP * K
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
# accumulator: half the tile.  pw1 takes 64 columns: 95 registers, two
# programs per SM (at 128 columns 168 registers, one: its GELU epilogue
# holds 64 values per thread); dv at 64 columns still needs 177-233
# registers (its epilogue's GELU, q, dv and h) and spills under a 128 cap,
# and 64-row / 4-warp tiles need 160-250: both stay at 128 x 128 / 8 warps.
_GPU_TILES = {'pw1': (128, 128, 64, 8, 3), 'pw2': (128, 128, 64, 8, 3),
              'dv': (128, 128, 64, 8, 3), 'dw2': (128, 128, 64, 8, 3),
              'dw2_dr': (128, 64, 64, 8, 3)}
_INTERP_TILES = {'pw1': (32, 32, 32, 4, 1), 'pw2': (128, 128, 64, 8, 3),
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


def pw1_forward(z, w1, b1, sumsq=True, keep_h=True, emit_u=True):
    """pw1 of (N, HW, C) ``z`` and (K, C) ``w1`` (both in the compute
    dtype): ``h = z W1^T + b1`` and ``u = GELU(h)``, both (N, HW, K) in that
    dtype, each written only when asked (``keep_h``: the backward's saved
    pre-activation; ``emit_u``: pw2's operand), else None; with ``sumsq``
    also the (N, T, K) fp32 per-tile partials of ``S[n, k] = sum_p u**2``
    (else None; reduced by :func:`.grn_stats.grn_stats_forward`).  Returns
    ``(h, u, partials)``."""
    N, HW, C = z.shape
    K = w1.shape[0] if w1.dim() == 2 else -1
    _check_mlp(z, 'z', w1, 'w1', (K, C))
    check_tensor(b1, 'b1', shape=(K, ), contiguous=True)
    if not (keep_h or emit_u or sumsq):
        raise ArgumentError('pw1_forward: nothing to compute (keep_h, '
                            'emit_u and sumsq all False).')

    def hidden(want):
        t = torch.empty((N, HW, K) if want else (1, ), device=z.device,
                        dtype=z.dtype)
        if want:
            check_hidden(t)
        return t

    h, u = hidden(keep_h), hidden(emit_u)
    cfg = launch_config('pw1', N, HW, C, K)
    T = triton.cdiv(HW, cfg.BM)
    part = torch.empty((N, T, K) if sumsq else (1, ), device=z.device,
                       dtype=torch.float32)
    _launch(cfg, _pw1_kernel, z, w1, b1, h, u, part, HW, C, K, w1.stride(0),
            w1.stride(1), WRITE_H=bool(keep_h), WRITE_U=bool(emit_u),
            SUMSQ=bool(sumsq), PREC=_prec(z.dtype), BM=cfg.BM, BN=cfg.BN,
            BK=cfg.BK, EC=min(_EPILOGUE_COLS, cfg.BN))
    return (h if keep_h else None, u if emit_u else None,
            part if sumsq else None)


def pw2_residual_forward(u, scale, w2, bias, r, res):
    """``out = res + r * ((u * scale) W2^T + bias)``.

    ``u`` (N, HW, K) (GELU of the pre-activation, from :func:`pw1_forward`)
    and ``w2`` (C, K) in the compute dtype, ``scale``
    (N, K) fp32 GRN scale, ``bias`` (C,) fp32 (``W2 beta + b2``), ``r``
    (N, C) fp32, ``res`` (N, HW, C) the residual stream; ``out`` has
    ``res``'s dtype."""
    check_hidden(u)
    N, HW, K = u.shape
    C = w2.shape[0] if w2.dim() == 2 else -1
    _check_mlp(u, 'u', w2, 'w2', (C, K))
    f32 = (torch.float32, )
    check_tensor(scale, 'scale', shape=(N, K), dtypes=f32)
    check_tensor(bias, 'bias', shape=(C, ), dtypes=f32)
    check_tensor(r, 'r', shape=(N, C), dtypes=f32)
    check_tensor(res, 'res', shape=(N, HW, C))
    check_same_device([('u', u), ('scale', scale), ('bias', bias), ('r', r),
                       ('res', res)])
    out = torch.empty_like(res)
    cfg = launch_config('pw2', N, HW, C, K)
    _launch(cfg, _pw2_kernel, u, scale, w2, bias, r, res, out, HW, C, K,
            w2.stride(0), w2.stride(1), PREC=_prec(u.dtype), BM=cfg.BM,
            BN=cfg.BN, BK=cfg.BK)
    return out


def dv_backward(da, w2, h, scale):
    """``dv = da W2`` (``da = dout * r``, from
    :func:`.layer_scale_residual.scale_colsum`) in h's dtype, ``q = GELU(h)
    * scale`` in h's dtype (the forward pw2's operand, for
    :func:`dw2_backward`: GELU once per element here, not once per dW2
    channel block) and the (N, T, K) fp32 per-tile partials of ``R = sum_p
    dv * GELU(h)`` (reduced by :func:`.grn_stats.grn_stats_backward`), one
    kernel.  Returns ``(dv, q, rpart)``.

    ``da`` (N, HW, C) and ``w2`` (C, K) in h's dtype, ``scale`` (N, K) fp32
    GRN scale."""
    check_hidden(h)
    N, HW, K = h.shape
    C = w2.shape[0] if w2.dim() == 2 else -1
    _check_mlp(h, 'h', w2, 'w2', (C, K))
    check_tensor(da, 'da', shape=(N, HW, C), dtypes=(h.dtype, ))
    check_tensor(scale, 'scale', shape=(N, K), dtypes=(torch.float32, ))
    check_same_device([('h', h), ('da', da), ('scale', scale)])
    cfg = launch_config('dv', N, HW, C, K)
    T = triton.cdiv(HW, cfg.BM)
    dv = torch.empty_like(h)
    q = torch.empty_like(h)
    rpart = torch.empty((N, T, K), device=h.device, dtype=torch.float32)
    _launch(cfg, _dv_kernel, da, w2, h, scale, dv, q, rpart, HW, C, K,
            w2.stride(0), w2.stride(1), PREC=_prec(h.dtype), BM=cfg.BM,
            BN=cfg.BN, BK=cfg.BK, EC=min(_EPILOGUE_COLS, cfg.BN))
    return dv, q, rpart


def dw2_backward(g, r, q, w2, beta, db2, colsum, need_dr=False):
    """Weight grads of ``out = res + r * (q W2^T + W2 beta + b2)`` (``q =
    GELU(h) * scale`` per sample, from :func:`dv_backward`) through W2, one
    GEMM over the pixels.

    ``g`` (N, HW, C): ``dout`` when ``need_dr``, else ``da = dout * r`` in
    q's dtype (:func:`.layer_scale_residual.scale_colsum`).
    Returns ``(dw2 (C, K), dbeta (K,), drw)`` fp32: ``dw2 = sum_n
    da_n^T q_n + db2 beta^T`` (r applied per sample after the pixels when
    ``need_dr``), ``dbeta = W2^T db2``, and when ``need_dr``
    ``drw[n, c] = sum_k W2[c, k] (Q[n, c, k] + beta[k] colsum[n, c])`` with
    ``Q[n] = dout_n^T q_n`` (the grad of r less ``b2 * colsum``), else None.
    ``q`` (N, HW, K) in the compute dtype, ``w2`` (C, K) any dtype (read as
    fp32), ``db2`` (C,) and ``colsum`` (N, C) fp32."""
    check_hidden(q)
    N, HW, K = q.shape
    C = w2.shape[0] if w2.dim() == 2 else -1
    check_tensor(w2, 'w2', shape=(C, K), contiguous=False)
    check_tensor(g, 'dout' if need_dr else 'da', shape=(N, HW, C),
                 dtypes=SUPPORTED_DTYPES if need_dr else (q.dtype, ))
    f32 = (torch.float32, )
    check_tensor(r, 'r', shape=(N, C), dtypes=f32)
    check_tensor(beta, 'grn_beta', shape=(K, ))
    check_tensor(db2, 'db2', shape=(C, ), dtypes=f32)
    check_tensor(colsum, 'colsum', shape=(N, C), dtypes=f32)
    cfg = launch_config('dw2_dr' if need_dr else 'dw2', N, HW, C, K)
    S, KB = cfg.grid[2], cfg.grid[1]
    dev = q.device
    part = torch.empty((S, C, K), device=dev, dtype=torch.float32)
    drp = torch.empty((S, KB, N, C) if need_dr else (1, ), device=dev,
                      dtype=torch.float32)
    dbp = torch.empty((cfg.grid[0], K), device=dev, dtype=torch.float32)
    _launch(cfg, _dw2_kernel, g, r, q, w2, beta, db2, colsum, part,
            drp, dbp, N, HW, C, K, w2.stride(0), w2.stride(1), cfg.split,
            NEED_DR=bool(need_dr), PREC=_prec(q.dtype), BC=cfg.BM,
            BK=cfg.BN, BP=cfg.BK)
    dw2 = part[0] if S == 1 else part.sum(0)
    drw = drp.sum((0, 1)) if need_dr else None
    return dw2, dbp.sum(0), drw
