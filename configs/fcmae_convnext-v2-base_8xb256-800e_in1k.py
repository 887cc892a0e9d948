# FCMAE pretraining of ConvNeXt V2-Base on ImageNet-1k with the sparse encoder
# (convnextv2_fast.SparseConvNeXtV2): 8 GPUs x 256 images, 800 epochs.
# Hyper-parameters of the official facebookresearch/ConvNeXt-V2 recipe:
# mask 0.6 on 32x32 patches, decoder 512-d x 1 block, norm_pix_loss,
# AdamW betas (0.9, 0.95), wd 0.05 (none on 1-D params / biases / mask token),
# lr = 1.5e-4 * total_batch / 256, 40 warm-up epochs then cosine to 0.
custom_imports = dict(imports=['convnextv2_fast'], allow_failed_imports=False)
default_scope = 'mmpretrain'

# -- model ----------------------------------------------------------------------
model = dict(
    type='FCMAE',
    backbone=dict(type='SparseConvNeXtV2', arch='base', patch_size=32,
                  drop_path_rate=0.),
    decoder=dict(embed_dim=512, depth=1),
    mask_ratio=0.6,
    norm_pix_loss=True,
    data_preprocessor=dict(
        type='SelfSupDataPreprocessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        to_rgb=True))

# -- data ------------------------------------------------------------------------
dataset_type = 'ImageNet'  # or 'CustomDataset' for any class-folder tree
data_root = 'data/imagenet/'
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=224, crop_ratio_range=(0.2, 1.0),
         backend='pillow', interpolation='bicubic'),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=256,
    num_workers=8,
    persistent_workers=True,
    pin_memory=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type=dataset_type, data_root=data_root, split='train',
                 pipeline=train_pipeline))

# -- schedule ----------------------------------------------------------------------
num_gpus, batch_per_gpu = 8, 256
base_lr = 1.5e-4
lr = base_lr * num_gpus * batch_per_gpu / 256
optim_wrapper = dict(
    type='AmpOptimWrapper',
    loss_scale='dynamic',
    optimizer=dict(type='AdamW', lr=lr, betas=(0.9, 0.95), weight_decay=0.05),
    paramwise_cfg=dict(
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        custom_keys={
            'mask_token': dict(decay_mult=0.),
            '.grn.': dict(decay_mult=0.),
        }))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-4, by_epoch=True, begin=0, end=40,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=760, eta_min=0., by_epoch=True,
         begin=40, end=800, convert_to_iter_based=True),
]
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=800)
auto_scale_lr = dict(base_batch_size=num_gpus * batch_per_gpu)

# -- runtime ------------------------------------------------------------------------
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=100),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=3),
    sampler_seed=dict(type='DistSamplerSeedHook'),
)
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork'),
               dist_cfg=dict(backend='nccl'))
log_processor = dict(window_size=10, by_epoch=True)
log_level = 'INFO'
load_from = None
resume = True
randomness = dict(seed=0, diff_rank_seed=True)
