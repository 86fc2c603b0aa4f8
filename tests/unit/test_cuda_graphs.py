"""CUDA graphs for decode passes (model_shards/cuda_graphs.py): buckets, padding onto a scratch slot, which
passes and blocks are captured, falling back to eager when capture fails, and the --enforce-eager switch.

On a CPU the runner is driven with an eager stand-in for capture (record once, rerun on replay, output
kept in one tensor), which exercises everything but the CUDA graph itself; the last test replays real
graphs against eager passes and needs a GPU."""
from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from cluster.contracts import SeqStep, StepPlan
from cluster.worker import StageWorker
from model_shards import cuda_graphs
from model_shards.batch import BatchLayout, SeqSlice
from model_shards.cuda_graphs import (DecodeGraphs, bucket_for, bucket_sizes, decode_rows, pad_slots, row_cap,
                                      segments)
from model_shards.model import HybridModel
from model_shards.presets import PRESETS
from model_shards.sampling_params import SamplingParams
from router.engine_config import EngineConfig
from router.serve_options import serve_args_from_dict, serve_config_from_args

SLOTS = 5                       # the engine's Mamba slots; the graph worker has one more (scratch: 5)
SEQ_SLOTS = [2, 0, 3]           # slots of the test's sequences, out of order; slot 1 (and 4) idle
PARAMS = SamplingParams(max_tokens=64, ignore_eos=True).to_dict()


def record_eagerly(fn):
    """Capture's stand-in: run once (the warm-up), then every replay reruns fn into the same output."""
    out = fn()
    return (lambda: out.copy_(fn())), out


# ---- pure parts --------------------------------------------------------------------------------------------

def test_buckets_are_powers_of_two_up_to_the_slot_count_and_capped():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(5) == [1, 2, 4, 8]
    assert bucket_sizes(16) == [1, 2, 4, 8, 16]
    assert bucket_sizes(10 ** 6)[-1] == cuda_graphs.MAX_BUCKET
    assert bucket_sizes(64, cap=20) == [1, 2, 4, 8, 16] and bucket_sizes(64, cap=1) == [1]


def test_large_mamba_states_cap_the_buckets_where_gathering_them_would_cost_more_than_launches():
    assert row_cap(PRESETS["nemotron-3-super-120b-a12b"], True) == 16           # 4 MiB per row and layer
    assert row_cap(PRESETS["nemotron-3-nano-30b-a3b"], True) == 32
    assert row_cap(PRESETS["tiny"], True) == cuda_graphs.MAX_BUCKET
    assert row_cap(PRESETS["nemotron-3-super-120b-a12b"], False) == cuda_graphs.MAX_BUCKET   # a stage without Mamba
    assert [bucket_for(n, [1, 2, 4, 8]) for n in (0, 1, 2, 3, 5, 8, 9)] == [None, 1, 2, 4, 8, 8, None]


def test_padding_points_the_extra_rows_at_the_scratch_slot():
    assert pad_slots([5, 2, 7], 4, scratch=9) == [5, 2, 7, 9]
    assert pad_slots([5, 2], 2, scratch=9) == [5, 2]
    with pytest.raises(ValueError):
        pad_slots([1, 2, 3], 2, scratch=9)


def test_runs_of_mamba_and_mlp_blocks_are_captured_attention_and_moe_stay_eager():
    assert segments(list("ME*EM-")) == [(True, [0]), (False, [1]), (False, [2]), (False, [3]), (True, [4, 5])]
    assert segments(list("MM-*")) == [(True, [0, 1, 2]), (False, [3])]
    assert segments(list("E*")) == [(False, [0]), (False, [1])]


