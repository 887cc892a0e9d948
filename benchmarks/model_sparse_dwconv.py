"""Byte / issue model of the sparse depthwise-conv kernels (model, not a GPU measurement).

For FCMAE V2-B (224², mask 0.6, 64 images by default, :mod:`benchmarks.shapes`)
each stage's three passes — forward, input gradient (the forward kernel on
``grad_out`` with reversed taps) and weight gradient — are modelled for the
kernels of ``csrc/sparse_dwconv/*.cu`` at sm_90 (H200 SXM):

* ``hbm_floor_us``: the op's unavoidable HBM traffic (read the [M, C] input(s),
  write the output) at the HBM bandwidth — the floor the issue measures against;
* ``hbm_us``: the kernels' HBM bytes (plus the int32 [M, 49] neighbour table
  and, for the weight gradient, the fp32 chunk partials written and re-read);
* ``l2_us``: L2 -> SM bytes, counted on a real layout: the distinct feature
  rows each CTA's rows reach through the table (L1 assumed to hold one CTA's
  working set), plus its table rows;
* ``lsu_us``: L1 wavefronts (per tap and warp-row: one broadcast index load and
  ceil(32 V bytes / 128) feature wavefronts), one per SM clock;
* ``issue_us``: warp instructions (per tap and warp-row: 2 loads, 1 address
  op, V FFMA, V select/convert), four per SM clock; ``ffma_floor_us`` the FFMAs
  alone (49 C per row, fp32 accumulation: a floor no gather kernel beats; on
  the skip path the FFMAs it issues: only products with a visible pixel);
* ``model_us`` = the largest of these, ``x_hbm_floor`` = model / HBM floor.

The launch shapes mirror ``fwd_launch``/``wgrad_threads`` in the .cu (256
threads; fwd: channel groups of V along x, 8 rows a thread; wgrad: V = 2, one
CTA per 128-row chunk).  Hardware numbers are the nominal H200 SXM ones below.

The forward and the input gradient take the tile path where
:func:`convnextv2_fast.sparse.dwconv.conv_tile` picks it (2x2, 4x4, 8x8 tiles;
the gather at 1x1): :func:`model_tile_pass` models
``sparse_dwconv_tile_fwd_kernel`` — one CTA per (tile, 32 channels), threads
(32, T / R) with R = min(T, 4): the tile's (T + 6)^2 halo staged once in shared
memory as fp32 with 16-byte loads (zeros for absent pixels, no load), then each
thread computes R x T outputs of one channel with its 49 taps in registers:

* HBM: x read once (halo re-reads of neighbouring tiles hit L2), out written
  once, the int32 [K, (T + 6)^2] halo table, the taps;
* L2 -> SM: each CTA's visible halo pixels (counted on the real layout), its
  halo-table row and its taps, plus the output;
* wavefronts: staging (per warp-iteration a table load, a 512 B load per
  visible pixel group, the fp32 shared stores), per warp (R + 6)(T + 6) shared
  loads of 128 B, 49 tap loads, per output a table load and a store;
* issue: per warp 49 R T FFMA + (R + 6)(T + 6) shared loads + ``a + b R T``
  other instructions (tap loads and converts, addresses, the output's table
  load, convert and store), ``a``, ``b`` fitted to the SASS of the sm_90 build
  (``cuobjdump -sass``; the compute part is fully unrolled, so static = dynamic
  counts): 16-bit a = 380, b = 10.5; fp32 a = 404, b = 6.5 (the fits reproduce
  the T = 2, 4, 8 kernels within 1%); staging ~18 (16-bit, 8 channels a lane)
  / ~9 (fp32, 4) instructions per warp-iteration;
* the same ``x_hbm_floor`` = model / HBM floor.

The weight gradient takes the tile path with the forward:
:func:`model_tile_wgrad_pass` models ``sparse_dwconv_tile_wgrad_kernel`` — one
CTA per (chunk of 256 / T^2 tiles, 32 channels), each round staging 1/2/4
tiles' halos (T = 8/4/2) as the forward does while each warp loads its R x T dy
values, then 49 R T FFMAs into 50 fp32 registers; per CTA the warps' partials
are summed in shared memory and one fp32 [50, 32] partial is written:

* HBM: dy and x read once (the floor: 2 M C e, as the gather wgrad's), the halo
  table, the fp32 [chunks, 50, C] partials written and re-read by the reduce;
* L2 -> SM: the visible halo pixels of every CTA, dy once, the halo-table row
  per CTA and tile, the partials;
* wavefronts: staging as the forward, per warp-item (R + 6)(T + 6) shared loads
  and per pixel a table and a dy load, per CTA the slot reduction;
* issue: per warp-item 49 R T FFMA + (R + 6)(T + 6) shared loads + ``a + b R T``
  (fitted to the sm_90 SASS by source line, see ``TILE_WGRAD_OTHER``), staging
  as the forward, per warp and CTA the epilogue (``TILE_WGRAD_EPILOGUE``).

The skip path (stages 2-4 on the GPU, :func:`convnextv2_fast.sparse.dwconv.
conv_skip`): :func:`model_skip_pass` models ``sparse_dwconv_skip_fwd_kernel`` /
``sparse_dwconv_skip_wgrad_kernel`` from the real halo table -- per tile the
visible source tiles and pixels (:func:`skip_counts`), instructions from the
SASS-read constants ``SKIP_CONST`` (checked against the static SASS of every
instantiation), HBM as the tile path (plus the fp32 partials of the weight
gradient), L2 the distinct visible rows per CTA, wavefronts per load, shuffle
and store.

``python benchmarks/model_sparse_dwconv.py`` prints the rows of the paths the
code takes and, per stage, every path (gather, tile 2/4/8) of the forward and
the weight gradient in bf16 and fp32: why ``conv_tile`` picks what it picks on
the GPU.
"""
import os
import os.path as osp
import sys
from typing import Dict, List

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import shapes  # noqa: E402
from convnextv2_fast.models.fcmae import random_patch_mask  # noqa: E402
from convnextv2_fast.sparse.dwconv import (MMA_DTYPES, SKIP_TILES, TILES, conv_skip,  # noqa: E402
                                          conv_tile, mma_applies)
