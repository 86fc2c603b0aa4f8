"""What the last pipeline stage does after its layers: verify, sample, and draft with the MTP block.

Shared by the single-process generator (the oracle) and the cluster's last stage, so both make the
same choices. Only token ids and counts leave this module; logits and draft distributions stay here.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from . import grammar, logprobs, penalties, speculative
from .batch import BatchLayout, SeqSlice
from .cache import HybridCache
from .model import HybridModel
from .sampling_params import SamplingParams, stop_token_set


@dataclasses.dataclass
class TailRequest:
    """Per sequence of the batch (same order as the layout).

    input_ids:  the tokens of this pass (the last len(drafts) of them are drafts under verification)
    sample:     produce a token (final prefill chunk, decode, verification); False for earlier chunks
    next_token: for a non-final prefill chunk, the prompt token after it (the MTP block needs it)
    num_drafts: how many drafts to propose after sampling (0: none this pass)
    prompt_len: the prompt's length, so position p holds output token p - prompt_len (min_tokens)
    mtp_context: with num_drafts 0, still feed the MTP block this pass's settled pairs
    mtp_stash:  with num_drafts 0 and no mtp_context: keep this pass's settled pairs in the DraftStore; the
                sequence's next MTP run feeds them first (its attention cache then has no gap)
    """

    seq_id: int
    input_ids: list[int]
    drafts: list[int]
    sample: bool
    next_token: int | None
    params: SamplingParams
    seed: int
    num_drafts: int
    prompt_len: int = 0
    mtp_context: bool = False
    mtp_stash: bool = False


@dataclasses.dataclass
class TailResult:
    seq_id: int
    new_tokens: list[int]
    num_accepted: int
    drafts: list[int]
    logprobs: list | None = None          # per new token (model_shards/logprobs.py), if the request asks
    prompt_logprobs: list | None = None   # per prompt token at positions start_pos + 1.., if it asks


# At most this many stashed MTP pairs per sequence (older ones are dropped: a gap in the MTP block's
# attention costs acceptance, never correctness). Bounds the store at MAX_STASHED x hidden per sequence.
MAX_STASHED = 64


@dataclasses.dataclass
class Stash:
    """Settled pairs the MTP block has not seen: positions start.., the last layer's row of each (before
    the MTP input's norm, applied when they are fed) in the chunks the passes stashed them in, and the
    token after each. Chunks, not one tensor: a pass appends without copying what is already kept (the
    stash of every non-drafting sequence grows each pass); they are joined once, when the pairs are fed.
    A chunk is a slice of its pass's stashed rows only (`_mtp_draft` gathers them), so what a stash
    keeps alive is bounded by MAX_STASHED passes' stashed rows."""

    start: int
    chunks: list[torch.Tensor]
    tokens: list[int]
    rows: int = 0                     # rows in the chunks (the oldest chunk may hold dropped ones)

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    @property
    def h(self) -> torch.Tensor:
        """(len(tokens), d): the pairs' rows, oldest first."""
        rows = self.chunks[0] if len(self.chunks) == 1 else torch.cat(self.chunks)
        return rows[len(rows) - len(self.tokens):]


class DraftStore:
    """What the last stage keeps per sequence between passes: draft distributions (random sampling
    only) until verified, the tokens of requests with penalties (penalties.History), and the MTP pairs
    of passes that did not run the MTP block (Stash)."""

    def __init__(self):
        self._probs: dict[int, torch.Tensor] = {}
        self._stash: dict[int, Stash] = {}
        self.history = penalties.History()
        self.grammars = grammar.GrammarStore()     # structured outputs: per sequence, its grammar state

    def stash(self, seq_id: int, start: int, h: torch.Tensor, tokens: list[int]) -> None:
        """Append pairs at positions start..; a stash that does not end at `start` (the sequence was
        recomputed, or rolled back) is replaced."""
        st = self._stash.get(seq_id)
        if st is not None and st.end == start:
            st.chunks.append(h)
            st.tokens += tokens
        else:
            st = self._stash[seq_id] = Stash(start, [h], list(tokens))
        st.rows += len(h)
        drop = len(st.tokens) - MAX_STASHED
        if drop > 0:
            st.start += drop
            del st.tokens[:drop]
            while len(st.chunks) > 1 and st.rows - len(st.chunks[0]) >= len(st.tokens):
                st.rows -= len(st.chunks.pop(0))

    def unstash(self, seq_id: int, start: int) -> Stash | None:
        """The pairs that end where a pass's settled positions begin (`start`), or None."""
        st = self._stash.pop(seq_id, None)
        return st if st is not None and st.end == start else None

    def num_stashed(self, seq_id: int) -> int:
        st = self._stash.get(seq_id)
        return 0 if st is None else len(st.tokens)

    def put(self, seq_id: int, q: torch.Tensor | None) -> None:
        if q is None:
            self._probs.pop(seq_id, None)
        else:
            self._probs[seq_id] = q

    def take(self, seq_id: int) -> torch.Tensor | None:
        return self._probs.pop(seq_id, None)

    def drop(self, seq_id: int) -> None:
        self._probs.pop(seq_id, None)
        self._stash.pop(seq_id, None)
        self.history.drop(seq_id)
        self.grammars.drop(seq_id)

    def __len__(self) -> int:
        return len(self._probs)


