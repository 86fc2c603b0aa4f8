"""Helpers shared by engine tests: run requests through an engine, and the oracle's answers."""
from __future__ import annotations

import asyncio

import random

from model_shards.generate import generate
from model_shards.sampling_params import SamplingParams
from model_shards.weights import load_checkpoint
from router.spec_policy import AdaptivePolicy, Choice


async def collect(engine, request_id, prompt, params, k=None):
    """All tokens of one request, and its finish reason."""
    tokens, reason = [], None
    async for out in engine.generate(request_id, prompt, params, k):
        tokens += out.new_token_ids
        reason = out.finish_reason
    return tokens, reason


def use_speculative_mode(engine, mode: str, policy) -> int:
    """Switch `engine` to one drafting mode of a comparison (None: leave it; a name: the built-in policy;
    an object: a policy of the test's); returns the k its requests ask for (0 for "off", else 3)."""
    if isinstance(policy, str):
        engine.set_speculative_policy(policy)
    elif policy is not None:
        engine.scheduler.policy = policy
    return 0 if mode == "off" else 3


async def staggered(engine, requests, late_after_tokens=3):
    """Start the first half of `requests`; start the rest once the first has produced some tokens,
    so new prompts arrive while others decode. requests: [(id, prompt, params, k)]."""
    early, late = requests[: len(requests) // 2], requests[len(requests) // 2:]
    first_tokens = asyncio.Event()
    results = {}

    async def run(rid, prompt, params, k, signal):
        tokens, reason = [], None
        async for out in engine.generate(rid, prompt, params, k):
            tokens += out.new_token_ids
            reason = out.finish_reason
            if signal and len(tokens) >= late_after_tokens:
                first_tokens.set()
        first_tokens.set()
        results[rid] = (tokens, reason)

    tasks = [asyncio.create_task(run(*r, i == 0)) for i, r in enumerate(early)]
    await asyncio.wait_for(first_tokens.wait(), 120)
    tasks += [asyncio.create_task(run(*r, False)) for r in late]
    await asyncio.wait_for(asyncio.gather(*tasks), 300)
    return results


class RandomDrafts(AdaptivePolicy):
    """An adaptive policy whose every choice is a coin toss: 0..cap drafts per sequence per step (seeded
    random sampling still k). Whatever a policy chooses must leave the outputs alone; this one chooses
    everything, including verifying fewer drafts than a sequence holds and proposing none."""

    def __init__(self, k: int, seed: int = 0):
        super().__init__(k)
        self.rng = random.Random(seed)

    def choose(self, cands, extra_tokens, budget, extra_seqs=0) -> Choice:
        self.num_choices += 1
        most = {c.seq_id: max(0, min(c.cap, self.k)) for c in cands}
        drafts = {c.seq_id: most[c.seq_id] if c.pinned else self.rng.randint(0, most[c.seq_id]) for c in cands}
        verify = {c.seq_id: min(most[c.seq_id], c.held) if c.pinned
                  else self.rng.randint(0, min(most[c.seq_id], c.held)) for c in cands}
        return Choice(drafts, verify)


def oracle(folder, prompt, params: SamplingParams, k=0):
    model = _model(str(folder))
    return generate(model, prompt, params, num_drafts=k).tokens


_MODELS: dict = {}


def _model(folder: str):
    if folder not in _MODELS:
        _MODELS[folder] = load_checkpoint(folder)
    return _MODELS[folder]


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views counted once): what is really allocated."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def weight_bytes(model) -> int:
    """What a stage holds as weights: parameters, buffers, and the drafter's copies (model_shards/drafter.py)."""
    ts = [*model.parameters(), *model.buffers()]
    d = model.drafter
    if d is not None:
        ts.append(d.head)
        if d.small is not None:
            ts += [*d.small[0].parameters(), *d.small[0].buffers(), d.small[1]]
    return storage_bytes(ts)
