"""Logprobs as vLLM reports them by default: the model's own distribution (float32 log_softmax over the full
vocabulary of the raw logits), before logit_bias, penalties, min_tokens masks, temperature, top-k/p.

Only for requests that ask (`SamplingParams.logprobs` / `prompt_logprobs`). What leaves the last stage is
msgpack-plain, one entry per token: `[logprob of the token, [top ids], [their logprobs]]`, the top list
`k` long, best first (torch.topk's order among exact ties). Rows give the next position's
token: row i of a verified sequence scores the token at its position i, so with MTP only the emitted
tokens (accepted drafts, then the bonus / corrected token) are reported, each from the row that
verification read it from: the distribution without MTP.
"""
from __future__ import annotations

import torch

PROMPT_ROWS_PER_CHUNK = 256  # prompt rows whose full-vocabulary logits exist at once (rows x V float32)


def raw_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """logits (n, V) -> logprobs (n, V) float32; a copy, so logit adjustments after it do not reach it."""
    return torch.log_softmax(logits.float(), dim=-1)


def entries(logprobs: torch.Tensor, tokens: list[int], k: int) -> list[list]:
    """logprobs (>= len(tokens), V): row i scores tokens[i] -> one entry per token (module docstring)."""
    n = len(tokens)
    if n == 0:
        return []
    rows = logprobs[:n]                                                          # (n, V)
    ids = torch.tensor(tokens, dtype=torch.long, device=rows.device)
    chosen = rows.gather(1, ids[:, None])[:, 0].tolist()                         # (n,)
    if k > 0:
        top_lp, top_ids = rows.topk(min(k, rows.shape[-1]), dim=-1)              # (n, k)
        top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
    else:
        top_lp = top_ids = [[] for _ in range(n)]
    return [[lp, i, t] for lp, i, t in zip(chosen, top_ids, top_lp)]


def prompt_entries(logits_of, h: torch.Tensor, tokens: list[int], k: int) -> list[list]:
    """Prompt logprobs for the rows h (n, d) (before norm_f), row i scoring tokens[i], computed
    PROMPT_ROWS_PER_CHUNK rows at a time so a long prefill chunk never holds n x V logits.
    `logits_of`: the model's hidden -> logits (n, V) float32."""
    out: list[list] = []
    for a in range(0, len(tokens), PROMPT_ROWS_PER_CHUNK):
        b = min(a + PROMPT_ROWS_PER_CHUNK, len(tokens))
        out += entries(raw_logprobs(logits_of(h[a:b])), tokens[a:b], k)
    return out
