"""mmpretrain integration: ConvNeXtV2Fast inside an ImageClassifier config."""
import pytest
import torch

pytest.importorskip('mmpretrain', reason='mmpretrain not installed')

from mmengine.registry import init_default_scope  # noqa: E402

import convnextv2_fast  # noqa: E402,F401  (registers, like custom_imports)


def test_image_classifier_with_our_backbone_trains():
    init_default_scope('mmpretrain')
    from mmpretrain.registry import MODELS
    from mmpretrain.structures import DataSample
    cfg = dict(
        type='ImageClassifier',
        backbone=dict(type='ConvNeXtV2Fast', arch='atto', use_grn=True,
                      layer_scale_init_value=0., drop_path_rate=0.1),
        head=dict(type='LinearClsHead', num_classes=10, in_channels=320,
                  loss=dict(type='CrossEntropyLoss', loss_weight=1.0)),
        data_preprocessor=dict(type='ClsDataPreprocessor', num_classes=10))
    model = MODELS.build(cfg)
    model.init_weights()
    assert type(model.backbone).__name__ == 'ConvNeXtV2Fast'
    imgs = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    samples = [DataSample().set_gt_label(i) for i in (1, 7)]
    data = model.data_preprocessor(dict(inputs=list(imgs),
                                        data_samples=samples), True)
    losses = model(**data, mode='loss')
    losses['loss'].backward()
    assert torch.isfinite(losses['loss'])
    grad = model.backbone.stages[0][0].pointwise_conv1.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        preds = model(**data, mode='predict')
    assert preds[0].pred_score.shape == (10, )