def test_only_plain_decode_passes_qualify():
    t = torch.arange(2)

    def layout(*seqs):
        return BatchLayout([SeqSlice(*s, t) for s in seqs])
    assert decode_rows(layout((0, 1, 7, 0), (1, 1, 3, 1)))
    assert not decode_rows(layout())
    assert not decode_rows(layout((0, 1, 7, 0), (1, 4, 3, 1)))                  # a prompt chunk or verification
    assert not decode_rows(layout((0, 1, 0, 0)))                                 # a one-token prompt (state reset)
    assert not decode_rows(BatchLayout([SeqSlice(0, 1, 7, 0, t, keep_states=True)]))


# ---- the runner on a CPU, through the worker ---------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HybridModel(PRESETS["tiny"]).init_random(0).eval()


def _workers(model, capture=record_eagerly):
    eager = StageWorker(model, num_blocks=16, block_size=8, num_slots=SLOTS, max_verify_positions=4)
    graph = StageWorker(model, num_blocks=16, block_size=8, num_slots=SLOTS + 1, max_verify_positions=4)
    graph.graphs = DecodeGraphs(model, graph.cache, scratch_slot=SLOTS, max_rows=SLOTS, capture=capture)
    return eager, graph


def _plan(step, ids, pos, seqs=range(3)):
    return StepPlan(step, 0, [SeqStep(i, list(ids[i]), pos[i], SEQ_SLOTS[i], [4 * i, 4 * i + 1, 4 * i + 2],
                                      params=PARAMS, prompt_len=5) for i in seqs])


def _generate(worker, steps=5):
    """Three prompts, then `steps` decode passes of all three (bucket 4: one padding row), then of two."""
    prompts = [[3, 9, 4, 1, 7], [8, 8, 2], [5, 1, 6, 6]]
    pos = [len(p) for p in prompts]
    out = worker.execute(_plan(0, prompts, [0, 0, 0]))
    tokens = [list(o.new_tokens) for o in out.outputs]
    for step in range(steps):
        live = range(3) if step < steps - 2 else range(2)
        out = worker.execute(_plan(1 + step, [t[-1:] for t in tokens], pos, live))
        for i, o in zip(live, out.outputs):
            tokens[i] += o.new_tokens
            pos[i] += 1
    return tokens


def _states(worker, slots):
    m = worker.cache.mamba_states
    return m.conv[:, slots].clone(), m.ssm[:, slots].clone()


def test_replayed_decode_passes_give_the_eager_tokens_and_states_and_touch_only_the_scratch_slot(model):
    eager, graph = _workers(model)
    idle = graph.cache.mamba_states.ssm[:, [1, 4]]
    idle.copy_(torch.randn_like(idle))                   # sentinels in the slots no sequence holds
    sentinel = _states(graph, [1, 4])
    assert _generate(graph) == _generate(eager)
    assert graph.graphs.captured == [2, 4] and not graph.graphs.failed
    for got, want in zip(_states(graph, SEQ_SLOTS), _states(eager, SEQ_SLOTS)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)   # GEMMs of 4 rows, not 3
    for got, want in zip(_states(graph, [1, 4]), sentinel):
        assert torch.equal(got, want)                    # padding rows never reach a slot but the scratch one
    assert graph.cache.mamba_states.ssm[:, SLOTS].abs().sum() > 0   # ... which they did write


def test_the_runner_replays_the_captured_segments_and_runs_the_others_eagerly(model, monkeypatch):
    _, graph = _workers(model)
    ran = []
    for i, block in graph.model.backbone.layers.items():           # record (layer, ran on the real layout)
        monkeypatch.setattr(block, "forward", lambda h, b, c, i=int(i), f=block.forward:
                            ran.append((i, b.slots is None)) or f(h, b, c))
    _generate(graph, steps=1)
    kinds = "".join(b.kind for b in graph.model.backbone.layers.values())
    decode = ran[len(kinds):]                            # after the prompt pass: capture (warm-up), then replay
    assert {i for i, eager in decode if not eager} == {i for i, k in enumerate(kinds) if k in "M-"} == {0, 4, 5}
    assert {i for i, eager in decode if eager} == {1, 2, 3}          # MoE and attention: real rows, real layout


