"""The `peers` section of docs/BENCHMARKS.md, from a results dict of benchmarks/peers.py (also re-rendered
from its saved JSON with `python -m benchmarks.peers --from-json PATH`)."""
from __future__ import annotations

import math
from pathlib import Path

from . import peers_report as R
from .common import table

REFERENCE = "hybridserve"


def parity_rows(parity: dict[str, dict[str, list]]) -> list[list]:
    """(model, compared pair, result) for every other server against hybridserve, and transformers against
    llama.cpp when both ran."""
    rows = []
    for model, by_server in parity.items():
        ref = by_server.get(REFERENCE)
        if ref is None:
            continue
        for server, toks in by_server.items():
            if server != REFERENCE and toks is not None:
                rows.append([model, f"{server} vs {REFERENCE}", R.parity_text(R.parity_summary(ref, toks))])
        lc, hf = by_server.get("llama.cpp llama-server"), by_server.get("transformers generate")
        if lc is not None and hf is not None:
            rows.append([model, "transformers generate vs llama.cpp llama-server",
                         R.parity_text(R.parity_summary(lc, hf))])
    return rows


def best_gflops(results: dict) -> float:
    return max(results.get("matmul_gflops", {}).values(), default=math.nan)


def render(results: dict, img_dir: Path, write_plots: bool = True) -> str:
    s = results["settings"]
    peak = best_gflops(results)
    matmul = {k: m["matmul"] for k, m in results["models"].items()}
    points = R.with_mfu(results["points"], matmul, peak)
    cmd = results["command"]
    out = [f"## Side by side: hybridserve, llama.cpp's llama-server, transformers (`python -m benchmarks.peers`)", ""]
    if results.get("quick"):
        out += [f"**This is the quick run** (`{cmd}`: the default model only, few streams and short requests, a "
                "smoke test of the suite, not the full comparison; the full run is `python -m benchmarks.peers "
                "--build-llama-server`).", ""]
    minutes = results.get("minutes")
    out += [f"Command: `{cmd}`. Machine: {results['machine']}. Started {results.get('started', '?')}"
            + (f", took {minutes:.0f} min." if minutes else "."), "",
            f"Workload: every server gets the same prompts of {s['input_len']} tokens (random Python words, seed "
            f"{s['seed']}, exact length by the model's tokenizer), {s['output_len']} new tokens each, greedy, EOS "
            f"ignored; max({s['min_prompts']}, streams) requests per point with at most `streams` in flight, "
            f"{s['repeats']} round(s) after warm-up requests. The servers are measured by `hybridserve bench`'s "
            "client (router/bench/: streaming `/v1/completions`, the figures docs/SERVING.md defines); "
            "transformers runs in batches of `streams` rows, timed in its own process (TTFT = the batch's first "
            "step, TPOT = the steps after it). Every engine computes in float32 (hybridserve's CPU dtype; the "
            "GGUF is exported as f32; transformers loads with dtype float32).", ""]
    rows = [[k, m["name"], m.get("weights", ""), f"`{m['pattern']}`", f"{m['total'] / 1e6:.1f}M",
             f"{m['active'] / 1e6:.1f}M", f"{m['matmul'] / 1e6:.1f}M"] for k, m in results["models"].items()]
    out += [table(["model", "name", "weights", "layers", "params (without MTP)", "active", "active in matmuls (MFU)"],
                  rows), ""]
    mm = results.get("matmul_gflops", {})
    out += [f"The machine's float32 matmul throughput (torch, {s['threads']} threads, best of repeated timings): "
            + ", ".join(f"{k}: {v:.1f} GFLOP/s" for k, v in mm.items())
            + f". MFU = 2 x active matmul params x output tok/s / {peak:.1f} GFLOP/s (prefill and attention's "
            "context flops not counted: a lower bound of the work done).", ""]
    for key in results["models"]:
        out += [f"### {key} ({results['models'][key]['name']}): output tokens/s", "", R.headline_table(points, key), ""]
        for peer in ("llama.cpp llama-server", "transformers generate"):
            if any(p["model"] == key and p["server"] == peer for p in points):
                out += [f"hybridserve over {peer} ({key}), output tok/s ratio:", "", R.ratio_table(points, key, peer), ""]
        if write_plots and any(p["model"] == key for p in points):
            paths = R.write_plots(points, key, img_dir, f"peers-{key}", f"{key} ({results['models'][key]['name']})")
            out += [" ".join(f"![{p.stem}](img/{p.name})" for p in paths), ""]
        elif any(p["model"] == key for p in points):
            out += [f"![peers-{key}-throughput](img/peers-{key}-throughput.png) "
                    f"![peers-{key}-latency](img/peers-{key}-latency.png)", ""]
    out += ["### Every point", "", R.points_table(points), "",
            "*peak RSS*: the largest resident memory of the server's process tree sampled every 0.5 s while it "
            "served that point (hybridserve: the serve process, Ray and its actors; llama-server: one process, "
            "a fresh one per concurrency; transformers: its process over all its points). *MTP accept len*: "
            "tokens a sequence gains per verification round (from /metrics).", ""]
    prow = parity_rows(results.get("parity", {}))
    out += ["### Greedy parity", "",
            f"The first {s['parity_prompts']} prompts as token ids, all at once to each server (transformers: one "
            f"batch), {s['output_len']} greedy tokens each, EOS ignored; compared token by token, the first "
            "difference per prompt shown (token index, reference's token vs the other's).", ""]
    out += [table(["model", "compared", "result"], prow) if prow else "No parity results.", ""]
    for key, summary in results.get("prompt_tokenization", {}).items():
        out += [f"Prompt text tokenized by llama-server's `/tokenize` against hybridserve's tokenizer ({key}): "
                f"{R.parity_text(summary)}.", ""]
    if results.get("cmd", {}).get("hybridserve"):
        out += [f"hybridserve: `{results['cmd']['hybridserve']}` plus the setup's flags (`--num-speculative-tokens 0`, "
                "or `--num-speculative-tokens 3 --speculative-policy fixed`, `-pp 2 -ep 2`), its own default torch threads; "
                "one server per setup for every concurrency.", ""]
    if results.get("cmd", {}).get("llama.cpp"):
        out += [f"llama-server command (at the concurrency of the parity check): `{results['cmd']['llama.cpp']}`; it is built "
                "from the llama.cpp that llama-cpp-python's source distribution vendors "
                "(`--build-llama-server`; benchmarks/peers_servers.py lists the commands).", ""]
    randoms = [k for k, m in results["models"].items() if str(m.get("weights", "")).startswith("random")]
    if randoms:
        out += [f"Random weights ({', '.join(randoms)}) include a random MTP block, whose drafts are (almost) never "
                "accepted (acceptance length ~1.00): those MTP rows show what drafting and verifying cost without "
                "the gain; only the trained default model shows MTP's speedup.", ""]
    for note in results.get("notes", []):
        out += [f"Note: {note}", ""]
    fails = [p for p in points if p.get("failed")]
    for p in fails[:5]:
        out += [f"Failed requests: {p['model']} {p['server']} {p['concurrency']}: {p.get('first_error')}", ""]
    return "\n".join(out)
