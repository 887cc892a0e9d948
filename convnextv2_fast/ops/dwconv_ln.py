"""Depthwise 7x7 conv (+bias, padding 3) fused with the LayerNorm over C.

Layout: the input is an **(N, H, W, C) contiguous** tensor (the NHWC view
``x.permute(0, 2, 3, 1)`` of an NCHW tensor in ``torch.channels_last`` memory
format is exactly that, without a copy).  The output is the normalised
activation ``z`` as (N, H, W, C) contiguous, plus fp32 per-pixel ``mean`` and
``rstd`` of the conv output (shape (N*H*W,)).

Kernels (all tiles are 2-D spatial tiles TH x TW of one sample x a block of
BC channels; :func:`launch_config` is the single place that picks tiles,
warps, stages and grids, for the host functions and for static checks):

- ``_dwconv_ln_fwd_kernel``: one program = one 4x8 pixel tile (4x4 when 4x8
  tiles would leave fewer than 264 programs: stage 3; 2x4 at stage 4, whose
  128 4x4 tiles would leave one program of 4 warps per SM), a runtime loop over
  channel blocks of one 128-byte line (32 fp32 / 64 bf16 channels).  Pass 1: conv + bias per block, the result ``y``
  rounded to z's dtype (as the reference's conv output is) is parked in ``z``
  and the per-pixel statistics are combined across blocks with Chan's
  parallel formula (block mean and sum of squared deviations, fp32: no
  E[y^2] - E[y]^2 cancellation).  Pass 2 normalises the program's own ``y``
  in place.
- ``_dwconv_ln_bwd_kernel`` (no atomics): recomputes ``y`` the same way and
  parks it in ``dy`` (same dtype as dz = z's dtype, so exactly), accumulates
  the per-pixel LN-backward sums over channel blocks, then writes ``dy`` (in
  dz's dtype, as the reference's autocast conv backward receives it) and
  per-tile fp32 partial sums for the LN weight/bias and conv bias grads.
- ``_dwconv_dgrad_kernel``: dx = the 7x7 conv of dy with the flipped kernel
  (+ the residual grad), register-blocked and row-streamed like wgrad
  (below): the 49 taps and a 7-row dy window in registers, one program per
  (unit, channel block); TW+6 loads per 49*TW FMAs.
- ``_dwconv_wgrad_kernel``: ONE pass over dy and x, register-blocked: a
  program (g, channel block) visits units g, g+G, ... of ROWS rows x S
  column strips of TW pixels (one strip per warp, one channel per thread);
  walking down a strip it keeps the 7 x rows that the current output row
  reads in registers, so per row it loads one new x row (TW+6 values) and
  one dy row (TW) for 49*TW FMAs into 49 fp32 accumulators; the (G, 49, C)
  fp32 partials are summed by the host in a fixed order (bit-reproducible).
  (Before: one load and a cross-thread sum per FMA -- ~5x the
  instructions.)

The LN kernels' convolution (``_conv_block``) runs the 7 kernel rows as a runtime loop
and the 7 columns unrolled: only one row's loads and addresses are live (the
old fully unrolled 49 taps spilled 20-24 KB per thread in dgrad), and the 7
column loads of a row hit the same cache lines.  C is a constexpr (one
compile per width) and each kernel row has ONE pointer tensor: the 7 column
taps of x and of the weights are constant offsets from it, i.e. immediate
offsets of the loads (no per-tap address arithmetic; ``EVEN_C``, C % BC ==
0, drops the channel masks).  sm_90 SASS of the stage-3 forward's row loop:
300 -> 199 instructions for the same 56 FFMAs.  Offsets are int32; a
constexpr ``I64`` switches to int64 when M*C >= 2**31.

Why channel blocks rather than full-C tiles for the LN kernels (register and
byte arithmetic, a model, not a GPU measurement).  A full-C tile keeps the
[pixels, C] fp32 conv output in registers: at ~32 fp32 values per thread and
128 threads that is 4096 values, i.e. 4 pixels at C=1024.  A 4-pixel tile
reads 7 rows x (4+6) halo pixels = 17.5x its own bytes of x, and its 49 x C
fp32 taps (196 B per channel) are 49 B per output element, ~25x a bf16
activation element.  With channel blocks the pixel tile does not depend on C:
8x8 pixels x 64 bf16 channels = 4096 fp32 accumulators (16 per thread at
8 warps), halo (8+6)^2/64 = 3.06x, taps 196/64 = 3.06 B per element.  The price: ``y``
makes one round trip through z (fwd) or dy (LN bwd) in the compute dtype (a
store and a re-load of the program's own tile, L2-resident), and the LN
backward reads dz twice.

Byte model per block element (model, not a GPU measurement; s_x = x's bytes,
4 at stage 1 / 2 later; s_c = compute dtype bytes, 2; "L2->SM" is the bytes a
program requests from L2 after its own L1 reuse, i.e. its unique footprint):

=========  ===================================  ===============================
kernel     HBM (halo, taps, re-reads hit L2)    L2->SM (re-read factor of x/dy)
=========  ===================================  ===============================
fwd 4x8    s_x + s_c + 8/C                       4.38 s_x + 6.1 + s_c (4.38x)
bwd 8x8    s_x + 2 s_c + 8/C                     3.06 s_x + 3.06 + 3 s_c (3.06x)
bwd 4x8    s_x + 2 s_c + 8/C                     4.38 s_x + 6.1 + 3 s_c (4.38x)
fwd 4x4    s_x + s_c + 8/C                       6.25 s_x + 12.25 + s_c (6.25x)
bwd 4x4    s_x + 2 s_c + 8/C                     6.25 s_x + 12.25 + 3 s_c
fwd 2x4    s_x + s_c + 8/C                       10 s_x + 24.5 + s_c (10x)
bwd 2x4    s_x + 2 s_c + 8/C                     10 s_x + 24.5 + 3 s_c
dgrad      s_c + 2 s_x (dy, dres, dx)            1.89 s_c + 2 s_x (16x16 unit)
wgrad      s_c + s_x + 196 G / M                 s_c + 1.89 s_x (16x16 unit)
=========  ===================================  ===============================

Per-program reuse (model, not a GPU measurement): replaying one interior
program's load stream per kernel and stage through an LRU of 16-32 KB of
128-byte lines, the lines missed are 1.00x its unique lines for fwd, dgrad
and wgrad and 1.04-1.21x for ln_bwd (dz is read again in pass 2; 1.07x
with the 4x4 tiles of stages 3-4).  With
32-channel bf16 blocks (half lines) fwd/ln_bwd reached 1.5-1.8x at 16 KB,
hence the one-line channel blocks.

sm_90 resources (ptxas for sm_90a on Triton's own cubin, launch configs of
the V2-B Mask R-CNN stages, N=2, 1024^2; x fp32 at stage 1, bf16 after;
z/dz/dy bf16; registers per thread, zero spills everywhere, H100 occupancy
from 65536 regs and 64 warps per SM):

=======  ============================  ===================================
kernel   stage 1 / 2, 3 (4x4 tile)     before this rebuild (stage 1 / 2-4)
=======  ============================  ===================================
fwd      56 (4x8, 56%) / 72 (4x8,       255 (12.5%) / 168-190 (12.5-19%)
         44%), 52 (56%)
ln_bwd   92 (8x8, 4 warps) / 89 (4x8),  211 (12.5%) / 196-251 (12.5%)
         54 (31, 31, 56%)
dgrad    54 (50%) / 72 (37.5%)         32 + 20-24 KB spill stores/thread
wgrad    157-161 (18.75%)              96-128, 49 passes over dy and x
=======  ============================  ===================================

ln_bwd takes 4 warps and at most 16 tile values per thread (8x8 at
stage 1, 4x8 at stage 2): at 8x8 / 8 warps ptxas spilled 16 B of loop
invariants at stage 2.  At stage 4 both LN kernels take 2x4 tiles (48
registers, 256 programs: two per SM instead of one; 15-18K instructions per
warp instead of 26-31K).  wgrad's 3 programs per
SM are the price of 49 accumulators plus the 6-row x window (84 values) in
registers; TW = 8 raises the row step's FFMA share from 59% to 67% but
needs 215 registers (2 programs per SM).
"""
import functools
import math
from dataclasses import dataclass, replace
from typing import Dict, Tuple

