"""``SparseConvNeXtV2``: the FCMAE ConvNeXt V2 encoder computing on visible sites only.

Module tree and parameter names are those of :class:`ConvNeXtV2Fast` /
``mmpretrain.ConvNeXt`` (``downsample_layers.*``, ``stages.i.j.{depthwise_conv,
norm, pointwise_conv1, grn, pointwise_conv2}``) — the blocks ARE
:class:`ConvNeXtV2Block` modules used as parameter containers — so the
encoder's state_dict loads into the dense backbone for fine-tuning.  The only
backbone keys it does not have are the output norms ``norm{i}``, which FCMAE
pretraining does not use (the official fine-tuning initialises them fresh).

Forward (official FCMAE semantics, mask 1 = removed patch):
* stem: the 4x4/s4 conv as a GEMM on the visible 4x4 pixel patches, then LN;
* blocks: submanifold depthwise 7x7 (``sparse_dwconv7x7``), LN, Linear, GELU,
  GRN per sample over visible rows (:func:`sparse_grn`), Linear, drop path per
  sample, residual — all on compact rows ``[M, C]``; with ``mlp_impl``
  resolving to ``'triton'`` and equal visible counts per sample, everything
  after the LN runs on the dense fused block's ops over the (N, p, C) view of
  the rows (:mod:`convnextv2_fast.sparse.mlp`) and every LN is one Triton
  pass each way (:mod:`convnextv2_fast.sparse.ln`);
* downsample: LN on rows, then the 2x2/s2 conv as a GEMM on the gathered fully
  visible 2x2 blocks.

:func:`dense_masked_encoder_ref` is the reference (the official JAX variant:
dense compute with the mask re-applied), used by tests and the benchmark.
"""
import copy
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule, ModuleList, Sequential

from .._errors import ArgumentError
from ..impl import resolve_impl
from ..ops.reference import drop_path_mask, grn_ref
from ..sparse.dwconv import sparse_dwconv7x7
from ..sparse.grn import sparse_grn
from ..sparse.layout import (StageLayout, build_layouts, check_input_size,
                             check_mask, densify, stage_visible_mask)
from .backbone import DEFAULT_INIT_CFG, drop_path_rates, resolve_arch
from .block import ConvNeXtV2Block
from .layers import build_norm_layer


