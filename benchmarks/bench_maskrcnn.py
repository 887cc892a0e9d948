"""Full Mask R-CNN training: mmpretrain.ConvNeXt vs ConvNeXtV2Fast backbones.

Builds the seed config (`configs/mask-rcnn_convnext-v2-b_fpn_lsj-3x-fcmae_coco.py`;
`--smoke`: the synthetic atto config) twice — backbone ``mmpretrain.ConvNeXt``
(reference) and ``ConvNeXtV2Fast`` (fast) — with identical weights and
drop_path_rate 0, and trains ``--warmup`` + ``--iters`` iterations each
through mmengine's real machinery: the config's optimizer wrapper
(``AmpOptimWrapper`` with fp16 or bf16 autocast on CUDA; plain
``OptimWrapper`` on CPU), mmdet's ``LearningRateDecayOptimizerConstructor``
and ``model.train_step``, on a synthetic COCO dataset generated on the fly and
loaded through the real LSJ pipeline.  ``--fixed-batch`` pre-collates the
batches once so the data loader is out of the timing (both backbones then
see exactly the same batches).

Reports per run: median s/iter, img/s, peak allocated/reserved GPU memory, the
backbone's share of the iteration (CUDA events from hooks around the
backbone's forward and backward), and the losses of both runs side by side.

Multi-GPU: run under ``torchrun --nproc_per_node=G`` (rank 0 reports); untested
here, where only single-GPU machines were available.
"""
import argparse
import copy
import os
import statistics
import tempfile
import time
from typing import List

import torch

from benchmarks import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED_CONFIG = os.path.join(
    ROOT, 'configs', 'mask-rcnn_convnext-v2-b_fpn_lsj-3x-fcmae_coco.py')
SMOKE_CONFIG = os.path.join(
    ROOT, 'configs', 'mask-rcnn_convnext-v2-atto_fpn_synthetic.py')
BACKBONES = {'reference': 'mmpretrain.ConvNeXt', 'fast': 'ConvNeXtV2Fast'}
DTYPES = {'fp16': 'float16', 'bf16': 'bfloat16', 'fp32': None}


def _require_mm():
    missing = []
    for name in ('mmcv', 'mmdet', 'mmpretrain', 'pycocotools'):
        try:
            __import__(name)
        except Exception as exc:
            missing.append(f'{name} ({type(exc).__name__}: {exc})')
    if missing:
        raise RuntimeError(
            'the Mask R-CNN benchmark needs ' + ', '.join(missing) +
            '; install them (tools/setup_env.sh, or on a GPU machine '
            'tools/gpu_check.sh with a wheel folder)')


def build_cfg(provider, smoke, batch, dtype, data_root, device):
    from mmengine.config import Config
    cfg = Config.fromfile(SMOKE_CONFIG if smoke else SEED_CONFIG)
    bb = cfg.model.backbone
    bb.type = BACKBONES[provider]
    if provider == 'reference':
        bb.pop('impl', None)
    bb.init_cfg = None  # identical random weights are copied in instead
    bb.drop_path_rate = 0.  # so both runs are comparable step by step
    for loader in (cfg.train_dataloader, ):
        loader.dataset.data_root = data_root
        loader.batch_size = batch
        loader.num_workers = 0 if smoke else min(8, os.cpu_count() or 1)
        loader.persistent_workers = False
    if device.type == 'cuda' and DTYPES[dtype]:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.dtype = DTYPES[dtype]
    else:
        cfg.optim_wrapper.type = 'OptimWrapper'  # AMP needs CUDA
    return cfg


