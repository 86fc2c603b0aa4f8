"""Structured outputs at the front door: OpenAI's `response_format` and vLLM's `guided_json`,
`guided_regex`, `guided_choice` and `guided_grammar`, plus a forced tool call (`tool_choice` "required"
or a named function), compiled into one llguidance grammar (`SamplingParams.grammar`).

The last stage masks every sampled token by it (model_shards/grammar.py), MTP included. Each is checked
here, so a schema or regex llguidance cannot compile is a 400 naming the field, not a failed pass:
- `response_format`: {"type": "text"} (nothing), {"type": "json_object"} (any JSON object), or
  {"type": "json_schema", "json_schema": {"name", "schema", "strict"}} (JSON valid against the schema;
  `strict` or not, the output always validates);
- `guided_json` (a schema, as an object or a JSON string), `guided_regex`, `guided_choice` (a list of
  strings: exactly one of them), `guided_grammar` (Lark as llguidance reads it, or GBNF), and the same
  as vLLM's newer `structured_outputs` object (`json`, `regex`, `choice`, `grammar`, `json_object: true`).
JSON is compact (no whitespace between tokens): a small model free to add whitespace may never stop.
At most one of them per request, and none with a forced tool call.

With a reasoning parser (`after_reasoning`), the grammar applies after the reasoning: free text up to the
first `</think>` where the output starts inside it (the template opened `<think>`), an optional
`<think>…</think>` where the output may open one, then whitespace, then the grammar.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Union

import llguidance
from llguidance.gbnf_to_lark import any_to_lark
from pydantic import BaseModel, ConfigDict

from model_shards.grammar import JSON_OPTIONS
from model_shards.sampling_params import MAX_GRAMMAR_CHARS, SamplingParams

from .errors import InvalidRequest
from .tool_grammar import tool_call_lark

# Reasoning text: anything ending at the first </think> (derivre's & and ~: no </think> before the end).
_THINK = r"THINK: /(.|\n)*<\/think>/ & ~/(.|\n)*<\/think>(.|\n)+/"
_REASONING_PREFIX = {"reasoning": 'THINK /[ \\n]*/', "start": '("<think>" THINK /[ \\n]*/)?'}
GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
STRUCTURED_OUTPUTS_KEYS = {"json": "guided_json", "regex": "guided_regex", "choice": "guided_choice",
                           "grammar": "guided_grammar"}
RESPONSE_FORMATS = ("text", "json_object", "json_schema")


class StructuredOutputFields(BaseModel):
    """The request fields (a mixin of the chat and text completion bodies)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    response_format: dict | None = None
    guided_json: Union[dict, str, None] = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict | None = None          # vLLM's newer spelling: {json | regex | choice | grammar | json_object}

    def _asked(self) -> list[tuple[str, str, object]]:
        """(param, kind, value) of each structured-output field set; kind is one _compile knows."""
        asked = [(f, f, getattr(self, f)) for f in GUIDED_FIELDS if getattr(self, f) is not None]
        if _response_format_type(self.response_format) != "text":
            asked.insert(0, ("response_format", "response_format", self.response_format))
        for key, value in (self.structured_outputs or {}).items():
            where = f"structured_outputs.{key}"
            if key in STRUCTURED_OUTPUTS_KEYS and value is not None:
                asked.append((where, STRUCTURED_OUTPUTS_KEYS[key], value))
            elif key == "json_object" and value is True:
                asked.append((where, "response_format", {"type": "json_object"}))
        return asked

    def grammar(self) -> str:
        """The request's llguidance grammar ("" for none); a 400 naming the field if it does not compile."""
        asked = [a[0] for a in self._asked()]
        choice = getattr(self, "tool_choice", None)
        forced = choice == "required" or isinstance(choice, dict)
        if forced and asked:
            raise InvalidRequest(f"{asked[0]}: cannot be combined with tool_choice {json.dumps(choice)[:80]} "
                                 f"(the output is then the tool call)", param=asked[0])
        if len(asked) > 1:
            raise InvalidRequest(f"{asked[1]}: only one of response_format, {', '.join(GUIDED_FIELDS)}, "
                                 f"structured_outputs per request (also got {asked[0]})", param=asked[1])
        if forced:
            tools = self.tool_parameters()
            only = choice["function"]["name"] if isinstance(choice, dict) else None
            return _checked("tool_choice", llguidance.LLMatcher.grammar_from_lark(tool_call_lark(tools, only)))
        if not asked:
            return ""
        where, kind, value = self._asked()[0]
        if kind == "response_format" and value["type"] == "json_schema":
            where = "response_format.json_schema.schema"
        return _checked(where, _compile(kind, value, where))


