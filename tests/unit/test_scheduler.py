"""The scheduler is plain Python: these specify its batching rules without a model."""
from __future__ import annotations

import sys

import pytest

from model_shards.sampling_params import SamplingParams
from router.block_manager import BlockManager
from cluster.contracts import SeqOutput, StepResult
from router.scheduler import Scheduler, SchedulerConfig
from router.sequence import Sequence, SeqStatus


def make(num_blocks=64, block_size=4, slots=4, budget=16, max_len=64, max_seqs=4):
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=max_len, eos_token_id=2)
    return Scheduler(cfg, BlockManager(num_blocks, block_size, slots))


def seq(i, n_prompt, max_tokens=8, k=0, **kw):
    return Sequence(i, f"r{i}", list(range(10, 10 + n_prompt)), SamplingParams(max_tokens=max_tokens, **kw), 0, k)


def reply(plan, tokens_per_seq=None, drafts=None, accepted=0):
    outs = []
    for s in plan.seqs:
        toks = (tokens_per_seq or {}).get(s.seq_id, [7] * (1 + accepted)) if s.sample else []
        outs.append(SeqOutput(s.seq_id, toks if s.sample else [], accepted if s.drafts else 0,
                              (drafts or {}).get(s.seq_id, [])))
    return StepResult(plan.step_id, plan.microbatch, outs)


def test_the_scheduler_does_not_import_torch():
    import subprocess
    code = "import sys, router.scheduler; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_long_prompts_are_chunked_under_the_token_budget():
    s = make(budget=10)
    s.add(seq(0, 25))
    plans = []
    while True:
        plan = s.schedule()
        plans.append(plan)
        s.update(reply(plan))
        if plan.seqs[0].sample:
            break
    assert [p.seqs[0].num_tokens for p in plans] == [10, 10, 5]
    assert [p.seqs[0].start_pos for p in plans] == [0, 10, 20]
    assert [p.seqs[0].next_token for p in plans] == [20, 30, None]


def test_decodes_go_first_and_new_prompts_fill_the_rest_of_the_budget():
    s = make(budget=8)
    s.add(seq(0, 3))
    s.update(reply(s.schedule()))              # seq 0 prefilled, now decoding
    s.add(seq(1, 20))
    plan = s.schedule()
    assert [(x.seq_id, x.num_tokens) for x in plan.seqs] == [(0, 1), (1, 7)]


def test_sequences_in_flight_are_not_scheduled_again():
    s = make()
    s.add(seq(0, 3))
    s.add(seq(1, 3))
    a = s.schedule(max_seqs=1, microbatch=0)
    b = s.schedule(max_seqs=1, microbatch=1)
    assert {x.seq_id for x in a.seqs}.isdisjoint({x.seq_id for x in b.seqs})
    assert s.schedule() is None


def test_verification_commits_the_accepted_count_in_the_next_plan():
    s = make()
    s.add(seq(0, 3, max_tokens=20, k=3))
    s.update(reply(s.schedule(), drafts={0: [4, 5, 6]}))
    plan = s.schedule()
    step = plan.seqs[0]
    assert step.input_ids == [7, 4, 5, 6] and step.drafts == [4, 5, 6] and step.commit_index == -1
    s.update(reply(plan, tokens_per_seq={0: [4, 5, 9]}, accepted=2, drafts={0: [1, 1, 1]}))
    q = s.seqs[0]
    assert q.output_ids == [7, 4, 5, 9] and q.num_computed == 3 + 3
    nxt = s.schedule().seqs[0]
    assert nxt.commit_index == 2 and nxt.start_pos == 6 and nxt.input_ids[0] == 9


def test_drafts_are_trimmed_to_what_max_tokens_still_allows():
    s = make()
    s.add(seq(0, 3, max_tokens=3, k=3))
    s.update(reply(s.schedule(), drafts={0: [4, 5, 6]}))
    assert s.schedule().seqs[0].drafts == [4]          # 1 generated, 3 allowed: 1 draft + 1 bonus


def test_admission_waits_for_a_free_mamba_slot():
    s = make(slots=1)
    s.add(seq(0, 3))
    s.add(seq(1, 3))
    plan = s.schedule()
    assert [x.seq_id for x in plan.seqs] == [0]
    assert s.seqs[1].status is SeqStatus.WAITING


