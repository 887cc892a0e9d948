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
issue #86).  Reductions and the scale run in fp32 (as the dense reference
under autocast), the output is in ``u``'s dtype.  When every sample has the
same number of visible rows (always the case for FCMAE's fixed ``len_keep``)
the reduction is a reshape + ``vector_norm`` (deterministic, no fp32 copy of
``u`` kept for backward); otherwise an ``index_add`` by sample.
"""
import torch

from .layout import StageLayout


def sparse_grn(u: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
               layout: StageLayout, eps: float = 1e-6) -> torch.Tensor:
    m, k = u.shape
    n = layout.counts.numel()
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    p = layout.equal_counts
    if p:
        # fp32 reduction without materialising (or saving) an fp32 copy of u;
        # vector_norm's gradient at 0 is 0.
        u3 = u.view(n, p, k)
        gx = torch.linalg.vector_norm(u3, ord=2, dim=1, dtype=acc)
    else:
        ss = u.new_zeros(n, k, dtype=acc).index_add(0, layout.sample, u.to(acc).pow(2))
        pos = ss > 0
        gx = torch.where(pos, ss, torch.ones_like(ss)).sqrt() * pos
    nx = gx / (gx.mean(dim=-1, keepdim=True) + eps)
    scale = 1 + gamma.to(acc) * nx                      # [N, K], fp32
    if p:
        out = (u3 * scale[:, None, :]).view(m, k)       # promotes to fp32
    else:
        out = u * scale.index_select(0, layout.sample)
    return (out + beta.to(acc)).to(u.dtype)


def sparse_grn_dense_masked_ref(u: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                                layout: StageLayout, eps: float = 1e-6) -> torch.Tensor:
    """Reference: densify rows (zeros at masked sites) -> dense GRN
    (:func:`convnextv2_fast.ops.reference.grn_ref`) -> rows at visible sites."""
    from ..ops.reference import grn_ref
    from .layout import densify
    dense = densify(u, layout).permute(0, 2, 3, 1)          # (N, H, W, K)
    out = grn_ref(dense, gamma, beta, eps)
    return out.reshape(-1, u.shape[1]).index_select(0, layout.site_long())
