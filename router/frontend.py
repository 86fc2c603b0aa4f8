"""The front door's logic, shared by HTTP and gRPC: check, tokenize, admit, stream text, account.

`Frontend.prepare_*` turns a validated request into prompt ids and SamplingParams (model name,
context length, max_tokens resolution); `Frontend.start` admits it (errors are raised before any byte
goes to the client); iterating the returned `Generation` yields `Delta`s of text with stop strings
applied. The Generation records metrics and writes the one log line per request when it ends, however
it ends (finished, stop string, client gone).
"""
from __future__ import annotations

import dataclasses
import hmac
import logging
import time
import uuid
from typing import AsyncIterator, Union

from model_shards.sampling_params import SamplingParams

from .api_schemas import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeChatRequest,
                          TokenizeCompletionRequest)
from .chat_output import ChatParsing, chat_parsing, check_parser_names
from .choices import ChoiceStreams
from .detokenizer import TextStream
from . import logprob_format
from .errors import (APIError, AuthenticationError, ContextLengthExceeded, InternalError, InvalidRequest,
                     ModelNotFound, Unavailable)
from .metrics import Metrics
from .request_stream import RequestStream
from .tokenizer import BaseTokenizer, ChatTemplateError
from .structured_outputs import after_reasoning
from .tool_schemas import check_tool_use

log = logging.getLogger("hybridserve.requests")

COMPLETIONS_DEFAULT_MAX_TOKENS = 16      # the OpenAI legacy completions default


@dataclasses.dataclass
class ModelInfo:
    name: str
    max_model_len: int
    vocab_size: int = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 0
    eos_token_ids: list[int] = dataclasses.field(default_factory=list)
    generation_defaults: dict = dataclasses.field(default_factory=dict)
    folder: str | None = None
    num_speculative_tokens: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "ModelInfo":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass
class Prepared:
    """A request ready for the engine."""

    kind: str                       # "chat" | "completion"
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    stop: list[str]
    skip_special_tokens: bool = True
    echo_text: str = ""             # completions with echo=True
    parsing: ChatParsing | None = None   # chat: reasoning / tool-call parsing of the output (HTTP responses)


@dataclasses.dataclass
class Delta:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list | None = None      # per token of token_ids, when the request asked (logprob_format.py)


def new_request_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