@torch.no_grad()
def run_tail(model: HybridModel, cache: HybridCache, h: torch.Tensor, batch: BatchLayout,
             reqs: list[TailRequest], store: DraftStore, timings: dict | None = None) -> list[TailResult]:
    """h (T, d): the last layer's output for the whole batch (before norm_f). `timings`, if given, gets
    "draft_s": the seconds spent drafting (what the engine's speculation policy charges per draft step)
    and "draft_rows": the MTP rows run in them."""
    results = [TailResult(r.seq_id, [], 0, []) for r in reqs]
    # 1. Verify drafts / sample one token, from logits of only the rows that need them.
    rows, owners, adjust = [], [], False
    for j, (s, r) in enumerate(zip(batch.seqs, reqs)):
        if r.params.uses_history:        # penalties count prompt + outputs: note this pass's settled inputs
            store.history.note(r.seq_id, s.start_pos, r.input_ids[:len(r.input_ids) - len(r.drafts)])
        if r.params.grammar:             # the grammar state follows the settled inputs, as the history does
            _sync_grammar(model, store, s, r)
        if r.params.prompt_logprobs is not None:
            results[j].prompt_logprobs = _prompt_logprobs(model, h, s, r)
        if r.sample:
            n = 1 + len(r.drafts)
            rows.extend(range(s.end - n, s.end))
            owners.append((j, n))
            adjust = adjust or r.params.adjusts_logits
    logits = model.logits(h[rows]) if rows else None                    # (rows, V)
    if adjust:
        logits = logits.float()          # penalties in float32 (argmax and sampling use float32 anyway)
    plain = _plain_greedy_tokens(logits, owners, reqs)
    at, jobs, verifying = 0, [], []      # sequences with drafts: (index, grammar state, raw logprobs)
    for j, n in owners:
        if j in plain:                   # decided above, with every other plain greedy row
            results[j].new_tokens = [plain[j]]
            at += n
            continue
        r, s = reqs[j], batch.seqs[j]
        seed_pos = s.start_pos + s.num_tokens - len(r.drafts)          # tokens committed before this pass
        gen = None if r.params.greedy else speculative.step_generator(r.seed, seed_pos, device=logits.device)
        # Raw logprobs (before every adjustment below), row i for the token at this pass's position i.
        lp = logprobs.raw_logprobs(logits[at:at + n]) if r.params.logprobs is not None else None   # (n, V)
        if r.params.adjusts_logits:      # logit_bias, then penalties, each verified row with its own counts
            penalties.apply(logits[at:at + n], r.params, store.history.tokens(r.seq_id), r.prompt_len,
                            r.drafts)
        if r.params.min_tokens:
            num_generated = seed_pos - r.prompt_len
            forbid_stops(logits[at:at + n], num_generated, r.params, model.cfg.eos_token_id)
        g = store.grammars.get(r.seq_id) if r.params.grammar else None
        if g is not None:                # each verified row masked by the grammar state after drafts[:i]
            grammar.apply(logits[at:at + n], g.row_masks(r.drafts))
        if r.drafts:                     # verified below, with every other sequence's drafts
            jobs.append(speculative.VerifyJob(at, r.drafts, store.take(r.seq_id), r.params, gen))
            verifying.append((j, g, lp))
        else:
            tok, _ = speculative.sample(logits[at], r.params, gen)
            _emit(results[j], [tok], 0, lp, r)
        at += n
    for (j, g, lp), (toks, acc) in zip(verifying, speculative.verify_batch(logits, jobs) if jobs else []):
        r = reqs[j]
        if acc and r.params.uses_history:        # accepted drafts sit at the positions after this pass's input
            store.history.accept(r.seq_id, r.drafts[:acc])
        if acc and g is not None:
            g.extend(r.drafts[:acc])
        _emit(results[j], toks, acc, lp, r)
    if model.mtp is not None:
        t0 = time.perf_counter()
        rows = _mtp_draft(model, cache, h, batch, reqs, results, store)
        if timings is not None:
            timings["draft_s"], timings["draft_rows"] = time.perf_counter() - t0, rows
    return results


