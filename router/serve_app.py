"""The Ray Serve application: an ingress deployment (HTTP + gRPC) in front of autoscaled model replicas.

    Ingress (1 replica)                         ModelServer (min..max replicas, autoscaled)
      FastAPI app (Serve's HTTP proxy)  ──handle──▶  AsyncEngine (weights, scheduler, executor)
      gRPC server on its own port        stream=True   reports EngineStats to the StatsHub
      tokenizer, chat template, stop strings, metrics

Why this split: tokenizing, templating, detokenizing and the HTTP/gRPC protocol work are cheap and
stateless, so one ingress serves all replicas; each model replica owns an engine (and, with pipeline
or expert parallelism, its stage/expert actors). Load is spread by the DeploymentHandle's router
(power of two choices on ongoing requests), and Serve's autoscaler adds replicas when ongoing requests
per replica pass `target_ongoing_requests`.

Admission goes first: a replica answers a `generate` stream with `{"admitted": ...}` or `{"error":
...}` before any token, so queue-full becomes a real 429 even for streaming clients. Ending a request
early is one path (request_stream.py): the ingress closes its RequestStream, which cancels the handle's
stream; Serve cancels the replica's generator, whose `async with` closes the engine's RequestStream,
which aborts the request in the engine.

Engine stats (for /metrics and /ready) come from every replica, not just the one a handle call would
reach: replicas push them twice a second to a small named actor (StatsHub) that the ingress reads.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import ray
from ray import serve

from model_shards.sampling_params import SamplingParams

from .backend import LocalBackend, error_from_dict, error_to_dict, model_info
from .engine_config import EngineConfig
from .errors import APIError, Overloaded, Unavailable
from .outputs import EngineStats, RequestOutput
from .request_stream import RequestStream
from .stream_pacing import min_interval_s, paced, tokens_per_message

log = logging.getLogger("hybridserve.serve")

# A replica whose stats are older than this is not counted as ready: 20 reports missed (every 0.5 s), so a
# replica kept off the CPU for a few seconds on a loaded machine is not taken for a dead one.
STATS_MAX_AGE_S = 10.0
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "special_tokens_map.json", "generation_config.json")


@dataclasses.dataclass
class ServeConfig:
    """Everything `hybridserve serve` decides; plain data so it travels to replicas."""

    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    app_name: str = "hybridserve"
    served_model_name: str | None = None
    api_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 50051               # 0: no gRPC server
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float | None = None    # None: max_num_seqs
    autoscaling_policy: str = "engine"   # engine: router/autoscaling.py's signals; ongoing: Serve's default
    target_kv_cache_usage: float = 0.8   # engine policy: mean KV-cache usage per replica to aim for
    autoscaling_overrides: dict = dataclasses.field(default_factory=dict)
    max_body_bytes: int = 8 * 1024 * 1024
    http_server: str = "ingress"         # ingress: the ingress replica listens itself; proxy: Serve's HTTP proxy
    replica_num_cpus: float = 0.5        # Ray scheduling label of a model replica (threads are separate)
    replica_num_gpus: float | None = None  # GPUs a model replica itself asks for; None: 1 at pp*ep == 1 on a GPU cluster
    torch_threads: int | None = None     # per model replica; None: cores / max_replicas
    log_level: str = "INFO"
    reasoning_parser: str | None = None  # --reasoning-parser / --tool-call-parser: chat output (chat_output.py)
    tool_call_parser: str | None = None
    stream_interval: int | None = None   # tokens per replica->ingress message; None: by load (stream_pacing.py)

    def autoscaling_config(self) -> dict:
        cfg = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
               "initial_replicas": self.min_replicas,
               "target_ongoing_requests": self.target_ongoing_requests or self.engine.max_num_seqs,
               "upscale_delay_s": 5.0, "downscale_delay_s": 30.0, "metrics_interval_s": 1.0,
               "look_back_period_s": 5.0}
        if self.autoscaling_policy == "engine" and self.max_replicas > self.min_replicas:
            from .autoscaling import POLICY_PATH

            cfg["policy"] = {"policy_function": POLICY_PATH, "policy_kwargs": {
                "target_sequences": float(self.engine.max_num_seqs),
                "target_kv_usage": self.target_kv_cache_usage}}
        cfg.update(self.autoscaling_overrides)
        return cfg


def setup_logging(level: str = "INFO") -> None:
    """Our loggers to stderr, one readable line each (Ray forwards replica stderr to the driver)."""
    root = logging.getLogger("hybridserve")
    root.setLevel(level)
    if not any(getattr(h, "_hybridserve", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        h._hybridserve = True
        root.addHandler(h)
        root.propagate = False


@ray.remote(num_cpus=0)
class StatsHub:
    """The latest EngineStats of every model replica, with the time each was reported."""

    def __init__(self):
        self.reports: dict[str, tuple[float, dict]] = {}

    def report(self, replica_id: str, stats: dict) -> None:
        self.reports[replica_id] = (time.time(), stats)

    def forget(self, replica_id: str) -> None:
        self.reports.pop(replica_id, None)

    def snapshot(self, max_age_s: float = STATS_MAX_AGE_S) -> dict[str, dict]:
        now = time.time()
        return {r: s for r, (t, s) in self.reports.items() if now - t <= max_age_s}


def _hub_name(app_name: str) -> str:
    return f"{app_name}-stats-hub"


class ModelServer:
    """A model replica: one AsyncEngine. Methods are called through a DeploymentHandle."""

    async def __init__(self, cfg: ServeConfig):
        setup_logging(cfg.log_level)
        self.engine = None                     # set once the weights are loaded (the destructor checks)
        self._reporter = None
        threads = cfg.torch_threads or max(1, (os.cpu_count() or 1) // max(1, cfg.max_replicas))
        import torch

        torch.set_num_threads(threads)
        from .engine import AsyncEngine

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.hub_name = _hub_name(cfg.app_name)
        self.stream_interval = cfg.stream_interval
        log.info("model replica %s: loading %r (torch threads %d)", self.replica_id, cfg.engine.model, threads)
        loop = asyncio.get_running_loop()
        # Weights load in a thread so the replica's event loop keeps answering Serve's health checks.
        engine_cfg = cfg.engine
        if cfg.torch_threads and not engine_cfg.use_ray:    # the model's own threads (its child process)
            engine_cfg = dataclasses.replace(engine_cfg, torch_threads=cfg.torch_threads)
        self.engine = await loop.run_in_executor(None, AsyncEngine, engine_cfg)
        await self.engine.start()
        self.backend = LocalBackend(self.engine, self.replica_id)
        self._reporter = asyncio.create_task(self._report_stats())
        log.info("model replica %s ready", self.replica_id)

    async def generate(self, request_id: str, prompt_ids: list[int], params: dict):
        """Stream: first {"admitted": replica} or {"error": ...}, then RequestOutput dicts.

        However this generator ends (finished, cancelled by the ingress, the caller gone), `async with`
        closes the engine stream, which aborts the request if it is still running.
        """
        try:
            stream = await self.backend.submit(request_id, prompt_ids, SamplingParams.from_dict(params))
        except APIError as e:
            yield {"error": error_to_dict(e)}
            return
        async with stream:
            yield {"admitted": self.replica_id}
            running, setting = self.engine.scheduler.running, self.stream_interval
            want = lambda: tokens_per_message(setting, len(running))       # noqa: E731
            async for out in paced(stream, want, min_interval_s(setting)):
                yield dataclasses.asdict(out)

    async def info(self) -> dict:
        return model_info(self.engine)

    async def tokenizer_files(self) -> dict[str, bytes]:
        folder = Path(self.engine.folder)
        return {n: (folder / n).read_bytes() for n in TOKENIZER_FILES if (folder / n).exists()}

    async def stats(self) -> dict:
        return dataclasses.asdict(self.engine.stats())

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Engine load for Serve's autoscaler (router/autoscaling.py), sent with each metrics push."""
        from .autoscaling import engine_autoscaling_stats

        return engine_autoscaling_stats(self.engine.stats()) if self.engine is not None else {}

    async def check_health(self) -> None:
        """Serve restarts a replica whose engine loop died or stalled (no pass back for twice the stall
        timeout while busy: a hung actor), or whose actors could not be rebuilt. A rebuild in progress
        is not a death."""
        e = self.engine
        if e is not None and e.is_running and e.stats_.healthy and e.stall_seconds > 2 * e.config.stall_timeout_s:
            raise RuntimeError(f"engine stalled: no pass came back for {e.stall_seconds:.0f}s")
        if self.engine is not None and not self.engine.is_running:
            raise RuntimeError("engine loop is not running")
        if self.engine is not None and self.engine.broken:
            raise RuntimeError("the replica's actors could not be rebuilt")

    async def _report_stats(self) -> None:
        hub = None
        while True:
            try:
                if hub is None:
                    hub = ray.get_actor(self.hub_name)
                hub.report.remote(self.replica_id, dataclasses.asdict(self.engine.stats()))
            except Exception:  # noqa: BLE001 - the ingress may not have created the hub yet
                hub = None
            await asyncio.sleep(0.5)

    async def __del__(self):
        """Serve stops the replica (scale-down, shutdown), possibly while it still loads weights."""
        if self._reporter is not None:
            self._reporter.cancel()
        try:
            ray.get_actor(self.hub_name).forget.remote(self.replica_id)
        except Exception:  # noqa: BLE001 - the hub may be gone already
            pass
        if self.engine is not None:
            await self.engine.shutdown()


