"""Mixed real-client traffic against a served cluster, for tests/reliability and benchmarks/soak.py.

Each worker thread loops until the deadline, picking one kind of request at random:

  full     a greedy stream read to the end; its text must equal what the same request got alone
  drop     a stream dropped after a few chunks (the client goes away)
  stop     a request that ends on a stop string long before max_tokens
  grpc     a gRPC stream cancelled mid-way
  poison   a request with an out-of-range field: must get a 4xx (or a normal answer), never a 5xx
  burst    many concurrent non-streaming requests at once, past the queue limit: 200s and 429s

Every outcome is tallied; a 5xx or an in-band error counts as failed, with its message kept.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import random
import threading
import time

import httpx

MODEL = "hybrid-mini"
PROMPTS = ["def fibonacci(n):", "import os\n\ndef main():", "class Stack:\n    def __init__(self):",
           "for i in range(10):", "def read_file(path):", "# Sort a list of numbers\n",
           "def is_prime(n):", "while True:"]
# Values a client can send that no plan can carry (seeds past 64 bits, ids past the vocabulary, ...).
POISON = [{"seed": 2 ** 70}, {"seed": -2 ** 70}, {"max_tokens": 2 ** 63}, {"top_k": 2 ** 40},
          {"stop_token_ids": [2 ** 40]}, {"temperature": 1e308}, {"top_p": 5e-324}, {"min_tokens": 2 ** 63},
          {"prompt": [2 ** 40]}, {"prompt": [-1]}, {"n": 2 ** 40}, {"max_tokens": -1}, {"top_p": 0},
          {"logit_bias": {"1": 1e308}}, {"stop": ["x"] * 10_000}]


@dataclasses.dataclass
class Tally:
    sent: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    outcome: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    failures: list[str] = dataclasses.field(default_factory=list)
    failure_times: list[float] = dataclasses.field(default_factory=list)
    mismatches: list[str] = dataclasses.field(default_factory=list)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def add(self, kind: str, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.sent[kind] += 1
            self.outcome[outcome] += 1
            if outcome == "failed":
                self.failures.append(f"{kind}: {detail[:300]}")
                self.failure_times.append(time.time())

    def summary(self) -> dict:
        return {"sent": sum(self.sent.values()), **{k: self.outcome[k] for k in
                ("completed", "aborted_by_client", "rejected_429", "rejected_4xx", "failed")},
                "greedy_mismatches": len(self.mismatches), "by_kind": dict(self.sent)}


def full_body(i: int, max_tokens: int) -> dict:
    return {"model": MODEL, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}


def read_stream(url: str, body: dict, max_chunks: int | None = None, timeout: float = 300) -> tuple[int, str, str]:
    """(status, text, error) of a streamed completion; stops after `max_chunks` content chunks."""
    text, n = [], 0
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=timeout) as r:
        if r.status_code != 200:
            return r.status_code, "", r.read().decode(errors="replace")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            d = json.loads(line[6:])
            if "error" in d:
                return 500, "".join(text), json.dumps(d["error"])
            if d.get("choices"):
                text.append(d["choices"][0].get("text") or "")
                n += 1
                if max_chunks is not None and n >= max_chunks:
                    break
    return 200, "".join(text), ""


def references(url: str, lengths: list[int]) -> dict[tuple[int, int], str]:
    """What each (prompt, max_tokens) greedy request gets alone: sent one at a time before the mix."""
    refs = {}
    for i in range(len(PROMPTS)):
        for n in lengths:
            r = httpx.post(url + "/v1/completions", json=full_body(i, n), timeout=300)
            r.raise_for_status()
            refs[(i, n)] = r.json()["choices"][0]["text"]
    return refs


class Mix:
    """The traffic mix; `run(seconds)` from `workers` threads, then `tally` says what happened."""

    def __init__(self, url: str, grpc_port: int, refs: dict[tuple[int, int], str], *, seed: int = 0,
                 weights: dict[str, float] | None = None, burst: int = 64, long_tokens: int = 400):
        """long_tokens: max_tokens of the requests that their client cuts (within the context limit)."""
        self.url, self.grpc_port, self.refs, self.burst, self.long = url, grpc_port, refs, burst, long_tokens
        self.weights = weights or {"full": 4, "drop": 2, "stop": 2, "grpc": 1, "poison": 2, "burst": 0.3}
        self.rng = random.Random(seed)
        self.rng_lock = threading.Lock()
        self.tally = Tally()

    def pick(self):
        with self.rng_lock:
            kind = self.rng.choices(list(self.weights), list(self.weights.values()))[0]
            return kind, self.rng.random(), self.rng.randrange(1 << 30)

    def run(self, seconds: float, workers: int = 6) -> Tally:
        deadline = time.time() + seconds

        def worker():
            while time.time() < deadline:
                kind, u, r = self.pick()
                try:
                    getattr(self, "_" + kind)(u, r)
                except httpx.HTTPError as e:
                    self.tally.add(kind, "failed", f"{type(e).__name__}: {e}")
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for f in [pool.submit(worker) for _ in range(workers)]:
                f.result()
        return self.tally

    def _status(self, kind: str, status: int, detail: str, ok: str = "completed") -> None:
        if status == 200:
            self.tally.add(kind, ok)
        elif status == 429:
            self.tally.add(kind, "rejected_429")
        elif 400 <= status < 500:
            self.tally.add(kind, "rejected_4xx" if kind == "poison" else "failed", detail)
        else:
            self.tally.add(kind, "failed", f"{status} {detail}")

    def _full(self, u: float, r: int) -> None:
        key = sorted(self.refs)[r % len(self.refs)]
        status, text, err = read_stream(self.url, full_body(*key))
        if status == 200 and text != self.refs[key]:
            self.tally.mismatches.append(f"{key}: {text[:80]!r} != {self.refs[key][:80]!r}")
        self._status("full", status, err)

    def _drop(self, u: float, r: int) -> None:
        status, _, err = read_stream(self.url, full_body(r, self.long), max_chunks=1 + r % 5)
        self._status("drop", status, err, ok="aborted_by_client")

    def _stop(self, u: float, r: int) -> None:
        body = {**full_body(r, self.long), "stop": ["\n", "(", ":"]}
        resp = httpx.post(self.url + "/v1/completions", json=body, timeout=300)
        if resp.status_code == 200 and resp.json()["choices"][0]["finish_reason"] != "stop":
            self.tally.add("stop", "failed", f"finish_reason {resp.json()['choices'][0]['finish_reason']}")
            return
        self._status("stop", resp.status_code, resp.text)

    def _grpc(self, u: float, r: int) -> None:
        import grpc

        from router.grpc_client import Client

        with Client(f"127.0.0.1:{self.grpc_port}", timeout=300) as c:
            try:
                stream = c.generate(PROMPTS[r % len(PROMPTS)], max_tokens=self.long, ignore_eos=True)
                for _ in range(1 + r % 4):
                    next(stream)
                stream.cancel()
                self.tally.add("grpc", "aborted_by_client")
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self.tally.add("grpc", "rejected_429")
                else:
                    self.tally.add("grpc", "failed", f"{code}: {e.details()}")

    def _poison(self, u: float, r: int) -> None:
        bad = POISON[r % len(POISON)]
        body = {**full_body(r, 8), **bad}
        resp = httpx.post(self.url + "/v1/completions", json=body, timeout=300)
        self._status("poison", resp.status_code, f"{bad}: {resp.text}")

    def _burst(self, u: float, r: int) -> None:
        body = {**full_body(r, 96)}
        with concurrent.futures.ThreadPoolExecutor(self.burst) as pool:
            rs = list(pool.map(lambda _: httpx.post(self.url + "/v1/completions", json=body, timeout=300),
                               range(self.burst)))
        for resp in rs:
            self._status("burst", resp.status_code, resp.text)
