"""Incremental detokenization (router/detokenizer.py) as a property: whatever the token ids and however
they arrive (one at a time, or an MTP step's several at once), the streamed text is what one decode of all
the ids gives, never a broken character before the end, and a stop string cuts it where it first appears.

Both streaming paths are covered: the shipped checkpoint's tokenizer.json (tokenizers' DecodeStream) and the
byte tokenizer of random-weight presets (the two-offset diff). Random ids include special tokens and byte
tokens that do not form UTF-8, which a random-weight model does emit.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.detokenizer import REPLACEMENT, IncrementalDetokenizer, TextStream
from router.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

FOLDER = Path(__file__).resolve().parents[2] / "checkpoints" / "hybrid-mini"
TOKENIZERS = {"checkpoint": load_tokenizer(FOLDER), "bytes": ByteTokenizer(vocab_size=300)}


def token_ids(tok):
    """Runs of any ids (the specials and byte pieces drawn often, and ids past the tokenizer's vocabulary, which a
    model whose embedding is padded larger can emit) between the ids of real text (multi-byte characters that a
    step boundary may cut)."""
    vocab = tok.vocab_size
    noise = st.lists(st.one_of(st.integers(0, vocab - 1), st.integers(0, 8), st.integers(128, 259),
                               st.integers(vocab, vocab + 64)), max_size=6)
    text = st.text(alphabet=st.characters(codec="utf-8"), max_size=12).map(
        lambda t: tok.encode(t, add_special_tokens=False))
    return st.lists(st.one_of(noise, text), max_size=6).map(lambda runs: [i for run in runs for i in run])


def steps(ids: list[int], cuts: list[int]) -> list[list[int]]:
    """`ids` split into engine steps of 1 to 4 tokens (what MTP verification hands out at once)."""
    out, i = [], 0
    for k in cuts:
        if i >= len(ids):
            break
        out.append(ids[i:i + k])
        i += k
    return out + ([ids[i:]] if i < len(ids) else [])


def test_the_checkpoint_streams_through_tokenizers_decode_stream():
    """The library's decoder, not the hand-written diff, serves a tokenizer.json checkpoint."""
    assert isinstance(TOKENIZERS["checkpoint"], HFTokenizer)
    assert TOKENIZERS["checkpoint"].decode_stream() is not None
    assert TOKENIZERS["bytes"].decode_stream() is None


@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
@settings(max_examples=150, deadline=None)
@given(data=st.data(), skip_special=st.booleans())
def test_streamed_pieces_concatenate_to_the_full_decode(kind, data, skip_special):
    tok = TOKENIZERS[kind]
    ids = data.draw(token_ids(tok))
    cuts = data.draw(st.lists(st.integers(1, 4), max_size=40))
    d = IncrementalDetokenizer(tok, skip_special_tokens=skip_special)
    pieces = [d.add(step) for step in steps(ids, cuts)]
    full = tok.decode(ids, skip_special_tokens=skip_special)
    sent = "".join(pieces)
    assert full.startswith(sent), (ids, pieces)
    assert sent + d.flush() == full
    assert d.flush() == "", "flushing twice sends nothing more"
    # a character cut between tokens is held back: a piece never ends in a broken one the full text lacks
    for k, piece in enumerate(pieces):
        so_far = "".join(pieces[:k + 1])
        if piece.endswith(REPLACEMENT):
            assert full[len(so_far) - 1] == REPLACEMENT


@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_one_stop_string_cuts_the_streamed_text_at_its_first_occurrence(kind, data):
    tok = TOKENIZERS[kind]
    text = data.draw(st.text(alphabet="ab é☃\n", max_size=30))
    stop = data.draw(st.text(alphabet="ab é☃\n", min_size=1, max_size=4))
    ids = tok.encode(text, add_special_tokens=False)
    full = tok.decode(ids)
    s = TextStream(tok, stop=[stop])
    sent, hit = "", False
    for step in steps(ids, data.draw(st.lists(st.integers(1, 4), max_size=40))):
        out, hit = s.add(step)
        sent += out
        assert full.startswith(sent) and stop not in sent, "never past a stop string"
        if hit:
            break
    if not hit:
        sent += s.finish()
    cut = full.find(stop)
    assert sent == (full if cut < 0 else full[:cut]) and s.stopped == (cut >= 0)
