"""A first look at a GPU: `python -m benchmarks.gpu_check` (needs only torch and triton).

Kernel part: every Triton kernel (kernels/triton/) against its reference (kernels/ops.py's reference
choice) and the batched torch path (kernels/fast/) at Nemotron-3-Super's real shapes: hidden 4096,
128 Mamba heads of 64, state 128, 8 groups, conv dim 10240, 32 q / 2 KV heads of 128, latent MoE with
512 experts of 2688 (22 per token, latent 1024); decode batches of 32 sequences at a 4096-token
context, verification of k+1 = 4 positions. Per op: the largest error against the reference (and
whether it is within the dtype's tolerance), median time of the Triton kernel and of the torch path
over CUDA events, the kernel's achieved bandwidth (the bytes the op must move / its time) against a
1 GiB device-to-device copy, and its achieved compute (the FLOPs the op must do / its time) against an
8192^3 bfloat16 matmul, both timed in the same run: one table, a row per case, every Triton op (a
kernel without a row is named under the table). Activations bfloat16, Mamba states float32.

Without a GPU it runs a tiny version under Triton's interpreter (TRITON_INTERPRET=1) and says so: a
check that the script and the kernels run, not a measurement. Prints a table and writes JSON (--out).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA:                                          # before kernels.triton decorates its kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels import ops  # noqa: E402
from kernels import triton as tk  # noqa: E402

SUPER = dict(S=32, hidden=4096, H=128, P=64, N=128, G=8, K=4, Hq=32, Hkv=2, Dh=128, ctx=4096, bs=16, T=4,
             E=512, k=22, I=2688, latent=1024, rows=8192, moe_T=64, prefill=(2048, 1024, 512, 512), chunk=128,
             V=131072)
TINY = dict(S=3, hidden=64, H=4, P=16, N=16, G=2, K=4, Hq=4, Hkv=2, Dh=16, ctx=24, bs=4, T=3,
            E=8, k=2, I=32, latent=24, rows=8, moe_T=5, prefill=(11, 6, 1), chunk=4, V=64)
# The bars on an H200: memory-bound decode kernels at >= 70% of the device copy's bandwidth;
# the fused latent MoE (64 tokens) and the prefill SSD scan at >= 2x their torch paths.
TARGETS = {"ssd_update_": ("of_copy", 0.7), "conv_step_": ("of_copy", 0.7), "decode_attention": ("of_copy", 0.7),
           "grouped_experts": ("speedup", 2.0), "ssd_chunk_scan_varlen": ("speedup", 2.0)}
TOL = {torch.bfloat16: (3e-2, 3e-2), torch.float16: (4e-3, 4e-3), torch.float32: (1e-4, 1e-4)}


def _cases(d: dict, dev: str, act: torch.dtype):
    """(op, shape label, make() -> (args, kwargs) on fresh random tensors, indices of args updated in
    place, bytes the op must move at least, FLOPs it must do at least). FLOPs: a multiply-add counts 2,
    an exp, sigmoid or compare 1; SiLU 4 (exp, add, divide, multiply); 0 for pure data movement."""
    S, H, P, N, G, K, T = d["S"], d["H"], d["P"], d["N"], d["G"], d["K"], d["T"]
    d_inner = H * P
    conv = d_inner + 2 * G * N
    f32 = torch.float32
    a_sz = torch.tensor([], dtype=act).element_size()

    def r(*shape, dtype=act, scale=1.0):
        return (torch.randn(*shape, device=dev) * scale).to(dtype)

    def ssd_params():
        return (-torch.exp(torch.rand(H, device=dev) * 4 - 3), r(H, dtype=f32), torch.rand(H, device=dev) - 1.0)

    def ssd_update():
        A, D, bias = ssd_params()
        return (r(S, H, P, N, dtype=f32), r(S, H, P), r(S, H, scale=0.5), A, r(S, G, N), r(S, G, N), D, bias), {}

    def ssd_verify():
        A, D, bias = ssd_params()
        return (r(S, H, P, N, dtype=f32), r(S, T, H, P), r(S, T, H, scale=0.5), A, r(S, T, G, N), r(S, T, G, N),
                D, bias), {}

    def ssd_state_at():
        (state, x, dt, A, B, C, D, bias), _ = ssd_verify()
        _, cum, dtx = ops._FAST["ssd_verify"](state, x, dt, A, B, C, D, bias)
        return (state, cum, dtx, B, torch.randint(0, T, (S,), device=dev)), {}

    def conv_step():
        return (r(S, conv, K - 1).float(), r(S, conv), r(conv, K, dtype=f32, scale=0.5), r(conv, dtype=f32)), {}

    def conv_step_new():                                      # conv_step: new windows, the input left alone
        (states, x, w, b), kw = conv_step()
        return (x, states, w, b), kw

    def ssd_advance():                                        # the commit: S stacked states play the layers
        (state, cum, dtx, B, _), _ = ssd_state_at()
        return (state, cum, dtx, B, T - 1), {}

    def conv_update():
        return (r(S, T, conv), r(S, conv, K - 1).float(), r(conv, K, dtype=f32, scale=0.5), r(conv, dtype=f32)), {}

    def gated(rows):
        return lambda: ((r(rows, d_inner), r(rows, d_inner), r(d_inner, dtype=f32)),
                        dict(group_size=d_inner // G, eps=1e-5))

    def rms(rows):
        return lambda: ((r(rows, d["hidden"]), r(d["hidden"], dtype=f32), 1e-5), {})

    Hq, Hkv, Dh, ctx, bs = d["Hq"], d["Hkv"], d["Dh"], d["ctx"], d["bs"]
    per_seq = math.ceil((2 * ctx) / bs)

    def pool(nseq):
        blocks = nseq * per_seq + 1
        perm = torch.randperm(blocks, device=dev)
        tables = [perm[i * per_seq:(i + 1) * per_seq] for i in range(nseq)]
        return r(blocks, bs, Hkv, Dh), r(blocks, bs, Hkv, Dh), tables

    def decode_attn():
        kc, vc, tables = pool(S)
        positions = [ctx - 1 - (i % 7) for i in range(S)]
        return (r(S, Hq, Dh), r(S, Hkv, Dh), r(S, Hkv, Dh), kc, vc, tables, positions), {}

    def verify_attn():
        kc, vc, tables = pool(1)
        return (r(T, Hq, Dh), kc, vc, tables[0]), dict(start_pos=2 * ctx - T)

    E, k, inter, lat = d["E"], d["k"], d["I"], d["latent"]

    Tm = d["moe_T"]

    def moe():
        ids = torch.stack([torch.randperm(E, device=dev)[:k] for _ in range(Tm)])
        return (r(Tm, lat), torch.rand(Tm, k, device=dev), ids, r(E, inter, lat, scale=0.02),
                r(E, lat, inter, scale=0.02)), dict(first_expert=0)

    lens, V = d["prefill"], d["V"]
    Tp = sum(lens)
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=dev)

    def conv_prefill():
        return ((r(Tp, conv), r(conv, K, dtype=f32, scale=0.5), r(conv, dtype=f32), cu,
                 r(len(lens), conv, K - 1).float()), dict(max_seqlen=max(lens)))

    def conv_one():
        return (r(lens[0], conv), r(conv, K, dtype=f32, scale=0.5), r(conv, dtype=f32), r(conv, K - 1).float()), {}

    def kv_write():                                           # a prompt chunk into a shuffled block table
        kc, vc, tables = pool(1)
        return (kc, vc, r(lens[0], Hkv, Dh), r(lens[0], Hkv, Dh), tables[0], ctx - lens[0] // 2), {}

    def ssd_prefill():
        A, D, bias = ssd_params()
        return (r(Tp, H, P), r(Tp, H, scale=0.5), A, r(Tp, G, N), r(Tp, G, N), D, bias), dict(
            cu_seqlens=cu, chunk_size=d["chunk"], initial_states=r(len(lens), H, P, N, dtype=f32))

    def prefill_attn():
        n = math.ceil(max(lens) * 2 / bs)
        kc, vc = r(len(lens) * n + 1, bs, Hkv, Dh), r(len(lens) * n + 1, bs, Hkv, Dh)
        tables = torch.randperm(len(lens) * n, device=dev)[:len(lens) * n].view(len(lens), n)
        starts = torch.tensor([min(ln, n * bs - ln) for ln in lens], device=dev)   # some context cached before
        return (r(Tp, Hq, Dh), kc, vc, tables, starts, cu), dict(max_seqlen=max(lens))

    def verify_args(random):
        nd = torch.randint(0, T, (S,), device=dev)                                 # 0..k drafts each
        if not random:
            return (r(S, T, V), torch.randint(0, V, (S, T - 1), device=dev), nd), {}
        p, q = torch.softmax(r(S, T, V, dtype=f32), -1), torch.softmax(r(S, T - 1, V, dtype=f32), -1)
        drafts = torch.multinomial(q.view(-1, V), 1).view(S, T - 1)
        return (p, q, drafts, nd, torch.rand(S, T, device=dev)), {}

    state = S * H * P * N * 4
    experts = min(E, Tm * k)                                  # about: distinct experts the batch chooses
    lens_label = "+".join(map(str, lens))
    conv_bytes = 2 * S * conv * (K - 1) * 4 + 2 * S * conv * a_sz
    scan = 5 * S * H * P * N                                  # decay, dt x B, add; C . state
    verify = 2 * S * T * H * P * N + 2 * S * T * T * G * N + S * T * (T + 1) * H * P
    commit = S * H * P * N * (2 * T + 1)                      # decayed state + T decayed dt x B outer products
    silu = 4
    prefill_ctx = [min(ln, math.ceil(max(lens) * 2 / bs) * bs - ln) for ln in lens]   # as prefill_attn's starts
    return [
        ("ssd_update_", f"S{S} H{H} P{P} N{N}", ssd_update, (0,), 2 * state + 2 * S * d_inner * a_sz, scan),
        ("ssd_step", f"S{S} H{H} P{P} N{N}", ssd_update, (), 2 * state + 2 * S * d_inner * a_sz, scan),
        ("ssd_verify", f"S{S} T{T} H{H} P{P} N{N}", ssd_verify, (), state + S * T * d_inner * (2 * a_sz + 4), verify),
        ("ssd_state_at", f"S{S} T{T} H{H} P{P} N{N}", ssd_state_at, (), 2 * state + S * T * d_inner * 4, commit),
        ("ssd_advance_", f"L{S} T{T} H{H} P{P} N{N}", ssd_advance, (0,),
         2 * state + S * T * (H + d_inner + G * N) * 4, commit),
        ("conv_step_", f"S{S} C{conv} K{K}", conv_step, (0,), conv_bytes, S * conv * (2 * K + silu)),
        ("conv_step", f"S{S} C{conv} K{K}", conv_step_new, (), conv_bytes, S * conv * (2 * K + silu)),
        ("causal_conv1d_update", f"S{S} T{T} C{conv} K{K}", conv_update, (),
         S * conv * (K - 1) * 4 + S * T * conv * (K - 1 + 2) * a_sz, S * T * conv * (2 * K + silu)),
        ("causal_conv1d_varlen", f"lens {lens_label} C{conv} K{K}", conv_prefill, (),
         2 * Tp * conv * a_sz + len(lens) * conv * (K - 1) * (4 + a_sz), Tp * conv * (2 * K + silu)),
        ("causal_conv1d", f"L{lens[0]} C{conv} K{K}", conv_one, (),
         2 * lens[0] * conv * a_sz + conv * (K - 1) * (4 + a_sz), lens[0] * conv * (2 * K + silu)),
        ("gated_rms_norm", f"rows {S} D{d_inner} G{G}", gated(S), (), 3 * S * d_inner * a_sz, 9 * S * d_inner),
        ("gated_rms_norm", f"rows {d['rows']} D{d_inner} G{G}", gated(d["rows"]), (), 3 * d["rows"] * d_inner * a_sz,
         9 * d["rows"] * d_inner),
        ("rms_norm", f"rows {S} D{d['hidden']}", rms(S), (), 2 * S * d["hidden"] * a_sz, 4 * S * d["hidden"]),
        ("rms_norm", f"rows {d['rows']} D{d['hidden']}", rms(d["rows"]), (), 2 * d["rows"] * d["hidden"] * a_sz,
         4 * d["rows"] * d["hidden"]),
        ("write_kv", f"T{lens[0]} H{Hkv} Dh{Dh} bs{bs}", kv_write, (0, 1), 4 * lens[0] * Hkv * Dh * a_sz, 0),
        ("decode_attention", f"S{S} ctx~{ctx} H{Hq}/{Hkv} Dh{Dh} bs{bs}", decode_attn, (3, 4),
         2 * S * ctx * Hkv * Dh * a_sz + 2 * S * Hq * Dh * a_sz, S * Hq * ctx * (4 * Dh + 5)),
        ("paged_attention", f"T{T} ctx{2 * ctx} H{Hq}/{Hkv} Dh{Dh}", verify_attn, (),
         2 * 2 * ctx * Hkv * Dh * a_sz, T * Hq * 2 * ctx * (4 * Dh + 5)),
        ("grouped_experts", f"T{Tm} k{k} E{E} I{inter} latent{lat}", moe, (), experts * 2 * inter * lat * a_sz,
         Tm * k * (4 * inter * lat + 2 * inter + 2 * lat)),    # up and down GEMMs, relu², weighted sum
        ("ssd_chunk_scan_varlen", f"lens {lens_label} H{H} P{P} N{N} chunk{d['chunk']}", ssd_prefill,
         (), Tp * (2 * d_inner + 2 * G * N + H) * a_sz + 2 * len(lens) * H * P * N * 4,
         Tp * (6 * H * P * N + d["chunk"] * (2 * G * N + H * P))),   # B x, C . state, state passing; C B, its sum
        ("prefill_attention", f"lens {lens_label} H{Hq}/{Hkv} Dh{Dh} bs{bs}", prefill_attn, (),
         2 * Tp * Hq * Dh * a_sz + 2 * sum(2 * ln for ln in lens) * Hkv * Dh * a_sz,
         sum(Hq * (4 * Dh + 5) * (ln * st + ln * (ln + 1) // 2) for ln, st in zip(lens, prefill_ctx))),
        ("verify_greedy", f"S{S} k{T - 1} V{V}", lambda: verify_args(False), (), S * T * V * a_sz, S * T),
        ("verify_random", f"S{S} k{T - 1} V{V}", lambda: verify_args(True), (), S * (2 * T - 1) * V * 4,
         5 * S * T * V),                                      # p - q, max 0, sum, scale, cumulative sum
    ]


def _clone(v):
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, list):
        return [_clone(x) for x in v]
    return v


def _tensors(v):
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (tuple, list)):
        return [t for x in v for t in _tensors(x)]
    return []


def _check(op, make, mutated):
    """Largest |triton - reference| over the outputs and the in-place updated arguments; within tolerance?"""
    args, kw = make()
    ref_args = [_clone(a) for a in args]
    got = tk.OPS[op](*args, **kw)
    want = ops._REFERENCE[op](*ref_args, **kw)
    got_t = _tensors(got) + [args[i] for i in mutated]
    want_t = _tensors(want) + [ref_args[i] for i in mutated]
    err, ok = 0.0, True
    for a, b in zip(got_t, want_t):
        atol, rtol = TOL[a.dtype] if a.dtype in TOL else (0, 0)
        a, b = a.float(), b.float()
        err = max(err, (a - b).abs().max().item())
        ok = ok and bool(torch.allclose(a, b, atol=atol, rtol=rtol)) and not a.isnan().any().item()
    return err, ok


def _time_ms(fn, iters: int) -> float:
    """Median milliseconds of fn() over CUDA events (after warm-up and autotuning); wall clock on CPU."""
    if not CUDA:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs(nbytes: int = 1 << 30, iters: int = 20) -> float:
    """GB/s of a device-to-device copy of nbytes (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), iters)
    return 2 * nbytes / ms / 1e6


