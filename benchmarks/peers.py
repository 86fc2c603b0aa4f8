"""Side by side: hybridserve against llama.cpp's C++ `llama-server` and transformers' batched `generate`,
on the same prompts, at 1, 8, 32 and 64 concurrent streams, on the default model and on a larger
random-weight model of the same layer mix (the `hybrid-280m` preset: 281M parameters, 68M active, with
hybrid-mini's tokenizer; its weights stored in bfloat16, as released checkpoints and the shipped one are).

    python -m benchmarks.peers                      # the full run (docs/BENCHMARKS.md): ~15 min on 2 cores
    python -m benchmarks.peers --quick              # a smoke run (~2 min): default model, 1 and 8 streams
    python -m benchmarks.peers --build-llama-server # build llama-server first when it is not cached (~5 min)

What it measures, per model:
- hybridserve (`hybridserve serve`, benchmarks/served.py) with MTP off and on (k=3), pp=1 and
  `-pp 2 -ep 2`; llama-server on the GGUF export (float32, MTP left out) with one slot per stream
  (`-np N`, a fresh server per concurrency, `-fa off`, no prompt cache); transformers `generate` in
  batches of N rows (benchmarks/peers_hf.py). The servers are driven by `hybridserve bench`'s load
  generator (router/bench/): its throughput, TTFT and TPOT; transformers is timed in-process.
- greedy parity: the first few prompts, as token ids, all at once to each server, with ignore_eos;
  token-by-token comparison, first difference per prompt reported (not a failure).
- the machine's float32 matmul throughput, and MFU = 2 x matmul params x output tok/s / that.
- the peak resident memory of each server's process tree while it serves each concurrency.
Results go to ~/.cache/hybridserve/peers/results-*.json as they come (`--from-json` re-renders them),
then into docs/BENCHMARKS.md (section `peers`) with PNG plots in docs/img/.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import peers_report as R
from . import peers_servers as S
from .common import DOC, machine, publish
from .served import REPO

LARGE_PRESET = "hybrid-280m"
# MTP is on by default (auto, adaptive): the default row leaves it so, the plain rows turn it off, the
# k=3 rows draft 3 every step.
_OFF, _K3 = ("--num-speculative-tokens", "0"), ("--num-speculative-tokens", "3", "--speculative-policy", "fixed")
HS_SETUPS = [("hybridserve", _OFF), ("hybridserve default (adaptive MTP)", ()), ("hybridserve MTP k=3", _K3),
             ("hybridserve -pp 2 -ep 2", ("-pp", "2", "-ep", "2", *_OFF)),
             ("hybridserve -pp 2 -ep 2 MTP k=3", ("-pp", "2", "-ep", "2", *_K3))]
SKIPPABLE = ("llama.cpp", "transformers", "mtp", "pp")
IMG = DOC.parent / "img"
OUT_DIR = S.CACHE / "peers"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: default model, concurrency 1,8, short prompts")
    ap.add_argument("--models", default=None, help="default, large (the hybrid-280m preset), a preset or a folder")
    ap.add_argument("--concurrency", default=None, help="comma-separated (default 1,8,32,64; --quick 1,8)")
    ap.add_argument("--skip", default="", help=f"any of {', '.join(SKIPPABLE)} (mtp/pp: those hybridserve setups)")
    ap.add_argument("--input-len", type=int, default=None, help="prompt tokens (default 64; --quick 32)")
    ap.add_argument("--output-len", type=int, default=None,
                    help="tokens per request (default 128, issue 12's workload; --quick 24)")
    ap.add_argument("--min-prompts", type=int, default=None,
                    help="requests per point: max(this, concurrency) (default 8; --quick 4)")
    ap.add_argument("--parity-prompts", type=int, default=None, help="prompts compared token by token (8; --quick 4)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds per point (hybridserve bench --repeats)")
    ap.add_argument("--threads", type=int, default=2, help="llama-server -t/-tb and transformers' torch threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--llama-server", default=None, help="path of a llama-server binary")
    ap.add_argument("--build-llama-server", action="store_true", help="build it into the cache when absent")
    ap.add_argument("--from-json", default=None, help="re-render docs and plots from a results file; run nothing")
    ap.add_argument("--no-write", action="store_true",
                    help="print only; do not update docs/BENCHMARKS.md (the results file can be written there later "
                         "with --from-json, under the command without --no-write)")
    a = ap.parse_args(argv)
    q = a.quick
    a.models = R.parse_names(a.models, what="--models") if a.models else (["default"] if q else ["default", "large"])
    a.concurrency = R.parse_ints(a.concurrency or ("1,8" if q else "1,8,32,64"))
    a.skip = R.parse_names(a.skip, SKIPPABLE)
    a.input_len = a.input_len or (32 if q else 64)
    a.output_len = a.output_len or (24 if q else 128)
    a.min_prompts = a.min_prompts or (4 if q else 8)
    a.parity_prompts = a.parity_prompts or (4 if q else 8)
    return a


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def resolve(name: str) -> Path:
    """A checkpoint folder. "large" is the hybrid-280m preset's random weights (written once to the cache)
    with hybrid-mini's tokenizer beside them: a preset's own byte tokenizer would leave most of its 4096
    ids without text in llama.cpp (unused tokens), so a client could not see them arrive."""
    from router.engine_config import DEFAULT_CHECKPOINT, resolve_checkpoint

    if name != "large":
        return resolve_checkpoint(name)
    weights = resolve_checkpoint(LARGE_PRESET)
    folder = OUT_DIR / "models" / f"{LARGE_PRESET}-bf16"
    if not (folder / "config.json").exists():
        _bfloat16_copy(weights, folder)
    for f in TOKENIZER_FILES:
        if (DEFAULT_CHECKPOINT / f).exists() and not (folder / f).exists():
            (folder / f).write_bytes((DEFAULT_CHECKPOINT / f).read_bytes())
    return folder


def _bfloat16_copy(weights: Path, folder: Path) -> None:
    """The preset's random float32 weights written in bfloat16 (what a released checkpoint holds; every
    server then computes with the same, bfloat16-exact, values), config.json last (the folder's marker)."""
    import torch
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    for f in sorted(weights.iterdir()):
        if f.suffix == ".safetensors":
            tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(str(f)).items()}
            save_file(tensors, str(folder / f.name), metadata={"format": "pt"})
        elif f.name != "config.json":
            (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((weights / "config.json").read_text())
    cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def model_facts(folder: Path) -> dict:
    from model_shards.params import count_parameters
    from model_shards.weights import read_config

    cfg = read_config(folder)
    total, active = count_parameters(cfg)
    return {"name": cfg.name, "folder": str(folder), "pattern": cfg.hybrid_override_pattern, "total": total,
            "active": active, "matmul": active - cfg.vocab_size * cfg.hidden_size}   # lookups are not matmuls


class Progress:
    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.time()

    def step(self, what: str) -> None:
        self.done += 1
        el = time.time() - self.t0
        left = el / self.done * (self.total - self.done)
        print(f"[{self.done}/{self.total}] {what}; {el / 60:.1f} min so far, about {left / 60:.0f} min left", flush=True)


def bench_point(url: str, folder: Path, a, conc: int) -> dict:
    from router.bench.runner import BenchConfig, run_bench

    n = max(a.min_prompts, conc)
    cfg = BenchConfig(base_url=url, tokenizer=str(folder), num_prompts=n, input_len=a.input_len,
                      output_len=a.output_len, seed=a.seed, concurrency=conc, repeats=a.repeats,
                      num_warmups=min(2, conc), timeout_s=3600, disable_progress=True)
    res = asyncio.run(run_bench(cfg))
    f = res["figures"]
    g = lambda k: f[k]["median"] if k in f else math.nan   # noqa: E731
    spec = res.get("spec_decode") or {}
    return {"concurrency": conc, "completed": res["completed"], "failed": res["failed"],
            "first_error": res["first_error"], "output_tok_s": g("output_throughput"),
            "ttft_p50_ms": g("ttft_median_ms"), "ttft_p99_ms": g("ttft_p99_ms"),
            "tpot_p50_ms": g("tpot_median_ms"), "tpot_p99_ms": g("tpot_p99_ms"),
            "accept_len": spec.get("mean_acceptance_length")}


def run_hybridserve(key, folder, a, prompts, results, progress) -> None:
    from .served import ServedCluster

    common = ("--model", str(folder), "--max-num-seqs", str(max(a.concurrency)), "--max-queued-requests", "512",
              "--max-model-len", str(a.input_len + a.output_len + 64))
    results["cmd"]["hybridserve"] = "hybridserve serve " + shlex.join(common).replace(str(folder), "FOLDER")
    for name, extra in HS_SETUPS:
        if ("mtp" in a.skip and "MTP" in name) or ("pp" in a.skip and "-pp" in name):
            continue
        t0 = time.time()
        try:
            with ServedCluster(*common, *extra) as s, S.MemorySampler(s.proc.pid) as mem:
                print(f"{key}: {name} ready in {time.time() - t0:.0f}s", flush=True)
                results["parity"][key][name] = S.hybridserve_tokens(s.url, prompts[:a.parity_prompts], a.output_len)
                for c in a.concurrency:
                    mem.reset()
                    p = bench_point(s.url, folder, a, c)
                    results["points"].append({"model": key, "server": name, **p, "peak_rss_mib": mem.peak})
                    save(results)
                    progress.step(f"{key} {name} {c} streams: {p['output_tok_s']:.1f} tok/s")
        except Exception as e:  # noqa: BLE001 - the other setups' figures still count
            results["notes"].append(f"{key}: {name} failed: {type(e).__name__}: {str(e)[:500]}")
            print(results["notes"][-1], flush=True)


def gguf_for(folder: Path, facts: dict) -> Path:
    from model_shards.gguf_export import export_gguf

    tag = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:8]
    out = OUT_DIR / f"{facts['name']}-{tag}-f32.gguf"
    newest = max(p.stat().st_mtime for p in folder.iterdir())
    if not out.exists() or out.stat().st_mtime < newest:
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        export_gguf(folder, out, outtype="f32")
    return out


