from .backbone import ConvNeXtV2Fast
from .block import ConvNeXtV2Block
from .layers import GRN, LayerNorm2d

__all__ = ['ConvNeXtV2Fast', 'ConvNeXtV2Block', 'GRN', 'LayerNorm2d']
