"""Request validation and error mapping of the front door (no engine, no server)."""
from __future__ import annotations

import grpc
import pytest

from router.api_schemas import ChatCompletionRequest, CompletionRequest, parse_body
from router.errors import APIError, ContextLengthExceeded, InvalidRequest, ModelNotFound, Overloaded, Unsupported
from router.frontend import Frontend, ModelInfo
from router.tokenizer import ByteTokenizer

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def frontend(**kw) -> Frontend:
    info = ModelInfo(name="m", max_model_len=64, vocab_size=300, eos_token_ids=[2], **kw)
    return Frontend(backend=None, tokenizer=ByteTokenizer(300), info=info, aliases=("default",))


@pytest.mark.parametrize("body, field", [
    ({**CHAT, "temperature": 3}, "temperature"),
    ({**CHAT, "top_p": 0}, "top_p"),
    ({**CHAT, "max_tokens": 0}, "max_tokens"),
    ({**CHAT, "messages": []}, "messages"),
    ({**CHAT, "messages": [{"content": "x"}]}, "messages[0].role"),
    ({"model": "m"}, "messages"),
    ({**CHAT, "min_tokens": -1}, "min_tokens"),
    ({**CHAT, "stop": 5}, "stop"),
])
def test_invalid_fields_are_named(body, field):
    with pytest.raises(InvalidRequest) as e:
        parse_body(ChatCompletionRequest, body)
    assert e.value.param == field and e.value.message.startswith(field), e.value.message
    assert e.value.status == 400


def test_body_must_be_an_object():
    with pytest.raises(InvalidRequest, match="JSON object"):
        parse_body(CompletionRequest, [1, 2])


@pytest.mark.parametrize("extra, field", [({"n": 2}, "n"), ({"logprobs": True}, "logprobs"),
                                          ({"presence_penalty": 0.5}, "presence_penalty"),
                                          ({"tools": [{"type": "function"}]}, "tools")])
def test_unsupported_features_are_clear_400s(extra, field):
    with pytest.raises(Unsupported) as e:
        frontend().prepare_chat(parse_body(ChatCompletionRequest, {**CHAT, **extra}))
    assert e.value.param == field and e.value.status == 400


def test_neutral_values_of_unsupported_fields_pass():
    fe = frontend()
    prep = fe.prepare_chat(parse_body(ChatCompletionRequest, {**CHAT, "n": 1, "presence_penalty": 0,
                                                               "frequency_penalty": 0.0, "user": "u"}))
    assert prep.kind == "chat"


def test_sampling_params_mapping_and_defaults():
    fe = frontend(generation_defaults={"temperature": 0.6, "top_p": 0.9})
    prep = fe.prepare_chat(parse_body(ChatCompletionRequest, {**CHAT, "max_completion_tokens": 7, "max_tokens": 3,
                                                               "seed": 5, "stop": "x", "top_k": 4, "min_tokens": 2}))
    p = prep.params
    assert (p.max_tokens, p.seed, p.top_k, p.min_tokens, p.temperature, p.top_p) == (7, 5, 4, 2, 0.6, 0.9)
    assert p.stop_token_ids == (2,) and prep.stop == ["x"]
    p = fe.prepare_chat(parse_body(ChatCompletionRequest, {**CHAT, "ignore_eos": True, "temperature": 0})).params
    assert p.ignore_eos and p.stop_token_ids == () and p.temperature == 0


def test_max_tokens_defaults():
    fe = frontend()
    chat = fe.prepare_chat(parse_body(ChatCompletionRequest, CHAT))
    assert chat.params.max_tokens == 64 - len(chat.prompt_ids)        # chat: the rest of the context
    comp = fe.prepare_completion(parse_body(CompletionRequest, {"prompt": "hello"}))
    assert comp.params.max_tokens == 16                               # completions: OpenAI's 16


def test_context_limit_states_limit_and_counts():
    fe = frontend()
    with pytest.raises(ContextLengthExceeded) as e:
        fe.prepare_completion(parse_body(CompletionRequest, {"prompt": "x" * 80}))
    assert "64" in e.value.message and "81" in e.value.message and e.value.param == "prompt"
    with pytest.raises(ContextLengthExceeded) as e:
        fe.prepare_completion(parse_body(CompletionRequest, {"prompt": "x" * 9, "max_tokens": 60}))
    assert "70" in e.value.message and "10 in the prompt" in e.value.message and e.value.param == "max_tokens"


def test_unknown_model_is_404_and_aliases_work():
    fe = frontend()
    with pytest.raises(ModelNotFound) as e:
        fe.prepare_chat(parse_body(ChatCompletionRequest, {**CHAT, "model": "gpt-4"}))
    assert e.value.status == 404 and "gpt-4" in e.value.message and e.value.param == "model"
    assert fe.prepare_chat(parse_body(ChatCompletionRequest, {**CHAT, "model": "default"})).model == "m"
    assert fe.prepare_chat(parse_body(ChatCompletionRequest, {**CHAT, "model": None})).model == "m"


def test_completion_prompts():
    fe = frontend()
    assert fe.prepare_completion(parse_body(CompletionRequest, {"prompt": [5, 6, 7]})).prompt_ids == [5, 6, 7]
    assert fe.prepare_completion(parse_body(CompletionRequest, {"prompt": ["ab"]})).prompt_ids == [1, 100, 101]
    with pytest.raises(Unsupported, match="batches"):
        fe.prepare_completion(parse_body(CompletionRequest, {"prompt": ["a", "b"]}))
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        fe.prepare_completion(parse_body(CompletionRequest, {"prompt": [5, 999]}))
    with pytest.raises(InvalidRequest, match="min_tokens"):
        fe.prepare_completion(parse_body(CompletionRequest, {"prompt": "a", "max_tokens": 2, "min_tokens": 3}))


def test_api_key():
    fe = frontend()
    fe.check_api_key(None)
    fe.api_key = "k"
    with pytest.raises(APIError) as e:
        fe.check_api_key(None)
    assert e.value.status == 401 and e.value.type == "authentication_error"
    with pytest.raises(APIError, match="invalid"):
        fe.check_api_key("wrong")
    fe.check_api_key("k")


def test_error_shapes_and_grpc_codes():
    e = Overloaded("queue is full", retry_after_s=2.4)
    assert e.to_json() == {"error": {"message": "queue is full", "type": "rate_limit_error", "param": None,
                                     "code": "queue_full"}}
    assert e.headers() == {"Retry-After": "2"} and e.status == 429
    assert e.grpc_code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert InvalidRequest("x").grpc_code == grpc.StatusCode.INVALID_ARGUMENT
    assert ModelNotFound("x").grpc_code == grpc.StatusCode.NOT_FOUND
