"""GRN statistics: the per-sample (N, K) math between the block's GEMMs, two
launches each way.

The GRN's global reductions come out of the big kernels as per-tile fp32
partials (N, T, K) (T pixel tiles per sample: ``gelu_sumsq``/``pw1`` emit
``sum_p u**2``, ``grn_bwd_reduce``/``dv`` emit ``sum_p dv * u``).  What
follows them is tiny (N x K values) but was ~8 torch ops forward and ~24
backward, each a kernel launch of a few microseconds -- at stage 3 of a V2-B
Mask R-CNN backbone more time than the GELU/GRN pass itself.  Here:

Forward, from the partials of ``S = sum_p u**2``:

- ``_grn_reduce_kernel`` (grid (N, K blocks)): ``S`` = the fixed-order sum
  of the partials; per-block partial sums of ``G = sqrt(S)``.
- ``_grn_scale_kernel`` (grid (K blocks,)): ``D = mean_k G + eps`` from the
  block partials (fixed order), ``scale = 1 + gamma * G / D``.

Backward, from ``S`` (saved) and the partials of ``R = sum_p dv * u``:

- ``_grn_reduce_kernel`` (``BWD``): ``R``; per-block partial sums of ``G``
  and of ``gamma * R * G``.
- ``_grn_scale_kernel`` (``BWD``): ``scale``, ``t`` with ``du = dv * scale +
  u * t`` (``t = dG / G``, 0 where ``G = 0``: no 0/0) and ``dgamma =
  sum_n R * G / D`` (each program loops over the samples: fixed order).

Everything is fp32, with IEEE sqrt and division (``sqrt_rn``/``div_rn``, as
torch); every sum has a fixed order (no atomics: bit-reproducible).  The
torch formulas are :func:`grn_stats_reference` /
:func:`grn_stats_backward_reference` (the tests' reference).
"""
import torch
import triton
import triton.language as tl

from ._common import check_same_device, check_tensor, next_pow2, use_gpu_config
from .reference import GRN_EPS

_F32 = (torch.float32, )


