# Smoke variant of the FCMAE recipe: atto encoder, small decoder, an in-memory
# synthetic dataset (convnextv2_fast SyntheticImageDataset, 64x64 images) and a
# few iterations in fp32 — trains on CPU through mmengine's Runner
# (tests/test_fcmae.py runs it).
_base_ = './fcmae_convnext-v2-base_8xb256-800e_in1k.py'

model = dict(
    backbone=dict(arch='atto'),
    decoder=dict(embed_dim=64, depth=1))

train_dataloader = dict(
    _delete_=True,
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type='SyntheticImageDataset', num_samples=8, img_size=64))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0,
                       custom_keys={'mask_token': dict(decay_mult=0.),
                                    '.grn.': dict(decay_mult=0.)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=2),
    dict(type='CosineAnnealingLR', T_max=4, by_epoch=False, begin=2, end=6),
]
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=6)
auto_scale_lr = dict(base_batch_size=4)
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=1),
    checkpoint=dict(type='CheckpointHook', interval=6, by_epoch=False,
                    max_keep_ckpts=1))
log_processor = dict(window_size=1, by_epoch=False)
env_cfg = dict(dist_cfg=dict(backend='gloo'))
resume = False
