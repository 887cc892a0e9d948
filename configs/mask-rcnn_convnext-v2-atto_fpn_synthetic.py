# Smoke/test variant of mask-rcnn_convnext-v2-b_fpn_lsj-3x-fcmae_coco.py:
# the same model, pipeline, optimiser (AmpOptimWrapper + layer-wise lr decay)
# and schedule shape, with the tiny `atto` arch, 256x256 LSJ crops and a
# generated COCO-format dataset.  Make the data first:
#   python -m convnextv2_fast.data.synthetic_coco --out data/synthetic_coco
# (tests write it to a temporary folder and override data_root).
_base_ = ['./mask-rcnn_convnext-v2-b_fpn_lsj-3x-fcmae_coco.py']

data_root = 'data/synthetic_coco/'
image_size = (256, 256)

model = dict(
    backbone=dict(
        arch='atto',
        drop_path_rate=0.1,
        # no pretrained download in smoke runs
        init_cfg=None),
    neck=dict(in_channels=[40, 80, 160, 320]))

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(
        type='RandomResize',
        scale=image_size,
        ratio_range=(0.1, 2.0),
        keep_ratio=True),
    dict(
        type='RandomCrop',
        crop_type='absolute_range',
        crop_size=image_size,
        recompute_bbox=True,
        allow_negative_crop=True),
    dict(type='FilterAnnotations', min_gt_bbox_wh=(1e-2, 1e-2)),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor'))
]

train_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator

max_epochs = 1
train_cfg = dict(max_epochs=max_epochs, val_interval=1)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=10),
]
# fp16 AMP needs CUDA; on CPU the tests swap in OptimWrapper (same constructor)
default_hooks = dict(checkpoint=dict(max_keep_ckpts=1), logger=dict(interval=1))
