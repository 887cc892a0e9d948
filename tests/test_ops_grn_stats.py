"""The GRN-statistics kernels (convnextv2_fast.ops.grn_stats): forward
(partials of sum u**2 -> S, scale) and backward (S, partials of sum dv*u ->
scale, t, dgamma; S -> the same scale bit for bit) against the fp64 torch
formulas, with the 2x-same-dtype (fp32 torch) rule; at the interpreter's
blocks and the GPU's (partial rows and channels not multiples of any block);
a channel with G = 0 and a sample that is 0 everywhere (mean G = 0);
bit-identical reruns; bad inputs."""
import pytest
import torch

from convnextv2_fast._errors import ArgumentError
from convnextv2_fast.ops import grn_stats as GS
from convnextv2_fast.testing import assert_close_to_ref

from _fused_testutil import GPU_CONFIGS, poisoned_empty, set_gpu_config

CONFIGS = GPU_CONFIGS


@pytest.fixture
def blocks(monkeypatch, gpu_config):
    set_gpu_config(monkeypatch, gpu_config)


def _inputs(N, T, K, seed=0, device='cpu'):
    g = torch.Generator().manual_seed(seed)
    spart = torch.rand(N, T, K, generator=g) * 3
    spart[:, :, 5] = 0.  # a channel with G = 0 in every sample
    spart[N - 1] = 0.  # the last sample is 0 everywhere: D = eps
    rpart = torch.randn(N, T, K, generator=g)
    gamma = torch.randn(K, generator=g)
    return [x.to(device) for x in (spart, rpart, gamma)]


def _check(spart, rpart, gamma, dtype_tag='fp32'):
    with poisoned_empty():
        S, scale = GS.grn_stats_forward(spart, gamma)
        scale_b, t, dgamma = GS.grn_stats_backward(S, rpart, gamma)
        scale_s = GS.grn_scale(S, gamma)  # from the saved sums alone
    d = torch.float64
    S_hi = spart.to(d).sum(1)
    R_hi = rpart.to(d).sum(1)
    hi = dict(S=S_hi, scale=GS.grn_stats_reference(S_hi, gamma.to(d))[3])
    hi.update(zip(('scale_b', 't', 'dgamma'),
                  GS.grn_stats_backward_reference(S_hi, R_hi, gamma.to(d))))
    S_lo = spart.sum(1)
    same = dict(S=S_lo, scale=GS.grn_stats_reference(S_lo, gamma)[3])
    same.update(zip(('scale_b', 't', 'dgamma'),
                    GS.grn_stats_backward_reference(S_lo, rpart.sum(1),
                                                    gamma)))
    cand = dict(S=S, scale=scale, scale_b=scale_b, t=t, dgamma=dgamma)
    for name, c in cand.items():
        assert c.dtype == torch.float32
        assert torch.isfinite(c).all(), name
        assert_close_to_ref(name, c.cpu(), same[name].cpu(),
                            hi[name].cpu().float(), dtype=torch.float32)
    # G = 0: Nx = 0 -> scale 1, t 0 (no 0/0); the zero sample likewise
    assert (scale[:, 5] == 1).all() and (t[:, 5] == 0).all()
    assert (scale[-1] == 1).all() and (t[-1] == 0).all()
    assert torch.equal(scale, scale_b)
    assert torch.equal(scale, scale_s)
    return cand


@pytest.mark.interpreter
@CONFIGS
@pytest.mark.parametrize('N,T,K', [(3, 37, 200), (2, 1, 8), (2, 70, 33)])
def test_grn_stats_parity(blocks, N, T, K):
    _check(*_inputs(N, T, K))


@pytest.mark.interpreter
@CONFIGS
def test_grn_stats_are_bit_reproducible(blocks):
    args = _inputs(2, 130, 96, seed=3)
    first = _check(*args)
    second = _check(*args)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.interpreter
def test_grn_stats_config_covers_every_channel():
    for N, T, K in [(2, 512, 512), (2, 32, 2048), (64, 4, 4096),
                    (2, 3, 11264)]:
        cfg = GS.launch_config(N, T, K, gpu=True)
        assert cfg['KB'] * cfg['BLOCK_K'] >= K > (cfg['KB'] - 1) * cfg[
            'BLOCK_K']
        assert cfg['BLOCK_KB'] >= cfg['KB']
        assert cfg['reduce_grid'] == (N, cfg['KB'])


def test_grn_stats_bad_inputs():
    spart, rpart, gamma = _inputs(2, 4, 16)
    with pytest.raises(TypeError, match='spart'):
        GS.grn_stats_forward(spart.double(), gamma)
    with pytest.raises(ArgumentError, match='grn_gamma'):
        GS.grn_stats_forward(spart, gamma[:3])
    with pytest.raises(ArgumentError, match='S must have shape'):
        GS.grn_stats_backward(torch.ones(3, 16), rpart, gamma)
    with pytest.raises(ArgumentError, match='rpart'):
        GS.grn_stats_backward(torch.ones(2, 16), rpart[0], gamma)


@pytest.mark.gpu
@pytest.mark.parametrize('N,T,K', [(2, 512, 512), (2, 32, 2048),
                                   (3, 70, 1000)])
def test_gpu_grn_stats_parity(N, T, K):
    _check(*_inputs(N, T, K, device='cuda'))
