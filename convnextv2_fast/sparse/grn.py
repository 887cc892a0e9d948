"""GRN over the visible rows of each sample (FCMAE sparse encoder).

Per sample ``n`` and hidden channel ``k``: ``G[n,k] = ||u[rows of n, k]||_2``
(no eps inside the root: the dense backbone formula, so the pretrained weights
mean the same thing in the dense fine-tuning backbone; masked sites are zero in
the dense-masked view, so this equals the dense GRN of the masked map),
``N = G / (mean_k G + eps)`` with ``eps = 1e-6`` outside the root as in
``mmpretrain`` / the dense backbone, ``out = u * (1 + gamma * N) + beta``.
The official JAX FCMAE puts its eps inside the root (``sqrt(sum u^2 + eps)``);
the difference is below fp32 resolution for any non-degenerate channel.  The
norm's gradient at ``G = 0`` is taken as 0 (``torch.norm``'s convention).

Statistics are per SAMPLE over its visible rows, not over the batch (the
MinkowskiEngine implementation normalises over the whole batch, ConvNeXt-V2
issue #86).  Reductions, the scale and the backward's per-(sample, channel)
terms run in fp32 (fp64 for fp64 ``u``), as the dense reference under autocast;
the output and ``du`` are in ``u``'s dtype.  When every sample has the same
number of visible rows (always the case for FCMAE's fixed ``len_keep``) the
per-sample sums are a reshape + ``sum``; otherwise an ``index_add`` by sample.

Host forward / backward (the sum of squares ``S = sum_p u^2``, ``G = sqrt(S)``
and a hand-written backward, saving only ``u`` and the (N, K) statistics)
instead of autograd through ``torch.linalg.vector_norm``: on CPU that norm
(a strided reduction over the row axis) took 0.6-2.5 ms at FCMAE V2-B shapes
where the sum of squares takes 0.02-0.4 ms, and its autograd backward adds
several full passes over ``u`` (measured, 2 threads).  Backward, with
``D = mean_k G + eps``, ``R = sum_p dy u`` per (sample, channel):
``dbeta = sum dy``, ``dgamma = sum_n R N``, ``dN = R gamma``,
``dG = dN / D - (sum_k dN G) / (K D^2)``, ``du = dy scale + u dG / G``
(``dG / G`` taken as 0 where ``G = 0``: ``torch.norm``'s gradient convention).
"""
import torch
from torch.autograd.function import once_differentiable

from .layout import StageLayout


def _acc_dtype(u: torch.Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _per_sample_sum(x: torch.Tensor, layout: StageLayout) -> torch.Tensor:
    """(N, K) sums over each sample's rows of the [M, K] ``x``."""
    p, n = layout.equal_counts, layout.counts.numel()
    if p:
        return x.reshape(n, p, -1).sum(1)
    return x.new_zeros(n, x.shape[1]).index_add_(0, layout.sample, x)


def _per_row(t: torch.Tensor, layout: StageLayout) -> torch.Tensor:
    """The (N, K) ``t`` as a factor of [M, K] rows: an (N, 1, K) view for
    equal counts (callers view the rows as (N, p, K)), else one row per row."""
    return t[:, None, :] if layout.equal_counts else t.index_select(0, layout.sample)


def _rows(x: torch.Tensor, layout: StageLayout) -> torch.Tensor:
    p = layout.equal_counts
    return x.reshape(layout.counts.numel(), p, -1) if p else x


# -- host functions --------------------------------------------------------
def sparse_grn_forward(u, gamma, beta, layout, eps):
    """``(out, gx, nx, scale)``: out [M, K] in ``u``'s dtype; the (N, K)
    statistics ``G``, ``N``, ``scale = 1 + gamma N`` (accumulation dtype)."""
    acc = _acc_dtype(u)
    ua = u.to(acc)
    gx = _per_sample_sum(ua.square(), layout).sqrt_()
    del ua
    nx = gx / (gx.mean(dim=-1, keepdim=True) + eps)
    scale = 1 + gamma.to(acc) * nx
    out = torch.addcmul(beta.to(acc), _rows(u, layout), _per_row(scale, layout))
    return out.view(u.shape).to(u.dtype), gx, nx, scale


def sparse_grn_backward(dout, u, gamma, gx, nx, scale, layout, eps):
    """``(du, dgamma, dbeta)``: ``du`` in ``u``'s dtype, the parameter grads
    in the accumulation dtype."""
    acc = gx.dtype
    d = dout.to(acc)
    dbeta = d.sum(0)
    R = _per_sample_sum(d * u, layout)                  # sum_p dy u, (N, K)
    dgamma = (R * nx).sum(0)
    dnx = R * gamma.to(acc)
    D = gx.mean(dim=-1, keepdim=True) + eps
    dgx = dnx / D - (dnx * gx).sum(dim=-1, keepdim=True) / (gx.shape[-1] * D * D)
    pos = gx > 0
    c = torch.where(pos, dgx / torch.where(pos, gx, torch.ones_like(gx)),
                    torch.zeros_like(gx))
    du = torch.addcmul(_rows(d, layout) * _per_row(scale, layout), _rows(u, layout),
                       _per_row(c, layout))
    return du.view(u.shape).to(u.dtype), dgamma, dbeta


class SparseGRNFunction(torch.autograd.Function):
    """Thin autograd wrapper of :func:`sparse_grn_forward` / ``_backward``."""

    @staticmethod
    def forward(ctx, u, gamma, beta, layout, eps):
        # dtypes are explicit here: CUDA autocast would cast u to fp32 for the
        # mixed-dtype addcmul (a "promote" op there) -- a full extra pass
        with torch.autocast(u.device.type, enabled=False):
            out, gx, nx, scale = sparse_grn_forward(u, gamma, beta, layout, eps)
        ctx.save_for_backward(u, gamma, gx, nx, scale)
        ctx.layout, ctx.eps, ctx.beta_dtype = layout, eps, beta.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        u, gamma, gx, nx, scale = ctx.saved_tensors
        with torch.autocast(u.device.type, enabled=False):
            du, dgamma, dbeta = sparse_grn_backward(dout, u, gamma, gx, nx, scale,
                                                    ctx.layout, ctx.eps)
        return du, dgamma.to(gamma.dtype), dbeta.to(ctx.beta_dtype), None, None


def sparse_grn(u: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
               layout: StageLayout, eps: float = 1e-6) -> torch.Tensor:
    """GRN of the [M, K] visible rows ``u`` per sample (see the module doc)."""
    return SparseGRNFunction.apply(u, gamma, beta, layout, float(eps))


def sparse_grn_dense_masked_ref(u: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                                layout: StageLayout, eps: float = 1e-6) -> torch.Tensor:
    """Reference: densify rows (zeros at masked sites) -> dense GRN
    (:func:`convnextv2_fast.ops.reference.grn_ref`) -> rows at visible sites."""
    from ..ops.reference import grn_ref
    from .layout import densify
    dense = densify(u, layout).permute(0, 2, 3, 1)          # (N, H, W, K)
    out = grn_ref(dense, gamma, beta, eps)
    return out.reshape(-1, u.shape[1]).index_select(0, layout.site_long())