@triton.jit
def _grn_reduce_kernel(
        PART,  # (N, T, K) fp32 per-tile partials (u**2 fwd, dv * u bwd)
        S,  # (N, K) fp32: out (fwd) sum of u**2; in (BWD)
        R,  # (N, K) fp32 out (BWD): sum_p dv * u
        GAMMA,  # (K,) GRN gamma (BWD)
        GP,  # (N, KB) fp32 out: per-block sum_k sqrt(S)
        AP,  # (N, KB) fp32 out (BWD): per-block sum_k gamma R sqrt(S)
        T, K,
        BWD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    kb = tl.program_id(1)
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = k < K
    tt = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    ptrs = PART + n * T * K + tt[:, None] * K + k[None, :]
    for t0 in range(0, T, BLOCK_T):
        m = ((t0 + tt) < T)[:, None] & kmask[None, :]
        acc += tl.load(ptrs, mask=m, other=0.)
        ptrs += BLOCK_T * K
    x = tl.sum(acc, axis=0)
    nk = n * K + k
    gp = GP + n * tl.num_programs(1) + kb
    if BWD:
        tl.store(R + nk, x, mask=kmask)
        g = tl.sqrt_rn(tl.load(S + nk, mask=kmask, other=0.))
        gam = tl.load(GAMMA + k, mask=kmask, other=0.).to(tl.float32)
        tl.store(AP + n * tl.num_programs(1) + kb, tl.sum(gam * x * g, axis=0))
    else:
        tl.store(S + nk, x, mask=kmask)
        g = tl.sqrt_rn(x)
    tl.store(gp, tl.sum(g, axis=0))


@triton.jit
def _grn_scale_kernel(
        S,  # (N, K) fp32 sums of u**2
        R,  # (N, K) fp32 sum_p dv * u (BWD)
        GAMMA,  # (K,) GRN gamma
        GP,  # (N, KB) fp32 per-block sum_k sqrt(S)
        AP,  # (N, KB) fp32 per-block sum_k gamma R sqrt(S) (BWD)
        SCALE,  # (N, K) fp32 out: 1 + gamma * Nx
        TOUT,  # (N, K) fp32 out (BWD): dG / G (0 where G = 0)
        DGAMMA,  # (K,) fp32 out (BWD): sum_n R * Nx
        N, K, KB, eps,
        BWD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KB: tl.constexpr):
    kb = tl.program_id(0)
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = k < K
    j = tl.arange(0, BLOCK_KB)
    jmask = j < KB
    gam = tl.load(GAMMA + k, mask=kmask, other=0.).to(tl.float32)
    dgam = tl.zeros((BLOCK_K, ), dtype=tl.float32)
    for n in range(N):
        nk = n * K + k
        d = tl.sum(tl.load(GP + n * KB + j, mask=jmask, other=0.), axis=0)
        d = tl.div_rn(d, K * 1.) + eps
        g = tl.sqrt_rn(tl.load(S + nk, mask=kmask, other=0.))
        nx = tl.div_rn(g, d + tl.zeros_like(g))
        tl.store(SCALE + nk, 1. + gam * nx, mask=kmask)
        if BWD:
            a = tl.sum(tl.load(AP + n * KB + j, mask=jmask, other=0.), axis=0)
            r = tl.load(R + nk, mask=kmask, other=0.)
            dgam += r * nx
            # dG = gamma R / D - (sum_k gamma R G) / (D^2 K)
            dg = tl.div_rn(gam * r, d + tl.zeros_like(g)) - tl.div_rn(
                a, d * d * K)
            safe = g > 0.
            t = tl.where(safe, tl.div_rn(dg, tl.where(safe, g, 1.)), 0.)
            tl.store(TOUT + nk, t, mask=kmask)
    if BWD:
        tl.store(DGAMMA + k, dgam, mask=kmask)


def launch_config(N: int, T: int, K: int, gpu: bool = None) -> dict:
    """Blocks and grids of both kernels (one source for the host and the
    instruments).  GPU: 32-channel blocks (K = 512 at V2-B stage 1 gives 16
    column blocks x N reduce programs, each row of a [64, 32] tile 128 B),
    64 partial rows per load; interpreter: whole small tiles."""
    if gpu is None:
        gpu = use_gpu_config()
    if gpu:
        BLOCK_K, BLOCK_T = min(32, next_pow2(K)), 64
    else:
        BLOCK_K, BLOCK_T = min(64, next_pow2(K)), min(16, next_pow2(T))
    KB = triton.cdiv(K, BLOCK_K)
    return dict(BLOCK_K=BLOCK_K, BLOCK_T=BLOCK_T, KB=KB,
                BLOCK_KB=next_pow2(KB), reduce_grid=(N, KB), scale_grid=(KB, ),
                num_warps=4)


def _check(part, name, gamma, S=None):
    check_tensor(part, name, ndim=3, dtypes=_F32)
    N, _, K = part.shape
    check_tensor(gamma, 'grn_gamma', shape=(K, ), contiguous=True)
    pairs = [(name, part), ('grn_gamma', gamma)]
    if S is not None:
        check_tensor(S, 'S', shape=(N, K), dtypes=_F32)
        pairs.append(('S', S))
    check_same_device(pairs)


def _run(part, gamma, eps, S=None):
    N, T, K = part.shape
    bwd = S is not None
    cfg = launch_config(N, T, K)
    dev = part.device
    f32 = dict(device=dev, dtype=torch.float32)
    if S is None:
        S = torch.empty((N, K), **f32)
    R = torch.empty((N, K) if bwd else (1, ), **f32)
    gp = torch.empty((N, cfg['KB']), **f32)
    ap = torch.empty((N, cfg['KB']) if bwd else (1, ), **f32)
    _grn_reduce_kernel[cfg['reduce_grid']](
        part, S, R, gamma, gp, ap, T, K, BWD=bwd, BLOCK_T=cfg['BLOCK_T'],
        BLOCK_K=cfg['BLOCK_K'], num_warps=cfg['num_warps'])
    scale = torch.empty((N, K), **f32)
    t = torch.empty((N, K) if bwd else (1, ), **f32)
    dgamma = torch.empty((K, ) if bwd else (1, ), **f32)
    _grn_scale_kernel[cfg['scale_grid']](
        S, R, gamma, gp, ap, scale, t, dgamma, N, K, cfg['KB'], float(eps),
        BWD=bwd, BLOCK_K=cfg['BLOCK_K'], BLOCK_KB=cfg['BLOCK_KB'],
        num_warps=cfg['num_warps'])
    return S, scale, t, dgamma


def grn_stats_forward(spart, gamma, eps=GRN_EPS):
    """From (N, T, K) fp32 per-tile partials of ``sum_p u**2``: ``(S, scale)``
    (N, K) fp32, ``S`` the sums (saved for the backward), ``scale = 1 +
    gamma * G / (mean_k G + eps)`` with ``G = sqrt(S)``."""
    _check(spart, 'spart', gamma)
    S, scale, _, _ = _run(spart, gamma.detach(), eps)
    return S, scale


def grn_scale(S, gamma, eps=GRN_EPS):
    """The forward's ``scale`` (N, K) fp32 again from the saved sums ``S``
    (N, K): the same two kernels on S as a single tile of partials, so it is
    bit-identical to :func:`grn_stats_forward`'s."""
    check_tensor(S, 'S', ndim=2, dtypes=_F32)
    return grn_stats_forward(S[:, None, :], gamma, eps)[1]


def grn_stats_backward(S, rpart, gamma, eps=GRN_EPS):
    """From ``S`` (N, K) and (N, T, K) fp32 per-tile partials of ``R =
    sum_p dv * u``: ``(scale, t, dgamma)`` fp32 with ``du = dv * scale +
    u * t`` (``t = 0`` where ``G = 0``) and ``dgamma = sum_n R * Nx``."""
    _check(rpart, 'rpart', gamma, S)
    _, scale, t, dgamma = _run(rpart, gamma.detach(), eps, S=S)
    return scale, t, dgamma


# --------------------------------------------------------------------------
# references (torch, the tests' ground truth)
# --------------------------------------------------------------------------
def grn_stats_reference(S, gamma, eps=GRN_EPS):
    """(N, K) sums of squares -> ``(G, D, Nx, scale)`` in S's dtype."""
    G = S.sqrt()
    D = G.mean(dim=1, keepdim=True) + eps
    Nx = G / D
    scale = 1. + gamma.detach().to(S.dtype)[None, :] * Nx
    return G, D, Nx, scale


def grn_stats_backward_reference(S, R, gamma, eps=GRN_EPS):
    """``(scale, t, dgamma)`` of :func:`grn_stats_backward` from ``S`` and
    ``R = sum_p dv * u`` (N, K)."""
    G, D, Nx, scale = grn_stats_reference(S, gamma, eps)
    K = G.shape[1]
    gam = gamma.detach().to(S.dtype)[None, :]
    dgamma = (R * Nx).sum(0)
    dNx = gam * R
    dG = dNx / D - (dNx * G).sum(1, keepdim=True) / (D * D * K)
    safe = G > 0
    t = torch.where(safe, dG / torch.where(safe, G, torch.ones_like(G)),
                    torch.zeros_like(G))
    return scale, t, dgamma
