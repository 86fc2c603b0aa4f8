"""The whole engine on the Triton kernels: a greedy run of the single-process AsyncEngine with
HYBRIDSERVE_KERNELS=triton gives the oracle's tokens (model_shards/generate.py on the default CPU path).

The kernel tests beside this one check each kernel against its reference and one forward of a tiny model;
this one checks what the scheduler builds around them: chunked prompts (prefill conv and chunked scan,
prefill attention), batched decode steps, MTP drafts and their verification passes, the commit of the
accepted position, the drafter's own float16 passes. Without a GPU the kernels run under Triton's
interpreter (TRITON_INTERPRET=1, set by conftest.py), a few seconds per pass, so the run is short.
"""
from __future__ import annotations

import asyncio
import collections

import pytest

pytest.importorskip("triton", reason="triton is not installed (pyproject installs it on Linux only)")

from kernels import ops  # noqa: E402
from kernels import triton as tk  # noqa: E402
from model_shards.sampling_params import SamplingParams  # noqa: E402
from router.engine import AsyncEngine  # noqa: E402
from router.engine_config import EngineConfig  # noqa: E402
from tests.engine_helpers import collect, oracle  # noqa: E402

# Ops a run of prompts, decode steps and verified drafts must take through a Triton kernel: every layer
# kind (Mamba, attention, MoE, norms) in each kind of pass (prefill, decode, verification, commit).
MUST_LAUNCH = {
    "rms_norm", "gated_rms_norm", "grouped_experts",
    "causal_conv1d_varlen", "ssd_chunk_scan_varlen", "prefill_attention",     # prompts longer than a chunk
    "conv_step_", "ssd_update_", "decode_attention",                         # decode steps
    "causal_conv1d_update", "ssd_verify", "paged_attention", "ssd_advance_",  # verification and commit
}


@pytest.fixture
def launches(monkeypatch):
    """Calls per Triton op: kernels/ops.py's table of Triton kernels (kernels.triton.OPS), each wrapped
    in a counter for the test."""
    counts: collections.Counter = collections.Counter()
    for name, fn in list(tk.OPS.items()):
        def counted(*args, _fn=fn, _name=name, **kwargs):
            counts[_name] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setitem(tk.OPS, name, counted)
    assert ops._triton_ops() is tk.OPS                 # the table the dispatch reads
    return counts


def test_greedy_engine_run_on_triton_kernels_gives_the_oracle_tokens(preset_cache, monkeypatch, launches):
    """`tiny` with MTP k=3: two prompts (7 tokens, and 13 split by the 16-token budget into 9, longer than
    a scan chunk of 8, and 4) and 6 greedy tokens each, drafts verified along the way. The tokens must be
    the oracle's, and the run must have taken every op of MUST_LAUNCH through its Triton kernel."""
    monkeypatch.setenv(ops.ENV, "triton")
    engine = AsyncEngine(EngineConfig(model="tiny", num_speculative_tokens=3, max_model_len=128, max_num_seqs=4,
                                      max_num_batched_tokens=16))
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    prompts = [[5, 17, 33, 90, 12, 7, 41], [100, 3, 9, 200, 11, 45, 60, 71, 8, 22, 13, 19, 150]]

    async def scenario():
        await engine.start()
        try:
            return await asyncio.gather(*[collect(engine, f"r{i}", p, params, 3) for i, p in enumerate(prompts)])
        finally:
            await engine.shutdown()

    results = asyncio.run(scenario())
    missing = sorted(MUST_LAUNCH - set(launches))
    assert not missing, f"ops the run never took through Triton: {missing} (calls: {dict(launches)})"

    monkeypatch.delenv(ops.ENV)                        # the oracle: the default CPU path
    for i, (p, (tokens, reason)) in enumerate(zip(prompts, results)):
        assert reason == "length"
        assert tokens == oracle(engine.folder, p, params), f"prompt {i}"
