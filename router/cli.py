"""`hybridserve serve`: one command from nothing to an OpenAI-compatible HTTP + gRPC endpoint.

With no arguments it starts a local Ray cluster (or joins RAY_ADDRESS), deploys the default model and
serves http://127.0.0.1:8000/v1 and gRPC on 127.0.0.1:50051. Option names are vLLM's where vLLM has
the option. Ctrl-C / SIGTERM drains: new requests get 503, in-flight ones finish (up to
--drain-timeout seconds), then Serve and Ray shut down.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
import time

log = logging.getLogger("hybridserve.cli")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hybridserve", description="Serve hybrid Mamba/attention/MoE models.")
    sub = ap.add_subparsers(dest="command", required=True)
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
                   help="dtype the MTP drafter computes in; auto: float16 on a CPU (verification keeps the "
                        "model's dtype, so outputs do not change)")
    m.add_argument("--no-draft-vocab", dest="draft_vocab", action="store_false",
                   help="greedy requests draft from the whole vocabulary, not only the checkpoint's draft_vocab.json")
    m.add_argument("--max-model-len", type=int, default=2048, help="context length (prompt + output)")
    m.add_argument("--max-num-seqs", type=int, default=16, help="sequences running at once per replica")
    m.add_argument("--model-process", action=argparse.BooleanOptionalAction, default=True,
                   help="with -pp 1 -ep 1: compute in a child process of the replica, so the model and the "
                        "replica's token streaming do not share one GIL (--no-model-process: a thread)")
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
    a.add_argument("--torch-threads", type=int, default=None, help="torch threads per replica (default: cores / max)")
    a.add_argument("--replica-num-gpus", type=float, default=None,
                   help="GPUs a model replica asks Ray for (default: 1 at -pp 1 -ep 1 when the Ray cluster has "
                        "GPUs, else 0; stage and expert actors take one GPU each)")
    n = s.add_argument_group("network")
    n.add_argument("--host", default="127.0.0.1", help="address for HTTP and gRPC (0.0.0.0: all interfaces)")
    n.add_argument("--port", type=int, default=8000, help="HTTP port")
    n.add_argument("--http-server", choices=("ingress", "proxy"), default="ingress",
                   help="who listens for HTTP: the ingress replica itself (one process hop less per token), "
                        "or Ray Serve's HTTP proxy")
    n.add_argument("--grpc-port", type=int, default=50051, help="gRPC port (0: no gRPC)")
    n.add_argument("--api-key", default=os.environ.get("HYBRIDSERVE_API_KEY"),
                   help="require 'Authorization: Bearer <key>' (env HYBRIDSERVE_API_KEY)")
    n.add_argument("--max-request-body-bytes", type=int, default=8 * 1024 * 1024, help="413 above this")
    n.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to let requests finish on shutdown")
    n.add_argument("--log-level", default=os.environ.get("HYBRIDSERVE_LOG_LEVEL", "INFO"),
                   help="our log level (env HYBRIDSERVE_LOG_LEVEL); INFO shows one line per request")
    n.add_argument("--app-name", default="hybridserve", help="Ray Serve application name")
    add_export_parser(sub)
    from .bench.command import add_parser as add_bench_parser
    add_bench_parser(sub)
    from .plan_command import add_parser as add_plan_parser
    add_plan_parser(sub)
    from .drain_command import add_parser as add_drain_parser
    add_drain_parser(sub)
    return ap


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
    ap = build_parser()
    serve_parser = next(a for a in ap._subparsers._group_actions[0].choices.values() if a.prog.endswith("serve"))
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
        elif isinstance(value, bool):
            raise ValueError(f"{key}: expected a value, got {value}")
        elif value is not None:
            argv += [opt, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return ap.parse_args(["serve", *argv])


def serve_config_from_args(args):
    from .engine_config import EngineConfig
    from .serve_app import ServeConfig

    pp, ep = args.pipeline_parallel_size, args.expert_parallel_size
    engine = EngineConfig(model=args.model, pipeline_parallel_size=pp, expert_parallel_size=ep,
                          num_speculative_tokens=args.num_speculative_tokens,
                          speculative_policy=args.speculative_policy, draft_dtype=args.draft_dtype,
                          draft_vocab=args.draft_vocab, max_num_seqs=args.max_num_seqs,
                          max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
                          block_size=args.block_size, max_queued_requests=args.max_queued_requests,
                          num_kv_blocks=args.num_gpu_blocks_override,
                          gpu_memory_utilization=args.gpu_memory_utilization, use_ray=pp * ep > 1, seed=args.seed,
                          model_process=args.model_process)
    engine.validate()
    if not 0.0 < args.target_kv_cache_usage <= 1.0:
        raise ValueError(f"--target-kv-cache-usage: must be in (0, 1], got {args.target_kv_cache_usage}")
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
                       replica_num_gpus=args.replica_num_gpus,
                       http_server=args.http_server)


def needed_cpus(cfg) -> float:
    """Logical CPUs the deployment asks Ray for at full scale (the ingress asks for none)."""
    e = cfg.engine
    actors = e.pipeline_parallel_size * e.expert_parallel_size if e.use_ray else 0
    return cfg.max_replicas * (cfg.replica_num_cpus + actors * e.actor_num_cpus) + 1


def start_ray(cfg, num_cpus: float | None) -> bool:
    """Join RAY_ADDRESS or start a local cluster; returns True when we started it (and must stop it)."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        print(f"joining the Ray cluster at {os.environ['RAY_ADDRESS']}", flush=True)
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return False
    patient_startup()
    cpus = num_cpus or max(os.cpu_count() or 1, needed_cpus(cfg))
    print(f"starting a local Ray cluster ({cpus:g} logical CPUs)", flush=True)
    ray.init(num_cpus=math.ceil(max(1, cpus)), include_dashboard=False, log_to_driver=True,
             configure_logging=True, logging_level=logging.WARNING)
    return True


