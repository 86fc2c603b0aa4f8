"""OpenAI's chat `messages`, validated as OpenAI does (with OpenAI's `param`), and what the template gets.

Roles are OpenAI's: system, developer (OpenAI's newer name for system; templates only know `system`, so
it is rendered as one), user, assistant, tool (`function`, deprecated, is not served). Content is a string
or a non-empty array of parts, and which part types a role may send is OpenAI's (`PARTS_BY_ROLE`): text
parts are served (joined with "\\n", as vLLM joins them), an assistant's refusal parts too (their text is
what the model said); image, audio and file parts are a 400 "unsupported" naming the part (no multimodal
model here); a type the role may not send is a 400 "invalid". Only an assistant may have null content; a
tool message needs `tool_call_id`; a `name` matches OpenAI's pattern (`NAME_PATTERN`). An assistant's
earlier `tool_calls` go to the template with their arguments as an object (tool_schemas.py); its
`reasoning_content` (vLLM's field; `reasoning` is read too) goes to the template as `reasoning_content`,
which templates of reasoning models read.

`ChatMessages` is what chat completions and chat `/tokenize` share, so both render the same prompt:
the messages, `add_generation_prompt`, and vLLM's `continue_final_message` (the last message left open,
for the model to continue it) and `add_special_tokens` (the tokenizer's BOS on top of the template's); its
`chat_template` (a template in the request) is refused, as vLLM refuses it unless told to trust requests.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from model_shards.sampling_params import show_value

from .errors import InvalidRequest, Unsupported
from .tool_schemas import TemplateInputs, ToolCall, template_tool_calls

ROLES = ("system", "developer", "user", "assistant", "tool")
SERVED_PARTS = ("text", "refusal")
# The content part types OpenAI accepts per role; of these, only SERVED_PARTS are served here.
PARTS_BY_ROLE = {"system": ("text",), "developer": ("text",), "tool": ("text",),
                 "user": ("text", "image_url", "input_audio", "file"), "assistant": ("text", "refusal")}
# OpenAI's pattern for a message's `name`: no whitespace, nor any of < | \ / > (which would let a name forge
# the role tags of a template).
NAME_PATTERN = r"^[^\s<|\\/>]+$"
# The field of each served part that holds its text.
_PART_TEXT = {"text": "text", "refusal": "refusal"}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


def _when(condition: dict, then: dict) -> dict:
    return {"if": {"properties": condition}, "then": then}


def _served_parts_only(schema: dict) -> None:
    schema["properties"]["type"]["enum"] = list(SERVED_PARTS)          # what this server serves
    schema["allOf"] = [_when({"type": {"const": kind}},
                             {"required": [field], "properties": {field: {"type": "string"}}})
                       for kind, field in _PART_TEXT.items()]


class ContentPart(_Body):
    # The published schema states the rules `ChatMessage.check` applies (clients and the fuzzer see them).
    model_config = ConfigDict(json_schema_extra=_served_parts_only)         # merged with _Body's

    type: str
    text: str | None = None
    refusal: str | None = None

    def check(self, role: str, where: str) -> None:
        allowed = PARTS_BY_ROLE[role]
        if self.type not in allowed:
            raise InvalidRequest(f"{where}.type: a {role!r} message's content parts must be of type "
                                 f"{' or '.join(map(repr, allowed))}, got {show_value(self.type)[:80]}",
                                 param=f"{where}.type")
        if self.type not in SERVED_PARTS:
            raise Unsupported(f"{where}.type: only 'text' content parts are supported by this server (no "
                              f"multimodal model), got {self.type!r}", param=f"{where}.type")
        field = _PART_TEXT[self.type]
        if getattr(self, field) is None:
            raise InvalidRequest(f"{where}.{field}: field required in a {self.type!r} part", param=f"{where}.{field}")

    def part_text(self) -> str:
        return getattr(self, _PART_TEXT.get(self.type, "text")) or ""


class ChatMessage(_Body):
    model_config = ConfigDict(json_schema_extra={"allOf": [
        _when({"role": {"enum": [r for r in ROLES if r != "assistant"]}},
              {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}}),
        _when({"role": {"const": "tool"}},
              {"required": ["tool_call_id"], "properties": {"tool_call_id": {"type": "string"}}})]})

    role: Literal[ROLES]
    content: Union[str, Annotated[list[ContentPart], Field(min_length=1)], None] = None
    name: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None        # an assistant's earlier calls
    refusal: str | None = None                      # an assistant's earlier refusal (OpenAI's field; not rendered)
    reasoning_content: str | None = None            # an assistant's earlier reasoning (vLLM's field)
    reasoning: str | None = None                    # the same, by its other name

    def check(self, i: int) -> None:
        """OpenAI's rules for message i beyond the types: content (null only for an assistant), the part
        types of its role, a tool message's tool_call_id, only an assistant's tool_calls and reasoning."""
        if self.content is None and self.role != "assistant":
            raise InvalidRequest(f"messages[{i}].content: required for a {self.role!r} message (only an "
                                 f"assistant message may have null content)", param=f"messages[{i}].content")
        for j, p in enumerate(self.content if isinstance(self.content, list) else ()):
            p.check(self.role, f"messages[{i}].content[{j}]")
        if self.role == "tool" and self.tool_call_id is None:
            raise InvalidRequest(f"messages[{i}].tool_call_id: field required in a 'tool' message",
                                 param=f"messages[{i}].tool_call_id")
        for field in ("reasoning_content", "reasoning", "refusal"):
            if getattr(self, field) is not None and self.role != "assistant":
                raise InvalidRequest(f"messages[{i}].{field}: only an 'assistant' message has {field}",
                                     param=f"messages[{i}].{field}")
        template_tool_calls(self.role, self.tool_calls, i)        # only an assistant's; arguments JSON objects

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.part_text() for p in self.content)

    def for_template(self, i: int = 0) -> dict:
        """The message as vLLM hands it to a template (`developer` as `system`: templates only know that)."""
        out = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = template_tool_calls(self.role, self.tool_calls, i)
        if self.name:
            out["name"] = self.name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        reasoning = self.reasoning_content if self.reasoning_content is not None else self.reasoning
        if reasoning is not None:
            out["reasoning_content"] = reasoning
        return out


class ChatMessages(TemplateInputs, _Body):
    """`messages` and what the template gets with them, shared by chat completions and chat /tokenize."""

    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None                # vLLM's per-request template: refused, as vLLM does by default

    @model_validator(mode="after")
    def _check_messages(self):
        for i, m in enumerate(self.messages):
            m.check(i)
        if self.chat_template is not None:
            raise Unsupported("chat_template: a request may not bring its own chat template (templates are code); "
                              "the checkpoint's is used", param="chat_template")
        if self.continue_final_message:
            if self.add_generation_prompt and "add_generation_prompt" in self.model_fields_set:
                raise InvalidRequest("continue_final_message: cannot be true together with add_generation_prompt: "
                                     "the first continues the last message, the second starts a new one",
                                     param="continue_final_message")
            self.add_generation_prompt = False          # its default yields to an explicit continue_final_message
        return self

    def chat_messages(self) -> list[dict]:
        return [m.for_template(i) for i, m in enumerate(self.messages)]
