"""The tokenizer of a checkpoint as llama.cpp's GGUF keys want it (used by gguf_export.py).

llama.cpp's GPT-2-style BPE (`tokenizer.ggml.model = "gpt2"`) with the `gpt-2` pre-tokenizer is the
same regex as `tokenizers`' ByteLevel with `use_regex`; a random-weight preset (no tokenizer.json: the
server's byte tokenizer, id = byte + 3) is written as the same BPE with one token per byte and no
reachable merge, which tokenizes exactly as the server does.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .config import ModelConfig

TOKENIZER_PRE = "gpt-2"
# A merge that can never fire: its left side is a multi-character string and no merge builds it. llama.cpp
# requires `tokenizer.ggml.merges` for a "gpt2" vocabulary, and the gguf writer drops empty arrays.
UNREACHABLE_MERGE = "<s> </s>"


@dataclasses.dataclass
class TokenizerData:
    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    add_bos: bool
    chat_template: str
    source: str              # "tokenizer.json" or "byte tokenizer"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what byte-level BPE vocabularies are written in)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tokenizer_data(folder: Path, cfg: ModelConfig) -> TokenizerData:
    """The tokenizer exactly as the server uses it (router.tokenizer.load_tokenizer): ids, special
    tokens, whether a BOS is prepended, and the chat template."""
    from router.tokenizer import ByteTokenizer, load_tokenizer   # lazy: the server's own view of the files

    from .gguf_export import GGUFExportError, _gguf    # lazy: gguf_export imports this module

    gguf = _gguf()
    TT = gguf.TokenType
    served = load_tokenizer(folder, vocab_size=cfg.vocab_size, bos_token_id=cfg.bos_token_id,
                            eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    add_bos = bool(served.encode("a", add_special_tokens=True)[:1] == [served.bos_token_id]) \
        and served.bos_token_id is not None
    n = cfg.vocab_size
    if isinstance(served, ByteTokenizer):
        specials = {cfg.pad_token_id: "<pad>", cfg.bos_token_id: "<s>", cfg.eos_token_id: "</s>"}
        table = bytes_to_unicode()
        tokens, types = [], []
        for i in range(n):
            if i in specials:
                token, kind = specials[i], TT.CONTROL
            elif 0 <= i - ByteTokenizer.OFFSET < 256:
                token, kind = table[i - ByteTokenizer.OFFSET], TT.NORMAL
            else:                                   # decodes as a placeholder in the server too
                token, kind = f"<|{i}|>", TT.UNUSED
            tokens.append(token)
            types.append(kind)
        return TokenizerData("gpt2", TOKENIZER_PRE, tokens, [int(t) for t in types], [UNREACHABLE_MERGE],
                             cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id, add_bos,
                             served.chat_template, "byte tokenizer")

    raw = json.loads((folder / "tokenizer.json").read_text())
    model = raw.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise GGUFExportError(f"tokenizer.json: model type {model.get('type')!r} (byte_fallback="
                              f"{model.get('byte_fallback')}); only byte-level BPE maps onto llama.cpp's gpt2 vocab")
    pre = raw.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        raise GGUFExportError(f"tokenizer.json: pre_tokenizer {json.dumps(pre)[:200]} is not the GPT-2 ByteLevel "
                              "regex; no llama.cpp pre-tokenizer is known to match it")
    if raw.get("normalizer") is not None:
        raise GGUFExportError("tokenizer.json: a normalizer is set; llama.cpp's gpt2 vocab has none")
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in raw.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    if by_id and max(by_id) >= n:
        raise GGUFExportError(f"tokenizer.json has token id {max(by_id)} but vocab_size is {n}")
    tokens, types = [], []
    for i in range(n):
        if i not in by_id:                          # rows past the tokenizer (as llama.cpp's converter pads)
            token, kind = f"[PAD{i}]", TT.UNUSED
        elif i in added:
            token, kind = by_id[i], (TT.CONTROL if added[i].get("special") else TT.USER_DEFINED)
        else:
            token, kind = by_id[i], TT.NORMAL
        tokens.append(token)
        types.append(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    cfg_tok = _read_json(folder / "tokenizer_config.json")
    pad_text = cfg_tok.get("pad_token")
    pad_text = pad_text.get("content") if isinstance(pad_text, dict) else pad_text
    pad_id = model["vocab"].get(pad_text, cfg.pad_token_id) if pad_text else cfg.pad_token_id
    return TokenizerData("gpt2", TOKENIZER_PRE, tokens, [int(t) for t in types], merges or [UNREACHABLE_MERGE],
                         served.bos_token_id, served.eos_token_id, pad_id, add_bos, served.chat_template,
                         "tokenizer.json")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
