"""Reasoning parsers (vLLM's `--reasoning-parser`): a chat completion's `<think>…</think>` text becomes
`reasoning_content`, the rest `content`.

One streaming state machine serves both kinds of response: the non-streamed message is what feeding the
whole text at once gives, so a streamed response reassembles to exactly the non-streamed one however the
text was cut into deltas (MTP hands out several tokens at a time, and a tag is several tokens of most
vocabularies). A suffix that may still grow into a tag is held back until the next delta tells, and
handed out as ordinary text if the stream ends first.

Where the output starts: a template may open the reasoning itself (its generation prompt ends with
`<think>`: Nemotron 3, DeepSeek-R1, `enable_thinking` in our default model's template), and the model
then writes only the closing `</think>`; a template that turned thinking off ends with an empty
`<think></think>`. `initial_state` reads that from the rendered prompt; otherwise the parser decides:
`deepseek_r1` (vLLM's semantics) takes the output as reasoning until `</think>` (all of it if none comes),
`qwen3` and `nemotron` take it as content unless it starts with `<think>`.
"""
from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# parser -> where the output starts when the prompt does not tell: "reasoning", or "start" (reasoning
# only if the output opens with <think>)
REASONING_PARSERS = {"deepseek_r1": "reasoning", "qwen3": "start", "nemotron": "start"}

REASONING, CONTENT = "reasoning_content", "content"


def initial_state(parser: str, prompt_text: str) -> str:
    """"reasoning", "content" or "start" for a request whose rendered prompt is `prompt_text`."""
    tail = prompt_text.rstrip()
    if tail.endswith(THINK_OPEN):
        return "reasoning"
    if tail.endswith(THINK_CLOSE):
        return "content"
    return REASONING_PARSERS[parser]


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (what must wait for more)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningStream:
    """`feed(text)` -> [(kind, text)] with kind REASONING or CONTENT; `finish()` hands out what was held."""

    def __init__(self, state: str = "start"):
        if state not in ("start", "reasoning", "content"):
            raise ValueError(f"state: {state!r}")
        self.state = state
        self.opening = state == "reasoning"      # at the very start of reasoning: a repeated <think> is dropped
        self.buf = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.buf += text
        out: list[tuple[str, str]] = []
        while self.buf:
            if self.state == "start" or self.opening:
                head = self.buf.lstrip()
                if head.startswith(THINK_OPEN):
                    self.buf = head[len(THINK_OPEN):]
                    self.state, self.opening = "reasoning", False
                    continue
                if THINK_OPEN.startswith(head):           # whitespace, or part of the tag: wait
                    break
                self.opening = False
                if self.state == "start":
                    self.state = "content"
                continue
            if self.state == "content":
                _add(out, CONTENT, self.buf)
                self.buf = ""
                break
            end = self.buf.find(THINK_CLOSE)
            if end >= 0:
                _add(out, REASONING, self.buf[:end])
                self.buf = self.buf[end + len(THINK_CLOSE):]
                self.state = "content"
                continue
            keep = partial_suffix(self.buf, THINK_CLOSE)
            _add(out, REASONING, self.buf[:len(self.buf) - keep])
            self.buf = self.buf[len(self.buf) - keep:]
            break
        return out

    def finish(self) -> list[tuple[str, str]]:
        """The end of the output: a held-back tag prefix is plain text of the part it is in."""
        out: list[tuple[str, str]] = []
        _add(out, REASONING if self.state == "reasoning" else CONTENT, self.buf)
        self.buf = ""
        return out


def _add(out: list[tuple[str, str]], kind: str, text: str) -> None:
    if not text:
        return
    if out and out[-1][0] == kind:
        out[-1] = (kind, out[-1][1] + text)
    else:
        out.append((kind, text))


def split_reasoning(text: str, state: str = "start") -> tuple[str | None, str | None]:
    """(reasoning, content) of a whole output, None for an empty part (the non-streamed message)."""
    s = ReasoningStream(state)
    parts = {REASONING: "", CONTENT: ""}
    for kind, piece in s.feed(text) + s.finish():
        parts[kind] += piece
    return parts[REASONING] or None, parts[CONTENT] or None
