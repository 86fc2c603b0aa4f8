"""The prompts of a benchmark: random ones of a given length, a prompt file, or a chat dataset file.

Everything is read from local files; nothing is downloaded. Random prompts are made of Python keywords
and builtin names (words the default model was trained on, one or a few tokens each in any tokenizer).
With a local tokenizer (`--tokenizer`, a checkpoint folder) they have exactly `--input-len` tokens;
without one, the number of words comes from a linear fit of the server's own `usage.prompt_tokens` for
two probe prompts, and the input tokens reported are always the server's counts.
"""
from __future__ import annotations

import builtins
import json
import keyword
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Prompt:
    text: str
    output_len: int
    prompt_len: int | None = None      # tokens, when a local tokenizer counted them


def python_words() -> list[str]:
    words = set(keyword.kwlist) | {n for n in dir(builtins) if n.isalpha() and n.islower()}
    return sorted(words)


def random_text(num_words: int, rng: random.Random, words: list[str]) -> str:
    return " ".join(rng.choice(words) for _ in range(max(1, num_words)))


def exact_length_text(tokenizer, num_tokens: int, rng: random.Random, words: list[str], tries: int = 20) -> str:
    """Random words whose encoding (as the server encodes a completion prompt) has `num_tokens` tokens."""
    text = random_text(num_tokens, rng, words)
    for _ in range(tries):
        n = len(tokenizer.encode(text))
        if n == num_tokens:
            return text
        if n < num_tokens:
            text += " " + random_text(num_tokens - n, rng, words)
        else:
            body = tokenizer.encode(text, add_special_tokens=False)
            text = tokenizer.decode(body[:max(1, len(body) - (n - num_tokens))])
    return text                          # close enough; the server's usage reports the real count


def fit_tokens_per_word(samples: list[tuple[int, int]]) -> tuple[float, float]:
    """(words, tokens) pairs -> (tokens per word, fixed tokens), a line through the first and last."""
    (w0, t0), (w1, t1) = samples[0], samples[-1]
    slope = (t1 - t0) / (w1 - w0) if w1 != w0 else 1.0
    slope = slope if slope > 0 else 1.0
    return slope, t0 - slope * w0


def words_for(num_tokens: int, fit: tuple[float, float]) -> int:
    slope, fixed = fit
    return max(1, round((num_tokens - fixed) / slope))


def random_prompts(n: int, input_len: int, output_len: int, seed: int, tokenizer=None,
                   fit: tuple[float, float] | None = None) -> list[Prompt]:
    rng, words = random.Random(seed), python_words()
    if tokenizer is not None:
        out = []
        for _ in range(n):
            text = exact_length_text(tokenizer, input_len, rng, words)
            out.append(Prompt(text, output_len, len(tokenizer.encode(text))))
        return out
    num_words = words_for(input_len, fit) if fit else input_len
    return [Prompt(random_text(num_words, rng, words), output_len) for _ in range(n)]


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per line; or JSONL whose objects have "prompt" (lines that are JSON strings work too)."""
    prompts = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith(("{", '"')):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                obj = None
            if isinstance(obj, dict):
                if not isinstance(obj.get("prompt"), str):
                    raise ValueError(f"{path}:{i}: a JSON line needs a string \"prompt\"")
                prompts.append(obj["prompt"])
                continue
            if isinstance(obj, str):
                prompts.append(obj)
                continue
        prompts.append(line)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def read_chat_dataset(path: str | Path) -> list[str]:
    """ShareGPT-style JSON (a list) or JSONL: the first human turn of each conversation.

    A conversation is `{"conversations": [{"from": "human", "value": ...}, ...]}` or
    `{"messages": [{"role": "user", "content": ...}, ...]}`; entries without a human turn are skipped.
    """
    raw = Path(path).read_text(encoding="utf-8").strip()
    if raw.startswith("["):
        items = json.loads(raw)
    else:
        items = [json.loads(line) for line in raw.splitlines() if line.strip()]
    prompts = []
    for item in items:
        turns = item.get("conversations") or item.get("conversation") or item.get("messages") or []
        for turn in turns:
            who = turn.get("from", turn.get("role"))
            text = turn.get("value", turn.get("content"))
            if who in ("human", "user") and isinstance(text, str) and text.strip():
                prompts.append(text)
                break
    if not prompts:
        raise ValueError(f"{path}: no conversation with a human/user turn")
    return prompts


def cycle_to(texts: list[str], n: int, output_len: int, seed: int) -> list[Prompt]:
    """`n` prompts from a file's texts: shuffled with the seed, repeated when the file has fewer."""
    order = list(texts)
    random.Random(seed).shuffle(order)
    return [Prompt(order[i % len(order)], output_len) for i in range(n)]
