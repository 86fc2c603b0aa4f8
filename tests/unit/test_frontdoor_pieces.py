"""Small pieces of the front door: metrics rendering, SSE framing, generated gRPC code, CLI options."""
from __future__ import annotations

import pytest

from router import responses as R
from router.metrics import Metrics
from router.outputs import EngineStats


def test_metrics_render_request_and_engine_series():
    m = Metrics("m")
    m.observe_first_token(0.05)
    m.observe_gap(0.01)
    m.observe_finished(0.5, prompt_tokens=10, output_tokens=4, reason="stop")
    m.observe_rejected(429)
    m.set_engine_stats({"r1": EngineStats(waiting=2, running=3, kv_blocks_total=100, kv_blocks_used=25,
                                          mamba_slots_total=8, mamba_slots_used=3, steps=7,
                                          drafted_per_position=[10, 8], accepted_per_position=[6, 2])})
    text = m.render().decode()
    for line in ['hybridserve:time_to_first_token_seconds_count{model_name="m"} 1.0',
                 'hybridserve:inter_token_latency_seconds_count{model_name="m"} 1.0',
                 'hybridserve:e2e_request_latency_seconds_count{model_name="m"} 1.0',
                 'hybridserve:request_success_total{finished_reason="stop",model_name="m"} 1.0',
                 'hybridserve:request_rejected_total{model_name="m",status="429"} 1.0',
                 'hybridserve:num_requests_waiting{model_name="m",replica="r1"} 2.0',
                 'hybridserve:num_requests_running{model_name="m",replica="r1"} 3.0',
                 'hybridserve:kv_cache_usage_perc{model_name="m",replica="r1"} 0.25',
                 'hybridserve:mamba_slots_used{model_name="m",replica="r1"} 3.0',
                 'hybridserve:spec_decode_num_draft_tokens_per_pos_total{model_name="m",position="1",'
                 'replica="r1"} 8.0',
                 'hybridserve:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="0",'
                 'replica="r1"} 6.0']:
        assert line in text, line


def test_sse_framing():
    assert R.sse({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    assert R.SSE_DONE == b"data: [DONE]\n\n"
    chunk = R.chat_chunk("id", 1, "m", {"content": "x"}, with_usage_field=True)
    assert chunk["usage"] is None and chunk["choices"][0]["delta"] == {"content": "x"}
    assert "usage" not in R.chat_chunk("id", 1, "m", {"content": "x"})


def test_usage_reports_mtp_drafts_as_prediction_tokens_only_when_some_were_verified():
    assert R.usage(5, 7) == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    assert R.usage(5, 7, (4, 2))["completion_tokens_details"] == {"accepted_prediction_tokens": 4,
                                                                   "rejected_prediction_tokens": 2}
    assert R.usage_chunk("id", 1, "m", "text_completion", 5, 7, (0, 3))["usage"]["completion_tokens_details"] == \
        {"accepted_prediction_tokens": 0, "rejected_prediction_tokens": 3}


def test_generated_grpc_code_matches_proto(tmp_path):
    from router.proto.generate import ROOT, generate

    generate(tmp_path)
    for name in ("hybridserve_pb2.py", "hybridserve_pb2_grpc.py", "hybridserve_pb2.pyi"):
        fresh = (tmp_path / "router/proto" / name).read_text()
        committed = (ROOT / "router/proto" / name).read_text()
        assert fresh == committed, f"router/proto/{name} is stale: run `python -m router.proto.generate`"


def test_cli_defaults_and_vllm_names():
    from router.cli import build_parser, serve_config_from_args

    args = build_parser().parse_args(["serve"])
    cfg = serve_config_from_args(args)
    assert (cfg.engine.model, cfg.port, cfg.grpc_port, cfg.min_replicas, cfg.max_replicas) == \
        ("default", 8000, 50051, 1, 1)
    assert (cfg.engine.num_speculative_tokens, cfg.engine.speculative_policy) == ("auto", "adaptive")   # MTP on
    e = serve_config_from_args(build_parser().parse_args(
        ["serve", "--num-speculative-tokens", "0", "--speculative-policy", "fixed"])).engine
    assert (e.num_speculative_tokens, e.speculative_policy) == (0, "fixed")                            # 0: off
    for bad in (["--num-speculative-tokens", "-1"], ["--num-speculative-tokens", "x"], ["--speculative-policy", "k"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", *bad])
    args = build_parser().parse_args(
        ["serve", "--model", "tiny", "--pipeline-parallel-size", "2", "--expert-parallel-size", "2",
         "--num-speculative-tokens", "1", "--draft-dtype", "float32", "--min-replicas", "1", "--max-replicas", "3", "--host", "0.0.0.0",
         "--port", "9000", "--grpc-port", "0", "--api-key", "k", "--served-model-name", "x", "--max-model-len", "512",
         "--max-num-seqs", "4", "--max-queued-requests", "2", "--autoscaling-config", '{"downscale_delay_s": 2}'])
    cfg = serve_config_from_args(args)
    e = cfg.engine
    assert (e.pipeline_parallel_size, e.expert_parallel_size, e.use_ray, e.num_speculative_tokens) == (2, 2, True, 1)
    assert (e.max_model_len, e.max_num_seqs, e.max_queued_requests, e.draft_dtype) == (512, 4, 2, "float32")
    assert (cfg.api_key, cfg.served_model_name, cfg.grpc_port, cfg.host, cfg.port) == ("k", "x", 0, "0.0.0.0", 9000)
    auto = cfg.autoscaling_config()
    assert auto["max_replicas"] == 3 and auto["downscale_delay_s"] == 2 and auto["target_ongoing_requests"] == 4


def test_an_unknown_draft_dtype_is_refused_by_name():
    from router.engine_config import EngineConfig

    with pytest.raises(ValueError, match=r"draft_dtype: must be one of auto, model, float32, float16, bfloat16"):
        EngineConfig(draft_dtype="int8").validate()


def test_cli_rejects_bad_replica_bounds():
    from router.cli import main

    assert main(["serve", "--min-replicas", "3", "--max-replicas", "2"]) == 2
