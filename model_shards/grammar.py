"""Structured outputs on the last stage: token masks from llguidance grammars.

A request's `SamplingParams.grammar` is an llguidance grammar (the front door compiles JSON Schema,
regex, choices, Lark and the forced tool call into one; `router/structured_outputs.py`). Here each such
sequence gets an `LLMatcher` (`SeqGrammar`) that has consumed exactly its settled output tokens, and
every row that samples is masked by the grammar state *at that row*:
- verification row i (after the committed tokens + drafts[:i]) by that state, so greedy MTP picks
  what MTP-off decoding picks and rejection sampling checks drafts against the masked distribution;
- each drafting step by the state after the pass's new tokens and the drafts before it, so drafts stay
  grammatical (acceptance stays high) and q is the masked distribution the draft was sampled from.
The request's stop tokens (EOS among them) are allowed only where the grammar accepts, and are the only
tokens allowed once it is complete: the output always parses, and ends with finish_reason "stop".

Like penalties.History, the state follows the settled inputs the last stage sees (a pass at position p,
0 after a preemption's recompute, rolls the matcher back to p) plus the drafts it accepted, so it is
rebuilt from the sequence's own tokens whatever the stage layout.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import llguidance
import torch

log = logging.getLogger("hybridserve.grammar")

# JSON without free whitespace: a small model that may put spaces anywhere may never stop putting them.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
BYTE_OFFSET = 3            # router/tokenizer.py's ByteTokenizer: byte b is id b + 3 (random-weight presets)


class _ByteVocab:
    """What llguidance.TokenizerWrapper reads: every id's bytes, for the byte tokenizer of presets."""

    def __init__(self, vocab_size: int, eos_token_id: int, bos_token_id: int | None):
        self.eos_token_id, self.bos_token_id = eos_token_id, bos_token_id
        self.tokens = [bytes([i - BYTE_OFFSET]) if 0 <= i - BYTE_OFFSET < 256 else f"<|{i}|>".encode()
                       for i in range(vocab_size)]
        self.special_token_ids = [i for i in range(vocab_size) if not 0 <= i - BYTE_OFFSET < 256]

    def __call__(self, text: bytes) -> list[int]:
        return [b + BYTE_OFFSET for b in text]


@functools.lru_cache(maxsize=8)
def _tokenizer(folder: str | None, vocab_size: int, eos_token_id: int, bos_token_id: int | None):
    path = Path(folder) / "tokenizer.json" if folder else None
    if path is not None and path.is_file():
        return llguidance.LLTokenizer(path.read_text(), n_vocab=vocab_size, eos_token=eos_token_id)
    byte_vocab = _ByteVocab(vocab_size, eos_token_id, bos_token_id)
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(byte_vocab), n_vocab=vocab_size)


def tokenizer_for(model) -> "llguidance.LLTokenizer":
    """The llguidance tokenizer of a model: its checkpoint's tokenizer.json, else the byte tokenizer the
    front door uses for checkpoints without one. Built once per checkpoint (about 10 ms for 4k tokens)."""
    cfg = model.cfg
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else 0
    folder = getattr(model, "checkpoint_folder", None)
    return _tokenizer(str(folder) if folder else None, cfg.vocab_size, eos, cfg.bos_token_id)


