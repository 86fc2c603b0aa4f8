"""`hybridserve bench`'s definitions on recorded streams with known timings, goodput, the seeded arrival
generator, prompt files and the /metrics parsing (router/bench/; docs/SERVING.md states the definitions)."""
from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest

from router.bench import metrics as M
from router.bench import prompts as P
from router.bench.arrivals import arrival_offsets
from router.bench.recorder import StreamRecorder, parse_sse_block
from router.bench.report import format_table, write_json
from router.bench.server_metrics import parse_metrics, spec_decode_figures
from router.bench.stream import Target, normalize_endpoint, payload


def completion_chunk(text, completion_tokens=None, prompt_tokens=7, finish=None):
    usage = None if completion_tokens is None else {"prompt_tokens": prompt_tokens,
                                                    "completion_tokens": completion_tokens}
    return {"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish}],
            "usage": usage}


def usage_chunk(completion_tokens, prompt_tokens=7):
    return {"choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}}


def replay(events, expected=None):
    """Feed (seconds after sending, event) pairs; the stream ends 1 ms after the last event."""
    rec = StreamRecorder(start=0.0, requested_output_tokens=expected)
    for t, e in events:
        rec.feed(t, e)
    return rec.finish(events[-1][0] + 0.001)


# A recorded hybridserve stream with MTP: usage in every chunk, one chunk carrying two tokens, a
# chunk whose text waited for a whole character (no new tokens) and the usage chunk and [DONE] after.
MTP_STREAM = [
    (0.100, completion_chunk("a", 1)),
    (0.150, completion_chunk("bc", 3)),       # two tokens, 50 ms after the first: 25 ms each
    (0.160, completion_chunk("", 3)),         # nothing new: not an output chunk
    (0.250, completion_chunk("d", 4, finish="length")),   # one token, 100 ms after the last output
    (0.251, usage_chunk(4)),
    (0.252, "[DONE]"),
]


def test_mtp_stream_figures():
    r = replay(MTP_STREAM, expected=4)
    assert r.success and r.error == ""
    assert r.chunk_times == [0.100, 0.150, 0.250] and r.chunk_tokens == [1, 2, 1]
    assert r.output_tokens == 4 and r.prompt_tokens == 7
    assert M.ttft(r) == pytest.approx(0.100)
    assert r.latency == pytest.approx(0.250)          # the last output chunk, not the usage chunk or [DONE]
    assert M.tpot(r) == pytest.approx((0.250 - 0.100) / 3)
    assert M.itls(r) == pytest.approx([0.025, 0.025, 0.100])
    # tokens - 1 ITL values that add up to the decode time: their mean is the request's TPOT
    assert sum(M.itls(r)) == pytest.approx(r.latency - M.ttft(r))


def test_first_chunk_with_several_tokens_and_one_token_requests():
    r = replay([(0.2, completion_chunk("xyz", 3)), (0.3, completion_chunk("w", 4)), (0.31, "[DONE]")])
    assert M.itls(r) == pytest.approx([0.0, 0.0, 0.1])   # the first chunk's extra tokens came with the first
    one = replay([(0.05, completion_chunk("x", 1, finish="length")), (0.06, usage_chunk(1)), (0.07, "[DONE]")])
    assert one.output_tokens == 1 and M.tpot(one) is None and M.itls(one) == []
    lat = M.latencies([r, one])
    assert lat["tpot"] == pytest.approx([(0.3 - 0.2) / 3])   # the one-token request has no TPOT
    assert lat["ttft"] == pytest.approx([0.2, 0.05]) and len(lat["itl"]) == 3


def test_chat_role_chunk_is_not_the_first_token():
    def chat(delta, ct):
        return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}],
                "usage": {"prompt_tokens": 9, "completion_tokens": ct}}
    r = replay([(0.01, chat({"role": "assistant", "content": ""}, 0)), (0.08, chat({"content": "Hi"}, 1)),
                (0.12, chat({"content": " there"}, 2)), (0.13, "[DONE]")])
    assert M.ttft(r) == pytest.approx(0.08) and r.output_tokens == 2 and r.prompt_tokens == 9


def test_server_without_usage_per_chunk_counts_one_token_per_chunk():
    r = replay([(0.1, completion_chunk("a")), (0.2, completion_chunk("b")), (0.4, completion_chunk("c")),
                (0.41, usage_chunk(5)), (0.42, "[DONE]")])
    assert r.chunk_tokens == [1, 1, 1] and r.output_tokens == 5      # the total still comes from usage
    assert M.itls(r) == pytest.approx([0.1, 0.2]) and M.tpot(r) == pytest.approx(0.3 / 4)


