"""convnextv2_fast: ConvNeXt V2 for mmdet/mmpretrain with fused kernels.

``import convnextv2_fast`` needs only torch and mmengine; it registers
:class:`ConvNeXtV2Fast` into mmdet's and mmpretrain's ``MODELS`` registries
when those packages are importable.
"""
from ._registry import REGISTRATION, register_modules
from .impl import VALID_IMPLS
from .models import GRN, ConvNeXtV2Block, ConvNeXtV2Fast, LayerNorm2d

from .version import __version__

register_modules([ConvNeXtV2Fast])
from . import _fcmae_registry  # noqa: E402,F401  (FCMAE -> mmpretrain MODELS; never raises)

__all__ = [
    'ConvNeXtV2Fast', 'ConvNeXtV2Block', 'GRN', 'LayerNorm2d', 'VALID_IMPLS',
    'REGISTRATION', '__version__'
]
