"""The multi-token-prediction block: one extra (attention, MoE) stack that predicts token t+2.

x = eh_proj([enorm(embed(token_{t+1})), hnorm(h_t)]); attention layer; MoE layer; final_layernorm;
the model's shared lm_head. Applied recursively for k > 1 drafts (its own output as the next h).
Checkpoint names: mtp.layers.0.{enorm,hnorm,eh_proj,norm,mixer.*}, mtp.layers.1.{norm,mixer.*,final_layernorm}.
"""
from __future__ import annotations

import torch
from torch import nn

from .batch import BatchLayout
from .cache import PagedKVCache
from .config import ATTENTION, ModelConfig
from .layers import Block, RMSNorm
from .linear import Linear


class MTPLayer(Block):
    """A Block; the first also fuses embedding and hidden state, the last adds the final norm."""

    def __init__(self, cfg: ModelConfig, kind: str, first: bool, last: bool):
        super().__init__(cfg, kind)
        d, eps = cfg.hidden_size, cfg.layer_norm_epsilon
        if first:
            self.enorm = RMSNorm(d, eps)
            self.hnorm = RMSNorm(d, eps)
            self.eh_proj = Linear(2 * d, d)
        if last:
            self.final_layernorm = RMSNorm(d, eps)


class MTPBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        pat = cfg.mtp_hybrid_override_pattern
        self.layers = nn.ModuleList(MTPLayer(cfg, k, i == 0, i == len(pat) - 1) for i, k in enumerate(pat))
        # Layers after the last attention layer mix nothing across tokens: they need only the rows asked for.
        self.per_token_from = max((i + 1 for i, k in enumerate(pat) if k == ATTENTION), default=0)

    def forward(self, emb_next: torch.Tensor, h_prev: torch.Tensor, batch: BatchLayout,
                kv: PagedKVCache | None, rows: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """emb_next (T, d) embeddings of tokens t+1, h_prev (T, d) hidden states at t.

        Returns (h_out (R, d) before the final norm: the next recursion's h_prev; normed (R, d) for lm_head)
        for the R rows in `rows` (all T when None). Every row still writes its KV: drafting feeds all
        settled pairs but needs only each sequence's newest output, so the MoE after the attention runs
        on those rows alone.
        """
        first = self.layers[0]
        dt = first.eh_proj.weight.dtype                    # the block may compute in its own dtype (drafter.py)
        h = first.eh_proj(torch.cat([first.enorm(emb_next).to(dt), first.hnorm(h_prev).to(dt)], dim=-1))
        for i, layer in enumerate(self.layers):
            if i == self.per_token_from and rows is not None:
                h = h[rows]
            h = layer(h, batch, kv if layer.kind == ATTENTION else None)
        if self.per_token_from == len(self.layers) and rows is not None:
            h = h[rows]
        return h, self.layers[-1].final_layernorm(h)
