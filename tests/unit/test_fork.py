"""n > 1 in the scheduler (router/fork.py): one prefill, then n choices with shared and copied caches."""
from __future__ import annotations

import pytest

from cluster.contracts import SeqOutput, StepResult
from model_shards.sampling_params import SamplingParams
from router.block_manager import BlockManager
from router.scheduler import Scheduler, SchedulerConfig
from router.sequence import Sequence, SeqStatus, choice_seed


def make(num_blocks=64, block_size=4, slots=4, budget=16, max_len=64, max_seqs=4):
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=max_len, eos_token_id=2)
    return Scheduler(cfg, BlockManager(num_blocks, block_size, slots))


def parent(n, n_prompt, max_tokens=4, k=0, seq_id=0, **kw):
    """Seq ids: the parent `seq_id`, its choices seq_id + 1 .. seq_id + n."""
    return Sequence(seq_id, f"r{seq_id}", list(range(10, 10 + n_prompt)), SamplingParams(max_tokens=max_tokens, **kw),
                    seed=1234, num_speculative=k, fork_ids=tuple(range(seq_id + 1, seq_id + 1 + n)))


def reply(plan, token=7):
    return StepResult(plan.step_id, plan.microbatch,
                      [SeqOutput(s.seq_id, [token] if s.sample else [], 0, []) for s in plan.seqs])


def prefilled(s, n=3, n_prompt=10, **kw):
    """A scheduler whose n > 1 request has its prompt (but the last token) computed."""
    s.add(parent(n, n_prompt, **kw))
    while not s.seqs[0].num_uncomputed == 0:
        s.update(reply(s.schedule()))
    return s.seqs[0]


def test_the_parent_computes_all_but_the_last_prompt_token_and_never_samples():
    s = make(budget=4)
    s.add(parent(3, 10))
    plans = []
    while 0 in s.seqs and s.seqs[0].num_uncomputed:
        plans.append(s.schedule())
        assert s.update(reply(plans[-1])) == []          # nothing streamed: it samples nothing
    assert [(p.seqs[0].start_pos, p.seqs[0].num_tokens) for p in plans] == [(0, 4), (4, 4), (8, 1)]
    assert not any(p.seqs[0].sample for p in plans)
    assert plans[-1].seqs[0].next_token == 19             # its MTP pair: the prompt's last token


def test_the_fork_plans_all_choices_at_once_from_the_prompts_last_token():
    s = make(block_size=4)
    p = prefilled(s, n=3, n_prompt=10)                   # 9 positions: blocks [a, b] full, c holds 1
    table, slot = list(p.block_table), p.mamba_slot
    plan = s.schedule()
    assert [x.seq_id for x in plan.seqs] == [1, 2, 3] and plan.released == [0]
    assert all(x.start_pos == 9 and x.input_ids == [19] and x.sample and x.fork_of == 0 for x in plan.seqs)
    first, *others = plan.seqs
    # choice 0 continues in the parent's slot and blocks; the others copy the slot and the partial block
    assert first.mamba_slot == slot and first.block_table[:3] == table and first.fork_slot == -1
    assert not first.copy_blocks
    for x in others:
        assert x.fork_slot == slot and x.mamba_slot != slot
        assert x.block_table[:2] == table[:2]             # the full prompt blocks, shared
        assert x.copy_blocks == [[table[2], x.block_table[2]]] and x.block_table[2] != table[2]
    assert len({x.mamba_slot for x in plan.seqs}) == 3
    assert [x.seed for x in plan.seqs] == [choice_seed(1234, i) for i in range(3)]
    assert s.blocks.refs[table[0]] == s.blocks.refs[table[1]] == 3 and s.blocks.refs[table[2]] == 1
    assert 0 not in s.seqs