def replica_stream(request_id: str, gen) -> RequestStream:
    """A request's outputs from a model replica's `generate` stream; closing it cancels the handle's
    stream (and so the replica's generator, which aborts the engine request)."""

    async def next_output() -> RequestOutput:
        try:
            return RequestOutput(**await gen.__anext__())
        except StopAsyncIteration:
            raise
        except Exception as e:  # noqa: BLE001 - the replica died mid-request: a finished output
            return RequestOutput(request_id, [], "error",
                                 error=f"engine failure: model replica lost: {type(e).__name__}: {e}")

    return RequestStream(request_id, next_output, gen.cancel)


class ServeBackend:
    """The Frontend's backend inside the ingress: model replicas behind a DeploymentHandle."""

    def __init__(self, handle, hub):
        self.handle = handle.options(stream=True)
        self.plain = handle
        self.hub = hub

    async def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams):
        from ray.serve.exceptions import BackPressureError

        gen = self.handle.generate.remote(request_id, prompt_ids, params.to_dict())
        try:
            first = await gen.__anext__()
        except asyncio.CancelledError:  # the client left while waiting for admission: end it there too
            gen.cancel()
            raise
        except BackPressureError as e:
            raise Overloaded(f"queue is full: every model replica is busy and {e.args[1]} request(s) already wait "
                             f"for one; retry later", retry_after_s=e.retry_after_s or 1.0) from None
        except StopAsyncIteration:
            raise Unavailable("the model replica closed the request before admitting it", retry_after_s=1) from None
        except Exception as e:  # noqa: BLE001 - a replica died or is unreachable
            raise Unavailable(f"no model replica could take the request: {type(e).__name__}: {e}",
                              retry_after_s=2) from None
        if "error" in first:
            raise error_from_dict(first["error"])
        return replica_stream(request_id, gen)

    async def stats(self) -> dict[str, EngineStats]:
        snap = await self.hub.snapshot.remote()
        return {r: EngineStats(**s) for r, s in snap.items()}

    async def ready(self) -> bool:
        """Some replica reported, recently, an engine that is stepping (loop alive, actors up)."""
        snap = await self.hub.snapshot.remote()
        return any(s.get("healthy") and s.get("stepping", True) for s in snap.values())