def test_errors_fail_the_request():
    err = replay([(0.1, completion_chunk("a", 1)), (0.2, {"error": {"message": "boom", "type": "x"}}),
                  (0.3, "[DONE]")])
    assert not err.success and err.error == "boom"
    empty = replay([(0.1, usage_chunk(0)), (0.2, "[DONE]")])
    assert not empty.success and "no output" in empty.error


def test_sse_blocks():
    assert parse_sse_block('data: {"a": 1}') == {"a": 1}
    assert parse_sse_block("data: [DONE]") == "[DONE]"
    assert parse_sse_block(": keep-alive") is None


def _record(ttft, decode, tokens, ok=True, prompt=10):
    times = [ttft + decode * i / max(tokens - 1, 1) for i in range(tokens)]
    return M.RequestRecord(latency=times[-1], chunk_times=times, chunk_tokens=[1] * tokens, prompt_tokens=prompt,
                           output_tokens=tokens, success=ok, error="" if ok else "x")


def test_round_figures_and_percentiles():
    recs = [_record(0.1, 0.3, 4), _record(0.2, 0.3, 4), _record(0.3, 0.6, 4), _record(0.4, 0.0, 1),
            _record(0.5, 0.3, 4, ok=False)]
    f = M.round_figures(recs, duration_s=2.0, slos_ms={"ttft": 250, "tpot": 150})
    assert f["completed"] == 4 and f["failed"] == 1
    assert f["total_output_tokens"] == 13 and f["total_input_tokens"] == 40
    assert f["request_throughput"] == pytest.approx(2.0) and f["output_throughput"] == pytest.approx(6.5)
    assert f["total_token_throughput"] == pytest.approx(26.5)
    # TTFT 100, 200, 300, 400 ms: numpy's linear interpolation, as vLLM
    assert f["ttft_mean_ms"] == pytest.approx(250) and f["ttft_median_ms"] == pytest.approx(250)
    assert f["ttft_p90_ms"] == pytest.approx(370) and f["ttft_p99_ms"] == pytest.approx(397)
    assert f["tpot_mean_ms"] == pytest.approx((100 + 100 + 200) / 3)
    assert f["e2el_median_ms"] == pytest.approx(450)
    # goodput: ttft <= 250 ms and tpot <= 150 ms: the first two (the third's TPOT is 200 ms)
    assert f["request_goodput"] == pytest.approx(1.0)


def test_goodput_one_token_request_meets_tpot_and_parse():
    one = _record(0.1, 0.0, 1)
    assert M.meets_slos(one, {"tpot": 1.0}) and not M.meets_slos(one, {"ttft": 50})
    assert M.meets_slos(_record(0.1, 0.2, 3), {"e2el": 301.0}) and not M.meets_slos(_record(0.1, 0.2, 3), {"e2el": 299})
    assert M.parse_goodput(["ttft:200", "TPOT:50.5"]) == {"ttft": 200.0, "tpot": 50.5}
    for bad in (["itl:5"], ["ttft"], ["ttft:abc"], ["tpot:0"]):
        with pytest.raises(ValueError):
            M.parse_goodput(bad)


def test_rounds_combine_and_agree():
    c = M.combine_rounds([{"x": 3.0, "y": math.nan}, {"x": 1.0, "y": math.nan}, {"x": 2.0, "y": math.nan}])
    assert c["x"] == {"median": 2.0, "min": 1.0, "max": 3.0, "rounds": [3.0, 1.0, 2.0]}
    assert math.isnan(c["y"]["median"])
    assert M.agree({"min": 1, "max": 3}, {"min": 2.5, "max": 4})
    assert not M.agree({"min": 1, "max": 2}, {"min": 3, "max": 4})


