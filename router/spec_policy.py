"""How many MTP drafts each sequence verifies and proposes, chosen every step from what the engine measures.

No torch: the scheduler imports this. Why a policy at all: verifying d drafts puts d more tokens in the
pass. At one sequence that is nearly free (a decode step is bound by reading weights, so 4 tokens cost
about what 1 does) and k=3 gains 1.7-2.5x; at 16-32 sequences on a CPU the pass is bound by compute, each
draft token costs about what a whole decode token does, drafting runs the MTP block over every
sequence, and a fixed k loses to MTP off. No constant table can know where that turn is on a given
deployment (CPU or GPU, model, pipeline layout), so `AdaptivePolicy` learns it as it runs
(router/spec_costs.py): the seconds of a pass by token count per batch size, the seconds of drafting per
MTP row (the last stage times its drafting; rows: each drafting sequence's settled tokens, then each draft),
and each sequence's acceptance per draft position.

Each step it maximises expected tokens per second of a decoding pass of the sequences it plans:
  E = sum_i (1 + sum_{j<=d_i} prod_{p<j} a_i(p)),   T = cost(tokens + sum_i d_i) + row_s * rows,
  rows = 0 without drafts, else one per sequence + their expected accepted drafts + sum_i d_i
by greedy marginal allocation: every (sequence, next draft) increment sorted by its gain prod_{p<j} a_i(p),
and the prefix with the best E/T wins (every prefix is evaluated: the learned cost need not be convex),
provided it beats proposing none by `min_gain` (3%): near break-even the learned costs cannot tell the
two apart, and there drafting is the choice that could lose. And where decode passes of a batch size
realized fewer tokens/s with drafts than without (`observe_decode`), none are chosen there.
Proposals are judged in the decoding pass that will verify them (a big prompt chunk in this pass does
not make them cheaper to verify next step); verifying drafts a sequence holds is judged in this pass by
token cost alone (drafting them is paid for), so drafts are not thrown away when a choice flips.
Two kinds of deliberate deviation keep the estimates honest: a sequence that has not had a draft verified
for `probe_every` of its passes gets one draft (proposed, then verified) when even a perfect draft would
pay in this batch; every `explore_every` choices the allocation is moved one draft per sequence up or
down for two steps (per micro-batch), so the cost next to the operating point gets measured.

Outputs never depend on the choice: greedy verification yields the argmax chain whatever the drafts,
rejection sampling keeps the target distribution for any number of drafts chosen before the draws, and
verifying a prefix of the proposed drafts is verifying fewer drafts. Seeded random sampling keeps k
(`pinned`): its draws, hence its tokens, depend on the drafts verified. `FixedPolicy` is the old
behaviour (every sequence its k every step). The functions at the end are the scheduler's and engine's
side of it: which sequences a plan will hold, what each may draft, which feed the MTP block, and the
drafting rows of a pass.
"""
from __future__ import annotations

import dataclasses

from model_shards.sampling_params import drafts_to_verify

