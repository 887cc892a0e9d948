"""Tile-structured sparsity of FCMAE: visible sites per stage, gathers, densify.

A random patch mask (``1`` = removed, official FCMAE convention) on the
``patch_size`` grid makes the visible sites of every stage whole aligned tiles
(8x8 at 1/4, 4x4 at 1/8, 2x2 at 1/16, 1x1 at 1/32 for patch 32).  Visible
features are kept compact as rows ``[M, C]`` ordered by flat position
``n * H * W + h * W + w``; :class:`StageLayout` holds

* ``site`` (int32 [M]): flat position of each row,
* ``nbr`` (int32 [N, H, W]): row of each visible position, ``-1`` elsewhere,
* :meth:`StageLayout.neighbour_rows` (int32 [M, 49], cached): the 49 neighbour
  rows of each row (``-1`` = absent), what the compiled 7x7 submanifold conv
  reads — built once per stage, shared by every block and pass,
* :meth:`StageLayout.tile_halo_rows` (int32 [K, (T + 6)^2], cached per T): per
  aligned T x T tile holding a visible site, the rows of its 7x7-conv halo
  region (``-1`` = absent), what the tile path of the conv reads instead of the
  [M, 49] table; ``tile`` is the stage's FCMAE tile size (1 for a general layout),
* ``sample`` (int64 [M]) and ``counts`` (int64 [N]): row -> sample, rows per sample.

Because tiles align across stages, the 2x2/s2 downsample of a visible coarse
site reads a fully visible 2x2 block: :meth:`StageLayout.down_index` gives the
four fine rows of each coarse row, and the downsample is one GEMM on gathered
rows.  All of this is plain torch indexing (no custom kernel needed).
"""
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from .._errors import ArgumentError

STEM_STRIDE = 4