import torch
import triton
import triton.language as tl

from .._errors import ArgumentError
from ._common import (check_same_device, check_tensor, next_pow2,
                      use_gpu_config)
from .reference import LN_EPS


@triton.jit
def _tile_pixels(t, H, W, TH: tl.constexpr, TW: tl.constexpr):
    """Pixels of 2-D spatial tile ``t`` (tiles run over (n, tile row, tile
    column), row-major): sample ``n`` (scalar), rows ``h``, columns ``w`` and
    the in-image mask of the TH*TW pixels (int32)."""
    tiles_w = tl.cdiv(W, TW)
    tiles_h = tl.cdiv(H, TH)
    tw = t % tiles_w
    r = t // tiles_w
    th = r % tiles_h
    n = r // tiles_h
    i = tl.arange(0, TH * TW)
    h = th * TH + i // TW
    w = tw * TW + i % TW
    return n, h, w, (h < H) & (w < W)


@triton.jit
def _row_base(n, hh, H, W, I64: tl.constexpr):
    """Flat pixel index of (n, hh, 0); int64 only when M*C >= 2**31."""
    if I64:
        return (n.to(tl.int64) * H + hh) * W
    return (n * H + hh) * W


@triton.jit
def _conv_block(X, Wt, n, h, w, pmask, c, cmask, H, W, C: tl.constexpr,
                FLIP: tl.constexpr, I64: tl.constexpr, BP: tl.constexpr,
                BC: tl.constexpr, EVEN_C: tl.constexpr):
    """fp32 [BP, BC] depthwise 7x7 conv (no bias) of one pixel tile x one
    channel block.  X: (M, C) NHWC; Wt: (49, C) fp32 taps (kh * 7 + kw).
    FLIP: the flipped kernel (dgrad: dx[q] = sum_k w[k] dy[q - (k - 3)]).
    EVEN_C: C % BC == 0 (no channel mask).

    Kernel rows are a runtime loop (7 iterations), columns are unrolled: the
    7 loads of one row hit the same lines (L1), and only one row's loads and
    addresses are live at a time (no spills).  One pointer tensor per row:
    with C a constexpr the 7 column taps of x and of the weights are
    constant offsets from it (immediate offsets of the loads, no per-tap
    address arithmetic)."""
    acc = tl.zeros((BP, BC), dtype=tl.float32)
    for kh in range(7):
        if FLIP:
            hh = h - (kh - 3)
        else:
            hh = h + (kh - 3)
        hok = pmask & (hh >= 0) & (hh < H)
        xrow = X + ((_row_base(n, hh, H, W, I64) + w) * C)[:, None] + \
            c[None, :]
        wrow = Wt + kh * (7 * C) + c
        for kw in tl.static_range(7):
            dw = (kw - 3) * (1 - 2 * FLIP)  # constexpr column offset
            ok = hok & (w + dw >= 0) & (w + dw < W)
            if EVEN_C:
                xv = tl.load(xrow + dw * C, mask=ok[:, None], other=0.)
                wv = tl.load(wrow + kw * C)
            else:
                xv = tl.load(xrow + dw * C, mask=ok[:, None] & cmask[None, :],
                             other=0.)
                wv = tl.load(wrow + kw * C, mask=cmask, other=0.)
            acc += xv.to(tl.float32) * wv[None, :]
    return acc


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
        H, W, C: tl.constexpr, eps,
        TH: tl.constexpr, TW: tl.constexpr, BC: tl.constexpr,
        I64: tl.constexpr, EVEN_C: tl.constexpr):
    BP: tl.constexpr = TH * TW
    n, h, w, pmask = _tile_pixels(tl.program_id(0), H, W, TH, TW)
    pix = _row_base(n, h, H, W, I64) + w
    mean = tl.zeros((BP, ), dtype=tl.float32)
    m2 = tl.zeros((BP, ), dtype=tl.float32)
    # pass 1: conv + bias per channel block; y (rounded to Z's dtype, as the
    # reference's conv output is) goes to Z; Chan's stable combine of the
    # per-block mean / sum of squared deviations
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        cmask = c < C
        m2d = pmask[:, None] & cmask[None, :]
        acc = _conv_block(X, Wt, n, h, w, pmask, c, cmask, H, W, C, False,
                          I64, BP, BC, EVEN_C)
        y = (acc + tl.load(B + c, mask=cmask, other=0.)[None, :]).to(
            Z.dtype.element_ty)
        tl.store(Z + pix[:, None] * C + c[None, :], y, mask=m2d)
        yf = tl.where(cmask[None, :], y.to(tl.float32), 0.)
        nb = tl.minimum(C - c0, BC) * 1.0
        seen = c0 * 1.0
        bmean = tl.sum(yf, axis=1) / nb
        d = tl.where(cmask[None, :], yf - bmean[:, None], 0.)
        delta = bmean - mean
        tot = seen + nb
        mean += delta * (nb / tot)
        m2 += tl.sum(d * d, axis=1) + delta * delta * (seen * nb / tot)
    rstd = tl.rsqrt(m2 / C + eps)
    tl.debug_barrier()
    # pass 2: normalise this program's own y in place, newest channel block
    # first (its y and the blocks before it are still in L1: LRU order)
    c_last = ((C - 1) // BC) * BC
    for i in range(0, C, BC):
        c = (c_last - i) + tl.arange(0, BC)
        cmask = c < C
        m2d = pmask[:, None] & cmask[None, :]
        ptr = Z + pix[:, None] * C + c[None, :]
        y = tl.load(ptr, mask=m2d, other=0.).to(tl.float32)
        lnw = tl.load(LNW + c, mask=cmask, other=0.)
        lnb = tl.load(LNB + c, mask=cmask, other=0.)
        z = (y - mean[:, None]) * rstd[:, None] * lnw[None, :] + lnb[None, :]
        tl.store(ptr, z.to(Z.dtype.element_ty), mask=m2d)
    tl.store(MEAN + pix, mean, mask=pmask)
    tl.store(RSTD + pix, rstd, mask=pmask)


@triton.jit
def _dwconv_ln_bwd_kernel(
        X,  # (M, C) NHWC input of the conv
        Wt,  # (49, C) fp32 conv taps
        B,  # (C,) fp32 conv bias
        LNW,  # (C,) fp32 LN weight
        DZ,  # (M, C) grad of the LN output (the forward's out dtype)
        MEAN,  # (M,) fp32
        RSTD,  # (M,) fp32
        DY,  # (M, C) out, DZ's dtype: grad of the conv output
        PART,  # (num_tiles, 3, C) fp32 out: sums of dz*xhat, dz, dy
        H, W, C: tl.constexpr,
        TH: tl.constexpr, TW: tl.constexpr, BC: tl.constexpr,
        I64: tl.constexpr, EVEN_C: tl.constexpr):
    BP: tl.constexpr = TH * TW
    t = tl.program_id(0)
    n, h, w, pmask = _tile_pixels(t, H, W, TH, TW)
    pix = _row_base(n, h, H, W, I64) + w
    mean = tl.load(MEAN + pix, mask=pmask, other=0.)
    rstd = tl.load(RSTD + pix, mask=pmask, other=0.)
    c1 = tl.zeros((BP, ), dtype=tl.float32)
    c2 = tl.zeros((BP, ), dtype=tl.float32)
    # pass 1: recompute y (rounded as in the forward: exact in DY's dtype),
    # park it in DY, accumulate the per-pixel LN-backward sums
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        cmask = c < C
        m2d = pmask[:, None] & cmask[None, :]
        acc = _conv_block(X, Wt, n, h, w, pmask, c, cmask, H, W, C, False,
                          I64, BP, BC, EVEN_C)
        y = (acc + tl.load(B + c, mask=cmask, other=0.)[None, :]).to(
            DY.dtype.element_ty)
        tl.store(DY + pix[:, None] * C + c[None, :], y, mask=m2d)
        xhat = tl.where(m2d, (y.to(tl.float32) - mean[:, None]) *
                        rstd[:, None], 0.)
        dz = tl.load(DZ + pix[:, None] * C + c[None, :], mask=m2d,
                     other=0.).to(tl.float32)
        g = dz * tl.load(LNW + c, mask=cmask, other=0.)[None, :]
        c1 += tl.sum(xhat * g, axis=1)
        c2 += tl.sum(g, axis=1)
    c1 = c1 / C
    c2 = c2 / C
    tl.debug_barrier()
    # pass 2: dy from the parked y; per-tile partial sums of the
    # per-channel grads (fixed order: deterministic)
    base = PART + t * 3 * C
    c_last = ((C - 1) // BC) * BC
    for i in range(0, C, BC):  # newest channel block first (see the fwd)
        c = (c_last - i) + tl.arange(0, BC)
        cmask = c < C
        m2d = pmask[:, None] & cmask[None, :]
        ptr = DY + pix[:, None] * C + c[None, :]
        y = tl.load(ptr, mask=m2d, other=0.).to(tl.float32)
        xhat = tl.where(m2d, (y - mean[:, None]) * rstd[:, None], 0.)
        dz = tl.load(DZ + pix[:, None] * C + c[None, :], mask=m2d,
                     other=0.).to(tl.float32)
        g = dz * tl.load(LNW + c, mask=cmask, other=0.)[None, :]
        dy = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        dy = tl.where(m2d, dy, 0.)
        tl.store(ptr, dy.to(DY.dtype.element_ty), mask=m2d)
        tl.store(base + c, tl.sum(dz * xhat, axis=0), mask=cmask)
        tl.store(base + C + c, tl.sum(dz, axis=0), mask=cmask)
        tl.store(base + 2 * C + c, tl.sum(dy, axis=0), mask=cmask)


@triton.jit
def _dwconv_dgrad_kernel(
        DY,  # (M, C) grad of the conv output (compute dtype)
        Wt,  # (49, C) fp32 conv taps (flipped inside)
        RES,  # (M, C) residual grad added to the result (if HAS_RES)
        DX,  # (M, C) out: grad of the conv input
        H, W, C: tl.constexpr, ROWS,
        HAS_RES: tl.constexpr, TW: tl.constexpr, BC: tl.constexpr,
        S: tl.constexpr, I64: tl.constexpr, EVEN_C: tl.constexpr):
    """dx = the 7x7 conv of dy with the flipped kernel (+ dres), register-
    blocked and streamed by rows like the weight gradient: program (unit,
    channel block), a unit = ROWS rows x S column strips of TW pixels (flat
    [S*BC]: strip e // BC, channel e % BC).  The 49 taps of the thread's
    channel and the 7 dy rows that output row h reads (h-3 .. h+3, TW+6
    wide) stay in registers: per row one new dy row (TW+6 loads) for 49*TW
    FMAs."""
    e = tl.arange(0, S * BC)
    c = tl.program_id(1) * BC + e % BC
    strip = e // BC
    okc = (c < C) if not EVEN_C else e >= 0
    taps = ()
    for k in tl.static_range(49):
        taps = taps + (tl.load(Wt + k * C + c, mask=okc, other=0.), )
    u = tl.program_id(0)
    units_w = tl.cdiv(W, S * TW)
    units_h = tl.cdiv(H, ROWS)
    n = u // (units_h * units_w)
    h0 = (u // units_w) % units_h * ROWS
    w0 = (u % units_w * S + strip) * TW  # per strip
    win = ()  # dy rows h0-3 .. h0+2 (6 of the 7 that row h0 reads)
    for rr in tl.static_range(6):
        win = win + _x_row(DY, n, h0 + (rr - 3), w0, c, okc, H, W, C, TW,
                           I64)
    for i in range(0, ROWS):
        h = h0 + i
        win = win + _x_row(DY, n, h + 3, w0, c, okc, H, W, C, TW, I64)
        hok = okc & (h < H)
        p = (_row_base(n, h, H, W, I64) + w0) * C + c
        for j in tl.static_range(TW):
            # dx[h, w0+j] = sum w[kh, kw] dy[h + 3 - kh, w0 + j + 3 - kw]:
            # window row r = 6 - kh, column j + q with q = 6 - kw
            acc = tl.zeros((S * BC, ), dtype=tl.float32)
            for k in tl.static_range(49):
                acc += win[(6 - k // 7) * (TW + 6) + j + 6 - k % 7] * taps[k]
            m = hok & (w0 + j < W)
            if HAS_RES:
                acc += tl.load(RES + p + j * C, mask=m, other=0.).to(
                    tl.float32)
            tl.store(DX + p + j * C, acc.to(DX.dtype.element_ty), mask=m)
        win = _slide(win, TW)


@triton.jit
def _dwconv_wgrad_kernel(
        X,  # (M, C) NHWC conv input
        DY,  # (M, C) grad of the conv output (compute dtype)
        PART,  # (G, 49, C) fp32 out: per-program partial weight grads
        H, W, C: tl.constexpr, NUM_UNITS, G, ROWS,
        TW: tl.constexpr, BC: tl.constexpr, S: tl.constexpr,
        I64: tl.constexpr, EVEN_C: tl.constexpr):
    """One pass over dy and x, register-blocked and streamed by rows.

    Program (g, channel block) visits units g, g+G, ...; a unit is ROWS
    image rows x S*TW columns of one sample, as S column strips of width TW
    side by side (a flat [S*BC] tensor: strip e // BC, channel e % BC; one
    element per thread).  Walking down the rows, a strip keeps the 7 x rows
    that output row h reads (h-3 .. h+3, each TW+6 wide) in registers: per
    row it loads one new x row and one dy row (2*TW+6 loads) for 49*TW FMAs
    into 49 fp32 accumulators, each x and dy value loaded once per strip.
    The strips are summed at the end (fixed order), the (G, 49, C) partials
    by the host (fixed order: bit-reproducible)."""
    g = tl.program_id(0)
    e = tl.arange(0, S * BC)
    c = tl.program_id(1) * BC + e % BC
    strip = e // BC
    cm = c < C
    units_w = tl.cdiv(W, S * TW)
    units_h = tl.cdiv(H, ROWS)
    accs = ()
    for k in tl.static_range(49):
        accs = accs + (tl.zeros((S * BC, ), dtype=tl.float32), )
    for u in range(g, NUM_UNITS, G):
        n = u // (units_h * units_w)
        h0 = (u // units_w) % units_h * ROWS
        w0 = (u % units_w * S + strip) * TW  # per strip
        okc = cm if not EVEN_C else e >= 0
        # the window: x rows h0-3 .. h0+2 (6 of the 7 that row h0 reads)
        win = ()
        for rr in tl.static_range(6):
            win = win + _x_row(X, n, h0 + (rr - 3), w0, c, okc, H, W, C,
                               TW, I64)
        for i in range(0, ROWS):
            h = h0 + i
            win = win + _x_row(X, n, h + 3, w0, c, okc, H, W, C, TW, I64)
            hok = okc & (h < H)
            p = DY + (_row_base(n, h, H, W, I64) + w0) * C + c
            dys = ()
            for j in tl.static_range(TW):
                dys = dys + (tl.load(p + j * C, mask=hok & (w0 + j < W),
                                     other=0.).to(tl.float32), )
            # dW[kh, kw] += sum_j x[h + kh - 3, w0 + j + kw - 3] * dy[h, j]
            upd = ()
            for k in tl.static_range(49):
                a = accs[k]
                for j in tl.static_range(TW):
                    a += win[(k // 7) * (TW + 6) + j + k % 7] * dys[j]
                upd = upd + (a, )
            accs = upd
            win = _slide(win, TW)
    cc = tl.program_id(1) * BC + tl.arange(0, BC)
    for k in tl.static_range(49):
        tl.store(PART + (g * 49 + k) * C + cc,
                 tl.sum(tl.reshape(accs[k], (S, BC)), axis=0), mask=cc < C)


@triton.jit
def _x_row(X, n, hh, w0, c, okc, H, W, C: tl.constexpr, TW: tl.constexpr,
           I64: tl.constexpr):
    """The TW+6 fp32 [S*BC] x vectors of row ``hh``, columns w0-3 ..
    w0+TW+2 (zeros outside the image)."""
    ok = okc & (hh >= 0) & (hh < H)
    p = X + (_row_base(n, hh, H, W, I64) + w0) * C + c
    row = ()
    for q in tl.static_range(TW + 6):
        ww = w0 + (q - 3)
        row = row + (tl.load(p + (q - 3) * C, mask=ok & (ww >= 0) & (ww < W),
                             other=0.).to(tl.float32), )
    return row


@triton.jit
def _slide(win, TW: tl.constexpr):
    """A 7-row window of ``_x_row`` rows less its oldest row (the first
    TW+6 values): the 6 rows the next output row shares with this one."""
    rest = ()
    for q in tl.static_range(6 * (TW + 6)):
        rest = rest + (win[TW + 6 + q], )
    return rest


# --------------------------------------------------------------------------
# launch configuration: the one place that decides tiles, warps and grids
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class LaunchConfig:
    """How one kernel is launched for one shape.

    ``meta``: the kernel's constexprs; ``runtime``: extra integer args (beyond
    tensors and H, W, C) the kernel takes; ``grid``; ``num_warps``/
    ``num_stages``.  The host functions launch exactly this (``launch``);
    static checks compile exactly this."""
    kernel: str
    grid: Tuple[int, ...]
    meta: Dict[str, object]
    runtime: Dict[str, int]
    num_warps: int
    num_stages: int

    def launch(self, *args):
        fn = KERNELS[self.kernel]
        fn[self.grid](*args, **self.runtime, **self.meta,
                      num_warps=self.num_warps, num_stages=self.num_stages)


# Candidate (TH, TW, BC, num_warps, num_stages) per kernel, largest tile
# first: the first one giving at least _MIN_PROGRAMS programs is used (else
# the last).  GPU: chosen with the sm_90 compile check (registers, zero
# spills, occupancy; see the module docstring).  BC None: one 128-byte line
# of the streamed tensor's dtype (the LN kernels loop over channel blocks
# inside a program: a half-line block would fetch each line twice, far
# apart).  Interpreter: bigger tiles (it pays per program instance).
_GPU_TILES = {
    # fwd at 8x8 / 8 warps (73 registers, 3 programs per SM) re-read 1.25x
    # its footprint from L2 at stage 2 (the L1 share of 3 programs); 4x8 / 4
    # warps: 1.19x, within 4% of its instructions at every stage
    'fwd': [(4, 8, None, 4, 1), (4, 4, None, 4, 1), (2, 4, None, 4, 1)],
    # ln_bwd: 8x8 / 4 warps where it holds <= 16 values per thread (fp32 x:
    # stage 1, 22% fewer instructions than 4x8); 8x8 / 8 warps spilled 16 B
    # of loop invariants at stage 2, and 4x8 / 4 warps does not
    'ln_bwd': [(8, 8, None, 4, 1), (4, 8, None, 4, 1), (4, 4, None, 4, 1),
               (2, 4, None, 4, 1)],
    # (ROWS, TW, BC, warps), as wgrad: one strip per warp
    'dgrad': [(16, 4, 32, 4, 1), (8, 4, 32, 4, 1)],
    # (ROWS, TW, BC, warps): one channel per thread, one column strip per
    # warp (S = num_warps).  TW 4: 161 registers, 3 programs per SM, 59% of
    # the row step FFMA; TW 8 reaches 67% FFMA at 215 registers (2 per SM)
    'wgrad': [(16, 4, 32, 4, 1), (8, 4, 32, 4, 1)],
}
_INTERP_TILES = dict({k: [(8, 16, 32, 4, 1)] for k in _GPU_TILES},
                     wgrad=[(4, 4, 32, 2, 1)], dgrad=[(4, 4, 32, 2, 1)])
_MIN_PROGRAMS = 264  # 2 x 132 SMs (H100 SXM)
# LN kernels on the GPU: at most this many fp32 [pixel, channel] values per
# thread in a tile (more cost occupancy or spilled in the sm_90 compile)
_MAX_TILE_PER_THREAD = 16
# element offsets switch to int64 from this many elements (M * C)
_I64_ELEMS = 2**31
# wgrad: programs per channel block (G) so that the (G, 49, C) fp32 partial
# buffer stays small against the activation while the grid fills the GPU
# wgrad: programs (G per channel block) for ONE round of 3 resident
# programs per SM (~160 registers x 4 warps; a second, partial round would
# run at a third of the warps), fewer where the (G, 49, C) fp32 partials
# would exceed half the activation (a 2-byte (M, C) tensor: G <= M / 196)
_WGRAD_MIN_PROGRAMS = 3 * 132
_WGRAD_MAX_PARTIAL_FRAC = 0.5
_WGRAD_MAX_G_INTERP = 3


def launch_config(kernel: str, N: int, H: int, W: int, C: int,
                  dtype: torch.dtype = torch.bfloat16,
                  gpu: bool = None) -> LaunchConfig:
    """Launch config of ``kernel`` (one of :data:`KERNELS`) for an
    (N, H, W, C) input.  ``dtype``: the dtype of the tensor the kernel streams
    with a halo (x for fwd/ln_bwd/wgrad, dy for dgrad).  ``gpu``: use the
    GPU's tiles (default: on a GPU, or when ``CONVNEXTV2_FAST_GPU_CONFIG=1``;
    the interpreter otherwise)."""
    if kernel not in KERNELS:
        raise ArgumentError(f'kernel must be one of {sorted(KERNELS)}, '
                            f'got {kernel!r}.')
    if gpu is None:
        gpu = use_gpu_config()
    return _launch_config(kernel, int(N), int(H), int(W), int(C), dtype,
                          bool(gpu), _tunables())


def _tunables():
    """The module constants a config depends on (part of the cache key, so
    a test that changes one gets a fresh config)."""
    return (_MIN_PROGRAMS, _I64_ELEMS, _WGRAD_MAX_PARTIAL_FRAC,
            _WGRAD_MIN_PROGRAMS, _WGRAD_MAX_G_INTERP, _MAX_TILE_PER_THREAD)


@functools.lru_cache(maxsize=4096)
def _launch_config(kernel, N, H, W, C, dtype, gpu, tunables) -> LaunchConfig:
    """:func:`launch_config` after the GPU/interpreter choice; cached (it runs
    on every call), so the returned config is shared: derive variants with
    ``dataclasses.replace``, never mutate it.  ``tunables``: cache key only
    (the body reads the same module constants)."""
    for TH, TW, BC, warps, stages in (_GPU_TILES if gpu else
                                      _INTERP_TILES)[kernel]:
        if BC is None:
            BC = 128 // dtype.itemsize
        BC = min(BC, next_pow2(C))
        if gpu and kernel in ('fwd', 'ln_bwd') and \
                TH * TW * BC > _MAX_TILE_PER_THREAD * 32 * warps:
            continue
        n_tiles = N * triton.cdiv(H, TH) * triton.cdiv(W, TW)
        n_cb = triton.cdiv(C, BC)
        grid = (n_tiles, ) if kernel in ('fwd', 'ln_bwd') else (n_tiles, n_cb)
        if kernel in ('wgrad', 'dgrad'):  # (unit, channel block) pairs
            grid = (N * triton.cdiv(H, TH) * triton.cdiv(W, warps * TW),
                    n_cb)
        # wgrad: pairs for ~2 per program (grid-stride units, balanced)
        need = _MIN_PROGRAMS * (2 if kernel == 'wgrad' else 1)
        if math.prod(grid) >= need:
            break
    M = N * H * W
    meta = dict(TH=TH, TW=TW, BC=BC, I64=M * C >= _I64_ELEMS,
                EVEN_C=C % BC == 0)
    runtime = {}
    if kernel == 'wgrad':
        S, ROWS = warps, TH  # strips per program, rows per unit
        units = N * triton.cdiv(H, ROWS) * triton.cdiv(W, S * TW)
        G = _WGRAD_MIN_PROGRAMS // n_cb
        if not gpu:
            G = _WGRAD_MAX_G_INTERP
        # partials (G, 49, C) fp32 vs the 2-byte (M, C) activation
        g_bytes = int(_WGRAD_MAX_PARTIAL_FRAC * M * 2 / (49 * 4))
        G = max(1, min(G, g_bytes, units))
        # balanced: every program the same number of units (the busiest
        # program sets the time; fewer partials; linear in H)
        G = triton.cdiv(units, triton.cdiv(units, G))
        meta = dict(TW=TW, BC=BC, S=S, I64=meta['I64'],
                    EVEN_C=meta['EVEN_C'])
        runtime = dict(NUM_UNITS=units, G=G, ROWS=ROWS)
        grid = (G, n_cb)
    if kernel == 'dgrad':
        meta = dict(HAS_RES=True, TW=TW, BC=BC, S=warps, I64=meta['I64'],
                    EVEN_C=meta['EVEN_C'])  # HAS_RES: the host, per call
        runtime = dict(ROWS=TH)
    return LaunchConfig(kernel, grid, meta, runtime, warps, stages)


KERNELS = {
    'fwd': _dwconv_ln_fwd_kernel,
    'ln_bwd': _dwconv_ln_bwd_kernel,
    'dgrad': _dwconv_dgrad_kernel,
    'wgrad': _dwconv_wgrad_kernel,
}


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
    if ln_bias is not None:  # the backward does not take it
        check_tensor(ln_bias, 'ln_bias', shape=(C, ), contiguous=False)
    check_same_device([('x', x), ('dw_weight', dw_weight),
                       ('dw_bias', dw_bias), ('ln_weight', ln_weight),
                       ('ln_bias', ln_bias)])
    return C


def _taps(dw_weight):
    """(C, 1, 7, 7) -> (49, C) fp32 contiguous."""
    C = dw_weight.shape[0]
    return dw_weight.detach().reshape(C, 49).t().float().contiguous()


def _f32(t):
    return t.detach().float().contiguous()


def dwconv_ln_forward(x, dw_weight, dw_bias, ln_weight, ln_bias, eps=LN_EPS,
                      out_dtype=None):
    """z = LN_C(dwconv7x7(x) + b) of an (N, H, W, C) contiguous tensor.

    Returns ``(z, mean, rstd)``: z (N, H, W, C) in ``out_dtype`` (default
    x.dtype), mean/rstd fp32 (N*H*W,) of the conv output rounded to
    ``out_dtype``.
    """
    _check_params(x, dw_weight, dw_bias, ln_weight, ln_bias)
    N, H, W, C = x.shape
    out_dtype = out_dtype or x.dtype
    check_tensor(x.new_empty(0, dtype=out_dtype), 'out_dtype')
    z = torch.empty((N, H, W, C), device=x.device, dtype=out_dtype)
    mean = torch.empty((N * H * W, ), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    launch_config('fwd', N, H, W, C, x.dtype).launch(
        x, _taps(dw_weight), _f32(dw_bias), _f32(ln_weight), _f32(ln_bias), z,
        mean, rstd, H, W, C, float(eps))
    return z, mean, rstd


def dwconv_ln_backward(dz, x, dw_weight, dw_bias, ln_weight, mean, rstd,
                       dres=None, dx_dtype=None):
    """Grads of :func:`dwconv_ln_forward`.

    ``dz`` must have the forward's ``out_dtype`` (it is the grad of z): the
    conv output is recomputed and rounded to it, exactly as the forward
    rounded it before taking the statistics; ``dy`` (grad of the conv output)
    is kept in that dtype.  ``dres`` (optional, (N, H, W, C)) is added to the
    input grad (the residual branch of a block).  Returns ``(dx, d_dw_weight
    (C,1,7,7), d_dw_bias, d_ln_weight, d_ln_bias)``; weight grads are fp32,
    reduced from per-program partial buffers with a torch sum (deterministic).
    """
    C = _check_params(x, dw_weight, dw_bias, ln_weight, None)
    check_tensor(dz, 'dz', shape=tuple(x.shape))
    if dres is not None:
        check_tensor(dres, 'dres', shape=tuple(x.shape))
    N, H, W, C = x.shape
    M = N * H * W
    check_tensor(mean, 'mean', shape=(M, ), dtypes=(torch.float32, ))
    check_tensor(rstd, 'rstd', shape=(M, ), dtypes=(torch.float32, ))
    taps = _taps(dw_weight)
    dev = x.device

    cfg = launch_config('ln_bwd', N, H, W, C, x.dtype)
    dy = torch.empty((M, C), device=dev, dtype=dz.dtype)
    part = torch.empty((cfg.grid[0], 3, C), device=dev, dtype=torch.float32)
    cfg.launch(x, taps, _f32(dw_bias), _f32(ln_weight), dz, mean, rstd, dy,
               part, H, W, C)
    # three separate reductions: the results must not alias each other
    d_lnw, d_lnb, d_b = (part[:, i].sum(0) for i in range(3))

    dx = torch.empty((N, H, W, C), device=dev, dtype=dx_dtype or x.dtype)
    cfg = launch_config('dgrad', N, H, W, C, dy.dtype)
    cfg = replace(cfg, meta=dict(cfg.meta, HAS_RES=dres is not None))
    cfg.launch(dy, taps, dres if dres is not None else dy, dx, H, W, C)

    cfg = launch_config('wgrad', N, H, W, C, x.dtype)
    wpart = torch.empty((cfg.grid[0], 49, C), device=dev, dtype=torch.float32)
    cfg.launch(x, dy, wpart, H, W, C)
    d_w = wpart.sum(0).t().reshape(C, 1, 7, 7)
    return dx, d_w, d_b, d_lnw, d_lnb


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
           'dwconv_ln', 'launch_config', 'LaunchConfig', 'KERNELS',
           'ArgumentError']
