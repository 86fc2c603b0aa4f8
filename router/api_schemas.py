"""OpenAI request bodies (chat and text completions), validated, and turned into SamplingParams.

Fields follow the OpenAI API plus vLLM's extensions that clients already send (`top_k`, `min_tokens`,
`ignore_eos`, `stop_token_ids`, `skip_special_tokens`, `return_token_ids`). Unknown fields are
ignored, as OpenAI-compatible servers do (SDKs send things like `user`). Tools, tool_choice and
chat_template_kwargs are in `tool_schemas.py`. Features we do not implement (`best_of`, suffix) fail with a
400 that names the field instead of being silently ignored: a client relying on them must know.

Every field is range-checked here (`LIMITS`), so no value reaches the engine that a plan cannot carry
(see model_shards/sampling_params.py); a 400 names the field and the limit. The limits are OpenAI's
where OpenAI has one (at most 4 `stop` strings, `n` in [1, 128], `temperature` in [0, 2], `top_p` in
[0, 1], penalties in [-2, 2], `logit_bias` values in [-100, 100], `seed` a signed 64-bit integer), else
vLLM's (`repetition_penalty` > 0, `min_p` in [0, 1]); the chat message rules (roles, content parts,
`tool_call_id`) are OpenAI's too, in `chat_messages.py`. Types are strict,
as in OpenAI's API: `"max_tokens": "5"` or `"seed": true` is a 400, not silently converted.

Also the bodies of vLLM's `/tokenize` and `/detokenize`.

Response bodies are plain dicts built in `responses.py`-style helpers of the front door, not models:
they are on the hot path of every streamed chunk.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from model_shards.sampling_params import INT32_MAX, MAX_LOGPROBS, MAX_STOP_TOKEN_IDS, SamplingParams, bound_text, show_value

from .chat_messages import ChatMessages
from .errors import InvalidRequest, Unsupported
from .structured_outputs import StructuredOutputFields
from .tool_schemas import ToolChoice
from .unserved_fields import UnservedChatFields

MAX_STOP_STRINGS = 4                  # OpenAI's limit ("up to 4 sequences"); each is searched in every delta
MAX_STOP_STRING_CHARS = 1024          # the stream holds back this many characters
MAX_N = 128                           # OpenAI's `n` maximum (the engine refuses more than it can run at once)
API_SEED_MIN, API_SEED_MAX = -2**63, 2**63 - 1   # OpenAI's `seed`: a signed 64-bit integer

TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
StopString = Annotated[str, Field(max_length=MAX_STOP_STRING_CHARS)]
# OpenAI's `metadata`: at most 16 pairs, keys up to 64 characters, values up to 512 (accepted, not stored).
Metadata = Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                     Field(max_length=16)]

# What a field must be, for the 400 of a value out of range (pydantic's own says only one bound).
_IN_INT32 = f"in [0, {bound_text(INT32_MAX)}]"
LIMITS = {
    "seed": "in [-2**63, 2**63-1]",
    "max_tokens": f"in [1, {bound_text(INT32_MAX)}]",
    "max_completion_tokens": f"in [1, {bound_text(INT32_MAX)}]",
    "min_tokens": _IN_INT32,
    "top_k": f"in [-1, {bound_text(INT32_MAX)}] (-1 and 0: off)",
    "temperature": "a finite number in [0, 2]",
    "top_p": "a finite number in [0, 1]",
    "n": f"an integer in [1, {MAX_N}]",
    "presence_penalty": "a finite number in [-2, 2]",
    "frequency_penalty": "a finite number in [-2, 2]",
    "logit_bias": "a finite number in [-100, 100]",
    "repetition_penalty": "a finite number > 0",
    "min_p": "a finite number in [0, 1]",
    "best_of": "an integer in [0, 20]",
    "logprobs": f"an integer in [0, {MAX_LOGPROBS}]",          # completions (chat's is a boolean)
    "top_logprobs": f"an integer in [0, {MAX_LOGPROBS}]",
    "stop_token_ids": f"a token id {_IN_INT32}",
    "prompt": f"a token id {_IN_INT32}",
    "tokens": f"a token id {_IN_INT32}",
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _GenerationBody(StructuredOutputFields, _Body):
    """What chat and text completions share (structured outputs: structured_outputs.py)."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=-1, le=INT32_MAX)
    seed: int | None = Field(default=None, ge=API_SEED_MIN, le=API_SEED_MAX)
    stop: Union[StopString, Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)], None] = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0, le=INT32_MAX)
    skip_special_tokens: bool = True
    return_token_ids: bool = False
    # Penalties, logit_bias and min_p as vLLM applies them (model_shards/penalties.py), MTP included.
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    repetition_penalty: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]] | None = None
    min_p: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    # Accepted only at its neutral values (see check_supported); out of range, a 400 "invalid".
    best_of: int | None = Field(default=None, ge=0, le=20)
    user: str | None = None

    _NEUTRAL = {"best_of": (None, 1)}

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def check_supported(self) -> None:
        for field, neutral in self._NEUTRAL.items():
            if getattr(self, field) not in neutral:
                raise Unsupported(f"{field}: not supported by this server (got {getattr(self, field)!r})",
                                  param=field)
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options: only allowed when stream is true", param="stream_options")

    def sampling_params(self, max_tokens: int, eos_ids: tuple[int, ...] = (),
                        defaults: dict[str, Any] | None = None) -> SamplingParams:
        """`max_tokens` is already resolved against the context; `defaults` come from generation_config."""
        d = defaults or {}
        temperature = self.temperature if self.temperature is not None else d.get("temperature", 1.0)
        top_p = self.top_p if self.top_p is not None else d.get("top_p", 1.0)
        # OpenAI accepts top_p 0: only the top token. The smallest positive float means exactly that here
        # (the sampler always keeps the top token), and SamplingParams keeps (0, 1].
        top_p = top_p if top_p > 0 else math.ulp(0.0)
        top_k = self.top_k if self.top_k is not None else d.get("top_k", 0)
        stop_ids = tuple(self.stop_token_ids or ())
        if not self.ignore_eos:
            stop_ids += tuple(t for t in eos_ids if t not in stop_ids)
        repetition = d.get("repetition_penalty", 1.0) if self.repetition_penalty is None else self.repetition_penalty
        min_p = self.min_p if self.min_p is not None else d.get("min_p", 0.0)
        params = SamplingParams(temperature=float(temperature), top_p=float(top_p), top_k=max(int(top_k), 0),
                                seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens,
                                stop_token_ids=stop_ids, ignore_eos=self.ignore_eos,
                                presence_penalty=float(self.presence_penalty or 0.0),
                                frequency_penalty=float(self.frequency_penalty or 0.0),
                                repetition_penalty=float(repetition), min_p=float(min_p),
                                logit_bias=self._logit_bias_pairs(), grammar=self.grammar(), n=self.n)
        try:
            params.validate()
        except ValueError as e:
            field = str(e).split(":", 1)[0]
            raise InvalidRequest(str(e), param=field) from None
        return params

    def _logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """OpenAI's {"token id": bias} as sorted (id, bias) pairs; a key that is not a token id is a 400."""
        pairs = {}
        for key, bias in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit() and len(key) <= 10 and int(key) <= INT32_MAX):
                raise InvalidRequest(f"logit_bias: keys must be token ids in [0, {bound_text(INT32_MAX)}], got "
                                     f"{show_value(key)}", param="logit_bias")
            pairs[int(key)] = float(bias)              # "7" and "007": the later one, as a dict would
        return tuple(sorted((t, b) for t, b in pairs.items() if b))

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(ChatMessages, UnservedChatFields, _GenerationBody):
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tool_choice: ToolChoice = None                  # checked in tool_schemas.check_tool_use
    parallel_tool_calls: bool | None = None
    metadata: Metadata | None = None
    store: bool | None = None                       # nothing is stored here; accepted as vLLM does

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:     # as OpenAI and vLLM
            raise InvalidRequest("top_logprobs: requires logprobs to be true", param="top_logprobs")