def matmul_tflops(n: int = 8192, iters: int = 20) -> float:
    """TFLOP/s of an n x n x n bfloat16 matmul: the device's dense peak as this run sees it."""
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n ** 3 / _time_ms(lambda: a @ b, iters) / 1e9


def _target(row: dict) -> str:
    """The issue's bar for this op (GPU only), and whether this run met it."""
    if row["op"] not in TARGETS or "error" in row or not CUDA:
        return "-"
    key, bar = TARGETS[row["op"]]
    got = row["of_copy"] if key == "of_copy" else row["torch_ms"] / row["triton_ms"]
    bar_text = f">= {bar:.0%} of copy" if key == "of_copy" else f">= {bar:g}x torch"
    return f"{bar_text}: {'met' if got >= bar else 'NOT met'}"


def kernel_part(iters: int = 50) -> dict:
    dev = "cuda" if CUDA else "cpu"
    dims, act = (SUPER, torch.bfloat16) if CUDA else (TINY, torch.float16)
    torch.manual_seed(0)
    copy = copy_bandwidth_gbs() if CUDA else None
    tflops = matmul_tflops() if CUDA else None
    rows = []
    cases = _cases(dims, dev, act)
    for op, shape, make, mutated, nbytes, flops in cases:
        row = dict(op=op, shape=shape, bytes=nbytes, flops=flops)
        try:
            row["max_err"], row["ok"] = _check(op, make, mutated)
            args, kw = make()
            row["triton_ms"] = _time_ms(lambda: tk.OPS[op](*args, **kw), iters)
            args, kw = make()
            row["torch_ms"] = _time_ms(lambda: ops._FAST[op](*args, **kw), iters)
            if CUDA:
                row["gbs"] = nbytes / row["triton_ms"] / 1e6
                row["of_copy"] = row["gbs"] / copy
                row["tflops"] = flops / row["triton_ms"] / 1e9
                row["of_matmul"] = row["tflops"] / tflops
        except Exception as e:                                   # report and go on to the next op
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        row["target"] = _target(row)
        rows.append(row)
    return dict(device=torch.cuda.get_device_name() if CUDA else f"CPU ({platform.machine()})",
                interpreter=bool(tk.INTERPRET), activations=str(act), copy_gbs=copy, matmul_tflops=tflops,
                rows=rows, ops_without_row=sorted(set(tk.OPS) - {c[0] for c in cases}))


