"""Prepared data: tokenizer + token streams of the train / held-out splits, cached under runs/data/.

Why cached: tokenizer training and encoding take ~30 s; every command (train, evaluate, export) reuses
the same files, and rebuilding them from scratch gives the same result (deterministic file order).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from . import corpus
from .tokenizer import BOS_ID, EOS_ID, train_tokenizer

log = logging.getLogger("training.data")
DATA_DIR = Path("runs/data")


def prepare(vocab_size: int, data_dir: Path = DATA_DIR) -> tuple[Tokenizer, np.ndarray, np.ndarray, dict]:
    """Returns (tokenizer, train stream, held-out stream, meta), building them once."""
    data_dir.mkdir(parents=True, exist_ok=True)
    files = {k: data_dir / f for k, f in (("tok", "tokenizer.json"), ("train", "train.npy"),
                                           ("held", "heldout.npy"), ("meta", "meta.json"))}
    if all(p.exists() for p in files.values()):
        meta = json.loads(files["meta"].read_text())
        if meta.get("vocab_size") == vocab_size:
            return (Tokenizer.from_file(str(files["tok"])), np.load(files["train"]), np.load(files["held"]), meta)
    texts = corpus.read_texts(corpus.list_files())
    train, held = corpus.split(texts)
    log.info("corpus: %d readable .py files under %s (fingerprint %s); %d train, %d held out",
             len(texts), corpus.stdlib_root(), corpus.fingerprint(texts), len(train), len(held))
    tok = train_tokenizer([t for _, t in train], vocab_size)
    tr = corpus.encode_stream(tok, train, BOS_ID, EOS_ID)
    he = corpus.encode_stream(tok, held, BOS_ID, EOS_ID)
    root = corpus.stdlib_root()
    meta = {"vocab_size": vocab_size, "stdlib": str(root), "fingerprint": corpus.fingerprint(texts),
            "num_files": len(texts), "train_files": len(train), "heldout_files": len(held),
            "train_tokens": int(tr.size), "heldout_tokens": int(he.size),
            "train_bytes": sum(len(t.encode()) for _, t in train),
            "heldout_bytes": sum(len(t.encode()) for _, t in held),
            "heldout_paths": [str(p.relative_to(root)) for p, _ in held]}
    tok.save(str(files["tok"]))
    np.save(files["train"], tr)
    np.save(files["held"], he)
    files["meta"].write_text(json.dumps(meta, indent=1))
    log.info("tokens: %d train, %d held out (vocab %d)", tr.size, he.size, vocab_size)
    return tok, tr, he, meta


def sample_windows(stream: np.ndarray, batch: int, length: int, seed: int, step: int) -> np.ndarray:
    """Random windows (batch, length) for one step; depends only on (seed, step), so runs resume exactly."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, stream.size - length, size=batch)
    return np.stack([stream[s:s + length] for s in starts]).astype(np.int64)


def eval_windows(stream: np.ndarray, count: int, length: int) -> np.ndarray:
    """`count` evenly spaced, non-overlapping windows of the held-out stream (fixed for every evaluation)."""
    stride = (stream.size - length) // max(count, 1)
    return np.stack([stream[i * stride:i * stride + length] for i in range(count)]).astype(np.int64)