def test_out_of_blocks_preempts_the_newest_idle_sequence_by_recompute():
    s = make(num_blocks=4, block_size=4, slots=4, budget=32)
    s.add(seq(0, 6, max_tokens=10))
    s.update(reply(s.schedule()))                      # 0 holds 2 blocks (6 prompt + 1 new token + margin)
    s.add(seq(1, 5, max_tokens=10))
    s.update(reply(s.schedule()))                      # 1 admitted with the remaining blocks
    for _ in range(6):                                 # decoding grows 0 until 1 must give way
        plan = s.schedule()
        s.update(reply(plan))
    assert s.num_preemptions >= 1
    victim = s.seqs[1]
    assert victim.status is SeqStatus.WAITING and victim.num_computed == 0 and victim.block_table == []


def test_finishing_frees_blocks_and_slots_and_reports_the_reason():
    s = make()
    s.add(seq(0, 3, max_tokens=2))
    s.update(reply(s.schedule()))
    outs = s.update(reply(s.schedule()))
    assert outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 2
    assert s.blocks.all_free() and s.released == [0]


def test_eos_stops_unless_ignored_and_respects_min_tokens():
    s = make()
    s.add(seq(0, 3, max_tokens=10, min_tokens=2))
    s.update(reply(s.schedule(), tokens_per_seq={0: [2]}))      # eos before min_tokens: keep going
    assert not s.seqs[0].finished
    outs = s.update(reply(s.schedule(), tokens_per_seq={0: [2]}))
    assert outs[-1].finish_reason == "stop"


def test_abort_of_an_in_flight_sequence_frees_it_when_its_pass_returns():
    s = make()
    s.add(seq(0, 3))
    plan = s.schedule()
    assert s.abort(0) is None                          # in flight: not yet
    assert not s.blocks.all_free()
    outs = s.update(reply(plan))
    assert outs[-1].finish_reason == "abort" and s.blocks.all_free()
    assert s.schedule() is None


def test_released_sequences_ride_in_the_next_plan():
    s = make()
    s.add(seq(0, 3, max_tokens=1))
    s.update(reply(s.schedule()))
    s.add(seq(1, 3))
    assert s.schedule().released == [0]


def test_a_dead_pipeline_fails_admitted_sequences_and_keeps_waiting_ones_unless_told():
    s = make(slots=1)
    s.add(seq(0, 3))
    s.add(seq(1, 3))
    s.schedule()                                       # 0 admitted and in flight, 1 waits for the slot
    outs = s.fail_all("engine failure: boom")
    assert [(o.request_id, o.finish_reason, o.error) for o in outs] == [("r0", "error", "engine failure: boom")]
    assert [q.seq_id for q in s.waiting] == [1] and s.blocks.all_free()
    outs = s.fail_all("rebuild failed", include_waiting=True)
    assert [o.request_id for o in outs] == ["r1"] and not s.waiting


# ---- admission: what can never fit is refused at add() -------------------------------------------------
def test_a_request_that_can_never_fit_the_cache_is_refused_naming_the_field_and_the_limit():
    s = make(num_blocks=4, block_size=4)                 # 16 tokens of KV
    with pytest.raises(ValueError, match=r"^max_tokens: .* needs 5 KV blocks of 4 tokens but the cache has 4 "
                                         r".*max_tokens <= 13 fits"):
        s.add(seq(0, 4, max_tokens=14))                  # its last pass holds 4 + 14 - 1 = 17 positions
    s.add(seq(1, 4, max_tokens=13))                      # 16: fits
    with pytest.raises(ValueError, match=r"^max_tokens: .*\+ 2 drafting positions needs 5 KV blocks"):
        s.add(seq(2, 4, max_tokens=12, k=2))             # MTP drafting writes 2 past the pass
    with pytest.raises(ValueError, match=r"^prompt: .* needs 5 KV blocks .* the prompt alone does not fit"):
        s.add(seq(3, 17, max_tokens=1))
    with pytest.raises(ValueError, match=r"^prompt: 64 tokens, but the context limit is 64"):
        s.add(seq(4, 64))
    with pytest.raises(ValueError, match=r"^prompt: must contain at least one token"):
        s.add(seq(5, 0))
    assert [q.seq_id for q in s.waiting] == [1] and list(s.seqs) == [1]


