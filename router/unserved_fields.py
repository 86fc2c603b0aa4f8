"""OpenAI chat request fields for features this server does not have: a 400 "unsupported" naming the field,
rather than silently ignoring it (a client that asks for audio output or web search must know it got none).

Fields that only tune or label a request and leave the output's meaning unchanged (`prediction`,
`prompt_cache_key`, `service_tier`, `safety_identifier`, `verbosity`, `reasoning_effort`) are ignored, as
vLLM ignores them.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from .errors import Unsupported


class UnservedChatFields(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    modalities: list[Literal["text", "audio"]] | None = None
    audio: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None               # deprecated by OpenAI for `tools`
    function_call: str | dict[str, Any] | None = None           # deprecated by OpenAI for `tool_choice`
    web_search_options: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _refuse_unserved(self):
        if self.modalities is not None and set(self.modalities) != {"text"}:
            raise Unsupported("modalities: only ['text'] is supported by this server (no audio output)",
                              param="modalities")
        if self.audio is not None:
            raise Unsupported("audio: audio output is not supported by this server", param="audio")
        for field, instead in (("functions", "tools"), ("function_call", "tool_choice")):
            if getattr(self, field) is not None:
                raise Unsupported(f"{field}: deprecated by OpenAI and not supported by this server; use "
                                  f"`{instead}`", param=field)
        if self.web_search_options is not None:
            raise Unsupported("web_search_options: web search is not supported by this server",
                              param="web_search_options")
        return self
