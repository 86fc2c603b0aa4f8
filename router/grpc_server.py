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
from .logprob_format import LogprobFormatter
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
    for field in ("max_tokens", "temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty",
                  "repetition_penalty", "min_p", "n"):
        if req.HasField(field):
            body[field] = getattr(req, field)
    if req.stop:
        body["stop"] = list(req.stop)
    if req.stop_token_ids:
        body["stop_token_ids"] = list(req.stop_token_ids)
    if req.logit_bias:
        body["logit_bias"] = {str(t): b for t, b in req.logit_bias.items()}
    _structured_fields(req, body)
    which = req.WhichOneof("input")
    if which == "chat":
        body["messages"] = [{"role": m.role, "content": m.content} for m in req.chat.messages]
        if req.HasField("logprobs"):
            body["logprobs"], body["top_logprobs"] = True, req.logprobs
        if req.echo:
            raise InvalidRequest("echo: only for a prompt (a completion), not chat", param="echo")
        return "chat", body
    if req.HasField("logprobs"):
        body["logprobs"] = req.logprobs
    if req.echo:
        body["echo"] = True
    if which == "prompt_token_ids":
        body["prompt"] = list(req.prompt_token_ids.ids)
    elif which == "prompt":
        body["prompt"] = req.prompt
    else:
        raise InvalidRequest("input: set one of prompt, prompt_token_ids or chat", param="input")
    return "completion", body


def _structured_fields(req: pb.GenerateRequest, body: dict) -> None:
    """The structured-output fields as the HTTP API's (response_format and vLLM's guided_*), so the
    same checks apply (two of them at once is a 400 there too)."""
    if req.json_schema:
        body["guided_json"] = req.json_schema
    if req.json_object:
        body["response_format"] = {"type": "json_object"}
    if req.regex:
        body["guided_regex"] = req.regex
    if req.choice:
        body["guided_choice"] = list(req.choice)
    if req.grammar:
        body["guided_grammar"] = req.grammar


def parse_request(req: pb.GenerateRequest) -> tuple[str, ChatCompletionRequest | CompletionRequest]:
    """A GenerateRequest validated exactly as the HTTP body would be (APIError 400 naming the field)."""
    kind, body = request_to_body(req)
    return kind, parse_body(ChatCompletionRequest if kind == "chat" else CompletionRequest, body)


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, fe: Frontend):
        self.fe = fe

    async def _start(self, request: pb.GenerateRequest, context, method: str) -> list:
        """The request's Generations, one per choice (n)."""
        t0 = time.perf_counter()
        rid = new_request_id("chat" if request.WhichOneof("input") == "chat" else "completion")
        route = f"gRPC {method}"
        try:
            self.fe.check_api_key(_api_key(context))
            kind, req = parse_request(request)
            prep = self.fe.prepare_chat(req) if kind == "chat" else self.fe.prepare_completion(req)
            return await self.fe.start_choices(rid, prep, route, t0)
        except APIError as e:
            self.fe.log_rejected(rid, route, e, t0)
            await _abort(context, e)

    async def Generate(self, request, context):
        gens = await self._start(request, context, "Generate")
        fmt = LogprobFormatter(self.fe.tokenizer)
        open_choices = len(gens)
        try:
            async for i, d in _interleave(gens):
                gen = gens[i]
                if d is _ECHO:              # the prompt first (completions' echo), with its logprobs if asked
                    yield pb.GenerateResponse(request_id=gen.request_id, text=gen.prep.echo_text, index=i,
                                              token_ids=gen.prep.prompt_ids,
                                              logprobs=_token_logprobs(fmt, gen.prep.prompt_ids[1:],
                                                                       gen.prompt_logprobs))
                    continue
                msg = pb.GenerateResponse(request_id=gen.request_id, text=d.text, token_ids=d.token_ids,
                                          finish_reason=d.finish_reason or "", index=i,
                                          logprobs=_token_logprobs(fmt, d.token_ids, d.logprobs))
                open_choices -= bool(d.finish_reason)
                if not open_choices:        # the request's last message: usage over every choice
                    msg.usage.CopyFrom(_usage_of(gens))
                yield msg
        except APIError as e:
            await _abort(context, e)
        finally:
            for g in gens:
                await g.aclose()

    async def Complete(self, request, context):
        gens = await self._start(request, context, "Complete")
        fmt = LogprobFormatter(self.fe.tokenizer)
        choices = [pb.Choice(index=i) for i in range(len(gens))]
        try:
            async for i, d in _interleave(gens):
                gen, c = gens[i], choices[i]
                if d is _ECHO:
                    c.text, c.token_ids[:] = gen.prep.echo_text, gen.prep.prompt_ids
                    c.logprobs.extend(_token_logprobs(fmt, gen.prep.prompt_ids[1:], gen.prompt_logprobs))
                    continue
                c.text += d.text
                c.token_ids.extend(d.token_ids)
                c.logprobs.extend(_token_logprobs(fmt, d.token_ids, d.logprobs))
                c.finish_reason = d.finish_reason or c.finish_reason
        except APIError as e:
            await _abort(context, e)
        finally:
            for g in gens:
                await g.aclose()
        first = choices[0]
        return pb.CompleteResponse(request_id=gens[0].request_id, model=gens[0].prep.model, text=first.text,
                                   token_ids=first.token_ids, finish_reason=first.finish_reason,
                                   usage=_usage_of(gens), prompt_token_ids=gens[0].prep.prompt_ids, choices=choices)

    async def ListModels(self, request, context):
        try:
            self.fe.check_api_key(_api_key(context))
        except APIError as e:
            await _abort(context, e)
        return pb.ListModelsResponse(models=[pb.Model(id=self.fe.model_name, max_model_len=self.fe.max_model_len or 0)])