class SparseConvNeXtV2(BaseModule):
    """FCMAE encoder. ``arch`` as in ConvNeXtV2Fast; ``patch_size`` is the
    mask patch (32 = the total stride of a 4-stage net).

    ``dwconv_impl``: ``'auto'`` | ``'ext'`` | ``'torch'`` (see
    :func:`sparse_dwconv7x7`).  ``mlp_impl``: ``'auto'`` | ``'triton'`` |
    ``'torch'``, the block's tail after the LN (pw1, GELU, GRN, pw2, layer
    scale, drop path, residual): ``'triton'`` runs the dense fused block's
    ops on the (N, p, C) view of the rows (:mod:`convnextv2_fast.sparse.mlp`)
    at stages where every sample has the same number p of visible rows
    (always, with FCMAE's fixed ``len_keep``), the torch code elsewhere;
    resolved per call by :func:`resolve_mlp_impl`; with 'triton' the stem,
    block and downsample LayerNorms run as one Triton pass each way
    (:mod:`convnextv2_fast.sparse.ln`) at every stage.  ``out_indices``: stages
    returned by :meth:`forward` (default: the last).
    """

    def __init__(self,
                 arch='base',
                 in_channels=3,
                 patch_size=32,
                 drop_path_rate=0.,
                 out_indices=(-1, ),
                 dwconv_impl='auto',
                 mlp_impl='auto',
                 init_cfg=copy.deepcopy(DEFAULT_INIT_CFG)):
        super().__init__(init_cfg=init_cfg)
        arch = resolve_arch(arch)
        self.depths, self.channels = list(arch['depths']), list(arch['channels'])
        self.num_stages = len(self.depths)
        self.in_channels = in_channels
        total_stride = 4 * 2**(self.num_stages - 1)
        if patch_size % total_stride:
            raise ArgumentError(
                f'patch_size must be a multiple of the total stride {total_stride} '
                f'so that visible regions are whole tiles at every stage, got {patch_size}.')
        self.patch_size = patch_size
        self.out_indices = [i % self.num_stages for i in out_indices]
        self.dwconv_impl = dwconv_impl
        self.mlp_impl = check_mlp_impl(mlp_impl)
        norm_cfg = dict(type='LN2d', eps=1e-6)
        dpr = drop_path_rates(drop_path_rate, self.depths)
        self.downsample_layers = ModuleList()
        self.downsample_layers.append(
            nn.Sequential(
                nn.Conv2d(in_channels, self.channels[0], kernel_size=4, stride=4),
                build_norm_layer(norm_cfg, self.channels[0])))
        self.stages = nn.ModuleList()
        k = 0
        for i, (depth, ch) in enumerate(zip(self.depths, self.channels)):
            if i >= 1:
                self.downsample_layers.append(
                    nn.Sequential(
                        build_norm_layer(norm_cfg, self.channels[i - 1]),
                        nn.Conv2d(self.channels[i - 1], ch, kernel_size=2, stride=2)))
            self.stages.append(
                Sequential(*[
                    ConvNeXtV2Block(ch, norm_cfg=norm_cfg, drop_path_rate=dpr[k + j],
                                    layer_scale_init_value=0., use_grn=True,
                                    impl='reference') for j in range(depth)
                ]))
            k += depth

    # -- layouts ------------------------------------------------------------
    def layouts(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> List[StageLayout]:
        if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ArgumentError(
                f'x must be an (N, {self.in_channels}, H, W) tensor, got '
                f'{tuple(x.shape) if torch.is_tensor(x) else type(x)}.')
        n, _, h, w = x.shape
        check_input_size(h, w, self.patch_size)
        gh, gw = h // self.patch_size, w // self.patch_size
        if mask is None:
            mask = torch.zeros(n, gh, gw, dtype=torch.bool, device=x.device)
        mask = check_mask(mask.to(x.device), n, gh, gw)
        return build_layouts(mask, h, w, self.patch_size, self.num_stages)

    # -- sparse forward -------------------------------------------------------
    def forward_sparse(self, x: torch.Tensor, mask: Optional[torch.Tensor],
                       layouts: Optional[List[StageLayout]] = None
                       ) -> Tuple[List[torch.Tensor], List[StageLayout]]:
        """Rows ``[M_i, C_i]`` of every stage and the stage layouts."""
        layouts = layouts or self.layouts(x, mask)
        n, cin, h, w = x.shape
        conv, ln = self.downsample_layers[0]
        p = conv.kernel_size[0]
        patches = x.reshape(n, cin, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(-1, cin * p * p).index_select(0, layouts[0].site_long())
        rows = F.linear(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias)
        rows = self._ln(ln, rows, feeds_gemm=False)  # the residual stream
        outs = []
        for i, stage in enumerate(self.stages):
            if i >= 1:
                ln, conv = self.downsample_layers[i]
                rows = self._ln(ln, rows, feeds_gemm=True)
                idx = layouts[i].down_index(layouts[i - 1])
                gathered = rows.index_select(0, idx.reshape(-1)).reshape(idx.shape[0], -1)
                wmat = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)
                rows = F.linear(gathered, wmat, conv.bias)
            for block in stage:
                rows = self._block(block, rows, layouts[i])
            outs.append(rows)
        return outs, layouts

    def _block(self, blk: ConvNeXtV2Block, rows: torch.Tensor,
               layout: StageLayout) -> torch.Tensor:
        y = sparse_dwconv7x7(rows, blk.depthwise_conv.weight, blk.depthwise_conv.bias,
                             layout, impl=self.dwconv_impl)
        y = self._ln(blk.norm, y, feeds_gemm=True)
        if layout.equal_counts and resolve_mlp_impl(self.mlp_impl, rows.device) == 'triton':
            return self._mlp_fused(blk, rows, y, layout)
        y = blk.pointwise_conv1(y)
        y = blk.act(y)
        y = sparse_grn(y, blk.grn.gamma, blk.grn.beta, layout, blk.grn.eps)
        y = blk.pointwise_conv2(y)
        if blk.gamma is not None:
            y = y * blk.gamma
        if self.training and blk.drop_prob > 0:
            keep = 1 - blk.drop_prob
            sample_keep = drop_path_mask(y.new_empty(layout.counts.numel(), 1),
                                         blk.drop_prob).view(-1)
            y = y.div(keep) * sample_keep.index_select(0, layout.sample)[:, None]
        return rows + y

    def _ln(self, ln, rows: torch.Tensor, feeds_gemm: bool) -> torch.Tensor:
        """LayerNorm of the rows over C: with ``mlp_impl`` resolving to
        'triton', one Triton pass each way (:mod:`convnextv2_fast.sparse.ln`);
        where the output only feeds a GEMM (``feeds_gemm``: the block's LN
        before pw1, the downsample LNs before their convs) it is written in
        the autocast dtype that GEMM casts it to anyway -- the torch path's
        values without its fp32 round trip; else ``F.layer_norm``."""
        if ln.weight is None or ln.bias is None or \
                resolve_mlp_impl(self.mlp_impl, rows.device) != 'triton':
            return F.layer_norm(rows, (rows.shape[1], ), ln.weight, ln.bias, ln.eps)
        from ..ops.fused_block import compute_dtype_for
        from ..sparse.ln import sparse_layer_norm
        return sparse_layer_norm(rows, ln.weight, ln.bias, ln.eps,
                                 compute_dtype_for(rows) if feeds_gemm else None)

    def _mlp_fused(self, blk: ConvNeXtV2Block, rows: torch.Tensor, z: torch.Tensor,
                   layout: StageLayout) -> torch.Tensor:
        """The torch tail of :meth:`_block` after the LN, on the fused ops
        (:func:`convnextv2_fast.sparse.mlp.sparse_mlp`).  The drop-path draw
        is the torch path's (one ``torch.rand`` of N values in the dtype of
        its branch output), so both paths keep the same samples."""
        from ..ops.fused_block import compute_dtype_for
        from ..sparse.mlp import sparse_mlp
        n, c = layout.counts.numel(), rows.shape[1]
        r = torch.ones((n, c), device=rows.device, dtype=torch.float32)
        if blk.gamma is not None:
            r = r * blk.gamma.float()[None, :]
        if self.training and blk.drop_prob > 0:
            cd = compute_dtype_for(rows)
            ydtype = cd if blk.gamma is None else torch.promote_types(cd, blk.gamma.dtype)
            sample_keep = drop_path_mask(rows.new_empty((n, 1), dtype=ydtype),
                                         blk.drop_prob)
            r = r * (sample_keep.float() / (1 - blk.drop_prob))
        return sparse_mlp(z, rows, blk.pointwise_conv1.weight, blk.pointwise_conv1.bias,
                          blk.grn.gamma, blk.grn.beta, blk.pointwise_conv2.weight,
                          blk.pointwise_conv2.bias, r, n, blk.grn.eps)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, ...]:
        """Dense (N, C, H, W) maps of ``out_indices`` stages, zero at masked sites.
        ``mask``: (N, L) or (N, h, w), 1 = removed; None = all visible."""
        rows, layouts = self.forward_sparse(x, mask)
        return tuple(densify(rows[i], layouts[i]) for i in self.out_indices)


