"""benchmarks/pass_anatomy.py counts what a verification pass reads, whichever way the model runs blocks
(the shipped model, loaded as the engine loads it, runs its decode-sized passes as fused C blocks)."""
from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.pass_anatomy import experts_touched
from model_shards import fused_blocks
from model_shards.weights import load_checkpoint

FOLDER = Path(__file__).resolve().parents[2] / "checkpoints" / "hybrid-mini"


def test_experts_touched_counts_the_routers_choices_even_where_blocks_run_fused():
    model = load_checkpoint(FOLDER)
    cfg = model.cfg
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, cfg.vocab_size, (20,), generator=g).tolist() for _ in range(3)]
    before = fused_blocks.ENABLED
    k = 3
    touched = experts_touched(model, prompts, k)
    assert cfg.num_experts_per_tok <= touched <= min((k + 1) * cfg.num_experts_per_tok, cfg.n_routed_experts)
    assert fused_blocks.ENABLED == before
