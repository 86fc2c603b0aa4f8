"""OpenAI request bodies (chat and text completions), validated, and turned into SamplingParams.

Fields follow the OpenAI API plus vLLM's extensions that clients already send (`top_k`, `min_tokens`,
`ignore_eos`, `stop_token_ids`, `skip_special_tokens`, `return_token_ids`). Unknown fields are
ignored, as OpenAI-compatible servers do (SDKs send things like `user` or `parallel_tool_calls`).
Features we do not implement (logprobs, penalties, tools, n > 1) fail with a 400 that names the field
instead of being silently ignored: a client relying on them must know.

Every field is range-checked here (`LIMITS`), so no value reaches the engine that a plan cannot carry
(see model_shards/sampling_params.py); a 400 names the field and the limit. Types are strict, as in
OpenAI's API: `"max_tokens": "5"` or `"seed": true` is a 400, not silently converted.

Response bodies are plain dicts built in `responses.py`-style helpers of the front door, not models:
they are on the hot path of every streamed chunk.
"""
from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from model_shards.sampling_params import (INT32_MAX, MAX_STOP_TOKEN_IDS, SEED_MAX, SEED_MIN, SamplingParams,
                                          bound_text, show_value)

from .errors import InvalidRequest, Unsupported

MAX_STOP_STRINGS = 64                 # each is searched in every text delta
MAX_STOP_STRING_CHARS = 1024          # the stream holds back this many characters

TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
StopString = Annotated[str, Field(max_length=MAX_STOP_STRING_CHARS)]

# What a field must be, for the 400 of a value out of range (pydantic's own says only one bound).
_IN_INT32 = f"in [0, {bound_text(INT32_MAX)}]"
LIMITS = {
    "seed": f"in [{bound_text(SEED_MIN)}, {bound_text(SEED_MAX)}]",
    "max_tokens": f"in [1, {bound_text(INT32_MAX)}]",
    "max_completion_tokens": f"in [1, {bound_text(INT32_MAX)}]",
    "min_tokens": _IN_INT32,
    "top_k": f"in [-1, {bound_text(INT32_MAX)}] (-1 and 0: off)",
    "temperature": "a finite number in [0, 2]",
    "top_p": "a finite number in (0, 1]",
    "n": "an integer >= 1",
    "stop_token_ids": f"a token id {_IN_INT32}",
    "prompt": f"a token id {_IN_INT32}",
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None

    def text(self, index: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for j, p in enumerate(self.content):
            if p.type != "text":
                raise Unsupported(f"messages[{index}].content[{j}].type: only 'text' parts are supported, "
                                  f"got {p.type!r}", param=f"messages[{index}].content[{j}].type")
            parts.append(p.text or "")
        return "".join(parts)


class _GenerationBody(_Body):
    """What chat and text completions share."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=-1, le=INT32_MAX)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: Union[StopString, Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)], None] = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0, le=INT32_MAX)
    skip_special_tokens: bool = True
    return_token_ids: bool = False
    # Accepted only at their neutral values (see check_supported).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    user: str | None = None

    _NEUTRAL = {"presence_penalty": (None, 0.0), "frequency_penalty": (None, 0.0),
                "repetition_penalty": (None, 1.0), "logit_bias": (None, {}), "best_of": (None, 1)}

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def check_supported(self) -> None:
        if self.n != 1:
            raise Unsupported(f"n: only n=1 is supported, got {self.n}; send {self.n} requests (with different "
                              f"seeds) instead", param="n")
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
        top_k = self.top_k if self.top_k is not None else d.get("top_k", 0)
        stop_ids = tuple(self.stop_token_ids or ())
        if not self.ignore_eos:
            stop_ids += tuple(t for t in eos_ids if t not in stop_ids)
        params = SamplingParams(temperature=float(temperature), top_p=float(top_p), top_k=max(int(top_k), 0),
                                seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens,
                                stop_token_ids=stop_ids, ignore_eos=self.ignore_eos)
        try:
            params.validate()
        except ValueError as e:
            field = str(e).split(":", 1)[0]
            raise InvalidRequest(str(e), param=field) from None
        return params

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    add_generation_prompt: bool = True
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    response_format: dict | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs:
            raise Unsupported("logprobs: not supported by this server", param="logprobs")
        if self.tools:
            raise Unsupported("tools: tool calling is not supported by this server", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise Unsupported("response_format: only {'type': 'text'} is supported", param="response_format")

    def chat_messages(self) -> list[dict]:
        return [{"role": m.role, "content": m.text(i), **({"name": m.name} if m.name else {})}
                for i, m in enumerate(self.messages)]


class CompletionRequest(_GenerationBody):
    prompt: Union[str, list[TokenId], list[str], list[list[TokenId]]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs is not None:
            raise Unsupported("logprobs: not supported by this server", param="logprobs")
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
    param = _loc_to_param(loc)
    kind, value = err.get("type", ""), err.get("input")
    if kind == "missing":
        return InvalidRequest(f"{param}: field required", param=param)
    field = next((p for p in loc if isinstance(p, str) and not _is_type_tag(p)), "")
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
