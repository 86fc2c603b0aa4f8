"""`/openapi.json`: the HTTP API's OpenAPI 3.1 document, with the real request and response bodies.

FastAPI derives a schema from handler signatures, but ours read the raw `Request` (so that a bad body is
our 400 naming the field, not FastAPI's 422), so its schema would have no bodies. Here the request bodies
come from the pydantic models that validate them (`api_schemas.py`), with every limit a request must
respect, and the response bodies are written out for the dicts `responses.py` builds. Clients can
generate code from it, and the fuzz test (`tests/integration/test_fuzz_http.py`) generates requests
from it and checks that answers conform.
"""
from __future__ import annotations

from fastapi import FastAPI
from pydantic.json_schema import models_json_schema

from .api_schemas import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeChatRequest,
                          TokenizeCompletionRequest)

REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict:
    return {"$ref": REF.format(model=name)}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


_INT = {"type": "integer", "minimum": 0}
_TOKEN_IDS = {"type": "array", "items": _INT}
_USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
          "properties": {"prompt_tokens": _INT, "completion_tokens": _INT, "total_tokens": _INT,
                         # MTP drafts of the request that were verified: accepted / rejected (when any were)
                         "completion_tokens_details": {
                             "type": "object", "required": ["accepted_prediction_tokens", "rejected_prediction_tokens"],
                             "properties": {"accepted_prediction_tokens": _INT, "rejected_prediction_tokens": _INT}}}}


def _envelope(obj: str, choice: dict, chunk: bool = False) -> dict:
    """A completion (usage always there) or a streamed chunk (usage only when asked for, null until the end)."""
    required = ["id", "object", "created", "model", "choices"] + ([] if chunk else ["usage"])
    return {"type": "object", "required": required,
            "properties": {"id": {"type": "string"}, "object": {"const": obj}, "created": {"type": "integer"},
                           "model": {"type": "string"}, "choices": {"type": "array", "items": choice},
                           "usage": _nullable(_USAGE) if chunk else _USAGE, "prompt_token_ids": _TOKEN_IDS}}


def _sse_event(chunk: str) -> dict:
    """One server-sent event (OpenAPI 3.1 describes each event): `data:` is a JSON chunk, an in-band
    error (after the 200 header), or the closing `[DONE]`."""
    payload = {"type": "string", "contentMediaType": "application/json",
               "contentSchema": {"anyOf": [_ref(chunk), _ref("Error")]}}
    return {"type": "object", "required": ["data"],
            "properties": {"data": {"anyOf": [{"const": "[DONE]"}, payload]}}}


# logprobs (router/logprob_format.py): null unless the request asked for them.
_NUM = {"type": "number"}
_LP_ITEM = {"type": "object", "required": ["token", "logprob", "bytes"],
            "properties": {"token": {"type": "string"}, "logprob": _NUM, "bytes": {"type": "array", "items": _INT}}}
_CHAT_LOGPROBS = {"type": "object", "required": ["content"], "properties": {"content": {"type": "array", "items": {
    **_LP_ITEM, "required": [*_LP_ITEM["required"], "top_logprobs"],
    "properties": {**_LP_ITEM["properties"], "top_logprobs": {"type": "array", "items": _LP_ITEM}}}}}}
_COMPLETION_LOGPROBS = {"type": "object", "required": ["tokens", "token_logprobs", "top_logprobs", "text_offset"],
                        "properties": {"tokens": {"type": "array", "items": {"type": "string"}},
                                       "token_logprobs": {"type": "array", "items": _nullable(_NUM)},
                                       "top_logprobs": {"type": "array", "items": _nullable(
                                           {"type": "object", "additionalProperties": _NUM})},
                                       "text_offset": {"type": "array", "items": _INT}}}


def _choice(required: dict, optional: dict | None = None, logprobs: dict | None = None) -> dict:
    """A choice: `required` fields besides index, logprobs, finish_reason; token ids only when asked for."""
    props = {"index": _INT, "logprobs": _nullable(logprobs) if logprobs else {"type": "null"},
             "finish_reason": _nullable({"type": "string"}),
             **required, "token_ids": _TOKEN_IDS, **(optional or {})}
    return {"type": "object", "required": ["index", *required, "logprobs", "finish_reason"], "properties": props}


# --reasoning-parser / --tool-call-parser (chat_output.py): content null beside reasoning or tool calls.
_STR = {"type": "string"}
_FUNCTION = {"type": "object", "required": ["name", "arguments"], "properties": {"name": _STR, "arguments": _STR}}
_TOOL_CALL = {"type": "object", "required": ["id", "type", "function"],
              "properties": {"id": _STR, "type": {"const": "function"}, "function": _FUNCTION}}
_TOOL_CALL_DELTA = {"type": "object", "required": ["index"],
                    "properties": {"index": _INT, "id": _STR, "type": {"const": "function"},
                                   "function": {"type": "object", "properties": {"name": _STR, "arguments": _STR}}}}