class CompletionRequest(_GenerationBody):
    prompt: Union[str, list[TokenId], list[str], list[list[TokenId]]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)    # vLLM's limit (OpenAI's is 5)
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise Unsupported("suffix: not supported by this server", param="suffix")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            if len(self.prompt) != 1:
                raise Unsupported(f"prompt: batches of prompts are not supported (got {len(self.prompt)}); send "
                                  f"one prompt per request", param="prompt")
        if isinstance(self.prompt, list) and not self.prompt:
            raise InvalidRequest("prompt: must not be empty", param="prompt")

    def single_prompt(self) -> Union[str, list[int]]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            return p[0]
        return p


class TokenizeCompletionRequest(_Body):
    """vLLM's `POST /tokenize` with a prompt."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(ChatMessages):
    """vLLM's `POST /tokenize` with messages: the ids a chat completion of them would get as its prompt."""

    model: str | None = None
    return_token_strs: bool | None = False


class DetokenizeRequest(_Body):
    """vLLM's `POST /detokenize`."""

    model: str | None = None
    tokens: list[TokenId]


def parse_tokenize(body: Any) -> Union[TokenizeCompletionRequest, TokenizeChatRequest]:
    """vLLM's union: a body with `messages` is the chat form, any other the prompt form."""
    if isinstance(body, dict) and "messages" in body:
        return parse_body(TokenizeChatRequest, body)
    return parse_body(TokenizeCompletionRequest, body)


