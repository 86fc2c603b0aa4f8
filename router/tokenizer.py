"""Text <-> token ids for the front doors, and the chat template.

Two kinds, one interface (`encode`, `decode`, `apply_chat_template`, `bos/eos_token_id`):
- `HFTokenizer`: a checkpoint folder's `tokenizer.json` (the `tokenizers` library, no transformers
  import: it is fast to load in every ingress replica), with the chat template from
  `chat_template.jinja` or `tokenizer_config.json`.
- `ByteTokenizer`: for random-weight presets, which ship no tokenizer. Byte b is id b+3; ids 0/1/2 are
  pad/bos/eos (the ModelConfig defaults). Ids past the byte range (a preset's vocab may be larger than
  259) decode to a visible `<|id|>` placeholder instead of vanishing, so a random model's output is
  not mysteriously empty.

Chat templates are Jinja, rendered exactly as transformers' `apply_chat_template` renders them (its jinja
environment, its special-token variables, `tools` / `documents` always defined, None-valued message keys
dropped, reasoning under all its names, `continue_final_message`), so the templates of Hub checkpoints work
unchanged; tests/unit/test_chat_template_parity.py compares the two. transformers itself is not imported:
it is slow to load in every ingress replica. Streaming decode is `tokenizers`' own `DecodeStream`.
"""
from __future__ import annotations

import datetime
import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("hybridserve.tokenizer")

# A minimal template for checkpoints without one (and the byte tokenizer): role tags, one turn a block.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ChatTemplateError(ValueError):
    """The template raised (e.g. `raise_exception('roles must alternate')`): a client error, 400."""


@lru_cache(maxsize=16)
def _compile_template(source: str):
    """The environment transformers' `apply_chat_template` compiles templates in (utils/chat_template_utils.py):
    sandboxed, trim_blocks/lstrip_blocks, loop controls, its `tojson`, `raise_exception`, `strftime_now`, the
    `{% generation %}` tag (here it only renders its body) and its hardened `dict` / `namespace`."""
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks the assistant's tokens for training masks."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    class TemplateNamespace(jinja2.utils.Namespace):
        """A namespace that refuses underscore names (no way into CPython internals), as transformers'."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"templates cannot store {name!r} on a namespace")

    class TemplateDict:
        """`dict(...)` and `dict.fromkeys(...)`, without the type itself."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message: str):
        raise ChatTemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(source)


# Names a message's reasoning goes by; transformers fills the first from the others, and `thinking` too.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _template_messages(messages: list[dict]) -> list[dict]:
    """The messages as transformers hands them to a template: keys whose value is None dropped (templates test
    for a missing key), the reasoning under all its names."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def render_chat_template(source: str, messages: list[dict], add_generation_prompt: bool = True,
                         continue_final_message: bool = False, **extra: Any) -> str:
    """What transformers' `apply_chat_template(..., tokenize=False)` renders: `tools` and `documents` are
    always defined (None when not given); `continue_final_message` leaves the last message open, found in the
    output by a tag appended to its content (transformers' method)."""
    import jinja2

    messages = _template_messages(messages)
    if continue_final_message:
        if add_generation_prompt:
            raise ChatTemplateError("continue_final_message: cannot be used with add_generation_prompt")
        if not messages or not isinstance(messages[-1].get("content"), str):
            raise ChatTemplateError("continue_final_message: the last message has no text content to continue")
        final = messages[-1]["content"]
        messages[-1] = {**messages[-1], "content": final + _CONTINUE_TAG}
    try:
        text = _compile_template(source).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            **{"tools": None, "documents": None, **extra})
    except ChatTemplateError:
        raise
    except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError) as e:
        # what a request's messages, tools or chat_template_kwargs can make a template do: a 400, not a 500
        raise ChatTemplateError(f"messages: the chat template failed: {type(e).__name__}: {e}") from e
    if continue_final_message:
        tag = _CONTINUE_TAG.strip()
        if final.strip() not in text or tag not in text:
            raise ChatTemplateError("continue_final_message: the chat template does not render the last message's "
                                    "content as given, so it cannot be continued")
        at = text.rindex(tag)
        text = text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
    return text