# Serve gives its HTTP proxy three 5-second tries to answer its first health check and then fails the
# whole deployment; on a busy machine (a compile job on every core) that is not enough. Our own
# processes load weights in threads and answer quickly; the proxy just needs patience. Set before
# ray.init: the local cluster's processes inherit this environment. Values a user set win.
PATIENT_SERVE_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",
                     "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": "10"}
# Ray's GCS keeps the events of the last 100k tasks for its dashboard; every request is a few Serve
# tasks, so under steady traffic the GCS grows for hours before it levels off. 10k is plenty for
# debugging a local cluster. (Our per-pass actor calls record none: cluster/actors.py.)
BOUNDED_RAY_ENV = {"RAY_task_events_max_num_task_in_gcs": "10000"}


# Serve's defaults hop threads on every streamed item: replica code runs in a second event loop (each
# yielded token crosses loops) and a handle's router in another. Our replicas never block their loop
# (weights load in a thread, passes run in the executor), so one loop per process is safe and cheaper:
# benchmarks/serve_profile.py measures the difference.
SERVE_ONE_LOOP_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


def patient_startup() -> None:
    for k, v in {**PATIENT_SERVE_ENV, **BOUNDED_RAY_ENV, **SERVE_ONE_LOOP_ENV}.items():
        os.environ.setdefault(k, v)


def deploy(cfg) -> None:
    """serve.start + serve.run, printing progress until the application is RUNNING."""
    from ray import serve
    from ray.serve.schema import LoggingConfig

    from .serve_app import build_application, start_serve

    start_serve(cfg, LoggingConfig(enable_access_log=False, log_level="WARNING"))
    logging.getLogger("ray.serve").setLevel(logging.WARNING)   # our own banner says where we listen
    app = build_application(cfg)
    errors: list[BaseException] = []
    done = threading.Event()

    def run():
        try:
            serve.run(app, name=cfg.app_name, route_prefix="/",
                      logging_config=LoggingConfig(enable_access_log=False, log_level="WARNING"))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
        finally:
            done.set()

    threading.Thread(target=run, daemon=True, name="serve-run").start()
    t0, last = time.monotonic(), ""
    while not done.wait(2.0):
        line = _progress(cfg.app_name)
        if line and line != last:
            print(f"[{time.monotonic() - t0:5.0f}s] {line}", flush=True)
            last = line
    if errors:
        raise errors[0]


def _ray_address() -> str:
    import ray

    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - only informative
        return "?"


def _progress(app_name: str) -> str:
    from ray import serve

    try:
        app = serve.status().applications.get(app_name)
    except Exception:  # noqa: BLE001
        return ""
    if app is None:
        return "deploying..."
    parts = []
    for name, d in app.deployments.items():
        counts = ", ".join(f"{n} {str(s).split('.')[-1].lower()}" for s, n in d.replica_states.items())
        parts.append(f"{name}: {counts or str(d.status).split('.')[-1].lower()}")
    return "waiting for replicas (loading weights) - " + "; ".join(parts)


def wait_for_signal() -> int:
    stop = threading.Event()
    received = []

    def handler(signum, _frame):
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    while not stop.wait(1.0):
        pass
    return received[0]


