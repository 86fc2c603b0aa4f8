"""The training corpus: the Python standard library's own `.py` files, present offline on every machine.

Why this corpus: it needs no download, it is real code (so MTP drafting has structure to exploit), and the
file list is deterministic (sorted by path). Every 20th file is held out for evaluation. Files that are not
valid UTF-8 are skipped (a handful of encoding tests). `site-packages` / `dist-packages` are excluded.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

import numpy as np

HOLDOUT_EVERY = 20


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_files(root: Path | None = None) -> list[Path]:
    """All stdlib .py files, sorted by relative path (deterministic on a given Python version)."""
    root = root or stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        out.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(out, key=lambda p: str(p.relative_to(root)))


def read_texts(files: list[Path]) -> list[tuple[Path, str]]:
    """(path, text) for the files that decode as UTF-8."""
    out = []
    for p in files:
        try:
            out.append((p, p.read_bytes().decode("utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    return out


def split(texts: list[tuple[Path, str]]) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """(train, heldout): every HOLDOUT_EVERY-th readable file (index 0, 20, 40, ...) is held out."""
    train = [t for i, t in enumerate(texts) if i % HOLDOUT_EVERY != 0]
    held = [t for i, t in enumerate(texts) if i % HOLDOUT_EVERY == 0]
    return train, held


def fingerprint(texts: list[tuple[Path, str]]) -> str:
    """A short hash of the file names and contents, logged so runs on other Python versions are told apart."""
    h = hashlib.sha256()
    for p, t in texts:
        h.update(p.name.encode())
        h.update(t.encode())
    return h.hexdigest()[:12]


def encode_stream(tokenizer, texts: list[tuple[Path, str]], bos: int, eos: int) -> np.ndarray:
    """One int32 token stream: <s> file </s> <s> file </s> ... in list order."""
    encs = tokenizer.encode_batch([t for _, t in texts])
    parts = []
    for e in encs:
        parts.append(np.asarray([bos] + e.ids + [eos], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
