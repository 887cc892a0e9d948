"""``ConvNeXtV2Fast``: a drop-in for ``mmpretrain.ConvNeXt`` with fused kernels.

Constructor arguments, defaults, validation, module tree (hence state_dict
keys), initialisation and outputs are those of ``mmpretrain.ConvNeXt``
(mmpretrain 1.2.0) so that OpenMMLab checkpoints and mmdet's
``LearningRateDecayOptimizerConstructor`` work unchanged.  One extra argument,
``impl``, selects the block implementation (see :mod:`convnextv2_fast.impl`).

mmpretrain is not imported: it is a test oracle, not a dependency.
"""
import copy
from itertools import chain
from typing import Sequence

import torch
import torch.nn as nn
from mmengine.model import BaseModule, ModuleList, Sequential

from .._errors import ArgumentError
from ..impl import check_impl
from .block import ConvNeXtV2Block
from .layers import build_norm_layer

ARCH_SETTINGS = {
    'atto': {'depths': [2, 2, 6, 2], 'channels': [40, 80, 160, 320]},
    'femto': {'depths': [2, 2, 6, 2], 'channels': [48, 96, 192, 384]},
    'pico': {'depths': [2, 2, 6, 2], 'channels': [64, 128, 256, 512]},
    'nano': {'depths': [2, 2, 8, 2], 'channels': [80, 160, 320, 640]},
    'tiny': {'depths': [3, 3, 9, 3], 'channels': [96, 192, 384, 768]},
    'small': {'depths': [3, 3, 27, 3], 'channels': [96, 192, 384, 768]},
    'base': {'depths': [3, 3, 27, 3], 'channels': [128, 256, 512, 1024]},
    'large': {'depths': [3, 3, 27, 3], 'channels': [192, 384, 768, 1536]},
    'xlarge': {'depths': [3, 3, 27, 3], 'channels': [256, 512, 1024, 2048]},
    'huge': {'depths': [3, 3, 27, 3], 'channels': [352, 704, 1408, 2816]},
}

DEFAULT_INIT_CFG = [
    dict(type='TruncNormal', layer=['Conv2d', 'Linear'], std=.02, bias=0.),
    dict(type='Constant', layer=['LayerNorm'], val=1., bias=0.),
]


def resolve_arch(arch):
    """Named or dict arch -> dict(depths, channels); errors name ``arch``."""
    if isinstance(arch, str):
        if arch not in ARCH_SETTINGS:
            raise ArgumentError(
                f'arch: unavailable arch {arch!r}, please choose from '
                f'({set(ARCH_SETTINGS)}) or pass a dict.')
        return ARCH_SETTINGS[arch]
    if isinstance(arch, dict):
        if 'depths' not in arch or 'channels' not in arch:
            raise ArgumentError(
                'arch: the arch dict must have "depths" and "channels", but '
                f'got {list(arch.keys())}.')
        return arch
    raise ArgumentError(f'arch must be a str or a dict, got {type(arch)}.')


def drop_path_rates(drop_path_rate: float, depths) -> list:
    """Stochastic-depth rate of every block (mmpretrain / mmcv linear rule),
    computed on the CPU so models also build under ``torch.device('meta')``."""
    return torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()


def resolve_out_indices(out_indices, num_stages):
    """mmpretrain semantics: int -> [int]; negative i -> 4 + i (hard-coded 4,
    the list passed in is modified in place).  Indices outside the stages,
    which mmpretrain silently ignores, are rejected here."""
    if isinstance(out_indices, int):
        out_indices = [out_indices]
    if not isinstance(out_indices, Sequence) or isinstance(out_indices, str):
        raise ArgumentError(
            '"out_indices" must by a sequence or int, get '
            f'{type(out_indices)} instead.')
    for i, index in enumerate(out_indices):
        if not isinstance(index, int):
            raise ArgumentError(
                f'out_indices must hold ints, got {index!r} at position {i}.')
        if index < 0:
            out_indices[i] = 4 + index
            if out_indices[i] < 0:
                raise ArgumentError(f'Invalid out_indices {index}')
        if out_indices[i] >= num_stages:
            raise ArgumentError(
                f'out_indices: index {index} is out of range for '
                f'{num_stages} stages.')
    return out_indices


