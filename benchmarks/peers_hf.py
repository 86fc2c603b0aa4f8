"""transformers' batched greedy `generate` as a peer (run by benchmarks/peers.py in its own process, so
its memory is measured alone), and the machine's float32 matmul throughput (the denominator of MFU).

    python -m benchmarks.peers_hf JOB.json OUT.json

JOB: {"folder", "prompts": [[ids]], "output_len", "threads", "points": [{"concurrency", "num_prompts"}],
"parity": P}. Each point runs its prompts in batches of `concurrency` rows (left-padded when lengths
differ), one batch after another, with `max_new_tokens` = `output_len` and no EOS (every row gives
exactly output_len tokens, as the servers' `ignore_eos`). The model loads in float32, as hybridserve
computes. A logits processor stamps the time of every decoding step: a batch's first stamp is its TTFT
(every row's), and (last - first) / (tokens - 1) its TPOT. `parity`: the first P prompts as one batch;
their greedy ids go to OUT as "parity_tokens".
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np


def matmul_throughput(sizes=((2048, 2048, 1), (2048, 2048, 32), (2048, 2048, 256)), threads: int | None = None,
                      min_seconds: float = 0.5) -> dict[str, float]:
    """GFLOP/s of float32 (m x k) @ (k x n) torch matmuls, the best of repeated timings per size."""
    import torch

    from .peers_report import matmul_gflops

    if threads:
        torch.set_num_threads(threads)
    out = {}
    for m, k, n in sizes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        best, spent = float("inf"), 0.0
        reps = 1
        while spent < min_seconds:
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            dt = (time.perf_counter() - t0) / reps
            best, spent = min(best, dt), spent + dt * reps
            reps = min(reps * 2, 1024)
        out[f"{m}x{k}@{k}x{n}"] = matmul_gflops(m, k, n, best)
    return out


class StepClock:
    """A logits processor that only notes when each decoding step's logits are ready."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def load_model(folder: str):
    import torch
    import transformers

    model = transformers.NemotronHForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model


def generate_batch(model, rows: list[list[int]], output_len: int) -> tuple[list[list[int]], float, list[float]]:
    """(greedy ids per row, seconds, step times relative to the start)."""
    import copy

    import torch
    from transformers import LogitsProcessorList

    width = max(map(len, rows))
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    gen = copy.deepcopy(model.generation_config)
    gen.eos_token_id, gen.pad_token_id = None, pad
    gen.do_sample, gen.max_new_tokens, gen.min_new_tokens = False, output_len, None
    gen.temperature = gen.top_p = gen.top_k = None
    clock = StepClock()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen,
                             logits_processor=LogitsProcessorList([clock]))
    seconds = time.perf_counter() - t0
    return [r.tolist() for r in out[:, width:]], seconds, [t - t0 for t in clock.times]


def run_point(model, prompts: list[list[int]], concurrency: int, num_prompts: int, output_len: int) -> dict:
    chosen = [prompts[i % len(prompts)] for i in range(num_prompts)]
    ttft, tpot, tokens, seconds = [], [], 0, 0.0
    for i in range(0, len(chosen), concurrency):
        rows = chosen[i:i + concurrency]
        outs, dt, steps = generate_batch(model, rows, output_len)
        seconds += dt
        tokens += sum(map(len, outs))
        n = min(map(len, outs))
        first = steps[0] if steps else dt
        last = steps[n - 1] if len(steps) >= n else dt
        ttft += [first] * len(rows)
        if n > 1:
            tpot += [(last - first) / (n - 1)] * len(rows)
    ms = lambda v, q: float(np.percentile(np.asarray(v) * 1000.0, q)) if v else float("nan")  # noqa: E731
    return {"concurrency": concurrency, "completed": len(chosen), "failed": 0, "output_tok_s": tokens / seconds,
            "seconds": seconds, "ttft_p50_ms": ms(ttft, 50), "ttft_p99_ms": ms(ttft, 99),
            "tpot_p50_ms": ms(tpot, 50), "tpot_p99_ms": ms(tpot, 99)}


def main(argv: list[str]) -> int:
    import torch

    job = json.loads(open(argv[0]).read())
    torch.set_num_threads(int(job.get("threads") or torch.get_num_threads()))
    t0 = time.perf_counter()
    model = load_model(job["folder"])
    result = {"load_s": time.perf_counter() - t0, "points": []}
    prompts, out_len = job["prompts"], int(job["output_len"])
    if job.get("parity"):
        result["parity_tokens"] = generate_batch(model, prompts[:job["parity"]], out_len)[0]
    generate_batch(model, prompts[:1], min(4, out_len))                 # warm-up
    for p in job["points"]:
        point = run_point(model, prompts, p["concurrency"], p["num_prompts"], out_len)
        print(f"transformers: {point['concurrency']} rows: {point['output_tok_s']:.1f} tok/s", flush=True)
        result["points"].append(point)
        open(argv[1], "w").write(json.dumps(result))                    # what is done survives a kill
    open(argv[1], "w").write(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
