"""Token ids in, client text out: incremental detokenization and stop strings.

One token may be half a UTF-8 character (byte tokens, byte-level BPE), and some tokenizers render a
token differently at the start of a string (SentencePiece's leading space), so each token's text
cannot be decoded alone. A checkpoint's `tokenizer.json` is streamed by the `tokenizers` library's own
`DecodeStream` (it holds back an incomplete character and keeps a few tokens of context); the byte
tokenizer of random-weight presets uses vLLM's two-offset method: each delta is
`decode(ids[prefix:])` minus `decode(ids[prefix:read])`, held back while it ends in U+FFFD. Either
way the concatenated deltas plus `flush()` equal `decode(all ids)` (tests/unit/test_detokenizer_stream.py).

Stop strings are matched on text, not tokens: `TextStream` holds back the last `len(longest stop) - 1`
characters so a stop string split across deltas is never half sent, and cuts the text before the
stop string (OpenAI semantics: the stop string is not returned).
"""
from __future__ import annotations

from .tokenizer import BaseTokenizer

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: BaseTokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.sent_chars = 0             # length of the text handed out so far
        self._step = tokenizer.decode_stream(skip_special_tokens)   # tokenizers' DecodeStream, or None
        self.prefix_offset = 0          # the two-offset method's state (no DecodeStream)
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, new_ids: list[int]) -> str:
        """Append tokens (one, or an MTP step's several); return the text that became final (may be "")."""
        self.ids.extend(new_ids)
        if self._step is not None:
            delta = "".join(piece for piece in map(self._step, new_ids) if piece)
        else:
            delta = self._two_offset_delta()
        self.sent_chars += len(delta)
        return delta

    def _two_offset_delta(self) -> str:
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            # Keep a few tokens of context: the next decode starts where this one's tail began.
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """At the end of the stream: whatever is held back (an incomplete character decodes as U+FFFD).
        One full decode, so the text sent in all equals `decode(ids)`."""
        rest = self._decode(self.ids)[self.sent_chars:]
        self.sent_chars += len(rest)
        self.prefix_offset = self.read_offset = len(self.ids)
        return rest


class TextStream:
    """Detokenize a request's tokens, apply stop strings, and hand out text deltas.

    `add(ids)` returns the text safe to send now and whether a stop string was hit (the request then
    ends with finish_reason "stop" and the engine is told to abort it). `finish()` returns the held-back
    tail when the engine ends the request itself.
    """

    def __init__(self, tokenizer: BaseTokenizer, stop: list[str] | None = None, min_tokens: int = 0,
                 skip_special_tokens: bool = True):
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self.stop = [s for s in (stop or []) if s]
        self.min_tokens = min_tokens
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.pending = ""          # decoded, not yet sent (may still start a stop string)
        self.text = ""             # everything sent
        self.num_tokens = 0
        self.stopped = False

    def add(self, new_ids: list[int]) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.num_tokens += len(new_ids)
        self.pending += self.detok.add(new_ids)
        if self.stop and self.num_tokens >= self.min_tokens:
            cut = _first_stop(self.pending, self.stop)
            if cut is not None:
                self.stopped = True
                return self._emit(self.pending[:cut]), True
        if self.holdback and self.stop:
            keep = len(self.pending) - self.holdback
            if keep <= 0:
                return "", False
            out, self.pending = self.pending[:keep], self.pending[keep:]
            self.text += out
            return out, False
        return self._emit(self.pending), False

    def finish(self) -> str:
        if self.stopped:
            return ""
        self.pending += self.detok.flush()
        if self.stop and self.num_tokens >= self.min_tokens:
            cut = _first_stop(self.pending, self.stop)
            if cut is not None:
                self.stopped = True
                return self._emit(self.pending[:cut])
        return self._emit(self.pending)

    def _emit(self, out: str) -> str:
        self.pending = ""
        self.text += out
        return out


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
