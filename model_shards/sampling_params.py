"""Per-request sampling settings. Plain data (no torch): the scheduler and the HTTP layer use it too.

The limits below are the ones every front door checks and `SamplingParams.validate()` enforces again at
the engine: one request with a value a plan cannot carry must be a 400 for that request, not a failed
pass for every request in flight. Plans cross processes as msgpack (`cluster/contracts.py`), which
carries integers in [-2**63, 2**64-1] only, and `torch.Generator.manual_seed` takes the same range.
"""
from __future__ import annotations

import dataclasses
import functools
import math

SEED_MIN, SEED_MAX = -2**63, 2**64 - 1   # msgpack's integers and torch.Generator.manual_seed's seeds
INT32_MAX = 2**31 - 1                     # token ids, top_k, max_tokens, min_tokens (32-bit in the gRPC API)
TEMPERATURE_MAX = 100.0                   # the engine's bound; the OpenAI front door allows [0, 2]
MAX_STOP_TOKEN_IDS = 1024                 # checked against every sampled token (and masked under min_tokens)
PENALTY_MAX = 2.0                         # presence / frequency penalties in [-2, 2] (OpenAI's range)
LOGIT_BIAS_MAX = 100.0                    # logit_bias values in [-100, 100] (OpenAI's range)
MAX_GRAMMAR_CHARS = 1 << 20               # a compiled grammar (JSON Schema, regex, Lark) rides in every plan once
MAX_CHOICES = 128                         # n: choices per request (OpenAI's limit; the engine may allow fewer)
MAX_LOGPROBS = 20                         # top alternatives per token (OpenAI's top_logprobs limit)

_BOUND_TEXT = {SEED_MIN: "-2**63", SEED_MAX: "2**64-1", INT32_MAX: "2**31-1"}


def bound_text(value) -> str:
    """A limit as people write it: 2**31-1 rather than 2147483647."""
    return _BOUND_TEXT.get(value, str(value)) if isinstance(value, int) else f"{value:g}"


def show_value(value) -> str:
    """A client's value for an error message: repr, shortened (it may be a 4000-digit integer)."""
    try:
        text = repr(value)
    except ValueError:                    # an int beyond Python's int-to-str digit limit
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) <= 40 else text[:37] + "..."


