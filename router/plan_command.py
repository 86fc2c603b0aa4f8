"""The `hybridserve plan` subcommand: how to deploy a model on some GPUs (or this CPU), by arithmetic alone.

It prints the stage split, which experts sit on which GPU, the weight memory per GPU, the cache bytes
of one sequence (KV at --max-model-len, Mamba conv + SSM state), the largest batch that fits, the
parameter counts and the Helm values to deploy with (`--output values` writes only those). The numbers
come from cluster/plan_report.py and cluster/planner.py (no torch, no checkpoint weights read).
Impossible layouts are refused with the reason and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from .serve_options import _speculative_tokens

GB = 10 ** 9


def _degree(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', found {text!r}") from None


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("plan", help="plan a deployment: stages, experts per GPU, memory, batch, Helm values",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Plan how a model is spread over GPUs (or this CPU) and what fits: the "
                                   "stage split, expert assignment, weight memory per GPU, cache bytes per "
                                   "sequence, the largest batch, parameter counts, Helm values.")
    m = p.add_argument_group("model")
    m.add_argument("--model", default="default",
                   help="preset name, checkpoint folder (with config.json), or 'default' (checkpoints/hybrid-mini)")
    m.add_argument("--max-model-len", type=int, default=2048, help="context length (prompt + output) to plan for")
    m.add_argument("--num-speculative-tokens", type=_speculative_tokens, default="auto",
                   help="MTP drafts per step, as `hybridserve serve` takes it: auto (3 with an MTP block, else 0), "
                        "or an integer (0: off)")
    m.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weights and KV cache (auto: float32 on a CPU, as the engine computes; bfloat16 on "
                        "GPUs); Mamba states are float32 whatever this is")
    h = p.add_argument_group("hardware")
    h.add_argument("--gpus", type=int, default=None,
                   help="GPUs per node (not given: plan for this host's CPU: one device, the engine's "
                        "host-memory budget)")
    h.add_argument("--gpu-memory-gb", type=float, default=None,
                   help="memory of one GPU in GB (10^9 bytes; e.g. 141 for an H200); default 80 with --gpus; "
                        "without --gpus: the CPU budget (default: half the free RAM, at most 2 GiB)")
    h.add_argument("--nodes", type=int, default=1, help="nodes of --gpus GPUs each")
    h.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of each device's memory that weights and caches may take")
    d = p.add_argument_group("parallel degrees")
    d.add_argument("--min-batch", type=int, default=32,
                   help="auto degrees: the smallest replica that holds this many sequences of --max-model-len "
                        "(else the smallest that holds one)")
    d.add_argument("--pipeline-parallel-size", "-pp", type=_degree, default=None, metavar="N|auto",
                   help="pipeline stages per replica (default auto)")
    d.add_argument("--expert-parallel-size", "-ep", type=_degree, default=None, metavar="N|auto",
                   help="expert shards per stage; must divide the routed experts (default auto)")
    o = p.add_argument_group("output")
    o.add_argument("--output", default="table", choices=["table", "json", "values"],
                   help="a readable report, JSON, or a Helm values file")
    o.add_argument("--output-file", default=None, metavar="PATH", help="write there instead of stdout")
    return p


def command_line(args) -> str:
    """The command that produced a plan, every option spelled out (the values file's header)."""
    argv = ["hybridserve", "plan", "--model", args.model]
    if args.gpus is not None:
        argv += ["--gpus", str(args.gpus), "--nodes", str(args.nodes)]
    if args.gpu_memory_gb is not None:
        argv += ["--gpu-memory-gb", f"{args.gpu_memory_gb:g}"]
    argv += ["--max-model-len", str(args.max_model_len), "--num-speculative-tokens", str(args.num_speculative_tokens),
             "-pp", "auto" if args.pipeline_parallel_size is None else str(args.pipeline_parallel_size),
             "-ep", "auto" if args.expert_parallel_size is None else str(args.expert_parallel_size),
             "--dtype", args.dtype, "--gpu-memory-utilization", f"{args.gpu_memory_utilization:g}",
             "--output", args.output]
    return shlex.join(argv)


def resolve_model(model: str):
    """(ModelConfig, whether serving would draft from a draft_vocab.json) without loading weights; a
    preset is planned from its shapes (the engine writes its random weights only when serving)."""
    from model_shards.config import ModelConfig
    from model_shards.presets import PRESETS

    from .engine_config import DEFAULT_CHECKPOINT, FALLBACK_PRESET

    if model == "default":
        if not (DEFAULT_CHECKPOINT / "config.json").exists():
            return PRESETS[FALLBACK_PRESET], False
        model = str(DEFAULT_CHECKPOINT)
    path = Path(model)
    if (path / "config.json").exists():
        return ModelConfig.from_json(path), (path / "draft_vocab.json").exists()
    if model in PRESETS:
        return PRESETS[model], False
    raise ValueError(f"model: {model!r} is neither a checkpoint folder (with config.json) nor a preset "
                     f"({', '.join(sorted(PRESETS))})")


def _gb(x: float) -> str:
    """Bytes in decimal units, as GPU memory is sold (141 GB H200)."""
    return next((f"{x / div:.2f} {u}" for u, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)) if x >= div), f"{x:.0f} B")