class Frontend:
    """`tokenizer` and `info` may arrive later (`set_model`): the Ray Serve ingress answers /health
    while model replicas still load weights; until then generation requests get 503 + Retry-After.
    `reasoning_parser` / `tool_call_parser`: `--reasoning-parser` / `--tool-call-parser` (chat_output.py)."""

    def __init__(self, backend, tokenizer: BaseTokenizer | None, info: ModelInfo | None, *,
                 served_model_name: str | None = None, aliases: tuple[str, ...] = (), api_key: str | None = None,
                 metrics: Metrics | None = None, reasoning_parser: str | None = None,
                 tool_call_parser: str | None = None):
        if served_model_name is None and info is None:
            raise ValueError("served_model_name is needed when the model info comes later")
        check_parser_names(reasoning_parser, tool_call_parser)
        self.reasoning_parser, self.tool_call_parser = reasoning_parser, tool_call_parser
        self.backend = backend
        self.tokenizer = tokenizer
        self.info = info
        self.model_name = served_model_name or info.name
        self.accepted_names = {self.model_name, *[a for a in aliases if a]}
        self.api_key = api_key or None
        self.metrics = metrics or Metrics(self.model_name)
        self.created = int(time.time())
        self.draining = False
        self.open: dict[str, "Generation"] = {}     # admitted and not yet closed, by request id

    def set_model(self, info: ModelInfo, tokenizer: BaseTokenizer) -> None:
        self.info, self.tokenizer = info, tokenizer

    @property
    def loaded(self) -> bool:
        return self.info is not None and self.tokenizer is not None

    @property
    def in_flight(self) -> int:
        return len(self.open)

    async def ready(self) -> bool:
        """A completion would be served now: model info loaded, not draining, an engine stepping."""
        if not self.loaded or self.draining:
            return False
        try:
            return bool(await self.backend.ready())
        except Exception:  # noqa: BLE001 - stats unavailable (a replica restarting): not ready
            return False

    async def abort_all(self, reason: str) -> int:
        """End every open request (shutdown past the drain timeout); returns how many there were."""
        gens = list(self.open.values())
        for g in gens:
            log.info("%s: aborting (%s)", g.request_id, reason)
            await g.aclose()
        return len(gens)

    @property
    def max_model_len(self) -> int | None:
        return self.info.max_model_len if self.info is not None else None

    # ---- checks --------------------------------------------------------------------------------
    def check_api_key(self, presented: str | None) -> None:
        if self.api_key is None:
            return
        if not presented:
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
        if not hmac.compare_digest(presented.encode(), self.api_key.encode()):   # constant time
            raise AuthenticationError("invalid API key")

    def check_model(self, name: str | None) -> str:
        if name is None or name in self.accepted_names:
            return self.model_name
        raise ModelNotFound(f"model: the model {name!r} does not exist; this server serves {self.model_name!r}",
                            param="model")

    def check_accepting(self) -> None:
        if not self.loaded:
            raise Unavailable("the model is still loading; retry shortly", retry_after_s=5)
        if self.draining:
            raise Unavailable("the server is shutting down; retry on another replica", retry_after_s=5)

    # ---- preparing -----------------------------------------------------------------------------
    def prepare_chat(self, req: ChatCompletionRequest) -> Prepared:
        model = self.check_model(req.model)
        req.check_supported()
        check_tool_use(req, self.tool_call_parser)
        self.check_accepting()
        ids, text = self._encode_chat(req)
        prep = self._prepared("chat", model, req, ids, "messages")
        prep.parsing = chat_parsing(req, text, self.reasoning_parser, self.tool_call_parser)
        if prep.parsing is not None:     # a grammar applies after the reasoning (structured_outputs.py)
            prep.params = after_reasoning(prep.params, prep.parsing.reasoning_state)
        return prep

    def prepare_completion(self, req: CompletionRequest) -> Prepared:
        model = self.check_model(req.model)
        req.check_supported()
        self.check_accepting()
        prompt = req.single_prompt()
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
            echo = prompt
        else:
            bad = [t for t in prompt if not (0 <= t < self.info.vocab_size)] if self.info.vocab_size else []
            if bad:
                raise InvalidRequest(f"prompt: token id {bad[0]} is outside the vocabulary "
                                     f"[0, {self.info.vocab_size})", param="prompt")
            ids = list(prompt)
            echo = self.tokenizer.decode(ids)
        prep = self._prepared("completion", model, req, ids, "prompt")
        prep.echo_text = echo if req.echo else ""
        return prep

    def _prepared(self, kind: str, model: str, req, ids: list[int], prompt_field: str) -> Prepared:
        limit, n = self.info.max_model_len, len(ids)
        if n == 0:
            raise InvalidRequest(f"{prompt_field}: the prompt is empty", param=prompt_field)
        if n >= limit:
            raise ContextLengthExceeded(
                f"{prompt_field}: this model's maximum context length is {limit} tokens, and the prompt has {n} "
                f"tokens (at least 1 must remain for the completion); shorten the {prompt_field}",
                param=prompt_field)
        requested = req.requested_max_tokens()
        field = "max_completion_tokens" if kind == "chat" and req.max_completion_tokens is not None else "max_tokens"
        if requested is None:
            room = limit - n
            default = self.info.generation_defaults.get("max_new_tokens")
            if kind == "completion":
                default = COMPLETIONS_DEFAULT_MAX_TOKENS
            max_tokens = min(room, default) if default else room
        elif n + requested > limit:
            raise ContextLengthExceeded(
                f"{field}: this model's maximum context length is {limit} tokens, but {n + requested} were requested "
                f"({n} in the {prompt_field}, {requested} for the completion); reduce {field} or the {prompt_field}",
                param=field)
        else:
            max_tokens = requested
        if req.min_tokens > max_tokens:
            raise InvalidRequest(f"min_tokens: must be <= {field} ({max_tokens}), got {req.min_tokens}",
                                 param="min_tokens")
        bad = [t for t in (req.stop_token_ids or []) if self.info.vocab_size and not 0 <= t < self.info.vocab_size]
        if bad:
            raise InvalidRequest(f"stop_token_ids: token id {bad[0]} is outside the vocabulary", param="stop_token_ids")
        params = req.sampling_params(max_tokens, tuple(self.info.eos_token_ids), self.info.generation_defaults)
        params = dataclasses.replace(params, **logprob_format.requested(req, kind))
        bad = [t for t, _ in params.logit_bias if self.info.vocab_size and t >= self.info.vocab_size]
        if bad:         # vLLM refuses these too: a bias on no token is a client mistake
            raise InvalidRequest(f"logit_bias: token id {bad[0]} is outside the vocabulary "
                                 f"[0, {self.info.vocab_size})", param="logit_bias")
        return Prepared(kind, model, ids, params, req.stop_list(), req.skip_special_tokens)

    # ---- /tokenize, /detokenize (vLLM's): the tokenizer only, no engine ------------------------------
    def tokenize(self, req: Union[TokenizeCompletionRequest, TokenizeChatRequest]) -> dict:
        """The prompt's ids; for messages, exactly the prompt a chat completion of them would get."""
        self.check_model(req.model)
        self._check_tokenizer()
        if isinstance(req, TokenizeChatRequest):
            ids, _ = self._encode_chat(req)
        else:
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        # vLLM's TokenizeResponse: token_strs is null unless asked for
        return {"count": len(ids), "max_model_len": self.info.max_model_len, "tokens": ids,
                "token_strs": self.tokenizer.token_strs(ids) if req.return_token_strs else None}

    def detokenize(self, req: DetokenizeRequest) -> dict:
        self.check_model(req.model)
        self._check_tokenizer()
        vocab = self.info.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab] if vocab else []
        if bad:
            raise InvalidRequest(f"tokens: token id {bad[0]} is outside the vocabulary [0, {vocab})", param="tokens")
        # as vLLM decodes (transformers' default): special tokens included, the text shows every id
        return {"prompt": self.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    def _check_tokenizer(self) -> None:
        if not self.loaded:
            raise Unavailable("the model is still loading; retry shortly", retry_after_s=5)

    def _encode_chat(self, req) -> tuple[list[int], str]:
        """The prompt ids of a chat request and the rendered template they are the tokens of."""
        try:
            text = self.tokenizer.apply_chat_template(req.chat_messages(), req.add_generation_prompt,
                                                      req.continue_final_message, **req.template_kwargs())
        except ChatTemplateError as e:
            param = next((p for p in ("continue_final_message", "messages") if str(e).startswith(p + ":")), None)
            raise InvalidRequest(str(e) if param else f"messages: {e}", param=param or "messages") from None
        return self.tokenizer.encode_rendered(text, req.add_special_tokens), text

    # ---- running -------------------------------------------------------------------------------
    async def start(self, request_id: str, prep: Prepared, route: str, t_arrival: float | None = None
                    ) -> "Generation":
        """Admit the request in the engine; raises APIError (429 queue full, 503 draining, ...)."""
        t0 = t_arrival if t_arrival is not None else time.perf_counter()
        self.check_accepting()
        outputs = await self.backend.submit(request_id, prep.prompt_ids, prep.params)
        return Generation(self, request_id, prep, outputs, route, t0)

    async def start_choices(self, request_id: str, prep: Prepared, route: str, t_arrival: float | None = None
                            ) -> list["Generation"]:
        """start() for any n: one Generation per choice, over one engine request (router/choices.py)."""
        if prep.params.n == 1:
            return [await self.start(request_id, prep, route, t_arrival)]
        t0 = t_arrival if t_arrival is not None else time.perf_counter()
        self.check_accepting()
        split = ChoiceStreams(await self.backend.submit(request_id, prep.prompt_ids, prep.params), prep.params.n)
        return [Generation(self, request_id, prep, split.choice(i), route, t0, i) for i in range(prep.params.n)]

    def log_rejected(self, request_id: str, route: str, err: APIError, t0: float) -> None:
        self.metrics.observe_rejected(err.status)
        log.info("%s %s -> %d %s: %s (%.0f ms)", request_id, route, err.status, err.code, err.message,
                 1000 * (time.perf_counter() - t0))


class Generation:
    """One admitted request: iterate for Deltas (text with stop strings applied). Closing it, however
    the request ends, closes its RequestStream, which aborts the request if it is still running."""

    def __init__(self, fe: Frontend, request_id: str, prep: Prepared, outputs: RequestStream, route: str,
                 t0: float, index: int = 0):
        self.fe, self.request_id, self.prep, self.outputs, self.route, self.t0 = fe, request_id, prep, outputs, route, t0
        self.text = TextStream(fe.tokenizer, prep.stop, prep.params.min_tokens, prep.skip_special_tokens)
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.ttft: float | None = None
        self.drafts = (0, 0, 0)         # MTP: drafts verified, accepted, passes that verified any
        self.prompt_logprobs: list | None = None   # echo with logprobs: per prompt token 1.., from the first update
        self.index = index              # n > 1: its choice; each has a Generation (and a log line) of its own
        self.key = request_id if not index else f"{request_id}/{index}"
        fe.open[self.key] = self

    @property
    def prompt_tokens(self) -> int:
        return len(self.prep.prompt_ids)

    @property
    def prediction_tokens(self) -> tuple[int, int] | None:
        """(accepted, rejected) MTP drafts, as OpenAI's usage.completion_tokens_details counts prediction
        tokens; None when no draft of this request was verified (MTP off, or it never drafted)."""
        verified, accepted, _ = self.drafts
        return (accepted, verified - accepted) if verified else None

    @property
    def acceptance_length(self) -> float | None:
        """Tokens per verifying pass, 1 + accepted / passes (the usual MTP figure); None without drafts."""
        _, accepted, steps = self.drafts
        return 1.0 + accepted / steps if steps else None

    def __aiter__(self):
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[Delta]:
        m = self.fe.metrics
        last = None
        try:
            async for out in self.outputs:
                now = time.perf_counter()
                if out.finish_reason == "error":
                    self.finish_reason = "error"
                    raise _generation_error(out.error)
                if out.new_token_ids:
                    if self.ttft is None:
                        self.ttft = now - self.t0
                        m.observe_first_token(self.ttft)
                    elif last is not None:
                        m.observe_gap(now - last)
                    last = now
                self.token_ids.extend(out.new_token_ids)
                if out.prompt_logprobs is not None:
                    self.prompt_logprobs = out.prompt_logprobs
                self.completion_tokens = max(out.num_output_tokens, len(self.token_ids))
                self.drafts = (out.num_verified_drafts, out.num_accepted_drafts, out.num_verify_steps)
                text, hit = self.text.add(out.new_token_ids)
                if hit:
                    self.finish_reason = "stop"
                elif out.finished:
                    text += self.text.finish()
                    self.finish_reason = "stop" if self.text.stopped else out.finish_reason
                if text or out.new_token_ids or self.finish_reason:
                    yield Delta(text, list(out.new_token_ids), self.finish_reason, self.prompt_tokens,
                                self.completion_tokens, out.logprobs)
                if self.finish_reason:
                    return
        finally:
            await self._close()

    async def _close(self) -> None:
        if self.fe is None:
            return
        fe, self.fe = self.fe, None
        fe.open.pop(self.key, None)
        await self.outputs.aclose()     # aborts the request in the engine if it is still running
        e2e = time.perf_counter() - self.t0
        reason = self.finish_reason or "abort"
        fe.metrics.observe_finished(e2e, 0 if self.index else self.prompt_tokens, self.completion_tokens, reason)
        ttft = f"{1000 * self.ttft:.0f} ms" if self.ttft is not None else "-"
        accept = f"{self.acceptance_length:.2f}" if self.acceptance_length is not None else "-"
        log.info("%s %s model=%s prompt=%d completion=%d finish=%s ttft=%s e2e=%.0f ms mtp_accept_len=%s",
                 self.key, self.route, fe.model_name, self.prompt_tokens, self.completion_tokens,
                 reason if self.finish_reason else "abort (client gone)", ttft, 1000 * e2e, accept)

    async def aclose(self) -> None:
        await self._close()


def _generation_error(message: str | None) -> APIError:
    """An engine failure mid-request: 503 if the engine died (retry elsewhere), else 500."""
    message = message or "unknown error"
    if "EngineDeadError" in message or "engine failure" in message:
        return Unavailable(f"generation failed: {message}", retry_after_s=5)
    return InternalError(f"generation failed: {message}")


RequestBody = Union[ChatCompletionRequest, CompletionRequest]
