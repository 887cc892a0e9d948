"""Byte / issue model of the sparse depthwise-conv kernels (model, not a GPU measurement).

For FCMAE V2-B (224², mask 0.6, 64 images by default, :mod:`benchmarks.shapes`)
each stage's three passes — forward, input gradient (the forward kernel on
``grad_out`` with reversed taps) and weight gradient — are modelled for the
kernels of ``csrc/sparse_dwconv/sparse_dwconv_cuda.cu`` at sm_90 (H200 SXM):

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
  alone (49 C per row, fp32 accumulation: a floor no gather kernel beats);
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
from convnextv2_fast.sparse.dwconv import MMA_DTYPES, TILES, conv_tile, mma_applies  # noqa: E402
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


def cu_kernel_sass(kernel: str, src: str = 'csrc/sparse_dwconv/sparse_dwconv_cuda.cu'
                   ) -> Dict[str, list]:
    """SASS of every instantiation of ``__global__`` kernel ``kernel`` of the
    .cu ``src``, compiled for sm_90 with the static suite's nvcc command (a
    cubin cached by the static suite's source digest): {demangled name: [opcode
    with modifiers, in address order]}.  What the instruction constants above
    are read from (tests/test_model_sparse_dwconv.py)."""
    import re
    import subprocess

    from benchmarks import common, sm90
    out = osp.join(sm90.cache_dir(), 'sass', common.source_digest('static') + '.cubin')
    if not osp.exists(out):
        os.makedirs(osp.dirname(out), exist_ok=True)
        subprocess.run(sm90._nvcc_cmd(osp.join(ROOT, src), out), check=True,
                       capture_output=True, text=True)
    funcs, cur = {}, None
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


def model_layout_pass(kind: str, lay, C: int, dtype: torch.dtype, tile: int, hw=H200,
                      table=None, mma=None) -> dict:
    """One pass (``'fwd'``, ``'dgrad'`` or ``'wgrad'``) of the conv on the path
    ``tile`` (0 = the gather) for the real layout ``lay`` (a ``StageLayout``);
    forward / input gradient on tensor cores where ``mma`` says so (None: where
    ``conv_mma`` takes it on CUDA: ``mma_applies``)."""
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


def run(N: int = shapes.FCMAE_BATCH, size: int = shapes.FCMAE_SIZE,
        mask_ratio: float = shapes.FCMAE_MASK_RATIO, dtype=torch.bfloat16,
        stages=(0, 1, 2, 3), progress=None, path=None) -> List[dict]:
    """Rows of every stage and pass; ``path``: None = the path the code takes
    (:func:`conv_tile`, :func:`conv_mma`), 0 = the gather, 2/4/8 = that FFMA
    tile size, ``'mma8'`` = the tensor-core 8x8 tiles (fwd/dgrad; the weight
    gradient then takes tile 8)."""
    g = torch.Generator().manual_seed(0)
    grid = size // 32
    mask = random_patch_mask(N, grid, grid, mask_ratio, generator=g).reshape(N, grid, grid)
    layouts = build_layouts(mask.bool(), size, size, 32, 4)
    rows = []
    for i in stages:
        lay, C = layouts[i], shapes.V2B_CHANNELS[i]
        table = lay.neighbour_rows()
        tile = conv_tile(lay, device_type='cuda') if path is None else path
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
                             else ())
    return [r for p in paths for r in run(path=p, **kw) if r['pass'] in passes]


if __name__ == '__main__':
    from benchmarks import common
    print(common.markdown_table(run(), COLUMNS))
    for kind in ('fwd', 'wgrad'):
        for dt in (torch.bfloat16, torch.float32):
            print(f'\n{kind} {dt}, every path (model, not a GPU measurement):\n')
            print(common.markdown_table(sorted(compare_paths((kind, ), dtype=dt),
                                               key=lambda r: r['stage']), COLUMNS))
