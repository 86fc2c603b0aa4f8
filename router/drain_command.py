"""`hybridserve drain`: stop taking requests and let the ones in flight finish, from outside the server.

Why a command: on Kubernetes the head pod's `preStop` hook runs it before the pod gets SIGTERM, so a
rolling upgrade or a node drain loses no request. It joins the running Ray cluster (RAY_ADDRESS or
the local one), and asks the application's ingress to drain: new requests get 503 and `/ready` turns
503 (the Service stops sending traffic), requests in flight run to the end for up to `--timeout`
seconds, and whatever is left then is aborted in its engine, not left generating.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def add_parser(sub) -> None:
    d = sub.add_parser("drain", help="refuse new requests and wait for in-flight ones (a preStop hook)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--app-name", default="hybridserve", help="Ray Serve application name")
    d.add_argument("--timeout", type=float, default=30.0, help="seconds to let in-flight requests finish")
    d.add_argument("--address", default="auto", help="Ray cluster address (auto: RAY_ADDRESS or the local one)")


def drain_app(app_name: str, timeout_s: float) -> int:
    """Drain `app_name` through its ingress; returns how many requests were aborted at the deadline."""
    from ray import serve

    handle = serve.get_app_handle(app_name)
    n = handle.in_flight.remote().result(timeout_s=10)
    print(f"draining {app_name!r}: {n} request(s) in flight, waiting up to {timeout_s:g}s", flush=True)
    t0 = time.monotonic()
    left = handle.drain.remote(timeout_s).result(timeout_s=timeout_s + 10)
    if left:
        print(f"drain timeout: aborted {left} request(s)", flush=True)
    else:
        print(f"drained in {time.monotonic() - t0:.1f}s", flush=True)
    return left


def cmd_drain(args) -> int:
    # A local cluster that `ray.init()` or `hybridserve serve` started uses token auth with the token in
    # ~/.ray/auth_token by default; Ray reads it for "auto" but not for an explicit address. Set before
    # Ray is imported: it reads the mode once.
    if "RAY_AUTH_MODE" not in os.environ and (Path.home() / ".ray" / "auth_token").exists():
        os.environ["RAY_AUTH_MODE"] = "token"
    import ray

    try:
        ray.init(address=args.address, namespace="serve", logging_level="ERROR", log_to_driver=False)
    except Exception as e:  # noqa: BLE001 - no cluster: nothing to drain
        print(f"hybridserve drain: no Ray cluster at {args.address!r} ({type(e).__name__}: {e})", file=sys.stderr)
        return 1
    try:
        drain_app(args.app_name, args.timeout)
    except Exception as e:  # noqa: BLE001
        print(f"hybridserve drain: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    return 0
