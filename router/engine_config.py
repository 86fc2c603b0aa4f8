"""The engine's settings, validated in one place, and where its weights come from."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path

from cluster.replica_comm import TRANSPORTS   # torch-free; resolves "auto" per deployment

log = logging.getLogger("hybridserve.engine")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = REPO_ROOT / "checkpoints" / "hybrid-mini"
FALLBACK_PRESET = "small"


DRAFT_DTYPES = ("auto", "model", "float32", "float16", "bfloat16")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
SPECULATIVE_POLICIES = ("adaptive", "fixed")
AUTO_SPECULATIVE_TOKENS = 3                # "auto": MTP drafts per step at most, when the checkpoint has MTP


@dataclasses.dataclass
class EngineConfig:
    model: str = "default"                 # a checkpoint folder, a preset name, or "default"
    pipeline_parallel_size: int = 1
    expert_parallel_size: int = 1
    num_speculative_tokens: int | str = "auto"   # MTP drafts per step at most; auto: 3 with MTP, else 0; 0: off
    speculative_policy: str = "adaptive"   # adaptive: drafts per sequence per step chosen as it runs; fixed: k always
    draft_dtype: str = "auto"              # the MTP drafter's dtype (model_shards/drafter.py resolve_draft_dtype)
    draft_vocab: bool = True               # greedy drafts only from the checkpoint's draft_vocab.json (if any)
    dtype: str = "auto"                    # weights + KV cache (Mamba states: float32); auto: model_dtype()
    max_num_seqs: int = 16
    max_model_len: int = 2048
    max_num_batched_tokens: int = 512
    block_size: int = 16
    num_kv_blocks: int | None = None       # --num-gpu-blocks-override; None: what memory and max_num_seqs allow
    gpu_memory_utilization: float = 0.9    # share of device memory (CPU: of the replica's budget) for weights + caches
    max_queued_requests: int = 64
    use_ray: bool = False                  # False: the whole model in this process (the oracle's setup)
    model_process: bool = False            # without Ray: the model in a child process (its own GIL), not a thread
    model_niceness: int = 0                # the model's processes' nice value where permitted (cluster/os_priority.py);
                                           # 0 leaves it (a library does not reprioritise its host); `hybridserve
                                           # serve` asks for -10 (--model-niceness)
    num_microbatches: int | None = None    # None: pipeline_parallel_size micro-batches in flight
    async_scheduling: bool = True          # plan a decode step while the one before it runs (look-ahead,
                                           # router/scheduler.py), where passes run in order on one model
    placement_strategy: str = "PACK"       # Ray placement group strategy for the replica's actors
    transport: str = "auto"                # hidden states + expert tokens: auto, ray, gloo, nccl, nccl4py
    stage_resources: list[dict] | None = None   # extra Ray resources per stage (pins stages to nodes)
    actor_num_cpus: float = 0.25           # Ray CPU label per actor (threads are capped separately)
    torch_threads: int = 1                 # torch threads per worker (1 beat 2 at every batch size on CPU)
    seed: int = 0                          # weights of a preset, and default sampling seeds
    stall_timeout_s: float = 60.0          # busy with no pass back for this long: not ready (/ready 503)
    device_memory_gib: float | None = None  # per device; None: the GPU's memory, or a share of host RAM
    device: str = "auto"                   # without Ray: cpu, cuda, or auto (cuda when torch sees a GPU)
    cuda_graphs: bool = True               # on CUDA, decode passes replay CUDA graphs (model_shards/cuda_graphs.py);
                                           # no effect on a CPU; --enforce-eager: False

    def device_spec(self, count: int, dtype_bytes: int | None = None):
        """The devices the replica plans against: GPUs when the Ray cluster (or this process) has them.
        dtype_bytes: per weight and KV element, of the dtype the model is loaded in (model_dtype), so that
        the plan counts what is allocated; None: the DeviceSpec defaults (4 on a CPU, 2 on GPUs)."""
        from cluster.planner import DeviceSpec

        mem = int(self.device_memory_gib * 2**30) if self.device_memory_gib else None
        kw = {} if dtype_bytes is None else dict(weight_dtype_bytes=dtype_bytes, kv_dtype_bytes=dtype_bytes)
        if (_gpus_available() if self.use_ray else self.local_device() == "cuda"):
            import torch

            if mem is None:
                mem = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 80 * 2**30
            return DeviceSpec("cuda", count, mem, name="gpu", reserve_fraction=1.0 - self.gpu_memory_utilization, **kw)
        return DeviceSpec.cpu(count, mem, reserve_fraction=1.0 - self.gpu_memory_utilization, **kw)

    def model_dtype(self, folder) -> str:
        """`dtype` resolved for this deployment: what the executors load the weights (and keep the KV
        cache) in and what the planner budgets. "auto" is float32 where the weights sit on a CPU (the
        in-process and child-process executors always, Ray actors without GPUs: the CPU path computes in
        float32 end to end) and the checkpoint's own dtype where Ray stage actors get GPUs."""
        if self.dtype != "auto":
            return self.dtype
        from model_shards.weights import resolve_dtype

        device = ("cuda" if _gpus_available() else "cpu") if self.use_ray else self.local_device()
        return str(resolve_dtype("auto", device, folder)).removeprefix("torch.")

    def local_device(self) -> str:
        """The device of the in-process and child-process executors (Ray actors pick their own)."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def validate(self) -> None:
        def need(cond, field, msg):
            if not cond:
                raise ValueError(f"{field}: {msg}")
        need(self.pipeline_parallel_size >= 1, "pipeline_parallel_size", "must be >= 1")
        need(self.expert_parallel_size >= 1, "expert_parallel_size", "must be >= 1")
        k = self.num_speculative_tokens
        need(k == "auto" or (isinstance(k, int) and not isinstance(k, bool) and k >= 0), "num_speculative_tokens",
             f"must be an integer >= 0 or 'auto', got {k!r}")
        need(self.speculative_policy in SPECULATIVE_POLICIES, "speculative_policy",
             f"must be one of {', '.join(SPECULATIVE_POLICIES)}, got {self.speculative_policy!r}")
        need(self.draft_dtype in DRAFT_DTYPES, "draft_dtype", f"must be one of {', '.join(DRAFT_DTYPES)}")
        need(self.dtype in MODEL_DTYPES, "dtype", f"must be one of {', '.join(MODEL_DTYPES)}, got {self.dtype!r}")
        need(self.transport in TRANSPORTS, "transport",
             f"must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}")
        need(-20 <= self.model_niceness <= 19, "model_niceness", f"must be in [-20, 19], got {self.model_niceness}")
        need(self.device in DEVICES, "device", f"must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.device == "cuda" and not self.use_ray:
            import torch

            need(torch.cuda.is_available(), "device", "cuda: torch sees no GPU on this machine (use auto or cpu)")
        need(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        need(self.max_model_len >= 2, "max_model_len", "must be >= 2")
        need(self.max_num_batched_tokens > self.max_speculative_tokens, "max_num_batched_tokens",
             f"must exceed num_speculative_tokens ({self.max_speculative_tokens})")
        need(self.block_size >= 1, "block_size", "must be >= 1")
        need(self.max_queued_requests >= 0, "max_queued_requests", "must be >= 0")
        need(self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks",
             f"(--num-gpu-blocks-override) must be >= 1, got {self.num_kv_blocks}")
        need(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization",
             f"must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.pipeline_parallel_size > 1 or self.expert_parallel_size > 1:
            need(self.use_ray, "use_ray", "pipeline or expert parallelism needs use_ray=True")

    @property
    def microbatches(self) -> int:
        return self.num_microbatches or self.pipeline_parallel_size

    @property
    def max_speculative_tokens(self) -> int:
        """k, with "auto" counted as what it may become (before the checkpoint is read)."""
        k = self.num_speculative_tokens
        return AUTO_SPECULATIVE_TOKENS if k == "auto" else int(k)

    def speculative_tokens_for(self, has_mtp: bool) -> int:
        """k for a checkpoint: "auto" is 3 when it has an MTP block and 0 (off) when not."""
        if self.num_speculative_tokens == "auto":
            return AUTO_SPECULATIVE_TOKENS if has_mtp else 0
        return int(self.num_speculative_tokens)

    def kv_blocks(self) -> int:
        """The override, else room for max_num_seqs sequences of max_model_len tokens each, counted as
        the scheduler counts them (MTP drafting positions included: cluster.contracts.kv_positions)."""
        if self.num_kv_blocks:
            return self.num_kv_blocks
        from cluster.contracts import kv_positions

        per_seq = math.ceil(kv_positions(self.max_model_len, self.max_speculative_tokens) / self.block_size)
        return self.max_num_seqs * per_seq


def _gpus_available() -> bool:
    try:
        import ray

        if ray.is_initialized():
            return ray.cluster_resources().get("GPU", 0) > 0
    except ImportError:
        pass
    import torch

    return torch.cuda.is_available()


def resolve_checkpoint(model: str, seed: int = 0) -> Path:
    """A folder with config.json and safetensors for `model`.

    "default" is the shipped checkpoint (or, if absent, the "small" preset); a preset name gets random
    weights written once to a cache folder, so every actor loads the same files.
    """
    from model_shards.presets import PRESETS

    if model == "default":
        if (DEFAULT_CHECKPOINT / "config.json").exists():
            return DEFAULT_CHECKPOINT
        log.warning("no shipped checkpoint at %s: serving the random-weight preset %r", DEFAULT_CHECKPOINT,
                    FALLBACK_PRESET)
        model = FALLBACK_PRESET
    path = Path(model)
    if (path / "config.json").exists():
        return path
    if model not in PRESETS:
        raise ValueError(f"model: {model!r} is neither a checkpoint folder (with config.json) nor a preset "
                         f"({', '.join(sorted(PRESETS))})")
    cache_root = Path(os.environ.get("HYBRIDSERVE_CACHE", Path.home() / ".cache" / "hybridserve"))
    folder = cache_root / "presets" / f"{model}-seed{seed}"
    if not (folder / "config.json").exists():
        import torch

        from model_shards.model import HybridModel
        from model_shards.weights import save_checkpoint

        log.info("writing random weights for preset %r to %s", model, folder)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        with torch.no_grad():
            save_checkpoint(HybridModel(PRESETS[model]).init_random(seed), tmp)
        try:
            tmp.rename(folder)
        except OSError:                      # another process wrote it first
            pass
    return folder
