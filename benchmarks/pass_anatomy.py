"""Where an MTP pass's time goes, against a plain decode step: the model-level pieces, timed alone.

speedup = (tokens per pass) / (pass time / decode step time), so this table says what the pass costs
in decode steps and which piece makes it cost that. Used by benchmarks/mtp.py; times are medians.
"""
from __future__ import annotations

import statistics
import time

import torch

from model_shards import fused_blocks
from model_shards.batch import BatchLayout
from model_shards.config import MOE
from model_shards.model import HybridModel


def _median_ms(fn, reps: int) -> float:
    for _ in range(max(3, reps // 10)):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


@torch.no_grad()
def measure(model: HybridModel, prompt: list[int], k: int, reps: int = 200) -> list[list]:
    """Rows [piece, ms, in decode steps] for one sequence after `prompt`, drafting k tokens."""
    cache = model.make_cache(num_blocks=(len(prompt) + 4 * k + 64) // 16 + 1, block_size=16, num_slots=1,
                             max_verify_positions=k + 1)
    table = torch.arange((len(prompt) + 4 * k + 64) // 16 + 1)
    h = model(torch.tensor(prompt), BatchLayout.single(len(prompt), 0, table), cache)
    pos, d = len(prompt), model.cfg.hidden_size
    ids = torch.tensor(prompt[-(k + 1):])
    h_prev = h[-(k + 1):]

    def decode():
        model.logits(model(ids[:1], BatchLayout.single(1, pos, table), cache))

    def verify():
        model.logits(model(ids, BatchLayout.single(k + 1, pos, table, keep_states=True), cache))
        cache.commit(0, k // 2)

    def mtp(rows):
        def run():
            model.mtp_forward(ids[:rows], h_prev[:rows].reshape(rows, d), BatchLayout.single(rows, pos, table),
                              cache, logit_rows=[rows - 1])
        return run

    step = _median_ms(decode, reps)
    pieces = [("decode step: forward 1 token + logits", step),
              (f"verify: forward {k + 1} tokens + logits + commit", _median_ms(verify, reps)),
              ("MTP catch-up (2 settled rows, typical)", _median_ms(mtp(2), reps)),
              (f"MTP recursive step (1 row) x {k - 1}", (k - 1) * _median_ms(mtp(1), reps))]
    total = sum(ms for _, ms in pieces[1:])
    rows = [[name, ms, ms / step] for name, ms in pieces]
    rows.append([f"MTP pass k={k} (verify + drafting)", total, total / step])
    return rows



@torch.no_grad()
def experts_touched(model: HybridModel, prompts: list[list[int]], k: int) -> float:
    """Mean distinct routed experts per backbone MoE layer for the k+1 tokens of a verification pass
    (the last k+1 of each prompt, after the rest as prefill): the expert weights such a pass reads, where
    one token reads num_experts_per_tok."""
    counts: list[int] = []
    routers = [layer.mixer.gate for layer in model.backbone.layers.values() if layer.kind == MOE]

    def count(module, inputs, output):
        if output[1].shape[0] == k + 1:                  # the verification pass, not the prefill
            counts.append(int(output[1].unique().numel()))
    hooks = [r.register_forward_hook(count) for r in routers]
    fused, fused_blocks.ENABLED = fused_blocks.ENABLED, False      # a fused block never calls the router module
    try:
        for prompt in prompts:
            head, tail = prompt[:-(k + 1)], prompt[-(k + 1):]
            n_blocks = len(prompt) // 16 + 1
            cache = model.make_cache(num_blocks=n_blocks, block_size=16, num_slots=1, max_verify_positions=k + 1)
            table = torch.arange(n_blocks)
            model(torch.tensor(head), BatchLayout.single(len(head), 0, table), cache)
            model(torch.tensor(tail), BatchLayout.single(k + 1, len(head), table, keep_states=True), cache)
    finally:
        fused_blocks.ENABLED = fused
        for h in hooks:
            h.remove()
    return sum(counts) / max(len(counts), 1)
