"""The grammar of a forced tool call (`tool_choice` "required" or a named function): one Qwen3-Coder XML
call, as the `qwen3_coder` parser reads it (tool_call_parser.py), written as a Lark grammar for llguidance.

    <tool_call>
    <function=NAME>
    <parameter=KEY>
    VALUE
    </parameter>
    </function>
    </tool_call>

NAME is one of the request's tools (the named one only, for a named choice); its parameters come in
the order the tool declares them, the required ones always, the others optionally. A value is what
the parser converts it back by: JSON of the declared type for integer / number / boolean / array /
object / null parameters (compact, so a small model cannot ramble in whitespace), one of the values of
a string `enum`, and otherwise text on one line without `<` (at most its `maxLength`, and MAX_TEXT_CHARS, characters).
Parameter names the format cannot carry (with `<`, `>` or a newline) are left out. One call per
response: the grammar then ends, and only the stop tokens are allowed.
"""
from __future__ import annotations

import json

from model_shards.grammar import JSON_OPTIONS

MAX_TEXT_CHARS = 256
JSON_TYPES = ("integer", "number", "boolean", "array", "object", "null")


def _literal(text: str) -> str:
    """A Lark string literal (JSON's escapes are Lark's)."""
    return json.dumps(text, ensure_ascii=False)


def _value(schema: dict) -> str:
    if not isinstance(schema, dict):
        schema = {}
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(v, str) and "<" not in v and "\n" not in v for v in enum):
        return "(" + " | ".join(_literal(v) for v in enum) + ")"
    if schema.get("type") in JSON_TYPES:
        return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})
    limit = schema.get("maxLength")
    limit = min(limit, MAX_TEXT_CHARS) if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 \
        else MAX_TEXT_CHARS
    return f"/[^<\\n]{{1,{limit}}}/"


def _function(i: int, name: str, parameters: dict | None) -> list[str]:
    props = (parameters or {}).get("properties") or {}
    required = set((parameters or {}).get("required") or ())
    rules, parts = [], []
    for k, (key, schema) in enumerate(props.items()):
        if not key or any(ch in key for ch in "<>\n"):
            continue
        rule = f"p{i}_{k}"
        rules.append(f'{rule}: {_literal(f"<parameter={key}>" + chr(10))} {_value(schema)} '
                     f'{_literal(chr(10) + "</parameter>" + chr(10))}')
        parts.append(rule if key in required else f"{rule}?")
    head = _literal(f"<function={name}>\n")
    return [f'f{i}: {head} {" ".join(parts)} {_literal("</function>" + chr(10))}'] + rules


def tool_call_lark(tools: dict[str, dict | None], only: str | None = None) -> str:
    """The Lark grammar of one call of `tools` (name -> parameters schema), or of the tool `only`."""
    names = [only] if only is not None else list(tools)
    lines = [f'start: {_literal("<tool_call>" + chr(10))} call {_literal("</tool_call>")}',
             "call: " + " | ".join(f"f{i}" for i in range(len(names)))]
    for i, name in enumerate(names):
        lines += _function(i, name, tools.get(name))
    return "\n".join(lines) + "\n"
