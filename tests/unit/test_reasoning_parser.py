"""The reasoning parser (`--reasoning-parser`, router/reasoning_parser.py) as a pure state machine.

Outputs as Nemotron 3 / DeepSeek-R1 / Qwen3 write them are split into `reasoning_content` and `content`;
whatever the cuts between deltas (every single cut, pairs of cuts, random cuts: MTP hands out several
tokens at once, and a tag is several tokens), the streamed parts reassemble to the non-streamed split,
which matches a plain reference implementation of the rules.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.reasoning_parser import (CONTENT, REASONING, THINK_CLOSE, THINK_OPEN, ReasoningStream, initial_state,
                                     partial_suffix, split_reasoning)

# (state, model output, reasoning, content): outputs as the models write them.
RECORDED = [
    # the template opened <think> (Nemotron 3, DeepSeek-R1, enable_thinking): the output only closes it
    ("reasoning", "The user asks for 2+2. That is 4.\n</think>\n\nThe answer is 4.",
     "The user asks for 2+2. That is 4.\n", "\n\nThe answer is 4."),
    # ... and a model that writes <think> again anyway (vLLM drops it)
    ("reasoning", "<think>\nhmm\n</think>4", "\nhmm\n", "4"),
    # reasoning cut by max_tokens: all of it is reasoning
    ("reasoning", "Let me think about this caref", "Let me think about this caref", None),
    # Qwen3 style: the model opens and closes the block itself
    ("start", "<think>\nshort\n</think>\n\nHello!", "\nshort\n", "\n\nHello!"),
    ("start", "\n<think>x</think>y", "x", "y"),
    # no reasoning at all
    ("start", "Hello! How can I help?", None, "Hello! How can I help?"),
    ("start", "A <think> inside the text is text", None, "A <think> inside the text is text"),
    ("content", "<think>already off</think>ok", None, "<think>already off</think>ok"),
    # tags that never complete stay text
    ("start", "<thin", None, "<thin"),
    ("reasoning", "abc </thi", "abc </thi", None),
    # a second block after the first is content
    ("reasoning", "a</think>b<think>c</think>d", "a", "b<think>c</think>d"),
    ("reasoning", "</think>", None, None),
    ("start", "", None, None),
]


def stream(text: str, cuts: list[int], state: str) -> tuple[str | None, str | None, list[tuple[str, str]]]:
    s = ReasoningStream(state)
    events, prev = [], 0
    for c in sorted(cuts) + [len(text)]:
        events += s.feed(text[prev:c])
        prev = c
    events += s.finish()
    parts = {REASONING: "", CONTENT: ""}
    for kind, piece in events:
        assert piece, "no empty events"
        parts[kind] += piece
    return parts[REASONING] or None, parts[CONTENT] or None, events


def reference(text: str, state: str) -> tuple[str | None, str | None]:
    """The rules, written plainly (not incrementally)."""
    if state == "content":
        return None, text or None
    head = text.lstrip()
    if head.startswith(THINK_OPEN):
        text, state = head[len(THINK_OPEN):], "reasoning"
    elif state == "start":
        return None, text or None
    end = text.find(THINK_CLOSE)
    if end < 0:
        return text or None, None
    return text[:end] or None, text[end + len(THINK_CLOSE):] or None


@pytest.mark.parametrize("state, text, reasoning, content", RECORDED)
def test_recorded_outputs_split_as_expected_at_every_cut(state, text, reasoning, content):
    assert split_reasoning(text, state) == (reasoning, content) == reference(text, state)
    for i in range(len(text) + 1):
        assert stream(text, [i], state)[:2] == (reasoning, content), f"cut at {i}"
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1, 3):
            assert stream(text, [i, j], state)[:2] == (reasoning, content), f"cuts at {i}, {j}"


def test_one_character_at_a_time_never_sends_part_of_a_tag():
    text = "step one</think>done"
    r, c, events = stream(text, list(range(len(text))), "reasoning")
    assert (r, c) == ("step one", "done")
    assert all("<" not in piece for _, piece in events), events
    s = ReasoningStream("reasoning")
    assert s.feed("abc</th") == [(REASONING, "abc")]         # "</th" waits
    assert s.feed("ink>x") == [(CONTENT, "x")]
    s = ReasoningStream("reasoning")
    assert s.feed("a</b") == [(REASONING, "a</b")]            # "</b" cannot become "</think>": sent


def test_where_the_template_left_the_model():
    nemotron_on = "<|im_start|>assistant\n<think>\n"
    nemotron_off = "<|im_start|>assistant\n<think></think>"
    plain = "<s><|user|>\nhi<|end|>\n<|assistant|>\n"
    for parser in ("deepseek_r1", "qwen3", "nemotron"):
        assert initial_state(parser, nemotron_on) == "reasoning"
        assert initial_state(parser, nemotron_off) == "content"
    assert initial_state("deepseek_r1", plain) == "reasoning"        # vLLM's: reasoning until </think>
    assert initial_state("nemotron", plain) == initial_state("qwen3", plain) == "start"
    # a user message quoting a tag does not count: only the end of the prompt does
    assert initial_state("nemotron", "<|user|>\nwhat does <think> do?<|end|>\n<|assistant|>\n") == "start"


def test_partial_suffix():
    assert partial_suffix("abc</thi", THINK_CLOSE) == 5
    assert partial_suffix("abc<", THINK_CLOSE) == 1
    assert partial_suffix("abc", THINK_CLOSE) == 0
    assert partial_suffix("</think>", THINK_CLOSE) == 0       # the whole tag is not a partial one


# Texts built from pieces that make tags and near-tags likely.
PIECES = st.sampled_from(["<think>", "</think>", "<", "</", "<th", "</thi", "think>", ">", "\n", " ", "a", "bc",
                          "é☃", "<thinking>", "</think", "x</think>y"])
TEXTS = st.lists(PIECES, max_size=14).map("".join)


@settings(max_examples=400, deadline=None)
@given(text=TEXTS, state=st.sampled_from(["start", "reasoning", "content"]), data=st.data())
def test_random_cuts_reassemble_to_the_whole_split(text, state, data):
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=8))
    assert stream(text, cuts, state)[:2] == split_reasoning(text, state) == reference(text, state)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40), state=st.sampled_from(["start", "reasoning", "content"]), data=st.data())
def test_random_unicode_text_is_never_lost(text, state, data):
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=6))
    r, c, _ = stream(text, cuts, state)
    assert (r, c) == reference(text, state)
    if THINK_OPEN not in text and THINK_CLOSE not in text:
        assert (r or "") + (c or "") == text             # no tag: every character comes out, in one part
