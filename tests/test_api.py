"""Public API behaviour: argument errors, impl switch, import, info, checkpoints."""
import os
import subprocess
import sys

import pytest
import torch

from _oracle import mmpretrain_convnext
from convnextv2_fast import ConvNeXtV2Fast
from convnextv2_fast.impl import ENV_VAR, resolve_impl
from convnextv2_fast.testing import randomize_, reference_backbone_kwargs

TINY = dict(arch=dict(depths=[1, 1], channels=[8, 16]), out_indices=[0, 1],
            use_grn=True, layer_scale_init_value=0.)


@pytest.mark.parametrize('kwargs, needle', [
    (dict(arch='gigantic'), 'arch'),
    (dict(arch=dict(depths=[1, 1])), 'arch'),
    (dict(arch=dict(depths=[1, 1], channels=[8])), 'arch'),
    (dict(arch='atto', out_indices=-5), 'out_indices'),
    (dict(arch='atto', out_indices=[4]), 'out_indices'),
    (dict(arch='atto', out_indices='0'), 'out_indices'),
    (dict(arch='atto', frozen_stages=5), 'frozen_stages'),
    (dict(arch='atto', impl='cuda'), 'impl'),
    (dict(arch='atto', norm_cfg=dict(type='BN')), 'norm_cfg'),
])
def test_bad_constructor_arguments(kwargs, needle):
    # both ValueError (for users) and AssertionError (mmpretrain semantics)
    for exc in (ValueError, AssertionError):
        with pytest.raises(exc, match=needle):
            ConvNeXtV2Fast(**kwargs)


@pytest.mark.parametrize('shape, needle', [
    ((3, 32, 32), 'x must be a 4-D'),
    ((1, 2, 3, 32, 32), 'x must be a 4-D'),
    ((2, 4, 32, 32), 'in_channels=3'),
])
def test_bad_input(shape, needle):
    model = ConvNeXtV2Fast(**TINY)
    with pytest.raises(ValueError, match=needle):
        model(torch.randn(*shape))


def test_env_override(monkeypatch):
    cpu = torch.device('cpu')
    assert resolve_impl('auto', cpu) == 'reference'
    assert resolve_impl('reference', cpu) == 'reference'
    monkeypatch.setenv(ENV_VAR, 'reference')
    assert resolve_impl('triton', cpu) == 'reference'
    monkeypatch.setenv(ENV_VAR, 'bogus')
    with pytest.raises(ValueError, match=ENV_VAR):
        resolve_impl('auto', cpu)


def test_triton_forced_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(RuntimeError, match="impl='triton'"):
        resolve_impl('triton', torch.device('cpu'))


def test_set_impl_propagates():
    model = ConvNeXtV2Fast(**TINY)
    model.set_impl('reference')
    assert {b.impl for b in model.blocks()} == {'reference'}
    with pytest.raises(ValueError, match='impl'):
        model.set_impl('fast')


def _run_python(code, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, env=env, timeout=300)


def test_import_without_openmmlab_detection_stack():
    """Importing must work with mmdet, mmcv and mmpretrain unavailable."""
    code = (
        "import sys\n"
        "for m in ('mmdet', 'mmcv', 'mmpretrain'): sys.modules[m] = None\n"
        "import convnextv2_fast, torch\n"
        "m = convnextv2_fast.ConvNeXtV2Fast(arch='atto', use_grn=True)\n"
        "print(len(m(torch.randn(1, 3, 32, 32))))\n"
        "print(convnextv2_fast.REGISTRATION)\n")
    res = _run_python(code)
    assert res.returncode == 0, res.stderr
    assert "'mmdet': 'not installed'" in res.stdout
    assert "'mmpretrain': 'not installed'" in res.stdout


def test_registered_in_openmmlab_registries():
    mmdet_registry = pytest.importorskip('mmdet.registry')
    mmpretrain_registry = pytest.importorskip('mmpretrain.registry')
    assert mmdet_registry.MODELS.get('ConvNeXtV2Fast') is ConvNeXtV2Fast
    assert mmpretrain_registry.MODELS.get('ConvNeXtV2Fast') is ConvNeXtV2Fast
    built = mmdet_registry.MODELS.build(dict(type='ConvNeXtV2Fast', **TINY))
    assert isinstance(built, ConvNeXtV2Fast)


def test_info_command():
    res = subprocess.run([sys.executable, '-m', 'convnextv2_fast.info'],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    for key in ('torch', 'triton', 'mmcv', 'mmdet', 'mmpretrain', 'GPU',
                'compiled extension', "impl='auto' picks"):
        assert key in res.stdout


def test_pretrained_checkpoint_roundtrip(tmp_path):
    """mmpretrain checkpoint (prefix backbone.) -> ours via init_cfg, and back."""
    ConvNeXt = mmpretrain_convnext()
    kwargs = reference_backbone_kwargs(arch='atto')
    src = randomize_(ConvNeXt(**kwargs), seed=5)
    ckpt = tmp_path / 'convnext.pth'
    torch.save({'state_dict': {f'backbone.{k}': v
                               for k, v in src.state_dict().items()},
                'meta': {'note': 'synthetic'}}, ckpt)
    ours = ConvNeXtV2Fast(**kwargs, init_cfg=dict(
        type='Pretrained', checkpoint=str(ckpt), prefix='backbone.'))
    ours.init_weights()
    sd_src, sd_ours = src.state_dict(), ours.state_dict()
    assert list(sd_src) == list(sd_ours)
    mismatched = [k for k in sd_src if not torch.equal(sd_src[k], sd_ours[k])]
    assert not mismatched, f'keys not loaded: {mismatched[:5]}'
    back = ConvNeXt(**kwargs)
    result = back.load_state_dict(randomize_(ours, seed=6).state_dict(),
                                  strict=True)
    assert not result.missing_keys and not result.unexpected_keys
