"""`hybridserve serve`: one command from nothing to an OpenAI-compatible HTTP + gRPC endpoint.

With no arguments it starts a local Ray cluster (or joins RAY_ADDRESS), deploys the default model and
serves http://127.0.0.1:8000/v1 and gRPC on 127.0.0.1:50051. Option names are vLLM's where vLLM has
the option. Ctrl-C / SIGTERM drains: new requests get 503, in-flight ones finish (up to
--drain-timeout seconds), then Serve and Ray shut down.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import threading
import time

from .serve_options import add_serve_parser, serve_args_from_dict, serve_config_from_args  # noqa: F401

log = logging.getLogger("hybridserve.cli")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hybridserve", description="Serve hybrid Mamba/attention/MoE models.")
    sub = ap.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    add_export_parser(sub)
    from .bench.command import add_parser as add_bench_parser
    add_bench_parser(sub)
    from .plan_command import add_parser as add_plan_parser
    add_plan_parser(sub)
    from .drain_command import add_parser as add_drain_parser
    add_drain_parser(sub)
    return ap


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
    if cfg.engine.use_ray:                   # a carrier these machines cannot run: say so now, not in a replica
        from cluster.replica_comm import transport_here
        from .engine_config import _gpus_available
        e = cfg.engine
        try:
            transport_here(e.transport, gpus=_gpus_available(), pp=e.pipeline_parallel_size, ep=e.expert_parallel_size)
        except ValueError as err:
            print(f"hybridserve serve: error: {err}", file=sys.stderr)
            if started:
                import ray
                ray.shutdown()
            return 2
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