class SeqGrammar:
    """One sequence's matcher and the output tokens it stands for. The matcher has consumed
    `outputs[:fed]`; `outputs[fed]`, if any, is a stop token (or one the grammar refused): the output
    ends there, so from then on only stop tokens are allowed."""

    def __init__(self, tokenizer, grammar: str, stops: frozenset[int], vocab: int):
        self.matcher = llguidance.LLMatcher(tokenizer, grammar)
        self.broken = self.matcher.is_error()        # a grammar this tokenizer cannot serve: no masks
        if self.broken:
            log.warning("grammar not applied: %s", self.matcher.get_error()[:200])
        self.vocab = vocab
        eos = tokenizer.eos_token
        self.stops = stops or frozenset([eos])        # with no stop token at all, EOS ends a complete output
        self.ids_to_clear = sorted(t for t in self.stops | {eos} if 0 <= t < vocab)
        self.outputs: list[int] = []
        self.fed = 0

    def truncate(self, n: int) -> None:
        """Forget outputs from index n on (a rollback: verification rows, drafting, a recompute)."""
        if n >= len(self.outputs):
            return
        if n < self.fed:
            if not self.matcher.rollback(self.fed - n):
                self.matcher.reset()
                self.matcher.consume_tokens(self.outputs[:n])
            self.fed = n
        del self.outputs[n:]

    def extend(self, tokens: list[int]) -> None:
        """Output tokens settled (or assumed, for a row or a draft) after the current ones."""
        for t in tokens:
            if self.fed == len(self.outputs) and t not in self.stops and not self.broken:
                if self.matcher.try_consume_tokens([t]) == 1:
                    self.fed += 1
            self.outputs.append(t)

    @property
    def ended(self) -> bool:
        return self.fed < len(self.outputs)

    def allowed(self) -> torch.Tensor:
        """(V,) bool: the tokens the grammar allows next (stop tokens only where it accepts)."""
        if self.broken:
            return torch.ones(self.vocab, dtype=torch.bool)
        if self.ended or self.matcher.is_stopped():
            out = torch.zeros(self.vocab, dtype=torch.bool)
        else:
            words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)   # (W,)
            bits = (words[:, None] >> torch.arange(32, dtype=torch.int32)) & 1                          # (W, 32)
            out = bits.flatten()[:self.vocab].bool()
            if out.numel() < self.vocab:
                out = torch.cat([out, torch.zeros(self.vocab - out.numel(), dtype=torch.bool)])
            out[self.ids_to_clear] = False
            if not self.matcher.is_accepting():
                return out
        out[sorted(t for t in self.stops if 0 <= t < self.vocab)] = True
        return out

    def row_masks(self, drafts: list[int]) -> torch.Tensor:
        """(1 + len(drafts), V) bool: row i is what may follow the outputs + drafts[:i]. Rows after a
        draft the grammar refuses cannot be reached (that draft is rejected) and are left unmasked."""
        mark, rows = len(self.outputs), [self.allowed()]
        for i, d in enumerate(drafts):
            if not rows[-1][d] or d in self.stops:
                rows.extend(torch.ones(self.vocab, dtype=torch.bool) for _ in drafts[i:])
                break
            self.extend([d])
            rows.append(self.allowed())
        self.truncate(mark)
        return torch.stack(rows)


class GrammarStore:
    """The last stage's SeqGrammar per sequence with a grammar, kept in step with its settled tokens."""

    def __init__(self):
        self._seqs: dict[int, SeqGrammar] = {}

    def sync(self, seq_id: int, make, prompt_len: int, start_pos: int, settled: list[int]) -> SeqGrammar:
        """The sequence's state after this pass's settled inputs (positions start_pos..; outputs from
        position prompt_len on). `make()` builds a fresh SeqGrammar (first pass, or a gap it cannot
        bridge, e.g. another stage layout)."""
        g = self._seqs.get(seq_id)
        first = max(start_pos - prompt_len, 0)                     # output index of the first settled output
        new = settled[max(prompt_len - start_pos, 0):]
        if g is None or first > len(g.outputs):
            if g is not None:
                log.warning("seq %d: grammar state has a gap (%d > %d outputs); rebuilt", seq_id, first, len(g.outputs))
            g = self._seqs[seq_id] = make()
            if first > 0:                                        # outputs before this pass unknown: no masks
                g.broken, g.outputs = True, [-1] * first
        same = 0                                                   # inputs it already holds (no re-consuming)
        while same < len(new) and first + same < len(g.outputs) and g.outputs[first + same] == new[same]:
            same += 1
        g.truncate(first + same)                                   # what followed them is replaced, as in History
        g.extend(new[same:])
        return g

    def get(self, seq_id: int) -> SeqGrammar | None:
        return self._seqs.get(seq_id)

    def drop(self, seq_id: int) -> None:
        self._seqs.pop(seq_id, None)

    def __len__(self) -> int:
        return len(self._seqs)


def apply(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """logits (n, V) masked in place to `allowed` (n, V) bool (moved to their device). A row the mask
    would leave without a finite logit (min_tokens forbidding the stop tokens a complete grammar needs,
    or a draft vocabulary without the allowed tokens) gets its allowed tokens at equal logits instead."""
    allowed = allowed.to(logits.device, non_blocking=True)
    logits.masked_fill_(~allowed, float("-inf"))
    empty = ~torch.isfinite(logits).any(-1)                                                  # (n,)
    if bool(empty.any()):
        logits[empty] = torch.where(allowed[empty], 0.0, float("-inf")).to(logits.dtype)
    return logits