def check_int(field: str, value, lo: int, hi: int, what: str = "") -> None:
    """ValueError unless `value` is an int (not a bool) in [lo, hi]; the message names field and range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field}: must be an integer, got {show_value(value)}")
    if not lo <= value <= hi:
        raise ValueError(f"{field}: {what or 'must be'} in [{bound_text(lo)}, {bound_text(hi)}], "
                         f"got {show_value(value)}")


def check_float(field: str, value, lo: float, hi: float, lo_open: bool = False) -> None:
    """ValueError unless `value` is a finite number in [lo, hi] (or (lo, hi])."""
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (lo < value if lo_open else lo <= value) and value <= hi)
    if not ok:
        raise ValueError(f"{field}: must be a finite number in {'(' if lo_open else '['}{bound_text(lo)}, "
                         f"{bound_text(hi)}], got {show_value(value)}")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0          # 0: greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0: off
    seed: int | None = None           # None: the engine picks one per request
    max_tokens: int = 16
    min_tokens: int = 0               # stop tokens (EOS too) cannot be sampled before this many tokens
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Logit adjustments as vLLM applies them (model_shards/penalties.py), before temperature; 0 / 1 / () is off.
    presence_penalty: float = 0.0     # subtracted from the logit of every token present in the output so far
    frequency_penalty: float = 0.0    # subtracted once per occurrence in the output so far
    repetition_penalty: float = 1.0   # > 1 discourages tokens of prompt + output (divides / multiplies logits)
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, bias) pairs added to the logits
    min_p: float = 0.0                # drop tokens whose probability < min_p * the top probability (0: off)
    # Structured outputs (model_shards/grammar.py): an llguidance grammar every sampled token must follow
    # ("": none); the front door compiles response_format / guided_* / a forced tool call into it.
    grammar: str = ""
    # Logprobs of the raw distribution (model_shards/logprobs.py): None off, else the chosen token's plus
    # that many top alternatives; prompt_logprobs likewise for prompt tokens 1.. (completions' echo).
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    n: int = 1                        # choices: n > 1 forks the prompt's caches into n sequences (router/fork.py)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @functools.cached_property
    def adjusts_logits(self) -> bool:
        """Whether penalties or logit_bias change this request's logits (neutral values cost nothing)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)

    @functools.cached_property
    def uses_history(self) -> bool:
        """Whether the last stage must keep this request's tokens (every penalty needs their counts)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def validate(self) -> None:
        """Raise ValueError naming the field and its limit (the engine answers 400 with it)."""
        check_float("temperature", self.temperature, 0.0, TEMPERATURE_MAX)
        check_float("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        check_int("top_k", self.top_k, 0, INT32_MAX)
        if self.seed is not None:
            check_int("seed", self.seed, SEED_MIN, SEED_MAX)
        check_int("max_tokens", self.max_tokens, 1, INT32_MAX)
        check_int("min_tokens", self.min_tokens, 0, INT32_MAX)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens: must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if not isinstance(self.stop_token_ids, (tuple, list)):
            raise ValueError(f"stop_token_ids: must be a list of token ids, got {show_value(self.stop_token_ids)}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} token ids, got {len(self.stop_token_ids)}")
        for t in self.stop_token_ids:
            check_int("stop_token_ids", t, 0, INT32_MAX, what="token ids must be")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos: must be true or false, got {show_value(self.ignore_eos)}")
        check_float("presence_penalty", self.presence_penalty, -PENALTY_MAX, PENALTY_MAX)
        check_float("frequency_penalty", self.frequency_penalty, -PENALTY_MAX, PENALTY_MAX)
        rp = self.repetition_penalty
        if isinstance(rp, bool) or not isinstance(rp, (int, float)) or not math.isfinite(rp) or rp <= 0:
            raise ValueError(f"repetition_penalty: must be a finite number > 0, got {show_value(rp)}")
        check_float("min_p", self.min_p, 0.0, 1.0)
        check_int("n", self.n, 1, MAX_CHOICES)
        for field in ("logprobs", "prompt_logprobs"):
            if getattr(self, field) is not None:
                check_int(field, getattr(self, field), 0, MAX_LOGPROBS)
        if not isinstance(self.grammar, str) or len(self.grammar) > MAX_GRAMMAR_CHARS:
            raise ValueError(f"grammar: must be a string of at most {MAX_GRAMMAR_CHARS} characters")
        if not isinstance(self.logit_bias, (tuple, list)):
            raise ValueError(f"logit_bias: must be (token id, bias) pairs, got {show_value(self.logit_bias)}")
        for pair in self.logit_bias:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"logit_bias: must be (token id, bias) pairs, got {show_value(pair)}")
            check_int("logit_bias", pair[0], 0, INT32_MAX, what="token ids must be")
            check_float("logit_bias", pair[1], -LOGIT_BIAS_MAX, LOGIT_BIAS_MAX)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stop_token_ids"] = list(self.stop_token_ids)
        d["logit_bias"] = [list(pair) for pair in self.logit_bias]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        d = dict(d)
        d["stop_token_ids"] = tuple(d.get("stop_token_ids") or ())
        d["logit_bias"] = tuple(tuple(pair) for pair in d.get("logit_bias") or ())
        return cls(**d)


def stop_token_set(params: SamplingParams, eos_token_id: int | None) -> set[int]:
    """The tokens that end the request: its stop_token_ids, and EOS unless ignore_eos."""
    stops = set(params.stop_token_ids)
    if eos_token_id is not None and not params.ignore_eos:
        stops.add(eos_token_id)
    return stops


def check_stop(generated: list[int], params: SamplingParams, eos_token_id: int | None) -> tuple[int, str | None]:
    """How many of the generated tokens to keep, and why generation ends ("stop", "length") or None.

    The stop token itself is kept (the detokenizer hides special tokens). min_tokens: the last stage
    never samples a stop token before min_tokens (tail.py masks them); ignoring one here as well is only
    a backstop for ids it cannot mask (outside the vocabulary, or every token a stop token).
    """
    stops = stop_token_set(params, eos_token_id)
    for i, t in enumerate(generated[:params.max_tokens]):
        if t in stops and i + 1 >= params.min_tokens:
            return i + 1, "stop"
    if len(generated) >= params.max_tokens:
        return params.max_tokens, "length"
    return len(generated), None


def drafts_to_verify(drafts: list[int], num_generated: int, params: SamplingParams) -> list[int]:
    """Drafts worth verifying: never more than the tokens the request may still produce, minus the
    one every pass yields anyway. Shared by the engine and the oracle so seeded runs agree."""
    return drafts[:max(0, min(len(drafts), params.max_tokens - num_generated - 1))]
