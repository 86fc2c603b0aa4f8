"""OpenAI response bodies as plain dicts, and Server-Sent Events framing.

Plain dicts (no pydantic) because one is built for every streamed chunk. Shapes follow the OpenAI API
(`chat.completion`, `chat.completion.chunk`, `text_completion`); vLLM's `token_ids` /
`prompt_token_ids` are added only when the request asked for `return_token_ids`.
"""
from __future__ import annotations

import json

SSE_DONE = b"data: [DONE]\n\n"


def sse(obj: dict) -> bytes:
    """One SSE event: `data: <json>` and a blank line."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int, predictions: tuple[int, int] | None = None) -> dict:
    """OpenAI's usage; `predictions` (accepted, rejected) MTP drafts, when the request verified any, go in
    `completion_tokens_details` as OpenAI reports predicted-output tokens."""
    u = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
         "total_tokens": prompt_tokens + completion_tokens}
    if predictions is not None:
        u["completion_tokens_details"] = {"accepted_prediction_tokens": predictions[0],
                                          "rejected_prediction_tokens": predictions[1]}
    return u


def _envelope(rid: str, created: int, model: str, obj: str, choices: list[dict]) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}


def _with_token_ids(choice: dict, token_ids: list[int] | None) -> dict:
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def _chunk(rid: str, created: int, model: str, obj: str, choice: dict, usage_: dict | None,
           with_usage_field: bool) -> dict:
    """A streamed chunk; `usage` is there (null until the last chunk) when the client asked for usage."""
    body = _envelope(rid, created, model, obj, [choice])
    if with_usage_field or usage_ is not None:
        body["usage"] = usage_
    return body


def chat_response(rid: str, created: int, model: str, text: str, finish_reason: str | None, prompt_tokens: int,
                  completion_tokens: int, token_ids: list[int] | None = None,
                  prompt_token_ids: list[int] | None = None, predictions: tuple[int, int] | None = None,
                  message: dict | None = None, logprobs: dict | None = None) -> dict:
    """`message`: instead of `{"role": "assistant", "content": text}` (with reasoning_content / tool_calls).
    `logprobs`: the choice's (logprob_format.py), null unless the request asked."""
    message = message if message is not None else {"role": "assistant", "content": text}
    choice = _with_token_ids({"index": 0, "message": message, "logprobs": logprobs,
                              "finish_reason": finish_reason}, token_ids)
    body = _envelope(rid, created, model, "chat.completion", [choice])
    body["usage"] = usage(prompt_tokens, completion_tokens, predictions)
    if prompt_token_ids is not None:  # chat: on the body (vLLM); completions: on the choice
        body["prompt_token_ids"] = prompt_token_ids
    return body


def chat_chunk(rid: str, created: int, model: str, delta: dict, finish_reason: str | None = None,
               token_ids: list[int] | None = None, usage_: dict | None = None, with_usage_field: bool = False,
               logprobs: dict | None = None) -> dict:
    choice = _with_token_ids({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason},
                             token_ids)
    return _chunk(rid, created, model, "chat.completion.chunk", choice, usage_, with_usage_field)


def completion_response(rid: str, created: int, model: str, text: str, finish_reason: str | None,
                        prompt_tokens: int, completion_tokens: int, token_ids: list[int] | None = None,
                        prompt_token_ids: list[int] | None = None,
                        predictions: tuple[int, int] | None = None, logprobs: dict | None = None) -> dict:
    choice = _with_token_ids({"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason},
                             token_ids)
    if prompt_token_ids is not None:
        choice["prompt_token_ids"] = prompt_token_ids
    body = _envelope(rid, created, model, "text_completion", [choice])
    body["usage"] = usage(prompt_tokens, completion_tokens, predictions)
    return body


def completion_chunk(rid: str, created: int, model: str, text: str, finish_reason: str | None = None,
                     token_ids: list[int] | None = None, usage_: dict | None = None,
                     with_usage_field: bool = False, logprobs: dict | None = None) -> dict:
    choice = _with_token_ids({"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason},
                             token_ids)
    return _chunk(rid, created, model, "text_completion", choice, usage_, with_usage_field)


def usage_chunk(rid: str, created: int, model: str, obj: str, prompt_tokens: int, completion_tokens: int,
                predictions: tuple[int, int] | None = None) -> dict:
    """The last chunk when `stream_options.include_usage` is set: no choices, the request's usage."""
    body = _envelope(rid, created, model, obj, [])
    body["usage"] = usage(prompt_tokens, completion_tokens, predictions)
    return body


def models_list(model: str, created: int, max_model_len: int) -> dict:
    return {"object": "list", "data": [model_card(model, created, max_model_len)]}


def model_card(model: str, created: int, max_model_len: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "hybridserve", "root": model,
            "max_model_len": max_model_len}
