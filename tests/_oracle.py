"""Access to the test oracle, ``mmpretrain.ConvNeXt`` (skip if not installed)."""
import contextlib
from unittest import mock

import pytest
import torch

CONTRACT_PARAM_COUNTS = {  # CONTRACT.md: use_grn, no layer scale, 4 out norms
    'atto': 3_387_960,
    'tiny': 27_867_840,
    'base': 87_694_592,
    'large': 196_422_528,
    'huge': 657_477_568,
}


def mmpretrain_convnext():
    mmpretrain_models = pytest.importorskip(
        'mmpretrain.models', reason='mmpretrain (the test oracle) not installed')
    return mmpretrain_models.ConvNeXt


@contextlib.contextmanager
def meta_device():
    """Build modules on the meta device.  mmpretrain's drop-path schedule calls
    ``.item()`` on a ``torch.linspace`` tensor, which fails on meta, so that
    one call is redirected to the CPU."""
    real_linspace = torch.linspace

    def cpu_linspace(*args, **kwargs):
        kwargs['device'] = 'cpu'
        return real_linspace(*args, **kwargs)

    with torch.device('meta'), mock.patch.object(torch, 'linspace',
                                                 cpu_linspace):
        yield
