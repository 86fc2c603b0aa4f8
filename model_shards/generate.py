"""Single-process generation: the oracle the distributed engine is checked against.

One sequence, the whole model in this process, the same tail logic (verify, sample, MTP draft) as the
cluster's last stage. Readable first: a request here is a loop of `model(...)` and `run_tail(...)`.
"""
from __future__ import annotations

import dataclasses
import math
import random

import torch

from .batch import BatchLayout
from .model import HybridModel
from .sampling_params import SamplingParams, check_stop, drafts_to_verify
from .tail import DraftStore, TailRequest, run_tail


@dataclasses.dataclass
class Generation:
    tokens: list[int]                 # generated tokens (prompt excluded)
    finish_reason: str
    num_drafted: int = 0
    num_accepted: int = 0
    passes: int = 0                   # forward passes after the prompt
    logprobs: list | None = None      # per generated token, when params.logprobs is set (model_shards/logprobs.py)
    prompt_logprobs: list | None = None   # per prompt token 1.., when params.prompt_logprobs is set

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens gained per verification pass (1 + accepted drafts), the usual MTP figure."""
        return len(self.tokens) / max(self.passes, 1)


@torch.no_grad()
def generate(model: HybridModel, prompt: list[int], params: SamplingParams, *, num_drafts: int = 0,
             prefill_chunk: int | None = None, block_size: int = 16) -> Generation:
    if num_drafts and model.mtp is None:
        raise ValueError("num_drafts > 0 needs a model with an MTP block")
    seed = params.seed if params.seed is not None else random.getrandbits(62)
    max_len = len(prompt) + params.max_tokens + 2 * num_drafts + 2
    n_blocks = math.ceil(max_len / block_size)
    cache = model.make_cache(num_blocks=n_blocks, block_size=block_size, num_slots=1,
                             max_verify_positions=num_drafts + 1)
    table = torch.arange(n_blocks)
    store = DraftStore()
    eos = None if params.ignore_eos else model.cfg.eos_token_id

    def step(ids: list[int], start: int, drafts: list[int], sample: bool, next_token: int | None):
        layout = BatchLayout.single(len(ids), start, table, keep_states=bool(drafts))
        h = model(torch.tensor(ids), layout, cache)
        req = TailRequest(0, ids, drafts, sample, next_token, params, seed, num_drafts, len(prompt))
        return run_tail(model, cache, h, layout, [req], store)[0]

    # Prompt, in chunks if asked.
    chunk = prefill_chunk or len(prompt)
    prompt_lps: list = []
    for start in range(0, len(prompt), chunk):
        ids = prompt[start:start + chunk]
        final = start + chunk >= len(prompt)
        res = step(ids, start, [], final, None if final else prompt[start + chunk])
        prompt_lps += res.prompt_logprobs or []
    out = Generation(tokens=list(res.new_tokens), finish_reason="")
    if params.prompt_logprobs is not None:
        out.prompt_logprobs = prompt_lps
    if params.logprobs is not None:
        out.logprobs = list(res.logprobs)
    drafts, pos = res.drafts, len(prompt)
    while True:
        keep, reason = check_stop(out.tokens, params, eos)
        if reason:
            out.tokens, out.finish_reason = out.tokens[:keep], reason
            if out.logprobs is not None:
                del out.logprobs[keep:]
            return out
        drafts = drafts_to_verify(drafts, len(out.tokens), params)
        res = step([out.tokens[-1]] + drafts, pos, drafts, True, None)
        out.passes += 1
        out.num_drafted += len(drafts)
        out.num_accepted += res.num_accepted
        if drafts:
            cache.commit(0, res.num_accepted)          # Mamba state at the last accepted position
        pos += 1 + res.num_accepted
        out.tokens.extend(res.new_tokens)
        if out.logprobs is not None:
            out.logprobs.extend(res.logprobs)
        drafts = res.drafts
