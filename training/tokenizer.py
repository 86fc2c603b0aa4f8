"""Byte-level BPE tokenizer trained on the training split, with the special tokens MODEL.md fixes.

Why byte-level: every Python file (any Unicode) round-trips exactly; ids 0/1/2 are <pad>/<s>/</s> as in
the real checkpoints, followed by chat-role tokens so the chat template has single-token role tags.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

# Tool use in the Qwen3-Coder / Nemotron 3 format (what `--tool-call-parser qwen3_coder` parses): with
# `tools`, a system turn lists them as JSON and asks for `<tool_call><function=NAME><parameter=K>V</parameter>
# </function></tool_call>`; an assistant turn's `tool_calls` are written that way; `tool` messages become a
# user turn of `<tool_response>` blocks. `enable_thinking` (chat_template_kwargs) true opens `<think>` after
# the generation prompt, false writes an empty `<think></think>`. A conversation without tools, tool
# messages or enable_thinking renders exactly as the plain role-tag template did.
TOOLS_PROMPT = (
    "\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n"
    "</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n- Function calls MUST follow the "
    "specified format: an inner <function=...></function> block must be nested within <tool_call></tool_call> "
    "XML tags\n- Required parameters MUST be specified\n- You may provide optional reasoning for your function "
    "call in natural language BEFORE the function call, but NOT after\n- If there is no function call "
    "available, answer the question like normal with your current knowledge and do not tell the user about "
    "function calls\n</IMPORTANT>"
)
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if tools %}"
    "{{- '<|system|>\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\n\n' }}{%- endif %}"
    "{{- '# Tools\n\nYou have access to the following functions:\n\n<tools>' }}"
    "{%- for tool in tools %}"
    "{{- '\n' }}{{- (tool['function'] if tool['function'] is defined else tool) | tojson }}"
    "{%- endfor %}"
    "{{- '" + TOOLS_PROMPT + "<|end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if tools and loop.first and message['role'] == 'system' %}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or loop.previtem['role'] != 'tool' %}{{- '<|user|>\n' }}{%- endif %}"
    "{{- '<tool_response>\n' + message['content'] + '\n</tool_response>\n' }}"
    "{%- if loop.last or loop.nextitem['role'] != 'tool' %}{{- '<|end|>\n' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] %}"
    "{{- '<|assistant|>\n' }}"
    "{%- if message['content'] %}{{- message['content'] + '\n' }}{%- endif %}"
    "{%- for tool_call in message['tool_calls'] %}"
    "{%- set call = tool_call['function'] if tool_call['function'] is defined else tool_call %}"
    "{{- '<tool_call>\n<function=' + call['name'] + '>\n' }}"
    "{%- for name, value in call['arguments'] | items %}"
    "{{- '<parameter=' + name + '>\n' }}"
    "{{- value if value is string else value | tojson }}"
    "{{- '\n</parameter>\n' }}"
    "{%- endfor %}"
    "{{- '</function>\n</tool_call>\n' }}"
    "{%- endfor %}"
    "{{- '<|end|>\n' }}"
    "{%- else %}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}"
    "{%- if enable_thinking is defined and enable_thinking %}{{- '<think>\n' }}"
    "{%- elif enable_thinking is defined %}{{- '<think></think>' }}{%- endif %}"
    "{%- endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def tokenizer_config() -> dict:
    """tokenizer_config.json for transformers' PreTrainedTokenizerFast."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": None,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "additional_special_tokens": SPECIAL_TOKENS[3:],
        "chat_template": CHAT_TEMPLATE,
    }