class BaseTokenizer:
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    bos_token: str = ""
    eos_token: str = ""
    unk_token: str = ""
    pad_token: str = ""
    chat_template: str = DEFAULT_CHAT_TEMPLATE
    # The template renders the BOS text itself; encoding the rendered chat must not add it again.
    template_adds_bos: bool = False

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def token_strs(self, ids: list[int]) -> list[str]:
        """Each id's own text (vLLM's `return_token_strs`); special tokens included."""
        return [self.decode([t], skip_special_tokens=False) for t in ids]

    def decode_stream(self, skip_special_tokens: bool = True) -> Callable[[int], str | None] | None:
        """A streaming decoder (one id in, the text that became final out, or None), or None when this
        tokenizer has none and the detokenizer must diff decodes itself."""
        return None

    def special_tokens_map(self) -> dict[str, str]:
        """The special tokens a template sees by name, as transformers passes them (`bos_token`, ...)."""
        return {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                  ("unk_token", self.unk_token), ("pad_token", self.pad_token)) if v}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            continue_final_message: bool = False, **kwargs: Any) -> str:
        """`kwargs`: more template variables (`tools`, a request's `chat_template_kwargs` such as
        `enable_thinking`); they cannot replace `bos_token` / `eos_token`."""
        return render_chat_template(self.chat_template, messages, add_generation_prompt, continue_final_message,
                                    **{**self.special_tokens_map(), **kwargs, "bos_token": self.bos_token,
                                       "eos_token": self.eos_token})

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """Render the template and tokenize; BOS added only when the template does not write it."""
        return self.encode_rendered(self.apply_chat_template(messages, add_generation_prompt, **kwargs))

    def encode_rendered(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of a rendered chat template. `add_special_tokens` (vLLM's): the tokenizer's own (BOS) on top of
        what the template wrote; without it, BOS only when the template does not write it."""
        if add_special_tokens:
            return self.encode(text, add_special_tokens=True)
        add_bos = not (self.bos_token and text.startswith(self.bos_token))
        return self.encode(text, add_special_tokens=add_bos)


class ByteTokenizer(BaseTokenizer):
    """Bytes as tokens: id = byte + 3; 0/1/2 are pad/bos/eos."""

    OFFSET = 3

    def __init__(self, vocab_size: int = 259, bos_token_id: int = 1, eos_token_id: int = 2, pad_token_id: int = 0):
        self.vocab_size = vocab_size
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
        self.special_ids = {bos_token_id, eos_token_id, pad_token_id}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b + self.OFFSET for b in text.encode("utf-8")]
        return ([self.bos_token_id] + ids) if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out, buf = [], bytearray()
        for t in ids:
            if 0 <= t - self.OFFSET < 256:
                buf.append(t - self.OFFSET)
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
            if t in self.special_ids:
                if not skip_special_tokens:
                    out.append({self.pad_token_id: "<pad>", self.bos_token_id: "<s>",
                                self.eos_token_id: "</s>"}[t])
            else:
                out.append(f"<|{t}|>")
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer(BaseTokenizer):
    """A Hugging Face `tokenizer.json` plus the template and special tokens of `tokenizer_config.json`."""

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer

        folder = Path(folder)
        self.folder = folder
        self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        cfg = _read_json(folder / "tokenizer_config.json")
        self.bos_token = _token_text(cfg.get("bos_token")) or ""
        self.eos_token = _token_text(cfg.get("eos_token")) or ""
        self.unk_token = _token_text(cfg.get("unk_token")) or ""
        self.pad_token = _token_text(cfg.get("pad_token")) or ""
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        template = None
        if (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text()
        elif (folder / "chat_template.json").exists():
            template = _read_json(folder / "chat_template.json").get("chat_template")
        else:
            template = cfg.get("chat_template")
        if isinstance(template, list):   # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        if not template:
            log.warning("%s has no chat template; using a minimal role-tag template", folder)
        self.chat_template = template or DEFAULT_CHAT_TEMPLATE

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = True) -> Callable[[int], str | None]:
        """`tokenizers`' own DecodeStream, bound to this tokenizer."""
        from functools import partial

        from tokenizers.decoders import DecodeStream

        return partial(DecodeStream(skip_special_tokens=skip_special_tokens).step, self._tok)

    def token_strs(self, ids: list[int]) -> list[str]:
        """The vocabulary's token strings (as transformers' convert_ids_to_tokens: byte-level BPE shows Ġ)."""
        return [self._tok.id_to_token(t) or "" for t in ids]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def _token_text(tok) -> str | None:
    if isinstance(tok, dict):       # {"content": "<s>", "lstrip": false, ...}
        return tok.get("content")
    return tok


def load_tokenizer(folder: str | Path | None, *, vocab_size: int = 259, bos_token_id: int = 1,
                   eos_token_id: int = 2, pad_token_id: int = 0) -> BaseTokenizer:
    """The checkpoint's tokenizer when it ships `tokenizer.json`, else the byte tokenizer."""
    if folder is not None and (Path(folder) / "tokenizer.json").exists():
        tok = HFTokenizer(folder)
        if tok.eos_token_id is None:
            tok.eos_token_id = eos_token_id
        if tok.bos_token_id is None:
            tok.bos_token_id = bos_token_id
        return tok
    return ByteTokenizer(vocab_size, bos_token_id, eos_token_id, pad_token_id)
