"""Submanifold depthwise 7x7 convolution on compact visible rows (FCMAE).

One op, top to bottom:

1. kernels: ``csrc/sparse_dwconv/sparse_dwconv_{cpu.cpp,cuda.cu}`` (twins,
   ``torch.ops.convnextv2_fast.sparse_dwconv_fwd(feats, taps [49, C], bias,
   nbr_rows)`` / ``..._bwd_weight(grad_out, feats, nbr_rows) -> (grad_taps [49, C],
   grad_bias)``) calling one arithmetic, ``sparse_dwconv_math.h``; ``nbr_rows`` is
   :meth:`StageLayout.neighbour_rows`, built once per stage.  The forward and
   the input gradient take the tile path, ``sparse_dwconv_tile_fwd(feats, taps,
   bias, halo_rows, tile)``, where :func:`conv_tile` picks a tile size: each
   tile's halo is staged once (shared memory on the GPU, zeros for absent
   pixels) and the dense 7x7 stencil runs on it — the same result as the
   gather, bit for bit, without the [M, 49] table reads; the weight gradient
   there is ``sparse_dwconv_tile_wgrad(grad_out, feats, halo_rows, tile)``;
2. host functions :func:`sparse_dwconv_forward` / :func:`sparse_dwconv_backward`
   (validate, call the op, return tensors; testable without autograd).  The
   input gradient is the forward op with the taps reversed (the submanifold
   neighbourhood is symmetric); the weight/bias gradient is deterministic
   (per-chunk fp32 partials summed in fixed order, no atomics);
3. :class:`SparseDWConv7x7Function`, a thin autograd.Function;
4. :func:`sparse_dwconv7x7`, the functional entry point, which falls back to
   :func:`sparse_dwconv7x7_torch` (pure PyTorch, differentiable by autograd)
   when the extension is missing;
5. :func:`sparse_dwconv7x7_dense_masked_ref`, the reference: ``mask -> dense
   depthwise conv -> mask`` (what the official JAX FCMAE computes).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .._errors import ArgumentError
from ._ops import sparse_ops
from .layout import StageLayout, densify, stage_visible_mask

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check(feats, weight2d, bias, layout):
    if not torch.is_tensor(feats) or feats.dim() != 2:
        raise ArgumentError(
            'feats must be a 2-D [M, C] tensor of visible-site features, got '
            f'{tuple(feats.shape) if torch.is_tensor(feats) else type(feats)}.')
    if feats.dtype not in _DTYPES:
        raise ArgumentError(f'feats must be fp32/fp16/bf16/fp64, got {feats.dtype}.')
    m, c = feats.shape
    if m != layout.num_rows:
        raise ArgumentError(
            f'feats has {m} rows but the layout has {layout.num_rows} visible sites.')
    if tuple(weight2d.shape) != (c, 49):
        raise ArgumentError(
            f'weight must have shape (C, 1, 7, 7) or (C, 49) with C={c}, got '
            f'{tuple(weight2d.shape)}.')
    if bias is not None and tuple(bias.shape) != (c, ):
        raise ArgumentError(f'bias must have shape ({c},), got {tuple(bias.shape)}.')


def _weight2d(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() == 4:
        if tuple(weight.shape[1:]) != (1, 7, 7):
            raise ArgumentError(
                'weight must be a depthwise 7x7 kernel of shape (C, 1, 7, 7), got '
                f'{tuple(weight.shape)}.')
        return weight.reshape(weight.shape[0], 49)
    return weight


# -- host functions (compiled ops) -------------------------------------------
def _taps(weight2d: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """(C, 49) -> the ops' tap-major [49, C] (reversed for the input gradient);
    one tiny transpose per call."""
    w = weight2d.flip(1) if flip else weight2d
    return w.t().contiguous()


TILES = (2, 4, 8)  # tile sizes the compiled tile path is instantiated for
# The layout tiles whose stages take the tile path by default, per device type.
# GPU, from benchmarks/model_sparse_dwconv.py (model, not a GPU measurement;
# V2-B 224^2, mask 0.6, bf16, x HBM floor gather -> tile): 8x8 7.1 -> 3.0,
# 4x4 7.1 -> 3.7, 2x2 7.1 -> 7.6 (each 2x2 tile stages 64 halo pixels for 4
# outputs: L2 and shared-memory traffic eat the gain), 1x1 7.1 -> 19 (tile2);
# the weight gradient follows the forward's path: 8x8 7.1 -> 2.9, 4x4 7.1 -> 3.6
# (2x2 7.1 -> 6.7 at stage 3, where the forward keeps the gather).
# CPU (measured, C++ twin, fp32, 2 threads, V2-B widths): 8x8 is faster than
# the gather (8.4 vs 9.2 ms at stage 1, 8 images), 4x4 and 2x2 slower (5.6 vs
# 4.8 ms, 5.1 vs 2.4 ms): the twin's un-unrolled stencil pays for the staging.
TILE_PATH = {'cuda': (8, ), 'cpu': (8, )}

SKIP_TILES = (1, 2, 4)  # tile sizes of the skip ops (sparse_dwconv_skip_fwd / _wgrad)
# Per device type: layout tile -> skip tile of the stages that take the skip
# path (where conv_tile takes no FFMA tile path).  GPU, from
# benchmarks/model_sparse_dwconv.py (model, not a GPU measurement; V2-B 224^2,
# mask 0.6, 64 images, bf16, H200; x HBM floor, forward / weight gradient):
# stage 2 (4x4) tile4 3.7 / 3.6 -> skip4 2.0 / 2.0; stage 3 (2x2) gather 7.1 /
# 7.1 -> skip2 1.9 / 1.9; stage 4 (1x1) gather 7.1 / 7.1 -> skip4 3.5 / 3.4
# (4x4 tiles over the 1x1 layout: the per-source-tile tests amortised over 16
# outputs; skip1 5.0 / 4.5).  CPU (measured, C++ twin, fp32, 2 threads, 8
# images at V2-B widths, ms gather -> skip, fwd / wgrad): stage 2 5.2 -> 6.6 /
# 7.7 -> 7.5, stage 3 2.4 -> 3.1 / 3.9 -> 2.9, stage 4 1.1 -> 8.5 / 1.8 -> 7.8:
# the host compiler's code for the unrolled source tiles is slower than the
# gather, so the CPU keeps the gather.
SKIP_PATH = {'cuda': {4: 4, 2: 2, 1: 4}, 'cpu': {}}


def conv_tile(layout: StageLayout, tile: Optional[int] = None,
              device_type: Optional[str] = None) -> int:
    """Tile size of the forward / input-gradient path: ``tile`` when given
    (0 = the per-row gather through :meth:`StageLayout.neighbour_rows`, or 2, 4,
    8), else the layout's FCMAE tile when :data:`TILE_PATH` lists it for the
    device type (that of the layout; the numbers behind the choice are there),
    else 0.  Both paths give the same result bit for bit."""
    if tile is None:
        dev = device_type or layout.site.device.type
        return layout.tile if layout.tile in TILE_PATH.get(dev, TILE_PATH['cuda']) else 0
    if tile != 0 and tile not in TILES:
        raise ArgumentError(f'tile must be 0 (gather) or one of {TILES}, got {tile}.')
    return tile


def conv_skip(layout: StageLayout, skip=None, device_type: Optional[str] = None) -> int:
    """Tile size of the skip path (``sparse_dwconv_skip_fwd`` / ``_wgrad``; 0 = not
    taken) for calls where :func:`conv_tile` took no FFMA tile: ``skip`` when
    given (``False`` / 0: never; ``True``: the layout's tile; or 1, 2, 4), else
    the skip tile :data:`SKIP_PATH` maps the layout's FCMAE tile to for the
    device type (none: 0; CUDA tensors on a GPU other than compute capability
    9.x: 0, the kernels are built for sm_90 only).  The
    skip path sums each output in another fp32 order than the gather and tile
    paths (source tile by source tile); each path is deterministic."""
    if skip is None:
        dev = device_type or layout.site.device.type
        if dev == 'cuda' and layout.site.device.type == 'cuda' \
                and not _has_skip_kernels(layout.site.device):
            return 0
        return SKIP_PATH.get(dev, SKIP_PATH['cuda']).get(layout.tile, 0)
    if skip is True:
        skip = layout.tile
    if skip is False or skip == 0:
        return 0
    if skip not in SKIP_TILES:
        raise ArgumentError(f'skip must be a bool or one of {SKIP_TILES}, got {skip!r}.')
    return skip


def _has_skip_kernels(device: torch.device) -> bool:
    """Compute capability 9.x: the CUDA skip kernels are compiled for sm_90 only
    (build time, see kSkipArch in sparse_dwconv_skip_cuda.cu); True where no driver
    can answer (fake CUDA tensors of the models stand for a Hopper)."""
    try:
        return torch.cuda.get_device_capability(device)[0] == 9
    except (RuntimeError, AssertionError):
        return True


MMA_DTYPES = (torch.float16, torch.bfloat16)  # dtypes of the tensor-core tile path


def _has_mma_16816(device: torch.device) -> bool:
    """Compute capability 8.0+ (mma.sync.m16n8k16); True where no driver can
    answer (fake CUDA tensors of the models on a CPU machine stand for a Hopper)."""
    try:
        return torch.cuda.get_device_capability(device)[0] >= 8
    except (RuntimeError, AssertionError):
        return True


def mma_applies(tile: int, dtype: torch.dtype, C: int) -> bool:
    """The shapes and dtypes the tensor-core op takes (8x8 tiles, fp16/bf16,
    C % 8 == 0); :func:`conv_mma` adds alignment and device, the sparse dwconv
    model (benchmarks/model_sparse_dwconv.py) uses it as is."""
    return tile == 8 and dtype in MMA_DTYPES and C % 8 == 0


def conv_mma(x: torch.Tensor, tile: int, mma: Optional[bool] = None) -> bool:
    """Whether the forward / input gradient on the path ``tile`` runs the
    tensor-core op ``sparse_dwconv_mma_fwd`` (8x8 tiles, fp16/bf16, C % 8 == 0,
    16-byte aligned rows) instead of the FFMA tile op: ``mma`` when given (True
    also on CPU, where the C++ twin emulates the kernel's ldmatrix / mma.sync),
    else on CUDA wherever it applies (compute capability 8.0+).  Model
    (benchmarks/model_sparse_dwconv.py, V2-B 224^2 mask 0.6 bf16, H200, not a
    GPU measurement): stage-1 forward 3.0x -> 1.95x its HBM floor."""
    ok = (x.dim() == 2 and mma_applies(tile, x.dtype, x.shape[1])
          and x.storage_offset() * x.element_size() % 16 == 0)
    if mma is None:
        return ok and x.device.type == 'cuda' and _has_mma_16816(x.device)
    if mma and not ok:
        raise ArgumentError('the tensor-core path needs tile 8, float16/bfloat16 feats with '
                            f'C % 8 == 0 and 16-byte aligned rows; got tile {tile}, '
                            f'{x.dtype}, shape {tuple(x.shape)}.')
    return bool(mma)


def _paths(layout, tile, skip):
    """(FFMA / tensor-core tile, skip tile) of a call: the tile path when
    :func:`conv_tile` takes one, else the skip path where :func:`conv_skip` says
    so, else (0, 0): the gather."""
    path = conv_tile(layout, tile)
    return path, (0 if path else conv_skip(layout, skip))


def _conv_op(ops, x, taps, bias, layout, tile, mma=None, skip=0):
    """The forward op (x = feats, taps) or the input gradient (x = grad_out, taps
    reversed) on the path ``tile`` (:func:`conv_tile`), on tensor cores where
    :func:`conv_mma` says so, or on the skip path ``skip`` (:func:`conv_skip`)."""
    if skip:
        return ops.sparse_dwconv_skip_fwd(x, taps, bias, layout.tile_halo_rows(skip), skip)
    if tile and conv_mma(x, tile, mma):
        return ops.sparse_dwconv_mma_fwd(x, taps, bias, layout.tile_halo_rows(tile))
    if tile:
        return ops.sparse_dwconv_tile_fwd(x, taps, bias, layout.tile_halo_rows(tile), tile)
    return ops.sparse_dwconv_fwd(x, taps, bias, layout.neighbour_rows())


def sparse_dwconv_forward(feats: torch.Tensor, weight2d: torch.Tensor,
                          bias: Optional[torch.Tensor], layout: StageLayout,
                          ops=None, tile: Optional[int] = None,
                          mma: Optional[bool] = None, skip=None) -> torch.Tensor:
    """out[M, C] with the compiled op; weight2d (C, 49)/bias already in feats' dtype;
    ``tile``: see :func:`conv_tile`, ``mma``: :func:`conv_mma`, ``skip``:
    :func:`conv_skip`."""
    ops = ops or sparse_ops()
    path, sk = _paths(layout, tile, skip)
    return _conv_op(ops, feats.contiguous(), _taps(weight2d),
                    None if bias is None else bias.contiguous(), layout, path, mma, sk)


def sparse_dwconv_backward(grad_out: torch.Tensor, feats: torch.Tensor,
                           weight2d: torch.Tensor, layout: StageLayout,
                           need_input: bool = True, need_weight: bool = True,
                           ops=None, tile: Optional[int] = None,
                           mma: Optional[bool] = None,
                           skip=None) -> Tuple[Optional[torch.Tensor],
                                              Optional[torch.Tensor],
                                              Optional[torch.Tensor]]:
    """(grad_feats, grad_weight2d (C, 49) fp32, grad_bias fp32); None where not needed.

    The input gradient is the forward op on ``grad_out`` with the taps reversed;
    the weight gradient is ``sparse_dwconv_tile_wgrad`` (each tile's x halo
    staged once, its dy read once) on the tile path, ``sparse_dwconv_skip_wgrad``
    on the skip path, the per-row gather through the neighbour-row table
    otherwise — on the paths of the forward (:func:`conv_tile`,
    :func:`conv_skip`); the weight gradients differ only in fp32 summation
    order, each is bit-reproducible.
    """
    ops = ops or sparse_ops()
    grad_out = grad_out.contiguous()
    path, sk = _paths(layout, tile, skip)
    gin = gw = gb = None
    if need_input:
        gin = _conv_op(ops, grad_out, _taps(weight2d, flip=True), None, layout, path, mma, sk)
    if need_weight:
        if sk:
            gw, gb = ops.sparse_dwconv_skip_wgrad(grad_out, feats.contiguous(),
                                                  layout.tile_halo_rows(sk), sk)
        elif path:
            gw, gb = ops.sparse_dwconv_tile_wgrad(grad_out, feats.contiguous(),
                                                  layout.tile_halo_rows(path), path)
        else:
            gw, gb = ops.sparse_dwconv_bwd_weight(grad_out, feats.contiguous(),
                                                  layout.neighbour_rows())
        gw = gw.t()
    return gin, gw, gb


class SparseDWConv7x7Function(torch.autograd.Function):

    @staticmethod
    def forward(ctx, feats, weight2d, bias, layout):
        w = weight2d.to(feats.dtype)
        b = None if bias is None else bias.to(feats.dtype)
        out = sparse_dwconv_forward(feats, w, b, layout)
        ctx.save_for_backward(feats, w)
        ctx.layout = layout
        ctx.param_dtypes = (weight2d.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        feats, w = ctx.saved_tensors
        need_w = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        gin, gw, gb = sparse_dwconv_backward(grad_out.to(feats.dtype), feats, w,
                                             ctx.layout, ctx.needs_input_grad[0],
                                             need_w)
        wdt, bdt = ctx.param_dtypes
        gw = gw.to(wdt) if gw is not None and ctx.needs_input_grad[1] else None
        gb = gb.to(bdt) if gb is not None and ctx.needs_input_grad[2] else None
        return gin, gw, gb, None


# -- pure-PyTorch path --------------------------------------------------------
def sparse_dwconv7x7_torch(feats: torch.Tensor, weight: torch.Tensor,
                           bias: Optional[torch.Tensor],
                           layout: StageLayout) -> torch.Tensor:
    """The same op in plain PyTorch (gather per tap); autograd differentiates it.

    Accumulates in fp32 for fp16/bf16 like the kernels.  Used when the
    extension is missing; memory O(M * C) per tap, time 49 gathers.
    """
    w2 = _weight2d(weight)
    _check(feats, w2, bias, layout)
    acc_dtype = torch.float64 if feats.dtype == torch.float64 else torch.float32
    table = layout.neighbour_table()
    padded = torch.cat([feats, feats.new_zeros(1, feats.shape[1])]).to(acc_dtype)
    w2 = w2.to(acc_dtype)
    out = padded.new_zeros(feats.shape) if bias is None else \
        bias.to(acc_dtype).expand(feats.shape).clone()
    for t in range(49):
        out = out + padded.index_select(0, table[:, t]) * w2[:, t]
    return out.to(feats.dtype)


# -- entry point --------------------------------------------------------------
def sparse_dwconv7x7(feats: torch.Tensor, weight: torch.Tensor,
                     bias: Optional[torch.Tensor], layout: StageLayout,
                     impl: str = 'auto') -> torch.Tensor:
    """Submanifold depthwise 7x7 conv of visible rows ``feats`` [M, C].

    ``weight`` (C, 1, 7, 7) (an ``nn.Conv2d`` depthwise weight) or (C, 49);
    ``impl``: ``'auto'`` (compiled op when available, else PyTorch),
    ``'ext'`` (compiled op, error if missing) or ``'torch'``.
    Under autocast the features are cast to the autocast dtype (as conv2d is).
    """
    if impl not in ('auto', 'ext', 'torch'):
        raise ArgumentError(f"impl must be 'auto', 'ext' or 'torch', got {impl!r}.")
    dev = feats.device.type
    if torch.is_autocast_enabled(dev) and feats.dtype != torch.float64:
        feats = feats.to(torch.get_autocast_dtype(dev))
    w2 = _weight2d(weight)
    _check(feats, w2, bias, layout)
    ops = None if impl == 'torch' else sparse_ops()
    if ops is None:
        if impl == 'ext':
            raise RuntimeError('sparse_dwconv7x7(impl="ext"): the compiled extension '
                               'convnextv2_fast._C is not available.')
        return sparse_dwconv7x7_torch(feats, w2, bias, layout)
    with torch.autocast(dev, enabled=False):
        return SparseDWConv7x7Function.apply(feats, w2, bias, layout)


# -- reference ------------------------------------------------------------------
def sparse_dwconv7x7_dense_masked_ref(feats: torch.Tensor, weight: torch.Tensor,
                                      bias: Optional[torch.Tensor],
                                      layout: StageLayout,
                                      upcast: bool = False) -> torch.Tensor:
    """Reference: densify -> ``x * visible -> dwconv7x7 -> * visible`` -> rows."""
    dtype = feats.dtype
    if upcast and dtype != torch.float64:
        feats, weight = feats.float(), weight.float()
        bias = None if bias is None else bias.float()
    w4 = weight.reshape(-1, 1, 7, 7)
    vis = stage_visible_mask(layout, feats.dtype)
    x = densify(feats, layout) * vis
    y = F.conv2d(x, w4, bias, padding=3, groups=x.shape[1]) * vis
    rows = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]).index_select(
        0, layout.site_long())
    return rows.to(dtype)