def _num(x: float) -> str:
    return next((f"{x / div:.2f}{u}" for u, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)) if x >= div), f"{x:.0f}")


def _columns(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[c])) for r in rows) for c in range(len(rows[0]))]
    return ["  " + "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]


def format_table(plan) -> str:
    d, hw, r = plan.to_dict(), plan.hardware, plan.replica
    dev, par, seq = r.devices, d["parameters"], d["per_sequence"]
    where = (f"this host's CPU ({plan.devices_per_replica} device(s), {_gb(dev.memory_bytes)} budget each)"
             if hw.cpu else f"{hw.nodes} node(s) x {hw.gpus_per_node} GPU(s) of {dev.memory_bytes / GB:g} GB")
    lines = [
        f"hybridserve plan: {plan.model} ({plan.cfg.name}) on {where}",
        f"  usable per device: {_gb(dev.usable_bytes)} (gpu_memory_utilization {hw.utilization:g})",
        f"  dtype: weights and KV cache {hw.dtype_name} ({hw.dtype_bytes} B); Mamba states (conv + SSM) and "
        f"verification scratch float32",
        f"  max_model_len {r.context_len}, num_speculative_tokens {r.num_speculative_tokens}, "
        f"block_size {r.block_size}",
        *(f"  note: {n}" for n in plan.notes), "",
        f"parameters: {_num(par['total'])} total, {_num(par['active'])} active per token "
        f"(+ MTP block {_num(par['mtp_total'])}, {_num(par['mtp_active'])} active)",
        f"  counted: {par['counted']}", "",
        f"layout: pp={plan.pp} x ep={plan.ep} = {plan.devices_per_replica} device(s) per replica, "
        + ("1 replica" if hw.cpu else f"{plan.nodes_per_replica} node(s) per replica, up to {plan.max_replicas} "
                                      f"replica(s) on {hw.num_gpus} GPU(s)"),
        *(f"  {w}" for w in plan.why), "",
        "stages (layers by kind):"]
    rows = [("stage", "layers", "mamba", "attention", "moe", "mlp", "carries", "weights on its device")]
    for s in d["stages"]:
        extras = "+".join(k for k in ("embedding", "head", "mtp") if s[k]) or "-"
        rows.append((s["stage"], f"{s['layers'][0]}-{s['layers'][1]}", s["mamba"], s["attention"], s["moe"],
                     s["mlp"], extras, _gb(s["weight_bytes"])))
    lines += _columns(rows) + ["", "devices of one replica (weights, caches at the largest batch):"]
    rows = [("device", "node/gpu", "stage", "role", "routed experts", "weights", "caches", "used / usable")]
    for g in d["gpus"]:
        used = g["weight_bytes"] + g["cache_bytes"]
        rows.append((g["device"], f"{g['node']}/{g['local']}", g["stage"], g["role"], g["experts"],
                     _gb(g["weight_bytes"]) + (f" (drafter {_gb(g['draft_bytes'])})" if g["draft_bytes"] else ""),
                     _gb(g["cache_bytes"]), f"{_gb(used)} / {_gb(g['usable_bytes'])}"))
    lines += _columns(rows) + [
        "", f"per sequence at max_model_len {r.context_len}:",
        f"  KV cache: {seq['kv_blocks']} blocks x {_gb(seq['kv_block_bytes'])} = {_gb(seq['kv_bytes'])} "
        f"({seq['attention_layers']} attention layers incl. MTP's, {hw.dtype_name}; {r.num_speculative_tokens} "
        f"drafting positions included)",
        f"  Mamba state: conv {_gb(seq['mamba_conv_bytes'])} + SSM {_gb(seq['mamba_ssm_bytes'])} = "
        f"{_gb(seq['mamba_state_bytes'])} ({seq['mamba_layers']} layers, float32); with the verification "
        f"scratch for {r.num_speculative_tokens + 1} position(s) a slot is {_gb(seq['mamba_slot_bytes'])}",
        f"  together: {_gb(seq['total_bytes'])} per sequence",
        f"largest batch: {plan.max_batch} concurrent sequences of {r.context_len} tokens; maxNumSeqs "
        f"{plan.max_num_seqs}" + (f" (capped at {plan.max_num_seqs})" if plan.max_batch > plan.max_num_seqs else ""),
        *(f"  a replica of pp={p} x ep={e} ({p * e} GPUs) would hold {b}" for p, e, b in plan.larger),
        *([f"  note: auto picks the smallest replica that holds --min-batch sequences; for more, give -pp/-ep of a larger one"]
          if plan.larger and plan.max_batch < 16 else []),
        "", "helm values (--output values):", *("  " + x for x in values_yaml(plan.helm_values()).splitlines())]
    return "\n".join(lines)


def _scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return f"{v:g}" if isinstance(v, float) else str(v)
    s = str(v)
    plain = s and all(c.isalnum() or c in "-_./" for c in s) and not s[0].isdigit() and s not in (
        "true", "false", "null", "yes", "no", "on", "off", "~")
    return s if plain else json.dumps(s)


def _resolve_drafts(k: int | str, cfg) -> int:
    """`auto` as the engine resolves it (router/engine_config.py): 3 drafts with an MTP block, else 0."""
    from router.engine_config import EngineConfig

    return EngineConfig(num_speculative_tokens=k).speculative_tokens_for(cfg.has_mtp)


def values_yaml(values: dict, indent: int = 0) -> str:
    """A nested dict as block-style YAML (the values file's keys are fixed: no YAML library needed)."""
    out = []
    for k, v in values.items():
        if isinstance(v, dict):
            out.append(" " * indent + f"{k}:")
            out.append(values_yaml(v, indent + 2))
        else:
            out.append(" " * indent + f"{k}: {'null' if v is None else _scalar(v)}")
    return "\n".join(out)


def cmd_plan(args) -> int:
    from cluster.plan_report import GB as _GB, Hardware, plan_deployment
    from cluster.planner import PlanError

    try:
        cfg, draft_vocab = resolve_model(args.model)
        if args.gpus is not None and args.gpus < 1:
            raise PlanError(f"gpus: must be >= 1, found {args.gpus} (leave --gpus out to plan for the CPU)")
        mem = None if args.gpu_memory_gb is None else int(args.gpu_memory_gb * _GB)
        hw = Hardware(gpus_per_node=args.gpus or 0, nodes=args.nodes, memory_bytes=mem,
                      utilization=args.gpu_memory_utilization, dtype=args.dtype)
        plan = plan_deployment(cfg, hw, model=args.model, pp=args.pipeline_parallel_size,
                               ep=args.expert_parallel_size, max_model_len=args.max_model_len,
                               num_speculative_tokens=_resolve_drafts(args.num_speculative_tokens, cfg),
                               draft_vocab=draft_vocab,
                               min_batch=1 if hw.cpu else args.min_batch)
    except (PlanError, ValueError) as e:     # PlanError, ParallelConfigError, ConfigError are ValueErrors
        reason = str(e).replace("\n", "\n  ")
        print(f"hybridserve plan: refused: {reason}", file=sys.stderr)
        return 2
    if args.output == "json":
        text = json.dumps(plan.to_dict(), indent=2) + "\n"
    elif args.output == "values":
        text = f"# {command_line(args)}\n" + values_yaml(plan.helm_values()) + "\n"
    else:
        text = format_table(plan) + "\n"
    if args.output_file:
        Path(args.output_file).write_text(text)
        print(f"wrote {args.output_file}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
