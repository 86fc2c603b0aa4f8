"""Training forward over a [B, L] batch, using the model's own modules (the single implementation of the math).

Why a ragged batch: the model already runs several sequences flattened into one token axis (BatchLayout),
each starting at position 0 with fresh caches, which is exactly a training batch. Losses:
  main   CE(x_{t+1} | x_{<=t})
  MTP d1 CE(x_{t+2}) from (h_t, emb(x_{t+1}))            -- the MTP block
  MTP d2 CE(x_{t+3}) from (MTP's own output h, emb(x_{t+2})) -- the same block again, shared weights
Two MTP blocks are trained side by side on the same batch: one reads h_t before norm_f, the other after,
so the shipped choice is decided by measured acceptance. Both read detached backbone states (and the
shared embedding / lm_head without gradient), so the backbone is the same whichever variant ships.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model_shards.batch import BatchLayout, SeqSlice
from model_shards.cache import PagedKVCache
from model_shards.model import HybridModel
from model_shards.mtp import MTPBlock

BLOCK_SIZE = 64


def ragged_layout(batch: int, seq_len: int) -> tuple[BatchLayout, int]:
    """B sequences of L tokens, each from position 0, with disjoint KV blocks. Returns (layout, num_blocks)."""
    per = -(-seq_len // BLOCK_SIZE)
    seqs = [SeqSlice(b * seq_len, seq_len, 0, b, torch.arange(b * per, (b + 1) * per)) for b in range(batch)]
    return BatchLayout(seqs), batch * per


def backbone_hidden(model: HybridModel, ids: torch.Tensor) -> tuple[torch.Tensor, BatchLayout, int]:
    """ids (B, L) -> hidden before norm_f (B*L, d), with fresh caches."""
    B, L = ids.shape
    layout, nblocks = ragged_layout(B, L)
    cache = model.make_cache(num_blocks=nblocks, block_size=BLOCK_SIZE, num_slots=B)
    return model(ids.reshape(-1), layout, cache), layout, nblocks


def mtp_depth_logits(model: HybridModel, mtp: MTPBlock, h_prev: torch.Tensor, next_ids: torch.Tensor,
                     layout: BatchLayout, nblocks: int, rows: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One MTP application with a fresh MTP KV cache. Returns (h_out at every row, logits at `rows`).

    The block runs on every position (its attention needs them); the vocabulary projection, the
    costliest part on a CPU, only on `rows` (all when None).
    """
    kv = PagedKVCache(model.cfg, nblocks, BLOCK_SIZE)
    emb = model.embed(next_ids.reshape(-1)).detach()
    h_out, normed = mtp(emb, h_prev, layout, kv)
    if rows is not None:
        normed = normed[rows]
    return h_out, F.linear(normed, model.lm_head.weight.detach()).float()


def losses(model: HybridModel, mtps: dict[str, MTPBlock], window: torch.Tensor, depths: int = 2,
           mtp_rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """window (B, L+3) token ids -> {"main": CE, "<variant>_d1": CE, "<variant>_d2": CE, ...}.

    mtps maps a variant name to its block: "prenorm" reads h_t before norm_f, "postnorm" after.
    mtp_rows: flat positions whose MTP losses are computed (a random subset saves time); None: all.
    """
    B, Lp = window.shape
    L = Lp - 3
    h, layout, nblocks = backbone_hidden(model, window[:, :L])
    out = {"main": F.cross_entropy(model.logits(h), window[:, 1:L + 1].reshape(-1))}
    hd = h.detach()
    for name, mtp in mtps.items():
        h_prev = model.backbone.norm_f(hd).detach() if name == "postnorm" else hd
        for d in range(1, depths + 1):
            h_prev, logits = mtp_depth_logits(model, mtp, h_prev, window[:, d:L + d], layout, nblocks, mtp_rows)
            target = window[:, d + 1:L + d + 1].reshape(-1)
            out[f"{name}_d{d}"] = F.cross_entropy(logits, target if mtp_rows is None else target[mtp_rows])
    return out
