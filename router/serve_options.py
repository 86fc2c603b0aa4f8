"""The options of `hybridserve serve`, in one place for the CLI and for Serve config files.

`add_serve_parser` defines them (vLLM's names where vLLM has the option); `serve_args_from_dict` parses a
mapping of them (a Serve config's `args`, which the Helm chart renders) with that same parser; and
`serve_config_from_args` turns either into the validated ServeConfig the application is built from.
"""
from __future__ import annotations

import argparse
import json
import os

from cluster.replica_comm import TRANSPORTS

from .reasoning_parser import REASONING_PARSERS
from .tool_call_parser import TOOL_CALL_PARSERS


def add_serve_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser("serve", help="serve a model over OpenAI-compatible HTTP and gRPC",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = s.add_argument_group("model and engine")
    m.add_argument("--model", default="default",
                   help="checkpoint folder (HF layout) or preset name; 'default' is checkpoints/hybrid-mini "
                        "(or the random-weight 'small' preset when that is absent)")
    m.add_argument("--served-model-name", default=None, help="name clients use (default: the model's name)")
    m.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    m.add_argument("--expert-parallel-size", "-ep", type=int, default=1)
    m.add_argument("--num-speculative-tokens", type=_speculative_tokens, default="auto",
                   help="MTP drafts per step at most (auto: 3 when the checkpoint has an MTP block, else 0; 0: off)")
    m.add_argument("--speculative-policy", choices=("adaptive", "fixed"), default="adaptive",
                   help="adaptive: each step drafts per sequence what pays on this deployment (router/spec_policy.py); "
                        "fixed: k drafts every step")
    m.add_argument("--draft-dtype", default="auto", choices=["auto", "model", "float32", "float16", "bfloat16"],
                   help="dtype the MTP drafter computes in; auto: on a CPU the model's own weights where they "
                        "are exactly bfloat16 (read at half the bytes), else float16 (verification keeps the "
                        "model's dtype, so outputs do not change)")
    m.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and KV cache (Mamba states stay float32); auto: float32 on a CPU, the "
                        "checkpoint's dtype on GPUs")
    m.add_argument("--model-niceness", type=int, default=-10,
                   help="nice value the model's processes ask for (the child process at -pp 1 -ep 1, stage and "
                        "expert actors otherwise): -20..19, lower runs first; needs root or CAP_SYS_NICE, else "
                        "unchanged (0: leave it)")
    m.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where a single-process replica (-pp 1 -ep 1) runs the model; auto: cuda when torch sees "
                        "a GPU (Ray stage actors use the GPU Ray gives them)")
    m.add_argument("--enforce-eager", action="store_true",
                   help="never use CUDA graphs (vLLM's name): by default decode passes on a GPU replay graphs "
                        "of their Mamba and MLP blocks (model_shards/cuda_graphs.py); no effect on a CPU")
    m.add_argument("--no-draft-vocab", dest="draft_vocab", action="store_false",
                   help="greedy requests draft from the whole vocabulary, not only the checkpoint's draft_vocab.json")
    m.add_argument("--transport", choices=TRANSPORTS, default="auto",
                   help="how a Ray replica's actors move hidden states and expert tokens: auto (nccl4py on GPUs, "
                        "torch's NCCL where nccl4py is not installed; ray on CPUs), ray (object store, a Ray call per MoE "
                        "layer), or gloo / nccl / nccl4py collectives (docs/SERVING.md)")
    m.add_argument("--max-model-len", type=int, default=2048, help="context length (prompt + output)")
    m.add_argument("--max-num-seqs", type=int, default=16, help="sequences running at once per replica")
    m.add_argument("--model-process", action=argparse.BooleanOptionalAction, default=True,
                   help="with -pp 1 -ep 1: compute in a child process of the replica, so the model and the "
                        "replica's token streaming do not share one GIL (--no-model-process: a thread)")
    m.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="with -pp 1 -ep 1: plan each decode step while the one before it runs, its input the "
                        "token that one samples, so the model never waits for the engine loop between passes "
                        "(router/scheduler.py, look-ahead; tokens are the same either way)")
    m.add_argument("--max-num-batched-tokens", type=int, default=512, help="token budget of one engine step")
    m.add_argument("--max-queued-requests", type=int, default=64,
                   help="requests waiting per replica before new ones get 429 + Retry-After")
    m.add_argument("--block-size", type=int, default=16, help="KV-cache block size in tokens")
    m.add_argument("--num-gpu-blocks-override", type=int, default=None,
                   help="KV blocks per attention layer per replica, instead of what memory allows (vLLM's name; "
                        "also on a CPU): makes cache pressure reproducible")
    m.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of each device's memory (on a CPU: of the replica's memory budget) that weights "
                        "and caches may take")
    m.add_argument("--seed", type=int, default=0)
    a = s.add_argument_group("replicas and autoscaling")
    a.add_argument("--min-replicas", type=int, default=1)
    a.add_argument("--max-replicas", type=int, default=1)
    a.add_argument("--target-ongoing-requests", type=float, default=None,
                   help="autoscaling target per replica (default: --max-num-seqs)")
    a.add_argument("--autoscaling-policy", choices=("engine", "ongoing"), default="engine",
                   help="engine: scale on the most loaded of ongoing requests, running + waiting sequences "
                        "and KV-cache usage (router/autoscaling.py); ongoing: Ray Serve's default policy")
    a.add_argument("--target-kv-cache-usage", type=float, default=0.8,
                   help="engine policy: mean KV-cache usage per replica to aim for (0..1]")
    a.add_argument("--autoscaling-config", type=json.loads, default={},
                   help='JSON overrides of Ray Serve\'s autoscaling_config, e.g. \'{"downscale_delay_s": 60}\'')
    a.add_argument("--num-cpus", type=float, default=None,
                   help="logical CPUs of the local Ray cluster (default: max(cores, what the replicas need))")
    a.add_argument("--torch-threads", type=int, default=None, help="torch threads of the replica process (default: cores / --max-replicas) and, when "
                        "given, of its model at -pp 1 -ep 1 (its child process; default 1: on a small machine "
                        "a second thread competes with the serving path, docs/SERVING.md)")
    a.add_argument("--replica-num-gpus", type=float, default=None,
                   help="GPUs a model replica asks Ray for (default: 1 at -pp 1 -ep 1 when the Ray cluster has "
                        "GPUs, else 0; stage and expert actors take one GPU each)")
    n = s.add_argument_group("network")
    n.add_argument("--host", default="127.0.0.1", help="address for HTTP and gRPC (0.0.0.0: all interfaces)")
    n.add_argument("--port", type=int, default=8000, help="HTTP port")
    n.add_argument("--http-server", choices=("ingress", "proxy"), default="ingress",
                   help="who listens for HTTP: the ingress replica itself (one process hop less per token), "
                        "or Ray Serve's HTTP proxy")
    n.add_argument("--stream-interval", type=_stream_interval, default=None, metavar="{auto,N}",
                   help="tokens a model replica sends the ingress per message (the first and last at once): "
                        "N, or auto (default): 1, plus 1 per 16 running sequences, up to 4 (router/stream_pacing.py)")
    n.add_argument("--grpc-port", type=int, default=50051, help="gRPC port (0: no gRPC)")
    n.add_argument("--api-key", default=os.environ.get("HYBRIDSERVE_API_KEY"),
                   help="require 'Authorization: Bearer <key>' (env HYBRIDSERVE_API_KEY)")
    n.add_argument("--max-request-body-bytes", type=int, default=8 * 1024 * 1024, help="413 above this")
    n.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to let requests finish on shutdown")
    n.add_argument("--log-level", default=os.environ.get("HYBRIDSERVE_LOG_LEVEL", "INFO"),
                   help="our log level (env HYBRIDSERVE_LOG_LEVEL); INFO shows one line per request")
    n.add_argument("--app-name", default="hybridserve", help="Ray Serve application name")
    c = s.add_argument_group("chat output (vLLM's parsers; docs/SERVING.md)")
    c.add_argument("--reasoning-parser", choices=tuple(REASONING_PARSERS), default=None,
                   help="return <think>...</think> text of chat completions as reasoning_content (default: none, "
                        "all text is content)")
    c.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, default=None,
                   help="enable `tools` with tool_choice auto: Qwen3-Coder / Nemotron 3 XML tool calls in the "
                        "output become tool_calls (default: none, a request with tools is a 400)")
    c.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted for vLLM command lines: auto tool choice is on whenever --tool-call-parser is set")
    return s