class BackboneTimer:
    """Events around the backbone's forward and backward.

    Forward: module pre/post hooks.  Backward start: the module's backward
    pre-hook (all output gradients available).  Backward end: the image input
    needs no gradient, so a module backward hook would fire too early; the
    end is marked by post-accumulate-grad hooks on the stem's parameters,
    whose gradients are the last the backbone produces.
    """

    def __init__(self, module, device):
        self.device, self.marks = device, {}
        stem = [p for p in module.downsample_layers[0].parameters()
                if p.requires_grad] or [p for p in module.parameters()
                                        if p.requires_grad]
        self.handles = [
            module.register_forward_pre_hook(lambda *a: self._mark('f0')),
            module.register_forward_hook(lambda *a: self._mark('f1')),
            module.register_full_backward_pre_hook(
                lambda *a: self._mark('b0')),
        ] + [p.register_post_accumulate_grad_hook(lambda *a: self._mark('b1'))
             for p in stem]

    def _mark(self, name):
        if self.device.type == 'cuda':
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks[name] = ev
        else:
            self.marks[name] = time.perf_counter()

    def collect(self):
        """Backbone fwd+bwd ms of the last iteration (call after a sync)."""
        m = self.marks
        if not {'f0', 'f1', 'b0', 'b1'} <= set(m):
            return None
        if self.device.type == 'cuda':
            ms = m['f0'].elapsed_time(m['f1']) + m['b0'].elapsed_time(m['b1'])
        else:
            ms = (m['f1'] - m['f0'] + m['b1'] - m['b0']) * 1e3
        self.marks = {}
        return ms

    def remove(self):
        for h in self.handles:
            h.remove()


def train_run(cfg, state_dict, batches, loader, warmup, iters, device, seed):
    """Build model + optim wrapper from ``cfg`` and train; return metrics."""
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    from mmdet.registry import MODELS
    model = MODELS.build(cfg.model)
    model.load_state_dict(state_dict, strict=True)
    model.to(device).train()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from mmengine.model import MMDistributedDataParallel
        model = MMDistributedDataParallel(model, device_ids=[device.index])
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    net = getattr(model, 'module', model)
    timer = BackboneTimer(net.backbone, device)
    torch.manual_seed(seed)
    source = iter(batches) if batches is not None else iter(loader)
    losses, step_ms, backbone_ms = [], [], []
    out = {}
    for i in range(warmup + iters):
        if i == warmup:
            with common.peak_memory(device, {}):
                pass  # reset peak stats before the timed iterations
        data = next(source)
        common.synchronize(device)
        t0 = time.perf_counter()
        log_vars = model.train_step(data, optim_wrapper)
        common.synchronize(device)
        dt = (time.perf_counter() - t0) * 1e3
        losses.append(
            round(float(torch.as_tensor(log_vars['loss']).detach()), 5))
        bb = timer.collect()
        if i >= warmup:
            step_ms.append(dt)
            if bb is not None:
                backbone_ms.append(bb)
    if device.type == 'cuda':
        out['peak_alloc_gib'] = torch.cuda.max_memory_allocated() / 2**30
        out['peak_reserved_gib'] = torch.cuda.max_memory_reserved() / 2**30
    timer.remove()
    s_iter = statistics.median(step_ms) / 1e3
    out.update(s_per_iter=s_iter,
               img_per_s=cfg.train_dataloader.batch_size / s_iter,
               backbone_share=(statistics.median(backbone_ms) / 1e3 / s_iter)
               if backbone_ms else None,
               losses=losses)
    del model, optim_wrapper
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    return out


def make_data(smoke, tmp):
    from convnextv2_fast.data.synthetic_coco import make_synthetic_coco
    root = os.path.join(tmp, 'coco') + '/'
    if smoke:
        make_synthetic_coco(root, num_train=6, num_val=0, size=(320, 256))
    else:  # COCO-like sizes; LSJ rescales to 1024 crops
        make_synthetic_coco(root, num_train=48, num_val=0, size=(640, 480),
                            instances=(4, 12), num_classes=80)
    return root


def _quiet_mmengine():
    """mmengine/mmdet log every param group at INFO; keep benchmark output
    readable."""
    import logging

    from mmengine.logging import MMLogger
    name = 'convnextv2_fast-bench'
    if not MMLogger.check_instance_created(name):
        MMLogger.get_instance(name, log_level='WARNING')
    else:  # make it the current instance again
        MMLogger.get_instance(name)
    logging.getLogger('mmengine').setLevel(logging.WARNING)


