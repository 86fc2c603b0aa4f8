"""OpenAI request bodies (chat and text completions), validated, and turned into SamplingParams.

Fields follow the OpenAI API plus vLLM's extensions that clients already send (`top_k`, `min_tokens`,
`ignore_eos`, `stop_token_ids`, `skip_special_tokens`, `return_token_ids`). Unknown fields are
ignored, as OpenAI-compatible servers do (SDKs send things like `user` or `parallel_tool_calls`).
Features we do not implement (logprobs, penalties, tools, n > 1) fail with a 400 that names the field
instead of being silently ignored: a client relying on them must know.

Response bodies are plain dicts built in `responses.py`-style helpers of the front door, not models:
they are on the hot path of every streamed chunk.
"""
from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from model_shards.sampling_params import SamplingParams

from .errors import InvalidRequest, Unsupported


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


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
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
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
    max_completion_tokens: int | None = Field(default=None, ge=1)
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
    prompt: Union[str, list[int], list[str], list[list[int]]]
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
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None


def validation_error(e: ValidationError) -> InvalidRequest:
    err = e.errors()[0]
    loc = _loc_to_param(err.get("loc", ()))
    msg = err.get("msg", "invalid value")
    if err.get("type") == "missing":
        return InvalidRequest(f"{loc}: field required", param=loc)
    return InvalidRequest(f"{loc}: {msg}" + (f" (got {err['input']!r})" if _short(err.get("input")) else ""),
                          param=loc)


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
    return any(ch in part for ch in "[]") or part in ("str", "int", "float", "bool", "list", "dict", "none")


def _short(value) -> bool:
    return isinstance(value, (int, float, str, bool)) and len(repr(value)) <= 80
