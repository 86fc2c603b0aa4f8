"""The OpenAI-compatible HTTP API: a FastAPI app built around a `Frontend`.

`build_app(frontend)` is used as-is in tests and single-process serving (uvicorn) and as the
`@serve.ingress` app of the Ray Serve ingress deployment. Two pieces sit outside FastAPI's routing,
as a plain ASGI middleware, because they must act before a handler reads anything: the request-body
size limit (413, also for chunked bodies without Content-Length) and the API key (401 on `/v1/*` and
vLLM's `/tokenize`, `/detokenize`; `/health`, `/ready` and `/metrics` stay open for probes and scrapers).

Client disconnects: a streaming response's generator is cancelled by Starlette (or by Ray Serve's
proxy) and closing the Generation aborts the engine request; a non-streaming request races its
generation against `http.disconnect`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from . import responses as R
from .api_schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, parse_body, parse_tokenize
from .errors import APIError, InternalError, InvalidRequest, NotFound, RequestTooLarge, reason_phrase
from .choices import Choices, merge_bodies, merge_chunks
from .frontend import Frontend, Generation, new_request_id
from .logprob_format import LogprobFormatter, joined
from .metrics import CONTENT_TYPE
from .openapi import install_openapi

log = logging.getLogger("hybridserve.http")
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
OPEN_PATHS = ("/health", "/ready", "/metrics", "/openapi.json")


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.to_json(), status_code=err.status, headers=err.headers())


class GuardMiddleware:
    """Body-size limit and API key, before any handler runs."""

    def __init__(self, app, frontend: Frontend, max_body_bytes: int):
        self.app, self.fe, self.max_body_bytes = app, frontend, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        if not path.startswith(OPEN_PATHS):
            try:
                self.fe.check_api_key(_bearer(headers))
            except APIError as e:
                self.fe.metrics.observe_rejected(e.status)
                return await error_response(e)(scope, receive, send)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = headers.get("content-length")
        too_large = RequestTooLarge(f"body: the request body exceeds the limit of {self.max_body_bytes} bytes")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            self.fe.metrics.observe_rejected(413)
            return await error_response(too_large)(scope, receive, send)
        # Buffer the body (bounded), then replay it; later receive() calls see the disconnect.
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                self.fe.metrics.observe_rejected(413)
                return await error_response(too_large)(scope, receive, send)
            if not msg.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def _bearer(headers: dict[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get("x-api-key") or None


def build_app(fe: Frontend, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, lifespan=None) -> FastAPI:
    """`lifespan`: an async context manager factory (e.g. start/stop an in-process engine)."""
    app = FastAPI(title="hybridserve", docs_url=None, redoc_url=None, openapi_url="/openapi.json", lifespan=lifespan)
    install_openapi(app)                # the real request/response bodies (handlers read the raw Request)
    app.add_middleware(GuardMiddleware, frontend=fe, max_body_bytes=max_body_bytes)
    app.state.frontend = fe

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, err: APIError):
        return error_response(err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(InternalError(f"internal error: {type(exc).__name__}: {exc}"))

    @app.exception_handler(404)
    async def _not_found(request: Request, _exc):
        return error_response(NotFound(f"no route {request.method} {request.url.path}"))

    @app.exception_handler(405)
    async def _bad_method(request: Request, _exc):
        return error_response(APIError(f"method {request.method} is not allowed on {request.url.path}",
                                       status=405, code="method_not_allowed"))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if await fe.ready():
            return {"status": "ready", "model": fe.model_name}
        return JSONResponse({"status": "not ready", "model": fe.model_name}, status_code=503,
                            headers={"Retry-After": "5"})

    @app.get("/metrics")
    async def metrics():
        try:
            fe.metrics.set_engine_stats(await fe.backend.stats())
        except Exception:  # noqa: BLE001 - request metrics are still worth serving
            pass
        return Response(fe.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return R.models_list(fe.model_name, fe.created, fe.max_model_len)

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        fe.check_model(model_id)
        return R.model_card(fe.model_name, fe.created, fe.max_model_len)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(fe, request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(fe, request, "completion")

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return fe.tokenize(parse_tokenize(await _read_json(request)))

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return fe.detokenize(parse_body(DetokenizeRequest, await _read_json(request)))

    return app


async def _generate(fe: Frontend, request: Request, kind: str):
    t0 = time.perf_counter()
    rid = new_request_id(kind)
    route = f"POST {request.url.path}"
    try:
        body = await _read_json(request)
        if kind == "chat":
            req = parse_body(ChatCompletionRequest, body)
            prep = fe.prepare_chat(req)
        else:
            req = parse_body(CompletionRequest, body)
            prep = fe.prepare_completion(req)
        gens = await fe.start_choices(rid, prep, route, t0)
    except APIError as e:
        fe.log_rejected(rid, route, e, t0)
        return error_response(e)
    headers = {"X-Request-Id": rid}
    gen = gens[0] if len(gens) == 1 else Choices(gens)              # n > 1: router/choices.py
    if req.stream:
        headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return GenerationStreamingResponse(gen, (_stream if len(gens) == 1 else _stream_choices)(fe, gen, req, kind),
                                           media_type="text/event-stream", headers=headers)
    collect = asyncio.ensure_future((_collect if len(gens) == 1 else _collect_choices)(fe, gen, req, kind))
    disconnect = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait([collect, disconnect], return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
        if not collect.done():          # the client went away (or we were cancelled): abort generation
            collect.cancel()
            try:
                await collect
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
            await gen.aclose()
    if not collect.done() or collect.cancelled():
        return Response(status_code=499)
    try:
        return JSONResponse(collect.result(), headers=headers)
    except APIError as e:
        return error_response(e)


class GenerationStreamingResponse(StreamingResponse):
    """Closes the Generation however the response ends, even when the client left before the first
    chunk (Starlette then cancels the response before our body generator ever starts)."""

    def __init__(self, gen: Generation, content, **kw):
        super().__init__(content, **kw)
        self.generation = gen

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.generation.aclose()


async def _wait_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def _read_json(request: Request):
    raw = await request.body()
    if not raw:
        raise InvalidRequest("body: the request body is empty; send a JSON object", param="body")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:    # JSONDecodeError, and ints past 4300 digits
        raise InvalidRequest(f"body: invalid JSON ({e})", param="body") from None
    except RecursionError:
        raise InvalidRequest("body: invalid JSON (nested too deeply)", param="body") from None


async def _collect(fe: Frontend, gen: Generation, req, kind: str) -> dict:
    text, ids, lps, finish = [], [], [], None
    async for d in gen:
        text.append(d.text)
        ids.extend(d.token_ids)
        lps.extend(d.logprobs or [])
        finish = d.finish_reason
    out = "".join(text)
    fmt = LogprobFormatter(fe.tokenizer) if gen.prep.params.logprobs is not None else None
    tok = ids if req.return_token_ids else None
    ptok = gen.prep.prompt_ids if req.return_token_ids else None
    if kind == "chat":
        message = None
        if gen.prep.parsing is not None:          # reasoning_content / tool_calls (chat_output.py)
            message, finish = gen.prep.parsing.new().message(out, finish)
        return R.chat_response(gen.request_id, int(time.time()), gen.prep.model, out, finish, gen.prompt_tokens,
                               gen.completion_tokens, tok, ptok, gen.prediction_tokens, message,
                               fmt and fmt.chat(ids, lps))
    logprobs = fmt and joined(fmt.echoed(gen.prep.prompt_ids, gen.prompt_logprobs) if gen.prep.echo_text else None,
                              fmt.completion(ids, lps))
    return R.completion_response(gen.request_id, int(time.time()), gen.prep.model, gen.prep.echo_text + out, finish,
                                 gen.prompt_tokens, gen.completion_tokens, tok, ptok, gen.prediction_tokens, logprobs)


async def _collect_choices(fe: Frontend, group: Choices, req, kind: str) -> dict:
    try:
        return merge_bodies(list(await asyncio.gather(*(_collect(fe, g, req, kind) for g in group.gens))))
    finally:
        await group.aclose()


async def _stream_choices(fe: Frontend, group: Choices, req, kind: str):
    """n > 1: every choice's chunks (each with its index) as they come, one usage chunk, then [DONE]."""
    try:
        async for body in merge_chunks([_stream(fe, g, req, kind, encode=dict, done=False) for g in group.gens]):
            yield R.sse(body)
    finally:
        await group.aclose()
    yield R.SSE_DONE