MLP_IMPLS = ('auto', 'triton', 'torch')


def check_mlp_impl(impl) -> str:
    if not isinstance(impl, str) or impl not in MLP_IMPLS:
        raise ArgumentError(f'mlp_impl must be one of {MLP_IMPLS}, got {impl!r}.')
    return impl


def resolve_mlp_impl(impl: str, device: torch.device) -> str:
    """'triton' or 'torch' for rows on ``device``, by the dense block's rule
    (:func:`convnextv2_fast.impl.resolve_impl`, 'torch' standing for its
    'reference'): 'auto' = the fused ops for CUDA tensors when they import,
    PyTorch otherwise; 'triton' raises where it cannot run (CPU tensors need
    ``TRITON_INTERPRET=1``); ``CONVNEXTV2_FAST_IMPL`` overrides all three."""
    got = resolve_impl('reference' if check_mlp_impl(impl) == 'torch' else impl, device)
    return 'triton' if got == 'triton' else 'torch'


# -- reference -----------------------------------------------------------------
def dense_masked_encoder_ref(encoder: SparseConvNeXtV2, x: torch.Tensor,
                             mask: Optional[torch.Tensor],
                             layouts: Optional[List[StageLayout]] = None
                             ) -> List[torch.Tensor]:
    """Dense-masked FCMAE encoder with ``encoder``'s weights (official JAX
    semantics): every stage computed densely with the visible mask re-applied
    after the stem, the depthwise conv (before and after), before the GRN and
    after each block's branch and each downsample.  Returns the dense NCHW
    map of every stage (zeros at masked sites).  Drop path is not applied
    (use eval mode or drop_path_rate=0 for comparisons)."""
    layouts = layouts or encoder.layouts(x, mask)
    vis_masks = [stage_visible_mask(layout, x.dtype) for layout in layouts]
    return dense_masked_encoder_forward(encoder, x, vis_masks)


