"""Aux-loss-free expert load balancing: nudge each router's selection-only bias toward even load.

Why: the model's router adds `e_score_correction_bias` only to choose experts (as the real checkpoints do);
training keeps that bias moving so no expert starves (bias += rate * sign(mean_load - load)).
"""
from __future__ import annotations

import torch
from torch import nn

from model_shards.moe import Router


class ExpertBalancer:
    def __init__(self, modules: list[nn.Module], rate: float):
        self.rate = rate
        self.routers = [m for root in modules for m in root.modules() if isinstance(m, Router)]
        self.loads = {id(r): torch.zeros(r.e_score_correction_bias.numel()) for r in self.routers}
        for r in self.routers:
            r.register_forward_hook(self._hook)

    def _hook(self, router, _inp, out) -> None:
        if router.training:
            ids = out[1].reshape(-1)
            self.loads[id(router)] += torch.bincount(ids, minlength=self.loads[id(router)].numel()).float()

    @torch.no_grad()
    def step(self) -> tuple[float, float]:
        """Apply one bias update from the loads seen since the last call.

        Returns (mean, worst) over routers of max/mean expert load (1.0 is perfectly even)."""
        ratios = []
        for r in self.routers:
            load = self.loads[id(r)]
            if load.sum() > 0:
                r.e_score_correction_bias += self.rate * torch.sign(load.mean() - load)
                ratios.append(float(load.max() / load.mean()))
            load.zero_()
        return (sum(ratios) / len(ratios), max(ratios)) if ratios else (0.0, 0.0)
