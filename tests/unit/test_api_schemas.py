"""Request validation and error mapping of the front door (no engine, no server)."""
from __future__ import annotations

import grpc
import pytest

from model_shards.sampling_params import SamplingParams
from router.api_schemas import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeChatRequest,
                                TokenizeCompletionRequest, parse_body, parse_tokenize)
from router.errors import APIError, ContextLengthExceeded, InvalidRequest, ModelNotFound, Overloaded, Unsupported
from router.frontend import Frontend, ModelInfo
from router.tokenizer import ByteTokenizer

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def frontend(**kw) -> Frontend:
    info = ModelInfo(name="m", max_model_len=64, vocab_size=300, eos_token_ids=[2], **kw)
    return Frontend(backend=None, tokenizer=ByteTokenizer(300), info=info, aliases=("default",))


@pytest.mark.parametrize("body, field", [
    ({**CHAT, "temperature": 3}, "temperature"),
    ({**CHAT, "top_p": 1.01}, "top_p"),                   # OpenAI's [0, 1]: 0 itself is accepted
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


@pytest.mark.parametrize("extra, field", [({"best_of": 2}, "best_of"),
                                          # without --tool-call-parser (tool definitions: test_tool_call_parser.py)
                                          ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools")])
def test_unsupported_features_are_clear_400s(extra, field):
    with pytest.raises(Unsupported) as e:
        frontend().prepare_chat(parse_body(ChatCompletionRequest, {**CHAT, **extra}))
    assert e.value.param == field and e.value.status == 400


def test_n_choices_reach_the_engine_in_the_sampling_params():
    """n > 1 is served (router/fork.py); how many the engine runs at once, it checks itself (a 400 naming n)."""
    prep = frontend().prepare_chat(parse_body(ChatCompletionRequest, {**CHAT, "n": 3}))
    assert prep.params.n == 3


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


# ---- OpenAI's rules, with OpenAI's names in `param` ---------------------------------------------------

def msgs(*messages) -> dict:
    return {**CHAT, "messages": list(messages)}


USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize("body, param", [
    (msgs({"role": "bot", "content": "x"}), "messages[0].role"),                 # not an OpenAI role
    (msgs(USER, {"role": "function", "content": "x"}), "messages[1].role"),     # deprecated, not served
    (msgs(USER, {"role": "tool", "content": "42"}), "messages[1].tool_call_id"),
    (msgs({"role": "user", "content": None}), "messages[0].content"),            # only assistants may be null
    (msgs({"role": "system"}), "messages[0].content"),
    (msgs({"role": "user", "content": [{"type": "text"}]}), "messages[0].content[0].text"),
    (msgs({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "video", "text": "b"}]}),
     "messages[0].content[1].type"),
    ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),                       # OpenAI: up to 4
    ({**CHAT, "n": 129}, "n"),                                                   # OpenAI: [1, 128]
    ({**CHAT, "n": 0}, "n"),
    ({**CHAT, "temperature": -0.1}, "temperature"),                               # [0, 2]
    ({**CHAT, "presence_penalty": 2.5}, "presence_penalty"),                      # [-2, 2]
    ({**CHAT, "frequency_penalty": -3}, "frequency_penalty"),
    ({**CHAT, "logit_bias": {"50": 101}}, "logit_bias"),                          # values in [-100, 100]
    ({**CHAT, "logit_bias": {"-7": -1000}}, "logit_bias"),
    ({**CHAT, "logit_bias": {"-7": 1}}, "logit_bias"),                            # keys are token ids
    ({**CHAT, "logit_bias": {"x": 1}}, "logit_bias"),
    ({**CHAT, "logit_bias": {"4294967296": 1}}, "logit_bias"),
    ({**CHAT, "logit_bias": {"300": 1}}, "logit_bias"),                           # outside the vocabulary
    ({**CHAT, "repetition_penalty": 0}, "repetition_penalty"),                    # vLLM: > 0
    ({**CHAT, "repetition_penalty": -1.5}, "repetition_penalty"),
    ({**CHAT, "min_p": 1.5}, "min_p"),                                            # vLLM: [0, 1]
    ({**CHAT, "min_p": -0.1}, "min_p"),
    ({**CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),              # >= 1
    ({**CHAT, "seed": 2**63}, "seed"),                                            # a signed 64-bit integer
    ({**CHAT, "seed": 1.5}, "seed"),
    ({**CHAT, "user": 7}, "user"),                                                # a string
    (msgs({"role": "user", "content": []}), "messages[0].content"),              # OpenAI: at least one part
    (msgs({"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}),
     "messages[0].content[0].type"),                                              # system: text parts only
    (msgs({"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}), "messages[0].content[0].type"),
    (msgs(USER, {"role": "assistant", "content": [{"type": "refusal"}]}), "messages[1].content[0].refusal"),
    (msgs({"role": "user", "content": "x", "name": 5}), "messages[0].name"),
    (msgs({"role": "user", "content": "x", "name": "Ann Lee"}), "messages[0].name"),    # OpenAI: no whitespace,
    (msgs({"role": "user", "content": "x", "name": "<|system|>"}), "messages[0].name"),  # nor < | \ / >
    ({**CHAT, "modalities": ["video"]}, "modalities[0]"),
    (msgs({"role": "tool", "content": "x", "tool_call_id": 5}), "messages[0].tool_call_id"),
    (msgs({"role": "user", "content": "x", "reasoning_content": "r"}), "messages[0].reasoning_content"),
    ({**CHAT, "continue_final_message": True, "add_generation_prompt": True}, "continue_final_message"),
    ({**CHAT, "add_special_tokens": 1}, "add_special_tokens"),
    ({**CHAT, "metadata": {"k" * 65: "v"}}, "metadata"),                          # keys up to 64 characters
    ({**CHAT, "metadata": {"k": "v" * 513}}, "metadata"),                         # values up to 512
    ({**CHAT, "metadata": {str(i): "v" for i in range(17)}}, "metadata"),         # at most 16 pairs
    ({**CHAT, "metadata": {"k": 1}}, "metadata"),
    ({**CHAT, "store": "yes"}, "store"),
])
def test_what_openai_rejects_is_a_400_naming_openais_param(body, param):
    with pytest.raises(InvalidRequest) as e:
        frontend().prepare_chat(parse_body(ChatCompletionRequest, body))
    assert e.value.status == 400 and e.value.param == param and e.value.message.startswith(param + ":"), e.value


@pytest.mark.parametrize("part", [{"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                                  {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}])
def test_openai_content_parts_other_than_text_are_unsupported_naming_the_part(part):
    with pytest.raises(Unsupported) as e:
        parse_body(ChatCompletionRequest, msgs({"role": "user", "content": [{"type": "text", "text": "a"}, part]}))
    assert e.value.param == "messages[0].content[1].type" and part["type"] in e.value.message


@pytest.mark.parametrize("extra, param", [({"best_of": 20}, "best_of"),
                                          ({"chat_template": "{{ messages }}"}, "chat_template"),
                                          ({"modalities": ["text", "audio"]}, "modalities"),
                                          ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
                                          ({"functions": [{"name": "f"}]}, "functions"),     # deprecated: tools
                                          ({"function_call": "auto"}, "function_call"),
                                          ({"web_search_options": {}}, "web_search_options")])
def test_in_openais_range_but_not_served_is_unsupported_not_invalid(extra, param):
    with pytest.raises(Unsupported) as e:
        frontend().prepare_chat(parse_body(ChatCompletionRequest, {**CHAT, **extra}))
    assert e.value.param == param and e.value.code == "unsupported_parameter"


def test_every_openai_role_is_accepted_and_developer_is_system_for_the_template():
    req = parse_body(ChatCompletionRequest, msgs(
        {"role": "developer", "content": "be brief"}, {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None}, {"role": "tool", "content": "42", "tool_call_id": "call_1"},
        {"role": "user", "content": "ok", "name": "ann"}))
    assert req.chat_messages() == [
        {"role": "system", "content": "be brief"}, {"role": "system", "content": "s"},
        {"role": "user", "content": "a\nb"}, {"role": "assistant", "content": ""},      # parts joined as vLLM does
        {"role": "tool", "content": "42", "tool_call_id": "call_1"}, {"role": "user", "content": "ok", "name": "ann"}]
    fe = frontend()
    dev = fe.prepare_chat(parse_body(ChatCompletionRequest, msgs({"role": "developer", "content": "x"}, USER)))
    sys = fe.prepare_chat(parse_body(ChatCompletionRequest, msgs({"role": "system", "content": "x"}, USER)))
    assert dev.prompt_ids == sys.prompt_ids


def test_penalties_logit_bias_and_min_p_reach_the_sampling_params():
    body = {**CHAT, "presence_penalty": 2, "frequency_penalty": -2, "repetition_penalty": 1.3, "min_p": 0.05,
            "logit_bias": {"50": 100, "7": -100, "9": 0, "007": -5}}
    params = frontend().prepare_chat(parse_body(ChatCompletionRequest, body)).params
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty, params.min_p) == \
        (2.0, -2.0, 1.3, 0.05)
    assert params.logit_bias == ((7, -5.0), (50, 100.0))          # by id; a zero bias is no bias
    assert SamplingParams.from_dict(params.to_dict()) == params     # as plans carry them
    comp = frontend().prepare_completion(parse_body(CompletionRequest, {"prompt": "hi", "min_p": 1,
                                                                        "repetition_penalty": 0.5}))
    assert comp.params.min_p == 1.0 and comp.params.repetition_penalty == 0.5


def test_repetition_penalty_and_min_p_default_from_generation_config():
    fe = frontend(generation_defaults={"repetition_penalty": 1.1, "min_p": 0.02})
    params = fe.prepare_chat(parse_body(ChatCompletionRequest, CHAT)).params
    assert params.repetition_penalty == 1.1 and params.min_p == 0.02
    params = fe.prepare_chat(parse_body(ChatCompletionRequest, {**CHAT, "repetition_penalty": 1.0, "min_p": 0})).params
    assert params.repetition_penalty == 1.0 and params.min_p == 0.0 and not params.adjusts_logits


def test_four_stop_strings_and_openai_edge_values_pass():
    prep = frontend().prepare_chat(parse_body(ChatCompletionRequest, {
        **CHAT, "stop": ["a", "b", "c", "d"], "temperature": 2, "top_p": 1, "seed": -2**63, "presence_penalty": 0,
        "logit_bias": {}, "max_completion_tokens": 1, "user": "u"}))
    assert prep.stop == ["a", "b", "c", "d"] and prep.params.seed == -2**63 and prep.params.max_tokens == 1


def test_invalid_part_types_for_a_role_are_invalid_and_known_unserved_ones_unsupported():
    """OpenAI's per-role part types: an image in a system message is a mistake (invalid); in a user message it
    is valid OpenAI that this text-only server does not serve (unsupported)."""
    image = {"type": "image_url", "image_url": {"url": "https://x/a.png"}}
    with pytest.raises(InvalidRequest) as e:
        parse_body(ChatCompletionRequest, msgs({"role": "developer", "content": [image]}, USER))
    assert "'developer'" in e.value.message and e.value.code != "unsupported_parameter"
    with pytest.raises(Unsupported) as e:
        parse_body(ChatCompletionRequest, msgs(USER, {"role": "user", "content": [image]}))
    assert e.value.param == "messages[1].content[0].type"


def test_an_assistants_refusal_parts_and_reasoning_reach_the_template():
    req = parse_body(ChatCompletionRequest, msgs(USER, {
        "role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "refusal", "refusal": "no"}],
        "reasoning_content": "think", "refusal": None}, {"role": "assistant", "content": "b", "reasoning": "r2"}))
    assert req.chat_messages()[1:] == [{"role": "assistant", "content": "a\nno", "reasoning_content": "think"},
                                       {"role": "assistant", "content": "b", "reasoning_content": "r2"}]


def test_openai_fields_that_do_not_change_the_output_are_accepted():
    prep = frontend().prepare_chat(parse_body(ChatCompletionRequest, {
        **CHAT, "store": False, "metadata": {"k" * 64: "v" * 512}, "modalities": ["text"], "service_tier": "auto",
        "prediction": {"type": "content", "content": "hi"}, "messages": [{**USER, "name": "Zoë_2-b"}]}))
    assert prep.prompt_ids == frontend().prepare_chat(parse_body(ChatCompletionRequest, CHAT)).prompt_ids


# ---- /tokenize and /detokenize (vLLM's), without the HTTP app -------------------------------------------

def test_tokenize_a_prompt_with_and_without_special_tokens():
    fe = frontend()
    assert fe.tokenize(parse_tokenize({"prompt": "ab"})) == {"count": 3, "max_model_len": 64, "tokens": [1, 100, 101],
                                                             "token_strs": None}       # vLLM's: null unless asked
    out = fe.tokenize(parse_tokenize({"model": "m", "prompt": "ab", "add_special_tokens": False,
                                      "return_token_strs": True}))
    assert out == {"count": 2, "max_model_len": 64, "tokens": [100, 101], "token_strs": ["a", "b"]}


def test_tokenize_messages_gives_the_prompt_a_chat_completion_gets():
    fe = frontend()
    body = msgs({"role": "developer", "content": "x"}, USER)
    req = parse_tokenize(body)
    assert isinstance(req, TokenizeChatRequest)
    assert fe.tokenize(req)["tokens"] == fe.prepare_chat(parse_body(ChatCompletionRequest, body)).prompt_ids
    without = fe.tokenize(parse_tokenize({**body, "add_generation_prompt": False}))["tokens"]
    assert without == fe.tokenizer.encode_chat(req.chat_messages(), add_generation_prompt=False)


def test_tokenize_messages_with_vllms_continue_final_message():
    """(add_special_tokens: tests/unit/test_chat_template_parity.py, with a template that writes BOS itself.)"""
    fe = frontend()
    body = msgs(USER, {"role": "assistant", "content": "The answer is"})
    plain = fe.tokenize(parse_tokenize({**body, "add_generation_prompt": False}))["tokens"]
    cont = fe.tokenize(parse_tokenize({**body, "continue_final_message": True}))["tokens"]
    assert fe.tokenizer.decode(cont).endswith("<|assistant|>\nThe answer is"), "the last message is left open"
    assert cont == plain[:len(cont)] and len(cont) < len(plain)
    chat = fe.prepare_chat(parse_body(ChatCompletionRequest, {**body, "continue_final_message": True}))
    assert chat.prompt_ids == cont                   # a chat completion gets the same prompt


@pytest.mark.parametrize("body, param", [({}, "prompt"), ({"prompt": 5}, "prompt"), ({"messages": []}, "messages"),
                                         (msgs({"role": "tool", "content": "x"}), "messages[0].tool_call_id"),
                                         ({"prompt": "a", "add_special_tokens": "yes"}, "add_special_tokens")])
def test_tokenize_validates_like_the_completions(body, param):
    with pytest.raises(InvalidRequest) as e:
        parse_tokenize(body)
    assert e.value.param == param


def test_detokenize_and_its_errors():
    fe = frontend()
    # vLLM's: special tokens shown (transformers' decode default)
    assert fe.detokenize(parse_body(DetokenizeRequest, {"tokens": [1, 100, 101, 2]})) == {"prompt": "<s>ab</s>"}
    assert fe.detokenize(parse_body(DetokenizeRequest, {"tokens": [100, 101]})) == {"prompt": "ab"}
    assert fe.detokenize(parse_body(DetokenizeRequest, {"tokens": []})) == {"prompt": ""}
    with pytest.raises(InvalidRequest) as e:
        fe.detokenize(parse_body(DetokenizeRequest, {"tokens": [5, 300]}))          # the vocabulary is [0, 300)
    assert e.value.param == "tokens" and "300" in e.value.message
    with pytest.raises(InvalidRequest) as e:
        parse_body(DetokenizeRequest, {"tokens": [-1]})
    assert e.value.param == "tokens[0]"
    with pytest.raises(ModelNotFound):
        fe.detokenize(parse_body(DetokenizeRequest, {"model": "gpt-4", "tokens": [5]}))
    assert isinstance(parse_tokenize({"prompt": "x"}), TokenizeCompletionRequest)
