"""A small synchronous Python client for hybridserve's gRPC API.

    from router.grpc_client import Client
    with Client("127.0.0.1:50051") as c:
        for part in c.generate(messages=[{"role": "user", "content": "Hi"}], max_tokens=32):
            print(part.text, end="", flush=True)

Or from a shell: `python -m router.grpc_client --target 127.0.0.1:50051 "Once upon a time"`.
Errors arrive as `grpc.RpcError` with the codes described in hybridserve.proto.
"""
from __future__ import annotations

import argparse
import sys
from typing import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .proto import hybridserve_pb2 as pb
from .proto import hybridserve_pb2_grpc as pb_grpc

_OPTIONAL = ("max_tokens", "temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty",
             "repetition_penalty", "min_p", "n", "logprobs", "echo", "json_schema", "json_object", "regex", "grammar")


def build_request(prompt: str | None = None, *, messages: list[dict] | None = None,
                  prompt_token_ids: list[int] | None = None, model: str = "", stop: list[str] | str | None = None,
                  stop_token_ids: list[int] | None = None, ignore_eos: bool = False, min_tokens: int = 0,
                  logit_bias: dict[int, float] | None = None, choice: list[str] | None = None,
                  **optional) -> pb.GenerateRequest:
    unknown = set(optional) - set(_OPTIONAL)
    if unknown:
        raise TypeError(f"unknown parameters: {sorted(unknown)}")
    req = pb.GenerateRequest(model=model, ignore_eos=ignore_eos, min_tokens=min_tokens,
                             stop=[stop] if isinstance(stop, str) else list(stop or []),
                             stop_token_ids=list(stop_token_ids or []), choice=list(choice or []))
    req.logit_bias.update({int(t): float(b) for t, b in (logit_bias or {}).items()})
    if messages is not None:
        req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    elif prompt_token_ids is not None:
        req.prompt_token_ids.ids.extend(prompt_token_ids)
    elif prompt is not None:
        req.prompt = prompt
    for k, v in optional.items():
        if v is not None:
            setattr(req, k, v)
    return req


class Client:
    def __init__(self, target: str = "127.0.0.1:50051", api_key: str | None = None, timeout: float | None = None):
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout = timeout

    def generate(self, prompt: str | None = None, **kw) -> Iterator[pb.GenerateResponse]:
        """Stream text deltas. Breaking out of the loop (or `.cancel()` on the result) cancels the request."""
        return self.stub.Generate(build_request(prompt, **kw), metadata=self.metadata, timeout=self.timeout)

    def complete(self, prompt: str | None = None, **kw) -> pb.CompleteResponse:
        return self.stub.Complete(build_request(prompt, **kw), metadata=self.metadata, timeout=self.timeout)

    def list_models(self) -> list[pb.Model]:
        return list(self.stub.ListModels(pb.ListModelsRequest(), metadata=self.metadata,
                                         timeout=self.timeout).models)

    def health(self, service: str = "") -> str:
        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout or 5)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Stream a completion from a hybridserve gRPC server.")
    ap.add_argument("prompt")
    ap.add_argument("--target", default="127.0.0.1:50051")
    ap.add_argument("--chat", action="store_true", help="send the prompt as one user chat message")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--api-key", default=None)
    args = ap.parse_args(argv)
    kw = dict(max_tokens=args.max_tokens, temperature=args.temperature)
    if args.chat:
        kw["messages"] = [{"role": "user", "content": args.prompt}]
    else:
        kw["prompt"] = args.prompt
    with Client(args.target, api_key=args.api_key) as c:
        try:
            for part in c.generate(**kw):
                sys.stdout.write(part.text)
                sys.stdout.flush()
                if part.finish_reason:
                    u = part.usage
                    sys.stderr.write(f"\n[{part.finish_reason}; prompt {u.prompt_tokens}, completion "
                                     f"{u.completion_tokens} tokens]\n")
        except grpc.RpcError as e:
            sys.stderr.write(f"error: {e.code().name}: {e.details()}\n")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
