"""FCMAE (ConvNeXt V2 masked-autoencoder pretraining) with the sparse encoder.

Follows mmpretrain's self-supervised algorithm interface
(``BaseSelfSupervisor``: ``forward(inputs, data_samples, mode)`` dispatching to
``loss`` / ``predict`` / ``extract_feat``, a ``data_preprocessor`` such as
``SelfSupDataPreprocessor``) without importing mmpretrain here; it is
registered into mmpretrain's ``MODELS`` by :mod:`convnextv2_fast._fcmae_registry`.
The encoder is the attribute ``backbone``, so a saved FCMAE checkpoint's
``backbone.*`` keys load into :class:`ConvNeXtV2Fast` / ``mmpretrain.ConvNeXt``
with ``Pretrained(prefix='backbone.')``.

Official semantics (facebookresearch/ConvNeXt-V2 ``models/fcmae.py``):
random per-sample patch mask (``len_keep = int(L * (1 - mask_ratio))``,
1 = removed), decoder = 1x1 proj to 512 + mask token at masked positions +
ConvNeXt V2 block(s) + 1x1 conv to ``patch**2 * 3`` (channel order (p, q, c)),
loss = MSE on masked patches, with per-patch normalised targets
(``norm_pix_loss``, unbiased variance, eps 1e-6).
"""
import copy
from typing import Dict, List, Optional, Union

import torch
import torch.nn as nn
from mmengine.model import BaseModel, BaseModule

from .._errors import ArgumentError
from .block import ConvNeXtV2Block
from .sparse_encoder import SparseConvNeXtV2

_DEC_INIT = [
    dict(type='TruncNormal', layer=['Conv2d', 'Linear'], std=.02, bias=0.),
    dict(type='Constant', layer=['LayerNorm'], val=1., bias=0.),
]


