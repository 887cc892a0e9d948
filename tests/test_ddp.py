"""DDP smoke test: 2 CPU processes (gloo) give the single-process gradients."""
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from convnextv2_fast import ConvNeXtV2Fast
from convnextv2_fast.testing import max_abs_err, randomize_

KWARGS = dict(arch=dict(depths=[1, 1], channels=[16, 32]), out_indices=[0, 1],
              use_grn=True, layer_scale_init_value=0., impl='reference')


def _model():
    return randomize_(ConvNeXtV2Fast(**KWARGS), seed=3)


def _batch():
    gen = torch.Generator().manual_seed(4)
    return torch.randn(4, 3, 40, 56, generator=gen)


def _loss(outs):
    # mean over samples, so the DDP average of per-rank means is the full mean
    return sum(o.pow(2).flatten(1).sum(1).mean() for o in outs)


def _worker(rank, world, init_file, out_file):
    dist.init_process_group('gloo', init_method=f'file://{init_file}',
                            rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = torch.nn.parallel.DistributedDataParallel(_model())
    x = _batch().chunk(world)[rank]
    _loss(model(x)).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.module.named_parameters()},
                   out_file)
    dist.destroy_process_group()


def test_ddp_gloo_gradients_equal_single_process():
    model = _model()
    _loss(model(_batch())).backward()
    single = {n: p.grad for n, p in model.named_parameters()}
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, 'init')
        out_file = os.path.join(tmp, 'grads.pt')
        mp.spawn(_worker, args=(2, init_file, out_file), nprocs=2, join=True)
        ddp = torch.load(out_file)
    assert set(ddp) == set(single)
    worst = max((max_abs_err(ddp[n], single[n]) /
                 (1e-3 + single[n].abs().max().item()), n) for n in single)
    print(f'worst relative grad difference DDP vs single: {worst}')
    assert worst[0] < 1e-5