def test_the_context_limit_caps_what_a_request_can_need():
    s = make(num_blocks=4, block_size=4, max_len=16)
    s.add(seq(0, 4, max_tokens=1000, k=1))               # ends by 16 tokens: 15 positions + 1 drafting
    with pytest.raises(ValueError, match="^max_tokens:"):
        s.add(seq(1, 4, max_tokens=1000, k=2))


def _passes_to_the_end(s, drafts=()):
    """Passes until every sequence is done, one micro-batch at a time, every draft accepted (the
    most positions a pass can write)."""
    for n in range(1000):
        plan = s.schedule()
        if plan is None:
            return n
        s.update(StepResult(plan.step_id, 0, [
            SeqOutput(x.seq_id, x.drafts + [7] if x.sample else [], len(x.drafts) if x.sample else 0,
                      list(drafts)[:x.num_drafts] if x.sample else []) for x in plan.seqs]))
    raise AssertionError("no end")


def test_engine_kv_blocks_hold_max_num_seqs_full_length_sequences_with_their_drafts():
    from router.engine_config import EngineConfig
    cfg = EngineConfig(max_num_seqs=3, max_model_len=20, block_size=4, num_speculative_tokens=2)
    assert cfg.kv_blocks() == 3 * 6                      # ceil((20 - 1 + 2) / 4): kv_positions

    def passes(num_blocks, num_seqs=3):
        s = make(num_blocks=num_blocks, block_size=4, slots=3, max_seqs=3, budget=64, max_len=20)
        for i in range(num_seqs):
            s.add(seq(i, 4, max_tokens=100, k=2, ignore_eos=True))
        n = _passes_to_the_end(s, drafts=[5, 5])
        assert not s.seqs and s.blocks.all_free()
        return n

    alone = passes(cfg.kv_blocks(), num_seqs=1)
    assert passes(cfg.kv_blocks()) == alone              # all three at full length, in every pass
    assert passes(cfg.kv_blocks() - 1) > alone           # one block short: one of them must wait


# ---- preemption: only newer, idle sequences, and only when that makes room ------------------------------
def test_only_newer_idle_sequences_are_preempted_and_only_when_that_makes_room():
    s = make(num_blocks=8, block_size=1, budget=8)
    s.add(seq(0, 3, max_tokens=5))
    s.add(seq(1, 3, max_tokens=5))
    s.update(reply(s.schedule()))                        # 3 blocks each, 2 free
    old, new = s.seqs[0], s.seqs[1]
    assert not s._make_room(new, 3 + 4, may_preempt=True)    # only the older one could give room: no
    assert old in s.running and new in s.running
    assert not s._make_room(old, 3 + 6, may_preempt=True)    # the newer one is not enough: kept
    assert new in s.running and s.num_preemptions == 0
    assert s._make_room(old, 3 + 4, may_preempt=True) and new in s.waiting and s.num_preemptions == 1


def test_a_sequence_in_flight_is_never_preempted():
    s = make(num_blocks=6, block_size=1, budget=8)
    s.add(seq(0, 3, max_tokens=4))
    s.add(seq(1, 3, max_tokens=4))
    a = s.schedule(max_seqs=1)                           # 0: 3 blocks
    b = s.schedule(max_seqs=1, microbatch=1)             # 1: the other 3
    s.update(reply(a))                                   # 0 needs a 4th block; 1 holds them, in flight
    assert s.schedule() is None and s.seqs[1].block_table == b.seqs[0].block_table
    s.update(reply(b))                                   # 1 is back: now it may give way
    assert [x.seq_id for x in s.schedule().seqs] == [0] and s.seqs[1] in s.waiting and s.num_preemptions == 1


# ---- failure isolation ----------------------------------------------------------------------------------
def test_a_failed_pass_of_one_sequence_ends_it_with_the_error():
    s = make()
    s.add(seq(0, 3))
    plan = s.schedule()
    outs = s.pass_failed(plan, "boom")
    assert [(o.request_id, o.finish_reason, o.error) for o in outs] == [("r0", "error", "boom")]
    assert s.blocks.all_free() and not s.seqs and s.schedule() is None


