"""Registers FCMAE, its sparse encoder/decoder and the synthetic dataset into
mmpretrain's ``MODELS`` / ``DATASETS``.

Imported by ``convnextv2_fast/__init__.py``; never raises: without mmpretrain
(an optional dependency) nothing is registered, and any failure is recorded in
:data:`convnextv2_fast.REGISTRATION` (shown by ``python -m convnextv2_fast.info``).
"""
from ._registry import REGISTRATION, register_modules

try:
    from .models.fcmae import FCMAE, FCMAEDecoder
    from .models.sparse_encoder import SparseConvNeXtV2
    from .models.synthetic_data import SyntheticImageDataset
except Exception as exc:  # pragma: no cover - a broken optional module
    REGISTRATION['mmpretrain (FCMAE)'] = f'not registered: {type(exc).__name__}: {exc}'
else:
    register_modules([FCMAE, FCMAEDecoder, SparseConvNeXtV2], packages=('mmpretrain', ))
    register_modules([SyntheticImageDataset], packages=('mmpretrain', ),
                     registry='DATASETS')
