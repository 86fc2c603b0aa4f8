"""Mean acceptance length of MTP drafting, measured with the oracle generator on held-out code prompts.

Why the oracle: `model_shards.generate` runs the same verify / draft logic as the engine's last stage, so
its numbers are the ones serving will see (up to batching). Acceptance length = 1 + accepted drafts per
verification pass (tokens gained per target pass); 1.0 means no draft is ever accepted.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from model_shards.generate import generate
from model_shards.model import HybridModel
from model_shards.sampling_params import SamplingParams

from .tokenizer import BOS_ID, EOS_ID


def code_prompts(held_stream: np.ndarray, count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` tokens from evenly spaced places in the held-out stream, each inside one file."""
    stride = (held_stream.size - length) // count
    out, pos = [], 0
    while len(out) < count and pos + length <= held_stream.size:
        w = held_stream[pos:pos + length]
        bad = np.nonzero((w == BOS_ID) | (w == EOS_ID))[0]
        if bad.size:                                  # crosses a file boundary: start just after it
            pos += int(bad[-1]) + 1
            continue
        out.append([int(t) for t in w])
        pos = (len(out)) * stride
    return out


@dataclasses.dataclass
class Acceptance:
    num_drafts: int
    temperature: float
    prompts: int
    tokens: int
    passes: int
    accepted: int
    drafted: int

    @property
    def mean_acceptance_length(self) -> float:
        return 1.0 + self.accepted / max(self.passes, 1)

    @property
    def draft_acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)


@torch.no_grad()
def measure(model: HybridModel, prompts: list[list[int]], num_drafts: int, max_tokens: int,
            temperature: float = 0.0, seed: int = 0) -> Acceptance:
    acc = Acceptance(num_drafts, temperature, len(prompts), 0, 0, 0, 0)
    for i, p in enumerate(prompts):
        params = SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True, seed=seed + i)
        g = generate(model, p, params, num_drafts=num_drafts)
        acc.tokens += len(g.tokens)
        acc.passes += g.passes
        acc.accepted += g.num_accepted
        acc.drafted += g.num_drafted
    return acc