from convnextv2_fast.sparse.layout import build_layouts  # noqa: E402

H200 = dict(hbm_Bps=4.8e12, l2_Bps=8.0e12, sms=132, clk_hz=1.98e9, issue_per_clk=4,
            wavefront_B=128)
COLUMNS = ['stage', 'pass', 'path', 'dtype', 'M', 'C', 'V', 'rows_per_cta', 'hbm_floor_us',
           'hbm_us', 'l2_us', 'lsu_us', 'issue_us', 'ffma_floor_us', 'tensor_us', 'model_us',
           'x_hbm_floor']
TAPS, THREADS, FWD_ROWS_PER_THREAD, WGRAD_CHUNK, WGRAD_VEC = 49, 256, 8, 128, 2
TILE_CH = 32  # channels per CTA of the tile path (kTileCh in the .cu)


def fwd_vec(dtype: torch.dtype, C: int) -> int:
    vmax = 4 if dtype == torch.float16 else 2
    v = vmax
    while v > 1 and C % v:
        v //= 2
    return v


def fwd_rows_per_cta(C: int, V: int) -> int:
    bx = min(THREADS, (C // V + 31) // 32 * 32)
    return THREADS // bx * FWD_ROWS_PER_THREAD


def distinct_rows_per_cta(table: torch.Tensor, rows_per_cta: int) -> float:
    """Mean number of distinct feature rows a CTA of ``rows_per_cta`` rows reads."""
    m = table.shape[0]
    cta = torch.arange(m).div(rows_per_cta, rounding_mode='floor')[:, None].expand(-1, TAPS)
    ok = table >= 0
    key = cta[ok] * (m + 1) + table[ok].long()
    return torch.unique(key).numel() / ((m + rows_per_cta - 1) // rows_per_cta)


def model_pass(kind: str, M: int, C: int, dtype: torch.dtype, table: torch.Tensor,
               hw=H200) -> dict:
    e = torch.empty((), dtype=dtype).element_size()
    V = WGRAD_VEC if kind == 'wgrad' else fwd_vec(dtype, C)
    while C % V:
        V //= 2
    rows_per_cta = WGRAD_CHUNK if kind == 'wgrad' else fwd_rows_per_cta(C, V)
    ctas = (M + rows_per_cta - 1) // rows_per_cta
    io = 2 * M * C * e  # fwd/dgrad: read x, write y; wgrad: read dy and x
    table_b = M * TAPS * 4
    hbm = io + table_b + TAPS * C * e
    if kind == 'wgrad':
        hbm += 2 * ctas * (TAPS + 1) * C * 4  # fp32 partials, written then reduced
    l2 = (distinct_rows_per_cta(table, rows_per_cta) * ctas * C * e + table_b
          + M * C * e * (2 if kind == 'wgrad' else 1))
    warps_per_row = -(-C // (32 * V))
    feat_wf = -(-32 * V * e // hw['wavefront_B'])
    warp_rows = M * warps_per_row
    wavefronts = warp_rows * (TAPS * (1 + feat_wf) + feat_wf)
    instr = warp_rows * (TAPS * (3 + 2 * V) + 4)
    ffma = M * C * TAPS / 32
    t = _times(io, hbm, l2, wavefronts, instr, ffma, hw)
    return dict(pass_=kind, path='gather', M=M, C=C, V=V, rows_per_cta=rows_per_cta, **t)


def _times(hbm_floor_B, hbm_B, l2_B, wavefronts, instr, ffma, hw) -> dict:
    clk = hw['sms'] * hw['clk_hz']
    t = dict(hbm_floor_us=hbm_floor_B / hw['hbm_Bps'] * 1e6, hbm_us=hbm_B / hw['hbm_Bps'] * 1e6,
             l2_us=l2_B / hw['l2_Bps'] * 1e6, lsu_us=wavefronts / clk * 1e6,
             issue_us=instr / (clk * hw['issue_per_clk']) * 1e6,
             ffma_floor_us=ffma / (clk * hw['issue_per_clk']) * 1e6)
    t['model_us'] = max(t['hbm_us'], t['l2_us'], t['lsu_us'], t['issue_us'])
    t['x_hbm_floor'] = t['model_us'] / t['hbm_floor_us']
    return t


# Non-FFMA, non-shared-load instructions per warp of the tile kernel: a + b * outputs
# (fitted to the sm_90 SASS, see the module docstring) and per staging warp-iteration.
TILE_OTHER = {2: (380, 10.5, 18), 4: (404, 6.5, 9)}  # element size -> (a, b, staging)


def model_tile_pass(M: int, C: int, dtype: torch.dtype, halo: torch.Tensor, tile: int,
                    hw=H200) -> dict:
    """Forward / input gradient on the tile path (``sparse_dwconv_tile_fwd_kernel``)
    for the int32 [K, (tile + 6)^2] halo table ``halo`` of a real layout."""
    e = torch.empty((), dtype=dtype).element_size()
    a, b, stage_instr = TILE_OTHER[min(e, 4)]
    R = min(tile, 4)
    VS = 16 // e if C % (16 // e) == 0 else 1       # staging channels a lane
    side, hp = tile + 6, (tile + 6)**2
    K = halo.shape[0]
    chunks = -(-C // TILE_CH)
    ctas = K * chunks
    warps = ctas * (tile // R)                       # compute warps (32 channels each)
    vis_halo = int((halo >= 0).sum())                # staged pixels with a load
    io = 2 * M * C * e
    hbm = io + K * hp * 4 + TAPS * C * e
    l2 = vis_halo * C * e + ctas * (hp * 4 + TAPS * TILE_CH * e) + M * C * e
    stage_iters = -(-hp * (TILE_CH // VS) // 32)     # staging warp-iterations per CTA
    # per staging warp-iteration: a table load + VS wavefronts of fp32 shared stores
    # (32 lanes x VS x 4 B); per visible pixel: its 32 channels' global load
    wf_stage = ctas * stage_iters * (1 + VS) \
        + vis_halo * chunks * -(-TILE_CH * e // hw['wavefront_B'])
    outs = R * tile
    wf_compute = warps * ((R + 6) * side + TAPS + 2 * outs)
    instr = ctas * stage_iters * stage_instr + warps * (TAPS * outs + (R + 6) * side
                                                         + a + b * outs)
    ffma = M * C * TAPS / 32
    t = _times(io, hbm, l2, wf_stage + wf_compute, instr, ffma, hw)
    return dict(pass_='fwd', path=f'tile{tile}', M=M, C=C, V=1, rows_per_cta=tile * tile,
                **t)


# Tile weight gradient (sparse_dwconv_tile_wgrad_kernel; TileGeom in sparse_dwconv_math.h):
# pixels per chunk, tiles staged at a time per tile size, and the instruction
# fit: per warp-item (one slot's R x T pixels) a + b * outputs instructions besides
# the 49 FFMA per output and the (R + 6)(T + 6) shared loads (dy and table loads,
# converts, bias FADDs, addresses, round loop), per staging warp-iteration as the
# forward, per warp and CTA the slot reduction (50 shared stores, 50 / W x W
# shared loads + adds, the partial stores) -- from the sm_90 SASS by source line
# (-lineinfo: wgrad_tile_rows / load_tile_dy / the kernel's round loop vs the
# staging loop vs the epilogue): 16-bit (VS = 8) a = 275, b = 11 (T = 8, 4, 2:
# 637, 447, 328 measured vs 627, 451, 319); fp32 (VS = 4) a = 155, b = 11 (506,
# 335, 200 vs 507, 331, 199); epilogue 260 (W = 2) / 375 (W = 4) per warp.
WGRAD_TILE_ROWS = 256
WGRAD_SLOTS = {8: 1, 4: 2, 2: 4}
TILE_WGRAD_OTHER = {2: (275, 11, 18), 4: (155, 11, 9)}  # element size -> (a, b, staging)
TILE_WGRAD_EPILOGUE = {2: 260, 4: 375}  # warps per CTA -> instructions per warp


def model_tile_wgrad_pass(M: int, C: int, dtype: torch.dtype, halo: torch.Tensor, tile: int,
                          hw=H200) -> dict:
    """Weight/bias gradient on the tile path (``sparse_dwconv_tile_wgrad_kernel``)
    for the int32 [K, (tile + 6)^2] halo table ``halo`` of a real layout: one CTA
    per (chunk of WGRAD_TILE_ROWS / tile^2 tiles, 32 channels), W warps = slots x
    tile / R, each round staging ``WGRAD_SLOTS`` tiles' halos in shared memory
    (as the forward) while each warp loads its R x tile dy values, then 49 R tile
    FFMAs into 50 fp32 registers; per CTA the slots' partials are summed through
    shared memory and written as one [50, 32] fp32 partial, the [chunks, 50, C]
    partials reduced by the gather's reduce kernel."""
    e = torch.empty((), dtype=dtype).element_size()
    a, b, stage_instr = TILE_WGRAD_OTHER[min(e, 4)]
    R = min(tile, 4)
    nb, slots = tile // R, WGRAD_SLOTS[tile]
    warps_per_cta = slots * nb
    per_chunk = WGRAD_TILE_ROWS // tile**2
    VS = 16 // e if C % (16 // e) == 0 else 1
    side, hp = tile + 6, (tile + 6)**2
    K = halo.shape[0]
    chunks = max(1, -(-K // per_chunk))
    groups = -(-C // TILE_CH)
    ctas = chunks * groups
    rounds = sum(-(-min(per_chunk, K - k * per_chunk) // slots) for k in range(chunks))
    vis_halo = int((halo >= 0).sum())
    io = 2 * M * C * e                               # read dy and x (the floor)
    part = chunks * (TAPS + 1) * C * 4               # fp32 partials
    hbm = io + K * hp * 4 + TAPS * C * 4 + 2 * part  # + table, output, partials w + r
    l2 = vis_halo * C * e + M * C * e + K * groups * hp * 4 + 2 * part
    stage_iters = -(-slots * hp * (TILE_CH // VS) // 32)  # staging warp-iterations a round
    items = K * nb * groups                          # warp-items (32 channels, R x T pixels)
    outs = R * tile
    wf = (rounds * groups * stage_iters * (1 + VS)
          + vis_halo * groups * -(-TILE_CH * e // hw['wavefront_B'])
          + items * ((R + 6) * side + 2 * outs)    # shared loads; dy + table loads
          + ctas * (warps_per_cta * 2 * (TAPS + 1) + TAPS + 1))  # slot reduction, stores
    instr = (rounds * groups * stage_iters * stage_instr
             + items * (TAPS * outs + (R + 6) * side + a + b * outs)
             + ctas * warps_per_cta * TILE_WGRAD_EPILOGUE[warps_per_cta])
    ffma = M * C * TAPS / 32
    t = _times(io, hbm, l2, wf, instr, ffma, hw)
    return dict(pass_='wgrad', path=f'tile{tile}', M=M, C=C, V=1,
                rows_per_cta=per_chunk * tile * tile, **t)


# Tensor-core 8x8 tile forward / input gradient (sparse_dwconv_mma_fwd_kernel,
# sparse_dwconv_mma.h): one work item = a pair of tiles x 32 channels, 8 warps.
# Warp instructions from the sm_90 SASS (bf16 and fp16 compile alike; sections
# between the kernel's barriers, checked by tests/test_model_sparse_dwconv.py):
# per item and warp 436 (468 static: staging, 4 slots on warps 0-3 and 3 on
# 4-7, ~70 each with the 8-byte halo-table load, two 16-byte loads, 8 PRMT, 8
# STS and 64-bit addressing; 28 LDSM.x4 + 28 HMMA + addressing 94; packing 19;
# output, 2 slots, 35), per CTA and warp once ~730 (569 static: the taps
# staging loop, ~9 tasks of ~20, and the B fragments, 28 x (4 LDS.U16 + 2 PRMT)).
# LSU wavefronts per item: staging 28 warp-iterations x (1 table load + 8 STS,
# conflict-free: one halo row, 8 column pairs x 4 channel groups skewed by 32
# B), LDSM.x4 4 each (32 channels x 7), result stores 8 per warp at 2-way
# conflicts, output 16 x (table load + 4 LDS + 4 for the 512-byte STG.128),
# plus one per visible halo pixel (64 bytes of 32 channels).
# Tensor pipe: one HMMA.16816 per 2 SM clocks (the dense mma.sync rate of
# A100 class parts; Hopper's mma.sync is not slower).
MMA_ITEM_INSTR, MMA_SETUP_INSTR = 436, 730  # per warp
MMA_WARPS, MMA_CH, MMA_HMMA_CLK = 8, 32, 2.0
MMA_ITEM_WF = 28 * (1 + 8) + MMA_CH * 7 * 4 + MMA_WARPS * 8 * 2 + 16 * 9
MMA_SETUP_WF = (1792 + 448 * 4) // 32 + 1792 // 32 + MMA_WARPS * 112


def cu_kernel_sass(kernel: str) -> Dict[str, list]:
    """SASS of every instantiation of ``__global__`` kernel ``kernel`` of the
    ``csrc/**/*.cu`` files, each compiled for sm_90 with the static suite's
    nvcc command (one cubin per file, cached by the static suite's source
    digest): {demangled name: [opcode with modifiers, in address order]}.  What
    the instruction constants above are read from
    (tests/test_model_sparse_dwconv.py)."""
    import re
    import subprocess

    from benchmarks import common, sm90
    digest = common.source_digest('static')
    funcs = {}
    for src in sm90._cu_sources():
        stem = osp.splitext(osp.basename(src))[0]
        out = osp.join(sm90.cache_dir(), 'sass', f'{digest}-{stem}.cubin')
        if not osp.exists(out):
            os.makedirs(osp.dirname(out), exist_ok=True)
            subprocess.run(sm90._nvcc_cmd(src, out), check=True, capture_output=True,
                           text=True)
        cur = None
        for line in sm90._run_tool('nvdisasm', '-c', out).splitlines():
            m = re.match(r'\s*\.text\.(\S+):\s*$', line)
            if m:
                cur = funcs.setdefault(m.group(1), [])
                continue
            m = re.match(r'\s*/\*[0-9a-f]{4,}\*/\s+(.*?);', line)
            if m and cur is not None:
                body = re.sub(r'^@!?U?P\w+\s+', '', m.group(1).strip())
                cur.append(body.split()[0] if body else '')
    names = sm90._demangle(list(funcs))
    return {names[k]: v for k, v in funcs.items() if f'{kernel}<' in names[k]}


def mma_items(K: int, C: int, hw=H200):
    """(pairs, channel groups, pairs per CTA, CTAs) of the host's launch."""
    pairs, groups = -(-K // 2), -(-C // MMA_CH)
    per = min(max(-(-pairs * groups // (2 * hw['sms'])), 1), 64)
    return pairs, groups, per, -(-pairs // per) * groups


def model_mma_pass(M: int, C: int, dtype: torch.dtype, halo: torch.Tensor, hw=H200) -> dict:
    """Forward / input gradient on the tensor-core path for the int32 [K, 196]
    halo table ``halo`` (8x8 tiles) of a real layout."""
    e = torch.empty((), dtype=dtype).element_size()
    K = halo.shape[0]
    pairs, groups, per, ctas = mma_items(K, C, hw)
    items = pairs * groups
    vis_halo = int((halo >= 0).sum())
    io = 2 * M * C * e
    hbm = io + K * 196 * 4 + TAPS * C * e
    l2 = (vis_halo * C * e + K * groups * (196 + 64) * 4 + M * C * e
          + ctas * TAPS * MMA_CH * e)
    wf = items * MMA_ITEM_WF + vis_halo * groups + ctas * MMA_SETUP_WF
    instr = MMA_WARPS * (items * MMA_ITEM_INSTR + ctas * MMA_SETUP_INSTR)
    ffma = M * C * TAPS / 32
    t = _times(io, hbm, l2, wf, instr, ffma, hw)
    t['tensor_us'] = items * MMA_CH * 7 * MMA_HMMA_CLK / (hw['sms'] * hw['clk_hz']) * 1e6
    t['model_us'] = max(t['model_us'], t['tensor_us'])
    t['x_hbm_floor'] = t['model_us'] / t['hbm_floor_us']
    return dict(pass_='fwd', path='mma8', M=M, C=C, V=8, rows_per_cta=per * 128, **t)


# Skip path (sparse_dwconv_skip_fwd_kernel / sparse_dwconv_skip_wgrad_kernel;
# SkipGeom in sparse_dwconv_math.h): one warp per (tile, 32 V channels), 4 warps
# a CTA; the halo row is loaded coalesced (one word of 32 entries a lane) and
# balloted, each source tile tested against its bit masks, and only visible
# source pixels are loaded (a shuffle for the row, an IMAD.WIDE.U32 for the
# address, the load, the widening) and multiplied into the outputs they reach
# (taps compile-time constants, in registers).  Warp instructions, read from
# the sm_90 SASS of the build (bf16 V = 2, TS = 1 / 2; fp32 / fp16 alike up to
# the widening; skip_static_instr checks the same constants against the static
# count of every instantiation, tests/test_model_sparse_dwconv.py):
# * per tile: base + word x halo words (address, load, compare, ballot);
# * per source tile: absent (a masked compare writing a predicate, a branch)
#   when it has no visible pixel; with one, present (+ the "all" compare and
#   branch; TS = 1: none, the pixel is the tile) and, fully visible, tile
#   (UMOV + BRA.DIV before the first shuffle);
# * per visible pixel: px (SHFL, the 64-bit add of the premultiplied offset,
#   LDG) in a fully visible source tile, px_part in a partly visible one (+ its
#   bit test, branch and divergence check), plus cvt per 16-bit value widened,
#   plus V FFMA per output it reaches;
# * per own pixel: own_fwd (bit test, shuffle, pack, address, store) or
#   own_wgrad (bit test, shuffle, address, the dy load, its bias FADDs), plus
#   cvt per widened value;
# * per warp once: skip_setup (the forward's 49 taps loaded and widened: the
#   straight-line code before the tile loop; setup_word per halo word past
#   two, hoisted there for TS = 4) or the weight gradient's
#   epilogue, wg_epilogue per (tap, channel): the warps' fixed-order sum.
SKIP_WARPS = 4
SKIP_TPW = {1: 8, 2: 8, 4: 4}          # skip_tiles_per_warp in the .cu
SKIP_VEC = {1: 2, 2: 2, 4: 1}          # SkipGeom<TS>::kVec
SKIP_WGRAD_VEC = {1: 2, 2: 2, 4: 1}    # SkipGeom<TS>::kWgradVec
SKIP_WGRAD_TILES = {t: 256 // t**2 for t in SKIP_TILES}  # SkipGeom<TS>::kWgradTiles
SKIP_CONST = dict(base=6, word=10, absent=2, present=2, tile=2, px=4, px_part=8, cvt=1,
                  own_fwd=8, own_wgrad=7, wg_epilogue=3, setup_word=14)
SKIP_SETUP = {('float32', 1): 158, ('float32', 2): 158, ('bfloat16', 1): 208,
              ('bfloat16', 2): 310, ('float16', 1): 208, ('float16', 2): 260}


def skip_setup(dtype: str, V: int, words: int) -> float:
    """Warp instructions of the skip forward's prologue (SKIP_SETUP)."""
    return SKIP_SETUP[(dtype, V)] + SKIP_CONST['setup_word'] * max(0, words - 2)


def skip_geometry(tile: int):
    """(source tile of each halo pixel [HP], outputs each halo pixel reaches [HP],
    source tiles) for the skip path of ``tile`` (SkipGeom / skip_lo / skip_hi)."""
    side, reach = tile + 6, (tile + 2) // tile
    nsrc = 2 * reach + 1
    h = torch.arange(side)
    s1 = torch.div(h - 3, tile, rounding_mode='floor') + reach
    o = torch.arange(tile)
    r1 = ((h[:, None] - o[None, :] >= 0) & (h[:, None] - o[None, :] <= 6)).sum(1)
    src = (s1[:, None] * nsrc + s1[None, :]).reshape(-1)
    reach_px = (r1[:, None] * r1[None, :]).reshape(-1)
    return src, reach_px, nsrc * nsrc


def skip_counts(halo: torch.Tensor, tile: int) -> dict:
    """Totals over the K tiles of the halo table: source tiles fully / partly
    visible, visible pixels in each kind, products (pixel x output pairs),
    visible own pixels."""
    src, reach_px, nsrc = skip_geometry(tile)
    pres = halo >= 0
    size = torch.bincount(src, minlength=nsrc)
    cnt = torch.zeros(halo.shape[0], nsrc, dtype=torch.long).index_add_(1, src, pres.long())
    full, part = cnt == size, (cnt > 0) & (cnt < size)
    side = tile + 6
    own = pres.view(-1, side, side)[:, 3:3 + tile, 3:3 + tile]
    return dict(K=halo.shape[0], nsrc=nsrc, full_tiles=int(full.sum()),
                part_tiles=int(part.sum()), px_full=int((cnt * full).sum()),
                px_part=int((cnt * part).sum()), pairs=int((pres.long() * reach_px).sum()),
                own=int(own.sum()), words=-(-side * side // 32))


def skip_static_instr(tile: int, V: int, e: int, kind: str = 'fwd', c=None) -> dict:
    """The instantiation's static SASS as the constants above predict it: the
    tile loop (``loop``: instructions other than FFMA) holds each source
    tile's tests and full-tile code once and (TS > 1) its per-pixel code
    once, the own pixels once; ``ffma``: V per product in each copy; the
    weight gradient's ``epilogue``: the warps' sum unrolled over the
    SKIP_WARPS warps (each warp runs one copy: wg_epilogue per (tap, channel)
    in the dynamic count)."""
    c = c or SKIP_CONST
    side = tile + 6
    src, reach_px, nsrc = skip_geometry(tile)
    hp, words = side * side, -(-side * side // 32)
    cvt = c['cvt'] * V if e < 4 else 0
    body = nsrc * (c['absent'] + c['tile']) + hp * (c['px'] + cvt)
    copies = 1
    if tile > 1:
        body += nsrc * c['present'] + hp * (c['px_part'] + cvt)
        copies = 2
    own = (c['own_wgrad'] + V + cvt) if kind == 'wgrad' else c['own_fwd']
    return dict(loop=c['base'] + c['word'] * words + body + own * tile * tile,
                ffma=copies * V * int(reach_px.sum()),
                epilogue=SKIP_WARPS * c['wg_epilogue'] * (TAPS + 1) * V if kind == 'wgrad'
                else None)


def _skip_distinct_rows(halo: torch.Tensor, tiles_per_cta: int) -> int:
    """Sum over CTAs of the distinct visible rows their tiles read (L1 holds a
    CTA's rows: each is fetched from L2 once per CTA and channel block)."""
    K = halo.shape[0]
    cta = torch.arange(K).div(tiles_per_cta, rounding_mode='floor')[:, None].expand_as(halo)
    ok = halo >= 0
    return torch.unique(cta[ok] * (int(halo.max()) + 2) + halo[ok].long()).numel()


def skip_warp_instr(n: dict, V: int, e: int, kind: str = 'fwd', c=None) -> float:
    """Warp instructions of one channel block over every tile (counts ``n`` from
    :func:`skip_counts`), setup and epilogue excluded."""
    c = c or SKIP_CONST
    cvt = c['cvt'] * V if e < 4 else 0
    K, vis = n['K'], n['full_tiles'] + n['part_tiles']
    tests = K * n['nsrc'] * c['absent'] + (vis * c['present'] if n['nsrc'] != 49 else 0)
    own = c['own_wgrad'] + V + cvt if kind == 'wgrad' else c['own_fwd']
    return (K * (c['base'] + c['word'] * n['words']) + tests + n['full_tiles'] * c['tile']
            + (c['px'] + cvt) * n['px_full'] + (c['px_part'] + cvt) * n['px_part']
            + V * n['pairs'] + own * n['own'])


def model_skip_pass(kind: str, M: int, C: int, dtype: torch.dtype, halo: torch.Tensor,
                    tile: int, hw=H200) -> dict:
    """Forward / input gradient (``kind`` 'fwd') or weight gradient ('wgrad') on
    the skip path for the int32 [K, (tile + 6)^2] halo table of a real layout."""
    e = torch.empty((), dtype=dtype).element_size()
    n = skip_counts(halo, tile)
    K, hp = n['K'], (tile + 6)**2
    wgrad = kind == 'wgrad'
    V = (SKIP_WGRAD_VEC if wgrad else SKIP_VEC)[tile]
    blocks = -(-C // (32 * V))
    per_cta = SKIP_WGRAD_TILES[tile] if wgrad else SKIP_WARPS * SKIP_TPW[tile]
    ctas = max(1, -(-K // per_cta)) * blocks
    io = 2 * M * C * e          # fwd: read x, write y; wgrad: read dy and x
    hbm = io + K * hp * 4 + TAPS * C * (4 if wgrad else e)
    l2 = _skip_distinct_rows(halo, per_cta) * C * e + K * blocks * hp * 4 + M * C * e
    if wgrad:
        part = max(1, -(-K // per_cta)) * (TAPS + 1) * C * 4
        hbm += 2 * part
        l2 += 2 * part
    vec_wf = -(-32 * V * e // hw['wavefront_B'])
    px = n['px_full'] + n['px_part']
    # per channel block: halo words, one shuffle (MIO) per visible pixel and own
    # pixel, the feature loads and own-pixel stores (dy loads) of 32 V channels
    wf = blocks * (K * n['words'] + (px + n['own']) + (px + n['own']) * vec_wf)
    instr = blocks * skip_warp_instr(n, V, e, kind)
    if wgrad:  # the fixed-order sum: a shared load / store per (tap, channel) and warp
        wf += ctas * SKIP_WARPS * (TAPS + 1) * V * 2
        instr += ctas * SKIP_WARPS * SKIP_CONST['wg_epilogue'] * (TAPS + 1) * V
    else:
        instr += ctas * SKIP_WARPS * skip_setup(str(dtype).split('.')[-1], V, n['words'])
    ffma = n['pairs'] * blocks * V
    t = _times(io, hbm, l2, wf, instr, ffma, hw)
    return dict(pass_=kind, path=f'skip{tile}', M=M, C=C, V=V, rows_per_cta=per_cta * tile**2,
                **t)


def model_layout_pass(kind: str, lay, C: int, dtype: torch.dtype, tile: int, hw=H200,
                      table=None, mma=None) -> dict:
    """One pass (``'fwd'``, ``'dgrad'`` or ``'wgrad'``) of the conv on the path
    ``tile`` (0 = the gather) for the real layout ``lay`` (a ``StageLayout``);
    forward / input gradient on tensor cores where ``mma`` says so (None: where
    ``conv_mma`` takes it on CUDA: ``mma_applies``)."""
    if isinstance(tile, str) and tile.startswith('skip'):
        t = int(tile[4:])
        return model_skip_pass('wgrad' if kind == 'wgrad' else 'fwd', lay.num_rows, C, dtype,
                               lay.tile_halo_rows(t), t, hw)
    if kind == 'wgrad' and tile:
        return model_tile_wgrad_pass(lay.num_rows, C, dtype, lay.tile_halo_rows(tile), tile,
                                     hw)
    if mma is None:
        mma = mma_applies(tile, dtype, C)
    if mma:
        return model_mma_pass(lay.num_rows, C, dtype, lay.tile_halo_rows(8), hw)
    if tile:
        return model_tile_pass(lay.num_rows, C, dtype, lay.tile_halo_rows(tile), tile, hw)
    return model_pass('wgrad' if kind == 'wgrad' else 'fwd', lay.num_rows, C, dtype,
                      lay.neighbour_rows() if table is None else table, hw)


def gpu_path(lay):
    """The path the code takes on the GPU for layout ``lay``: the FFMA / tensor-core
    tile size (:func:`conv_tile`), else ``'skip<T>'`` (:func:`conv_skip`), else 0
    (the gather)."""
    tile = conv_tile(lay, device_type='cuda')
    sk = 0 if tile else conv_skip(lay, device_type='cuda')
    return f'skip{sk}' if sk else tile


def run(N: int = shapes.FCMAE_BATCH, size: int = shapes.FCMAE_SIZE,
        mask_ratio: float = shapes.FCMAE_MASK_RATIO, dtype=torch.bfloat16,
        stages=(0, 1, 2, 3), progress=None, path=None) -> List[dict]:
    """Rows of every stage and pass; ``path``: None = the path the code takes
    (:func:`conv_tile`, :func:`conv_mma`, :func:`conv_skip`), 0 = the gather,
    2/4/8 = that FFMA tile size, ``'mma8'`` = the tensor-core 8x8 tiles
    (fwd/dgrad; the weight gradient then takes tile 8), ``'skip1'`` /
    ``'skip2'`` / ``'skip4'`` = the skip path."""
    g = torch.Generator().manual_seed(0)
    grid = size // 32
    mask = random_patch_mask(N, grid, grid, mask_ratio, generator=g).reshape(N, grid, grid)
    layouts = build_layouts(mask.bool(), size, size, 32, 4)
    rows = []
    for i in stages:
        lay, C = layouts[i], shapes.V2B_CHANNELS[i]
        table = lay.neighbour_rows()
        tile = gpu_path(lay) if path is None else path
        mma = None if path is None else path == 'mma8'
        tile = 8 if tile == 'mma8' else tile
        for kind in ('fwd', 'dgrad', 'wgrad'):
            r = model_layout_pass(kind, lay, C, dtype, tile, table=table, mma=mma)
            r.pop('pass_')
            row = {'bench': 'sparse_dwconv_model', 'stage': i + 1, 'pass': kind, 'N': N,
                   'img': size, 'mask_ratio': mask_ratio, 'dtype': str(dtype).split('.')[-1],
                   'provider': 'fast', 'model': 'model, not a GPU measurement (H200 nominal)',
                   **r}
            rows.append(row)
            if progress:
                progress(row)
    return rows


def run_suite(smoke: bool, device: torch.device, providers, progress=None):
    """A model: the same rows on any machine (smoke: stage 1 at 8 images)."""
    if smoke:
        return run(N=8, stages=(0, ), progress=progress)
    return run(progress=progress)


def compare_paths(passes=('fwd', ), **kw) -> List[dict]:
    """The rows of ``passes`` on every path (gather, tile 2/4/8, and for fp16 /
    bf16 the tensor-core 8x8 tiles) at every stage."""
    paths = (0, ) + TILES + (('mma8', ) if kw.get('dtype', torch.bfloat16) in MMA_DTYPES
                             else ()) + tuple(f'skip{t}' for t in SKIP_TILES)
    return [r for p in paths for r in run(path=p, **kw) if r['pass'] in passes]


if __name__ == '__main__':
    from benchmarks import common
    print(common.markdown_table(run(), COLUMNS))
    for kind in ('fwd', 'wgrad'):
        for dt in (torch.bfloat16, torch.float32):
            print(f'\n{kind} {dt}, every path (model, not a GPU measurement):\n')
            print(common.markdown_table(sorted(compare_paths((kind, ), dtype=dt),
                                               key=lambda r: r['stage']), COLUMNS))
