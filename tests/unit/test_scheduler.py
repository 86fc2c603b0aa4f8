"""The scheduler is plain Python: these specify its batching rules without a model."""
from __future__ import annotations

import sys

from model_shards.sampling_params import SamplingParams
from router.block_manager import BlockManager
from router.contracts import SeqOutput, StepResult
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
    s.add(seq(0, 6, max_tokens=30))
    s.update(reply(s.schedule()))                      # 0 holds 2 blocks (6 prompt + 1 new token + margin)
    s.add(seq(1, 5, max_tokens=30))
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