def run(smoke, device, batches=(2, 4), dtypes=('fp16', 'bf16'), warmup=3,
        iters=10, fixed_batch=False, providers=('reference', 'fast'),
        seed=0, progress=None) -> List[dict]:
    _require_mm()
    _quiet_mmengine()
    for p in providers:
        if p not in BACKBONES:
            raise ValueError(f'provider must be one of {sorted(BACKBONES)}, '
                             f'got {p!r}')
    if not batches or min(batches) < 1:
        raise ValueError(f'batch sizes must be >= 1, got {batches}')
    from mmengine.runner import Runner
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_root = make_data(smoke, tmp)
        for batch in batches:
            for dtype in dtypes:
                cfgs = {p: build_cfg(p, smoke, batch, dtype, data_root, device)
                        for p in providers}
                # identical weights: one random init, copied into both runs
                from mmengine.registry import init_default_scope
                init_default_scope('mmdet')
                from mmdet.registry import MODELS
                torch.manual_seed(seed)
                ref_model = MODELS.build(cfgs[providers[0]].model)
                ref_model.init_weights()
                from convnextv2_fast.testing import randomize_
                randomize_(ref_model.backbone, seed, std=0.02)
                state = copy.deepcopy(ref_model.state_dict())
                del ref_model
                need = warmup + iters
                fixed = None
                if fixed_batch:
                    loader = Runner.build_dataloader(
                        cfgs[providers[0]].train_dataloader, seed=seed)
                    it = _cycle(loader)
                    fixed = [next(it) for _ in range(need)]
                results = {}
                for p in providers:
                    loader = None if fixed_batch else _cycle(
                        Runner.build_dataloader(cfgs[p].train_dataloader,
                                                seed=seed))
                    results[p] = train_run(cfgs[p], state, fixed, loader,
                                           warmup, iters, device, seed)
                ref_losses = results.get('reference', {}).get('losses')
                for p, r in results.items():
                    row = dict(bench='maskrcnn', arch='atto-smoke' if smoke
                               else 'base', batch=batch, H=256 if smoke else
                               1024, dtype=dtype if device.type == 'cuda'
                               else 'fp32', provider=p, backbone=BACKBONES[p],
                               fixed_batch=fixed_batch, warmup=warmup,
                               iters=iters, **r)
                    if ref_losses and p != 'reference':
                        row['max_loss_diff_vs_reference'] = max(
                            abs(a - b) for a, b in zip(ref_losses, r['losses']))
                    rows.append(row)
                    if progress:
                        progress(row)
    common.add_speedups(rows, key=('batch', 'dtype'), time_col='s_per_iter')
    return rows


def _cycle(loader):
    while True:
        for data in loader:
            yield data


COLUMNS = ['arch', 'batch', 'H', 'dtype', 'provider', 's_per_iter',
           'img_per_s', 'speedup_vs_reference', 'peak_alloc_gib',
           'peak_reserved_gib', 'backbone_share',
           'max_loss_diff_vs_reference', 'losses']


def run_suite(smoke: bool, device: torch.device, providers, progress=None):
    """Entry used by benchmarks/run.py (the compile provider does not apply:
    mmdet trains eagerly)."""
    providers = [p for p in providers if p in BACKBONES] or list(BACKBONES)
    if smoke:
        return run(True, device, batches=(2, ), dtypes=('fp32', ) if
                   device.type != 'cuda' else ('fp16', ), warmup=0, iters=2,
                   fixed_batch=True, providers=providers, progress=progress)
    return run(False, device, providers=providers, progress=progress,
               **common.iteration_budget(smoke))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--smoke', action='store_true')
    parser.add_argument('--batch', type=int, nargs='+', default=[2, 4])
    parser.add_argument('--dtype', nargs='+', default=['fp16', 'bf16'],
                        choices=sorted(DTYPES))
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--iters', type=int, default=10)
    parser.add_argument('--fixed-batch', action='store_true')
    parser.add_argument('--providers', nargs='+', default=list(BACKBONES),
                        choices=sorted(BACKBONES))
    parser.add_argument('--out', default=None)
    args = parser.parse_args(argv)
    if min(args.batch) < 1:
        parser.error('--batch must be >= 1')
    if 'LOCAL_RANK' in os.environ:  # torchrun
        from mmengine.dist import init_dist
        init_dist('pytorch')
    device = torch.device('cuda', torch.cuda.current_device()) \
        if torch.cuda.is_available() else torch.device('cpu')
    rows = run(args.smoke, device, tuple(args.batch), tuple(args.dtype),
               args.warmup, args.iters, args.fixed_batch, args.providers)
    rank = int(os.environ.get('RANK', 0))
    if rank == 0:
        print(common.markdown_table(rows, COLUMNS))
        meta = common.env_metadata(device)
        meta.update(world_size=int(os.environ.get('WORLD_SIZE', 1)),
                    smoke=args.smoke)
        print(common.append_results(args.out or common.results_path(device),
                                    meta, rows))


if __name__ == '__main__':
    main()