def test_prompt_blocks_are_freed_when_the_last_choice_lets_go():
    s = make(block_size=4)
    p = prefilled(s, n=2, n_prompt=9, max_tokens=2)       # 8 positions: two full blocks, no partial one
    shared = list(p.block_table)
    plan = s.schedule()
    assert all(not x.copy_blocks for x in plan.seqs)      # nothing partly filled to copy
    outs = s.update(reply(plan))
    assert [o.index for o in outs] == [0, 1] and not any(o.finished for o in outs)
    s.abort(1)
    assert all(s.blocks.refs[b] == 1 for b in shared) and not set(shared) & set(s.blocks.free_blocks)
    outs = s.update(reply(s.schedule()))                  # choice 1 ends at max_tokens: the request too
    assert outs[-1].finish_reason == "length" and outs[-1].finished and outs[-1].index == 1
    assert s.blocks.all_free() and all(r == 0 for r in s.blocks.refs)


def test_only_the_last_choice_to_end_finishes_the_request():
    s = make()
    prefilled(s, n=3, n_prompt=5, max_tokens=1)
    outs = s.update(reply(s.schedule()))
    assert [(o.index, o.finish_reason, o.open_choices, o.finished) for o in outs] == \
        [(0, "length", 2, False), (1, "length", 1, False), (2, "length", 0, True)]


def test_a_one_token_prompt_starts_n_independent_choices():
    s = make()
    s.add(parent(3, 1))
    plan = s.schedule()
    assert [(x.seq_id, x.start_pos, x.fork_of) for x in plan.seqs] == [(1, 0, -1), (2, 0, -1), (3, 0, -1)]
    assert [s.seqs[i].index for i in (1, 2, 3)] == [0, 1, 2]


def test_a_parent_ended_before_its_fork_ends_every_choice():
    s = make()
    s.add(parent(3, 10, seq_id=0))
    out = s.abort(0)
    assert out.finish_reason == "abort" and out.finished and s.blocks.all_free()


def test_the_fork_waits_for_slots_and_preempts_only_newer_idle_sequences():
    s = make(slots=3, max_seqs=3)
    s.add(parent(3, 6))
    s.add(Sequence(9, "late", [5, 6, 7], SamplingParams(max_tokens=8), 0, arrival_time=1e18))
    plan = s.schedule()
    assert [x.seq_id for x in plan.seqs] == [0, 9]       # the prefill, and the newer request in a slot
    s.update(reply(plan))                                 # the fork needs two more slots: one is free
    plan = s.schedule()
    assert [x.seq_id for x in plan.seqs] == [1, 2, 3] and s.seqs[9].status is SeqStatus.WAITING
    assert s.num_preemptions == 1


def test_n_larger_than_the_engine_can_run_at_once_is_refused_naming_n():
    with pytest.raises(ValueError, match=r"^n: 5 choices, but this engine runs at most 4 sequences"):
        make(max_seqs=4).add(parent(5, 4))
    with pytest.raises(ValueError, match=r"^n: 3 choices of a prompt of 30 tokens need 10 KV blocks of 4 "
                                         r"tokens at once, but the cache has 8"):
        make(num_blocks=8, block_size=4, max_len=64).add(parent(3, 30, max_tokens=1))   # alone: 8 blocks


def test_a_preempted_choice_recomputes_its_prompt_and_outputs_alone():
    s = make(block_size=4)
    prefilled(s, n=2, n_prompt=6, max_tokens=8)
    s.update(reply(s.schedule()))
    kid = s.seqs[2]
    s._requeue(kid)                                       # what preemption does
    plan = s.schedule()
    step = next(x for x in plan.seqs if x.seq_id == 2)
    assert step.start_pos == 0 and step.input_ids == kid.prompt_ids + kid.output_ids and step.fork_of == -1
    assert not step.copy_blocks and step.fork_slot == -1


def test_the_fork_instructions_cross_processes_in_the_plan():
    from cluster.contracts import decode_plan, encode

    s = make(block_size=4)
    prefilled(s, n=2, n_prompt=10)
    plan = s.schedule()
    back = decode_plan(encode(plan))
    assert [(x.fork_of, x.fork_slot, x.copy_blocks) for x in back.seqs] == \
        [(x.fork_of, x.fork_slot, x.copy_blocks) for x in plan.seqs]
    assert back.seqs[1].copy_blocks and back.released == [0]