def _emit(res: TailResult, toks: list[int], acc: int, lp: torch.Tensor | None, r: TailRequest) -> None:
    res.new_tokens, res.num_accepted = toks, acc
    if lp is not None:                   # emitted tokens only: accepted drafts, then the bonus / corrected one
        res.logprobs = logprobs.entries(lp, toks, r.params.logprobs)


def _plain_greedy_tokens(logits: torch.Tensor | None, owners: list, reqs: list[TailRequest]) -> dict[int, int]:
    """The token of every sequence whose one row is plain greedy (no drafts, logprobs, logit changes,
    min_tokens or grammar), from one argmax over their rows: a batch of decode steps pays one op, not
    one per sequence. {index in the batch: token}; empty when fewer than two such rows."""
    rows, at = {}, 0
    for j, n in owners:
        p = reqs[j].params
        if n == 1 and p.greedy and p.logprobs is None and not (p.adjusts_logits or p.min_tokens or p.grammar):
            rows[j] = at
        at += n
    if len(rows) < 2:
        return {}
    return dict(zip(rows, logits[list(rows.values())].argmax(-1).tolist()))


def _prompt_logprobs(model: HybridModel, h: torch.Tensor, s: SeqSlice, r: TailRequest) -> list:
    """Logprobs of the prompt tokens this pass's rows predict: row p (p < prompt_len - 1) scores the prompt
    token at p + 1 (the next input, or `next_token` after a chunk's last row). Empty past the prompt."""
    stop = min(s.start_pos + len(r.input_ids) - len(r.drafts), r.prompt_len - 1)
    if stop <= s.start_pos:
        return []
    nxt = r.input_ids[1:] + ([] if r.next_token is None else [r.next_token])
    n = stop - s.start_pos
    return logprobs.prompt_entries(model.logits, h[s.offset:s.offset + n], nxt[:n], r.params.prompt_logprobs)


def _sync_grammar(model: HybridModel, store: DraftStore, s: SeqSlice, r: TailRequest) -> None:
    """Bring the sequence's grammar state to this pass's settled inputs (built on its first pass here)."""
    def make() -> grammar.SeqGrammar:
        stops = frozenset(stop_token_set(r.params, model.cfg.eos_token_id))
        return grammar.SeqGrammar(grammar.tokenizer_for(model), r.params.grammar, stops, model.cfg.vocab_size)
    store.grammars.sync(r.seq_id, make, r.prompt_len, s.start_pos, r.input_ids[:len(r.input_ids) - len(r.drafts)])


def forbid_stops(logits: torch.Tensor, num_generated: int, params: SamplingParams, eos_token_id: int | None) -> None:
    """min_tokens as vLLM defines it: until a request has min_tokens tokens, its stop tokens (and EOS
    unless ignore_eos) cannot be sampled. Row i of `logits` (in place) gives output token number
    num_generated + i, so with MTP each verified position is masked by its own index, and greedy
    verification still picks exactly what MTP-off decoding picks. Ids outside the vocabulary cannot be
    sampled anyway; a mask that would leave no token at all is not applied."""
    rows = params.min_tokens - num_generated          # leading rows still short of min_tokens
    if rows <= 0:
        return
    vocab = logits.shape[-1]
    ids = sorted(t for t in stop_token_set(params, eos_token_id) if 0 <= t < vocab)
    if ids and len(ids) < vocab:
        logits[:rows, ids] = float("-inf")


