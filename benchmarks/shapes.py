"""The real shapes every performance suite (timed, static, traffic, memory,
model) works at: one table, imported by all of them.

V2-B in the seed Mask R-CNN config: input 1024x1024, N=2 per GPU (the seed
trains 4 per GPU; the memory suite also reports N=4), bf16/fp16 autocast.
Under autocast the stem ends in an fp32 LayerNorm, so stage 1's residual
stream (the block input and output) is fp32 while its compute dtype (z, h,
GEMMs) is the autocast dtype; stages 2-4 start with an autocast conv, so
their stream is the autocast dtype too.

FCMAE V2-B pre-training: 224x224, mask ratio 0.6 on 32x32 patches
(19 of 49 visible per sample), 64 images per GPU in the issue's target (the
official recipe uses 256 per GPU).
"""
from dataclasses import dataclass

import torch

# The fused block configurations the static/traffic/model suites drive, by
# provider name: save mode or recompute, the layer-scale grad (``need_dr``:
# ConvNeXt V1-style configs with a layer scale) and the MLP path ('cublas':
# torch GEMMs + Triton GELU/GRN passes; 'triton': ops/mlp_gemm.py).
FAST_PROVIDERS = {
    'fast': dict(save=True, need_dr=False, mlp='cublas'),
    'fast_recompute': dict(save=False, need_dr=False, mlp='cublas'),
    'fast_layer_scale': dict(save=True, need_dr=True, mlp='cublas'),
    'fast_mlp': dict(save=True, need_dr=False, mlp='triton'),
    'fast_mlp_recompute': dict(save=False, need_dr=False, mlp='triton'),
    'fast_mlp_layer_scale': dict(save=True, need_dr=True, mlp='triton'),
}

V2B_DEPTHS = (3, 3, 27, 3)
V2B_CHANNELS = (128, 256, 512, 1024)


@dataclass(frozen=True)
class BlockShape:
    """One stage's block shape: (N, H, W, C) and the dtypes it sees."""
    name: str
    N: int
    H: int
    W: int
    C: int
    depth: int  # blocks of this shape in the backbone
    stream_dtype: torch.dtype  # residual stream (block input/output)
    compute_dtype: torch.dtype  # z, h, GEMMs (the autocast dtype)

    @property
    def M(self) -> int:
        return self.N * self.H * self.W

    @property
    def E(self) -> int:
        """Block elements N*H*W*C (the unit of per-element figures)."""
        return self.M * self.C

    def scaled(self, H: int, W: int) -> 'BlockShape':
        """Same C, dtypes and N at a smaller spatial size (the traffic suite
        runs real channel counts at reduced H, W in the interpreter)."""
        return BlockShape(f'{self.name}@{H}x{W}', self.N, H, W, self.C,
                          self.depth, self.stream_dtype, self.compute_dtype)


def maskrcnn_v2b_stages(N: int = 2, size: int = 1024,
                        amp_dtype: torch.dtype = torch.bfloat16):
    """The four V2-B stage shapes of the seed config (stride 4, 8, 16, 32)."""
    out = []
    for i, (d, c) in enumerate(zip(V2B_DEPTHS, V2B_CHANNELS)):
        hw = size // (4 * 2**i)
        stream = torch.float32 if i == 0 else amp_dtype
        out.append(BlockShape(f'{size}-s{i + 1}', N, hw, hw, c, d, stream,
                              amp_dtype))
    return out


MASKRCNN_V2B = maskrcnn_v2b_stages()

FCMAE_SIZE = 224
FCMAE_MASK_RATIO = 0.6
FCMAE_BATCH = 64


def fcmae_v2b_stages(N: int = FCMAE_BATCH, size: int = FCMAE_SIZE,
                     amp_dtype: torch.dtype = torch.bfloat16):
    """Dense stage shapes of the FCMAE V2-B encoder (visible rows are
    ``fcmae_visible_fraction()`` of them)."""
    return maskrcnn_v2b_stages(N, size, amp_dtype)


def fcmae_visible_fraction(size: int = FCMAE_SIZE,
                           ratio: float = FCMAE_MASK_RATIO) -> float:
    """Visible fraction of sites: ``int(L * (1 - ratio)) / L`` patches."""
    L = (size // 32)**2
    return int(L * (1 - ratio)) / L