def run_llama(key, folder, facts, a, binary, texts, prompts, results, progress) -> None:
    gguf = gguf_for(folder, facts)
    ctx = a.input_len + a.output_len + 64
    # parity and the tokenizer check on the first server with a slot per parity prompt (else the largest)
    parity_at = next((c for c in a.concurrency if c >= a.parity_prompts), a.concurrency[-1])
    for c in a.concurrency:
        with S.LlamaServer(binary, gguf, c, ctx, a.threads) as srv, S.MemorySampler(srv.proc.pid) as mem:
            if c == parity_at:
                results["cmd"]["llama.cpp"] = shlex.join(srv.cmd).replace(str(Path.home()), "~")
                from router.tokenizer import load_tokenizer
                ours = [load_tokenizer(folder).encode(t) for t in texts[:a.parity_prompts]]
                theirs = [srv.tokenize(t) for t in texts[:a.parity_prompts]]
                results["prompt_tokenization"][key] = R.parity_summary(ours, theirs)
                results["parity"][key]["llama.cpp llama-server"] = S.llama_server_tokens(
                    srv.url, prompts[:a.parity_prompts], a.output_len)
            mem.reset()
            p = bench_point(srv.url, folder, a, c)
            results["points"].append({"model": key, "server": "llama.cpp llama-server", **p, "peak_rss_mib": mem.peak})
            save(results)
            progress.step(f"{key} llama-server {c} streams: {p['output_tok_s']:.1f} tok/s")


