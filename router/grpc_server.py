"""The gRPC front door (grpc.aio): `Generate` (server streaming), `Complete`, `ListModels`, plus the
standard `grpc.health.v1.Health` service and server reflection.

Requests are converted to the OpenAI request models and go through the same `Frontend` as HTTP, so
validation, limits, stop strings, metrics and per-request logs are shared. A client that cancels (or
whose deadline passes) cancels the handler task; closing the Generation aborts the engine request.

Why our own grpc.aio server instead of Ray Serve's gRPC proxy: Serve's proxy routes by its own
metadata (`application`), and offers neither `grpc.health.v1` for our service nor reflection, which
grpcurl and Kubernetes gRPC probes expect. Our server runs on the ingress replica's event loop, next
to the HTTP app, and shares its Frontend.
"""
from __future__ import annotations

import asyncio
import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .api_schemas import ChatCompletionRequest, CompletionRequest, parse_body
from .errors import APIError, InvalidRequest
from .frontend import Frontend, new_request_id
from .proto import hybridserve_pb2 as pb
from .proto import hybridserve_pb2_grpc as pb_grpc

log = logging.getLogger("hybridserve.grpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name


def request_to_body(req: pb.GenerateRequest) -> tuple[str, dict]:
    """A GenerateRequest as an OpenAI body dict ("chat" or "completion"), for the shared validation: the
    same limits as HTTP (`api_schemas.LIMITS`) apply, whatever the proto's field types can carry (a
    uint32 min_tokens, a float32 NaN temperature)."""
    body: dict = {"model": req.model or None, "ignore_eos": req.ignore_eos, "min_tokens": req.min_tokens,
                  "skip_special_tokens": not req.skip_special_tokens_off}
    for field in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        if req.HasField(field):
            body[field] = getattr(req, field)
    if req.stop:
        body["stop"] = list(req.stop)
    if req.stop_token_ids:
        body["stop_token_ids"] = list(req.stop_token_ids)
    which = req.WhichOneof("input")
    if which == "chat":
        body["messages"] = [{"role": m.role, "content": m.content} for m in req.chat.messages]
        return "chat", body
    if which == "prompt_token_ids":
        body["prompt"] = list(req.prompt_token_ids.ids)
    elif which == "prompt":
        body["prompt"] = req.prompt
    else:
        raise InvalidRequest("input: set one of prompt, prompt_token_ids or chat", param="input")
    return "completion", body


def parse_request(req: pb.GenerateRequest) -> tuple[str, ChatCompletionRequest | CompletionRequest]:
    """A GenerateRequest validated exactly as the HTTP body would be (APIError 400 naming the field)."""
    kind, body = request_to_body(req)
    return kind, parse_body(ChatCompletionRequest if kind == "chat" else CompletionRequest, body)


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, fe: Frontend):
        self.fe = fe

    async def _start(self, request: pb.GenerateRequest, context, method: str):
        t0 = time.perf_counter()
        rid = new_request_id("chat" if request.WhichOneof("input") == "chat" else "completion")
        route = f"gRPC {method}"
        try:
            self.fe.check_api_key(_api_key(context))
            kind, req = parse_request(request)
            prep = self.fe.prepare_chat(req) if kind == "chat" else self.fe.prepare_completion(req)
            return await self.fe.start(rid, prep, route, t0)
        except APIError as e:
            self.fe.log_rejected(rid, route, e, t0)
            await _abort(context, e)

    async def Generate(self, request, context):
        gen = await self._start(request, context, "Generate")
        try:
            async for d in gen:
                msg = pb.GenerateResponse(request_id=gen.request_id, text=d.text, token_ids=d.token_ids,
                                          finish_reason=d.finish_reason or "")
                if d.finish_reason:
                    msg.usage.CopyFrom(_usage(d.prompt_tokens, d.completion_tokens, gen.prediction_tokens))
                yield msg
        except APIError as e:
            await _abort(context, e)
        finally:
            await gen.aclose()

    async def Complete(self, request, context):
        gen = await self._start(request, context, "Complete")
        text, ids, finish = [], [], ""
        try:
            async for d in gen:
                text.append(d.text)
                ids.extend(d.token_ids)
                finish = d.finish_reason or finish
        except APIError as e:
            await _abort(context, e)
        finally:
            await gen.aclose()
        return pb.CompleteResponse(request_id=gen.request_id, model=gen.prep.model, text="".join(text), token_ids=ids,
                                   finish_reason=finish,
                                   usage=_usage(gen.prompt_tokens, gen.completion_tokens, gen.prediction_tokens),
                                   prompt_token_ids=gen.prep.prompt_ids)

    async def ListModels(self, request, context):
        try:
            self.fe.check_api_key(_api_key(context))
        except APIError as e:
            await _abort(context, e)
        return pb.ListModelsResponse(models=[pb.Model(id=self.fe.model_name, max_model_len=self.fe.max_model_len or 0)])


def _usage(p: int, c: int, predictions: tuple[int, int] | None = None) -> pb.Usage:
    """Token counts; `predictions` (accepted, rejected) MTP drafts when the request verified any."""
    u = pb.Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)
    if predictions is not None:
        u.accepted_prediction_tokens, u.rejected_prediction_tokens = predictions
    return u


def _api_key(context) -> str | None:
    md = {k.lower(): v for k, v in (context.invocation_metadata() or ())}
    auth = md.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return md.get("x-api-key") or None


async def _abort(context, err: APIError):
    if err.retry_after_s is not None:
        context.set_trailing_metadata((("retry-after", err.headers()["Retry-After"]),))
    await context.abort(err.grpc_code, err.message)


class GrpcServer:
    """Owns the grpc.aio server and keeps the health status in step with the backend's readiness."""

    def __init__(self, fe: Frontend, host: str, port: int, max_message_bytes: int = 8 * 1024 * 1024):
        self.fe = fe
        self.address = f"{host}:{port}"
        opts = [("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes), ("grpc.so_reuseport", 0)]
        self.server = grpc.aio.server(options=opts)
        pb_grpc.add_GenerationServicer_to_server(GenerationServicer(fe), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)
        self.port = self.server.add_insecure_port(self.address)
        if self.port == 0:
            raise RuntimeError(f"gRPC: cannot bind {self.address}")
        self._watch: asyncio.Task | None = None

    async def start(self) -> None:
        await self.server.start()
        self._watch = asyncio.create_task(self._watch_ready())
        log.info("gRPC listening on %s", self.address)

    async def _watch_ready(self) -> None:
        last = None
        while True:
            ok = await self.fe.ready()
            if ok != last:
                status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
                await self.health.set("", status)
                await self.health.set(SERVICE_NAME, status)
                last = ok
            await asyncio.sleep(0.5)

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._watch:
            self._watch.cancel()
        await self.server.stop(grace_s)
