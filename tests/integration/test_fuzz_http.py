"""Fuzz the HTTP API from its own OpenAPI schema (`/openapi.json`) with schemathesis.

The real app on loopback (uvicorn in a thread, an in-process engine on the tiny random preset) gets
schema-valid requests and invalid ones (out of range, wrong types, missing fields). Every answer must
be a documented status with a conforming body, never a 5xx, and invalid requests must be rejected; after
the run the server still answers, and the engine holds nothing. Failures it finds are kept as regular
tests in tests/unit/test_request_limits.py.

Each run explores with a new seed (printed); `HYBRIDSERVE_FUZZ_SEED=<seed>` replays one. Sized for CI:
FUZZ_EXAMPLES examples per operation plus schemathesis' coverage phase (boundary values of every field).
"""
from __future__ import annotations

import collections
import os
import random

import httpx
import pytest
import schemathesis
from schemathesis import GenerationMode

from router.engine_config import EngineConfig
from router.openapi import build_openapi
from tests.frontdoor_helpers import LocalServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

FUZZ_EXAMPLES = int(os.environ.get("HYBRIDSERVE_FUZZ_EXAMPLES", "30"))
CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "response_headers_conformance", "negative_data_rejection"]
TITLE, VERSION = "hybridserve", "0.1.0"         # what build_app's FastAPI(...) publishes
STATUSES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)   # per operation


@pytest.fixture(scope="module")
def server(preset_cache):
    # A short context keeps every valid request short (the fuzzer picks max_tokens up to the context).
    cfg = EngineConfig(model="tiny", max_model_len=48, max_num_seqs=4, max_queued_requests=16)
    with LocalServer(cfg, served_model_name="tiny", grpc=False, max_body_bytes=256 * 1024) as s:
        yield s


def fuzz_schema():
    """The document the app publishes (checked below), loaded when the test module is imported: schemathesis
    turns each operation into a test then. Its lazy loading from a live server does not work with pytest 9."""
    seed = int(os.environ.get("HYBRIDSERVE_FUZZ_SEED") or random.randrange(2**32))
    print(f"schemathesis seed: {seed} (replay with HYBRIDSERVE_FUZZ_SEED={seed})")
    schema = schemathesis.openapi.from_dict(build_openapi(TITLE, VERSION, secured=False))
    schema.config.update(request_timeout=60)
    schema.config.seed = seed
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                    max_examples=FUZZ_EXAMPLES, database="none")
    schema.config.phases.update(phases=["examples", "coverage", "fuzzing"])
    schema.config.checks.update(included_check_names=CHECKS)
    return schema


schema = fuzz_schema()


def test_the_app_publishes_the_fuzzed_schema(server):
    published = httpx.get(server.url + "/openapi.json", timeout=30).json()
    assert published == schema.raw_schema
    assert set(published["paths"]) == {"/v1/chat/completions", "/v1/completions", "/v1/models",
                                       "/v1/models/{model_id}", "/tokenize", "/detokenize", "/health", "/ready",
                                       "/metrics"}


@schema.parametrize()
def test_the_api_answers_every_generated_request_as_documented(case, server):
    STATUSES[f"{case.method} {case.path}"][case.call_and_validate(base_url=server.url).status_code] += 1


def test_after_fuzzing_the_server_answers_and_the_engine_holds_nothing(server):
    """Runs after the fuzz test (file order): nothing leaked, nothing hangs; and the fuzzer did reach the
    engine (valid requests answered 200), it was not all refused at the door."""
    ops = ("POST /v1/chat/completions", "POST /v1/completions", "POST /tokenize", "POST /detokenize")
    print({op: dict(STATUSES[op]) for op in ops})
    for op in ops:
        assert STATUSES[op][200] > 0 and STATUSES[op][400] > 0, (op, STATUSES[op])
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.get("/health").json() == {"status": "ok"}
        r = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    stats = server.wait_cache_free()
    assert stats.running + stats.waiting == 0 and stats.kv_blocks_used == 0