def test_poisson_and_gamma_arrivals():
    assert arrival_offsets(5, math.inf) == [0.0] * 5 and arrival_offsets(0, 2.0) == []
    a = arrival_offsets(20000, request_rate=4.0, burstiness=1.0, seed=1)
    assert a == arrival_offsets(20000, 4.0, 1.0, seed=1) and a != arrival_offsets(20000, 4.0, 1.0, seed=2)
    assert a[0] == 0.0 and all(y >= x for x, y in zip(a, a[1:]))
    for burstiness in (0.25, 1.0, 4.0):
        t = arrival_offsets(20000, 4.0, burstiness, seed=3)
        gaps = [y - x for x, y in zip(t, t[1:])]
        mean = sum(gaps) / len(gaps)
        cv = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps)) / mean
        assert mean == pytest.approx(0.25, rel=0.05)                  # 1 / rate, whatever the burstiness
        assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.06)  # gamma(shape=b): CV = 1/sqrt(b)
    for bad in ((0.0, 1.0), (-1.0, 1.0), (1.0, 0.0)):
        with pytest.raises(ValueError):
            arrival_offsets(3, *bad)


def test_prompt_file_lines_and_jsonl(tmp_path: Path):
    f = tmp_path / "p.txt"
    f.write_text('first prompt\n\n{"prompt": "from json"}\n"a json string"\n{not json} kept as text\n')
    assert P.read_prompt_file(f) == ["first prompt", "from json", "a json string", "{not json} kept as text"]
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt key"}\n')
    with pytest.raises(ValueError):
        P.read_prompt_file(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError):
        P.read_prompt_file(tmp_path / "empty.txt")


def test_chat_dataset_json_and_jsonl(tmp_path: Path):
    convs = [{"id": "a", "conversations": [{"from": "system", "value": "be nice"}, {"from": "human", "value": "Q1"},
                                           {"from": "gpt", "value": "A1"}, {"from": "human", "value": "Q2"}]},
             {"id": "b", "conversations": [{"from": "gpt", "value": "only a reply"}]},
             {"messages": [{"role": "user", "content": "Q3"}, {"role": "assistant", "content": "A3"}]}]
    (tmp_path / "d.json").write_text(json.dumps(convs))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(c) for c in convs) + "\n")
    assert P.read_chat_dataset(tmp_path / "d.json") == ["Q1", "Q3"]
    assert P.read_chat_dataset(tmp_path / "d.jsonl") == ["Q1", "Q3"]
    ps = P.cycle_to(["Q1", "Q3"], 5, output_len=9, seed=0)
    assert len(ps) == 5 and {p.text for p in ps} == {"Q1", "Q3"} and all(p.output_len == 9 for p in ps)


def test_random_prompts_exact_with_a_tokenizer_and_sized_by_a_fit():
    from router.tokenizer import ByteTokenizer, load_tokenizer

    tokenizers = [ByteTokenizer()]
    mini = Path(__file__).resolve().parents[2] / "checkpoints" / "hybrid-mini"
    if (mini / "tokenizer.json").exists():
        tokenizers.append(load_tokenizer(mini))
    for tok in tokenizers:
        ps = P.random_prompts(6, 50, 8, seed=4, tokenizer=tok)
        assert [len(tok.encode(p.text)) for p in ps] == [50] * 6 == [p.prompt_len for p in ps]
        assert len({p.text for p in ps}) == 6 and ps == P.random_prompts(6, 50, 8, seed=4, tokenizer=tok)
    fit = P.fit_tokens_per_word([(8, 2 + 8 * 3), (64, 2 + 64 * 3)])
    assert fit == pytest.approx((3.0, 2.0)) and P.words_for(302, fit) == 100
    assert all(len(p.text.split()) == 100 for p in P.random_prompts(3, 302, 8, seed=0, fit=fit))
    assert P.random_text(3, random.Random(0), P.python_words()).count(" ") == 2


def test_request_payloads():
    t = Target("http://h:1/v1/", "m")
    assert t.url == "http://h:1/v1/completions" and t.root == "http://h:1"
    body = payload(t, P.Prompt("hi", 16))
    assert body["prompt"] == "hi" and body["max_tokens"] == 16 and body["ignore_eos"] and body["stream"]
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    chat = payload(Target("http://h:1", "m", "chat", ignore_eos=False, continuous_usage=False), P.Prompt("hi", 4))
    assert chat["messages"] == [{"role": "user", "content": "hi"}] and "ignore_eos" not in chat
    assert chat["stream_options"] == {"include_usage": True}
    assert normalize_endpoint("/v1/chat/completions") == "chat" and normalize_endpoint("completions") == "completions"
    with pytest.raises(ValueError):
        normalize_endpoint("embeddings")


