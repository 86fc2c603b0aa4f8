"""Random weights at scales where every part of the model moves the logits (for tests and presets)."""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """No zeros; matrices get std ~1/sqrt(fan_in), so Mamba's x, B, C and the scan are O(1), not drowned
    by D*x; decay rates A in [0.05, 4] keep state across chunk boundaries; dt_bias in [-1, 0.5] keeps
    softplus(dt + dt_bias) far above transformers' 0.001 clamp. Works on our names and transformers'.
    """
    gens: dict[torch.device, torch.Generator] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        # Draws on the tensor's own device (a GPU-sized model never passes through host memory); a
        # model on the CPU gets the very values it always did.
        g = gens.setdefault(t.device, torch.Generator(device=t.device).manual_seed(seed))
        kw = dict(generator=g, device=t.device)
        if name.endswith("A_log"):
            t.copy_(torch.empty(t.shape, device=t.device).uniform_(math.log(0.05), math.log(4.0), generator=g))
        elif name.endswith("dt_bias"):
            t.copy_(torch.rand(t.shape, **kw) * 1.5 - 1.0)
        elif name.endswith(("norm.weight", "norm_f.weight", ".D", "enorm.weight", "hnorm.weight",
                            "final_layernorm.weight")):
            t.copy_(1 + 0.2 * torch.randn(t.shape, **kw))
        elif name.endswith("e_score_correction_bias"):
            t.copy_(torch.randn(t.shape, **kw) * 0.05)
        elif t.dim() >= 2:                                      # output projections at half scale:
            out = any(k in name for k in ("down", "o_proj", "out_proj", "fc2"))   # a tamer residual stream
            t.copy_(torch.randn(t.shape, **kw) * (0.5 if out else 1.0) / math.sqrt(t.shape[-1]))
        else:                                                   # conv1d.bias
            t.copy_(torch.randn(t.shape, **kw) * 0.1)