_ECHO = object()       # _interleave's marker: choice i's echoed prompt goes before its first delta


async def _interleave(gens: list):
    """(choice index, Delta) of n Generations as they come; with echo, (i, _ECHO) before choice i's first
    delta (its prompt logprobs arrive with that delta's update)."""
    async def one(i, gen):
        first = True
        async for d in gen:
            if first and gen.prep.echo_text:
                await queue.put((i, _ECHO))
            first = False
            await queue.put((i, d))

    queue: asyncio.Queue = asyncio.Queue(maxsize=len(gens))
    tasks = [asyncio.create_task(one(i, g)) for i, g in enumerate(gens)]
    done = asyncio.gather(*tasks)
    try:
        while True:
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
                continue
            getter.cancel()
            while not queue.empty():
                yield queue.get_nowait()
            done.result()                       # a choice's error (APIError) is the request's
            return
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if done.done() and not done.cancelled():
            done.exception()                    # retrieved: a cancelled choice is no error to log


def _token_logprobs(fmt: LogprobFormatter, token_ids: list[int], entries: list | None) -> list:
    """Engine logprob entries ([logprob, top ids, top logprobs] per token) as TokenLogprob messages."""
    if not entries:
        return []
    return [pb.TokenLogprob(token_id=t, token=fmt.token(t), logprob=lp,
                            top_logprobs=[pb.TopLogprob(token_id=i, token=fmt.token(i), logprob=v)
                                          for i, v in zip(ids, lps)])
            for t, (lp, ids, lps) in zip(token_ids, entries)]


def _usage_of(gens: list) -> pb.Usage:
    """The prompt once, the completion tokens and MTP predictions of every choice."""
    preds = [g.prediction_tokens for g in gens if g.prediction_tokens is not None]
    summed = (sum(a for a, _ in preds), sum(r for _, r in preds)) if preds else None
    return _usage(gens[0].prompt_tokens, sum(g.completion_tokens for g in gens), summed)


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


class ReadinessHealth(health.aio.HealthServicer):
    """grpc.health.v1 whose Check answers the readiness of this moment (what HTTP /ready answers), so a
    probe right after a state change never reads a stale status; Watch streams follow the poll below."""

    def __init__(self, fe: Frontend):
        super().__init__()
        self.fe = fe
        self.ready: bool | None = None      # what was set last (None: nothing yet)

    async def set_ready(self, ok: bool) -> None:
        if ok == self.ready:
            return
        self.ready = ok
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.set("", status)
        await self.set(SERVICE_NAME, status)

    async def Check(self, request, context):
        if request.service in ("", SERVICE_NAME):
            await self.set_ready(await self.fe.ready())
        return await super().Check(request, context)


class GrpcServer:
    """Owns the grpc.aio server and keeps the health status in step with the backend's readiness."""

    def __init__(self, fe: Frontend, host: str, port: int, max_message_bytes: int = 8 * 1024 * 1024):
        self.fe = fe
        self.address = f"{host}:{port}"
        opts = [("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes), ("grpc.so_reuseport", 0)]
        self.server = grpc.aio.server(options=opts)
        pb_grpc.add_GenerationServicer_to_server(GenerationServicer(fe), self.server)
        self.health = ReadinessHealth(fe)
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
        while True:
            await self.health.set_ready(await self.fe.ready())
            await asyncio.sleep(0.5)

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._watch:
            self._watch.cancel()
        await self.server.stop(grace_s)
