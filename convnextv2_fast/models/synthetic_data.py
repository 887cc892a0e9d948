"""A tiny in-memory image dataset for smoke-training FCMAE through mmengine's Runner.

Items are ``dict(inputs=uint8 (3, H, W), data_samples=DataSample())`` (what
mmpretrain's ``PackInputs`` produces), deterministic per index: smooth random
colour blobs, so a masked autoencoder has something learnable.  Use with
``collate_fn=dict(type='default_collate')``.
"""
import torch
import torch.nn.functional as F


class SyntheticImageDataset(torch.utils.data.Dataset):

    def __init__(self, num_samples: int = 8, img_size=64, seed: int = 0,
                 pipeline=None, **kwargs):
        self.num_samples = int(num_samples)
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.seed = seed
        self.metainfo = dict(classes=None)

    def __len__(self):
        return self.num_samples

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(self.seed * 100003 + index)
        h, w = self.img_size
        low = torch.rand(1, 3, max(h // 16, 2), max(w // 16, 2), generator=g)
        img = F.interpolate(low, size=(h, w), mode='bilinear', align_corners=False)[0]
        img = (img * 255).round().clamp(0, 255).to(torch.uint8)
        try:
            from mmpretrain.structures import DataSample
        except ImportError:  # pragma: no cover
            from mmengine.structures import BaseDataElement as DataSample
        return dict(inputs=img, data_samples=DataSample())
