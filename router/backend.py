"""How the front door reaches an engine: `LocalBackend` (the engine in this process).

A backend has three async methods:
- `submit(request_id, prompt_ids, params)`: admit the request or raise an `APIError` (queue full ->
  429, prompt too long -> 400) *before* any token exists, so a streaming client still gets a proper
  status code; then return its `RequestStream` (request_stream.py). Closing it early (client gone,
  stop string hit) aborts the request in the engine, which frees its KV blocks and Mamba slot.
- `stats()`: the latest `EngineStats` per replica (for /metrics and /ready).
- `ready()`: weights loaded and the engine loop alive.

The Ray Serve backend (model replicas behind a DeploymentHandle) lives in `serve_app.py` and follows
the same shape, so the HTTP and gRPC code is the same in tests, in a single process and in a cluster.
"""
from __future__ import annotations

import json
from pathlib import Path
from model_shards.sampling_params import SamplingParams

from .errors import APIError, InvalidRequest, Overloaded, Unavailable
from .outputs import EngineDeadError, EngineStats, QueueFullError
from .request_stream import RequestStream


def admit(engine, request_id: str, prompt_ids: list[int], params: SamplingParams):
    """engine.add_request with engine exceptions translated to client errors."""
    try:
        return engine.add_request(request_id, prompt_ids, params)
    except QueueFullError as e:
        raise Overloaded(str(e), retry_after_s=e.retry_after_s) from None
    except EngineDeadError as e:
        raise Unavailable(f"the engine is down: {e}", retry_after_s=5) from None
    except ValueError as e:
        msg = str(e)
        param = msg.split(":", 1)[0] if ":" in msg and " " not in msg.split(":", 1)[0] else None
        raise InvalidRequest(msg, param=param) from None


def engine_ready(engine) -> bool:
    """A completion would be served: the loop is alive, the actors are up, and passes come back."""
    return engine.is_stepping


def model_info(engine) -> dict:
    """What the front door needs to know about the model: limits, special ids, generation defaults."""
    cfg = engine.model_config
    folder = Path(engine.folder) if getattr(engine, "folder", None) else None
    gen = {}
    if folder is not None and (folder / "generation_config.json").exists():
        gen = json.loads((folder / "generation_config.json").read_text())
    eos = gen.get("eos_token_id", cfg.eos_token_id)
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    name = cfg.name if cfg.name and cfg.name != "custom" else (folder.name if folder is not None else "model")
    return {
        "name": name,
        "folder": str(folder) if folder is not None else None,
        "max_model_len": int(engine.max_model_len),
        "vocab_size": int(cfg.vocab_size),
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "eos_token_ids": list(eos_ids),
        "generation_defaults": generation_defaults(gen),
        "num_speculative_tokens": int(getattr(engine.config, "num_speculative_tokens", 0)),
    }


def generation_defaults(gen: dict) -> dict:
    """Request defaults from generation_config.json (vLLM does the same): sampling settings, the default
    output length, and `do_sample: false` meaning greedy unless the request sets a temperature."""
    out = {k: gen[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty", "min_p",
                                      "max_new_tokens") if k in gen}
    if gen.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


class LocalBackend:
    """The engine in this process (tests, and the replica side of the Ray Serve deployment)."""

    def __init__(self, engine, replica_id: str = "local"):
        self.engine = engine
        self.replica_id = replica_id

    async def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        return admit(self.engine, request_id, prompt_ids, params)

    async def stats(self) -> dict[str, EngineStats]:
        return {self.replica_id: self.engine.stats()}

    async def ready(self) -> bool:
        return engine_ready(self.engine)

    async def info(self) -> dict:
        return model_info(self.engine)


def error_from_dict(d: dict) -> APIError:
    """Rebuild an APIError sent as plain data across a process boundary (Ray Serve replica -> ingress)."""
    from . import errors

    cls = getattr(errors, d.get("cls", "APIError"), errors.APIError)
    if not (isinstance(cls, type) and issubclass(cls, errors.APIError)):
        cls = errors.APIError
    return cls(d["message"], param=d.get("param"), status=d.get("status"), retry_after_s=d.get("retry_after_s"))


def error_to_dict(e: APIError) -> dict:
    return {"cls": type(e).__name__, "message": e.message, "param": e.param, "status": e.status,
            "retry_after_s": e.retry_after_s}