def test_a_failed_capture_warns_once_and_that_bucket_runs_eagerly(model, caplog):
    calls = []

    def broken(fn):
        calls.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")
    eager, graph = _workers(model, broken)
    with caplog.at_level(logging.DEBUG, logger="hybridserve.cuda_graphs"):
        assert _generate(graph) == _generate(eager)
    assert graph.graphs.failed == {2, 4} and graph.graphs.captured == [] and len(calls) == 2   # no retries
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "decode passes of 4 rows failed" in warnings[0].getMessage()


def test_prompts_and_verification_passes_are_not_replayed(model):
    _, graph = _workers(model, lambda fn: pytest.fail("captured a pass that is not a plain decode pass"))
    graph.execute(_plan(0, [[3, 9, 4], [8, 8], [5]], [0, 0, 0]))
    verify = StepPlan(1, 0, [SeqStep(0, [4, 11, 12], 3, SEQ_SLOTS[0], [0, 1], drafts=[11, 12], params=PARAMS)])
    graph.execute(verify)


# ---- the switch -------------------------------------------------------------------------------------------

def test_enforce_eager_reaches_the_engine_config_from_the_cli_and_from_a_config_file():
    assert serve_config_from_args(serve_args_from_dict({})).engine.cuda_graphs is True is EngineConfig().cuda_graphs
    assert serve_config_from_args(serve_args_from_dict({"enforce_eager": True})).engine.cuda_graphs is False
    assert serve_config_from_args(serve_args_from_dict({"enforce-eager": False})).engine.cuda_graphs is True


def test_on_a_cpu_the_worker_has_no_runner_and_no_extra_slot(model):
    for flag in (True, False):
        w = StageWorker(model, num_blocks=4, block_size=8, num_slots=3, max_verify_positions=2, cuda_graphs=flag)
        assert w.graphs is None and w.cache.mamba_states.ssm.shape[1] == 3



def test_the_switch_reaches_the_stage_worker_through_the_executors(preset_cache, monkeypatch):
    from cluster import local_executor, process_executor
    from router.engine import make_executor
    from router.engine_config import resolve_checkpoint

    seen = []

    class Spy(StageWorker):
        def __init__(self, model, **kw):
            seen.append(kw["cuda_graphs"])
            super().__init__(model, **kw)
    monkeypatch.setattr(local_executor, "StageWorker", Spy)
    monkeypatch.setattr(process_executor.ProcessExecutor, "_start", lambda self: None)   # no child process
    folder = resolve_checkpoint("tiny")
    for flag in (False, True):
        cfg = EngineConfig(model="tiny", cuda_graphs=flag, device="cpu", num_speculative_tokens=0, model_process=False)
        make_executor(cfg, folder, None, num_blocks=4, num_slots=2).shutdown()
        child = make_executor(dataclasses.replace(cfg, model_process=True), folder, None, num_blocks=4, num_slots=2)
        assert child.worker_kw["cuda_graphs"] is flag          # what the child's StageWorker is built with
    assert seen == [False, True]

# ---- a GPU ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="replays real CUDA graphs: needs a GPU")
def test_cuda_graph_replay_gives_the_eager_tokens_on_the_tiny_preset():
    torch.manual_seed(0)
    m = HybridModel(PRESETS["tiny"]).init_random(0).eval().cuda()

    def worker(graphs):
        return StageWorker(m, num_blocks=16, block_size=8, num_slots=SLOTS, max_verify_positions=4, device="cuda",
                           cuda_graphs=graphs)
    eager, graph = worker(False), worker(True)
    assert eager.graphs is None and graph.graphs is not None
    assert _generate(graph, steps=8) == _generate(eager, steps=8)
    assert graph.graphs.captured == [2, 4] and not graph.graphs.failed
    for got, want in zip(_states(graph, SEQ_SLOTS), _states(eager, SEQ_SLOTS)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
