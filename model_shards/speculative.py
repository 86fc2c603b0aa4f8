"""Sampling and speculative verification as short pure functions over tensors.

Random draws come from a generator seeded by (request seed, number of tokens so far), so a seeded
request gives the same tokens however it is batched, pipelined or sharded.
"""
from __future__ import annotations

import dataclasses

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


@dataclasses.dataclass
class VerifyJob:
    """One sequence's drafts to verify: its k+1 target rows are logits[row0 : row0+k+1] of the tail."""

    row0: int
    drafts: list[int]
    draft_probs: torch.Tensor | None       # (k, V) what the drafts were sampled from; None: greedy drafts
    params: SamplingParams
    gen: torch.Generator | None


def on_device(device: torch.device) -> bool:
    """Whether verification runs as the batched ops (ops.verify_greedy / verify_random: Triton kernels, one
    host sync for the batch) on `device`: on CUDA only.

    A CPU keeps today's results and cost. Greedy: one argmax over the rows and one tolist, the chains
    compared on the host (the fewest ops: a CPU decode step is dispatch-bound), the same argmax chain as
    the op's. Seeded random: `verify` per sequence, because the op's contract draws the corrected / bonus
    token by inverse CDF from one uniform where `verify` draws it with torch.multinomial (exponential
    races over the vocabulary): the two cannot agree token for token, so on a CPU seeded outputs stay what
    they were. A GPU gives other draws than a CPU anyway (step_generator)."""
    return device.type == "cuda"


def verify_batch(logits: torch.Tensor, jobs: list[VerifyJob]) -> list[tuple[list[int], int]]:
    """`verify` for several sequences: (new tokens, number accepted) per job, in order. logits (R, V).
    Greedy jobs together (on_device: one ops.verify_greedy call), random ones in one ops.verify_random
    call on_device, else one at a time (and any without draft distributions)."""
    out: list = [None] * len(jobs)
    greedy = [i for i, j in enumerate(jobs) if j.params.greedy]
    if greedy:
        for i, res in zip(greedy, _greedy_batch(logits, [jobs[i] for i in greedy])):
            out[i] = res
    rand = [i for i, j in enumerate(jobs) if not j.params.greedy and j.draft_probs is not None]
    if rand and on_device(logits.device):
        for i, res in zip(rand, _random_batch(logits, [jobs[i] for i in rand])):
            out[i] = res
    for i, j in enumerate(jobs):
        if out[i] is None:
            n = len(j.drafts) + 1
            out[i] = verify(logits[j.row0:j.row0 + n], j.drafts, j.draft_probs, j.params, j.gen)
    return out


def _padded(jobs: list[VerifyJob], device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """draft_tokens (S, k) padded with 0 (never read past num_drafts), num_drafts (S,), k."""
    k = max(len(j.drafts) for j in jobs)
    drafts = torch.tensor([j.drafts + [0] * (k - len(j.drafts)) for j in jobs], dtype=torch.long, device=device)
    return drafts, torch.tensor([len(j.drafts) for j in jobs], device=device), k


def _results(jobs: list[VerifyJob], num: torch.Tensor, nxt: torch.Tensor) -> list[tuple[list[int], int]]:
    counts, tokens = torch.stack([num, nxt]).tolist()
    return [(j.drafts[:n] + [t], n) for j, n, t in zip(jobs, counts, tokens)]


def _greedy_batch(logits: torch.Tensor, jobs: list[VerifyJob]) -> list[tuple[list[int], int]]:
    lo = min(j.row0 for j in jobs)
    hi = max(j.row0 + len(j.drafts) + 1 for j in jobs)
    ids = logits[lo:hi].argmax(-1)                 # (hi - lo,): one pass over the rows, torch's argmax as verify's
    if not on_device(logits.device):               # one tolist, the chains compared on the host
        host = ids.tolist()
        return [_chain(j.drafts, host[j.row0 - lo:]) for j in jobs]
    drafts, num, k = _padded(jobs, logits.device)
    at = torch.tensor([[j.row0 - lo + min(c, len(j.drafts)) for c in range(k + 1)] for j in jobs],
                      device=logits.device)                         # (S, k+1); padding repeats the bonus row
    return _results(jobs, *ops.verify_greedy(ids[at], drafts, num))


def _chain(drafts: list[int], target: list[int]) -> tuple[list[int], int]:
    """Greedy verification on the host: drafts accepted while they equal the target's tokens, then its next."""
    n = 0
    while n < len(drafts) and drafts[n] == target[n]:
        n += 1
    return drafts[:n] + [target[n]], n


def _random_batch(logits: torch.Tensor, jobs: list[VerifyJob]) -> list[tuple[list[int], int]]:
    """Each sequence's uniforms come from its own generator (its k accept tests, then the token's
    draw, in the last column): a seeded request's tokens do not depend on its batch."""
    dev, V = logits.device, logits.shape[-1]
    drafts, num, k = _padded(jobs, dev)
    target = torch.zeros(len(jobs), k + 1, V, device=dev)           # (S, k+1, V) float32
    q = torch.zeros(len(jobs), k, V, device=dev)                    # (S, k, V)
    u = torch.zeros(len(jobs), k + 1, device=dev)                   # (S, k+1)
    for s, j in enumerate(jobs):
        n = len(j.drafts)
        target[s, :n + 1] = probs(logits[j.row0:j.row0 + n + 1], j.params)
        q[s, :n] = j.draft_probs[:n]
        draws = torch.rand(n + 1, generator=j.gen, device=dev)
        u[s, :n], u[s, k] = draws[:n], draws[n]
    return _results(jobs, *ops.verify_random(target, q, drafts, num, u))