def _table(result: dict) -> str:
    head = ["op", "shape", "max err", "ok", "triton ms", "torch ms", "speedup", "GB/s", "of copy", "TFLOP/s",
            "of bf16 matmul", "target"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"{r['op']} | {r['shape']} | error: {r['error']}")
            continue
        cells = [r["op"], r["shape"], f"{r['max_err']:.2e}", "yes" if r["ok"] else "NO",
                 f"{r['triton_ms']:.3f}", f"{r['torch_ms']:.3f}", f"{r['torch_ms'] / r['triton_ms']:.2f}x",
                 f"{r['gbs']:.0f}" if "gbs" in r else "-", f"{r['of_copy']:.0%}" if "of_copy" in r else "-",
                 f"{r['tflops']:.2f}" if r.get("flops") and "tflops" in r else "-",
                 f"{r['of_matmul']:.1%}" if r.get("flops") and "of_matmul" in r else "-", r["target"]]
        lines.append(" | ".join(cells))
    if result.get("ops_without_row"):
        lines.append(f"Triton ops without a row: {', '.join(result['ops_without_row'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=50, help="timed calls per op (median)")
    ap.add_argument("--out", default="gpu_check.json", help="JSON results")
    ap.add_argument("--skip-model", action="store_true", help="kernels only (no model forward, no engine)")
    args = ap.parse_args(argv)
    if not CUDA:
        print("No CUDA device: tiny shapes under Triton's interpreter (TRITON_INTERPRET=1). This checks that "
              "the kernels run and match; the times are the interpreter's, not a measurement.")
    t0 = time.perf_counter()
    result = kernel_part(args.iters)
    print(f"device: {result['device']}; activations {result['activations']}"
          + (f"; device copy {result['copy_gbs']:.0f} GB/s" if result["copy_gbs"] else "")
          + (f"; bf16 matmul {result['matmul_tflops']:.0f} TFLOP/s" if result["matmul_tflops"] else ""))
    print(_table(result))
    out = dict(kernels=result)
    ok = all(r.get("ok") for r in result["rows"])
    if not args.skip_model:
        from benchmarks.gpu_check_model import model_part, model_table
        try:
            out["model"] = model_part(CUDA)
            print(model_table(out["model"]))
            ok = ok and out["model"]["forward"]["argmax_agree"] >= 0.99
        except Exception as e:                                   # the kernel table still stands
            out["model"] = dict(error=f"{type(e).__name__}: {e}"[:500])
            print(f"model part failed: {out['model']['error']}")
            ok = False
    out["seconds"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out} ({out['seconds']:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
