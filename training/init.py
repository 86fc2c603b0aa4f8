"""Initial weights for training (model.init_random is for tests: it perturbs norms and leaves dt random).

Why these choices: standard small-LM init (std 0.02, output projections scaled by 1/sqrt(2*layers)),
Mamba-2's own dt / A initialisation, unit norms, zero selection bias.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from model_shards.mamba import Mamba2Mixer
from model_shards.moe import RoutedExperts, Router


@torch.no_grad()
def init_weights(module: nn.Module, num_layers: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    out_std = 0.02 / math.sqrt(2 * num_layers)
    for name, p in module.named_parameters():
        if p.ndim == 1:
            continue                                                  # norms, A_log, D, dt_bias: below
        std = out_std if name.endswith(("out_proj.weight", "o_proj.weight", "down_proj.weight",
                                        "fc2_latent_proj.weight", ".down")) else 0.02
        if "conv1d" in name:
            std = 1.0 / math.sqrt(p.shape[-1])
        p.copy_(torch.randn(p.shape, generator=g) * std)
    for m in module.modules():
        if isinstance(m, Mamba2Mixer):
            H = m.A_log.numel()
            m.A_log.copy_(torch.log(1 + torch.rand(H, generator=g) * 15))
            dt = torch.exp(torch.rand(H, generator=g) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
            m.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))       # inverse softplus
            m.D.fill_(1.0)
            if m.conv1d.bias is not None:
                m.conv1d.bias.zero_()
            m.norm.weight.fill_(1.0)
        elif isinstance(m, Router):
            m.e_score_correction_bias.zero_()
        elif isinstance(m, RoutedExperts):
            pass
    for name, p in module.named_parameters():
        if name.endswith(("norm.weight", "norm_f.weight", "final_layernorm.weight")) and p.ndim == 1:
            p.fill_(1.0)