class ConvNeXtV2Fast(BaseModule):
    """ConvNeXt V1/V2 backbone; see ``mmpretrain.ConvNeXt`` for the arguments.

    For ConvNeXt V2 set ``use_grn=True`` and ``layer_scale_init_value=0.``.

    Extra args:
        impl (str): ``'auto'`` (fused Triton blocks for CUDA tensors when
            available), ``'reference'`` (pure PyTorch, mmpretrain-identical) or
            ``'triton'`` (always fused; CPU only under ``TRITON_INTERPRET=1``).
            The environment variable ``CONVNEXTV2_FAST_IMPL`` overrides it.
    """
    arch_settings = ARCH_SETTINGS

    def __init__(self,
                 arch='tiny',
                 in_channels=3,
                 stem_patch_size=4,
                 norm_cfg=dict(type='LN2d', eps=1e-6),
                 act_cfg=dict(type='GELU'),
                 linear_pw_conv=True,
                 use_grn=False,
                 drop_path_rate=0.,
                 layer_scale_init_value=1e-6,
                 out_indices=-1,
                 frozen_stages=0,
                 gap_before_final_norm=True,
                 with_cp=False,
                 init_cfg=copy.deepcopy(DEFAULT_INIT_CFG),
                 impl='auto'):
        super().__init__(init_cfg=init_cfg)
        self.impl = check_impl(impl)
        arch = resolve_arch(arch)
        self.depths = arch['depths']
        self.channels = arch['channels']
        if not (isinstance(self.depths, Sequence)
                and isinstance(self.channels, Sequence)
                and len(self.depths) == len(self.channels)):
            raise ArgumentError(
                f'arch: the "depths" ({self.depths}) and "channels" '
                f'({self.channels}) should be both sequence with the same '
                'length.')
        self.num_stages = len(self.depths)
        self.in_channels = in_channels
        self.out_indices = resolve_out_indices(out_indices, self.num_stages)
        if not isinstance(frozen_stages, int) or not (
                0 <= frozen_stages <= self.num_stages):
            raise ArgumentError(
                f'frozen_stages must be an int in [0, {self.num_stages}], got '
                f'{frozen_stages!r}.')
        self.frozen_stages = frozen_stages
        self.gap_before_final_norm = gap_before_final_norm

        dpr = drop_path_rates(drop_path_rate, self.depths)
        block_idx = 0

        self.downsample_layers = ModuleList()
        stem = nn.Sequential(
            nn.Conv2d(
                in_channels,
                self.channels[0],
                kernel_size=stem_patch_size,
                stride=stem_patch_size),
            build_norm_layer(norm_cfg, self.channels[0]),
        )
        self.downsample_layers.append(stem)

        self.stages = nn.ModuleList()
        for i in range(self.num_stages):
            depth = self.depths[i]
            channels = self.channels[i]
            if i >= 1:
                self.downsample_layers.append(
                    nn.Sequential(
                        build_norm_layer(norm_cfg, self.channels[i - 1]),
                        nn.Conv2d(
                            self.channels[i - 1],
                            channels,
                            kernel_size=2,
                            stride=2),
                    ))
            stage = Sequential(*[
                ConvNeXtV2Block(
                    in_channels=channels,
                    drop_path_rate=dpr[block_idx + j],
                    norm_cfg=norm_cfg,
                    act_cfg=act_cfg,
                    linear_pw_conv=linear_pw_conv,
                    layer_scale_init_value=layer_scale_init_value,
                    use_grn=use_grn,
                    with_cp=with_cp,
                    impl=self.impl) for j in range(depth)
            ])
            block_idx += depth
            self.stages.append(stage)
            if i in self.out_indices:
                self.add_module(f'norm{i}',
                                build_norm_layer(norm_cfg, channels))

        self._freeze_stages()

    def set_impl(self, impl: str) -> 'ConvNeXtV2Fast':
        """Switch every block to ``impl`` ('auto' | 'reference' | 'triton')."""
        self.impl = check_impl(impl)
        for block in self.blocks():
            block.impl = self.impl
        return self

    def blocks(self):
        """All ConvNeXt blocks, in order."""
        return [b for stage in self.stages for b in stage]

    def forward(self, x):
        if not torch.is_tensor(x) or x.dim() != 4:
            raise ArgumentError(
                'x must be a 4-D (N, C, H, W) tensor, got '
                f'{tuple(x.shape) if torch.is_tensor(x) else type(x)}.')
        if x.shape[1] != self.in_channels:
            raise ArgumentError(
                f'x has {x.shape[1]} channels but the backbone was built with '
                f'in_channels={self.in_channels}.')
        # The residual stream stays channels_last (NHWC in memory) from the
        # stem to the last stage, for both impls: the fused blocks need it,
        # the reference blocks' permutes become free views, LayerNorm2d
        # normalises the NHWC view in place of a copy, and the convs keep the
        # format.  One copy of the (in_channels-wide) image here, one
        # NCHW-contiguous copy per output (the contract's output layout).
        x = x.contiguous(memory_format=torch.channels_last)
        outs = []
        for i, stage in enumerate(self.stages):
            x = self.downsample_layers[i](x)
            x = stage(x)
            if i in self.out_indices:
                norm_layer = getattr(self, f'norm{i}')
                if self.gap_before_final_norm:
                    gap = x.mean([-2, -1], keepdim=True)
                    outs.append(norm_layer(gap).flatten(1))
                else:
                    outs.append(norm_layer(x).contiguous())
        return tuple(outs)

    def _freeze_stages(self):
        for i in range(self.frozen_stages):
            downsample_layer = self.downsample_layers[i]
            stage = self.stages[i]
            downsample_layer.eval()
            stage.eval()
            for param in chain(downsample_layer.parameters(),
                               stage.parameters()):
                param.requires_grad = False

    def train(self, mode=True):
        super().train(mode)
        self._freeze_stages()
        return self
