"""Tool-call parser (vLLM's `--tool-call-parser qwen3_coder`): Qwen3-Coder / Nemotron 3 XML tool calls
in a chat completion's text become OpenAI `tool_calls`.

    Let me look that up.
    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    <parameter=days>
    3
    </parameter>
    </function>
    </tool_call>

gives content "Let me look that up.\n" and a call `get_weather` with arguments `{"city": "Paris", "days": 3}`:
a value is converted by the type its tool declares for that parameter in JSON Schema (integer, number,
boolean, object, array parsed, in the order declared; `null` where null is allowed; strings and undeclared
parameters kept as text; a value that does not parse as its type stays text). One leading and one trailing
newline of a value are the format's, not the value's.

One streaming state machine for both kinds of response (as in reasoning_parser.py), so the streamed
deltas reassemble to exactly the non-streamed message: text outside `<tool_call>` blocks flows out as
content (a suffix that may start `<tool_call>` is held back); a block is held until it closes and then
handed out as whole calls, so a call is never half sent. Whitespace between and after blocks is dropped;
other text there is content. A block that does not parse (malformed XML), and one the output ends in
before its `</function>` (truncated), is handed out as content, tags and all, never an error. A block
whose `</tool_call>` is missing but whose functions are complete (the output ended, or a stop string cut
it) still counts, as in vLLM.
"""
from __future__ import annotations

import json
import math
import re
import uuid
from typing import Any, Callable

from .reasoning_parser import partial_suffix

TOOL_CALL_PARSERS = ("qwen3_coder", "nemotron")        # nemotron: Nemotron 3 uses the Qwen3-Coder format
OPEN, CLOSE = "<tool_call>", "</tool_call>"
PARAM_CLOSE = "</parameter>"
_FUNCTION = re.compile(r"<function=([^<>\n]+)>(.*?)</function>", re.S)
_PARAM = re.compile(r"<parameter=([^<>\n]+)>")
NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")              # OpenAI's function names


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def parse_block(body: str, tools: dict[str, dict]) -> list[tuple[str, str]] | None:
    """The (name, arguments JSON) calls of the text inside one <tool_call> block, or None if it is not
    one or more whole `<function=NAME>…</function>` (whitespace around them allowed)."""
    calls, rest = [], body
    while rest.strip():
        m = _FUNCTION.match(rest.lstrip())
        if m is None:
            return None
        name = m.group(1).strip()
        args = _parse_params(m.group(2), _properties(tools.get(name)))
        if args is None or not NAME.match(name):
            return None
        calls.append((name, json.dumps(args, ensure_ascii=False)))
        rest = rest.lstrip()[m.end():]
    return calls or None


def _parse_params(inner: str, props: dict) -> dict | None:
    args, rest = {}, inner
    while rest.strip():
        rest = rest.lstrip()
        m = _PARAM.match(rest)
        if m is None:
            return None
        key, rest = m.group(1).strip(), rest[m.end():]
        end, nxt = rest.find(PARAM_CLOSE), rest.find("<parameter=")
        if end >= 0 and not 0 <= nxt < end:
            value, rest = rest[:end], rest[end + len(PARAM_CLOSE):]
        elif nxt >= 0:                                   # lenient: an unclosed value ends at the next one
            value, rest = rest[:nxt], rest[nxt:]
        else:
            value, rest = rest, ""
        value = value[1:] if value.startswith("\n") else value
        args[key] = convert_value(value[:-1] if value.endswith("\n") else value, props.get(key))
    return args


def _properties(tool_parameters: dict | None) -> dict:
    props = (tool_parameters or {}).get("properties")
    return props if isinstance(props, dict) else {}


def _types(schema: Any) -> list[str]:
    if not isinstance(schema, dict):
        return []
    t = schema.get("type")
    types = [t] if isinstance(t, str) else [x for x in t if isinstance(x, str)] if isinstance(t, list) else []
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or []:
            types += _types(sub)
    return types


def convert_value(value: str, schema: Any) -> Any:
    """A parameter's text as the first declared JSON type it parses as; else the text itself."""
    text, types = value.strip(), _types(schema)
    if "null" in types and text == "null":
        return None
    for t in types:
        if t == "string":
            return value
        if t == "boolean" and text.lower() in ("true", "false"):
            return text.lower() == "true"
        if t in ("integer", "number", "object", "array"):
            try:
                v = json.loads(text)
            except ValueError:
                continue
            ok = {"integer": lambda: type(v) is int,
                  "number": lambda: type(v) in (int, float) and math.isfinite(v),
                  "object": lambda: isinstance(v, dict), "array": lambda: isinstance(v, list)}[t]()
            if ok:
                return v
    return value


class ToolCallStream:
    """`feed(text)` -> events, `finish()` -> the last ones. Events: ("content", text) and
    ("call", index, id, name, arguments)."""

    def __init__(self, tools: dict[str, dict], parallel: bool = True, new_id: Callable[[], str] = new_call_id):
        self.tools, self.parallel, self.new_id = tools, parallel, new_id
        self.in_block = False
        self.buf = ""              # text not yet handed out (a possible "<tool_call>" prefix, or a block)
        self.calls = 0
        self.gap = ""              # whitespace after a call, dropped unless other text follows
        self.gap_live = False      # text after a call that is not only whitespace: content from here on

    def feed(self, text: str) -> list[tuple]:
        self.buf += text
        out: list[tuple] = []
        while True:
            if not self.in_block:
                start = self.buf.find(OPEN)
                if start < 0:
                    keep = partial_suffix(self.buf, OPEN)
                    self._text(out, self.buf[:len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep:]
                    return out
                self._text(out, self.buf[:start])
                self._end_gap()
                self.buf, self.in_block = self.buf[start + len(OPEN):], True
            end, again = self.buf.find(CLOSE), self.buf.find(OPEN)
            if 0 <= again and (end < 0 or again < end):        # a new block opens first: this one ended
                self._block(out, self.buf[:again], raw=OPEN + self.buf[:again])
                self.buf, self.in_block = self.buf[again:], False
            elif end >= 0:
                self._block(out, self.buf[:end], raw=OPEN + self.buf[:end + len(CLOSE)])
                self.buf, self.in_block = self.buf[end + len(CLOSE):], False
            else:
                return out

    def finish(self) -> list[tuple]:
        out: list[tuple] = []
        if self.in_block:
            self._block(out, self.buf, raw=OPEN + self.buf)
        else:
            self._text(out, self.buf)
        self.buf, self.in_block = "", False
        self._end_gap()
        return out

    def _block(self, out: list, body: str, raw: str) -> None:
        calls = parse_block(body, self.tools)
        if calls is None:
            self._text(out, raw)
            self._end_gap()
            return
        for name, args in calls:
            if self.parallel or self.calls == 0:
                out.append(("call", self.calls, self.new_id(), name, args))
                self.calls += 1
        self.gap, self.gap_live = "", False

    def _text(self, out: list, text: str) -> None:
        if not text:
            return
        if self.calls and not self.gap_live:           # after a call: wait until it is more than whitespace
            self.gap += text
            if not self.gap.strip():
                return
            text, self.gap, self.gap_live = self.gap, "", True
        if out and out[-1][0] == "content":
            out[-1] = ("content", out[-1][1] + text)
        else:
            out.append(("content", text))

    def _end_gap(self) -> None:
        self.gap, self.gap_live = "", False