def dense_masked_encoder_forward(encoder: SparseConvNeXtV2, x: torch.Tensor,
                                 vis_masks: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """:func:`dense_masked_encoder_ref` given the per-stage (N, 1, H_i, W_i)
    visible masks (no data-dependent shapes: ``torch.compile``-friendly)."""
    def masked(t, m):  # keep t's dtype under autocast (no promotion to fp32)
        return t * m.to(t.dtype)

    outs = []
    for i, stage in enumerate(encoder.stages):
        vis = vis_masks[i]
        if i == 0:
            conv, ln = encoder.downsample_layers[0]
            x = masked(ln(conv(x)), vis)
        else:
            ln, conv = encoder.downsample_layers[i]
            x = masked(conv(ln(x)), vis)
        vis_nhwc = vis.permute(0, 2, 3, 1)
        for blk in stage:
            y = F.conv2d(masked(x, vis), blk.depthwise_conv.weight,
                         blk.depthwise_conv.bias, padding=3, groups=x.shape[1])
            y = masked(y, vis).permute(0, 2, 3, 1)
            y = F.layer_norm(y, (y.shape[-1], ), blk.norm.weight, blk.norm.bias,
                             blk.norm.eps)
            y = masked(blk.act(blk.pointwise_conv1(y)), vis_nhwc)
            y = grn_ref(y, blk.grn.gamma, blk.grn.beta, blk.grn.eps)
            y = blk.pointwise_conv2(y)
            if blk.gamma is not None:
                y = y * blk.gamma
            x = x + masked(y.permute(0, 3, 1, 2), vis)
        outs.append(x)
    return outs


# -- checkpoints ------------------------------------------------------------------
_OFFICIAL_RENAMES = (('.dwconv.', '.depthwise_conv.'), ('.pwconv1.', '.pointwise_conv1.'),
                     ('.pwconv2.', '.pointwise_conv2.'))


def convert_official_fcmae_checkpoint(state_dict: dict, prefix: str = ''
                                      ) -> Tuple[dict, dict]:
    """Map an official dense-format FCMAE / ConvNeXt-V2 state_dict to our names.

    Official keys (``facebookresearch/ConvNeXt-V2``, optionally under
    ``'model'`` and/or the ``encoder.`` prefix of ``fcmae.py``):
    ``downsample_layers.*`` (same layout as ours), ``stages.i.j.dwconv``,
    ``.norm``, ``.pwconv1``, ``.grn.gamma/beta`` of shape (1, 1, 1, C),
    ``.pwconv2``.  Returns ``(encoder_state, rest)`` where ``encoder_state``
    has our keys (GRN params flattened to (C,)) with ``prefix`` prepended
    (use ``'backbone.'`` for an mmdet/mmpretrain checkpoint) and ``rest`` holds
    the keys that are not encoder weights (decoder, mask token, head, ...).
    Sparse-format (MinkowskiEngine) checkpoints, whose keys contain
    ``.kernel``/``.ln.``/``.linear.``, are rejected: convert them to the dense
    format with the official ``remap_checkpoint_keys`` first.
    """
    if 'model' in state_dict and isinstance(state_dict['model'], dict):
        state_dict = state_dict['model']
    enc, rest = {}, {}
    for key, value in state_dict.items():
        k = key[len('encoder.'):] if key.startswith('encoder.') else key
        if not (k.startswith('downsample_layers.') or k.startswith('stages.')):
            rest[key] = value
            continue
        if k.endswith('.kernel') or '.ln.' in k or '.linear.' in k:
            raise ArgumentError(
                f'state_dict key {key!r} is in the sparse (MinkowskiEngine) format; '
                'convert the checkpoint to the dense format first.')
        for old, new in _OFFICIAL_RENAMES:
            k = k.replace(old, new)
        if '.grn.' in k:
            value = value.reshape(-1)
        enc[prefix + k] = value
    return enc, rest