def test_a_failed_pass_of_several_retries_each_alone_and_a_repeat_fails_only_the_culprit():
    s = make()
    for i in range(3):
        s.add(seq(i, 3))
    plan = s.schedule()
    assert s.pass_failed(plan, "boom") == [] and s.blocks.all_free()
    assert [q.seq_id for q in s.waiting] == [0, 1, 2] and all(q.suspect and q.num_computed == 0 for q in s.waiting)
    a, b = s.schedule(microbatch=0), s.schedule(microbatch=1)
    assert [x.seq_id for x in a.seqs] == [0] and [x.seq_id for x in b.seqs] == [1]     # each alone
    s.update(reply(a))
    assert not s.seqs[0].suspect                         # its own pass succeeded
    outs = s.pass_failed(b, "boom again")                # 1 failed alone: it is the one
    assert [(o.request_id, o.finish_reason, o.error) for o in outs] == [("r1", "error", "boom again")]
    assert [x.seq_id for x in s.schedule().seqs] == [0]  # 2 is still a suspect: not with 0
    assert [x.seq_id for x in s.schedule().seqs] == [2]


def test_an_aborted_sequence_of_a_failed_pass_just_ends_as_aborted():
    s = make()
    s.add(seq(0, 3))
    s.add(seq(1, 3))
    plan = s.schedule()
    assert s.abort(0) is None
    outs = s.pass_failed(plan, "boom")
    assert [(o.request_id, o.finish_reason) for o in outs] == [("r0", "abort")]
    assert s.seqs[1].suspect and s.seqs[1] in s.waiting and s.pass_failed(plan, "boom") == []


def test_results_for_steps_or_sequences_not_in_flight_are_ignored():
    s = make()
    s.add(seq(0, 3))
    s.add(seq(1, 3))
    plan = s.schedule()
    late = reply(plan)
    assert s.update(StepResult(99, 0, late.outputs)) == []               # no such step
    s.pass_failed(plan, "boom")
    assert s.update(late) == []                                           # the failed pass's result after all
    assert all(q.num_computed == 0 and not q.output_ids for q in s.waiting)
    plan = s.schedule()                                                   # 0 alone (a suspect)
    extra = [SeqOutput(1, [7], 0, []), SeqOutput(42, [7], 0, [])]         # 1 is not in it, 42 is no one
    outs = s.update(StepResult(plan.step_id, 0, reply(plan).outputs + extra))
    assert [o.request_id for o in outs] == ["r0"] and s.seqs[1].num_computed == 0
    assert s.update(reply(plan)) == []                                    # the same result twice


def test_a_sequence_missing_from_its_result_is_retried_alone_then_failed():
    s = make()
    s.add(seq(0, 3))
    s.add(seq(1, 3))
    plan = s.schedule()
    outs = s.update(StepResult(plan.step_id, 0, [o for o in reply(plan).outputs if o.seq_id == 0]))
    assert [o.request_id for o in outs] == ["r0"] and s.seqs[1].suspect and s.seqs[1] in s.waiting
    s.update(reply(s.schedule()))                       # 0 decodes on
    assert [x.seq_id for x in s.schedule().seqs] == [0]
    alone = s.schedule(microbatch=1)
    assert [x.seq_id for x in alone.seqs] == [1]
    outs = s.update(StepResult(alone.step_id, 0, [SeqOutput(1, [], 0, [])]))   # malformed: no token
    assert [(o.request_id, o.finish_reason) for o in outs] == [("r1", "error")]


def test_fail_ends_a_request_now_or_when_its_pass_returns():
    s = make(slots=1)
    s.add(seq(0, 3))
    s.add(seq(1, 3))
    plan = s.schedule()                                  # 0 in flight, 1 waits for the slot
    assert [q.seq_id for q in s.idle()] == [1]
    assert s.fail(0, "x") == []
    assert [(o.request_id, o.error) for o in s.fail_idle("y")] == [("r1", "y")]
    assert [(o.request_id, o.finish_reason, o.error) for o in s.update(reply(plan))] == [("r0", "error", "x")]
    assert not s.seqs and s.blocks.all_free() and not s.has_work


def test_stuck_names_the_plans_in_flight_the_engine_no_longer_awaits():
    s = make()
    s.add(seq(0, 3))
    s.add(seq(1, 3))
    a, b = s.schedule(max_seqs=1), s.schedule(max_seqs=1, microbatch=1)
    assert s.stuck({a.step_id, b.step_id}) == [] and s.stuck({a.step_id}) == [b]
    assert [o.finish_reason for o in s.pass_failed(b, "lost")] == ["error"]
    assert s.stuck({a.step_id}) == []