RESPONSE_SCHEMAS = {
    "ChatCompletion": _envelope("chat.completion", _choice({"message": {
        "type": "object", "required": ["role", "content"],
        "properties": {"role": {"const": "assistant"}, "content": _nullable(_STR),
                       "reasoning_content": _nullable(_STR), "tool_calls": {"type": "array", "items": _TOOL_CALL}}}},
        logprobs=_CHAT_LOGPROBS)),
    "Completion": _envelope("text_completion", _choice({"text": {"type": "string"}},
                                                       {"prompt_token_ids": _TOKEN_IDS}, _COMPLETION_LOGPROBS)),
    "ChatCompletionChunk": _envelope("chat.completion.chunk", _choice({"delta": {
        "type": "object", "properties": {"role": {"const": "assistant"}, "content": _STR, "reasoning_content": _STR,
                                         "tool_calls": {"type": "array", "items": _TOOL_CALL_DELTA}}}},
        logprobs=_CHAT_LOGPROBS), chunk=True),
    "CompletionChunk": _envelope("text_completion", _choice({"text": {"type": "string"}}, logprobs=_COMPLETION_LOGPROBS),
                                 chunk=True),
    "Model": {"type": "object", "required": ["id", "object", "created", "owned_by"],
              "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                             "owned_by": {"type": "string"}, "root": {"type": "string"},
                             "max_model_len": _nullable(_INT)}},
    "ModelList": {"type": "object", "required": ["object", "data"],
                  "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}}},
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": _nullable({"type": "string"}),
                       "code": {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]}}}}},
    "TokenizeResponse": {"type": "object", "required": ["count", "max_model_len", "tokens"],
                         "properties": {"count": _INT, "max_model_len": _INT, "tokens": _TOKEN_IDS,
                                        "token_strs": _nullable({"type": "array", "items": {"type": "string"}})}},
    "DetokenizeResponse": {"type": "object", "required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
    "Status": {"type": "object", "required": ["status"],
               "properties": {"status": {"type": "string"}, "model": {"type": "string"}}},
}

_ERRORS = {
    "400": "invalid parameter or JSON, unsupported feature, context length exceeded",
    "401": "API key missing or wrong",
    "404": "unknown model",
    "413": "request body too large",
    "429": "queue full (see Retry-After)",
    "503": "loading, draining, or the engine is down (see Retry-After)",
}


def _tokenizer_op(request: dict, response: str, summary: str, secured: bool) -> dict:
    """vLLM's /tokenize and /detokenize: the tokenizer alone (no engine, so no 429)."""
    op = {"summary": summary,
          "requestBody": {"required": True, "content": {"application/json": {"schema": request}}},
          "responses": {"200": _json(_ref(response), summary), **_errors("400", "401", "404", "413", "503")}}
    return {"post": _secured(op, secured)}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: str) -> dict:
    return {c: _json(_ref("Error"), _ERRORS[c]) for c in codes}


def _generation(request: str, response: str, chunk: str, summary: str, secured: bool) -> dict:
    op = {"summary": summary,
          "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
          "responses": {"200": {"description": "the completion, or with `stream: true` server-sent events "
                                               "(`data: <chunk>` ... `data: [DONE]`)",
                                "content": {"application/json": {"schema": _ref(response)},
                                            "text/event-stream": {"schema": _sse_event(chunk)}}},
                        **_errors("400", "401", "404", "413", "429", "503")}}
    return {"post": _secured(op, secured)}


def _secured(op: dict, secured: bool) -> dict:
    return {**op, "security": [{"bearer": []}]} if secured else op


def build_openapi(title: str, version: str, secured: bool) -> dict:
    """The document; `secured`: /v1/*, /tokenize and /detokenize need `Authorization: Bearer <key>` (the probes never do)."""
    _, defs = models_json_schema([(m, "validation") for m in (ChatCompletionRequest, CompletionRequest,
                                                              TokenizeCompletionRequest, TokenizeChatRequest,
                                                              DetokenizeRequest)], ref_template=REF)
    model_id = {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}
    paths = {
        "/v1/chat/completions": _generation("ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk",
                                            "Chat completion", secured),
        "/v1/completions": _generation("CompletionRequest", "Completion", "CompletionChunk", "Text completion",
                                       secured),
        "/v1/models": {"get": _secured({"summary": "The served model", "responses": {
            "200": _json(_ref("ModelList"), "the served model"), **_errors("401")}}, secured)},
        "/v1/models/{model_id}": {"get": _secured({"summary": "One model", "parameters": [model_id], "responses": {
            "200": _json(_ref("Model"), "the model"), **_errors("401", "404")}}, secured)},
        "/tokenize": _tokenizer_op({"anyOf": [_ref("TokenizeCompletionRequest"), _ref("TokenizeChatRequest")]},
                                   "TokenizeResponse", "Token ids of a prompt, or of messages after the chat "
                                   "template (vLLM's)", secured),
        "/detokenize": _tokenizer_op(_ref("DetokenizeRequest"), "DetokenizeResponse", "Text of token ids (vLLM's)",
                                     secured),
        "/health": {"get": {"summary": "The process is up", "responses": {"200": _json(_ref("Status"), "up")}}},
        "/ready": {"get": {"summary": "The model is loaded and an engine is stepping", "responses": {
            "200": _json(_ref("Status"), "ready"), "503": _json(_ref("Status"), "not ready (see Retry-After)")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
            "200": {"description": "Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    }
    doc = {"openapi": "3.1.0", "info": {"title": title, "version": version}, "paths": paths,
           "components": {"schemas": {**defs["$defs"], **RESPONSE_SCHEMAS}}}
    if secured:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc


def install_openapi(app: FastAPI) -> None:
    """Serve `build_openapi` at the app's openapi_url (built on first use, then cached)."""
    def openapi() -> dict:
        if app.openapi_schema is None:
            fe = getattr(app.state, "frontend", None)
            app.openapi_schema = build_openapi(app.title, app.version, secured=bool(fe and fe.api_key))
        return app.openapi_schema

    app.openapi = openapi
