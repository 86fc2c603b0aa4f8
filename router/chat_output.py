"""A chat completion's text as OpenAI's message fields: `reasoning_content`, `content`, `tool_calls`.

`ChatParsing` is what a request needs (decided when it is prepared: the server's parsers, the request's
tools, where the template left the model); `ChatParsing.new()` gives a `ChatOutput` for one response.
The reasoning parser (reasoning_parser.py) runs first; its content goes through the tool-call parser
(tool_call_parser.py), so a `<tool_call>` inside the reasoning is reasoning, as in vLLM.

Streaming: `step(text, finish_reason)` -> the OpenAI deltas to send (`{"content"}`, `{"reasoning_content"}`,
`{"tool_calls": [...]}`: a call's first delta has index, id, type, function.name and arguments "", the next
appends the arguments) and the finish reason. Non-streaming: `message(text, finish_reason)` is the same
machine fed the whole text, merged with `merge_deltas`, which is also how a client reassembles a stream.
`finish_reason` is "tool_calls" when the output made a call (vLLM's rule, also when max_tokens cut the
text after it).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from .reasoning_parser import CONTENT, REASONING, REASONING_PARSERS, ReasoningStream, initial_state
from .tool_call_parser import TOOL_CALL_PARSERS, ToolCallStream, new_call_id


def check_parser_names(reasoning_parser: str | None, tool_call_parser: str | None) -> None:
    if reasoning_parser is not None and reasoning_parser not in REASONING_PARSERS:
        raise ValueError(f"reasoning_parser: one of {', '.join(REASONING_PARSERS)}, got {reasoning_parser!r}")
    if tool_call_parser is not None and tool_call_parser not in TOOL_CALL_PARSERS:
        raise ValueError(f"tool_call_parser: one of {', '.join(TOOL_CALL_PARSERS)}, got {tool_call_parser!r}")


@dataclasses.dataclass
class ChatParsing:
    reasoning_state: str | None = None          # None: no reasoning parsing; else where the output starts
    tools: dict[str, dict] | None = None        # None: no tool-call parsing; else name -> parameters schema
    parallel_tool_calls: bool = True

    def new(self, new_id: Callable[[], str] = new_call_id) -> "ChatOutput":
        return ChatOutput(self, new_id)


def chat_parsing(req, prompt_text: str, reasoning_parser: str | None, tool_call_parser: str | None
                 ) -> ChatParsing | None:
    """What a chat request's output goes through; None when nothing (the text is all `content`)."""
    state = initial_state(reasoning_parser, prompt_text) if reasoning_parser else None
    use_tools = bool(req.tools) and req.tool_choice != "none" and tool_call_parser is not None   # required/named too
    if state is None and not use_tools:
        return None
    return ChatParsing(state, req.tool_parameters() if use_tools else None, req.parallel_tool_calls is not False)


class ChatOutput:
    def __init__(self, parsing: ChatParsing, new_id: Callable[[], str] = new_call_id):
        self.parsing = parsing
        self.reasoning = ReasoningStream(parsing.reasoning_state) if parsing.reasoning_state else None
        self.tools = ToolCallStream(parsing.tools, parsing.parallel_tool_calls, new_id) \
            if parsing.tools is not None else None
        self.called = False

    def step(self, text: str, finish_reason: str | None = None) -> tuple[list[dict], str | None]:
        """Deltas for `text` (and, with a finish_reason, for whatever was held back), and the finish reason."""
        parts = self.reasoning.feed(text) if self.reasoning else [(CONTENT, text)]
        if finish_reason and self.reasoning:
            parts += self.reasoning.finish()
        deltas: list[dict] = []
        for kind, piece in parts:
            if kind == REASONING:
                _add_text(deltas, REASONING, piece)
            elif self.tools is None:
                _add_text(deltas, CONTENT, piece)
            else:
                self._tool_deltas(deltas, self.tools.feed(piece))
        if finish_reason and self.tools is not None:
            self._tool_deltas(deltas, self.tools.finish())
        if finish_reason in ("stop", "length") and self.called:
            finish_reason = "tool_calls"
        return deltas, finish_reason

    def _tool_deltas(self, deltas: list[dict], events: list[tuple]) -> None:
        for ev in events:
            if ev[0] == "content":
                _add_text(deltas, CONTENT, ev[1])
                continue
            _, index, call_id, name, args = ev
            self.called = True
            deltas.append({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                           "function": {"name": name, "arguments": ""}}]})
            deltas.append({"tool_calls": [{"index": index, "function": {"arguments": args}}]})

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """The non-streamed message for the whole output `text`, and the finish reason."""
        deltas, finish = self.step(text, finish_reason or "stop")
        return merge_deltas(deltas, reasoning=self.reasoning is not None), (finish if finish_reason else None)


def _add_text(deltas: list[dict], key: str, text: str) -> None:
    if not text:
        return
    if deltas and list(deltas[-1]) == [key]:
        deltas[-1] = {key: deltas[-1][key] + text}
    else:
        deltas.append({key: text})


def merge_deltas(deltas: list[dict], reasoning: bool = False) -> dict:
    """A message from streamed deltas, as an OpenAI client reassembles them: texts concatenated, tool calls
    by index (id, type and name from their first delta, arguments concatenated). `content` is null when
    empty and there is reasoning or a call; `reasoning_content` is there (maybe null) when `reasoning`."""
    content, thought, calls = [], [], {}
    for d in deltas:
        content.append(d.get(CONTENT) or "")
        thought.append(d.get(REASONING) or "")
        for tc in d.get("tool_calls") or ():
            call = calls.setdefault(tc["index"], {"id": None, "type": "function", "function": {"name": None,
                                                                                              "arguments": ""}})
            for key in ("id", "type"):
                if tc.get(key):
                    call[key] = tc[key]
            fn = tc.get("function") or {}
            call["function"]["name"] = fn.get("name") or call["function"]["name"]
            call["function"]["arguments"] += fn.get("arguments") or ""
    text, why = "".join(content), "".join(thought)
    msg = {"role": "assistant", "content": text or (None if (why or calls) else "")}
    if reasoning:
        msg[REASONING] = why or None
    if calls:
        msg["tool_calls"] = [calls[i] for i in sorted(calls)]
    return msg
