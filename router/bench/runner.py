"""A whole benchmark: resolve the model, build the prompts, warm up, run the rounds, read /metrics.

Every round replays the same seeded workload (prompts and arrival times), so the spread between rounds
is the server's and the machine's noise, which is what a second run has to agree with.
"""
from __future__ import annotations

import asyncio
import math
import sys
from dataclasses import asdict, dataclass, field

from . import prompts as P
from .arrivals import arrival_offsets
from .load import client_session, run_round
from .metrics import combine_rounds, latencies, round_figures
from .progress import progress_bar
from .server_metrics import scrape, spec_decode_figures
from .stream import Target, payload


@dataclass
class BenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None
    endpoint: str = "completions"
    api_key: str | None = None
    concurrency: int | None = None
    request_rate: float = math.inf
    burstiness: float = 1.0
    num_prompts: int = 64
    input_len: int = 256
    output_len: int = 128
    seed: int = 0
    temperature: float = 0.0
    ignore_eos: bool = True
    continuous_usage: bool = True
    prompt_file: str | None = None
    chat_dataset: str | None = None
    tokenizer: str | None = None
    repeats: int = 3
    num_warmups: int = 4
    goodput_slos_ms: dict[str, float] = field(default_factory=dict)
    timeout_s: float = 600.0
    disable_progress: bool = False


async def served_model(session, target: Target) -> str:
    async with session.get(target.root + "/v1/models", headers=target.headers()) as resp:
        if resp.status != 200:
            raise RuntimeError(f"GET /v1/models: HTTP {resp.status}: {(await resp.text())[:200]}; pass --model")
        data = (await resp.json()).get("data") or []
    if not data:
        raise RuntimeError("GET /v1/models lists no model; pass --model")
    return data[0]["id"]


async def prompt_tokens(session, target: Target, text: str) -> int:
    """The server's own token count of a prompt (one non-streaming request of one output token)."""
    body = payload(target, P.Prompt(text, 1))
    body["stream"] = False
    body.pop("stream_options", None)
    async with session.post(target.url, json=body, headers=target.headers()) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
        return int((await resp.json())["usage"]["prompt_tokens"])


async def build_prompts(session, cfg: BenchConfig, target: Target) -> list[P.Prompt]:
    if cfg.prompt_file:
        return P.cycle_to(P.read_prompt_file(cfg.prompt_file), cfg.num_prompts, cfg.output_len, cfg.seed)
    if cfg.chat_dataset:
        return P.cycle_to(P.read_chat_dataset(cfg.chat_dataset), cfg.num_prompts, cfg.output_len, cfg.seed)
    if cfg.tokenizer:
        from router.tokenizer import load_tokenizer

        tok = load_tokenizer(cfg.tokenizer)
        return P.random_prompts(cfg.num_prompts, cfg.input_len, cfg.output_len, cfg.seed, tokenizer=tok)
    import random

    rng, words = random.Random(cfg.seed ^ 0x5EED), P.python_words()
    sizes = (8, max(64, cfg.input_len))
    try:
        samples = [(n, await prompt_tokens(session, target, P.random_text(n, rng, words))) for n in sizes]
        fit = P.fit_tokens_per_word(samples)
    except Exception as e:  # noqa: BLE001 - the bench still runs, with one word per token
        print(f"bench: could not count prompt tokens on the server ({e}); assuming one token per word",
              file=sys.stderr)
        fit = None
    return P.random_prompts(cfg.num_prompts, cfg.input_len, cfg.output_len, cfg.seed, fit=fit)


async def run_bench(cfg: BenchConfig) -> dict:
    if cfg.repeats < 1 or cfg.num_prompts < 1:
        raise ValueError("--repeats and --num-prompts must be at least 1")
    async with client_session(cfg.timeout_s) as session:
        target = Target(cfg.base_url, cfg.model or "", cfg.endpoint, cfg.api_key, cfg.temperature,
                        cfg.ignore_eos, cfg.continuous_usage)
        if not cfg.model:
            target = Target(**{**asdict(target), "model": await served_model(session, target)})
        prompts = await build_prompts(session, cfg, target)
        offsets = arrival_offsets(len(prompts), cfg.request_rate, cfg.burstiness, cfg.seed)
        if cfg.num_warmups:
            warm = [prompts[i % len(prompts)] for i in range(cfg.num_warmups)]
            await run_round(session, target, warm, [0.0] * len(warm), cfg.concurrency)
        before = await scrape(session, target.root)
        bar = progress_bar(cfg.repeats * len(prompts), "bench", cfg.disable_progress)
        rounds, records = [], []
        try:
            for i in range(cfg.repeats):
                recs, duration = await run_round(session, target, prompts, offsets, cfg.concurrency, bar)
                rounds.append(round_figures(recs, duration, cfg.goodput_slos_ms))
                records += [{"round": i, **r.to_dict()} for r in recs]
        finally:
            bar.close()
        if before:
            await asyncio.sleep(1.0)       # Ray Serve replicas push their counters twice a second
        spec = spec_decode_figures(before, await scrape(session, target.root))
    return assemble(cfg, target, rounds, records, spec)


def assemble(cfg: BenchConfig, target: Target, rounds: list[dict], records: list[dict], spec: dict | None) -> dict:
    failed = [r for r in records if not r["success"]]
    return {
        "model": target.model, "endpoint": target.url, "rounds": len(rounds),
        "config": {k: ("inf" if v == math.inf else v) for k, v in asdict(cfg).items() if k != "api_key"},
        "completed": len(records) - len(failed), "failed": len(failed),
        "first_error": failed[0]["error"] if failed else None,
        "total_input_tokens": sum(r["prompt_tokens"] for r in records if r["success"]),
        "total_output_tokens": sum(r["output_tokens"] for r in records if r["success"]),
        "goodput_slos_ms": dict(cfg.goodput_slos_ms),
        "figures": combine_rounds(rounds),
        "spec_decode": spec,
        "requests": records,
    }


def pooled_samples(result: dict) -> dict[str, list[float]]:
    """Latency samples of every round together (for the plot)."""
    from .metrics import RequestRecord

    recs = [RequestRecord(**{k: v for k, v in r.items() if k != "round"}) for r in result["requests"]]
    return latencies(recs)