def drain_and_stop(cfg, started_ray: bool, timeout_s: float) -> None:
    """Drain through the ingress, then stop Serve and (if ours) Ray, never hanging past the timeout.

    A signal sent to the whole process group (systemd, some terminals) also reaches Ray's own
    processes; Serve calls would then block forever, so they run in a thread with a deadline.
    """
    import ray
    from ray import serve

    def drain_and_shutdown():
        from .drain_command import drain_app

        try:
            drain_app(cfg.app_name, timeout_s)
        except Exception as e:  # noqa: BLE001 - shut down regardless
            print(f"drain failed ({type(e).__name__}: {e}); shutting down", flush=True)
        serve.shutdown()

    dead = _dead_ray_processes() if started_ray else []
    if dead:
        print(f"Ray's own processes got the signal too ({', '.join(dead)} stopped): cannot drain", flush=True)
    else:
        worker = threading.Thread(target=drain_and_shutdown, daemon=True, name="drain")
        worker.start()
        worker.join(timeout_s + 30)
        if worker.is_alive():
            print("Ray is not answering; stopping it", flush=True)
    if started_ray:
        stopper = threading.Thread(target=ray.shutdown, daemon=True, name="ray-shutdown")
        stopper.start()
        stopper.join(10 if dead else 30)
        if stopper.is_alive():          # a half-dead cluster: do not let atexit hooks hang the exit
            print("stopped (Ray did not shut down cleanly)", flush=True)
            os._exit(0)
    print("stopped", flush=True)


def _dead_ray_processes() -> list[str]:
    """Names of the local Ray processes (raylet, gcs_server, ...) that have exited."""
    try:
        import ray._private.worker as w

        time.sleep(0.2)          # let a group-wide signal land first
        return sorted({name for name, _ in w._global_node.dead_processes()})
    except Exception:  # noqa: BLE001 - private API: assume alive
        return []


def cmd_serve(args) -> int:
    from .serve_app import setup_logging

    try:
        cfg = serve_config_from_args(args)
    except ValueError as e:
        print(f"hybridserve serve: error: {e}", file=sys.stderr)
        return 2
    setup_logging(args.log_level.upper())
    started = start_ray(cfg, args.num_cpus)
    try:
        deploy(cfg)
    except BaseException as e:  # noqa: BLE001
        print(f"hybridserve serve: deployment failed: {type(e).__name__}: {e}", file=sys.stderr)
        from ray import serve
        serve.shutdown()
        if started:
            import ray
            ray.shutdown()
        return 1
    from .serve_app import default_served_name

    host = cfg.host if cfg.host not in ("0.0.0.0", "::") else "127.0.0.1"
    print(f"\nhybridserve is serving {default_served_name(cfg)!r}\n"
          f"  OpenAI API  http://{host}:{cfg.port}/v1   (chat: POST /v1/chat/completions)\n"
          + (f"  gRPC        {host}:{cfg.grpc_port}   (hybridserve.v1.Generation, health, reflection)\n"
             if cfg.grpc_port else "")
          + f"  health      http://{host}:{cfg.port}/health, /ready, /metrics\n"
          f"  replicas    {cfg.min_replicas}..{cfg.max_replicas} (autoscaling)\n"
          f"  ray         {_ray_address()}   (hybridserve drain --address ...)\n"
          f"Press Ctrl-C to stop.\n", flush=True)
    signum = wait_for_signal()
    print(f"\n{signal.Signals(signum).name} received", flush=True)
    drain_and_stop(cfg, started, args.drain_timeout)
    return 0


def add_export_parser(sub) -> None:
    e = sub.add_parser("export", help="write a checkpoint in another format (GGUF for llama.cpp)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--gguf", required=True, metavar="OUT.gguf",
                   help="write a GGUF file in llama.cpp's nemotron_h_moe layout (without the MTP block)")
    e.add_argument("--model", default="default", help="checkpoint folder (HF layout), preset name, or 'default'")
    e.add_argument("--outtype", default="auto", choices=["auto", "f32", "f16", "bf16"],
                   help="dtype of the weight matrices (auto: the checkpoint's; norms, router, conv, A, D stay f32)")
    e.add_argument("--seed", type=int, default=0, help="random-weight seed of a preset")


def cmd_export(args) -> int:
    from model_shards.gguf_export import GGUFExportError, export_gguf
    from model_shards.weights import CheckpointError

    from .engine_config import resolve_checkpoint

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        r = export_gguf(resolve_checkpoint(args.model, args.seed), args.gguf, outtype=args.outtype)
    except (GGUFExportError, CheckpointError, ValueError) as e:
        print(f"hybridserve export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {r.path} ({r.arch}, {r.outtype}, {len(r.tensors)} tensors, {r.nbytes / 1e6:.1f} MB)")
    for note in r.notes:
        print(f"  note: {note}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "export":
        return cmd_export(args)
    if args.command == "drain":
        from .drain_command import cmd_drain
        return cmd_drain(args)
    if args.command == "bench":
        from .bench.command import cmd_bench
        return cmd_bench(args)
    if args.command == "plan":
        from .plan_command import cmd_plan
        return cmd_plan(args)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