def test_mtp_acceptance_from_hybridserve_metrics():
    from router.metrics import Metrics
    from router.outputs import EngineStats

    m = Metrics("tiny")
    m.set_engine_stats({"r0": EngineStats(drafted_per_position=[10, 10], accepted_per_position=[6, 3]),
                        "r1": EngineStats(drafted_per_position=[0, 0], accepted_per_position=[0, 0])})
    before = parse_metrics(m.render().decode())
    m.set_engine_stats({"r0": EngineStats(drafted_per_position=[30, 30], accepted_per_position=[20, 9]),
                        "r1": EngineStats(drafted_per_position=[20, 20], accepted_per_position=[10, 5])})
    s = spec_decode_figures(before, parse_metrics(m.render().decode()))
    # drafted 40 + 40, accepted 24 + 11 over 40 verification rounds (drafted at position 0)
    assert s["draft_tokens"] == 80 and s["accepted_tokens"] == 35
    assert s["acceptance_rate"] == pytest.approx(35 / 80)
    assert s["acceptance_rate_per_position"] == pytest.approx([24 / 40, 11 / 40])
    assert s["mean_acceptance_length"] == pytest.approx(1 + 35 / 40)
    assert spec_decode_figures(before, before) is None and spec_decode_figures(None, before) is None


def test_mtp_acceptance_from_vllm_metrics():
    def text(drafts, draft_tokens, accepted, per_pos):
        lines = [f'vllm:spec_decode_num_drafts_total{{model_name="m"}} {drafts}',
                 f'vllm:spec_decode_num_draft_tokens_total{{model_name="m"}} {draft_tokens}',
                 f'vllm:spec_decode_num_accepted_tokens_total{{model_name="m"}} {accepted}']
        lines += [f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name="m",position="{i}"}} {v}'
                  for i, v in enumerate(per_pos)]
        return "\n".join(lines) + "\n"
    s = spec_decode_figures(parse_metrics(text(0, 0, 0, [0, 0])), parse_metrics(text(10, 20, 12, [8, 4])))
    assert s["acceptance_rate"] == pytest.approx(0.6) and s["mean_acceptance_length"] == pytest.approx(2.2)
    assert s["acceptance_rate_per_position"] == pytest.approx([0.8, 0.4])


def test_table_and_json(tmp_path: Path):
    recs = [_record(0.1, 0.3, 4), _record(0.2, 0.3, 4)]
    rounds = [M.round_figures(recs, 1.0, {"ttft": 150}), M.round_figures(recs, 2.0, {"ttft": 150})]
    result = {"model": "m", "endpoint": "http://h/v1/completions", "rounds": 2, "completed": 4, "failed": 0,
              "first_error": None, "total_input_tokens": 40, "total_output_tokens": 16,
              "goodput_slos_ms": {"ttft": 150.0}, "figures": M.combine_rounds(rounds),
              "spec_decode": {"acceptance_rate": 0.5, "mean_acceptance_length": 1.8,
                              "acceptance_rate_per_position": [0.6, None]}, "requests": []}
    table = format_table(result)
    assert re.search(r"^Request throughput \(req/s\): +1\.50  \[1\.00, 2\.00\]$", table, re.M)
    assert "Mean TTFT (ms):" in table and "P99 E2EL (ms):" in table and "Request goodput" in table
    assert "Acceptance rate, position 1 (%):" in table and "Mean acceptance length" in table
    write_json(result, tmp_path / "r.json")
    back = json.loads((tmp_path / "r.json").read_text())
    assert back["figures"]["request_throughput"]["median"] == 1.5
    assert back["figures"].get("tpot_p99_ms", {}).get("median") is not None


def test_sse_split_across_network_reads():
    """Events cut at any byte, inside a UTF-8 character too, still parse (stream.send buffers them)."""
    import asyncio

    from router.bench.stream import send

    body = ("data: " + json.dumps(completion_chunk("h\u00e9", 2), ensure_ascii=False) + "\n\n"
            "data: " + json.dumps(completion_chunk("!", 3)) + "\r\n\r\n"
            "data: " + json.dumps(usage_chunk(3)) + "\n\ndata: [DONE]\n\n").encode()

    class Content:
        async def iter_any(self):
            for i in range(0, len(body), 5):
                yield body[i:i + 5]

    class Response:
        status, content = 200, Content()

        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return False

    class Session:
        def post(self, url, json, headers):
            assert url == "http://h/v1/completions" and json["prompt"] == "p"
            return Response()

    r = asyncio.run(send(Session(), Target("http://h", "m"), P.Prompt("p", 3), round_start=0.0))
    assert r.success and r.chunk_tokens == [2, 1] and r.output_tokens == 3 and r.prompt_tokens == 7