async def _stream(fe: Frontend, gen: Generation, req, kind: str, encode=R.sse, done: bool = True):
    """SSE bytes of one choice; encode=dict, done=False: its chunks as dicts, for _stream_choices."""
    rid, model, created = gen.request_id, gen.prep.model, int(time.time())
    include_usage = req.include_usage
    continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
    want_ids = req.return_token_ids
    parser = gen.prep.parsing.new() if kind == "chat" and gen.prep.parsing is not None else None
    fmt = LogprobFormatter(fe.tokenizer) if gen.prep.params.logprobs is not None else None
    echo = gen.prep.echo_text           # with logprobs, sent with the first update (the prompt's logprobs come with it)

    def chunk(text: str, finish: str | None, ids: list[int] | None, role: bool = False,
              delta: dict | None = None, logprobs: dict | None = None) -> bytes:
        u = R.usage(gen.prompt_tokens, gen.completion_tokens) if continuous else None
        tok = ids if want_ids else None
        if kind == "chat":
            if delta is None:
                delta = {"role": "assistant", "content": text} if role else \
                    ({"content": text} if text or not finish else {})
            return encode(R.chat_chunk(rid, created, model, delta, finish, tok, u, include_usage, logprobs))
        return encode(R.completion_chunk(rid, created, model, text, finish, tok, u, include_usage, logprobs))

    try:
        if kind == "chat":
            yield chunk("", None, [] if want_ids else None, role=True)
        elif echo and fmt is None:
            yield chunk(echo, None, [] if want_ids else None)
            echo = ""
        async for d in gen:
            if echo:
                yield chunk(echo, None, [] if want_ids else None,
                            logprobs=fmt.echoed(gen.prep.prompt_ids, gen.prompt_logprobs))
                echo = ""
            lp = fmt and (fmt.chat if kind == "chat" else fmt.completion)(d.token_ids, d.logprobs)
            has_ids = (want_ids or fmt is not None) and d.token_ids
            if parser is not None:          # reasoning / tool-call deltas: maybe several, maybe none yet
                deltas, finish = parser.step(d.text, d.finish_reason)
                if not deltas and (finish or has_ids):
                    deltas = [{}]
                for i, delta in enumerate(deltas):
                    last = i == len(deltas) - 1
                    yield chunk("", finish if last else None, d.token_ids if i == 0 else [], delta=delta,
                                logprobs=lp if i == 0 else None)
            elif d.text or d.finish_reason or has_ids:
                yield chunk(d.text, d.finish_reason, d.token_ids, logprobs=lp)
        if include_usage:
            obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
            yield encode(R.usage_chunk(rid, created, model, obj, gen.prompt_tokens, gen.completion_tokens,
                                       gen.prediction_tokens))
    except APIError as e:           # after the 200 header: report in-band, as OpenAI-compatible servers do
        yield encode(e.to_json())
    finally:
        await gen.aclose()
    if done:
        yield R.SSE_DONE


__all__ = ["build_app", "error_response", "reason_phrase"]
