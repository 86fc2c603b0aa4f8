"""The `hybridserve bench` subcommand: its options (vLLM's `bench serve` names where they exist) and
what it prints and writes."""
from __future__ import annotations

import argparse
import asyncio
import os
import sys

from .metrics import parse_goodput
from .stream import normalize_endpoint


def add_parser(sub) -> argparse.ArgumentParser:
    b = sub.add_parser("bench", help="benchmark an OpenAI-compatible server (streaming load, vLLM's figures)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Send a seeded streaming workload to any OpenAI-compatible server and report "
                                   "throughput, TTFT, TPOT, ITL and E2EL (docs/SERVING.md defines each figure).")
    t = b.add_argument_group("target")
    t.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (a trailing /v1 is fine)")
    t.add_argument("--endpoint", default="completions", type=normalize_endpoint,
                   help="completions (/v1/completions) or chat (/v1/chat/completions)")
    t.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    t.add_argument("--api-key", default=None,
                   help="sent as 'Authorization: Bearer <key>' (env OPENAI_API_KEY or HYBRIDSERVE_API_KEY)")
    t.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    w = b.add_argument_group("workload")
    w.add_argument("--num-prompts", type=int, default=64, help="requests per round")
    w.add_argument("--input-len", "--random-input-len", type=int, default=256, help="random prompts' tokens")
    w.add_argument("--output-len", "--random-output-len", type=int, default=128, help="max_tokens of each request")
    w.add_argument("--tokenizer", default=None,
                   help="local checkpoint folder whose tokenizer makes random prompts exactly --input-len tokens "
                        "(default: sized from the server's usage counts)")
    src = w.add_mutually_exclusive_group()
    src.add_argument("--prompt-file", default=None, help="prompts, one per line or JSONL with \"prompt\"")
    src.add_argument("--chat-dataset", "--dataset-path", dest="chat_dataset", default=None,
                     help="ShareGPT-style JSON/JSONL: the first human turn of each conversation is a prompt")
    w.add_argument("--seed", type=int, default=0, help="seeds prompts and arrival times")
    w.add_argument("--temperature", type=float, default=0.0)
    w.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let EOS end requests early (default: ignore_eos, so each gives --output-len tokens)")
    w.add_argument("--no-continuous-usage-stats", dest="continuous_usage", action="store_false",
                   help="for servers that refuse stream_options.continuous_usage_stats: one token per chunk")
    ld = b.add_argument_group("load")
    ld.add_argument("--concurrency", "--max-concurrency", type=int, default=None,
                    help="at most this many requests in flight (default: no cap)")
    ld.add_argument("--request-rate", type=float, default=float("inf"),
                    help="requests per second, gamma/Poisson arrivals (inf: all at once)")
    ld.add_argument("--burstiness", type=float, default=1.0,
                    help="gamma shape of the arrival gaps: 1 Poisson, <1 burstier, >1 steadier")
    ld.add_argument("--repeats", type=int, default=3,
                    help="rounds of the same workload; figures are the median with the [min, max] over rounds")
    ld.add_argument("--num-warmups", type=int, default=4, help="unmeasured requests sent first")
    o = b.add_argument_group("output")
    o.add_argument("--goodput", nargs="+", default=[], metavar="NAME:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 (names: ttft, tpot, e2el)")
    o.add_argument("--json", dest="json_path", default=None, metavar="PATH",
                   help="write every figure and the per-request records")
    o.add_argument("--plot", dest="plot_path", default=None, metavar="PATH.png",
                   help="CDFs of TTFT/TPOT/ITL/E2EL (needs matplotlib: the 'bench' extra)")
    o.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    return b


def config_from_args(args):
    from .runner import BenchConfig

    api_key = args.api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("HYBRIDSERVE_API_KEY")
    return BenchConfig(base_url=args.base_url, model=args.model, endpoint=args.endpoint, api_key=api_key,
                       
                       concurrency=args.concurrency, request_rate=args.request_rate, burstiness=args.burstiness,
                       num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
                       seed=args.seed, temperature=args.temperature, ignore_eos=args.ignore_eos,
                       continuous_usage=args.continuous_usage, prompt_file=args.prompt_file,
                       chat_dataset=args.chat_dataset, tokenizer=args.tokenizer, repeats=args.repeats,
                       num_warmups=args.num_warmups, goodput_slos_ms=parse_goodput(args.goodput),
                       timeout_s=args.timeout, disable_progress=args.disable_tqdm)


def cmd_bench(args) -> int:
    from .arrivals import arrival_offsets
    from .report import format_table, write_json
    from .runner import pooled_samples, run_bench

    try:
        cfg = config_from_args(args)
        arrival_offsets(2, cfg.request_rate, cfg.burstiness)          # option errors before any request
        if cfg.concurrency is not None and cfg.concurrency < 1:
            raise ValueError("--concurrency: must be at least 1")
        if args.plot_path:
            import importlib.util
            if importlib.util.find_spec("matplotlib") is None:
                raise ValueError("--plot needs matplotlib: pip install 'hybridserve[bench]' (or matplotlib)")
    except ValueError as e:
        print(f"hybridserve bench: error: {e}", file=sys.stderr)
        return 2
    import aiohttp

    try:
        result = asyncio.run(run_bench(cfg))
    except (OSError, RuntimeError, ValueError, aiohttp.ClientError, asyncio.TimeoutError) as e:
        print(f"hybridserve bench: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hybridserve bench: interrupted", file=sys.stderr)
        return 130
    print(format_table(result), flush=True)
    if args.json_path:
        write_json(result, args.json_path)
    if args.plot_path:
        from .plot import write_plot
        write_plot(pooled_samples(result), args.plot_path, f"{result['model']} at {result['endpoint']}")
    return 0 if result["completed"] else 1
