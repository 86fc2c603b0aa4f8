"""The engine's logprob entries as OpenAI's response fields, and what a request asks for.

An entry per token is `[logprob, [top ids], [top logprobs]]` (model_shards/logprobs.py: the raw distribution,
before penalties and temperature). Here ids become text: a token's `token` is its own decoded text (special
tokens included) and `bytes` that text's UTF-8 bytes, as vLLM reports them.

Chat (`logprobs: true`, `top_logprobs: k`): `choices[i].logprobs = {"content": [{token, logprob, bytes,
top_logprobs: [{token, logprob, bytes}] * k}]}`, per chunk when streamed.
Completions (`logprobs: k`): `choices[i].logprobs = {tokens, token_logprobs, top_logprobs, text_offset}` with
each top_logprobs item a {token: logprob} dict of the k best plus the chosen token (vLLM's); with `echo`
the prompt's tokens come first, the first of them with null logprob and null top_logprobs (nothing
precedes it); text_offset: the length of the token texts before it in the choice (echo included), vLLM's.
"""
from __future__ import annotations

from .tokenizer import BaseTokenizer


def requested(req, kind: str) -> dict:
    """The SamplingParams fields a validated request (`kind` "chat" or "completion") asks for; api_schemas
    checked the ranges."""
    if kind == "chat":
        return {"logprobs": (req.top_logprobs or 0) if req.logprobs else None}
    k = req.logprobs
    return {"logprobs": k, "prompt_logprobs": k if k is not None and req.echo else None}


class LogprobFormatter:
    """One response's conversion (caches each token's text: the same ids recur in top lists)."""

    def __init__(self, tokenizer: BaseTokenizer):
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}
        self.offset = 0                                      # completions: characters of the text so far

    def token(self, t: int) -> str:
        text = self._text.get(t)
        if text is None:
            text = self._text[t] = self.tokenizer.decode([t], skip_special_tokens=False)
        return text

    def _item(self, t: int, logprob: float) -> dict:
        text = self.token(t)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def chat(self, token_ids: list[int], entries: list | None) -> dict | None:
        """`choices[i].logprobs` for these tokens (None when the request did not ask)."""
        if entries is None:
            return None
        content = []
        for t, (logprob, ids, lps) in zip(token_ids, entries):
            item = self._item(t, logprob)
            item["top_logprobs"] = [self._item(i, v) for i, v in zip(ids, lps)]
            content.append(item)
        return {"content": content}

    def completion(self, token_ids: list[int], entries: list | None, first_has_none: bool = False) -> dict | None:
        """`choices[i].logprobs` for these tokens; `first_has_none`: the first is the prompt's first token
        (echo), with no logprob. Advances `offset` by the tokens' texts."""
        if entries is None:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        if first_has_none and token_ids:
            entries = [None] + list(entries)
        for t, entry in zip(token_ids, entries):
            text = self.token(t)
            out["tokens"].append(text)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            logprob, ids, lps = entry
            top = {self.token(i): v for i, v in zip(ids, lps)}
            top.setdefault(text, logprob)
            out["token_logprobs"].append(logprob)
            out["top_logprobs"].append(top)
        return out

    def echoed(self, prompt_ids: list[int], prompt_entries: list | None) -> dict:
        """The completions logprobs of an echoed prompt: its first token has none."""
        return self.completion(prompt_ids, prompt_entries or [], first_has_none=True)


def joined(*parts: dict | None) -> dict | None:
    """Completions logprobs of consecutive pieces (echo, then output) as one."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    return {key: [v for p in parts for v in p[key]] for key in parts[0]}