def _response_format_type(fmt: dict | None) -> str:
    if fmt is None:
        return "text"
    kind = fmt.get("type")
    if kind not in RESPONSE_FORMATS:
        raise InvalidRequest(f"response_format.type: must be one of {', '.join(map(repr, RESPONSE_FORMATS))}, "
                             f"got {json.dumps(kind)[:40]}", param="response_format.type")
    return kind


def _compile(kind: str, value, field: str) -> str:
    """`kind`'s grammar for `value`; `field` is what a 400 names (structured_outputs.* as sent)."""
    if kind == "response_format":
        if value["type"] == "json_object":
            return _json_grammar({"type": "object"}, field)
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise InvalidRequest("response_format.json_schema: field required (an object with 'name' and 'schema')",
                                 param="response_format.json_schema")
        if not isinstance(spec.get("name"), str):
            raise InvalidRequest("response_format.json_schema.name: field required (a string)",
                                 param="response_format.json_schema.name")
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise InvalidRequest("response_format.json_schema.schema: must be a JSON Schema object",
                                 param="response_format.json_schema.schema")
        return _json_grammar(schema, "response_format.json_schema.schema")
    if kind == "guided_json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise InvalidRequest(f"{field}: not valid JSON ({e})", param=field) from None
        if not isinstance(value, (dict, bool)):
            raise InvalidRequest(f"{field}: must be a JSON Schema (an object)", param=field)
        return _json_grammar(value, field)
    if kind in ("guided_regex", "guided_grammar") and not isinstance(value, str):
        raise InvalidRequest(f"{field}: must be a string", param=field)
    if kind == "guided_regex":
        return llguidance.LLMatcher.grammar_from_regex(value)
    if kind == "guided_choice":
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise InvalidRequest(f"{field}: must be a list of strings", param=field)
        if not value:
            raise InvalidRequest(f"{field}: must list at least one string", param=field)
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in value))
    try:
        lark = any_to_lark(value)                    # GBNF (vLLM's EBNF) becomes Lark; Lark stays
    except Exception as e:                           # the converter's own errors name no common type
        raise InvalidRequest(f"{field}: not a grammar llguidance reads ({str(e)[:200]})", param=field) from None
    return llguidance.LLMatcher.grammar_from_lark(lark)


def _json_grammar(schema, field: str) -> str:
    if isinstance(schema, dict):
        schema = {**schema, "x-guidance": {**JSON_OPTIONS, **(schema.get("x-guidance") or {})}}
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema)
    except Exception as e:                           # the Rust side's errors (deep nesting, odd values) too
        raise InvalidRequest(f"{field}: not a JSON Schema this server can enforce ({str(e)[:200]})",
                             param=field) from None


def _checked(field: str, grammar: str) -> str:
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise InvalidRequest(f"{field}: the compiled grammar has {len(grammar)} characters, at most "
                             f"{MAX_GRAMMAR_CHARS} are allowed", param=field)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, None)
    if is_error:
        raise InvalidRequest(f"{field}: cannot be enforced: {' '.join(messages)[:300]}", param=field)
    return grammar


def after_reasoning(params: SamplingParams, reasoning_state: str | None) -> SamplingParams:
    """params whose grammar lets the reasoning come first, for a reasoning parser's `reasoning_state`
    ("reasoning": the output starts inside <think>; "start": it may open one; else as it is)."""
    if not params.grammar or reasoning_state not in _REASONING_PREFIX:
        return params
    top = json.loads(params.grammar)
    name = top["grammars"][0].get("name") or "output"
    top["grammars"][0]["name"] = name
    lark = f"start: {_REASONING_PREFIX[reasoning_state]} @{name}\n{_THINK}\n"
    top["grammars"].insert(0, {"name": "reasoning", "lark_grammar": lark})
    return dataclasses.replace(params, grammar=json.dumps(top))