@dataclass
class StageLayout:
    site: torch.Tensor      # int32 [M]
    nbr: torch.Tensor       # int32 [N, H, W]
    sample: torch.Tensor    # int64 [M]
    counts: torch.Tensor    # int64 [N]
    equal_counts: int       # rows per sample when every sample has the same count, else 0
    tile: int = 1           # visible sites are whole aligned tile x tile blocks
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def shape(self):
        return tuple(self.nbr.shape)

    @property
    def num_rows(self) -> int:
        return self.site.numel()

    def site_long(self) -> torch.Tensor:
        if 'site_long' not in self._cache:
            self._cache['site_long'] = self.site.long()
        return self._cache['site_long']

    def neighbour_rows(self) -> torch.Tensor:
        """int32 [M, 49]: row of tap ``t = dy * 7 + dx`` (offset ``(dy - 3, dx - 3)``)
        of each row, or ``-1`` where the tap is outside the map or invisible.

        Built once per stage and cached: the forward, the input gradient (taps
        flipped: the submanifold neighbourhood is symmetric) and the weight
        gradient of every block of the stage read this one table."""
        if 'rows' not in self._cache:
            n_, h_, w_ = self.nbr.shape
            s = self.site_long()
            n, h, w = s // (h_ * w_), (s // w_) % h_, s % w_
            d = torch.arange(-3, 4, device=s.device)
            y = h[:, None, None] + d[None, :, None]          # [M, 7, 1]
            x = w[:, None, None] + d[None, None, :]          # [M, 1, 7]
            inside = (y >= 0) & (y < h_) & (x >= 0) & (x < w_)
            flat = (n[:, None, None] * h_ + y.clamp(0, h_ - 1)) * w_ + x.clamp(0, w_ - 1)
            rows = self.nbr.reshape(-1)[flat]
            rows = torch.where(inside, rows, torch.full_like(rows, -1))
            self._cache['rows'] = rows.reshape(-1, 49).contiguous()
        return self._cache['rows']

    def tile_halo_rows(self, tile: int) -> torch.Tensor:
        """int32 [K, (tile + 6)^2]: for each aligned ``tile`` x ``tile`` block of the
        map that holds a visible site (ordered by sample, block row, block
        column), the row of every pixel of its (tile + 6)^2 halo region starting
        at (ty * tile - 3, tx * tile - 3), row-major, or ``-1`` (outside the map
        or invisible).  The block's own pixels are entries (py + 3) * (tile + 6)
        + px + 3, so every visible row is an own pixel of exactly one block.

        Built once per stage and tile size and cached; the tile path of the
        forward and the input gradient reads it (sparse_dwconv_math.h)."""
        key = ('halo', tile)
        if key not in self._cache:
            n_, h_, w_ = self.nbr.shape
            s = self.site_long()
            n, h, w = s // (h_ * w_), (s // w_) % h_, s % w_
            th, tw = -(-h_ // tile), -(-w_ // tile)
            blocks = torch.unique((n * th + h // tile) * tw + w // tile)  # sorted
            bn, by, bx = blocks // (th * tw), (blocks // tw) % th, blocks % tw
            d = torch.arange(tile + 6, device=s.device) - 3
            y = (by * tile)[:, None, None] + d[None, :, None]
            x = (bx * tile)[:, None, None] + d[None, None, :]
            inside = (y >= 0) & (y < h_) & (x >= 0) & (x < w_)
            flat = (bn[:, None, None] * h_ + y.clamp(0, h_ - 1)) * w_ + x.clamp(0, w_ - 1)
            rows = self.nbr.reshape(-1)[flat]
            rows = torch.where(inside, rows, torch.full_like(rows, -1))
            self._cache[key] = rows.reshape(blocks.numel(), -1).contiguous()
        return self._cache[key]

    def neighbour_table(self) -> torch.Tensor:
        """int64 [M, 49]: :meth:`neighbour_rows` with ``-1`` replaced by ``M`` (a
        zero padding row).  Used by the pure-PyTorch path only."""
        if 'table' not in self._cache:
            rows = self.neighbour_rows().long()
            self._cache['table'] = torch.where(rows >= 0, rows,
                                               torch.full_like(rows, self.num_rows))
        return self._cache['table']

    def down_index(self, fine: 'StageLayout') -> torch.Tensor:
        """int64 [M, 4]: the fine rows (kh, kw) = (0,0),(0,1),(1,0),(1,1) of the
        2x2 block under each coarse row of this layout."""
        key = ('down', id(fine))
        if key not in self._cache:
            n_, h_, w_ = self.nbr.shape
            s = self.site_long()
            n, h, w = s // (h_ * w_), (s // w_) % h_, s % w_
            fh, fw = fine.nbr.shape[1:]
            kh = torch.tensor([0, 0, 1, 1], device=s.device)
            kw = torch.tensor([0, 1, 0, 1], device=s.device)
            flat = (n[:, None] * fh + 2 * h[:, None] + kh) * fw + 2 * w[:, None] + kw
            rows = fine.nbr.reshape(-1).long()[flat]
            self._cache[key] = rows
        return self._cache[key]


def check_mask(mask: torch.Tensor, n: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Validate an FCMAE mask and return it as bool (N, grid_h, grid_w), True = removed."""
    if not torch.is_tensor(mask):
        raise ArgumentError(f'mask must be a tensor, got {type(mask).__name__}.')
    if mask.dtype not in (torch.bool, torch.float16, torch.bfloat16, torch.float32,
                          torch.float64):
        raise ArgumentError(
            'mask must be bool or floating point (1 = removed patch, 0 = visible), '
            f'got dtype {mask.dtype}.')
    if tuple(mask.shape) == (n, grid_h * grid_w):
        mask = mask.reshape(n, grid_h, grid_w)
    if tuple(mask.shape) != (n, grid_h, grid_w):
        raise ArgumentError(
            f'mask must have shape (N, L) = ({n}, {grid_h * grid_w}) or (N, h, w) = '
            f'({n}, {grid_h}, {grid_w}) for this input, got {tuple(mask.shape)}.')
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ArgumentError('mask values must be 0 (visible) or 1 (removed).')
        mask = mask != 0
    visible = (~mask).flatten(1).sum(1)
    if bool((visible == 0).any()):
        bad = (visible == 0).nonzero().flatten().tolist()
        raise ArgumentError(
            f'mask removes every patch of sample(s) {bad}; at least one patch per '
            'sample must stay visible.')
    return mask


def check_input_size(h: int, w: int, patch_size: int) -> None:
    if h % patch_size or w % patch_size:
        raise ArgumentError(
            f'input size {h}x{w} must be a multiple of the mask patch size '
            f'{patch_size} in both dims (visible regions must be whole tiles at '
            'every stage).')


def layout_from_visibility(vis: torch.Tensor, tile: int = 1) -> StageLayout:
    """StageLayout of an arbitrary bool visibility map (N, H, W) (True = visible).

    The ops do not need tiles; FCMAE's layouts come from :func:`build_layouts`
    (``tile``: the size of the aligned blocks the visible sites form, recorded
    for the conv's tile path; 1 = no structure assumed)."""
    if vis.dtype != torch.bool or vis.dim() != 3:
        raise ArgumentError(
            f'vis must be a bool (N, H, W) tensor, got {vis.dtype} {tuple(vis.shape)}.')
    n, hh, ww = vis.shape
    site = vis.reshape(-1).nonzero().flatten()
    nbr = torch.full((n * hh * ww, ), -1, dtype=torch.int32, device=vis.device)
    nbr[site] = torch.arange(site.numel(), dtype=torch.int32, device=vis.device)
    sample = site // (hh * ww)
    counts = torch.bincount(sample, minlength=n)
    cmin, cmax = int(counts.min()), int(counts.max())
    return StageLayout(site=site.to(torch.int32), nbr=nbr.view(n, hh, ww),
                       sample=sample, counts=counts,
                       equal_counts=cmin if cmin == cmax and cmin > 0 else 0,
                       tile=tile, _cache={'site_long': site})


def build_layouts(mask: torch.Tensor, img_h: int, img_w: int, patch_size: int,
                  num_stages: int) -> List[StageLayout]:
    """StageLayouts of every stage for a (validated) bool mask (N, h, w)."""
    layouts = []
    visible = ~mask
    for i in range(num_stages):
        stride = STEM_STRIDE * 2**i
        tile = patch_size // stride
        vis = visible.repeat_interleave(tile, 1).repeat_interleave(tile, 2)
        assert vis.shape[1:] == (img_h // stride, img_w // stride)
        layouts.append(layout_from_visibility(vis, tile=tile))
    return layouts


def gather_rows(dense_nhwc: torch.Tensor, layout: StageLayout) -> torch.Tensor:
    """(N, H, W, C) -> [M, C] rows at the visible sites."""
    c = dense_nhwc.shape[-1]
    return dense_nhwc.reshape(-1, c).index_select(0, layout.site_long())


def densify(rows: torch.Tensor, layout: StageLayout,
            fill: Optional[float] = 0.) -> torch.Tensor:
    """[M, C] rows -> dense (N, C, H, W) map, ``fill`` (0) at masked sites."""
    n, h, w = layout.shape
    c = rows.shape[1]
    out = rows.new_full((n * h * w, c), fill)
    out = out.index_copy(0, layout.site_long(), rows)
    return out.view(n, h, w, c).permute(0, 3, 1, 2)


def stage_visible_mask(layout: StageLayout, dtype=torch.float32) -> torch.Tensor:
    """(N, 1, H, W) 1 at visible sites, 0 elsewhere."""
    return (layout.nbr >= 0).unsqueeze(1).to(dtype)
