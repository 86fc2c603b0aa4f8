"""Per-request sampling settings. Plain data (no torch): the scheduler and the HTTP layer use it too."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0          # 0: greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0: off
    seed: int | None = None           # None: the engine picks one per request
    max_tokens: int = 16
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def validate(self) -> None:
        """Raise ValueError naming the field and its limit."""
        if not (0.0 <= self.temperature <= 100.0):
            raise ValueError(f"temperature: must be in [0, 100], got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {self.max_tokens}")
        if not (0 <= self.min_tokens <= self.max_tokens):
            raise ValueError(f"min_tokens: must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stop_token_ids"] = list(self.stop_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        d = dict(d)
        d["stop_token_ids"] = tuple(d.get("stop_token_ids") or ())
        return cls(**d)


def check_stop(generated: list[int], params: SamplingParams, eos_token_id: int | None) -> tuple[int, str | None]:
    """How many of the generated tokens to keep, and why generation ends ("stop", "length") or None.

    The stop token itself is kept (the detokenizer hides special tokens). min_tokens: stop tokens do
    not end a request before it has that many tokens.
    """
    stops = set(params.stop_token_ids)
    if eos_token_id is not None and not params.ignore_eos:
        stops.add(eos_token_id)
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
