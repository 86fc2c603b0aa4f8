"""What the speculation policy (router/spec_policy.py) learns as the engine runs: the cost of a pass by
its size, and how often each sequence's drafts are accepted. No torch (the scheduler imports this).

- `PassCost`: the seconds of a pass by its token count: an EMA per token-count bucket, made
  non-decreasing by weighted isotonic regression (a rarely seen, noisy bucket does not lift a well
  measured one), interpolated; outside what it has seen, its prior's shape scaled to the nearest
  observation (the slope fitted from the observations once they span a range). The policy keeps one per
  batch size (sequences in the pass), because the shape of a pass matters as much as its tokens: 16
  tokens as 4 sequences verifying 3 drafts each take the verification path and cost more than 16
  sequences decoding; each one's prior is the curve of all passes, whose prior is linear.
- `Acceptance`: per sequence and draft position, the probability that draft p is accepted given that
  drafts < p were: an EMA seeded by the engine-wide per-position rate (decayed counts over every
  verification, with a weak prior).
"""
from __future__ import annotations

import bisect
import math


def _bucket(n: int) -> int:
    """Token counts up to 16 each have a bucket; above, buckets grow by 25%."""
    return n if n <= 16 else 17 + int(math.log(n / 17) / math.log(1.25))


def batch_bucket(n: int) -> int:
    """Sequences in a pass: up to 4 each their own curve; above, curves for 25% wider ranges."""
    return n if n <= 4 else 5 + int(math.log(n / 5) / math.log(1.25))


class PassCost:
    """Seconds of a pass by token count, learned online (see the module docstring). `prior`: seconds by
    token count before and outside what it has seen (default: fixed_s + per_token_s * tokens)."""

    def __init__(self, fixed_s: float = 0.01, per_token_s: float = 0.0005, alpha: float = 0.2, prior=None):
        self.fixed_s, self.per_token_s, self.alpha = fixed_s, per_token_s, alpha
        self._prior = prior
        self.points: dict[int, list[float]] = {}       # bucket -> [mean tokens, mean seconds, observations]
        self._curve: tuple[list[float], list[float], float | None] | None = None

    def prior(self, n: float) -> float:
        return self._prior(n) if self._prior is not None else self.fixed_s + self.per_token_s * n

    def observe(self, num_tokens: int, seconds: float) -> None:
        if num_tokens <= 0 or not seconds > 0 or not math.isfinite(seconds):
            return
        p = self.points.get(_bucket(num_tokens))
        if p is None:
            self.points[_bucket(num_tokens)] = [float(num_tokens), seconds, 1.0]
        else:
            if p[2] >= 3:       # one pass that met a GC pause or a neighbour moves an established mean 10% at most
                seconds = min(max(seconds, p[1] / 1.5), p[1] * 1.5)
            p[0] += self.alpha * (num_tokens - p[0])
            p[1] += self.alpha * (seconds - p[1])
            p[2] += 1.0
        self._curve = None

    def _build(self) -> tuple[list[float], list[float], float]:
        # Pool adjacent violators: more tokens never cost less. Weights: observations, up to what the EMA
        # remembers (a bucket seen once weighs 1, a steady one 2 / alpha).
        blocks: list[list[float]] = []                 # [weight, weight * tokens, weight * seconds]
        for n, t, count in sorted(self.points.values()):
            w = min(count, 2.0 / self.alpha)
            blocks.append([w, w * n, w * t])
            while len(blocks) > 1 and blocks[-2][2] / blocks[-2][0] > blocks[-1][2] / blocks[-1][0]:
                last = blocks.pop()
                blocks[-1] = [a + b for a, b in zip(blocks[-1], last)]
        ns = [b[1] / b[0] for b in blocks]
        ts = [b[2] / b[0] for b in blocks]
        slope = None                                   # None: above them, the prior's shape at their scale
        if len(ns) >= 2 and ns[-1] >= 2 * ns[0]:       # the observations span a range: fit their slope
            mn, mt = sum(ns) / len(ns), sum(ts) / len(ts)
            var = sum((n - mn) ** 2 for n in ns)
            slope = max(0.0, sum((n - mn) * (t - mt) for n, t in zip(ns, ts)) / var)
        return ns, ts, slope

    def __call__(self, n: float) -> float:
        if not self.points:
            return self.prior(n)
        if self._curve is None:
            self._curve = self._build()
        ns, ts, slope = self._curve
        if n >= ns[-1]:
            if slope is None:
                return ts[-1] * self.prior(n) / self.prior(ns[-1])
            return ts[-1] + slope * (n - ns[-1])
        if n <= ns[0]:
            return ts[0] * self.prior(n) / self.prior(ns[0])
        i = bisect.bisect_right(ns, n)
        w = (n - ns[i - 1]) / (ns[i] - ns[i - 1])
        return ts[i - 1] + w * (ts[i] - ts[i - 1])


class Acceptance:
    """Per-position conditional acceptance: engine-wide (the prior) and per sequence (an EMA)."""

    def __init__(self, k: int, prior: float = 0.7, prior_weight: float = 4.0, decay: float = 0.995,
                 seq_alpha: float = 0.2):
        self.k, self.prior, self.prior_weight, self.decay, self.seq_alpha = k, prior, prior_weight, decay, seq_alpha
        self.tried = [0.0] * k
        self.accepted = [0.0] * k
        self.seqs: dict[int, list[float]] = {}

    def engine_rate(self, p: int) -> float:
        return (self.accepted[p] + self.prior_weight * self.prior) / (self.tried[p] + self.prior_weight)

    def of(self, seq_id: int) -> list[float]:
        rates = self.seqs.get(seq_id)
        if rates is None:
            rates = self.seqs[seq_id] = [self.engine_rate(p) for p in range(self.k)]
        return rates

    def observe(self, seq_id: int, num_verified: int, num_accepted: int) -> None:
        """Drafts 0..num_accepted-1 were accepted; draft num_accepted (if verified) was rejected."""
        rates = self.of(seq_id)
        for p in range(min(num_accepted + 1, num_verified, self.k)):
            hit = 1.0 if p < num_accepted else 0.0
            self.tried[p] = self.tried[p] * self.decay + 1.0
            self.accepted[p] = self.accepted[p] * self.decay + hit
            rates[p] += self.seq_alpha * (hit - rates[p])

    def release(self, seq_id: int) -> None:
        self.seqs.pop(seq_id, None)
