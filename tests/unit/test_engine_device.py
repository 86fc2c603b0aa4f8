"""Where the single-process engine runs its model: `--device` (auto: a GPU when torch sees one), the
same device for weights, caches, the tail's sampling generators and drafts. On this CPU-only machine
the CUDA half is checked where it can be (the choice and its errors); benchmarks/gpu_check.py runs the
engine on a GPU where there is one."""
from __future__ import annotations

import pytest
import torch

from model_shards import speculative
from model_shards.sampling_params import SamplingParams
from router.engine_config import EngineConfig

HAS_CUDA = torch.cuda.is_available()


def test_auto_picks_cuda_exactly_when_torch_sees_a_gpu():
    assert EngineConfig().local_device() == ("cuda" if HAS_CUDA else "cpu")
    assert EngineConfig(device="cpu").local_device() == "cpu"


def test_an_unknown_device_is_refused_by_name():
    with pytest.raises(ValueError, match=r"device: must be one of auto, cpu, cuda, got 'tpu'"):
        EngineConfig(device="tpu").validate()


@pytest.mark.skipif(HAS_CUDA, reason="checks the error a machine without a GPU gives")
def test_cuda_without_a_gpu_is_a_clear_error_not_a_torch_trace():
    with pytest.raises(ValueError, match=r"device: cuda: torch sees no GPU"):
        EngineConfig(device="cuda").validate()


@pytest.mark.skipif(HAS_CUDA, reason="the CPU plan; a GPU plans against its own memory")
def test_a_cpu_engine_plans_against_host_memory():
    assert EngineConfig(device="cpu").device_spec(1).kind == "cpu"


DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_draws_on_the_logits_device_and_is_reproducible_there(device):
    """The generator lives where the logits do (a CPU generator cannot drive torch.multinomial over CUDA
    probabilities), and one seed gives one draw whatever else the batch holds."""
    g = speculative.step_generator(seed=1234, num_tokens=7, device=device)
    assert g.device.type == device
    logits = torch.randn(50, device=device) * 3
    p = SamplingParams(temperature=1.0)
    first = speculative.sample(logits, p, speculative.step_generator(1234, 7, device=device))[0]
    again = speculative.sample(logits, p, speculative.step_generator(1234, 7, device=device))[0]
    assert first == again


@pytest.mark.parametrize("device", DEVICES)
def test_verification_keeps_drafts_on_the_logits_device(device):
    torch.manual_seed(0)
    logits = torch.randn(4, 50, device=device)
    drafts = [int(t) for t in logits[:3].argmax(-1)]              # all three agree with the target
    toks, acc = speculative.verify(logits, drafts, None, SamplingParams(), None)
    assert (toks, acc) == (drafts + [int(logits[3].argmax())], 3)
    q = torch.softmax(torch.randn(3, 50, device=device), -1)
    toks, acc = speculative.verify(logits, drafts, q, SamplingParams(temperature=1.0),
                                   speculative.step_generator(5, 0, device=device))
    assert len(toks) == acc + 1 and toks[:acc] == drafts[:acc]