class FCMAEDecoder(BaseModule):
    """proj (1x1) -> mask token fill -> ``depth`` ConvNeXt V2 blocks -> pred (1x1)."""

    def __init__(self, in_channels=1024, embed_dim=512, depth=1, patch_size=32,
                 out_channels=3, init_cfg=copy.deepcopy(_DEC_INIT)):
        super().__init__(init_cfg=init_cfg)
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim, 1, 1))
        nn.init.normal_(self.mask_token, std=.02)
        self.decoder = nn.Sequential(*[
            ConvNeXtV2Block(embed_dim, layer_scale_init_value=0., use_grn=True,
                            norm_cfg=dict(type='LN2d', eps=1e-6), impl='reference')
            for _ in range(depth)
        ])
        self.pred = nn.Conv2d(embed_dim, patch_size**2 * out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        n, _, h, w = x.shape
        m = mask.reshape(n, 1, h, w).to(x.dtype)
        x = x * (1. - m) + self.mask_token.to(x.dtype) * m
        return self.pred(self.decoder(x))


def random_patch_mask(n: int, grid_h: int, grid_w: int, mask_ratio: float,
                      device=None, generator=None) -> torch.Tensor:
    """(N, L) float mask, 1 = removed; exactly ``L - int(L * (1 - ratio))`` per sample."""
    length = grid_h * grid_w
    len_keep = int(length * (1 - mask_ratio))
    if len_keep < 1:
        raise ArgumentError(
            f'mask_ratio {mask_ratio} leaves no visible patch of {length}.')
    noise = torch.rand(n, length, device=device, generator=generator)
    ids_restore = noise.argsort(dim=1).argsort(dim=1)
    return (ids_restore >= len_keep).float()


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(N, 3, H, W) -> (N, L, p*p*3) with channel order (p, q, c)."""
    n, c, h, w = imgs.shape
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum('nchpwq->nhwpqc', x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, h: int, w: int, c: int = 3) -> torch.Tensor:
    n = x.shape[0]
    x = x.reshape(n, h, w, p, p, c)
    x = torch.einsum('nhwpqc->nchpwq', x)
    return x.reshape(n, c, h * p, w * p)


def fcmae_loss(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor,
               patch_size: int, norm_pix_loss: bool = True) -> torch.Tensor:
    """MSE on masked patches. pred (N, p*p*3, h, w); mask (N, L), 1 = removed."""
    n, c = pred.shape[:2]
    pred = pred.reshape(n, c, -1).transpose(1, 2).float()
    target = patchify(imgs, patch_size).float()
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.e-6)**.5
    loss = (pred - target).pow(2).mean(dim=-1)
    mask = mask.reshape(n, -1).float()
    return (loss * mask).sum() / mask.sum()


class FCMAE(BaseModel):
    """FCMAE self-supervised algorithm (mmpretrain ``BaseSelfSupervisor`` interface).

    Args:
        backbone (dict | nn.Module): the sparse encoder config
            (``SparseConvNeXtV2`` kwargs such as ``dwconv_impl`` and
            ``mlp_impl``, ``type`` optional) or module.
        decoder (dict): :class:`FCMAEDecoder` kwargs (``in_channels`` and
            ``patch_size`` are filled in from the encoder).
        mask_ratio (float): 0.6.  norm_pix_loss (bool): True.
        data_preprocessor (dict): e.g. ``dict(type='SelfSupDataPreprocessor',
            mean=..., std=..., to_rgb=True)`` (built from mmpretrain's registry
            when ``type`` is a string and mmpretrain is installed).
    """

    def __init__(self,
                 backbone: Union[dict, nn.Module] = dict(arch='base'),
                 decoder: Optional[dict] = None,
                 mask_ratio: float = 0.6,
                 norm_pix_loss: bool = True,
                 data_preprocessor: Optional[dict] = None,
                 init_cfg: Optional[dict] = None):
        if isinstance(data_preprocessor, dict) and isinstance(
                data_preprocessor.get('type'), str):
            data_preprocessor = _build_preprocessor(data_preprocessor)
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        if isinstance(backbone, dict):
            cfg = dict(backbone)
            cfg.pop('type', None)
            backbone = SparseConvNeXtV2(**cfg)
        if not isinstance(backbone, SparseConvNeXtV2):
            raise ArgumentError('backbone must be a SparseConvNeXtV2 or its config dict, '
                                f'got {type(backbone).__name__}.')
        if not 0. <= mask_ratio < 1.:
            raise ArgumentError(f'mask_ratio must be in [0, 1), got {mask_ratio}.')
        self.backbone = backbone
        self.patch_size = backbone.patch_size
        dec = dict(decoder or {})
        dec.pop('type', None)
        dec.setdefault('in_channels', backbone.channels[-1])
        dec.setdefault('patch_size', self.patch_size)
        dec.setdefault('out_channels', backbone.in_channels)
        self.neck = FCMAEDecoder(**dec)
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss

    # -- mmpretrain BaseSelfSupervisor interface ------------------------------------
    def forward(self, inputs, data_samples=None, mode: str = 'tensor'):
        if mode == 'tensor':
            return self.extract_feat(inputs)
        if mode == 'loss':
            return self.loss(inputs, data_samples)
        if mode == 'predict':
            return self.predict(inputs, data_samples)
        raise RuntimeError(f'Invalid mode "{mode}".')

    def extract_feat(self, inputs: torch.Tensor):
        """Encoder features with nothing masked (dense maps of ``out_indices``)."""
        return self.backbone(_as_tensor(inputs), None)

    def random_mask(self, imgs: torch.Tensor) -> torch.Tensor:
        n, _, h, w = imgs.shape
        return random_patch_mask(n, h // self.patch_size, w // self.patch_size,
                                 self.mask_ratio, device=imgs.device)

    def reconstruct(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Decoder prediction (N, p*p*3, h, w) for ``imgs`` under ``mask``."""
        rows, layouts = self.backbone.forward_sparse(imgs, mask)
        from ..sparse.layout import densify
        latent = densify(rows[-1], layouts[-1])
        return self.neck(latent, mask)

    def loss(self, inputs, data_samples=None, mask: Optional[torch.Tensor] = None
             ) -> Dict[str, torch.Tensor]:
        imgs = _as_tensor(inputs)
        if mask is None:
            mask = self.random_mask(imgs)
        pred = self.reconstruct(imgs, mask)
        return dict(loss=fcmae_loss(pred, imgs, mask, self.patch_size,
                                    self.norm_pix_loss))

    def predict(self, inputs, data_samples=None, mask: Optional[torch.Tensor] = None
                ) -> List[dict]:
        """Per sample: ``dict(pred=reconstructed image (3, H, W), mask=(h, w))``
        (normalised-pixel space when ``norm_pix_loss``)."""
        imgs = _as_tensor(inputs)
        if mask is None:
            mask = self.random_mask(imgs)
        pred = self.reconstruct(imgs, mask)
        n, c, h, w = pred.shape
        rec = unpatchify(pred.flatten(2).transpose(1, 2), self.patch_size, h, w,
                         imgs.shape[1])
        return [dict(pred=rec[i], mask=mask.reshape(n, h, w)[i]) for i in range(n)]


def _as_tensor(inputs):
    if isinstance(inputs, (list, tuple)):
        # SelfSupDataPreprocessor returns a list of views; FCMAE uses one
        inputs = inputs[0]
    if not torch.is_tensor(inputs):
        raise ArgumentError(f'inputs must be a tensor, got {type(inputs).__name__}.')
    return inputs


def _build_preprocessor(cfg: dict):
    try:
        from mmpretrain.registry import MODELS
    except ImportError:
        from mmengine.registry import MODELS
    return MODELS.build(cfg)
