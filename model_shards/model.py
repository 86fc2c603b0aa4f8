"""The hybrid model, or any contiguous slice of it: plain torch, no knowledge of parallelism.

A pipeline stage builds `HybridModel(cfg, layers=range(a, b), ...)` and owns only those layers; the
single-process model owns all of them plus embedding, head and MTP block. Parameter names equal the
checkpoint's (`backbone.layers.{i}...`, `lm_head.weight`, `mtp.layers...`), experts aside (stacked).
"""
from __future__ import annotations

import torch
from torch import nn

from .batch import BatchLayout
from .cache import HybridCache
from .config import ModelConfig
from .drafter import Drafter
from .layers import Block, RMSNorm
from .linear import Linear
from .mtp import MTPBlock
from .random_init import randomize_


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: range, with_embeddings: bool, with_norm: bool,
                 expert_range: tuple[int, int] | None):
        super().__init__()
        if with_embeddings:
            self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # A ModuleDict keyed by the global layer index keeps checkpoint names on every stage.
        self.layers = nn.ModuleDict({str(i): Block(cfg, cfg.layer_kind(i), expert_range) for i in layers})
        if with_norm:
            self.norm_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)


class HybridModel(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: range | None = None, *, first: bool | None = None,
                 last: bool | None = None, with_mtp: bool | None = None,
                 expert_range: tuple[int, int] | None = None):
        super().__init__()
        layers = range(cfg.num_hidden_layers) if layers is None else layers
        self.cfg = cfg
        self.layer_ids = list(layers)
        self.first = layers.start == 0 if first is None else first
        self.last = layers.stop == cfg.num_hidden_layers if last is None else last
        with_mtp = (self.last and cfg.has_mtp) if with_mtp is None else with_mtp
        # The last stage needs the embedding too when it runs the MTP block (shared weights).
        self.backbone = Backbone(cfg, layers, self.first or with_mtp, self.last, expert_range)
        if self.last:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        self.mtp = MTPBlock(cfg) if with_mtp else None
        self.drafter: Drafter | None = None          # serving's drafting weights and vocabulary (configure_drafting)
        self.checkpoint_draft_vocab: torch.Tensor | None = None   # draft_vocab.json of the checkpoint, if any

    # ---- construction helpers --------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The dtype the layers compute in (load_checkpoint's `dtype`): that of the weight matrices.
        Buffers (the router's float32 correction bias) and 1-d parameters do not decide it."""
        return next(p.dtype for p in self.parameters() if p.dim() >= 2)

    def make_cache(self, *, num_blocks: int, block_size: int, num_slots: int, max_verify_positions: int = 1,
                   device="cpu", kv_dtype: torch.dtype | None = None) -> HybridCache:
        """This slice's caches; the KV cache in `kv_dtype`, by default the model's dtype (`dtype`), so that
        k and v are stored as computed and the planner's bytes per KV element hold (Mamba states: float32)."""
        kv_dtype = self.dtype if kv_dtype is None else kv_dtype
        return HybridCache(self.cfg, self.layer_ids, num_blocks=num_blocks, block_size=block_size,
                           num_slots=num_slots, max_verify_positions=max_verify_positions,
                           with_mtp=self.mtp is not None, kv_dtype=kv_dtype, device=device)

    # ---- forward pieces ----------------------------------------------------------------------------
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.embeddings(token_ids)

    def forward(self, x: torch.Tensor, batch: BatchLayout, cache: HybridCache) -> torch.Tensor:
        """x: token ids (T,) on the first stage, hidden states (T, d) elsewhere -> hidden (T, d)
        after this slice's layers (before norm_f)."""
        h = self.embed(x) if self.first else x
        for i, layer in self.backbone.layers.items():
            i = int(i)
            h = layer(h, batch, cache.mamba.get(i) or cache.kv.get(i))
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states before norm_f (T, d) -> logits (T, V) float32."""
        return self.lm_head(self.backbone.norm_f(h)).float()

    def mtp_hidden_input(self, h: torch.Tensor) -> torch.Tensor:
        """The h_t the MTP block reads: before or after norm_f, as the config says."""
        return self.backbone.norm_f(h) if self.cfg.mtp_use_final_norm_hidden else h

    def mtp_forward(self, next_tokens: torch.Tensor, h_prev: torch.Tensor, batch: BatchLayout,
                    cache: HybridCache, logit_rows: list[int] | None = None,
                    full_vocab_rows: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One MTP application. next_tokens (T,) are tokens t+1; h_prev (T, d).

        Returns (h_out (R, d), logits (R, V) float32) for the rows in `logit_rows` (all T rows when None):
        drafting needs only each sequence's newest row, and lm_head is the block's largest matrix.
        With a drafter (configure_drafting) its weights and vocabulary are used; `full_vocab_rows`
        (positions among the R rows: those that sample at random) get logits over every token anyway.
        """
        block, head = (self.mtp, None) if self.drafter is None else self.drafter.weights_for(len(next_tokens))
        h_out, normed = block(self.embed(next_tokens), h_prev, batch, cache.kv.get("mtp"), rows=logit_rows)
        if self.drafter is None:
            return h_out, self.lm_head(normed).float()
        return h_out, self.drafter.logits(normed, head, full_vocab_rows)

    @property
    def draft_dtype(self) -> torch.dtype:
        """The dtype drafting computes in (within the drafter's row limit; model_shards/drafter.py)."""
        return self.lm_head.weight.dtype if self.drafter is None else self.drafter.dtype

    def configure_drafting(self, *, dtype: torch.dtype | None = None, max_rows: int | None = None,
                           vocab: torch.Tensor | None = None) -> None:
        """Serve drafts from a Drafter (model_shards/drafter.py): the MTP block and lm_head copied to
        `dtype` for MTP calls of at most `max_rows` rows, greedy drafts restricted to the token ids `vocab`.
        The model's own logits (verification) keep lm_head as it is. Call after the weights are loaded."""
        if self.mtp is None:
            raise ValueError("configure_drafting: this model (or pipeline stage) has no MTP block")
        plain = (dtype is None or dtype == self.lm_head.weight.dtype) and vocab is None
        self.drafter = None if plain else Drafter(self.mtp, self.lm_head.weight, dtype=dtype, max_rows=max_rows,
                                                  vocab=vocab)

    def init_random(self, seed: int) -> "HybridModel":
        """Random weights with the shapes of a real checkpoint (see random_init.randomize_)."""
        randomize_(self, seed)
        return self
