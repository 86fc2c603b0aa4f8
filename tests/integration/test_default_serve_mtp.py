"""`hybridserve serve` with no model arguments serves the shipped default model with MTP on (adaptive, at
most 3 drafts per step): the policy chooses every step (/metrics' histogram of drafts per sequence) and
greedy output equals MTP-off decoding whatever it chooses. On this CPU a k=3 pass costs about as much as
the tokens it yields (docs/BENCHMARKS.md, engine-profile), so the adaptive policy may rightly draft
nothing; the MTP path itself (drafts accepted, counted the same in each response's usage and in /metrics;
logprobs and echo through the `openai` SDK equal to the raw distribution from the model's logits; n > 1)
is therefore checked on the default model with drafts every step (`--speculative-policy fixed`)."""
from __future__ import annotations

import json

import httpx
import pytest
import torch

from benchmarks.served import ServedCluster

pytestmark = pytest.mark.integration

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return"


@pytest.fixture(scope="module")
def served():
    """The default model with MTP drafts every step (k=3: the default model's MTP layer, every pass)."""
    with ServedCluster("--speculative-policy", "fixed", num_cpus=4) as s:
        yield s


def _complete(url: str, max_tokens: int = 32) -> dict:
    r = httpx.post(url + "/v1/completions", timeout=120,
                   json={"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                         "return_token_ids": True})
    assert r.status_code == 200, r.text
    return r.json()


def _accepted(m: dict, before: dict) -> float:
    name = "spec_decode_num_accepted_tokens_per_pos_total"      # summed over positions
    return sum(v for k, v in m.items() if k.startswith(name)) - sum(v for k, v in before.items() if k.startswith(name))


def test_serve_without_arguments_runs_the_adaptive_policy_and_keeps_greedy_output():
    from model_shards.generate import generate
    from model_shards.sampling_params import SamplingParams
    from model_shards.weights import load_checkpoint
    from router.tokenizer import load_tokenizer
    from tests.unit.test_logprobs import FOLDER

    model, tok = load_checkpoint(FOLDER, dtype=torch.float32), load_tokenizer(FOLDER)
    ids = tok.encode(PROMPT)
    expected = generate(model, ids, SamplingParams(max_tokens=32, ignore_eos=True)).tokens        # MTP off
    with ServedCluster(num_cpus=4) as s:
        before = s.metrics()
        outs = [_complete(s.url) for _ in range(3)]
        assert all(o["choices"][0]["token_ids"] == expected for o in outs)
        in_usage = sum((o["usage"].get("completion_tokens_details") or {}).get("accepted_prediction_tokens", 0)
                       for o in outs)                    # the details come only when drafts were verified
        key = "spec_decode_drafts_per_seq_count"                 # one choice per sequence per sampling step

        def chosen(m: dict) -> float:
            return m.get(key, 0) - before.get(key, 0)
        # the replica's counters reach /metrics a moment after the responses: MTP is on (the policy chose for
        # every step of the three requests) and the accepted drafts add up to the usage's, however many
        s.wait_until(lambda m: chosen(m) >= 3 * 16 and _accepted(m, before) == in_usage, 30,
                     "/metrics to count the policy's choices and the usage's accepted drafts")


def test_mtp_drafts_are_accepted_and_counted_in_usage_and_metrics(served):
    s = served
    before = s.metrics()
    details = [_complete(s.url)["usage"]["completion_tokens_details"] for _ in range(2)]
    in_usage = sum(d["accepted_prediction_tokens"] for d in details)
    assert in_usage > 0 and all(d["rejected_prediction_tokens"] >= 0 for d in details), details
    s.wait_until(lambda m: _accepted(m, before) == in_usage, 30, "/metrics to count the accepted drafts of the usage")


def test_logprobs_and_echo_equal_the_reference_with_mtp_as_without(served):
    """The issue's acceptance through the path users run: top_logprobs=5 equal the reference from the model's
    logits (and with the rest of the vocabulary sum to 1), greedy tokens equal MTP-off decoding, drafts
    accepted; completions' echo + logprobs, streamed."""
    import openai

    from model_shards.generate import generate
    from model_shards.sampling_params import SamplingParams
    from model_shards.weights import load_checkpoint
    from router.tokenizer import load_tokenizer
    from tests.unit.test_logprobs import FOLDER, teacher_forced
    from tests.unit.test_logprobs_http import check_item

    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
    model, tok = load_checkpoint(FOLDER, dtype=torch.float32), load_tokenizer(FOLDER)
    msgs = [{"role": "user", "content": "Write a function that reads a file."}]
    prompt = tok.encode_chat(msgs)
    expected = generate(model, prompt, SamplingParams(max_tokens=16, ignore_eos=True)).tokens   # MTP off
    ref = teacher_forced(model, prompt + expected)[len(prompt) - 1:-1]
    r = client.chat.completions.create(model=client.models.list().data[0].id, messages=msgs, max_tokens=16,
                                       temperature=0, logprobs=True, top_logprobs=5,
                                       extra_body={"ignore_eos": True, "return_token_ids": True})
    ids, items = r.choices[0].model_extra["token_ids"], r.choices[0].logprobs.model_dump()["content"]
    assert ids == expected
    for item, row, t in zip(items, ref, ids, strict=True):
        check_item(item, row, t, tok)
    accepted = r.usage.completion_tokens_details.accepted_prediction_tokens
    assert accepted > 0
    chunks = list(client.completions.create(model=r.model, prompt=PROMPT, max_tokens=8, temperature=0, echo=True,
                                            logprobs=2, stream=True))
    assert chunks[0].choices[0].text == PROMPT
    lps = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    ids = tok.encode(PROMPT)
    ids += generate(model, ids, SamplingParams(max_tokens=8)).tokens
    ref = teacher_forced(model, ids)
    assert lps[0] is None and lps[1:] == pytest.approx([ref[p, t].item() for p, t in enumerate(ids[1:])], abs=2e-4)


def test_streamed_text_is_the_decode_of_the_token_ids_with_mtp(served):
    """Through the path users run, with MTP handing out several tokens a step: the streamed content adds up to
    the non-streamed one, which is the tokenizer's decode of the output ids (tokenizers' DecodeStream on the
    shipped tokenizer.json), and a stop string taken from that output cuts both at the same place."""
    from router.tokenizer import load_tokenizer
    from tests.unit.test_logprobs import FOLDER

    tok = load_tokenizer(FOLDER)
    body = {"messages": [{"role": "user", "content": "Écris une fonction ☃ qui lit un fichier."}], "max_tokens": 40,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    done = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=120).json()
    text, ids = done["choices"][0]["message"]["content"], done["choices"][0]["token_ids"]
    assert text == tok.decode(ids) and len(ids) == 40
    assert done["usage"]["completion_tokens_details"]["accepted_prediction_tokens"] > 0, "MTP steps were streamed"
    stop = text[len(text) // 2:len(text) // 2 + 3]
    for extra in ({}, {"stop": [stop]}):
        want = text if not extra else text[:text.find(stop)]
        with httpx.stream("POST", served.url + "/v1/chat/completions", json={**body, **extra, "stream": True},
                          timeout=120) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert streamed == want, extra
        if not extra:
            assert [t for c in chunks if c["choices"] for t in c["choices"][0].get("token_ids", [])] == ids


def test_n3_choices_through_the_openai_sdk_share_one_prefill_with_mtp(served):
    """n > 1 (router/fork.py) through `hybridserve serve` with MTP on: n=3 greedy gives three choices, each
    the MTP-off answer, streamed (each chunk naming its choice) as non-streamed; usage counts the prompt
    once and the completions of all three; seeded sampling gives three different, reproducible choices."""
    import openai

    from model_shards.generate import generate
    from model_shards.sampling_params import SamplingParams
    from model_shards.weights import load_checkpoint
    from router.tokenizer import load_tokenizer
    from tests.unit.test_logprobs import FOLDER

    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
    model, tok = load_checkpoint(FOLDER, dtype=torch.float32), load_tokenizer(FOLDER)
    msgs = [{"role": "user", "content": "Write a function that sorts a list."}]
    kw = dict(model=client.models.list().data[0].id, messages=msgs, max_tokens=12, temperature=0, n=3,
              extra_body={"ignore_eos": True})
    prompt = tok.encode_chat(msgs)
    want = tok.decode(generate(model, prompt, SamplingParams(max_tokens=12, ignore_eos=True)).tokens)   # MTP off
    r = client.chat.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1, 2] and [c.message.content for c in r.choices] == [want] * 3
    assert [c.finish_reason for c in r.choices] == ["length"] * 3
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 36
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    texts = ["", "", ""]
    for c in chunks[:-1]:
        (choice,) = c.choices
        texts[choice.index] += choice.delta.content or ""
    assert texts == [want] * 3 and chunks[-1].usage.completion_tokens == 36
    seeded = dict(kw, temperature=1.0, seed=20261130)
    first, again = (client.chat.completions.create(**seeded) for _ in range(2))
    got = [c.message.content for c in first.choices]
    assert got == [c.message.content for c in again.choices] and len(set(got)) == 3