def _mtp_draft(model, cache, h, batch, reqs, results, store) -> int:
    """Feed the MTP block every newly settled (h_t, token_{t+1}) pair (after the sequence's stashed ones),
    then draft recursively; stash the pairs of sequences that skip the block this pass. Returns the MTP
    rows run (pairs fed, then one per draft step)."""
    fed, stashed = [], []                # (j, settled rows of h, their next tokens)
    for j, (s, r, res) in enumerate(zip(batch.seqs, reqs, results)):
        if not r.sample and r.next_token is None:
            continue
        m = res.num_accepted + 1 if r.drafts else s.num_tokens        # settled positions s.start_pos..+m-1
        extra = res.new_tokens[-1] if r.sample else r.next_token
        pairs = (j, range(s.offset, s.offset + m), r.input_ids[1:m] + [extra])
        if r.num_drafts > 0 or r.mtp_context:
            fed.append(pairs)
        elif r.mtp_stash:
            stashed.append(pairs)
    if not fed and not stashed:
        return 0
    if stashed:                                  # kept as they are: the MTP input's norm runs when they are fed
        kept, at = h[[i for p in stashed for i in p[1]]], 0                 # (stashed rows, d), a copy
        for j, rows, tokens in stashed:
            store.stash(reqs[j].seq_id, batch.seqs[j].start_pos, kept[at:at + len(rows)], tokens)
            at += len(rows)
    if not fed:
        return 0
    h_in = model.mtp_hidden_input(h[[i for p in fed for i in p[1]]])     # (fed rows, d)
    pieces, pair_tokens, seqs, drafting, at = [], [], [], [], 0
    for j, rows, tokens in fed:
        s, r = batch.seqs[j], reqs[j]
        start, mine = s.start_pos, h_in[at:at + len(rows)]
        old = store.unstash(r.seq_id, start)
        if old is not None:                                           # its stashed pairs go first
            start, tokens = old.start, old.tokens + tokens
            pieces.append(model.mtp_hidden_input(old.h))
        pieces.append(mine)
        at += len(rows)
        seqs.append(SeqSlice(len(pair_tokens), len(tokens), start, s.mamba_slot, s.block_table))
        pair_tokens.extend(tokens)
        if r.sample and r.num_drafts > 0:
            drafting.append((j, len(seqs) - 1))
    h_prev = pieces[0] if len(pieces) == 1 else (h_in[:at] if len(pieces) == len(fed) else torch.cat(pieces))
    num_rows = len(pair_tokens)
    newest = [seqs[i].end - 1 for _, i in drafting]                  # each drafting sequence's newest pair
    # Only those rows come back (the MoE after the MTP attention runs on them alone); all rows write KV.
    sampled = [n for n, (j, _) in enumerate(drafting) if not reqs[j].params.greedy]   # need every token's logit
    cur_h, cur_logits = model.mtp_forward(torch.tensor(pair_tokens, device=h.device), h_prev, BatchLayout(seqs),
                                          cache, logit_rows=newest, full_vocab_rows=sampled)
    row = {j: n for n, (j, _) in enumerate(drafting)}               # sequence -> its row in cur_h, cur_logits
    # Recursive drafting: k steps, each one token per drafting sequence.
    pos = {j: seqs[i].start_pos + seqs[i].num_tokens for j, i in drafting}  # MTP position of the next draft step
    qs: dict[int, list] = {j: [] for j, _ in drafting}
    max_k = max((reqs[j].num_drafts for j, _ in drafting), default=0)
    # Structured outputs: drafts follow the grammar from the state after this pass's new tokens (undone below).
    grammars = {j: (g, len(g.outputs)) for j, _ in drafting if (g := store.grammars.get(reqs[j].seq_id))}
    for j, (g, _) in grammars.items():
        g.extend(results[j].new_tokens[-1:])          # the accepted drafts are already in (run_tail)
    for step in range(max_k):
        active = [j for j, _ in drafting if reqs[j].num_drafts > step]
        for j in active:
            r, s = reqs[j], batch.seqs[j]
            committed = s.start_pos + s.num_tokens - len(r.drafts) + len(results[j].new_tokens)
            gen = None if r.params.greedy else speculative.step_generator(r.seed, committed, stream=1 + step,
                                                                            device=cur_logits.device)
            if j in grammars:            # q is then the masked distribution the draft is sampled from
                grammar.apply(cur_logits[row[j]][None], grammars[j][0].allowed()[None])
            tok, q = speculative.sample(cur_logits[row[j]], r.params, gen)
            results[j].drafts.append(tok)
            if j in grammars:
                grammars[j][0].extend([tok])
            qs[j].append(q)
        if step + 1 == max_k:
            break
        active = [j for j in active if reqs[j].num_drafts > step + 1]
        if not active:
            break
        layout = BatchLayout([SeqSlice(n, 1, pos[j], batch.seqs[j].mamba_slot, batch.seqs[j].block_table)
                              for n, j in enumerate(active)])
        prev_h = cur_h[[row[j] for j in active]]
        tok_t = torch.tensor([results[j].drafts[-1] for j in active], device=h.device)
        num_rows += len(active)
        sampled = [n for n, j in enumerate(active) if not reqs[j].params.greedy]
        cur_h, cur_logits = model.mtp_forward(tok_t, prev_h, layout, cache, full_vocab_rows=sampled)
        for n, j in enumerate(active):
            row[j] = n
            pos[j] += 1
    for g, mark in grammars.values():
        g.truncate(mark)
    for j, _ in drafting:
        store.put(reqs[j].seq_id, None if reqs[j].params.greedy else torch.stack(qs[j]))
    return num_rows
