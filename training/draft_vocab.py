"""The checkpoint's draft vocabulary: the token ids MTP drafts may take (`draft_vocab.json`).

Why: drafting's largest matrix is lm_head (vocab x hidden), read once per draft step. Restricted to the
most frequent tokens of the training split (as FR-Spec / EAGLE-3's hot-token maps do), the draft head
shrinks to a fraction and outputs do not change: verification still uses the full head. On hybrid-mini
the 2048 most frequent cover 92.7% of the training tokens and greedy acceptance does not change
(`python -m benchmarks.mtp` with and without `--no-draft-vocab`).
`python -m training.draft_vocab [--checkpoint checkpoints/hybrid-mini] [--size 2048]` writes it from the
checkpoint's own tokenizer; training/export.py does the same when it exports.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from model_shards.weights import DRAFT_VOCAB_FILE

from . import corpus
from .tokenizer import BOS_ID, EOS_ID

log = logging.getLogger("training.draft_vocab")
SIZE = 2048


def most_frequent(stream: np.ndarray, size: int, vocab_size: int) -> list[int]:
    """The `size` most frequent token ids of `stream`, most frequent first (ties: lower id first)."""
    counts = np.bincount(stream, minlength=vocab_size)
    return [int(i) for i in np.argsort(-counts, kind="stable")[:size]]


def write(folder: Path, stream: np.ndarray, vocab_size: int, size: int = SIZE) -> Path:
    """draft_vocab.json in `folder` from the training split's token stream."""
    ids = most_frequent(stream, size, vocab_size)
    covered = float(np.isin(stream, ids).mean())
    path = folder / DRAFT_VOCAB_FILE
    path.write_text(json.dumps({
        "description": "token ids MTP drafts may take (hybridserve model_shards/drafter.py); the most "
                       "frequent tokens of the training split, most frequent first",
        "source": "python -m training.draft_vocab", "size": len(ids),
        "train_tokens_covered": round(covered, 4), "token_ids": ids}) + "\n")
    log.info("draft vocabulary: %d of %d tokens, %.1f%% of the training tokens -> %s", len(ids), vocab_size,
             100 * covered, path)
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="checkpoints/hybrid-mini")
    ap.add_argument("--size", type=int, default=SIZE)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    folder = Path(args.checkpoint)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    train, _ = corpus.split(corpus.read_texts(corpus.list_files()))
    log.info("encoding the training split (%d files) with %s", len(train), folder / "tokenizer.json")
    stream = corpus.encode_stream(tok, train, BOS_ID, EOS_ID)
    write(folder, stream, tok.get_vocab_size(), args.size)


if __name__ == "__main__":
    main()
