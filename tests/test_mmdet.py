"""mmdet integration: the synthetic Mask R-CNN config trains and infers on CPU,
and mmdet's layer-wise lr-decay constructor treats ConvNeXtV2Fast exactly like
mmpretrain.ConvNeXt."""
import copy
import math
import os

import pytest
import torch

pytest.importorskip('mmdet', reason='mmdet not installed')
pytest.importorskip('mmpretrain', reason='mmpretrain not installed')

from mmengine.config import Config  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from convnextv2_fast.data.synthetic_coco import make_synthetic_coco  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED_CONFIG = os.path.join(
    ROOT, 'configs', 'mask-rcnn_convnext-v2-b_fpn_lsj-3x-fcmae_coco.py')
SYNTHETIC_CONFIG = os.path.join(
    ROOT, 'configs', 'mask-rcnn_convnext-v2-atto_fpn_synthetic.py')


def synthetic_cfg(tmp_path, **backbone):
    """The synthetic config on a freshly generated dataset, CPU-ready."""
    data_root = str(tmp_path / 'coco') + '/'
    make_synthetic_coco(data_root, num_train=4, num_val=1, size=(320, 256))
    cfg = Config.fromfile(SYNTHETIC_CONFIG)
    for loader in (cfg.train_dataloader, cfg.val_dataloader,
                   cfg.test_dataloader):
        loader.dataset.data_root = data_root
    for evaluator in (cfg.val_evaluator, cfg.test_evaluator):
        evaluator.ann_file = data_root + 'annotations/instances_val2017.json'
    cfg.optim_wrapper.type = 'OptimWrapper'  # AmpOptimWrapper needs CUDA
    cfg.model.backbone.update(backbone)
    cfg.work_dir = str(tmp_path / 'work')
    return cfg


def test_seed_config_matches_contract():
    cfg = Config.fromfile(SEED_CONFIG)
    bb = cfg.model.backbone
    assert bb.type == 'ConvNeXtV2Fast' and bb.arch == 'base'
    assert bb.out_indices == [0, 1, 2, 3] and bb.drop_path_rate == 0.4
    assert bb.layer_scale_init_value == 0. and bb.use_grn
    assert not bb.gap_before_final_norm
    assert bb.init_cfg.prefix == 'backbone.'
    assert bb.init_cfg.checkpoint.endswith(
        'convnext-v2-base_3rdparty-fcmae_in1k_20230104-8a798eaf.pth')
    assert cfg.custom_imports.imports == ['convnextv2_fast']
    assert cfg.model.neck.in_channels == [128, 256, 512, 1024]
    assert cfg.model.test_cfg.rcnn.nms.type == 'soft_nms'
    assert cfg.train_dataloader.batch_size == 4
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    assert (cfg.optim_wrapper.constructor ==
            'LearningRateDecayOptimizerConstructor')
    assert cfg.optim_wrapper.paramwise_cfg == dict(
        decay_rate=0.95, decay_type='layer_wise', num_layers=12)
    assert cfg.optim_wrapper.optimizer == dict(
        type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05)
    steps = [t.type for t in cfg.train_pipeline]
    assert steps == ['LoadImageFromFile', 'LoadAnnotations', 'RandomResize',
                     'RandomCrop', 'FilterAnnotations', 'RandomFlip',
                     'PackDetInputs']
    assert cfg.train_cfg.max_epochs == 36


def test_train_two_iterations_and_infer(tmp_path):
    cfg = synthetic_cfg(tmp_path)
    init_default_scope('mmdet')
    from mmdet.registry import MODELS
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    assert type(model.backbone).__name__ == 'ConvNeXtV2Fast'
    loader = Runner.build_dataloader(cfg.train_dataloader, seed=0)
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    before = {n: p.detach().clone()
              for n, p in model.backbone.named_parameters()}
    model.train()
    batches = iter(loader)
    for _ in range(2):
        log_vars = model.train_step(next(batches), optim_wrapper)
        print({k: round(float(v), 4) for k, v in log_vars.items()})
        assert math.isfinite(float(log_vars['loss']))
        assert {'loss_rpn_cls', 'loss_cls', 'loss_bbox', 'loss_mask'
                } <= set(log_vars)
    # every backbone parameter received a gradient and was updated
    unchanged = [n for n, p in model.backbone.named_parameters()
                 if torch.equal(p.detach(), before[n])]
    assert not unchanged, f'no update reached: {unchanged[:5]}'
    model.eval()
    val_loader = Runner.build_dataloader(cfg.val_dataloader, seed=0)
    with torch.no_grad():
        results = model.test_step(next(iter(val_loader)))
    pred = results[0].pred_instances
    assert {'bboxes', 'scores', 'labels', 'masks'} <= set(pred.keys())


def test_runner_end_to_end(tmp_path):
    """The synthetic config through mmengine's Runner: 2 iterations + COCO val."""
    cfg = synthetic_cfg(tmp_path)
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=2,
                         val_interval=2)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=2,
                                        by_epoch=False)
    cfg.log_processor = dict(by_epoch=False)
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert runner.iter == 2
    assert os.path.exists(os.path.join(cfg.work_dir, 'iter_2.pth'))


def _groups(cfg_model, optim_cfg):
    init_default_scope('mmdet')
    from mmdet.registry import MODELS
    model = MODELS.build(cfg_model)
    names = {id(p): n for n, p in model.named_parameters()}
    wrapper = build_optim_wrapper(model, optim_cfg)
    groups = []
    for g in wrapper.optimizer.param_groups:
        groups.append((tuple(sorted(names[id(p)] for p in g['params'])),
                       g['lr'], g['weight_decay'], g.get('lr_scale')))
    return sorted(groups)


def test_layer_decay_groups_equal_mmpretrain(tmp_path):
    cfg = Config.fromfile(SEED_CONFIG)
    optim_cfg = copy.deepcopy(cfg.optim_wrapper)
    optim_cfg.type = 'OptimWrapper'
    base = copy.deepcopy(cfg.model)
    # base-sized model, no checkpoint download
    base.backbone.init_cfg = None
    ours = _groups(base, optim_cfg)
    ref_model = copy.deepcopy(base)
    ref_model.backbone.type = 'mmpretrain.ConvNeXt'
    ref_model.backbone.pop('impl')
    ref = _groups(ref_model, optim_cfg)
    assert ours == ref
    # sanity: the constructor really decayed (many distinct lr scales) and
    # GRN/bias/norm params got no weight decay
    assert len({g[3] for g in ours}) == 14
    no_wd = {n for g in ours if g[2] == 0 for n in g[0]}
    assert 'backbone.stages.2.5.grn.gamma' in no_wd
    assert 'backbone.stages.2.5.pointwise_conv1.bias' in no_wd
