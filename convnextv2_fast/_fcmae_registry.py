"""Registers FCMAE and its sparse encoder into mmpretrain's ``MODELS``.

Imported by ``convnextv2_fast/__init__.py``; never raises: without mmpretrain
(an optional dependency) nothing is registered and the outcome is recorded in
:data:`convnextv2_fast.REGISTRATION` like the backbone registration.
"""
from ._registry import register_modules
from .models.fcmae import FCMAE, FCMAEDecoder
from .models.sparse_encoder import SparseConvNeXtV2

register_modules([FCMAE, FCMAEDecoder, SparseConvNeXtV2], packages=('mmpretrain', ))

from .models.synthetic_data import SyntheticImageDataset  # noqa: E402

register_modules([SyntheticImageDataset], packages=('mmpretrain', ), registry='DATASETS')
