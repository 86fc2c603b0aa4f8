"""The chat request's tool and template fields (OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`,
assistant `tool_calls`; vLLM's `chat_template_kwargs`), validated as OpenAI does, with OpenAI's `param`.

`tools` and `chat_template_kwargs` go to the chat template (`TemplateInputs`, shared by chat completions
and chat `/tokenize`, so both render the same prompt). Whether tools may be used depends on the server's
`--tool-call-parser` (`check_tool_use`): `tool_choice` `auto` (the default with tools) needs one;
`none` only shows the tools to the model; `required` and a named function force one call by a grammar
(tool_grammar.py, enforced on the last stage like structured outputs), so the call always parses.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

from .errors import InvalidRequest, Unsupported

FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"                 # OpenAI's pattern for function names
# Names the server itself passes to the template: chat_template_kwargs may not replace them.
RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "add_generation_prompt", "bos_token", "eos_token")
TOOL_CHOICE_MODES = ("none", "auto", "required")
MAX_TOOLS = 128                                          # OpenAI's limit on the tools array
_NAMED_CHOICE = {"type": "object", "required": ["type", "function"], "properties": {
    "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}}
# What the published schema says tool_choice is (validated by `check_tool_use`, with OpenAI's params).
ToolChoice = Annotated[Union[str, dict, None], WithJsonSchema(
    {"anyOf": [{"enum": list(TOOL_CHOICE_MODES)}, _NAMED_CHOICE, {"type": "null"}]})]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class FunctionDefinition(_Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None        # a JSON Schema of type "object"
    strict: bool | None = None


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionCall(_Strict):
    name: str
    arguments: str                                  # JSON, as OpenAI sends and returns it


class ToolCall(_Strict):
    """A call in an assistant message of the conversation (an earlier answer of the model)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class TemplateInputs(_Strict):
    """What the chat template gets besides the messages."""

    tools: list[ToolDefinition] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_template_inputs(self):
        seen: dict[str, int] = {}
        for i, tool in enumerate(self.tools or ()):
            f, where = tool.function, f"tools[{i}].function"
            if f.name in seen:
                raise InvalidRequest(f"{where}.name: duplicate function name {f.name!r} (also tools[{seen[f.name]}])",
                                     param=f"{where}.name")
            seen[f.name] = i
            p = f.parameters
            if p is not None and (p.get("type", "object") != "object" or not isinstance(p.get("properties", {}), dict)):
                raise InvalidRequest(f"{where}.parameters: must be a JSON Schema of type 'object' (with 'properties' "
                                     f"an object), got type {json.dumps(p.get('type'))[:40]}",
                                     param=f"{where}.parameters")
        for key in self.chat_template_kwargs or {}:
            if key in RESERVED_TEMPLATE_KWARGS:
                raise InvalidRequest(f"chat_template_kwargs.{key}: set by the server (from the request's own "
                                     f"fields), not a template option", param=f"chat_template_kwargs.{key}")
        return self

    def template_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the template: chat_template_kwargs, and `tools` (OpenAI's shape, as vLLM and
        transformers pass them) only when there are some (the renderer passes `tools` None otherwise, as
        transformers does)."""
        kw = dict(self.chat_template_kwargs or {})
        if self.tools:
            kw["tools"] = [t.model_dump(exclude_none=True) for t in self.tools]
        return kw

    def tool_parameters(self) -> dict[str, dict]:
        """name -> the function's parameters schema (what the tool-call parser converts values by)."""
        return {t.function.name: t.function.parameters or {} for t in self.tools or ()}


def template_tool_calls(role: str, calls: list[ToolCall] | None, i: int) -> list[dict]:
    """Message i's tool_calls for the template (only an assistant has some): `arguments` as an object
    (templates iterate over them, as transformers documents and vLLM passes them); arguments that are not
    a JSON object are a 400."""
    where = f"messages[{i}]"
    if calls and role != "assistant":
        raise InvalidRequest(f"{where}.tool_calls: only an 'assistant' message has tool_calls",
                             param=f"{where}.tool_calls")
    out = []
    for j, call in enumerate(calls or ()):
        try:
            args = json.loads(call.function.arguments or "{}")
        except (ValueError, RecursionError):
            args = None
        if not isinstance(args, dict):
            raise InvalidRequest(f"{where}.tool_calls[{j}].function.arguments: must be a JSON object in a string "
                                 f"(as the model returned it)", param=f"{where}.tool_calls[{j}].function.arguments")
        out.append({"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": args}})
    return out


def check_tool_use(req, tool_call_parser: str | None) -> None:
    """tool_choice and tools against each other and against the server's parser (400s naming the param)."""
    choice, tools = req.tool_choice, req.tools
    if isinstance(choice, str) and choice not in TOOL_CHOICE_MODES:
        raise InvalidRequest(f"tool_choice: must be one of {', '.join(map(repr, TOOL_CHOICE_MODES))} or "
                             f"{{'type': 'function', 'function': {{'name': ...}}}}, got {choice[:40]!r}",
                             param="tool_choice")
    if isinstance(choice, dict):
        _check_named_choice(choice, tools)
    if choice not in (None, "none") and not tools:
        raise InvalidRequest("tool_choice: only allowed when tools are given", param="tool_choice")
    if getattr(req, "parallel_tool_calls", None) is not None and not tools:
        raise InvalidRequest("parallel_tool_calls: only allowed when tools are given", param="parallel_tool_calls")
    if tools and len(tools) > MAX_TOOLS:
        raise InvalidRequest(f"tools: at most {MAX_TOOLS} tools, got {len(tools)}", param="tools")
    if tools and choice != "none" and tool_call_parser is None:
        raise Unsupported("tools: tool calling is not enabled on this server (start it with --tool-call-parser "
                          "qwen3_coder); with tool_choice 'none' the tools are only shown to the model", param="tools")


def _check_named_choice(choice: dict, tools) -> None:
    fn = choice.get("function")
    if choice.get("type") != "function":
        raise InvalidRequest("tool_choice.type: must be 'function'", param="tool_choice.type")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidRequest("tool_choice.function.name: field required (a string)", param="tool_choice.function.name")
    if tools and fn["name"] not in {t.function.name for t in tools}:
        raise InvalidRequest(f"tool_choice.function.name: no tool is named {fn['name'][:64]!r}",
                             param="tool_choice.function.name")
