"""Sampling and speculative verification as short pure functions over tensors.

Random draws come from a generator seeded by (request seed, number of tokens so far), so a seeded
request gives the same tokens however it is batched, pipelined or sharded.
"""
from __future__ import annotations

import torch

from kernels import ops

from .sampling_params import SamplingParams


def step_generator(seed: int, num_tokens: int, stream: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator for one sampling event of a request, on the device its logits live on (a CUDA
    generator draws on the GPU: no copy of the distribution to the host). `stream` separates drafting
    from verifying. The same seeds on another device type give other (equally distributed) draws."""
    gen = torch.Generator(device=device)
    return gen.manual_seed((seed * 1_000_003 + num_tokens * 7919 + stream) % (2**63 - 1))


def probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """(m, V) logits -> (m, V) float32 sampling distribution under p (temperature > 0)."""
    return ops.probs_from_logits(logits, p.temperature, p.top_k, p.top_p, p.min_p)


def sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> tuple[int, torch.Tensor | None]:
    """One token from logits (V,). Returns (token, its distribution or None when greedy; gen may be None then)."""
    if p.greedy:
        return int(logits.argmax()), None
    q = probs(logits[None], p)[0]
    return int(torch.multinomial(q, 1, generator=gen)), q


def verify(target_logits: torch.Tensor, drafts: list[int], draft_probs: torch.Tensor | None,
           p: SamplingParams, gen: torch.Generator | None) -> tuple[list[int], int]:
    """target_logits (k+1, V) at [last token, d_1..d_k]; drafts d_1..d_k.

    Returns (new tokens = accepted drafts + one corrected/bonus token, number accepted). Lossless:
    greedy gives the target's argmax chain, random gives exactly the target distribution.
    """
    d = torch.tensor(drafts, dtype=torch.long, device=target_logits.device)
    if p.greedy:
        return ops.rejection_sample(target_logits, d, None)
    return ops.rejection_sample(probs(target_logits, p), d, draft_probs, generator=gen)
