"""FCMAE: loss vs a straightforward dense-masked implementation, training, Runner."""
import copy
import os.path as osp

import pytest
import torch

from convnextv2_fast.models.fcmae import FCMAE, random_patch_mask
from convnextv2_fast.models.sparse_encoder import dense_masked_encoder_ref

ARCH = dict(depths=[1, 1, 1, 1], channels=[16, 24, 32, 40])
ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def _model(seed=0, norm_pix_loss=True):
    torch.manual_seed(seed)
    model = FCMAE(backbone=dict(arch=ARCH, dwconv_impl='auto'),
                  decoder=dict(embed_dim=32, depth=1), norm_pix_loss=norm_pix_loss)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'grn' in name:
                p.normal_(0, 0.5)
    return model


def _dense_loss(model, imgs, mask, p=32, norm_pix=True):
    """Dense-masked encoder + decoder, loss written out patch by patch."""
    enc = model.backbone
    latent = dense_masked_encoder_ref(enc, imgs, mask)[-1]
    pred = model.neck(latent, mask)                     # (N, p*p*3, h, w)
    n, _, gh, gw = pred.shape
    m = mask.reshape(n, gh, gw)
    total, count = 0., 0
    for b in range(n):
        for i in range(gh):
            for j in range(gw):
                if m[b, i, j] == 0:
                    continue
                target = imgs[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p]
                target = target.permute(1, 2, 0).reshape(-1)    # (p, q, c) order
                if norm_pix:
                    target = (target - target.mean()) / (target.var() + 1e-6)**.5
                total = total + ((pred[b, :, i, j] - target)**2).mean()
                count += 1
    return total / count


@pytest.mark.parametrize('norm_pix', [True, False])
def test_loss_equals_dense_masked_loss(norm_pix):
    model = _model(norm_pix_loss=norm_pix).eval()
    imgs = torch.randn(2, 3, 64, 96)
    mask = torch.tensor([[1., 0, 1, 1, 0, 1], [0, 1, 1, 0, 1, 1]])
    sparse = model.loss(imgs, mask=mask)['loss']
    dense = _dense_loss(model, imgs, mask, norm_pix=norm_pix)
    print(f'sparse {sparse.item():.6f} dense {dense.item():.6f}')
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    # gradients of the whole model agree too
    g1 = torch.autograd.grad(sparse, list(model.parameters()), allow_unused=True)
    g2 = torch.autograd.grad(_dense_loss(model, imgs, mask, norm_pix=norm_pix),
                             list(model.parameters()), allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), g1, g2):
        assert a is not None and b is not None, name
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=name)