def default_served_name(cfg: ServeConfig) -> str:
    """--served-model-name, else the preset name, else the checkpoint folder's name ("hybrid-mini")."""
    from model_shards.presets import PRESETS

    from .engine_config import DEFAULT_CHECKPOINT, FALLBACK_PRESET

    model = cfg.engine.model
    if cfg.served_model_name:
        return cfg.served_model_name
    if model == "default":
        return DEFAULT_CHECKPOINT.name if (DEFAULT_CHECKPOINT / "config.json").exists() else FALLBACK_PRESET
    if model in PRESETS:
        return model
    return Path(model).resolve().name


@serve.ingress()
class Ingress:
    """HTTP (via Serve's proxy) and gRPC (own server) front door. One replica: it owns the gRPC port.

    It comes up without waiting for the model replicas (so /health answers while weights load) and
    fetches the model's limits and tokenizer from a replica in the background; until then generation
    requests and /ready answer 503 with Retry-After.
    """

    async def __init__(self, model_handle, cfg: ServeConfig):
        from .frontend import Frontend
        from .grpc_server import GrpcServer

        setup_logging(cfg.log_level)
        self.cfg = cfg
        self.hub = StatsHub.options(name=_hub_name(cfg.app_name), get_if_exists=True).remote()
        name = default_served_name(cfg)
        aliases = tuple(a for a in (cfg.engine.model, "default") if "/" not in a)
        if cfg.engine.model == "default":       # the README's name works even while the preset stands in
            from .engine_config import DEFAULT_CHECKPOINT
            aliases += (DEFAULT_CHECKPOINT.name,)
        self.fe = Frontend(ServeBackend(model_handle, self.hub), None, None, served_model_name=name, aliases=aliases,
                           api_key=cfg.api_key, reasoning_parser=cfg.reasoning_parser,
                           tool_call_parser=cfg.tool_call_parser)
        self.grpc = self.http = None
        if cfg.http_server == "ingress":
            from .http_app import build_app
            from .http_server import HttpServer

            self.http = HttpServer(build_app(self.fe, cfg.max_body_bytes), cfg.host, cfg.port)
            await self.http.start()
        if cfg.grpc_port:
            self.grpc = GrpcServer(self.fe, cfg.host, cfg.grpc_port, cfg.max_body_bytes)
            await self.grpc.start()
        self._loader = asyncio.create_task(self._load_model(model_handle))

    async def _load_model(self, model_handle) -> None:
        from .frontend import ModelInfo
        from .tokenizer import load_tokenizer

        while True:
            try:
                info = ModelInfo.from_dict(await model_handle.info.remote())
                folder = info.folder
                if not folder or not Path(folder).exists():      # the replica runs on another node
                    files = await model_handle.tokenizer_files.remote()
                    folder = tempfile.mkdtemp(prefix="hybridserve-tok-")
                    for fname, data in files.items():
                        Path(folder, fname).write_bytes(data)
                tokenizer = load_tokenizer(folder, vocab_size=info.vocab_size, bos_token_id=info.bos_token_id,
                                           eos_token_id=info.eos_token_id, pad_token_id=info.pad_token_id)
                break
            except Exception as e:  # noqa: BLE001 - replicas may be restarting; keep trying
                log.warning("ingress: cannot get the model's info yet (%s: %s); retrying", type(e).__name__, e)
                await asyncio.sleep(2.0)
        self.fe.set_model(info, tokenizer)
        log.info("ingress ready: serving %r as %r (max_model_len %d, %s)", info.name, self.fe.model_name,
                 info.max_model_len, type(tokenizer).__name__)

    async def model_name(self) -> str:
        return self.fe.model_name

    def __serve_build_asgi_app__(self):
        from .http_app import build_app

        return build_app(self.fe, self.cfg.max_body_bytes)

    async def drain(self, timeout_s: float) -> int:
        """Refuse new requests (503), wait for in-flight ones up to `timeout_s`, then abort the rest
        (their engine requests end, so nothing keeps generating); returns how many were aborted."""
        self.fe.draining = True
        deadline = time.monotonic() + timeout_s
        while self.fe.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return await self.fe.abort_all("drain timeout")

    async def in_flight(self) -> int:
        return self.fe.in_flight

    async def __del__(self):
        """Ingress shutdown: open requests are aborted in their replicas, not left generating."""
        self._loader.cancel()
        self.fe.draining = True
        await self.fe.abort_all("ingress shutting down")
        if self.grpc is not None:
            await self.grpc.stop(1.0)
        if self.http is not None:
            await self.http.stop()


