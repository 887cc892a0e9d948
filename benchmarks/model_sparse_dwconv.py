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
"""
import os.path as osp
import sys
from typing import List

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import shapes  # noqa: E402
from convnextv2_fast.models.fcmae import random_patch_mask  # noqa: E402
from convnextv2_fast.sparse.layout import build_layouts  # noqa: E402

H200 = dict(hbm_Bps=4.8e12, l2_Bps=8.0e12, sms=132, clk_hz=1.98e9, issue_per_clk=4,
            wavefront_B=128)
COLUMNS = ['stage', 'pass', 'dtype', 'M', 'C', 'V', 'rows_per_cta', 'hbm_floor_us', 'hbm_us',
           'l2_us', 'lsu_us', 'issue_us', 'ffma_floor_us', 'model_us', 'x_hbm_floor']
TAPS, THREADS, FWD_ROWS_PER_THREAD, WGRAD_CHUNK, WGRAD_VEC = 49, 256, 8, 128, 2


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
    clk = hw['sms'] * hw['clk_hz']
    t = dict(hbm_floor_us=io / hw['hbm_Bps'] * 1e6, hbm_us=hbm / hw['hbm_Bps'] * 1e6,
             l2_us=l2 / hw['l2_Bps'] * 1e6, lsu_us=wavefronts / clk * 1e6,
             issue_us=instr / (clk * hw['issue_per_clk']) * 1e6,
             ffma_floor_us=ffma / (clk * hw['issue_per_clk']) * 1e6)
    model = max(t['hbm_us'], t['l2_us'], t['lsu_us'], t['issue_us'])
    return dict(pass_=kind, M=M, C=C, V=V, rows_per_cta=rows_per_cta, **t, model_us=model,
                x_hbm_floor=model / t['hbm_floor_us'])


def run(N: int = shapes.FCMAE_BATCH, size: int = shapes.FCMAE_SIZE,
        mask_ratio: float = shapes.FCMAE_MASK_RATIO, dtype=torch.bfloat16,
        stages=(0, 1, 2, 3), progress=None) -> List[dict]:
    g = torch.Generator().manual_seed(0)
    grid = size // 32
    mask = random_patch_mask(N, grid, grid, mask_ratio, generator=g).reshape(N, grid, grid)
    layouts = build_layouts(mask.bool(), size, size, 32, 4)
    rows = []
    for i in stages:
        lay, C = layouts[i], shapes.V2B_CHANNELS[i]
        table = lay.neighbour_rows()
        for kind in ('fwd', 'dgrad', 'wgrad'):
            r = model_pass('wgrad' if kind == 'wgrad' else 'fwd', lay.num_rows, C, dtype, table)
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


if __name__ == '__main__':
    from benchmarks import common
    print(common.markdown_table(run(), COLUMNS))