def test_random_mask_counts_and_per_sample():
    mask = random_patch_mask(4, 7, 7, 0.6, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (4, 49)
    assert torch.all(mask.sum(1) == 49 - int(49 * 0.4))    # len_keep = 19
    assert len({tuple(m.tolist()) for m in mask}) == 4


def test_training_reduces_loss_on_fixed_batch():
    model = _model(seed=1).train()
    torch.manual_seed(0)
    imgs = torch.nn.functional.interpolate(torch.rand(2, 3, 4, 4), size=(64, 64),
                                           mode='bilinear', align_corners=False)
    mask = random_patch_mask(2, 2, 2, 0.5, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(12):
        loss = model.loss(imgs, mask=mask)['loss']
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print('losses', [round(x, 4) for x in losses])
    assert losses[-1] < 0.9 * losses[0]
    assert losses[-1] < min(losses[:6])


def test_forward_modes_and_predict():
    model = _model().eval()
    imgs = torch.randn(2, 3, 64, 64)
    feats = model(imgs, mode='tensor')
    assert feats[-1].shape == (2, 40, 2, 2)
    out = model.predict(imgs)
    assert len(out) == 2 and out[0]['pred'].shape == (3, 64, 64)
    assert out[0]['mask'].shape == (2, 2)
    assert set(model(imgs, mode='loss')) == {'loss'}


def test_registered_in_mmpretrain():
    pytest.importorskip('mmpretrain')
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    init_default_scope('mmpretrain')  # as the configs' default_scope does
    model = MODELS.build(dict(
        type='FCMAE', backbone=dict(type='SparseConvNeXtV2', arch=ARCH),
        decoder=dict(embed_dim=16),
        data_preprocessor=dict(type='SelfSupDataPreprocessor', mean=[0, 0, 0],
                               std=[1, 1, 1], to_rgb=True)))
    assert type(model).__name__ == 'FCMAE'
    assert type(model.data_preprocessor).__name__ == 'SelfSupDataPreprocessor'


def test_base_config_parses():
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(ROOT, 'configs/fcmae_convnext-v2-base_8xb256-800e_in1k.py'))
    assert cfg.model.type == 'FCMAE' and cfg.model.mask_ratio == 0.6
    assert cfg.optim_wrapper.optimizer.betas == (0.9, 0.95)
    assert cfg.optim_wrapper.optimizer.lr == pytest.approx(1.5e-4 * 2048 / 256)
    assert cfg.custom_imports == dict(imports=['convnextv2_fast'],
                                      allow_failed_imports=False)
    pytest.importorskip('mmpretrain')
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    init_default_scope(cfg.default_scope)
    model = MODELS.build(cfg.model)
    n_enc = sum(p.numel() for p in model.backbone.parameters())
    # V2-B backbone (87,694,592) minus its four output norms, which FCMAE lacks
    assert n_enc == 87_694_592 - 2 * (128 + 256 + 512 + 1024)
    assert model.neck.proj.out_channels == 512 and len(model.neck.decoder) == 1
    assert model.neck.pred.out_channels == 32 * 32 * 3


def test_synthetic_config_trains_through_runner(tmp_path):
    pytest.importorskip('mmpretrain')
    from mmengine.config import Config
    from mmengine.runner import Runner

    from convnextv2_fast import ConvNeXtV2Fast
    cfg = Config.fromfile(osp.join(ROOT, 'configs/fcmae_convnext-v2-atto_synthetic.py'))
    cfg.work_dir = str(tmp_path)
    cfg.train_cfg.max_iters = 4
    cfg.param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False)]
    cfg.default_hooks.checkpoint.interval = 4
    runner = Runner.from_cfg(cfg)
    before = copy.deepcopy(runner.model.backbone.state_dict())
    runner.train()
    wd = {}
    params = dict(runner.model.named_parameters())
    for group in runner.optim_wrapper.optimizer.param_groups:
        for p in group['params']:
            wd.update({n: group['weight_decay'] for n, q in params.items() if q is p})
    assert wd['backbone.stages.0.0.grn.gamma'] == 0.
    assert wd['neck.mask_token'] == 0. and wd['backbone.stages.0.0.norm.weight'] == 0.
    assert wd['backbone.stages.0.0.pointwise_conv1.bias'] == 0.
    assert wd['backbone.stages.0.0.pointwise_conv1.weight'] == 0.05
    after = runner.model.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    ckpt = torch.load(osp.join(str(tmp_path), 'iter_4.pth'), map_location='cpu',
                      weights_only=False)
    backbone_sd = {k[len('backbone.'):]: v for k, v in ckpt['state_dict'].items()
                   if k.startswith('backbone.')}
    bb = ConvNeXtV2Fast(arch='atto', use_grn=True, layer_scale_init_value=0.)
    missing, unexpected = bb.load_state_dict(backbone_sd, strict=False)
    assert unexpected == [] and all(k.startswith('norm') for k in missing)
    logs = runner.message_hub.get_scalar('train/loss')
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.data[0])


def test_bf16_autocast_loss_close_to_fp32():
    model = _model(seed=2).eval()
    imgs = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[1., 0, 1, 1], [0, 1, 1, 0]])
    ref = model.loss(imgs, mask=mask)['loss']
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low = model.loss(imgs, mask=mask)['loss']
    low.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.parameters())
    print(f'fp32 {ref.item():.5f} bf16-autocast {low.item():.5f}')
    assert abs(low.item() - ref.item()) < 3e-2 * abs(ref.item())


def test_benchmark_smoke_and_cuda_requirement(tmp_path):
    import importlib.util
    import json
    spec = importlib.util.spec_from_file_location(
        'bench_fcmae', osp.join(ROOT, 'benchmarks', 'bench_fcmae.py'))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / 'runs.json'
    if not torch.cuda.is_available():
        assert bench.main(['--out', str(out)]) == 2   # full run needs CUDA
        assert not out.exists()
    assert bench.main(['--smoke', '--out', str(out), '--modes', 'fwd+bwd',
                       '--providers', 'fast', 'reference']) == 0
    runs = json.loads(out.read_text())
    assert len(runs) == 1
    meta, rows = runs[0]['meta'], runs[0]['rows']
    assert meta['smoke'] is True
    assert {'device', 'torch', 'commit', 'timestamp'} <= set(meta)
    assert [r['provider'] for r in rows] == ['fast', 'reference']
    for r in rows:
        assert r['median_ms'] > 0 and r['img_per_s'] > 0 and 'peak_alloc_gib' in r
    fast = rows[0]
    assert fast['max_err_out'] < 1e-4          # sparse == dense-masked at visible sites
    assert 0 < fast['visible_fraction'] < 1


def test_import_and_fcmae_without_mmpretrain():
    """mmpretrain is optional: import works and FCMAE runs; nothing registered."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['mmpretrain'] = None; sys.modules['mmdet'] = None\n"
            "import torch, convnextv2_fast as c\n"
            "assert c.REGISTRATION['mmpretrain'] == 'not installed', c.REGISTRATION\n"
            "from convnextv2_fast.models.fcmae import FCMAE\n"
            "m = FCMAE(backbone=dict(arch=dict(depths=[1, 1, 1, 1], "
            "channels=[8, 8, 8, 8])), decoder=dict(embed_dim=8))\n"
            "assert torch.isfinite(m.loss(torch.randn(1, 3, 64, 64))['loss'])\n")
    env = dict(__import__('os').environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