def _speculative_tokens(text: str):
    """--num-speculative-tokens: 'auto' or an integer >= 0."""
    if text == "auto":
        return text
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 0, got {text!r}") from None
    if k < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {k}")
    return k


def serve_args_from_dict(options: dict) -> argparse.Namespace:
    """`hybridserve serve` options given as a mapping (a Serve config file's `args`), parsed by the CLI's
    own parser. Keys are long option names (dashes or underscores); True/False toggle flags."""
    ap = argparse.ArgumentParser(prog="hybridserve")
    serve_parser = add_serve_parser(ap.add_subparsers(dest="command", required=True))
    known = {a.dest: a for a in serve_parser._actions if a.option_strings and a.dest != "help"}
    flags = {s.lstrip("-").replace("-", "_"): a for a in serve_parser._actions for s in a.option_strings
             if s.startswith("--") and a.dest != "help" and not s.startswith("--no-")}

    def fail(message):
        raise ValueError(f"invalid serve options: {message}")
    serve_parser.error = fail
    argv = []
    for key, value in options.items():
        name = str(key).replace("-", "_")
        action = flags.get(name) or known.get(name)
        if action is None:
            raise ValueError(f"{key}: not a `hybridserve serve` option (known: {', '.join(sorted(known))})")
        opt = next(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(opt if value else "--no-" + opt[2:])
        elif isinstance(action, argparse._StoreFalseAction):      # --no-draft-vocab: draft_vocab=False
            if value is False or value is None:
                argv.append(opt)
        elif isinstance(action, argparse._StoreTrueAction):       # --enable-auto-tool-choice, --enforce-eager
            if value:
                argv.append(opt)
        elif isinstance(value, bool):
            raise ValueError(f"{key}: expected a value, got {value}")
        elif value is not None:
            argv += [opt, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return ap.parse_args(["serve", *argv])


def _stream_interval(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected auto or an integer >= 1, got {text!r}")
    return n


def serve_config_from_args(args):
    from .engine_config import EngineConfig
    from .serve_app import ServeConfig

    pp, ep = args.pipeline_parallel_size, args.expert_parallel_size
    engine = EngineConfig(model=args.model, pipeline_parallel_size=pp, expert_parallel_size=ep,
                          num_speculative_tokens=args.num_speculative_tokens,
                          speculative_policy=args.speculative_policy, draft_dtype=args.draft_dtype, dtype=args.dtype,
                          draft_vocab=args.draft_vocab, max_num_seqs=args.max_num_seqs,
                          max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
                          block_size=args.block_size, max_queued_requests=args.max_queued_requests,
                          num_kv_blocks=args.num_gpu_blocks_override,
                          gpu_memory_utilization=args.gpu_memory_utilization, use_ray=pp * ep > 1, seed=args.seed,
                          model_process=args.model_process, device=args.device, transport=args.transport,
                          model_niceness=args.model_niceness, async_scheduling=args.async_scheduling,
                          cuda_graphs=not args.enforce_eager)
    engine.validate()
    if not 0.0 < args.target_kv_cache_usage <= 1.0:
        raise ValueError(f"--target-kv-cache-usage: must be in (0, 1], got {args.target_kv_cache_usage}")
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice: needs --tool-call-parser")
    if not 1 <= args.min_replicas <= args.max_replicas:
        raise ValueError(f"--min-replicas/--max-replicas: need 1 <= min ({args.min_replicas}) <= max "
                         f"({args.max_replicas})")
    return ServeConfig(engine=engine, app_name=args.app_name, served_model_name=args.served_model_name,
                       api_key=args.api_key, host=args.host, port=args.port, grpc_port=args.grpc_port,
                       min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                       target_ongoing_requests=args.target_ongoing_requests,
                       autoscaling_policy=args.autoscaling_policy, target_kv_cache_usage=args.target_kv_cache_usage,
                       autoscaling_overrides=args.autoscaling_config, max_body_bytes=args.max_request_body_bytes,
                       torch_threads=args.torch_threads, log_level=args.log_level.upper(),
                       replica_num_gpus=args.replica_num_gpus, http_server=args.http_server,
                       reasoning_parser=args.reasoning_parser, tool_call_parser=args.tool_call_parser,
                       stream_interval=args.stream_interval)