from .spec_costs import Acceptance, PassCost, batch_bucket


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A sequence that samples in the pass being planned.

    cap:    the most drafts it may verify or propose (its k, trimmed by max_tokens and the context)
    tokens: tokens it puts in the pass besides drafts (1 when decoding; its prompt chunk otherwise)
    pinned: always `cap` drafts, whatever they cost (seeded random sampling: same seed, same tokens)
    held:   drafts it holds that this pass may verify (proposed by its last pass)
    """

    seq_id: int
    cap: int
    tokens: int = 1
    pinned: bool = False
    held: int = 0


@dataclasses.dataclass
class Choice:
    """One step's choice per sequence: `drafts` to propose after the pass and, of the drafts it holds, how
    many to `verify` in it; with the tokens, seconds and expected tokens out of the decoding pass the
    proposals were judged in (for tests and logs)."""

    drafts: dict[int, int]
    verify: dict[int, int] = dataclasses.field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0
    expected: float = 0.0

    def get(self, seq_id: int) -> int | None:
        return self.drafts.get(seq_id)


# Exploring up from no drafts is rarer (FAR_EXPLORE_EVERY x) while one draft per sequence is predicted to
# cost more than this share of tokens/s: at 16-32 sequences on a CPU each exploration fed every sequence's
# stash through the MTP block and verified a pass of twice the tokens, a 3-4% tax on a choice that stayed 0.
FAR_FROM_DRAFTING = 0.2
FAR_EXPLORE_EVERY = 8
# Drafting is not chosen (explorations still draft, and keep measuring) in batches of a size where decode
# passes with drafts realized fewer tokens/s than those without, over at least REALIZED_MIN_PASSES of each.
REALIZED_ALPHA = 0.1
REALIZED_MIN_PASSES = 8
RECHECK_FAR = 16             # a batch far from drafting is fully re-evaluated every this many choices
STOP_STASHING_AFTER = 16     # ... and stops stashing MTP pairs after this many far choices in a row


class FixedPolicy:
    """Every sequence proposes and verifies its k drafts every step (`--speculative-policy fixed`)."""

    adaptive = False

    def choose(self, cands: list[Candidate], extra_tokens: int, budget: int, extra_seqs: int = 0) -> Choice:
        return Choice({c.seq_id: c.cap for c in cands}, {c.seq_id: min(c.cap, c.held) for c in cands})

    def observe_pass(self, num_tokens: int, seconds: float, draft_seconds: float = 0.0, draft_rows: int = 0,
                     num_seqs: int = 1) -> None:
        pass

    def observe_decode(self, num_seqs: int, tokens_per_s: float, drafting: bool) -> None:
        pass

    def observe_verified(self, seq_id: int, num_verified: int, num_accepted: int) -> None:
        pass

    def release(self, seq_id: int) -> None:
        pass


class AdaptivePolicy:
    """Drafts per sequence per step that maximise expected tokens per second (module docstring).

    The priors only matter until the first passes are measured: a fixed cost of `fixed_s` per pass plus
    `per_token_s` per token, `row_s` per MTP row drafting, acceptance `prior_acceptance` per position.
    """

    adaptive = True

    def __init__(self, k: int, *, fixed_s: float = 0.01, per_token_s: float = 0.0005, row_s: float = 0.0005,
                 prior_acceptance: float = 0.7, probe_every: int = 16, explore_every: int = 128,
                 alpha: float = 0.2, microbatches: int = 1, min_gain: float = 0.03):
        self.k = k
        # Proposing drafts must beat proposing none by this share of expected tokens/s: where the two are
        # within the noise of the learned costs, drafting is what could lose (never a loss beats a tie).
        self.min_gain = min_gain
        self.cost = PassCost(fixed_s, per_token_s, alpha)     # all passes: the prior of each batch size's
        self.costs: dict[int, PassCost] = {}                  # batch-size bucket -> its curve
        self.row_s, self.alpha = row_s, alpha
        self.acceptance = Acceptance(k, prior_acceptance)
        self.probe_every = probe_every
        self.idle: dict[int, int] = {}          # seq -> its sampling passes since a draft of it was verified
        self.num_choices = 0
        self.drafting = True                    # its latest choice proposed drafts (then prompts feed MTP too)
        # An exploration lasts each micro-batch's propose + verify, as often per micro-batch as with one.
        self.explore_steps, self.explore_every = 2 * microbatches, explore_every * microbatches
        self._explore: tuple[int, int] = (0, 0)  # (choices left, direction) of the current exploration
        self.far_streak = 0                     # choices in a row judged far from drafting (FAR_FROM_DRAFTING)
        # batch bucket -> [tokens/s of decode passes without drafts, their count, the same with drafts]
        self.realized: dict[int, list[float]] = {}
        self._far_cands = 0                     # ... for a batch of this many sampling sequences

    # ---- what the engine measures ------------------------------------------------------------------
    def observe_pass(self, num_tokens: int, seconds: float, draft_seconds: float = 0.0, draft_rows: int = 0,
                     num_seqs: int = 1) -> None:
        """A pass of `num_seqs` sequences and `num_tokens` tokens took `seconds`, `draft_seconds` of them
        drafting over `draft_rows` MTP rows (0: not a pure decode pass that drafted; its MTP time, feeding
        prompts, counts as token cost)."""
        token_s = seconds - draft_seconds if draft_rows > 0 else seconds
        self.cost.observe(num_tokens, token_s)
        self._curve_for(num_seqs).observe(num_tokens, token_s)
        if draft_rows > 0 and draft_seconds > 0:
            self.row_s += self.alpha * (draft_seconds / draft_rows - self.row_s)

    def observe_decode(self, num_seqs: int, tokens_per_s: float, drafting: bool) -> None:
        """A pure decode pass of `num_seqs` sequences emitted tokens at this rate, verifying or proposing
        drafts or not: what drafting really returns here, hidden costs included (the learned costs price
        a pass by its size alone)."""
        r = self.realized.setdefault(batch_bucket(max(1, num_seqs)), [0.0, 0, 0.0, 0])
        i = 2 if drafting else 0
        r[i] = tokens_per_s if not r[i + 1] else r[i] + REALIZED_ALPHA * (tokens_per_s - r[i])
        r[i + 1] += 1

    def drafting_loses(self, num_seqs: int) -> bool:
        """Decode passes with drafts have realized fewer tokens/s than those without, in batches of this size."""
        r = self.realized.get(batch_bucket(max(1, num_seqs)))
        return r is not None and min(r[1], r[3]) >= REALIZED_MIN_PASSES and r[2] < r[0]

    def observe_verified(self, seq_id: int, num_verified: int, num_accepted: int) -> None:
        """A sampling pass of `seq_id` verified `num_verified` drafts and accepted `num_accepted`."""
        self.idle[seq_id] = 0 if num_verified else self.idle.get(seq_id, 0) + 1
        if num_verified:
            self.acceptance.observe(seq_id, num_verified, num_accepted)

    def release(self, seq_id: int) -> None:
        self.idle.pop(seq_id, None)
        self.acceptance.release(seq_id)

    def forget_sequences(self) -> None:
        """Drop every per-sequence estimate (another policy plans for a while); pass costs stay."""
        self.idle.clear()
        self.acceptance.seqs.clear()

    def _curve_for(self, num_seqs: int) -> PassCost:
        b = batch_bucket(max(1, num_seqs))
        curve = self.costs.get(b)
        if curve is None:
            curve = self.costs[b] = PassCost(alpha=self.alpha, prior=self.cost)
        return curve

    def seconds(self, tokens: int, rows: float, num_seqs: int = 1) -> float:
        """A pass of `num_seqs` sequences and `tokens` tokens whose drafting runs the MTP block over `rows`
        rows (0: none)."""
        return self._curve_for(num_seqs)(tokens) + self.row_s * rows

    # ---- the choice --------------------------------------------------------------------------------
    def choose(self, cands: list[Candidate], extra_tokens: int, budget: int, extra_seqs: int = 0) -> Choice:
        """Drafts to propose and to verify for each candidate; `extra_tokens`: tokens of the pass from the
        `extra_seqs` sequences that do not sample (prompt chunks); `budget`: the pass's token budget.

        Proposing is judged in a decoding pass of these sequences, where the drafts will be verified (a big
        prompt chunk in this pass does not make them cheaper to verify next step), drafting cost included.
        Verifying drafts a sequence already holds is judged in this very pass by token cost alone: drafting
        them is paid for, so drafts proposed are not thrown away when the choice next to break-even flips."""
        self.num_choices += 1
        if self._still_far(cands):
            self.far_streak += 1
            return Choice({c.seq_id: 0 for c in cands}, {c.seq_id: 0 for c in cands})
        gains = {c.seq_id: self._gains(c) for c in cands}
        pinned = [c for c in cands if c.pinned]
        drafts = {c.seq_id: len(gains[c.seq_id]) if c.pinned else 0 for c in cands}
        fed = sum(1 for c in cands if c.cap > 0)         # sequences that could draft
        w0 = sum(drafts.values())                        # drafts there whatever this chooses (pinned)

        def rows(e: float, w: int) -> float:            # MTP rows of a pass with w drafts, e expected tokens:
            # only drafting sequences run the block (the others stash); at most one per draft
            return min(w, fed) + (e - len(cands)) + w if w else 0.0
        # 1. Proposals, in the decoding pass that will verify them.
        n0, e0 = len(cands) + w0, len(cands) + sum(sum(gains[c.seq_id]) for c in pinned)
        incs = sorted((-g, j, c.seq_id) for c in cands if not c.pinned for j, g in enumerate(gains[c.seq_id]))
        del incs[max(0, budget - n0):]
        seqs, curve, row_s = len(cands), self._curve_for(len(cands)), self.row_s
        seconds = lambda n, e, i: curve(n) + row_s * rows(e, w0 + i)       # noqa: E731
        m, points = self._best(incs, n0, e0, seconds, self.min_gain)
        if m and self.drafting_loses(len(cands)):        # the estimate says it pays; the passes say it does not
            m = 0
        up = min(len(incs), len(cands))                  # an exploration up: one more draft per sequence
        far = m == 0 and up > 0 and (points[up][1] / seconds(*points[up], up)
                                     < (1 - FAR_FROM_DRAFTING) * points[0][1] / seconds(*points[0], 0))
        m, exploring = self._explored(m, len(incs), len(cands), far)
        for _, _, seq_id in incs[:m]:
            drafts[seq_id] += 1
        tokens, expected = points[m]
        w = w0 + m
        for c in self._probes(cands, drafts, tokens, expected, w, lambda n, r: curve(n) + row_s * r, rows,
                              budget - tokens):
            drafts[c.seq_id], tokens, w = 1, tokens + 1, w + 1
        drafting = rows(expected, w)
        if any(c.cap > 0 and not c.pinned for c in cands):     # not a choice forced by max_tokens or a seed
            self.drafting = w - w0 > 0
        # 2. Verification, in this pass: what it holds, by token cost (its drafting is paid for).
        verify = {c.seq_id: min(c.held, len(gains[c.seq_id])) if c.pinned else 0 for c in cands}
        n1 = extra_tokens + sum(c.tokens for c in cands) + sum(verify.values())
        e1 = len(cands) + sum(sum(gains[c.seq_id][:verify[c.seq_id]]) for c in pinned)
        vincs = sorted((-g, j, c.seq_id) for c in cands if not c.pinned
                       for j, g in enumerate(gains[c.seq_id][:c.held]))
        del vincs[max(0, budget - n1):]
        real = self._curve_for(seqs + extra_seqs)
        mv, _ = self._best(vincs, n1, e1, lambda n, e, i: real(n) + row_s * drafting)
        if exploring > 0:                                # exploring up: the extra drafts get verified
            mv = len(vincs)
        for _, _, seq_id in vincs[:mv]:
            verify[seq_id] += 1
        for c in cands:                                  # a probe's draft is verified, whatever it costs
            if not verify[c.seq_id] and c.held and self.idle.get(c.seq_id, 0) >= self.probe_every:
                verify[c.seq_id] = 1
        quiet = far and not exploring and w == 0 and not any(verify.values())
        self.far_streak, self._far_cands = (self.far_streak + 1 if quiet else 0), len(cands)
        return Choice(drafts, verify, tokens, self.seconds(tokens, drafting, seqs), expected)

    @property
    def stashing(self) -> bool:
        """Whether sequences that skip the MTP block keep their pairs for its next run: not once drafting
        has been far from paying for STOP_STASHING_AFTER choices in a row (a big batch on a CPU), where
        the stash's per-pass cost buys nothing; a sequence that drafts again later starts its MTP
        attention with a gap (lower acceptance for a while; outputs never change)."""
        return self.far_streak < STOP_STASHING_AFTER

    def _still_far(self, cands: list[Candidate]) -> bool:
        """Between full evaluations (every RECHECK_FAR choices, and whenever the batch changes size or
        holds seeded or held drafts), a batch judged far from drafting stays at none without the
        evaluation (its Python is ~1% of a 32-sequence CPU pass)."""
        due = self.explore_every and self.num_choices % (self.explore_every * FAR_EXPLORE_EVERY) == 0
        if not self.far_streak or self.num_choices % RECHECK_FAR == 0 or self._explore[0] or due:
            return False
        return len(cands) == self._far_cands and not any(c.pinned or c.held for c in cands)

    def _gains(self, c: Candidate) -> list[float]:
        """gain[j]: expected tokens the (j+1)-th draft adds, prod_{p<=j} acceptance(p)."""
        out, gain = [], 1.0
        for rate in self.acceptance.of(c.seq_id)[:max(0, min(c.cap, self.k))]:
            gain *= rate
            out.append(gain)
        return out

    @staticmethod
    def _best(incs, n: int, e: float, seconds, min_gain: float = 0.0) -> tuple[int, list[tuple[int, float]]]:
        """The prefix of `incs` (sorted by gain) with the most expected tokens per second, and (tokens,
        expected tokens) after each prefix; `seconds(tokens, expected, prefix length)`. A non-empty prefix
        must beat the empty one by `min_gain` (a share of its rate)."""
        points, best_m, best_rate = [(n, e)], 0, e / seconds(n, e, 0)
        floor = best_rate * (1 + min_gain)
        for m, (neg_gain, _, _) in enumerate(incs, 1):
            n, e = n + 1, e - neg_gain
            points.append((n, e))
            rate = e / seconds(n, e, m)
            if rate > best_rate * (1 + 1e-9) and rate > floor:
                best_m, best_rate = m, rate
        return best_m, points

    def _explored(self, best_m: int, most: int, num_cands: int, far: bool = False) -> tuple[int, int]:
        """best_m, or every `explore_every` choices a prefix one draft per sequence longer or shorter
        (alternately) for `explore_steps` choices: each sequence's drafts get proposed, then verified,
        so the cost of the token counts next to the choice gets measured. Returns (prefix, direction or 0).
        `far`: not drafting, and a draft per sequence is predicted to lose by more than FAR_FROM_DRAFTING:
        exploring costs a catch-up of every sequence's stash and a verification pass, for a measurement
        that could hardly flip the choice, so it happens FAR_EXPLORE_EVERY times less often."""
        left, direction = self._explore
        every = self.explore_every * (FAR_EXPLORE_EVERY if far else 1)
        if left == 0 and every and self.num_choices % every == 0 and most:
            left, direction = self.explore_steps, (1 if (self.num_choices // self.explore_every) % 2 else -1)
            if best_m == 0 or best_m == most:
                direction = 1 if best_m == 0 else -1
        if left == 0:
            return best_m, 0
        self._explore = (left - 1, direction)
        return min(most, max(0, best_m + direction * max(1, num_cands))), direction

    def _probes(self, cands, drafts, tokens, expected, w, seconds, rows, room) -> list[Candidate]:
        """Sequences without a verified draft for `probe_every` passes get one, if a perfect first draft
        would pay in this pass: how a sequence whose drafts kept failing finds out they work again."""
        now = expected / seconds(tokens, rows(expected, w))
        out = []
        for c in cands:
            if drafts[c.seq_id] or c.cap <= 0 or c.pinned or self.idle.get(c.seq_id, 0) < self.probe_every:
                continue
            if len(out) + 1 > room:
                break
            e = expected + len(out) + 1
            if e / seconds(tokens + len(out) + 1, rows(e, w + len(out) + 1)) > now:
                out.append(c)
        return out


# ---- the scheduler's and the engine's side ----------------------------------------------------------------
def pinned(seq) -> bool:
    """Seeded random sampling keeps k drafts every step and always feeds the MTP block: its draws depend on
    the drafts verified, and the same seed must give the same tokens (greedy output never depends on it)."""
    return seq.params.seed is not None and not seq.params.greedy


def draft_cap(seq, max_model_len: int, early: int = 0) -> int:
    """Drafts worth proposing or verifying for a Sequence: k, fewer near max_tokens or the context limit.
    early: output tokens it will have by then that it does not hold yet (a look-ahead step's 1)."""
    left = min(seq.params.max_tokens - len(seq.output_ids), max_model_len - seq.num_tokens) - 1 - early
    return max(0, min(seq.num_speculative, left))


def candidates(seqs, limit: int, budget: int, max_model_len: int,
               ahead: frozenset | set = frozenset()) -> tuple[list[Candidate], int, int]:
    """The sequences a plan will likely hold, in the order the scheduler takes them, each with its tokens
    within the budget: (those that sample, tokens and count of the prompt chunks that do not). `ahead`:
    ids of sequences planned by look-ahead (router/scheduler.py): one token, no draft held, one more output."""
    cands, extra, extra_seqs = [], 0, 0
    for seq in seqs:
        if len(cands) >= limit or budget <= 0:
            break
        n = min(seq.num_uncomputed, budget)
        if n < seq.num_uncomputed:
            extra, extra_seqs = extra + n, extra_seqs + 1
        else:
            early = seq.seq_id in ahead
            cap = draft_cap(seq, max_model_len, early)
            held = len(drafts_to_verify(seq.drafts, len(seq.output_ids), seq.params)) if n == 1 and not early else 0
            cands.append(Candidate(seq.seq_id, cap, n, pinned(seq), held))
            budget -= cap if pinned(seq) else 0
        budget -= n
    return cands, extra, extra_seqs


def feed_mtp(steps, seqs, policy) -> None:
    """Set SeqStep.mtp_context / mtp_stash. The MTP block runs for a sequence only in a pass that drafts
    for it (then it first catches up on the pairs stashed since its last run), for seeded random sampling
    (always: as with k every step), and for prompt chunks while the policy drafts at all. Every other
    MTP sequence stashes its settled pairs on the last stage: the block costs nothing while a sequence
    does not draft, and its attention has no gap when it drafts again."""
    drafting = getattr(policy, "drafting", True)
    stashing = getattr(policy, "stashing", True)
    for s in steps:
        seq = seqs[s.seq_id]
        prompt = not s.sample or s.num_tokens > 1 + len(s.drafts)
        mtp = seq.num_speculative > 0
        # A parent of n > 1 choices feeds it always: its choices inherit the MTP block's KV, not its stash.
        s.mtp_context = mtp and (s.num_drafts > 0 or pinned(seq) or (prompt and drafting) or bool(seq.fork_ids))
        s.mtp_stash = mtp and not s.mtp_context and stashing


def observe(policy, plan, result, seconds: float) -> None:
    """What the engine tells the policy of a finished pass: its cost by size and, for a pure decode pass,
    the tokens per second it realized with or without drafts."""
    policy.observe_pass(plan.num_tokens, seconds, result.draft_s, draft_rows(plan, result), len(plan.seqs))
    if seconds > 0 and plan.seqs and all(s.sample and s.num_tokens == 1 + len(s.drafts) for s in plan.seqs):
        emitted = sum(len(o.new_tokens) for o in result.outputs)
        policy.observe_decode(len(plan.seqs), emitted / seconds, any(s.drafts or s.num_drafts for s in plan.seqs))


def draft_rows(plan, result) -> int:
    """MTP rows a pure decode pass drafted over (stashed and settled pairs fed, then each draft step), for
    the drafting cost; 0 if it drafted nothing or also read prompts (that MTP time counts as token cost)."""
    if not any(s.num_drafts for s in plan.seqs):
        return 0
    if any(not s.sample or s.num_tokens != 1 + len(s.drafts) for s in plan.seqs):
        return 0
    return result.draft_rows