def parse_body(model: type[_Body], body: Any) -> _Body:
    """Validate a JSON body; a failure becomes a 400 whose message names the first bad field."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", param=None)
    bad = _lone_surrogate(body)
    if bad is not None:
        raise InvalidRequest(f"{bad}: text must be valid Unicode (JSON allows a lone surrogate escape such as "
                             f"\\ud800, which no tokenizer can encode)", param=bad)
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None


def _lone_surrogate(body: dict) -> str | None:
    """Where the body holds a string (or key) with a lone UTF-16 surrogate, or None. Python's json
    decodes "\\ud800" into one, and UTF-8 encoding (tokenizers, logs, responses) then fails.
    Iterative: the body may be nested as deep as the JSON parser allowed."""
    stack: list[tuple[Any, tuple]] = [(body, ())]
    while stack:
        value, loc = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    return _loc_to_param(loc)
        elif isinstance(value, dict):
            for k, v in value.items():
                stack.append((k, loc))
                stack.append((v, loc + (k,)))
        elif isinstance(value, list):
            stack.extend((v, loc + (i,)) for i, v in enumerate(value))
    return None


def validation_error(e: ValidationError) -> InvalidRequest:
    err = _most_telling(e.errors())
    loc = err.get("loc", ())
    # logit_bias, metadata: OpenAI names the object, not the key (which may look like anything)
    param = loc[0] if loc[:1] in (("logit_bias",), ("metadata",)) else _loc_to_param(loc)
    kind, value = err.get("type", ""), err.get("input")
    if kind == "missing":
        return InvalidRequest(f"{param}: field required", param=param)
    field = next((p for p in loc if isinstance(p, str) and not _is_type_tag(p)), "")
    if kind == "too_long" and param == "stop":
        return InvalidRequest(f"stop: at most {MAX_STOP_STRINGS} stop sequences, as in OpenAI's API "
                              f"(got {len(value)})", param=param)
    if kind in _RANGE_ERRORS and field in LIMITS:
        return InvalidRequest(f"{param}: must be {LIMITS[field]}, got {show_value(value)}", param=param)
    msg = err.get("msg", "invalid value")
    return InvalidRequest(f"{param}: {msg}" + (f" (got {show_value(value)})" if _short(value) else ""), param=param)


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"}


def _most_telling(errors: list[dict]) -> dict:
    """The error to report: of the first bad field, a broken limit (a value of the right type) before
    a wrong type, then the deepest. pydantic lists one error per union branch (`prompt` as a string,
    as token ids, ...), and "should be a valid string" would hide "token id -1 is out of range"."""
    first = errors[0].get("loc", ())[:1]
    same = [err for err in errors if err.get("loc", ())[:1] == first]
    return min(same, key=lambda err: (err.get("type", "").endswith("_type"), -len(err.get("loc", ()))))


def _loc_to_param(loc) -> str:
    out = ""
    for part in loc:
        if part in ("body",):
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif _is_type_tag(part):      # pydantic's union branch names ("str", "list[int]")
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


def _is_type_tag(part: str) -> bool:
    return any(ch in part for ch in "[]-") or part in ("str", "int", "float", "bool", "list", "dict", "none")


def _short(value) -> bool:
    return isinstance(value, (int, float, str, bool)) and len(show_value(value)) <= 80