def start_serve(cfg: ServeConfig, logging_config=None) -> None:
    """serve.start for `cfg.http_server`: Serve's HTTP proxy on cfg.port, or no proxy (the ingress
    replica listens on cfg.port itself)."""
    if cfg.http_server == "proxy":
        serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config=logging_config)
    else:
        serve.start(proxy_location="Disabled", logging_config=logging_config)


def replica_gpus(cfg: ServeConfig) -> dict:
    """Ray options for a model replica's GPU: at pp*ep == 1 the replica computes itself and needs one
    (with pipeline or expert parallelism its stage and expert actors take one each instead)."""
    gpus = cfg.replica_num_gpus
    if gpus is None:
        on_gpus = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
        gpus = 1.0 if on_gpus and not cfg.engine.use_ray else 0.0
    return {"num_gpus": gpus} if gpus else {}


def build_application(cfg: ServeConfig):
    """The bound Serve application for `serve.run`."""
    e = cfg.engine
    model = serve.deployment(
        ModelServer, name="ModelServer",
        autoscaling_config=cfg.autoscaling_config(),
        # The engine queues (and rejects past max_queued_requests) itself; Serve sends it up to that many.
        max_ongoing_requests=e.max_num_seqs + e.max_queued_requests,
        max_queued_requests=max(1, e.max_queued_requests),
        ray_actor_options={"num_cpus": cfg.replica_num_cpus, **replica_gpus(cfg)},
        health_check_period_s=5, health_check_timeout_s=30,
        graceful_shutdown_timeout_s=30, graceful_shutdown_wait_loop_s=1,
    )
    # The ingress sits on the head node: its gRPC server (and in ingress mode its HTTP server) is where
    # `hybridserve serve` and a Kubernetes Service (which selects the head pod) expect it.
    ingress_resources = {"node:__internal_head__": 0.001}
    ingress = serve.deployment(
        Ingress, name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": 0, "resources": ingress_resources},
        max_ongoing_requests=10_000,
        graceful_shutdown_timeout_s=30,
    )
    return ingress.bind(model.bind(cfg), cfg)


def app_builder(args: dict):
    """The Serve application from a config file (`serve run`, `serve deploy`, KubeRay's serveConfigV2).

    `args` holds `hybridserve serve` options by their long names, dashes or underscores, e.g.
    `{"model": "/models/x", "pipeline_parallel_size": 2, "model_process": false}`; they are parsed by the
    very parser the CLI uses, so the two cannot drift and a bad value fails with the CLI's message.
    """
    from .serve_options import serve_args_from_dict, serve_config_from_args

    cfg = serve_config_from_args(serve_args_from_dict(args or {}))
    setup_logging(cfg.log_level)
    return build_application(cfg)