def run_transformers(key, folder, a, prompts, results, progress) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job.write_text(json.dumps({"folder": str(folder), "prompts": prompts, "output_len": a.output_len,
                                   "threads": a.threads, "parity": a.parity_prompts,
                                   "points": [{"concurrency": c, "num_prompts": max(a.min_prompts, c)}
                                              for c in a.concurrency]}))
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.peers_hf", str(job), str(out)], cwd=REPO)
        with S.MemorySampler(proc.pid) as mem:
            rc = proc.wait()
        if rc or not out.exists():
            results["notes"].append(f"{key}: transformers exited {rc}")
            return
        r = json.loads(out.read_text())
    results["parity"][key]["transformers generate"] = r.get("parity_tokens")
    for p in r["points"]:
        results["points"].append({"model": key, "server": "transformers generate", **p, "peak_rss_mib": mem.peak})
        progress.step(f"{key} transformers {p['concurrency']} rows: {p['output_tok_s']:.1f} tok/s")
    save(results)


def save(results: dict) -> None:
    Path(results["path"]).write_text(json.dumps(results, indent=1, default=str))


def run(a) -> dict:
    from router.bench.prompts import random_prompts
    from router.tokenizer import load_tokenizer

    from .peers_hf import matmul_throughput

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    results = {"path": str(OUT_DIR / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json"),
               "command": shlex.join(["python", "-m", "benchmarks.peers", *(x for x in sys.argv[1:] if x != "--no-write")]),
               "machine": machine(),
               "quick": a.quick, "settings": {k: getattr(a, k) for k in ("concurrency", "input_len", "output_len",
                                              "min_prompts", "parity_prompts", "repeats", "threads", "seed")},
               "models": {}, "points": [], "parity": {}, "prompt_tokenization": {}, "notes": [], "cmd": {},
               "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(f"results go to {results['path']}", flush=True)
    binary = None
    if "llama.cpp" not in a.skip:
        binary, how = S.find_llama_server(a.llama_server)
        if binary is None and a.build_llama_server and not a.llama_server:
            binary, how = S.build_llama_server(), "built into the cache"
        print(f"llama-server: {binary or how}", flush=True)
        results["llama_server"] = str(binary) if binary else None
        if binary is None:
            results["notes"].append(how.splitlines()[0])
    results["matmul_gflops"] = matmul_throughput(threads=a.threads)
    print(f"matmul GFLOP/s ({a.threads} threads): {results['matmul_gflops']}", flush=True)
    n_hs = sum(1 for n, _ in HS_SETUPS if not (("mtp" in a.skip and "MTP" in n) or ("pp" in a.skip and "-pp" in n)))
    per_model = len(a.concurrency) * (n_hs + (binary is not None) + ("transformers" not in a.skip))
    progress = Progress(per_model * len(a.models))
    for key in a.models:
        folder = resolve(key)
        facts = results["models"][key] = model_facts(folder)
        facts["weights"] = "random, stored in bfloat16, hybrid-mini's tokenizer" if key == "large" else (
            "trained" if folder.resolve() == resolve("default").resolve() else "as in the folder")
        tok = load_tokenizer(folder)
        n = max(a.min_prompts, max(a.concurrency), a.parity_prompts)
        texts = [p.text for p in random_prompts(n, a.input_len, a.output_len, a.seed, tokenizer=tok)]
        prompts = [tok.encode(t) for t in texts]
        results["parity"][key], results["models"][key]["prompt_lens"] = {}, sorted({len(p) for p in prompts})
        print(f"{key}: {facts['name']} ({facts['total'] / 1e6:.0f}M params, {facts['active'] / 1e6:.0f}M active)",
              flush=True)
        run_hybridserve(key, folder, a, prompts, results, progress)
        if binary is not None:
            try:
                run_llama(key, folder, facts, a, binary, texts, prompts, results, progress)
            except Exception as e:  # noqa: BLE001 - the other peers' figures still count
                results["notes"].append(f"{key}: llama-server failed: {type(e).__name__}: {str(e)[:500]}")
        if "transformers" not in a.skip:
            try:
                run_transformers(key, folder, a, prompts, results, progress)
            except Exception as e:  # noqa: BLE001
                results["notes"].append(f"{key}: transformers failed: {type(e).__name__}: {str(e)[:500]}")
        save(results)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results["minutes"] = (time.time() - progress.t0) / 60
    save(results)
    return results


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.from_json:
        results = json.loads(Path(a.from_json).read_text())
    else:
        results = run(a)
    from .peers_docs import render

    body = render(results, IMG, write_plots=not a.no_write)
    publish("peers", body, not a.no_write)


if __name__ == "__main__":
    main()
