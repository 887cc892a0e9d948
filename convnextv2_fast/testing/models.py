"""Model helpers shared by tests and benchmarks."""
import torch


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.2):
    """Give every parameter random values (GRN gamma/beta included, so GRN is
    not the identity; LN weights around 1).  Deterministic for ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(module.named_parameters()):
        noise = torch.randn(param.shape, generator=gen) * std
        if param.dim() == 1 and name.endswith('weight'):  # LayerNorm scales
            noise = 1 + noise
        param.copy_(noise.to(param.dtype))
    return module


def reference_backbone_kwargs(**overrides) -> dict:
    """Constructor kwargs of the seed config's backbone (V2, 4 outputs)."""
    kwargs = dict(arch='base', out_indices=[0, 1, 2, 3], drop_path_rate=0.,
                  layer_scale_init_value=0., gap_before_final_norm=False,
                  use_grn=True)
    kwargs.update(overrides)
    return kwargs
